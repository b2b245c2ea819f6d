//! Where the children of a search are trained: the [`Executor`] trait the search loop talks
//! to, and [`LocalExecutor`], which trains them on this machine (threads of this process, or
//! one `nas worker` process per child). The Slurm executor is in [`crate::slurm`].
//!
//! The search loop owns the journal; an executor only trains what it is given and hands back
//! each trial's result once. Whatever an executor keeps on disk (result files, job ids) is a
//! cache under the journal: losing it costs training time, never a journaled result.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use nas_space::files::{read_json, write_json};

use crate::search::{run_trial, Outcome, SearchConfig, Trial, TrialResult};
use crate::TrainError;

/// What the search loop needs of whoever trains its children.
///
/// The loop calls [`start`](Executor::start) once, then [`submit`](Executor::submit) with
/// each batch of trials it schedules together and [`wait`](Executor::wait) whenever it has
/// nothing to do but wait. It never has more trials in flight than the configuration's
/// `workers`.
pub trait Executor {
    /// A short name for logs: `threads`, `processes`, `slurm`.
    fn name(&self) -> &'static str;
    /// Prepares to train the children of the search in `dir`. `stop` is the search's stop
    /// flag: once it is raised, trials in flight are stopped and come back `Interrupted`.
    fn start(&mut self, dir: &Path, config: &SearchConfig, stop: &Arc<AtomicBool>) -> Result<(), TrainError>;
    /// Starts training `trials`, which were scheduled together (Slurm submits them as one
    /// job array). A trial whose result this executor already holds (a worker finished it
    /// before the search was killed) or that is still being trained from an earlier run of
    /// the search is not started again.
    fn submit(&mut self, trials: Vec<Trial>, log: &mut dyn FnMut(&str)) -> Result<(), TrainError>;
    /// Waits until at least one trial in flight is finished and returns the finished ones
    /// (empty when none is in flight). Each submitted trial comes back exactly once.
    fn wait(&mut self, log: &mut dyn FnMut(&str)) -> Result<Vec<TrialResult>, TrainError>;
    /// The search ends with trials still in flight (it failed): stop them and return.
    fn abandon(&mut self);
}

/// The file names of a child trained by a worker process (`nas worker`).
pub mod worker_files {
    /// The trial the worker reads.
    pub const TRIAL: &str = "trial.json";
    /// The result the worker writes (atomically).
    pub const RESULT: &str = "result.json";
    /// The worker's standard output and error.
    pub const LOG: &str = "worker.log";
}

/// A finished result left in a child's directory by a worker (trained or failed, not
/// interrupted), if its id is `id`.
pub fn finished_result(dir: &Path, id: u64) -> Option<TrialResult> {
    let result: TrialResult = read_json(&dir.join(worker_files::RESULT)).ok()?;
    (result.id == id && !matches!(result.outcome, Outcome::Interrupted)).then_some(result)
}

/// Writes `result` as a worker's result file (`path`, normally `result.json` in the
/// child's directory), atomically.
pub fn write_result(path: &Path, result: &TrialResult) -> Result<(), TrainError> {
    Ok(write_json(path, result)?)
}

/// How [`LocalExecutor`] runs a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalMode {
    /// In this process, one thread per child. The children share candle's and rayon's
    /// thread pools, which serialise them: right for one worker, slow for several.
    Threads,
    /// One `PROGRAM worker --trial FILE --out FILE` process per child (the `nas` binary),
    /// each with cores / workers threads, so children run truly in parallel and a crash
    /// stays in its process. The trial, the result and the worker's log stay in the child's
    /// directory; a result file left by a worker whose result was not yet journaled is used
    /// on resume instead of training again.
    Processes { program: PathBuf },
}

/// Trains children on this machine, `workers` at a time, each on a thread of its own that
/// either trains it or watches its worker process. A panic becomes a failed outcome.
pub struct LocalExecutor {
    mode: LocalMode,
    workers: usize,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<TrialResult>,
    rx: mpsc::Receiver<TrialResult>,
    threads: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl std::fmt::Debug for LocalExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalExecutor")
            .field("mode", &self.mode)
            .field("workers", &self.workers)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl LocalExecutor {
    /// An executor of `mode`; the number of workers comes from the search configuration.
    pub fn new(mode: LocalMode) -> LocalExecutor {
        let (tx, rx) = mpsc::channel();
        LocalExecutor {
            mode,
            workers: 1,
            stop: Arc::new(AtomicBool::new(false)),
            tx,
            rx,
            threads: Vec::new(),
            in_flight: 0,
        }
    }

    /// Children trained as threads of this process.
    pub fn threads() -> LocalExecutor {
        LocalExecutor::new(LocalMode::Threads)
    }

    /// Children trained by `program worker` processes.
    pub fn processes(program: PathBuf) -> LocalExecutor {
        LocalExecutor::new(LocalMode::Processes { program })
    }

    fn join_finished(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = self.threads.drain(..).partition(|t| t.is_finished());
        self.threads = running;
        for t in done {
            let _ = t.join();
        }
    }
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        match self.mode {
            LocalMode::Threads => "threads",
            LocalMode::Processes { .. } => "processes",
        }
    }

