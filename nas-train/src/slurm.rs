//! Child training on a Slurm cluster: [`SlurmExecutor`] submits each batch of trials as one
//! job array, one `nas worker` per task, and follows the tasks with Slurm's own tools
//! (`sbatch`, `squeue`, `sacct` or `scontrol`, `scancel`). No daemon or scheduler of ours
//! runs on the cluster.
//!
//! # Files
//!
//! ```text
//! <search>/slurm.json                 the executor's settings, its job name and every task it
//!                                     submitted (job id, array index, child, attempt, state)
//! <shared>/slurm/jobs/<n>/job.sh      the batch script of submission n
//! <shared>/slurm/jobs/<n>/tasks/<i>.json   the trial of array task i
//! <shared>/slurm/jobs/<n>/logs/<i>.log     its standard output and error
//! <shared>/children/<id>/result.json  written atomically by the worker when the child is done
//! ```
//!
//! `<shared>` is the search directory unless `shared_dir` says otherwise; either way it must
//! be visible from every node at the same path, as must the working directory the search
//! was started from (the tasks run there, so relative data paths mean the same thing).
//!
//! # Truth and resume
//!
//! The search journal decides what is trained; `slurm.json` only remembers which Slurm task
//! trains what. A task is finished when its result file is there. One that leaves the queue
//! without a result failed: it is submitted again (up to `retries` times) when Slurm reports
//! a crash, a time limit, a node failure or a preemption, and the child is recorded as failed
//! with Slurm's state, exit code and the end of its log otherwise or after the last attempt.
//! A task cancelled from outside the search (`scancel`) is not retried.
//!
//! When the search is stopped it cancels its jobs. When it is killed outright its jobs go on;
//! the resumed search finds them in `slurm.json` and waits for them instead of submitting
//! them again, and takes the results of those that finished meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nas_space::files::{read_json, write_atomic, write_json, FileError, JsonFile};
use serde::{Deserialize, Serialize};

use crate::executor::{finished_result, log_tail, worker_files, Executor};
use crate::search::{Outcome, SearchConfig, Trial, TrialResult};
use crate::TrainError;

/// The executor's state file in the search directory.
pub const STATE_FILE: &str = "slurm.json";

/// How children are submitted to Slurm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlurmConfig {
    /// The `nas` binary as the compute nodes see it.
    pub program: PathBuf,
    /// `sbatch --partition`.
    #[serde(default)]
    pub partition: Option<String>,
    /// `sbatch --gres` (`gpu:1`).
    #[serde(default)]
    pub gres: Option<String>,
    /// `sbatch --time`, the limit of one child (`0:30:00`).
    #[serde(default)]
    pub time: Option<String>,
    /// `sbatch --cpus-per-task`; the worker uses as many threads.
    #[serde(default)]
    pub cpus_per_task: Option<usize>,
    /// `sbatch --mem` (`8G`).
    #[serde(default)]
    pub mem: Option<String>,
    /// Most tasks in one job array; the cluster's `MaxArraySize` bounds it too.
    #[serde(default)]
    pub max_array: Option<usize>,
    /// Where job files and the children's run directories go (default: the search directory).
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
    /// More `sbatch` arguments, passed as they are (`--account=A`, `--qos=Q`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// How many times a task that Slurm lost (crash, time limit, node failure, preemption)
    /// is submitted again before its child counts as failed.
    pub retries: u32,
    /// Seconds between two looks at the queue.
    pub poll_seconds: f64,
}

impl SlurmConfig {
    /// Defaults: two retries, a look at the queue every 10 seconds.
    pub fn new(program: PathBuf) -> SlurmConfig {
        SlurmConfig {
            program,
            partition: None,
            gres: None,
            time: None,
            cpus_per_task: None,
            mem: None,
            max_array: None,
            shared_dir: None,
            sbatch_args: Vec::new(),
            retries: 2,
            poll_seconds: 10.0,
        }
    }

    /// The settings a search in `dir` was last run with, if it ran on Slurm.
    pub fn saved(dir: &Path) -> Result<Option<SlurmConfig>, TrainError> {
        Ok(State::read(&dir.join(STATE_FILE))?.map(|s| s.config))
    }

    fn validate(&self) -> Result<(), TrainError> {
        let err = |field: &'static str, message: &str| Err(TrainError::Config { field, message: message.into() });
        if !(self.poll_seconds > 0.0 && self.poll_seconds.is_finite()) {
            return err("poll_seconds", "must be a positive number of seconds");
        }
        if self.max_array == Some(0) {
            return err("max_array", "must be at least 1");
        }
        if self.cpus_per_task == Some(0) {
            return err("cpus_per_task", "must be at least 1");
        }
        Ok(())
    }
}

