//! Strategy configurations, with the paper's values as defaults.
//!
//! Every field is public and serde-visible, so a run's config file can override any of
//! them; a missing field takes its default. The defaults are the paper's (§3, §A.2); the fields
//! marked "not in the paper" are this crate's choices.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ControllerError;

/// Which search strategy to run, with its settings.
///
/// The JSON form is internally tagged: `{"strategy": "ppo", "learning_rate": 0.001}`;
/// fields left out take the paper's defaults, and unknown fields (typos) are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum StrategyConfig {
    /// The NASNet controller trained with PPO (paper §A.2).
    Ppo(PpoConfig),
    /// The same controller trained with REINFORCE and a baseline (NAS, Zoph & Le 2017);
    /// `clip` and `ppo_epochs` are ignored.
    Reinforce(PpoConfig),
    /// Every decision drawn uniformly (paper §4.4 baseline).
    Random,
    /// Regularized (aging) evolution, Real et al. 2019.
    Evolution(EvolutionConfig),
}

impl StrategyConfig {
    /// The strategy's short name: `ppo`, `reinforce`, `random` or `evolution`.
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::Ppo(_) => "ppo",
            StrategyConfig::Reinforce(_) => "reinforce",
            StrategyConfig::Random => "random",
            StrategyConfig::Evolution(_) => "evolution",
        }
    }

    /// Checks every field against its range.
    pub fn validate(&self) -> Result<(), ControllerError> {
        match self {
            StrategyConfig::Ppo(c) | StrategyConfig::Reinforce(c) => c.validate(),
            StrategyConfig::Random => Ok(()),
            StrategyConfig::Evolution(c) => c.validate(),
        }
    }
}

impl fmt::Display for StrategyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StrategyConfig {
    type Err = ControllerError;

    /// `ppo`, `reinforce`, `random` or `evolution`, with the paper's defaults.
    fn from_str(name: &str) -> Result<StrategyConfig, ControllerError> {
        match name {
            "ppo" => Ok(StrategyConfig::Ppo(PpoConfig::default())),
            "reinforce" => Ok(StrategyConfig::Reinforce(PpoConfig::default())),
            "random" => Ok(StrategyConfig::Random),
            "evolution" => Ok(StrategyConfig::Evolution(EvolutionConfig::default())),
            _ => Err(ControllerError::UnknownStrategy { name: name.to_string() }),
        }
    }
}

/// The optimizer of the controller's weights (the paper gives only the learning rate;
/// Adam is what NAS used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam with `adam_beta1`, `adam_beta2`, `adam_eps` and no weight decay.
    Adam,
    /// Plain stochastic gradient descent.
    Sgd,
}

/// How a child's accuracy becomes the controller's reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardTransform {
    /// The accuracy itself (the only thing the NASNet paper names).
    Accuracy,
    /// The cube of the accuracy, as NAS (Zoph & Le 2017) did.
    Cube,
}

impl RewardTransform {
    /// The reward of `accuracy`.
    pub fn apply(self, accuracy: f64) -> f64 {
        match self {
            RewardTransform::Accuracy => accuracy,
            RewardTransform::Cube => accuracy * accuracy * accuracy,
        }
    }
}

/// What one step of the reward baseline's moving average takes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineUpdate {
    /// `b ← d·b + (1 − d)·mean` once per batch, after its update.
    #[default]
    Batch,
    /// `b ← d·b + (1 − d)·r` for each reward of the batch in id order, after its update.
    Child,
}

impl std::str::FromStr for BaselineUpdate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "batch" => Ok(BaselineUpdate::Batch),
            "child" => Ok(BaselineUpdate::Child),
            _ => Err(format!("`{s}`: expected batch or child")),
        }
    }
}

/// Settings of the LSTM controller and its policy-gradient update. `Default` is the paper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// LSTM hidden units; token embeddings and the "go" input have the same width. Paper: 100.
    pub lstm_units: usize,
    /// Every weight starts uniform in `[-init_range, init_range]`. Paper: 0.1.
    pub init_range: f64,
    /// Paper: 0.00035.
    pub learning_rate: f64,
    /// Weight of the entropy bonus subtracted from the loss. Paper: 0.00001.
    pub entropy_weight: f64,
    /// Decay of the reward baseline, an exponential moving average of the rewards. Paper:
    /// 0.95. The first batch sets it to its mean.
    pub baseline_decay: f64,
    /// What one step of the baseline's moving average takes in: the batch's mean reward
    /// (default) or each reward in turn. The paper gives the decay, not which.
    pub baseline_per: BaselineUpdate,
    /// Architectures per update. Paper: 20.
    pub batch_size: usize,
    /// PPO clip ε of the ratio of joint action probabilities. Not in the paper; 0.2 is
    /// the PPO paper's value.
    pub clip: f64,
    /// Passes of the PPO loss over each batch (one full-batch gradient step each).
    /// Not in the paper.
    pub ppo_epochs: usize,
    /// Not in the paper (Adam, as NAS).
    pub optimizer: OptimizerKind,
    /// Adam's β₁.
    pub adam_beta1: f64,
    /// Adam's β₂.
    pub adam_beta2: f64,
    /// Adam's ε.
    pub adam_eps: f64,
    /// Logits are divided by this before the softmax (ENAS used 5). Not in the paper: 1.
    pub temperature: f64,
    /// When set, logits become `c · tanh(logits / temperature)` (ENAS used 2.5).
    /// Not in the paper: off.
    pub tanh_constant: Option<f64>,
    /// When set, the global gradient norm is clipped to this value. Not in the paper: off.
    pub grad_clip_norm: Option<f64>,
    /// Not in the paper, which names only the accuracy: `Accuracy`.
    pub reward: RewardTransform,
    /// The accuracy given to a failed child (before the `reward` transform). `None` (default)
    /// leaves failed children out of the update; when every child of a batch fails, the
    /// batch makes no update.
    pub failure_reward: Option<f64>,
}