    fn start(&mut self, _dir: &Path, config: &SearchConfig, stop: &Arc<AtomicBool>) -> Result<(), TrainError> {
        self.workers = config.workers.max(1);
        self.stop = stop.clone();
        Ok(())
    }

    fn submit(&mut self, trials: Vec<Trial>, _log: &mut dyn FnMut(&str)) -> Result<(), TrainError> {
        self.join_finished();
        for trial in trials {
            let (mode, workers, stop, tx) = (self.mode.clone(), self.workers, self.stop.clone(), self.tx.clone());
            let name = format!("nas-child-{}", trial.id);
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _ = tx.send(run_local(&mode, &trial, workers, &stop));
                })
                .map_err(|source| TrainError::Io { path: PathBuf::from("<thread>"), source })?;
            self.threads.push(thread);
            self.in_flight += 1;
        }
        Ok(())
    }

    fn wait(&mut self, _log: &mut dyn FnMut(&str)) -> Result<Vec<TrialResult>, TrainError> {
        if self.in_flight == 0 {
            return Ok(Vec::new());
        }
        let first = self.rx.recv().expect("the executor holds a sender");
        let mut out = vec![first];
        out.extend(self.rx.try_iter());
        self.in_flight -= out.len();
        self.join_finished();
        Ok(out)
    }

    fn abandon(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.rx.try_iter().for_each(drop);
        self.in_flight = 0;
    }
}

/// Trains `trial` as one of `workers` children running at once (a worker process gets
/// cores / workers threads); a panic becomes a failed outcome, never a lost result.
fn run_local(mode: &LocalMode, trial: &Trial, workers: usize, stop: &Arc<AtomicBool>) -> TrialResult {
    let work = || match mode {
        LocalMode::Threads => run_trial(trial, Some(stop.clone())),
        LocalMode::Processes { program } => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            run_trial_process(program, trial, (cores / workers.max(1)).max(1), stop)
        }
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        TrialResult { id: trial.id, outcome: Outcome::Failed { reason: format!("panicked: {reason}") }, seconds: 0.0 }
    })
}

/// The last `n` lines of a log file, joined with ` | ` (empty when unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    fs::read_to_string(path)
        .map(|log| {
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(n)..].join(" | ")
        })
        .unwrap_or_default()
}

/// Trains `trial` in a worker process of `program` with `threads` threads.
fn run_trial_process(program: &Path, trial: &Trial, threads: usize, stop: &AtomicBool) -> TrialResult {
    let started = Instant::now();
    let failed = |reason: String| TrialResult {
        id: trial.id,
        outcome: Outcome::Failed { reason },
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(result @ TrialResult { outcome: Outcome::Trained { .. }, .. }) = finished_result(&trial.dir, trial.id) {
        return result;
    }
    if let Err(err) = fs::create_dir_all(&trial.dir) {
        return failed(format!("{}: {err}", trial.dir.display()));
    }
    let trial_path = trial.dir.join(worker_files::TRIAL);
    if let Err(err) = write_json(&trial_path, trial) {
        return failed(err.to_string());
    }
    let result_path = trial.dir.join(worker_files::RESULT);
    let _ = fs::remove_file(&result_path);
    let log_path = trial.dir.join(worker_files::LOG);
    let log = match File::create(&log_path) {
        Ok(f) => f,
        Err(err) => return failed(format!("{}: {err}", log_path.display())),
    };
    let spawned = std::process::Command::new(program)
        .arg("worker")
        .arg("--trial")
        .arg(&trial_path)
        .arg("--out")
        .arg(&result_path)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .env("NAS_WORKER_OF_SEARCH", std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => return failed(format!("cannot start {}: {err}", program.display())),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(err) => return failed(format!("waiting for the worker: {err}")),
        }
        if stop.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return TrialResult {
                id: trial.id,
                outcome: Outcome::Interrupted,
                seconds: started.elapsed().as_secs_f64(),
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    match read_json::<TrialResult>(&result_path) {
        Ok(result) if result.id == trial.id => result,
        Ok(result) => failed(format!("{} names child {}, not {}", result_path.display(), result.id, trial.id)),
        Err(err) => failed(format!(
            "worker exited with {status} without a result ({err}; {}): {}",
            log_path.display(),
            log_tail(&log_path, 5)
        )),
    }
}