/// The Slurm jobs of the search in `dir` with a task still in flight, as its `slurm.json`
/// records them (empty when it never ran on Slurm).
pub fn live_jobs(dir: &Path) -> Result<Vec<String>, TrainError> {
    let mut jobs = Vec::new();
    for sub in State::read(&dir.join(STATE_FILE))?.map_or_else(Vec::new, |s| s.submissions) {
        let job = if sub.job_id.is_empty() { format!("of {}", sub.dir.join("job.sh").display()) } else { sub.job_id };
        if sub.tasks.iter().any(|t| t.state == TaskState::Live) && !jobs.contains(&job) {
            jobs.push(job);
        }
    }
    Ok(jobs)
}

/// What Slurm did with one array task, as far as the search knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum TaskState {
    /// Submitted; not known to be over.
    Live,
    /// Its result file was taken.
    Finished,
    /// It left the queue without a result.
    Lost { reason: String },
    /// The search cancelled it when it stopped.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Task {
    index: usize,
    trial_id: u64,
    trial_dir: PathBuf,
    attempt: u32,
    #[serde(flatten)]
    state: TaskState,
}

/// One `sbatch` of a job array. It is recorded before `sbatch` runs, with an empty
/// `job_id` until `sbatch` answers, so that a search killed in between finds the job again
/// on resume (by its batch script, through `squeue`) instead of submitting it twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Submission {
    job_id: String,
    dir: PathBuf,
    tasks: Vec<Task>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    config: SlurmConfig,
    job_name: String,
    submissions: Vec<Submission>,
}

impl JsonFile for State {
    const VERSION: u64 = 1;
}

