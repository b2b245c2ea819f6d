//! The NASNet controller and the search strategies beside it.
//!
//! This crate owns the search strategies of the outer loop: the one-layer LSTM policy
//! (100 units) that emits the 2 × 5B decisions of a `nas_space::CellSpec` and its PPO
//! update (paper §A.2), the same policy under REINFORCE (NAS),
//! the random-search baseline (§4.4) and regularized evolution (Real et al. 2019), with
//! atomic save and exact restore of each.
//! It takes `(proposal id, reward)` pairs and proposes `CellSpec`s; it never sees the
//! tensors of a child network, and it does not train children or schedule workers
//! (that is nas-train's search loop).
//!
//! # Design
//!
//! Every strategy implements [`Strategy`]: `propose` hands out [`Proposal`]s with unique,
//! increasing ids, `report` takes back one reward per id (or `None` for a failed child),
//! `save` writes the whole state into a directory and [`load_strategy`] restores it.
//! A strategy may return fewer proposals than asked, even none, when it must wait for
//! rewards: the controller samples a batch of 20 and updates only once the whole batch is
//! reported (the paper's synchronous minibatch); evolution waits for its initial
//! population.
//!
//! - [`Controller`] (`controller.rs`): the LSTM policy, hand-written on candle tensors and
//!   autograd; one softmax head and one embedding table per decision kind, the input head
//!   masked to the 2 + b states block b can read; weights uniform in [-0.1, 0.1].
//! - [`PolicyStrategy`] (`ppo.rs`): batching, the reward baseline (EMA, decay 0.95), and
//!   the PPO or REINFORCE update with Adam (`optim.rs`).
//! - [`RandomSearch`] (`random.rs`) and [`Evolution`] (`evolution.rs`).
//! - `state.rs`: the saved form. `strategy.json` is the commit point; it names the
//!   safetensors file with the controller's weights and Adam moments.
//!
//! Every random draw (weight init, sampling of actions, tournaments, mutations) comes from
//! one `nas_space::SpaceRng` per strategy, whose state is saved, so a seed fixes a run and
//! a save/load in the middle of a run changes nothing that follows. The controller runs on
//! the CPU: it is small (84,721 weights), and its work per batch is tiny beside training
//! one child.
//!
//! ```
//! use nas_controller::{new_strategy, StrategyConfig};
//! use nas_space::SearchSpace;
//!
//! let space = SearchSpace::nasnet();
//! let mut strategy = new_strategy(&"ppo".parse::<StrategyConfig>()?, &space, 7)?;
//! let batch = strategy.propose(32)?;
//! assert_eq!(batch.len(), 20); // one PPO batch
//! assert!(strategy.propose(1)?.is_empty()); // waits for the rewards
//! for p in &batch {
//!     assert_eq!(space.encode(&p.spec)?, p.actions);
//!     strategy.report(p.id, Some(0.5))?;
//! }
//! assert_eq!(strategy.stats()["updates"], 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod controller;
mod error;
mod evolution;
mod ledger;
mod optim;
mod ppo;
mod random;
mod state;

use std::path::Path;

use nas_space::{CellSpec, SearchSpace};
use serde::{Deserialize, Serialize};

pub use config::{BaselineUpdate, EvolutionConfig, OptimizerKind, PpoConfig, RewardTransform, StrategyConfig};
pub use controller::{Controller, Sampled};
pub use error::ControllerError;
pub use evolution::{Evolution, Member};
pub use ppo::{Algorithm, PolicyStrategy};
pub use random::RandomSearch;
pub use state::{STATE_FILE, STATE_FORMAT, STATE_VERSION};

