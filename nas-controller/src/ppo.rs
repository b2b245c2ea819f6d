//! The controller strategies: the LSTM policy trained with PPO (NASNet, paper §A.2) or
//! with REINFORCE (NAS, Zoph & Le 2017).
//!
//! The loop is synchronous per batch, as in the paper: the strategy samples a whole batch
//! of `batch_size` architectures at once, hands them out as asked, waits until every one
//! is reported, then updates the policy and samples the next batch. While a batch is
//! outstanding, `propose` returns nothing.
//!
//! The update, with `A_i = r_i − b` (r the transformed reward, b the baseline):
//! - PPO: `ppo_epochs` full-batch gradient steps on
//!   `−mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i) − entropy_weight · mean_i H_i`,
//!   where `ρ_i = exp(log p_new(a_i) − log p_old(a_i))` is the ratio of joint probabilities
//!   of the whole action sequence (the paper takes the gradient through the joint
//!   probability), `log p_old` the log-probability at sampling time, and `H_i` the summed
//!   entropy of the softmaxes met by sequence i.
//! - REINFORCE: one gradient step on `−mean_i A_i log p(a_i) − entropy_weight · mean_i H_i`.
//!
//! The baseline is an exponential moving average of the rewards, set to the first batch's
//! mean before that batch's update (so the first advantages are centred); after each update
//! it becomes `decay · b + (1 − decay) · mean` (`BaselineUpdate::Batch`, the default) or takes
//! in each reward in id order, `b ← decay · b + (1 − decay) · r` (`BaselineUpdate::Child`). Failed children are
//! left out of the update unless `failure_reward` is set. Results are sorted by id before
//! the update, so the order of reports does not change the outcome.

use std::collections::VecDeque;
use std::path::Path;

use candle_core::{Device, Tensor};
use nas_space::{SearchSpace, SpaceRng};
use serde::{Deserialize, Serialize};

use crate::controller::{Controller, Sampled};
use crate::ledger::Ledger;
use crate::optim::Optimizer;
use crate::state::{SavedState, SpaceDef};
use crate::{BaselineUpdate, ControllerError, PpoConfig, Proposal, Strategy};

/// Which policy-gradient rule updates the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Clipped surrogate, `ppo_epochs` steps per batch.
    Ppo,
    /// Score-function gradient with baseline, one step per batch.
    Reinforce,
}

/// A reported proposal of the current batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    id: u64,
    actions: Vec<usize>,
    log_prob: f64,
    reward: Option<f64>,
}

/// A sampled proposal not yet handed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Queued {
    actions: Vec<usize>,
    log_prob: f64,
    entropy: f64,
}

/// Numbers of the last update, for logs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct UpdateStats {
    loss: Option<f64>,
    policy_loss: Option<f64>,
    entropy: Option<f64>,
    batch_mean_reward: Option<f64>,
    clip_fraction: Option<f64>,
    grad_norm: Option<f64>,
    batch_size: usize,
}

/// Everything of a [`PolicyStrategy`] except its tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PolicyState {
    algorithm: Algorithm,
    config: PpoConfig,
    space: SpaceDef,
    seed: u64,
    rng: [u64; 4],
    ledger: Ledger,
    queue: VecDeque<Queued>,
    results: Vec<Outcome>,
    baseline: Option<f64>,
    updates: u64,
    optimizer_steps: u64,
    reported: u64,
    failed: u64,
    best: Option<(u64, f64)>,
    sampled_entropy: Option<f64>,
    last: UpdateStats,
}

/// The NASNet controller as a [`Strategy`]: PPO (`name() == "ppo"`) or REINFORCE.
#[derive(Debug)]
pub struct PolicyStrategy {
    state: PolicyState,
    space: SearchSpace,
    rng: SpaceRng,
    controller: Controller,
    optimizer: Optimizer,
}

impl PolicyStrategy {
    /// A fresh controller for `space`: weights drawn from `SpaceRng::new(seed)`, which then
    /// drives the sampling.
    pub fn new(
        algorithm: Algorithm,
        config: &PpoConfig,
        space: &SearchSpace,
        seed: u64,
    ) -> Result<PolicyStrategy, ControllerError> {
        config.validate()?;
        space.validate()?;
        let mut rng = SpaceRng::new(seed);
        let controller = Controller::new(space, config, &mut rng)?;
        let optimizer = Optimizer::new(config, controller.vars())?;
        let state = PolicyState {
            algorithm,
            config: config.clone(),
            space: space.into(),
            seed,
            rng: rng.state(),
            ledger: Ledger::default(),
            queue: VecDeque::new(),
            results: Vec::new(),
            baseline: None,
            updates: 0,
            optimizer_steps: 0,
            reported: 0,
            failed: 0,
            best: None,
            sampled_entropy: None,
            last: UpdateStats::default(),
        };
        Ok(PolicyStrategy { state, space: space.clone(), rng, controller, optimizer })
    }