impl State {
    fn read(path: &Path) -> Result<Option<State>, TrainError> {
        match read_json(path) {
            Ok(state) => Ok(Some(state)),
            Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}

/// Where a task is: (submission, task) indices into the state.
type TaskRef = (usize, usize);

/// Trains children as Slurm array tasks (see the module docs).
#[derive(Debug)]
pub struct SlurmExecutor {
    config: SlurmConfig,
    state: Option<State>,
    state_path: PathBuf,
    search_dir: PathBuf,
    shared_dir: PathBuf,
    stop: Arc<AtomicBool>,
    /// Tasks in flight, with how many looks at the queue in a row missed them.
    live: Vec<(TaskRef, u32)>,
    /// The trials in flight by (absolute) directory, to submit again.
    trials: HashMap<PathBuf, Trial>,
    /// Results taken but not yet handed back.
    ready: Vec<TrialResult>,
    /// Tasks per job array.
    chunk: usize,
    last_poll: Option<Instant>,
    last_files: Option<Instant>,
}

impl SlurmExecutor {
    /// An executor with these settings; nothing is checked or submitted before `start`.
    pub fn new(config: SlurmConfig) -> SlurmExecutor {
        SlurmExecutor {
            config,
            state: None,
            state_path: PathBuf::new(),
            search_dir: PathBuf::new(),
            shared_dir: PathBuf::new(),
            stop: Arc::new(AtomicBool::new(false)),
            live: Vec::new(),
            trials: HashMap::new(),
            ready: Vec::new(),
            chunk: 1000,
            last_poll: None,
            last_files: None,
        }
    }

    fn state(&mut self) -> &mut State {
        self.state.as_mut().expect("start() was called")
    }

    fn save(&self) -> Result<(), TrainError> {
        let state = self.state.as_ref().expect("start() was called");
        Ok(write_json(&self.state_path, state)?)
    }

    fn task(&self, (s, t): TaskRef) -> &Task {
        &self.state.as_ref().expect("start() was called").submissions[s].tasks[t]
    }

    /// The trial as the nodes see it: absolute paths, under the shared directory.
    fn placed(&self, mut trial: Trial) -> Trial {
        let dir = absolute(&trial.dir);
        trial.dir = match dir.strip_prefix(&self.search_dir) {
            Ok(rel) => self.shared_dir.join(rel),
            Err(_) => dir,
        };
        trial
    }

    fn log_path(&self, (s, t): TaskRef) -> PathBuf {
        let state = self.state.as_ref().expect("start() was called");
        let sub = &state.submissions[s];
        sub.dir.join("logs").join(format!("{}.log", sub.tasks[t].index))
    }

    /// Submits `trials` (with their attempt numbers) as job arrays of at most `chunk` tasks.
    fn submit_new(&mut self, trials: Vec<(Trial, u32)>, log: &mut dyn FnMut(&str)) -> Result<(), TrainError> {
        for chunk in trials.chunks(self.chunk) {
            let jobs = self.shared_dir.join("slurm").join("jobs");
            let mut n = self.state().submissions.len();
            while jobs.join(format!("{n:05}")).exists() {
                n += 1;
            }
            let job_dir = jobs.join(format!("{n:05}"));
            let io = |path: &Path| {
                let path = path.to_path_buf();
                move |source| TrainError::Io { path, source }
            };
            for sub in ["tasks", "logs"] {
                fs::create_dir_all(job_dir.join(sub)).map_err(io(&job_dir.join(sub)))?;
            }
            for (index, (trial, _)) in chunk.iter().enumerate() {
                fs::create_dir_all(&trial.dir).map_err(io(&trial.dir))?;
                // A stale result (an interrupted worker's) must not be taken for this attempt's.
                let _ = fs::remove_file(trial.dir.join(worker_files::RESULT));
                let path = job_dir.join("tasks").join(format!("{index}.json"));
                write_json(&path, trial)?;
            }
            let script = job_dir.join("job.sh");
            write_atomic(&script, batch_script(&self.config.program, &job_dir))?;
            let tasks: Vec<Task> = chunk
                .iter()
                .enumerate()
                .map(|(index, (trial, attempt))| Task {
                    index,
                    trial_id: trial.id,
                    trial_dir: trial.dir.clone(),
                    attempt: *attempt,
                    state: TaskState::Live,
                })
                .collect();
            let ids: Vec<String> = chunk.iter().map(|(t, _)| t.id.to_string()).collect();
            // Recorded before sbatch runs (see `Submission`).
            let state = self.state();
            state.submissions.push(Submission { job_id: String::new(), dir: job_dir.clone(), tasks });
            let s = state.submissions.len() - 1;
            self.save()?;
            let job_name = self.state().job_name.clone();
            let args = sbatch_args(&self.config, &job_name, &job_dir, chunk.len());
            let answer = run_command("sbatch", &args)
                .map_err(|message| TrainError::Scheduler { command: format!("sbatch {}", args.join(" ")), message })
                .and_then(|out| {
                    parse_sbatch(&out).ok_or_else(|| TrainError::Scheduler {
                        command: "sbatch --parsable".into(),
                        message: format!("expected a job id, got {out:?}"),
                    })
                });
            let job_id = match answer {
                Ok(id) => id,
                Err(err) => {
                    self.state().submissions.pop();
                    self.save()?;
                    return Err(err);
                }
            };
            self.state().submissions[s].job_id = job_id.clone();
            self.live.extend((0..chunk.len()).map(|t| ((s, t), 0)));
            self.save()?;
            log(&format!(
                "submitted children {} as Slurm job array {job_id} ({})",
                ids.join(", "),
                job_dir.join("job.sh").display()
            ));
        }
        Ok(())
    }

    /// Takes the result files of the tasks in flight.
    fn collect_results(&mut self) {
        let mut still = Vec::new();
        for (r, missed) in std::mem::take(&mut self.live) {
            let task = self.task(r).clone();
            match finished_result(&task.trial_dir, task.trial_id) {
                Some(result) => {
                    self.set_state(r, TaskState::Finished);
                    self.trials.remove(&task.trial_dir);
                    self.ready.push(result);
                }
                None => still.push((r, missed)),
            }
        }
        self.live = still;
    }

    fn set_state(&mut self, (s, t): TaskRef, state: TaskState) {
        self.state().submissions[s].tasks[t].state = state;
    }

    /// One look at the queue: tasks that left it without a result are retried or failed.
    fn poll(&mut self, log: &mut dyn FnMut(&str)) -> Result<(), TrainError> {
        self.last_poll = Some(Instant::now());
        let job_name = self.state().job_name.clone();
        let args = ["--noheader", "--array", &format!("--name={job_name}"), "--format=%i|%T|%r"].map(String::from);
        let queued = match run_command("squeue", &args) {
            Ok(out) => parse_squeue(&out),
            Err(message) => {
                log(&format!("squeue failed, looking again later: {message}"));
                return Ok(());
            }
        };
        let mut gone = Vec::new();
        for (r, missed) in &mut self.live {
            let (s, t) = *r;
            let state = self.state.as_ref().expect("started");
            let key = (state.submissions[s].job_id.clone(), state.submissions[s].tasks[t].index);
            match queued.get(&key) {
                Some(q) if !is_terminal(&q.state) => *missed = 0,
                Some(q) => gone.push((*r, Some(q.clone()))),
                None => {
                    // Missed twice in a row: a task just submitted may not be listed yet.
                    *missed += 1;
                    if *missed >= 2 {
                        gone.push((*r, None));
                    }
                }
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        // It may have finished between the look at the files and the look at the queue.
        self.collect_results();
        let mut again = Vec::new();
        for (r, seen) in gone {
            if !self.live.iter().any(|(l, _)| *l == r) {
                continue;
            }
            let task = self.task(r).clone();
            let job = self.state.as_ref().expect("started").submissions[r.0].job_id.clone();
            let fate = final_state(&job, task.index).or(seen).unwrap_or(TaskFate {
                state: "VANISHED".into(),
                reason: "not in the queue and not known to sacct or scontrol".into(),
                exit_code: None,
            });
            let log_path = self.log_path(r);
            let reason = format!(
                "Slurm job {job}_{} {}{}{} on attempt {} of {}; log {}: {}",
                task.index,
                fate.state,
                fate.exit_code.as_deref().map_or(String::new(), |c| format!(", exit code {c}")),
                if fate.reason.is_empty() || fate.reason == "None" {
                    String::new()
                } else {
                    format!(", reason {}", fate.reason)
                },
                task.attempt,
                self.config.retries + 1,
                log_path.display(),
                log_tail(&log_path, 3),
            );
            self.live.retain(|(l, _)| *l != r);
            self.set_state(r, TaskState::Lost { reason: reason.clone() });
            let cancelled = fate.state.starts_with("CANCELLED");
            let retry = !cancelled && task.attempt <= self.config.retries;
            let trial = self.trials.get(&task.trial_dir).cloned();
            match (retry, trial) {
                (true, Some(trial)) => {
                    log(&format!("child {}: {reason}; submitting it again", task.trial_id));
                    again.push((trial, task.attempt + 1));
                }
                _ => {
                    let reason = if cancelled { format!("cancelled outside the search: {reason}") } else { reason };
                    self.trials.remove(&task.trial_dir);
                    self.ready.push(TrialResult {
                        id: task.trial_id,
                        outcome: Outcome::Failed { reason },
                        seconds: 0.0,
                    });
                }
            }
        }
        self.save()?;
        if !again.is_empty() {
            self.submit_new(again, log)?;
        }
        Ok(())
    }

    /// Cancels every job with a task in flight; those tasks come back interrupted.
    fn cancel_all(&mut self, log: &mut dyn FnMut(&str)) -> Vec<TrialResult> {
        let mut jobs: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for (r, _) in std::mem::take(&mut self.live) {
            let job = self.state.as_ref().expect("started").submissions[r.0].job_id.clone();
            if !jobs.contains(&job) {
                jobs.push(job);
            }
            self.set_state(r, TaskState::Cancelled);
            let task = self.task(r).clone();
            self.trials.remove(&task.trial_dir);
            out.push(TrialResult { id: task.trial_id, outcome: Outcome::Interrupted, seconds: 0.0 });
        }
        if !jobs.is_empty() {
            match run_command("scancel", &jobs) {
                Ok(_) => log(&format!("cancelled Slurm jobs {}", jobs.join(", "))),
                Err(message) => log(&format!("scancel {} failed: {message}", jobs.join(" "))),
            }
        }
        if let Err(err) = self.save() {
            log(&err.to_string());
        }
        out
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn start(&mut self, dir: &Path, _config: &SearchConfig, stop: &Arc<AtomicBool>) -> Result<(), TrainError> {
        self.config.validate()?;
        run_command("sbatch", &["--version".to_string()]).map_err(|message| TrainError::Scheduler {
            command: "sbatch --version".into(),
            message: format!("{message} (--executor slurm needs Slurm's commands on the PATH)"),
        })?;
        self.stop = stop.clone();
        self.search_dir = absolute(dir);
        self.shared_dir = self.config.shared_dir.as_deref().map_or_else(|| self.search_dir.clone(), absolute);
        self.config.program = absolute(&self.config.program);
        self.state_path = dir.join(STATE_FILE);
        let mut state = State::read(&self.state_path)?.unwrap_or_else(|| State {
            config: self.config.clone(),
            job_name: job_name(&self.search_dir),
            submissions: Vec::new(),
        });
        state.config = self.config.clone();
        recover_unanswered(&mut state)?;
        self.state = Some(state);
        let cluster_max = run_command("scontrol", &["show".into(), "config".into()])
            .ok()
            .and_then(|out| parse_max_array_size(&out))
            .unwrap_or(1001);
        self.chunk = self.config.max_array.unwrap_or(usize::MAX).min(cluster_max).max(1);
        self.save()
    }

    fn submit(&mut self, trials: Vec<Trial>, log: &mut dyn FnMut(&str)) -> Result<(), TrainError> {
        let mut fresh = Vec::new();
        for trial in trials {
            let trial = self.placed(trial);
            if let Some(result) = finished_result(&trial.dir, trial.id) {
                log(&format!("child {}: taking the result its worker left in {}", trial.id, trial.dir.display()));
                self.ready.push(result);
                continue;
            }
            let state = self.state.as_ref().expect("start() was called");
            let mut live = None;
            let mut lost = 0;
            for (s, sub) in state.submissions.iter().enumerate() {
                for (t, task) in sub.tasks.iter().enumerate() {
                    if task.trial_dir == trial.dir {
                        match task.state {
                            TaskState::Live => live = Some(((s, t), sub.job_id.clone(), task.index)),
                            TaskState::Lost { .. } => lost += 1,
                            _ => {}
                        }
                    }
                }
            }
            if let Some((r, job, index)) = live {
                if !self.live.iter().any(|(l, _)| *l == r) {
                    log(&format!("child {}: waiting for its Slurm task {job}_{index} again", trial.id));
                    self.live.push((r, 0));
                }
                self.trials.insert(trial.dir.clone(), trial);
                continue;
            }
            self.trials.insert(trial.dir.clone(), trial.clone());
            fresh.push((trial, lost + 1));
        }
        self.submit_new(fresh, log)
    }

    fn wait(&mut self, log: &mut dyn FnMut(&str)) -> Result<Vec<TrialResult>, TrainError> {
        let poll = Duration::from_secs_f64(self.config.poll_seconds);
        loop {
            if !self.ready.is_empty() {
                self.save()?;
                return Ok(std::mem::take(&mut self.ready));
            }
            if self.live.is_empty() {
                return Ok(Vec::new());
            }
            if self.stop.load(Ordering::Relaxed) {
                return Ok(self.cancel_all(log));
            }
            // Result files are looked at every `poll` up to every 2 s: a shared filesystem
            // with hundreds of tasks in flight should not be stat'ed five times a second.
            if self.last_files.is_none_or(|t| t.elapsed() >= poll.min(Duration::from_secs(2))) {
                self.last_files = Some(Instant::now());
                self.collect_results();
                if !self.ready.is_empty() {
                    continue;
                }
            }
            if self.last_poll.is_none_or(|t| t.elapsed() >= poll) {
                self.poll(log)?;
                continue;
            }
            std::thread::sleep(poll.min(Duration::from_millis(200)));
        }
    }

    fn abandon(&mut self) {
        let _ = self.cancel_all(&mut |line| eprintln!("{line}"));
    }
}

/// Submissions whose `sbatch` never answered (the search was killed in between): the job
/// found in the queue by its batch script takes its id; one not there never reached Slurm,
/// or finished (its results are in the children's directories), and is forgotten.
fn recover_unanswered(state: &mut State) -> Result<(), TrainError> {
    if state.submissions.iter().all(|s| !s.job_id.is_empty()) {
        return Ok(());
    }
    let args = ["--noheader", &format!("--name={}", state.job_name), "--format=%F|%o"].map(String::from);
    let out = run_command("squeue", &args).map_err(|message| TrainError::Scheduler {
        command: format!("squeue {}", args.join(" ")),
        message: format!("cannot tell whether a job array of this search reached Slurm: {message}"),
    })?;
    let queued: HashMap<&str, &str> =
        out.lines().filter_map(|l| l.trim().split_once('|')).map(|(id, script)| (script, id)).collect();
    for sub in &mut state.submissions {
        if sub.job_id.is_empty() {
            if let Some(id) = queued.get(sub.dir.join("job.sh").to_string_lossy().as_ref()) {
                sub.job_id = (*id).to_string();
            }
        }
    }
    state.submissions.retain(|s| !s.job_id.is_empty());
    Ok(())
}

/// `dir` made absolute against the working directory (not resolving links: the nodes see
/// the same names).
fn absolute(dir: &Path) -> PathBuf {
    if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| dir.to_path_buf(), |cwd| cwd.join(dir))
    }
}

/// A job name unique to the search directory: `squeue --name` finds this search's tasks.
fn job_name(dir: &Path) -> String {
    format!("nas-{:08x}", nas_space::fnv1a(dir.to_string_lossy().as_bytes()) >> 32)
}

/// `'text'` for bash, whatever `text` holds.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The batch script of one submission: array task i trains the trial in `tasks/i.json`.
fn batch_script(program: &Path, job_dir: &Path) -> String {
    format!(
        "#!/bin/bash\n\
         # Written by `nas search --executor slurm`: array task i trains the child in tasks/i.json\n\
         # and writes result.json in that child's directory.\n\
         threads=\"${{SLURM_CPUS_PER_TASK:-1}}\"\n\
         export RAYON_NUM_THREADS=\"$threads\" CANDLE_NUM_THREADS=\"$threads\"\n\
         exec {} worker --trial {}\"/tasks/${{SLURM_ARRAY_TASK_ID}}.json\"\n",
        shell_quote(&program.to_string_lossy()),
        shell_quote(&job_dir.to_string_lossy()),
    )
}

/// The arguments of `sbatch` for an array of `tasks` tasks.
fn sbatch_args(config: &SlurmConfig, job_name: &str, job_dir: &Path, tasks: usize) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--array=0-{}", tasks - 1),
        format!("--job-name={job_name}"),
        format!("--output={}", job_dir.join("logs").join("%a.log").display()),
    ];
    let mut opt = |name: &str, value: &Option<String>| {
        if let Some(v) = value {
            args.push(format!("--{name}={v}"));
        }
    };
    opt("partition", &config.partition);
    opt("gres", &config.gres);
    opt("time", &config.time);
    opt("cpus-per-task", &config.cpus_per_task.map(|c| c.to_string()));
    opt("mem", &config.mem);
    args.extend(config.sbatch_args.iter().cloned());
    args.push(job_dir.join("job.sh").display().to_string());
    args
}

/// Runs a Slurm command: its standard output, or a message with its exit status and
/// standard error.
fn run_command(program: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|err| format!("cannot run {program}: {err}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status))
    }
}

/// The job id of `sbatch --parsable` (`123` or `123;cluster`).
fn parse_sbatch(out: &str) -> Option<String> {
    let id = out.trim().split(';').next()?.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_string())
}

