//! Random search: every decision drawn uniformly, the paper's baseline (§4.4). It never
//! waits: `propose(max)` always returns `max` cells.

use std::path::Path;

use nas_space::{SearchSpace, SpaceRng};
use serde::{Deserialize, Serialize};

use crate::ledger::Ledger;
use crate::state::{SavedState, SpaceDef};
use crate::{ControllerError, Proposal, Strategy};

/// Everything of a [`RandomSearch`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RandomState {
    space: SpaceDef,
    seed: u64,
    rng: [u64; 4],
    ledger: Ledger,
    reported: u64,
    failed: u64,
    reward_sum: f64,
    best: Option<(u64, f64)>,
}

/// Uniform sampling of the space with `SearchSpace::sample`.
#[derive(Debug)]
pub struct RandomSearch {
    state: RandomState,
    space: SearchSpace,
    rng: SpaceRng,
}

impl RandomSearch {
    /// Random search over `space`, drawing from `SpaceRng::new(seed)`.
    pub fn new(space: &SearchSpace, seed: u64) -> Result<RandomSearch, ControllerError> {
        space.validate()?;
        let rng = SpaceRng::new(seed);
        let state = RandomState {
            space: space.into(),
            seed,
            rng: rng.state(),
            ledger: Ledger::default(),
            reported: 0,
            failed: 0,
            reward_sum: 0.0,
            best: None,
        };
        Ok(RandomSearch { state, space: space.clone(), rng })
    }

    pub(crate) fn restore(state: RandomState, state_path: &Path) -> Result<RandomSearch, ControllerError> {
        let space = SearchSpace::from(&state.space);
        space.validate().map_err(|e| ControllerError::corrupt(state_path, e))?;
        let rng = SpaceRng::from_state(state.rng);
        Ok(RandomSearch { state, space, rng })
    }
}

impl Strategy for RandomSearch {
    fn name(&self) -> &str {
        "random"
    }

    fn propose(&mut self, max: usize) -> Result<Vec<Proposal>, ControllerError> {
        let mut out = Vec::with_capacity(max);
        for _ in 0..max {
            let spec = self.space.sample(&mut self.rng);
            let actions = self.space.encode(&spec)?;
            out.push(self.state.ledger.issue(Proposal {
                id: 0,
                spec,
                actions,
                log_prob: None,
                parent: None,
                note: Some("random".into()),
            }));
        }
        Ok(out)
    }

    fn sample(&mut self, n: usize) -> Result<Vec<nas_space::CellSpec>, ControllerError> {
        Ok((0..n).map(|_| self.space.sample(&mut self.rng)).collect())
    }

    fn report(&mut self, id: u64, reward: Option<f64>) -> Result<(), ControllerError> {
        self.state.ledger.take(id, reward)?;
        self.state.reported += 1;
        match reward {
            Some(r) => {
                self.state.reward_sum += r;
                if self.state.best.is_none_or(|(_, best)| r > best) {
                    self.state.best = Some((id, r));
                }
            }
            None => self.state.failed += 1,
        }
        Ok(())
    }

    fn pending(&self) -> Vec<Proposal> {
        self.state.ledger.pending.clone()
    }

    fn save(&self, dir: &Path) -> Result<(), ControllerError> {
        let mut state = self.state.clone();
        state.rng = self.rng.state();
        crate::state::save(dir, SavedState::Random(state), None)
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.state;
        let ok = s.reported - s.failed;
        serde_json::json!({
            "strategy": "random",
            "proposed": s.ledger.next_id,
            "pending": s.ledger.pending.len(),
            "reported": s.reported,
            "failed": s.failed,
            "mean_reward": (ok > 0).then(|| s.reward_sum / ok as f64),
            "best_id": s.best.map(|b| b.0),
            "best_reward": s.best.map(|b| b.1),
        })
    }
}
