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
    /// A file could not be written, or is of a format or version this build does not read.
    #[error(transparent)]
    File(#[from] nas_space::files::FileError),
    /// A JSON state file is malformed.
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    /// A configuration value is unusable.
    #[error("training config: `{field}` {message}")]
    Config { field: &'static str, message: String },
    /// The loss became NaN or infinite: the training stops before updating the weights.
    #[error("loss is {loss} at step {step}; training stopped before the update (lower the learning rate, or check the data)")]
    NonFinite { step: u64, loss: f64 },
    /// The loss became NaN or infinite inside a run; what was known is saved at `diagnostic`.
    #[error("loss is {loss} at step {step}; training stopped before the update. Diagnostic and the weights before that step: {}", diagnostic.display())]
    Diverged { step: u64, loss: f64, diagnostic: PathBuf },
    /// The run was asked to stop; its checkpoint is in `dir`.
    #[error("stopped at step {step}; resume with the checkpoint in {}", dir.display())]
    Interrupted { step: u64, dir: PathBuf },
    /// The settings would need more memory than the machine has.
    #[error("these settings need about {estimate} of memory ({detail}) but {available} is available; lower the batch size or the network, or force it")]
    Memory { estimate: String, available: String, detail: String },
    /// A cluster scheduler's command failed (Slurm's `sbatch`, say).
    #[error("{command}: {message}")]
    Scheduler { command: String, message: String },
    /// A checkpoint does not fit what is being resumed.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}