/// A task as the queue or the accounting shows it.
#[derive(Debug, Clone, PartialEq)]
struct TaskFate {
    state: String,
    reason: String,
    exit_code: Option<String>,
}

/// `squeue --array --format=%i|%T|%r`: (job id, array index) → state. An element still
/// pending in a range (`123_[4-6,9%2]`) is expanded.
fn parse_squeue(out: &str) -> HashMap<(String, usize), TaskFate> {
    let mut map = HashMap::new();
    for line in out.lines() {
        let mut fields = line.trim().split('|');
        let (Some(id), Some(state)) = (fields.next(), fields.next()) else { continue };
        let reason = fields.next().unwrap_or("").to_string();
        let Some((job, tasks)) = id.split_once('_') else { continue };
        let fate = TaskFate { state: state.to_string(), reason, exit_code: None };
        for index in parse_indices(tasks) {
            map.insert((job.to_string(), index), fate.clone());
        }
    }
    map
}

/// `4`, or `[4-6,9%2]`: the array indices listed.
fn parse_indices(text: &str) -> Vec<usize> {
    let text = text.trim_start_matches('[').trim_end_matches(']');
    let text = text.split('%').next().unwrap_or("");
    let mut out = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

/// Whether a Slurm job state means the task is over.
fn is_terminal(state: &str) -> bool {
    let state = state.split_whitespace().next().unwrap_or("");
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "OUT_OF_MEMORY"
            | "SPECIAL_EXIT"
            | "REVOKED"
    )
}