    /// Rebuilds a strategy from its saved state; `path` names the file for errors.
    pub(crate) fn restore(
        state: PolicyState,
        tensors: Option<std::collections::HashMap<String, Tensor>>,
        state_path: &Path,
    ) -> Result<PolicyStrategy, ControllerError> {
        state.config.validate().map_err(|e| ControllerError::corrupt(state_path, e))?;
        let space = SearchSpace::from(&state.space);
        space.validate().map_err(|e| ControllerError::corrupt(state_path, e))?;
        let tensors = tensors.ok_or_else(|| ControllerError::corrupt(state_path, "no weights file is named"))?;
        let controller = Controller::from_tensors(&space, &state.config, &tensors)
            .map_err(|e| ControllerError::corrupt(state_path, format!("weights: {e}")))?;
        let mut optimizer = Optimizer::new(&state.config, controller.vars())?;
        optimizer
            .restore(controller.vars(), &tensors, state.optimizer_steps)
            .map_err(|e| ControllerError::corrupt(state_path, format!("optimizer: {e}")))?;
        let rng = SpaceRng::from_state(state.rng);
        Ok(PolicyStrategy { state, space, rng, controller, optimizer })
    }

    /// The LSTM policy.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// The reward baseline; `None` before the first update.
    pub fn baseline(&self) -> Option<f64> {
        self.state.baseline
    }

    /// Policy updates made so far.
    pub fn updates(&self) -> u64 {
        self.state.updates
    }

    fn update(&mut self) -> Result<(), ControllerError> {
        let mut results = std::mem::take(&mut self.state.results);
        results.sort_by_key(|o| o.id);
        let config = &self.state.config;
        let batch: Vec<(&Outcome, f64)> = results
            .iter()
            .filter_map(|o| o.reward.or(config.failure_reward).map(|r| (o, config.reward.apply(r))))
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        let mean = batch.iter().map(|(_, r)| r).sum::<f64>() / n as f64;
        let baseline = self.state.baseline.unwrap_or(mean);
        let actions: Vec<Vec<usize>> = batch.iter().map(|(o, _)| o.actions.clone()).collect();
        let advantages: Vec<f32> = batch.iter().map(|(_, r)| (r - baseline) as f32).collect();
        let old: Vec<f32> = batch.iter().map(|(o, _)| o.log_prob as f32).collect();
        let advantages = Tensor::from_vec(advantages, n, &Device::Cpu)?;
        let old = Tensor::from_vec(old, n, &Device::Cpu)?;
        let epochs = match self.state.algorithm {
            Algorithm::Ppo => config.ppo_epochs,
            Algorithm::Reinforce => 1,
        };
        let mut last = UpdateStats { batch_size: n, batch_mean_reward: Some(mean), ..UpdateStats::default() };
        for epoch in 0..epochs {
            let (log_prob, entropy) = self.controller.evaluate(&actions)?;
            let policy_loss = match self.state.algorithm {
                Algorithm::Ppo => {
                    let ratio = (&log_prob - &old)?.exp()?;
                    let clipped = ratio.clamp(1.0 - config.clip, 1.0 + config.clip)?;
                    let surrogate = (&ratio * &advantages)?.minimum(&(&clipped * &advantages)?)?;
                    if epoch + 1 == epochs {
                        let ratios = ratio.to_vec1::<f32>()?;
                        let outside =
                            ratios.iter().filter(|&&r| (r as f64 - 1.0).abs() > config.clip).count() as f64 / n as f64;
                        last.clip_fraction = Some(outside);
                    }
                    surrogate.mean_all()?.neg()?
                }
                Algorithm::Reinforce => (&log_prob * &advantages)?.mean_all()?.neg()?,
            };
            let mean_entropy = entropy.mean_all()?;
            let loss = (&policy_loss - (&mean_entropy * config.entropy_weight)?)?;
            let grads = loss.backward()?;
            let norm = Optimizer::grad_norm(self.controller.vars(), &grads)?;
            let scale = match config.grad_clip_norm {
                Some(max) if norm > max => max / norm,
                _ => 1.0,
            };
            self.optimizer.step(self.controller.vars(), &grads, scale)?;
            if epoch == 0 {
                last.loss = Some(loss.to_scalar::<f32>()? as f64);
                last.policy_loss = Some(policy_loss.to_scalar::<f32>()? as f64);
                last.entropy = Some(mean_entropy.to_scalar::<f32>()? as f64);
                last.grad_norm = Some(norm);
            }
        }
        let decay = config.baseline_decay;
        self.state.baseline = Some(match config.baseline_per {
            BaselineUpdate::Batch => decay * baseline + (1.0 - decay) * mean,
            BaselineUpdate::Child => batch.iter().fold(baseline, |b, (_, r)| decay * b + (1.0 - decay) * r),
        });
        self.state.updates += 1;
        self.state.optimizer_steps = self.optimizer.steps;
        self.state.last = last;
        Ok(())
    }