/// One architecture proposed by a strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Unique and increasing, from 0, assigned by the strategy.
    pub id: u64,
    /// The proposed cells.
    pub spec: CellSpec,
    /// `SearchSpace::encode` of `spec`: the 2 × 5B decisions.
    pub actions: Vec<usize>,
    /// The policy's log-probability of `actions` at sampling time (controller only).
    pub log_prob: Option<f64>,
    /// Evolution: the id of the mutated parent.
    pub parent: Option<u64>,
    /// How the proposal was made, e.g. the mutation, "random", "initial population".
    pub note: Option<String>,
}

/// A search strategy: proposes architectures and learns from their rewards.
pub trait Strategy: Send + std::fmt::Debug {
    /// Short name: "ppo", "reinforce", "random", "evolution".
    fn name(&self) -> &str;

    /// Up to `max` new proposals that can be trained now. Returns fewer, even none, when
    /// the strategy must wait for outstanding rewards: the controller waits for its whole
    /// batch before sampling the next; evolution waits while its initial population is
    /// trained.
    fn propose(&mut self, max: usize) -> Result<Vec<Proposal>, ControllerError>;

    /// The reward of a proposal it made (`Some(accuracy)`, any finite number) or `None`
    /// when the child failed. Unknown ids, already-reported ids and non-finite rewards are
    /// errors that change nothing. For the controller, the report that completes a batch
    /// runs the update (failed children are left out of it unless `failure_reward` is set).
    fn report(&mut self, id: u64, reward: Option<f64>) -> Result<(), ControllerError>;

    /// Proposals made but not yet reported, in id order.
    fn pending(&self) -> Vec<Proposal>;

    /// `n` cells drawn as the strategy would propose them now, which are not proposals: no
    /// reward is expected and only the generator's state changes (weight sharing trains the
    /// shared weights on these). The controller draws from its current policy, random search
    /// uniformly, evolution mutations of tournament winners (uniformly while its first
    /// population is trained).
    fn sample(&mut self, n: usize) -> Result<Vec<CellSpec>, ControllerError>;

    /// Saves the whole state (weights, optimizer moments, RNG, baseline, pending
    /// proposals, population, counters, config) into `dir`, atomically: `strategy.json`
    /// is written last, by rename, and names the weights file it belongs to.
    fn save(&self, dir: &Path) -> Result<(), ControllerError>;

    /// Strategy-specific statistics for logs (counts, best reward, and for the controller
    /// the baseline, entropy, last loss and update count).
    fn stats(&self) -> serde_json::Value;
}

/// Builds a strategy from its config; the seed fixes every random draw it makes.
pub fn new_strategy(
    config: &StrategyConfig,
    space: &SearchSpace,
    seed: u64,
) -> Result<Box<dyn Strategy>, ControllerError> {
    config.validate()?;
    Ok(match config {
        StrategyConfig::Ppo(c) => Box::new(PolicyStrategy::new(Algorithm::Ppo, c, space, seed)?),
        StrategyConfig::Reinforce(c) => Box::new(PolicyStrategy::new(Algorithm::Reinforce, c, space, seed)?),
        StrategyConfig::Random => Box::new(RandomSearch::new(space, seed)?),
        StrategyConfig::Evolution(c) => Box::new(Evolution::new(c, space, seed)?),
    })
}

/// Restores the strategy saved in `dir` by [`Strategy::save`], whichever kind it is.
pub fn load_strategy(dir: &Path) -> Result<Box<dyn Strategy>, ControllerError> {
    let (saved, tensors) = state::load(dir)?;
    let path = state::state_path(dir);
    Ok(match saved {
        state::SavedState::Policy(s) => Box::new(PolicyStrategy::restore(*s, tensors, &path)?),
        state::SavedState::Random(s) => Box::new(RandomSearch::restore(s, &path)?),
        state::SavedState::Evolution(s) => Box::new(Evolution::restore(s, &path)?),
    })
}

/// Whether `dir` holds a saved strategy (its `strategy.json`).
pub fn has_saved_strategy(dir: &Path) -> bool {
    state::state_path(dir).is_file()
}

#[cfg(test)]
mod tests;