/// How a finished task ended: `sacct` where accounting is on, `scontrol show job` otherwise
/// (asked for the whole array: a task cancelled while pending has no record of its own).
fn final_state(job: &str, index: usize) -> Option<TaskFate> {
    let id = format!("{job}_{index}");
    let sacct =
        ["--noheader", "--parsable2", "--allocations", &format!("--jobs={id}"), "--format=JobID,State,ExitCode,Reason"]
            .map(String::from);
    if let Some(fate) = run_command("sacct", &sacct).ok().and_then(|out| parse_sacct(&out, &id)) {
        return Some(fate);
    }
    let out = run_command("scontrol", &["--oneliner".into(), "show".into(), "job".into(), job.into()]).ok()?;
    parse_scontrol(&out, job, index)
}

/// The line of `id` in `sacct --parsable2 --format=JobID,State,ExitCode,Reason`.
fn parse_sacct(out: &str, id: &str) -> Option<TaskFate> {
    out.lines().find_map(|line| {
        let f: Vec<&str> = line.trim().split('|').collect();
        (f.len() >= 3 && f[0] == id).then(|| TaskFate {
            state: f[1].to_string(),
            exit_code: Some(f[2].to_string()),
            reason: f.get(3).unwrap_or(&"").to_string(),
        })
    })
}

