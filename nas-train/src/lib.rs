//! Training and evaluation of NASNet networks built from a `nas_space::CellSpec`.
//!
//! This crate owns optimisers and weight decay ([`optim`]), learning-rate schedules
//! ([`schedule`]), checkpoints ([`checkpoint`]), the paper's recipes ([`recipe`]), resumable
//! training runs ([`run`]) and the outer search loop ([`search`]) with the executors that train
//! its children on this machine ([`executor`]) or on a Slurm cluster ([`slurm`]).
//! It does not own the network (`nas-ops`) nor the data pipeline (`nas-data`).

pub mod checkpoint;
pub mod data;
pub mod device;
mod error;
pub mod eval;
pub mod executor;
pub mod init;
pub mod optim;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod search;
pub mod slurm;
pub mod trainer;

pub use error::TrainError;