    fn sample_batch(&mut self) -> Result<(), ControllerError> {
        let sampled = self.controller.sample(self.state.config.batch_size, &mut self.rng)?;
        let n = sampled.len() as f64;
        self.state.sampled_entropy = Some(sampled.iter().map(|s| s.entropy).sum::<f64>() / n);
        self.state.queue.extend(sampled.into_iter().map(|Sampled { actions, log_prob, entropy }| Queued {
            actions,
            log_prob,
            entropy,
        }));
        Ok(())
    }
}

impl Strategy for PolicyStrategy {
    fn name(&self) -> &str {
        match self.state.algorithm {
            Algorithm::Ppo => "ppo",
            Algorithm::Reinforce => "reinforce",
        }
    }

    fn propose(&mut self, max: usize) -> Result<Vec<Proposal>, ControllerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if self.state.queue.is_empty() && self.state.ledger.pending.is_empty() {
            self.sample_batch()?;
        }
        let take = max.min(self.state.queue.len());
        let mut out = Vec::with_capacity(take);
        for queued in self.state.queue.drain(..take) {
            let spec = self.space.decode(&queued.actions)?;
            out.push(self.state.ledger.issue(Proposal {
                id: 0,
                spec,
                actions: queued.actions,
                log_prob: Some(queued.log_prob),
                parent: None,
                note: None,
            }));
        }
        Ok(out)
    }

    fn sample(&mut self, n: usize) -> Result<Vec<nas_space::CellSpec>, ControllerError> {
        let sampled = self.controller.sample(n, &mut self.rng)?;
        sampled.iter().map(|s| Ok(self.space.decode(&s.actions)?)).collect()
    }

    fn report(&mut self, id: u64, reward: Option<f64>) -> Result<(), ControllerError> {
        let proposal = self.state.ledger.take(id, reward)?;
        self.state.reported += 1;
        match reward {
            Some(r) => {
                if self.state.best.is_none_or(|(_, best)| r > best) {
                    self.state.best = Some((id, r));
                }
            }
            None => self.state.failed += 1,
        }
        self.state.results.push(Outcome {
            id,
            actions: proposal.actions,
            log_prob: proposal.log_prob.expect("the controller sets log_prob"),
            reward,
        });
        if self.state.queue.is_empty() && self.state.ledger.pending.is_empty() {
            self.update()?;
        }
        Ok(())
    }

    fn pending(&self) -> Vec<Proposal> {
        self.state.ledger.pending.clone()
    }

    fn save(&self, dir: &Path) -> Result<(), ControllerError> {
        let mut tensors = self.controller.tensors();
        tensors.extend(self.optimizer.tensors(self.controller.vars()));
        let mut state = self.state.clone();
        state.rng = self.rng.state();
        crate::state::save(dir, SavedState::Policy(Box::new(state)), Some(tensors))
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.state;
        serde_json::json!({
            "strategy": self.name(),
            "params": self.controller.num_params(),
            "proposed": s.ledger.next_id,
            "pending": s.ledger.pending.len(),
            "reported": s.reported,
            "failed": s.failed,
            "updates": s.updates,
            "baseline": s.baseline,
            "best_id": s.best.map(|b| b.0),
            "best_reward": s.best.map(|b| b.1),
            "sampled_entropy": s.sampled_entropy,
            "last_loss": s.last.loss,
            "last_policy_loss": s.last.policy_loss,
            "last_entropy": s.last.entropy,
            "last_batch_mean_reward": s.last.batch_mean_reward,
            "last_batch_size": s.last.batch_size,
            "last_clip_fraction": s.last.clip_fraction,
            "last_grad_norm": s.last.grad_norm,
        })
    }
}
