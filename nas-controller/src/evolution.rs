//! Regularized (aging) evolution, Real et al. 2019 ("Regularized Evolution for Image
//! Classifier Architecture Search", Algorithm 1), in its asynchronous form.
//!
//! - Initial population: uniformly random cells until `population_size` (P) of them have
//!   been rewarded. At most P − |population| random cells are outstanding at a time, so
//!   `propose` returns nothing while the initial population is being trained.
//! - Cycles (once the population is full): draw `sample_size` (S) members uniformly with
//!   replacement, take the one with the highest reward (the earliest drawn on a tie), and
//!   propose `SearchSpace::mutate` of it: exactly one input or one op differs from the
//!   parent. Any number of children can be outstanding.
//! - A rewarded child joins the population as its youngest member; when that makes the
//!   population larger than P, the oldest member is removed (aging), whatever its reward.
//! - A failed child is counted and does not join the population, unless `failure_reward`
//!   is set; a failed initial cell is replaced by another random one.

use std::collections::VecDeque;
use std::path::Path;

use nas_space::{CellSpec, SearchSpace, SpaceRng};
use serde::{Deserialize, Serialize};

use crate::ledger::Ledger;
use crate::state::{SavedState, SpaceDef};
use crate::{ControllerError, EvolutionConfig, Proposal, Strategy};

/// A living member of the population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The proposal id it was evaluated under.
    pub id: u64,
    /// Its cells.
    pub spec: CellSpec,
    /// Its reward.
    pub reward: f64,
}

/// Everything of an [`Evolution`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EvolutionState {
    config: EvolutionConfig,
    space: SpaceDef,
    seed: u64,
    rng: [u64; 4],
    ledger: Ledger,
    /// Oldest first.
    population: VecDeque<Member>,
    reported: u64,
    failed: u64,
    removed: u64,
    mutations: u64,
    best: Option<(u64, f64)>,
}

/// Regularized evolution as a [`Strategy`].
#[derive(Debug)]
pub struct Evolution {
    state: EvolutionState,
    space: SearchSpace,
    rng: SpaceRng,
}

impl Evolution {
    /// Evolution over `space`, drawing from `SpaceRng::new(seed)`.
    pub fn new(config: &EvolutionConfig, space: &SearchSpace, seed: u64) -> Result<Evolution, ControllerError> {
        config.validate()?;
        space.validate()?;
        let rng = SpaceRng::new(seed);
        let state = EvolutionState {
            config: config.clone(),
            space: space.into(),
            seed,
            rng: rng.state(),
            ledger: Ledger::default(),
            population: VecDeque::new(),
            reported: 0,
            failed: 0,
            removed: 0,
            mutations: 0,
            best: None,
        };
        Ok(Evolution { state, space: space.clone(), rng })
    }

    pub(crate) fn restore(state: EvolutionState, state_path: &Path) -> Result<Evolution, ControllerError> {
        state.config.validate().map_err(|e| ControllerError::corrupt(state_path, e))?;
        let space = SearchSpace::from(&state.space);
        space.validate().map_err(|e| ControllerError::corrupt(state_path, e))?;
        if state.population.len() > state.config.population_size {
            return Err(ControllerError::corrupt(state_path, "the population is larger than population_size"));
        }
        let rng = SpaceRng::from_state(state.rng);
        Ok(Evolution { state, space, rng })
    }

    /// The living population, oldest first.
    pub fn population(&self) -> &VecDeque<Member> {
        &self.state.population
    }

    /// The best of `sample_size` members drawn with replacement.
    fn tournament(&mut self) -> &Member {
        let population = &self.state.population;
        let mut best = self.rng.below(population.len());
        for _ in 1..self.state.config.sample_size {
            let i = self.rng.below(population.len());
            if population[i].reward > population[best].reward {
                best = i;
            }
        }
        &population[best]
    }
}

impl Strategy for Evolution {
    fn name(&self) -> &str {
        "evolution"
    }

    fn sample(&mut self, n: usize) -> Result<Vec<CellSpec>, ControllerError> {
        let filled = self.state.population.len() >= self.state.config.population_size;
        (0..n)
            .map(|_| {
                if !filled {
                    return Ok(self.space.sample(&mut self.rng));
                }
                let parent = self.tournament().spec.clone();
                Ok(self.space.mutate(&parent, &mut self.rng)?.0)
            })
            .collect()
    }

    fn propose(&mut self, max: usize) -> Result<Vec<Proposal>, ControllerError> {
        let size = self.state.config.population_size;
        let mut out = Vec::new();
        while out.len() < max {
            let proposal = if self.state.population.len() < size {
                let outstanding = self.state.ledger.pending.iter().filter(|p| p.parent.is_none()).count();
                if self.state.population.len() + outstanding >= size {
                    break;
                }
                let spec = self.space.sample(&mut self.rng);
                let actions = self.space.encode(&spec)?;
                Proposal { id: 0, spec, actions, log_prob: None, parent: None, note: Some("initial population".into()) }
            } else {
                let parent = self.tournament().clone();
                let (spec, mutation) = self.space.mutate(&parent.spec, &mut self.rng)?;
                let actions = self.space.encode(&spec)?;
                self.state.mutations += 1;
                Proposal {
                    id: 0,
                    spec,
                    actions,
                    log_prob: None,
                    parent: Some(parent.id),
                    note: Some(mutation.to_string()),
                }
            };
            out.push(self.state.ledger.issue(proposal));
        }
        Ok(out)
    }

    fn report(&mut self, id: u64, reward: Option<f64>) -> Result<(), ControllerError> {
        let proposal = self.state.ledger.take(id, reward)?;
        self.state.reported += 1;
        if reward.is_none() {
            self.state.failed += 1;
        }
        let Some(r) = reward.or(self.state.config.failure_reward) else { return Ok(()) };
        if self.state.best.is_none_or(|(_, best)| r > best) {
            self.state.best = Some((id, r));
        }
        self.state.population.push_back(Member { id, spec: proposal.spec, reward: r });
        if self.state.population.len() > self.state.config.population_size {
            self.state.population.pop_front();
            self.state.removed += 1;
        }
        Ok(())
    }

    fn pending(&self) -> Vec<Proposal> {
        self.state.ledger.pending.clone()
    }

    fn save(&self, dir: &Path) -> Result<(), ControllerError> {
        let mut state = self.state.clone();
        state.rng = self.rng.state();
        crate::state::save(dir, SavedState::Evolution(state), None)
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.state;
        let n = s.population.len();
        let mean = (n > 0).then(|| s.population.iter().map(|m| m.reward).sum::<f64>() / n as f64);
        let pop_best =
            s.population.iter().map(|m| m.reward).fold(None, |acc: Option<f64>, r| Some(acc.map_or(r, |a| a.max(r))));
        serde_json::json!({
            "strategy": "evolution",
            "proposed": s.ledger.next_id,
            "pending": s.ledger.pending.len(),
            "reported": s.reported,
            "failed": s.failed,
            "mutations": s.mutations,
            "population": n,
            "population_size": s.config.population_size,
            "removed": s.removed,
            "population_mean_reward": mean,
            "population_best_reward": pop_best,
            "best_id": s.best.map(|b| b.0),
            "best_reward": s.best.map(|b| b.1),
        })
    }
}
