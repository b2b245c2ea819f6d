//! Training and evaluation of NASNet networks built from a `nas_space::CellSpec`.
//!
//! This crate owns optimisers and weight decay ([`optim`]), learning-rate schedules
//! ([`schedule`]), checkpoints ([`checkpoint`]), the paper's recipes ([`recipe`]), resumable
//! training runs ([`run`]), the outer search loop ([`search`]) with the executors that train
//! its children on this machine ([`executor`]) or on a Slurm cluster ([`slurm`]), the transfer
//! of a cell to the ImageNet skeleton ([`transfer`]) and the training/inference benchmark
//! ([`bench`](mod@bench)).
//! It does not own the network (`nas-ops`) nor the data pipeline (`nas-data`).
//!
//! The defaults the `nas` command line runs with are this crate's: a program importing it
//! gets the same search ([`search::SearchConfig::default`], [`recipe::Recipe::small_search_child`]),
//! the same built-in transfer ([`transfer::TransferOptions::builtin`], [`transfer::prepare`])
//! and the same benchmark ([`bench::run`]).

pub mod bench;
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
pub mod shared;
pub mod slurm;
pub mod trainer;
pub mod transfer;

pub use error::TrainError;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
/// 2,441–2,458 → 2,622–2,696; memory unchanged (the `nas` binary then used one malloc arena).
///
/// While `f` runs, the pool's other threads are kept awake (`KeepWarm`): an idle rayon
/// thread sleeps on a futex after a few dozen yields, and each parallel op then paid a wake-up,
/// which on virtual machines is a system call and an inter-processor interrupt (10 % of a
/// `small` training step's CPU time was in the kernel's task switching).
///
/// `f` runs with the caller's gradient mode ([`nas_ops::no_grad`]), whichever pool thread takes
/// it: a thread that waits inside another caller's evaluation, under `no_grad`, may steal this
/// step, and before this the step then computed detached cell outputs (wrong gradients)
/// when several runs shared the pool.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let grad_enabled = nas_ops::grad_enabled();
    let mut out = None;
    let warm = KeepWarm::new(rayon::current_num_threads().saturating_sub(1));
    rayon::scope(|s| {
        for _ in 0..warm.helpers {
            s.spawn(|_| warm.help());
        }
        warm.wait_for_helpers();
        // Released on unwinding too: a panicking step must not leave the helpers spinning
        // (the scope would wait for them forever).
        let _finish = Finish(&warm);
        out = Some(nas_ops::with_grad_enabled(grad_enabled, f));
    });
    out.expect("the closure ran to completion")
}

/// Keeps the other threads of rayon's pool running jobs, or spinning, until
/// [`finish`](Self::finish), instead of sleeping between the parallel ops of one step.
///
/// Each helper is a rayon job that loops on `rayon::yield_now` (which runs any pending job of
/// the pool, stolen or injected) until the step is done; every 64 rounds without work it
/// yields its core to the OS, which lets candle's own pool (its large elementwise ops and the
/// backward pass's gradient sums) run there. A job stays on its thread's stack
/// until it returns, so a helper must never sit above a frame that the step waits for: the
/// owner therefore starts the step only after the helpers have started (or have been
/// cancelled, after [`START_WAIT`]), when no job of the step exists yet. A helper started
/// inside some unrelated job only delays that job's return until the step ends; a cancelled
/// helper returns at once wherever it runs.
struct KeepWarm {
    helpers: usize,
    /// Helpers that took a place; at or above `helpers` once the owner cancelled the rest.
    claimed: AtomicUsize,
    done: AtomicBool,
}

/// How long the owner waits for the helpers to start before it cancels the rest.
const START_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

impl KeepWarm {
    fn new(helpers: usize) -> KeepWarm {
        KeepWarm { helpers, claimed: 0.into(), done: false.into() }
    }

