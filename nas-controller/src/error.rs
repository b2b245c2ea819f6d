//! The one error type of the crate.

use std::path::PathBuf;

use thiserror::Error;

/// Everything a strategy can refuse or fail at. Messages name the id, the field or the path.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// A report for an id the strategy has not handed out.
    #[error("unknown proposal id {id} (this strategy has handed out ids 0..{next_id})")]
    UnknownProposal {
        /// The reported id.
        id: u64,
        /// The next id the strategy would hand out.
        next_id: u64,
    },

    /// A second report for the same proposal.
    #[error("proposal {id} was already reported")]
    DuplicateReport {
        /// The reported id.
        id: u64,
    },

    /// A reward that is NaN or infinite.
    #[error("proposal {id}: reward {reward} is not a finite number")]
    InvalidReward {
        /// The reported id.
        id: u64,
        /// The offending reward.
        reward: f64,
    },

    /// A configuration value out of its range.
    #[error("invalid config: `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// The field, as spelled in the config struct.
        field: &'static str,
        /// The offending value, printed.
        value: String,
        /// What the value must be.
        reason: String,
    },

    /// A strategy name that `StrategyConfig::from_str` does not know.
    #[error("unknown strategy `{name}`; known: ppo, reinforce, random, evolution")]
    UnknownStrategy {
        /// The name given.
        name: String,
    },

    /// A state file that cannot be read back: truncated, garbled, of another version, or not
    /// matching the files it names.
    #[error("corrupt strategy state {}: {reason}", path.display())]
    CorruptState {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// `load_strategy` on a directory without a saved strategy.
    #[error("no saved strategy in {} (expected {})", dir.display(), path.display())]
    MissingState {
        /// The directory searched.
        dir: PathBuf,
        /// The state file that was looked for.
        path: PathBuf,
    },

    /// A failed file-system operation.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A state file that could not be written, or of a version this build does not read.
    #[error(transparent)]
    File(#[from] nas_space::files::FileError),

    /// A tensor operation of the controller failed.
    #[error("controller tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// A spec or action sequence rejected by the search space.
    #[error(transparent)]
    Space(#[from] nas_space::SpecError),
}

impl ControllerError {
    /// An [`ControllerError::InvalidConfig`] for `field`.
    pub(crate) fn config(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ControllerError {
        ControllerError::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
    }

    /// A [`ControllerError::CorruptState`] for `path`.
    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl ToString) -> ControllerError {
        ControllerError::CorruptState { path: path.into(), reason: reason.to_string() }
    }

    /// An [`ControllerError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> ControllerError {
        ControllerError::Io { path: path.into(), source }
    }
}