/// The record of array task `job`_`index` in `scontrol show job JOB`: one record per line
/// with `--oneliner`, blank-line separated without. Tasks still pending share one record
/// (`ArrayTaskId=2-3`); the array's own `JobId` goes to one of its tasks, so records are
/// matched on `ArrayJobId` and `ArrayTaskId`.
fn parse_scontrol(out: &str, job: &str, index: usize) -> Option<TaskFate> {
    let one_per_line = out.lines().filter(|l| !l.trim().is_empty()).all(|l| l.starts_with("JobId="));
    let records: Vec<BTreeMap<&str, &str>> = if one_per_line {
        out.lines().filter(|l| !l.trim().is_empty()).map(fields_of).collect()
    } else {
        out.split("\n\n").map(fields_of).collect()
    };
    let record = records.iter().find(|r| match (r.get("ArrayJobId"), r.get("ArrayTaskId")) {
        (Some(j), Some(tasks)) => *j == job && parse_indices(tasks).contains(&index),
        _ => r.get("JobId") == Some(&job),
    })?;
    Some(TaskFate {
        state: record.get("JobState")?.to_string(),
        reason: record.get("Reason").unwrap_or(&"").to_string(),
        exit_code: record.get("ExitCode").map(|c| c.to_string()),
    })
}