    fn help(&self) {
        if self.claimed.fetch_add(1, Ordering::AcqRel) >= self.helpers {
            return;
        }
        let mut idle = 0u32;
        while !self.done.load(Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                idle = 0;
            } else {
                idle = idle.wrapping_add(1);
                if idle % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    fn wait_for_helpers(&self) {
        let start = std::time::Instant::now();
        while self.claimed.load(Ordering::Acquire) < self.helpers {
            if start.elapsed() > START_WAIT {
                self.claimed.fetch_add(self.helpers, Ordering::AcqRel);
                return;
            }
            std::hint::spin_loop();
        }
    }

    fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Calls [`KeepWarm::finish`] when dropped.
struct Finish<'a>(&'a KeepWarm);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Nested parallel work inside `on_pool`, with the helpers running.
    fn work(seed: u64) -> u64 {
        (0..20_000u64)
            .into_par_iter()
            .map(|i| (0..50u64).into_par_iter().map(|j| (i ^ j ^ seed) % 7).sum::<u64>())
            .sum()
    }

    fn expected(seed: u64) -> u64 {
        (0..20_000u64).map(|i| (0..50u64).map(|j| (i ^ j ^ seed) % 7).sum::<u64>()).sum()
    }

    #[test]
    fn on_pool_returns_what_the_closure_computes() {
        for seed in 0..20 {
            assert_eq!(on_pool(|| work(seed)), expected(seed));
        }
        // Inline on a pool thread: no helpers, same result.
        assert_eq!(rayon::scope(|_| on_pool(|| work(3))), expected(3));
    }

    /// Several threads outside the pool (the search's thread executor) each run steps on the
    /// shared pool at once; helpers of one step run jobs of the others. None may hang.
    #[test]
    fn concurrent_callers_all_finish() {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    for k in 0..15 {
                        let seed = t * 100 + k;
                        assert_eq!(on_pool(|| work(seed)), expected(seed), "thread {t} step {k}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a caller thread panicked");
        }
    }

    #[test]
    fn a_panicking_step_panics_instead_of_hanging() {
        let caught = std::panic::catch_unwind(|| on_pool(|| -> u64 { panic!("step failed") }));
        assert!(caught.is_err());
        // The pool still works afterwards.
        assert_eq!(on_pool(|| work(9)), expected(9));
    }

    /// Every pool thread waits, under `no_grad`, in work that yields to other jobs; a step
    /// submitted meanwhile can only run inside one of them, and must still see its caller's
    /// mode (enabled), and a caller's `no_grad` must reach its step.
    #[test]
    fn the_step_runs_under_the_callers_grad_mode_whichever_thread_takes_it() {
        use std::time::{Duration, Instant};
        assert!(!nas_ops::no_grad(|| on_pool(nas_ops::grad_enabled)));
        let threads = rayon::current_num_threads();
        let waiting = AtomicUsize::new(0);
        let done = AtomicBool::new(false);
        let seen = std::thread::scope(|s| {
            let stealer = s.spawn(|| {
                rayon::broadcast(|_| {
                    nas_ops::no_grad(|| {
                        waiting.fetch_add(1, Ordering::SeqCst);
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                            rayon::yield_now();
                        }
                    })
                })
            });
            while waiting.load(Ordering::SeqCst) < threads {
                std::thread::yield_now();
            }
            let seen = on_pool(nas_ops::grad_enabled);
            done.store(true, Ordering::SeqCst);
            stealer.join().expect("the waiting threads finished");
            seen
        });
        assert!(seen, "the step ran with the stealing thread's no_grad");
    }

    /// Runs `f` on a thread of its own and returns its result, or fails the test when `f`
    /// has not returned within `limit` (a helper that spins forever must fail, not hang).
    fn within<T: Send + 'static>(limit: std::time::Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(limit) {
            Ok(value) => value,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {limit:?}"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
        }
    }

    /// Places the owner cancelled are not taken: a late helper returns at once, while the step
    /// is still running (`done` unset). A helper that took its place, by contrast, runs until
    /// the owner finishes.
    #[test]
    fn cancelled_helpers_return_at_once() {
        use std::sync::Arc;
        use std::time::Duration;
        let limit = Duration::from_secs(10);
        let warm = Arc::new(KeepWarm::new(2));
        warm.wait_for_helpers(); // nobody helps: the owner cancels both places after START_WAIT
        assert!(warm.claimed.load(Ordering::Acquire) >= warm.helpers, "the owner cancelled the places");
        let late = warm.clone();
        let done_when_returned = within(limit, "a cancelled helper", move || {
            late.help();
            late.help();
            late.done.load(Ordering::Acquire)
        });
        assert!(!done_when_returned, "the late helpers returned only because the step finished");

        let warm = Arc::new(KeepWarm::new(1));
        let helper = {
            let warm = warm.clone();
            std::thread::spawn(move || warm.help())
        };
        let started = warm.clone();
        within(limit, "waiting for the helper to take its place", move || {
            while started.claimed.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!helper.is_finished(), "a helper with a place returned before the step finished");
        warm.finish();
        within(limit, "the helper after finish", move || helper.join().expect("the helper ran"));
    }
}