impl Default for PpoConfig {
    fn default() -> PpoConfig {
        PpoConfig {
            lstm_units: 100,
            init_range: 0.1,
            learning_rate: 0.00035,
            entropy_weight: 0.00001,
            baseline_decay: 0.95,
            baseline_per: BaselineUpdate::Batch,
            batch_size: 20,
            clip: 0.2,
            ppo_epochs: 4,
            optimizer: OptimizerKind::Adam,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            temperature: 1.0,
            tanh_constant: None,
            grad_clip_norm: None,
            reward: RewardTransform::Accuracy,
            failure_reward: None,
        }
    }
}

fn positive(field: &'static str, value: f64) -> Result<(), ControllerError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ControllerError::config(field, value, "must be a finite number above 0"))
    }
}

fn at_least_one(field: &'static str, value: usize) -> Result<(), ControllerError> {
    if value >= 1 {
        Ok(())
    } else {
        Err(ControllerError::config(field, value, "must be at least 1"))
    }
}

fn in_unit(field: &'static str, value: f64) -> Result<(), ControllerError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(ControllerError::config(field, value, "must lie in [0, 1)"))
    }
}

impl PpoConfig {
    /// Checks every field against its range.
    pub fn validate(&self) -> Result<(), ControllerError> {
        at_least_one("lstm_units", self.lstm_units)?;
        positive("init_range", self.init_range)?;
        positive("learning_rate", self.learning_rate)?;
        if !(self.entropy_weight.is_finite() && self.entropy_weight >= 0.0) {
            return Err(ControllerError::config(
                "entropy_weight",
                self.entropy_weight,
                "must be finite and at least 0",
            ));
        }
        in_unit("baseline_decay", self.baseline_decay)?;
        at_least_one("batch_size", self.batch_size)?;
        positive("clip", self.clip)?;
        at_least_one("ppo_epochs", self.ppo_epochs)?;
        in_unit("adam_beta1", self.adam_beta1)?;
        in_unit("adam_beta2", self.adam_beta2)?;
        positive("adam_eps", self.adam_eps)?;
        positive("temperature", self.temperature)?;
        if let Some(c) = self.tanh_constant {
            positive("tanh_constant", c)?;
        }
        if let Some(c) = self.grad_clip_norm {
            positive("grad_clip_norm", c)?;
        }
        if let Some(r) = self.failure_reward {
            if !r.is_finite() {
                return Err(ControllerError::config("failure_reward", r, "must be a finite number"));
            }
        }
        Ok(())
    }
}

/// Settings of regularized (aging) evolution, Real et al. 2019. `Default` is their
/// CIFAR-10 setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvolutionConfig {
    /// P: members kept alive; the oldest dies when a child joins a full population. 100.
    pub population_size: usize,
    /// S: members drawn (with replacement) for each tournament; the best is mutated. 25.
    pub sample_size: usize,
    /// The reward given to a failed child, which then joins the population like any other.
    /// `None` (default) records the failure and leaves the population unchanged.
    pub failure_reward: Option<f64>,
}

impl Default for EvolutionConfig {
    fn default() -> EvolutionConfig {
        EvolutionConfig { population_size: 100, sample_size: 25, failure_reward: None }
    }
}

impl EvolutionConfig {
    /// Checks every field against its range.
    pub fn validate(&self) -> Result<(), ControllerError> {
        at_least_one("population_size", self.population_size)?;
        at_least_one("sample_size", self.sample_size)?;
        if self.sample_size > self.population_size {
            return Err(ControllerError::config(
                "sample_size",
                self.sample_size,
                format!("must not exceed population_size ({})", self.population_size),
            ));
        }
        if let Some(r) = self.failure_reward {
            if !r.is_finite() {
                return Err(ControllerError::config("failure_reward", r, "must be a finite number"));
            }
        }
        Ok(())
    }
}
