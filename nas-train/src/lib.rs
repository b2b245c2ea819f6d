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

/// Runs `f` on a thread of rayon's global pool and waits for it (inline when called from a
/// pool thread).
///
/// The kernels parallelise with rayon. Called from a thread outside the pool, every parallel
/// op hands its work to the pool's threads and sleeps until they finish: two wake-ups per op,
/// hundreds of ops per step. Called from a pool thread, the caller works on its share and
/// the other threads steal the rest. The training loop runs each step (and each evaluation
/// batch) this way, and waits for its data outside the pool: a pool thread blocked on the
/// batch producer, whose decoding is itself a rayon job, would deadlock a one-thread pool.
/// Side by side on `nas bench` (release, alternating, 3 rounds): mobile training 15.2–15.4 →
/// 17.5–17.8 images/s, inference 78–79 → 83–84; small training 715–735 → 787–803, inference
/// 2,441–2,458 → 2,622–2,696; memory unchanged (the `nas` binary uses one malloc arena).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|s| s.spawn(|_| out = Some(f())));
    out.expect("the spawned closure ran to completion")
}