/// `Key=Value` fields of a `scontrol` record (values without spaces).
fn fields_of(text: &str) -> BTreeMap<&str, &str> {
    text.split_whitespace().filter_map(|kv| kv.split_once('=')).collect()
}

/// `MaxArraySize = 1001` in `scontrol show config`.
fn parse_max_array_size(out: &str) -> Option<usize> {
    out.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "MaxArraySize").then(|| value.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The standard output recorded in a fixture captured from Slurm 22.05 (see the
    /// fixtures' README.txt).
    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slurm").join(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let start = text.find("--- stdout\n").expect("a stdout section") + "--- stdout\n".len();
        let end = text.rfind("--- stderr").expect("a stderr section");
        text[start..end].to_string()
    }

    fn fate(state: &str, reason: &str, exit_code: &str) -> Option<TaskFate> {
        Some(TaskFate { state: state.into(), reason: reason.into(), exit_code: Some(exit_code.into()) })
    }

    #[test]
    fn real_squeue_output() {
        let q = parse_squeue(&fixture("squeue-array-pending-resources.txt"));
        assert_eq!(q.len(), 4);
        assert_eq!(
            q[&("9".to_string(), 2)],
            TaskFate { state: "PENDING".into(), reason: "Resources".into(), exit_code: None }
        );
        assert_eq!(q[&("9".to_string(), 0)].state, "RUNNING");
        // Without --array, pending tasks fold into one line; they are expanded all the same.
        let q = parse_squeue(&fixture("squeue-array-pending-resources-without-array-flag.txt"));
        assert_eq!(q.len(), 4, "{q:?}");
        assert!(parse_squeue(&fixture("squeue-array-finished.txt")).is_empty());
        let q = parse_squeue(&fixture("squeue-array-after-scancel.txt"));
        assert!(!is_terminal(&q[&("2".to_string(), 2)].state), "COMPLETING is not over yet");
    }

    #[test]
    fn real_scontrol_records_of_failed_cancelled_timed_out_and_pending_tasks() {
        for name in ["scontrol-oneliner-show-job-array.txt", "scontrol-show-job-array.txt"] {
            let out = fixture(name);
            assert_eq!(parse_scontrol(&out, "2", 1), fate("FAILED", "NonZeroExitCode", "3:0"), "{name}");
            assert_eq!(parse_scontrol(&out, "2", 2), fate("CANCELLED", "None", "0:15"), "{name}");
            assert_eq!(parse_scontrol(&out, "2", 0), fate("COMPLETED", "None", "0:0"), "{name}");
            assert_eq!(parse_scontrol(&out, "2", 3), None, "{name}");
        }
        let out = fixture("scontrol-show-job-array-timeout.txt");
        assert_eq!(parse_scontrol(&out, "9", 0), fate("TIMEOUT", "TimeLimit", "0:15"));
        let out = fixture("scontrol-show-job-array-pending-running.txt");
        assert_eq!(parse_scontrol(&out, "13", 3).unwrap().state, "PENDING");
        assert_eq!(parse_scontrol(&out, "13", 1).unwrap().state, "RUNNING");
        let out = fixture("scontrol-show-job-plain.txt");
        assert_eq!(parse_scontrol(&out, "5", 0).unwrap().state, "COMPLETED");
        assert_eq!(parse_max_array_size(&fixture("config-maxarraysize.txt")), Some(1001));
        assert_eq!(parse_sbatch(&fixture("sbatch-array.txt")).as_deref(), Some("2"));
    }

    #[test]
    fn sacct_lines() {
        let out = "12_3|FAILED|3:0|NonZeroExitCode\n12_4|COMPLETED|0:0|None\n";
        assert_eq!(parse_sacct(out, "12_3"), fate("FAILED", "NonZeroExitCode", "3:0"));
        assert_eq!(parse_sacct(out, "12_5"), None);
    }

    #[test]
    fn sbatch_ids_with_and_without_a_cluster_name() {
        assert_eq!(parse_sbatch("1234\n").as_deref(), Some("1234"));
        assert_eq!(parse_sbatch("1234;alpha\n").as_deref(), Some("1234"));
        assert_eq!(parse_sbatch("Submitted batch job 12\n"), None);
        assert_eq!(parse_sbatch(""), None);
    }

    #[test]
    fn pending_ranges_are_expanded() {
        assert_eq!(parse_indices("7"), vec![7]);
        assert_eq!(parse_indices("[0-2,5,8-9%3]"), vec![0, 1, 2, 5, 8, 9]);
        let q = parse_squeue("12_3|RUNNING|None\n12_[4-5]|PENDING|Priority\n13|PENDING|Resources\n");
        assert_eq!(q.len(), 3);
        assert_eq!(q[&("12".to_string(), 5)].state, "PENDING");
        assert_eq!(q[&("12".to_string(), 3)].reason, "None");
    }

    #[test]
    fn terminal_states() {
        for s in ["COMPLETED", "FAILED", "CANCELLED by 0", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"] {
            assert!(is_terminal(s), "{s}");
        }
        for s in ["PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED"] {
            assert!(!is_terminal(s), "{s}");
        }
    }

    #[test]
    fn the_batch_script_quotes_paths() {
        let script = batch_script(Path::new("/opt/nas it's/nas"), Path::new("/shared/search/slurm/jobs/00003"));
        assert!(script.starts_with("#!/bin/bash\n"));
        assert!(script.contains(r"exec '/opt/nas it'\''s/nas' worker --trial '/shared/search/slurm/jobs/00003'"));
        assert!(script.contains("\"/tasks/${SLURM_ARRAY_TASK_ID}.json\""));
    }

    #[test]
    fn sbatch_arguments_carry_the_settings() {
        let mut config = SlurmConfig::new("/bin/nas".into());
        config.partition = Some("gpu".into());
        config.gres = Some("gpu:1".into());
        config.time = Some("0:30:00".into());
        config.cpus_per_task = Some(8);
        config.sbatch_args = vec!["--account=lab".into()];
        let args = sbatch_args(&config, "nas-1", Path::new("/s/jobs/00000"), 20);
        assert_eq!(
            args,
            [
                "--parsable",
                "--array=0-19",
                "--job-name=nas-1",
                "--output=/s/jobs/00000/logs/%a.log",
                "--partition=gpu",
                "--gres=gpu:1",
                "--time=0:30:00",
                "--cpus-per-task=8",
                "--account=lab",
                "/s/jobs/00000/job.sh"
            ]
        );
    }

    #[test]
    fn job_names_are_stable_and_differ_by_directory() {
        let a = job_name(Path::new("/runs/search/ppo"));
        assert_eq!(a, job_name(Path::new("/runs/search/ppo")));
        assert_ne!(a, job_name(Path::new("/runs/search/random")));
        assert!(a.starts_with("nas-") && a.len() == 12, "{a}");
    }
}
