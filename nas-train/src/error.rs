//! The one error type of the crate.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can stop a training.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] nas_data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON state file is malformed.
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    /// A configuration value is unusable.
    #[error("training config: `{field}` {message}")]
    Config { field: &'static str, message: String },
    /// The loss became NaN or infinite: the training stops before updating the weights.
    #[error("loss is {loss} at step {step}; training stopped before the update (lower the learning rate, or check the data)")]
    NonFinite { step: u64, loss: f64 },
    /// A checkpoint does not fit what is being resumed.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}
