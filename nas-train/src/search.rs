//! The outer search loop: a strategy proposes cells, workers train them as children, the
//! validation accuracy goes back as the reward (paper Fig. 1).
//!
//! # The search directory
//!
//! ```text
//! search.json            the SearchConfig (strategy, budget, child recipe, data, seed)
//! journal.jsonl          every proposal, start, result and failure, one JSON object per
//!                        line, flushed before the loop goes on: the single truth of the search
//! strategy/              the strategy's saved state (controller weights, Adam moments, RNG,
//!                        baseline, population, pending proposals)
//! children/<id>/         each child's run directory (run.json, metrics.jsonl, report.json);
//!                        its weights are deleted once its result is journaled
//! best.json, top.json    the best cell and the top-k cells by reward (BestCell, TopCells)
//! retrain/<id>/          the top cells trained again (`retrain`)
//! baseline/<k>/          the random-cell baseline (`baseline_random`): 0 is the found cell,
//!                        1..=K random cells of the space, all trained alike
//! ```
//!
//! # Did the search help?
//!
//! With `baseline_random = K`, the end of a search trains the found cell (the best
//! re-trained one, else the best by reward) once more with a fresh seed beside K cells drawn
//! uniformly from the same space, with the same recipe and budget (the re-training's when
//! there is one, else the children's), and `best.json` records the comparison
//! ([`Comparison`]): every reward, the random median, how many random cells the found cell
//! beat. A found cell's search reward is the maximum of many noisy draws and flatters it; this
//! fresh training does not.
//!
//! Each JSON file (and each journal line) carries a format version, written and checked by
//! `nas_space::files`; those written before they had one read as version 1, so older search
//! directories still resume.
//!
//! # Resume
//!
//! The strategy's state is saved after every change and before the journal records what it
//! proposed; a result is journaled before the strategy hears of it. So after a kill at any
//! moment, `--resume` finds every finished child in the journal (it is never trained again),
//! reports to the strategy the results it had not heard of, journals the proposals it had
//! not journaled, and trains again (or resumes from their checkpoints) only the children that
//! were in flight.
//!
//! # Identical cells
//!
//! A proposal whose canonical hash (`nas_space::SpecHash`) equals a finished child's takes
//! that child's reward without training (the journal says `cached_from`); one equal to a child
//! still in flight waits for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nas_controller::{
    has_saved_strategy, load_strategy, new_strategy, EvolutionConfig, PpoConfig, Proposal, Strategy, StrategyConfig,
};
use nas_space::files::{json_line, parse_json, read_json, write_json, JsonFile};
use nas_space::{CellSpec, SearchSpace};
use serde::{Deserialize, Serialize};

use crate::data::DataSource;
pub use crate::executor::{Executor, LocalExecutor, LocalMode};
use crate::recipe::Recipe;
use crate::run::{self, RunConfig, RunOptions, Silent};
use crate::TrainError;

/// File names inside a search directory.
pub mod files {
    /// The search's configuration.
    pub const CONFIG: &str = "search.json";
    /// The journal.
    pub const JOURNAL: &str = "journal.jsonl";
    /// The strategy's state.
    pub const STRATEGY: &str = "strategy";
    /// The children's run directories.
    pub const CHILDREN: &str = "children";
    /// The best cell.
    pub const BEST: &str = "best.json";
    /// The top cells.
    pub const TOP: &str = "top.json";
}

/// What to search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// The strategy and its settings.
    pub strategy: StrategyConfig,
    /// Blocks per cell (the paper: 5).
    pub num_blocks: usize,
    /// Children to evaluate (cached duplicates included).
    pub children: usize,
    /// Children trained at once.
    pub workers: usize,
    /// How each child is trained.
    pub child: Recipe,
    /// The proxy data.
    pub data: DataSource,
    /// Seed of the strategy and of the children.
    pub seed: u64,
    /// How many cells `top.json` lists (and the CLI draws).
    pub top_k: usize,
    /// After the budget: train the best cells again, longer, and pick the best of those
    /// (the paper re-trains its top 250 to convergence).
    #[serde(default)]
    pub retrain: Option<Retrain>,
    /// After that: train the found cell again beside this many random cells of the space, all
    /// with the same recipe (see the module docs); 0 skips it.
    #[serde(default)]
    pub baseline_random: usize,
    /// Cost constraints and the cost-aware reward (none: accuracy alone).
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Where each child trains: `cpu`, `cuda` or `cuda:N` (a worker's own GPU on Slurm with
    /// `--gres gpu:1`).
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

impl JsonFile for SearchConfig {
    const VERSION: u64 = 1;
}

/// The re-training of the top cells at the end of a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retrain {
    /// How many of the best distinct cells.
    pub top: usize,
    /// Epochs of each re-training (the child recipe otherwise).
    pub epochs: u64,
}

impl SearchConfig {
    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let err = |field: &'static str, message: &str| Err(TrainError::Config { field, message: message.into() });
        if self.children == 0 {
            return err("children", "must be at least 1");
        }
        if self.workers == 0 {
            return err("workers", "must be at least 1");
        }
        if self.num_blocks == 0 {
            return err("num_blocks", "must be at least 1");
        }
        if let Some(r) = self.retrain {
            if r.top == 0 || r.epochs == 0 {
                return err("retrain", "needs at least one cell and one epoch");
            }
        }
        if let Some(budget) = &self.budget {
            budget.validate()?;
        }
        let device_ok = self.device == "cpu"
            || self.device == "cuda"
            || self.device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            return err("device", "must be cpu, cuda or cuda:N");
        }
        if !self.data.is_small() {
            return Err(TrainError::Config {
                field: "data",
                message: format!(
                    "`{}`: the search trains children on 32×32 proxy data (synthetic, cifar10, cifar100)",
                    self.data
                ),
            });
        }
        self.strategy.validate().map_err(|e| TrainError::Config { field: "strategy", message: e.to_string() })?;
        self.child.validate()
    }

    /// Random cells the found cell is compared with unless told.
    pub const DEFAULT_BASELINE: usize = 5;

    /// The recipe of the re-training and of the baseline: the child's, for the
    /// re-training's epochs when there is one.
    pub fn retrain_recipe(&self) -> Recipe {
        let mut recipe = self.child.clone();
        if let Some(retrain) = self.retrain {
            recipe.epochs = retrain.epochs;
            recipe.max_steps = None;
        }
        recipe
    }

    /// Children a cluster trains at once unless told: the paper's controller batch.
    pub const CLUSTER_WORKERS: usize = 20;

    /// Children this machine trains at once unless told: one per core.
    pub fn local_workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

impl Default for SearchConfig {
    /// The search `nas search` runs unless told otherwise: the paper's PPO controller over
    /// B = 5 blocks, 40 children of [`Recipe::small_search_child`] on 2,000 built-in images,
    /// one child per core at a time, seed 0, the best 5 cells listed, no re-training, children
    /// on the CPU, and the found cell compared with 5 random cells at the end.
    fn default() -> SearchConfig {
        let seed = 0;
        SearchConfig {
            strategy: StrategyConfig::Ppo(PpoConfig::default()),
            num_blocks: 5,
            children: 40,
            workers: SearchConfig::local_workers(),
            child: Recipe::small_search_child(seed),
            data: DataSource::synthetic(2000),
            seed,
            top_k: 5,
            retrain: None,
            baseline_random: SearchConfig::DEFAULT_BASELINE,
            budget: None,
            device: cpu(),
        }
    }
}

impl Retrain {
    /// Epochs of each re-training unless told.
    pub const DEFAULT_EPOCHS: u64 = 10;
}

/// What a found cell may cost, and how cost enters the reward. Costs are those of the
/// network the cell will be transferred to (`target_net`), from `nas_space::cost`'s
/// analytical model, so no training is spent on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The network the costs are counted in: a `--net` value (`mobile`, `large`, `N@P`,
    /// `cifar:N@P`; see `NetworkConfig::parse_net`), with its own image size and classes.
    pub target_net: String,
    /// Hard limit on mult-adds per image: a cell over it is never trained.
    #[serde(default)]
    pub max_mult_adds: Option<u64>,
    /// Hard limit on trainable parameters: a cell over it is never trained.
    #[serde(default)]
    pub max_params: Option<u64>,
    /// The reward the strategy gets for a cell over a hard limit.
    #[serde(default)]
    pub penalty: f64,
    /// MnasNet's soft constraint (Tan et al. 2019): the reward is
    /// `accuracy × (mult_adds / target)^cost_weight`.
    #[serde(default)]
    pub target_mult_adds: Option<u64>,
    /// The exponent of the soft constraint (MnasNet: −0.07).
    #[serde(default = "default_cost_weight")]
    pub cost_weight: f64,
}

fn default_cost_weight() -> f64 {
    Budget::MNASNET_COST_WEIGHT
}

/// A cell's cost in the budget's target network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellCost {
    /// Mult-adds per image (inference network, no aux head).
    pub mult_adds: u64,
    /// Trainable parameters (inference network, no aux head).
    pub params: u64,
}

impl Budget {
    /// Rejections per child of the budget after which a search gives up.
    pub const MAX_REJECTED_PER_CHILD: usize = 100;

    /// MnasNet's exponent for its soft latency constraint.
    pub const MNASNET_COST_WEIGHT: f64 = -0.07;

    /// A budget on `target_net` with no limit and no soft reward.
    pub fn on(target_net: &str) -> Budget {
        Budget {
            target_net: target_net.to_string(),
            max_mult_adds: None,
            max_params: None,
            penalty: 0.0,
            target_mult_adds: None,
            cost_weight: Budget::MNASNET_COST_WEIGHT,
        }
    }

    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let err = |field: &'static str, message: String| Err(TrainError::Config { field, message });
        if let Err(e) = nas_space::NetworkConfig::parse_net(&self.target_net, &nas_space::CellSpec::nasnet_a()) {
            return err("target_net", e.to_string());
        }
        if self.max_mult_adds == Some(0) || self.max_params == Some(0) || self.target_mult_adds == Some(0) {
            return err("budget", "limits and targets must be at least 1".into());
        }
        if !self.penalty.is_finite() {
            return err("penalty", format!("must be finite, got {}", self.penalty));
        }
        if !self.cost_weight.is_finite() {
            return err("cost_weight", format!("must be finite, got {}", self.cost_weight));
        }
        Ok(())
    }

    /// The cost of `spec` in the target network.
    pub fn cost(&self, spec: &CellSpec) -> Result<CellCost, nas_space::SpecError> {
        let config = nas_space::NetworkConfig::parse_net(&self.target_net, spec)?;
        let report = nas_space::cost::network_cost(spec, &config)?;
        Ok(CellCost { mult_adds: report.network.mult_adds, params: report.network.params_trainable })
    }

    /// The accuracy behind a `reward` of a cell of `cost` ([`Budget::reward`] inverted).
    pub fn accuracy(&self, reward: f64, cost: CellCost) -> f64 {
        match self.target_mult_adds {
            Some(target) => reward / (cost.mult_adds as f64 / target as f64).powf(self.cost_weight),
            None => reward,
        }
    }

    /// Why `cost` breaks a hard limit, if it does.
    pub fn over(&self, cost: CellCost) -> Option<String> {
        if let Some(max) = self.max_mult_adds.filter(|&max| cost.mult_adds > max) {
            return Some(format!("{} mult-adds over the limit of {max} in {}", cost.mult_adds, self.target_net));
        }
        if let Some(max) = self.max_params.filter(|&max| cost.params > max) {
            return Some(format!("{} parameters over the limit of {max} in {}", cost.params, self.target_net));
        }
        None
    }

    /// The reward of a cell of `cost` with validation accuracy `accuracy`: MnasNet's
    /// `accuracy × (mult_adds / target)^w` with a target, the accuracy otherwise.
    pub fn reward(&self, accuracy: f64, cost: CellCost) -> f64 {
        match self.target_mult_adds {
            Some(target) => accuracy * (cost.mult_adds as f64 / target as f64).powf(self.cost_weight),
            None => accuracy,
        }
    }
}

/// Regularized evolution sized for a budget of `children`: unless given, a population of a
/// quarter of the budget (between 4 and 100) and tournaments of a quarter of the population
/// (at least 2, at most the population).
pub fn sized_evolution(children: usize, population: Option<usize>, sample_size: Option<usize>) -> EvolutionConfig {
    let population_size = population.unwrap_or((children / 4).clamp(4, 100));
    let sample_size = sample_size.unwrap_or((population_size / 4).max(2)).min(population_size);
    EvolutionConfig { population_size, sample_size, ..EvolutionConfig::default() }
}

/// One child to train: what `nas worker --trial FILE` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// The proposal's id.
    pub id: u64,
    /// The cell.
    pub spec: CellSpec,
    /// How to train it.
    pub recipe: Recipe,
    /// On what.
    pub data: DataSource,
    /// Its seed.
    pub seed: u64,
    /// Its run directory.
    pub dir: PathBuf,
    /// Where it trains (`cpu`, `cuda`, `cuda:N`).
    #[serde(default = "cpu")]
    pub device: String,
}

impl JsonFile for Trial {
    const VERSION: u64 = 1;
}

/// What a trial gave: what `nas worker --out FILE` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    /// The proposal's id.
    pub id: u64,
    /// Validation top-1 (the reward), or the reason the child failed.
    pub outcome: Outcome,
    /// Seconds of training.
    pub seconds: f64,
}

impl JsonFile for TrialResult {
    const VERSION: u64 = 1;
}

/// A child's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Trained: its validation metrics.
    Trained { reward: f64, top1: f64, top5: f64, loss: f64, params: u64 },
    /// Failed (NaN, bad spec, error): why.
    Failed { reason: String },
    /// Stopped from outside before it finished; it will be resumed.
    Interrupted,
}

/// Trains one trial in its directory (resuming it when a checkpoint is there) and
/// returns its outcome; never panics on a bad child.
pub fn run_trial(trial: &Trial, stop: Option<Arc<AtomicBool>>) -> TrialResult {
    let started = Instant::now();
    let device = match crate::device::parse_device(&trial.device) {
        Ok(device) => device,
        Err(err) => {
            let outcome = Outcome::Failed { reason: err.to_string() };
            return TrialResult { id: trial.id, outcome, seconds: started.elapsed().as_secs_f64() };
        }
    };
    let options = RunOptions { force_memory: false, stop, device };
    let config = RunConfig {
        cell_spec: trial.spec.clone(),
        recipe: trial.recipe.clone(),
        data: trial.data.clone(),
        seed: trial.seed,
        init: None,
    };
    let result = if trial.dir.join(run::files::CONFIG).exists() {
        run::resume(&trial.dir, &options, &mut Silent)
    } else {
        run::train(&trial.dir, &config, &options, &mut Silent)
    };
    let outcome = match result {
        Ok(report) => {
            // The weights of a child are not needed once its reward is known.
            remove_checkpoint_files(&trial.dir);
            let m = report.final_eval.metrics;
            Outcome::Trained { reward: m.top1, top1: m.top1, top5: m.top5, loss: m.loss, params: report.params }
        }
        Err(TrainError::Interrupted { .. }) => Outcome::Interrupted,
        Err(err) => Outcome::Failed { reason: err.to_string() },
    };
    TrialResult { id: trial.id, outcome, seconds: started.elapsed().as_secs_f64() }
}

fn remove_checkpoint_files(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("checkpoint") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JournalEvent {
    /// The search started or resumed, and the strategy's settings.
    Start {
        time: u64,
        strategy: String,
        resumed: bool,
        #[serde(default)]
        settings: Option<StrategyConfig>,
    },
    /// A proposal of the strategy.
    Proposal {
        id: u64,
        hash: String,
        spec: CellSpec,
        actions: Vec<usize>,
        #[serde(default)]
        log_prob: Option<f64>,
        #[serde(default)]
        parent: Option<u64>,
        #[serde(default)]
        note: Option<String>,
    },
    /// A worker started training a proposal.
    Started { id: u64, time: u64 },
    /// A proposal's reward.
    Result {
        id: u64,
        reward: f64,
        #[serde(default)]
        top1: Option<f64>,
        #[serde(default)]
        top5: Option<f64>,
        #[serde(default)]
        loss: Option<f64>,
        #[serde(default)]
        params: Option<u64>,
        seconds: f64,
        /// The finished child whose reward was reused (identical canonical cell).
        #[serde(default)]
        cached_from: Option<u64>,
    },
    /// A child that failed, and why.
    Failed { id: u64, reason: String, seconds: f64 },
    /// A proposal over the budget's hard limits, never trained: why, and the reward the
    /// strategy got for it.
    Rejected { id: u64, reason: String, penalty: f64 },
    /// A top cell trained again, longer, after the budget was spent.
    Retrained {
        id: u64,
        #[serde(default)]
        reward: Option<f64>,
        #[serde(default)]
        reason: Option<String>,
        seconds: f64,
    },
    /// A cell of the random baseline trained (`index` 0: the found cell again, with a
    /// fresh seed; 1..=K: random cells).
    Baseline {
        index: usize,
        hash: String,
        spec: CellSpec,
        #[serde(default)]
        reward: Option<f64>,
        #[serde(default)]
        reason: Option<String>,
        seconds: f64,
    },
    /// The budget was spent (and the top cells re-trained, if asked).
    End { time: u64, trained: usize, cached: usize, failed: usize },
}

impl JsonFile for JournalEvent {
    const VERSION: u64 = 1;
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The journal, appended to and flushed line by line.
struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens `path` for appending. A last line without its newline (a write cut short by a
    /// kill) is completed when it holds a whole event and cut off otherwise, so the next
    /// event starts a line of its own and the journal stays readable.
    fn open(path: PathBuf) -> Result<Journal, TrainError> {
        let io = |source| TrainError::Io { path: path.clone(), source };
        let mut file = OpenOptions::new().create(true).append(true).read(true).open(&path).map_err(io)?;
        let text = fs::read(&path).map_err(io)?;
        if !text.is_empty() && !text.ends_with(b"\n") {
            let start = text.iter().rposition(|&b| b == b'\n').map_or(0, |k| k + 1);
            let last = String::from_utf8_lossy(&text[start..]);
            if parse_json::<JournalEvent>(&path, &last).is_ok() {
                file.write_all(b"\n").map_err(io)?;
            } else {
                file.set_len(start as u64).map_err(io)?;
            }
            file.sync_data().map_err(io)?;
        }
        Ok(Journal { path, file })
    }

    fn append(&mut self, event: &JournalEvent) -> Result<(), TrainError> {
        let line = json_line(event);
        let io = |source| TrainError::Io { path: self.path.clone(), source };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// Reads a journal. A last line cut short by a kill is ignored; any other bad line is an
/// error naming the line, and a line of a version this build does not read is refused.
pub fn read_journal(path: &Path) -> Result<Vec<JournalEvent>, TrainError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(TrainError::Io { path: path.to_path_buf(), source }),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut events = Vec::with_capacity(lines.len());
    for (k, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_json(path, line) {
            Ok(event) => events.push(event),
            // A torn last line: the write it belongs to never finished.
            Err(nas_space::files::FileError::Format { .. }) if k + 1 == lines.len() => {}
            Err(err) => return Err(err.at_line(k + 1).into()),
        }
    }
    Ok(events)
}

/// A finished child, as the journal records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The proposal id.
    pub id: u64,
    /// The reward (validation top-1).
    pub reward: f64,
    /// The canonical hash of its cell.
    pub hash: String,
    /// The cell.
    pub spec: CellSpec,
    /// Whether the reward was reused from an identical cell.
    pub cached: bool,
}

/// What the journal says so far.
#[derive(Debug, Clone, Default)]
pub struct JournalSummary {
    /// Every proposal by id.
    pub proposals: BTreeMap<u64, Proposal>,
    /// Results in journal order.
    pub results: Vec<Scored>,
    /// Failures by id.
    pub failed: BTreeMap<u64, String>,
    /// Proposals over the budget, never trained, by id: why.
    pub rejected: BTreeMap<u64, String>,
    /// Re-training rewards by id (`None`: the re-training failed).
    pub retrained: BTreeMap<u64, Option<f64>>,
    /// The baseline's cells by index (0: the found cell) and their rewards (`None`: failed).
    pub baseline: BTreeMap<usize, (CellSpec, Option<f64>)>,
}

impl JournalSummary {
    /// Folds the events of a journal.
    pub fn of(events: &[JournalEvent]) -> JournalSummary {
        let mut s = JournalSummary::default();
        for event in events {
            match event {
                JournalEvent::Proposal { id, spec, actions, log_prob, parent, note, .. } => {
                    s.proposals.insert(
                        *id,
                        Proposal {
                            id: *id,
                            spec: spec.clone(),
                            actions: actions.clone(),
                            log_prob: *log_prob,
                            parent: *parent,
                            note: note.clone(),
                        },
                    );
                }
                JournalEvent::Result { id, reward, cached_from, .. } => {
                    if let Some(p) = s.proposals.get(id) {
                        s.results.push(Scored {
                            id: *id,
                            reward: *reward,
                            hash: p.spec.canonical_hash().to_string(),
                            spec: p.spec.clone(),
                            cached: cached_from.is_some(),
                        });
                    }
                }
                JournalEvent::Failed { id, reason, .. } => {
                    s.failed.insert(*id, reason.clone());
                }
                JournalEvent::Rejected { id, reason, .. } => {
                    s.rejected.insert(*id, reason.clone());
                }
                JournalEvent::Retrained { id, reward, .. } => {
                    s.retrained.insert(*id, *reward);
                }
                JournalEvent::Baseline { index, spec, reward, .. } => {
                    s.baseline.insert(*index, (spec.clone(), *reward));
                }
                _ => {}
            }
        }
        s
    }

    /// Children evaluated (trained, cached or failed).
    pub fn done(&self) -> usize {
        self.results.len() + self.failed.len()
    }

    /// The cell the search found: the best re-trained one, else the best by reward.
    pub fn found(&self) -> Option<Scored> {
        let retrained = |s: &Scored| self.retrained.get(&s.id).copied().flatten();
        let all = self.top(usize::MAX);
        let best_retrained = all.iter().filter(|s| retrained(s).is_some()).max_by(|a, b| {
            retrained(a).unwrap_or(f64::MIN).total_cmp(&retrained(b).unwrap_or(f64::MIN)).then(b.id.cmp(&a.id))
        });
        best_retrained.or(all.first()).cloned()
    }

    /// The found cell against the random cells, once the baseline has trained the found
    /// cell and at least one random cell.
    pub fn comparison(&self) -> Option<Comparison> {
        let found = self.baseline.get(&0)?.1?;
        let random: Vec<f64> = self.baseline.range(1..).filter_map(|(_, (_, r))| *r).collect();
        if random.is_empty() {
            return None;
        }
        let failed = self.baseline.range(1..).filter(|(_, (_, r))| r.is_none()).count();
        let mut sorted = random.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        let beaten = random.iter().filter(|&&r| found > r).count();
        let rank = 1 + random.iter().filter(|&&r| r > found).count();
        Some(Comparison { found, random, median, beaten, rank, failed })
    }

    /// The best `k` distinct cells (by canonical hash) by reward, best first.
    pub fn top(&self, k: usize) -> Vec<Scored> {
        let mut best: HashMap<&str, &Scored> = HashMap::new();
        for r in &self.results {
            let entry = best.entry(&r.hash).or_insert(r);
            if r.reward > entry.reward || (r.reward == entry.reward && !r.cached && entry.cached) {
                *entry = r;
            }
        }
        let mut out: Vec<Scored> = best.into_values().cloned().collect();
        out.sort_by(|a, b| b.reward.total_cmp(&a.reward).then(a.id.cmp(&b.id)));
        out.truncate(k);
        out
    }
}

/// What the loop tells whoever watches it.
pub trait SearchReporter {
    /// The search starts with `done` of `total` children already evaluated.
    fn start(&mut self, _dir: &Path, _done: usize, _total: usize) {}
    /// A child finished (or failed, or was cached).
    fn child(&mut self, _event: &JournalEvent, _done: usize, _best: Option<&Scored>) {}
    /// Something worth a line in a log.
    fn message(&mut self, _text: &str) {}
    /// The search is over.
    fn finish(&mut self) {}
}

/// A search reporter that writes plain lines to standard error.
#[derive(Debug, Default)]
pub struct SearchLog {
    total: usize,
}

impl SearchReporter for SearchLog {
    fn start(&mut self, dir: &Path, done: usize, total: usize) {
        self.total = total;
        eprintln!("search in {}: {done} of {total} children done", dir.display());
    }
    fn child(&mut self, event: &JournalEvent, done: usize, best: Option<&Scored>) {
        let best = best.map_or("-".to_string(), |b| format!("{:.4} (child {})", b.reward, b.id));
        match event {
            JournalEvent::Result { id, reward, cached_from, seconds, .. } => eprintln!(
                "child {id}: reward {reward:.4}{} in {seconds:.1} s [{done}/{}] best {best}",
                cached_from.map_or(String::new(), |c| format!(" (cached from {c})")),
                self.total
            ),
            JournalEvent::Failed { id, reason, .. } => {
                eprintln!("child {id}: failed: {reason} [{done}/{}] best {best}", self.total)
            }
            JournalEvent::Rejected { id, reason, .. } => eprintln!("proposal {id}: not trained: {reason}"),
            _ => {}
        }
    }
    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// How the search ended.
#[derive(Debug, Clone)]
pub struct SearchOutcome {
    /// The search directory.
    pub dir: PathBuf,
    /// The journal, folded.
    pub summary: JournalSummary,
    /// Whether the budget was spent (false: stopped from outside, resumable).
    pub complete: bool,
}

/// Starts a fresh search in `dir` (a directory that holds one is refused).
pub fn search(
    dir: &Path,
    config: &SearchConfig,
    executor: &mut dyn Executor,
    stop: Option<Arc<AtomicBool>>,
    reporter: &mut dyn SearchReporter,
) -> Result<SearchOutcome, TrainError> {
    if dir.join(files::CONFIG).exists() || dir.join(files::JOURNAL).exists() {
        return Err(TrainError::Config {
            field: "out",
            message: format!(
                "{} already holds a search; resume it (--resume) or choose another directory",
                dir.display()
            ),
        });
    }
    config.validate()?;
    crate::data::check_source(&config.data)?;
    fs::create_dir_all(dir).map_err(|source| TrainError::Io { path: dir.to_path_buf(), source })?;
    let path = dir.join(files::CONFIG);
    write_json(&path, config)?;
    run_search(dir, config, executor, false, stop, reporter)
}

/// Reads the `search.json` of `dir`.
pub fn read_search_config(dir: &Path) -> Result<SearchConfig, TrainError> {
    Ok(read_json(&dir.join(files::CONFIG))?)
}

/// Continues the search in `dir`; `children` raises (or lowers) the budget.
pub fn resume_search(
    dir: &Path,
    children: Option<usize>,
    executor: &mut dyn Executor,
    stop: Option<Arc<AtomicBool>>,
    reporter: &mut dyn SearchReporter,
) -> Result<SearchOutcome, TrainError> {
    let mut config = read_search_config(dir)?;
    if let Some(children) = children {
        if children != config.children {
            config.children = children;
            config.validate()?;
            write_json(&dir.join(files::CONFIG), &config)?;
        }
    }
    run_search(dir, &config, executor, true, stop, reporter)
}

fn controller_err(dir: &Path) -> impl Fn(nas_controller::ControllerError) -> TrainError + '_ {
    move |err| TrainError::Checkpoint { path: dir.join(files::STRATEGY), message: err.to_string() }
}

fn proposal_event(p: &Proposal) -> JournalEvent {
    JournalEvent::Proposal {
        id: p.id,
        hash: p.spec.canonical_hash().to_string(),
        spec: p.spec.clone(),
        actions: p.actions.clone(),
        log_prob: p.log_prob,
        parent: p.parent,
        note: p.note.clone(),
    }
}

fn run_search(
    dir: &Path,
    config: &SearchConfig,
    executor: &mut dyn Executor,
    resumed: bool,
    stop: Option<Arc<AtomicBool>>,
    reporter: &mut dyn SearchReporter,
) -> Result<SearchOutcome, TrainError> {
    let result = run_search_inner(dir, config, executor, resumed, stop, reporter);
    reporter.finish();
    result
}

fn run_search_inner(
    dir: &Path,
    config: &SearchConfig,
    executor: &mut dyn Executor,
    resumed: bool,
    stop: Option<Arc<AtomicBool>>,
    reporter: &mut dyn SearchReporter,
) -> Result<SearchOutcome, TrainError> {
    let space = SearchSpace::with_blocks(config.num_blocks);
    let strategy_dir = dir.join(files::STRATEGY);
    let journal_path = dir.join(files::JOURNAL);
    let events = read_journal(&journal_path)?;
    let mut summary = JournalSummary::of(&events);
    let mut journal = Journal::open(journal_path)?;
    let mut strategy: Box<dyn Strategy> = if has_saved_strategy(&strategy_dir) {
        load_strategy(&strategy_dir).map_err(controller_err(dir))?
    } else {
        new_strategy(&config.strategy, &space, config.seed).map_err(controller_err(dir))?
    };
    let settings = Some(config.strategy.clone());
    journal.append(&JournalEvent::Start { time: now(), strategy: strategy.name().to_string(), resumed, settings })?;

    // Bring the strategy and the journal level (see the module docs).
    let mut queue: VecDeque<Proposal> = VecDeque::new();
    for p in strategy.pending() {
        if let std::collections::btree_map::Entry::Vacant(slot) = summary.proposals.entry(p.id) {
            journal.append(&proposal_event(&p))?;
            slot.insert(p.clone());
        }
        if let Some(r) = summary.results.iter().find(|r| r.id == p.id) {
            strategy.report(p.id, Some(r.reward)).map_err(controller_err(dir))?;
        } else if summary.failed.contains_key(&p.id) {
            strategy.report(p.id, None).map_err(controller_err(dir))?;
        } else if summary.rejected.contains_key(&p.id) {
            let penalty = config.budget.as_ref().map_or(0.0, |b| b.penalty);
            strategy.report(p.id, Some(penalty)).map_err(controller_err(dir))?;
        } else {
            queue.push_back(p);
        }
    }
    strategy.save(&strategy_dir).map_err(controller_err(dir))?;
    reporter.start(dir, summary.done(), config.children);

    let stop_flag = stop.unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
    executor.start(dir, config, &stop_flag)?;
    let outcome =
        search_loop(dir, config, executor, &stop_flag, &mut *strategy, &mut journal, &mut summary, queue, reporter);
    let complete = match outcome {
        Ok(complete) => complete,
        Err(err) => {
            executor.abandon();
            return Err(err);
        }
    };
    let mut complete = complete;
    if complete {
        if let Some(retrain) = config.retrain {
            complete = retrain_top(dir, config, retrain, executor, &mut journal, &mut summary, reporter)?;
        }
    }
    if complete && config.baseline_random > 0 {
        complete = run_baseline(dir, config, executor, &mut journal, &mut summary, reporter)?;
    }
    if complete {
        let s = &summary;
        let trained = s.results.iter().filter(|r| !r.cached).count();
        let cached = s.results.len() - trained;
        journal.append(&JournalEvent::End { time: now(), trained, cached, failed: s.failed.len() })?;
    }
    write_best(dir, &summary, config)?;
    Ok(SearchOutcome { dir: dir.to_path_buf(), summary, complete })
}

/// Proposes, schedules and settles children until the budget is spent (true) or the search
/// is stopped (false).
#[allow(clippy::too_many_arguments)]
fn search_loop(
    dir: &Path,
    config: &SearchConfig,
    executor: &mut dyn Executor,
    stop_flag: &Arc<AtomicBool>,
    strategy: &mut dyn Strategy,
    journal: &mut Journal,
    summary: &mut JournalSummary,
    mut queue: VecDeque<Proposal>,
    reporter: &mut dyn SearchReporter,
) -> Result<bool, TrainError> {
    let strategy_dir = dir.join(files::STRATEGY);
    let children_dir = dir.join(files::CHILDREN);
    let mut in_flight: HashMap<u64, (String, Instant)> = HashMap::new();
    let mut waiting: Vec<Proposal> = Vec::new(); // identical to a child in flight
    loop {
        // Settle what can be settled without training, then hand out work.
        let stopping = stop_flag.load(Ordering::Relaxed);
        let mut scheduled_any = false;
        if !stopping {
            if queue.is_empty() && in_flight.len() < config.workers {
                let budget = config.children.saturating_sub(summary.done() + in_flight.len() + waiting.len());
                if budget > 0 {
                    let want = budget.min(config.workers - in_flight.len()).max(1);
                    let fresh = strategy.propose(want).map_err(controller_err(dir))?;
                    if !fresh.is_empty() {
                        strategy.save(&strategy_dir).map_err(controller_err(dir))?;
                        for p in &fresh {
                            journal.append(&proposal_event(p))?;
                            summary.proposals.insert(p.id, p.clone());
                        }
                        queue.extend(fresh);
                    }
                }
            }
            let mut batch = Vec::new();
            while let Some(p) = queue.front() {
                if let Some(budget) = &config.budget {
                    let over = match budget.cost(&p.spec) {
                        Ok(cost) => budget.over(cost),
                        Err(err) => Some(format!("no cost in {}: {err}", budget.target_net)),
                    };
                    if let Some(reason) = over {
                        let p = queue.pop_front().expect("front exists");
                        let event = JournalEvent::Rejected { id: p.id, reason, penalty: budget.penalty };
                        settle(journal, strategy, &strategy_dir, summary, &event, dir)?;
                        reporter.child(&event, summary.done(), summary.top(1).first());
                        scheduled_any = true;
                        if summary.rejected.len() > Budget::MAX_REJECTED_PER_CHILD * config.children {
                            return Err(TrainError::Config {
                                field: "budget",
                                message: format!(
                                    "{} proposals over the budget for a budget of {} children: the limits leave \
                                     (almost) no cell of the space",
                                    summary.rejected.len(),
                                    config.children
                                ),
                            });
                        }
                        continue;
                    }
                }
                let hash = p.spec.canonical_hash().to_string();
                if let Some(prev) = summary.results.iter().find(|r| r.hash == hash && !r.cached).cloned() {
                    let p = queue.pop_front().expect("front exists");
                    let event = JournalEvent::Result {
                        id: p.id,
                        reward: prev.reward,
                        top1: None,
                        top5: None,
                        loss: None,
                        params: None,
                        seconds: 0.0,
                        cached_from: Some(prev.id),
                    };
                    settle(journal, strategy, &strategy_dir, summary, &event, dir)?;
                    reporter.child(&event, summary.done(), summary.top(1).first());
                    scheduled_any = true;
                    continue;
                }
                if in_flight.values().any(|(h, _)| *h == hash) {
                    waiting.push(queue.pop_front().expect("front exists"));
                    scheduled_any = true;
                    continue;
                }
                if in_flight.len() >= config.workers {
                    break;
                }
                let p = queue.pop_front().expect("front exists");
                batch.push(Trial {
                    id: p.id,
                    spec: p.spec.clone(),
                    recipe: config.child.clone(),
                    data: config.data.clone(),
                    seed: config.seed.wrapping_mul(1_000_003).wrapping_add(p.id),
                    dir: children_dir.join(format!("{:05}", p.id)),
                    device: config.device.clone(),
                });
                journal.append(&JournalEvent::Started { id: p.id, time: now() })?;
                in_flight.insert(p.id, (hash, Instant::now()));
                scheduled_any = true;
            }
            if !batch.is_empty() {
                executor.submit(batch, &mut |line| reporter.message(line))?;
            }
        }
        if in_flight.is_empty() {
            if stopping {
                return Ok(false);
            }
            if summary.done() >= config.children && waiting.is_empty() {
                return Ok(true);
            }
            if !scheduled_any && queue.is_empty() {
                // The strategy proposes nothing and nothing is running: it waits for rewards
                // that will never come.
                return Err(TrainError::Config {
                    field: "strategy",
                    message: format!(
                        "{} proposes nothing with no child in flight ({} of {} done)",
                        strategy.name(),
                        summary.done(),
                        config.children
                    ),
                });
            }
            continue;
        }
        let results = executor.wait(&mut |line| reporter.message(line))?;
        if results.is_empty() {
            // An executor that holds none of the children in flight would spin this loop.
            return Err(TrainError::Config {
                field: "executor",
                message: format!("{} returned no result with {} children in flight", executor.name(), in_flight.len()),
            });
        }
        for result in results {
            if in_flight.remove(&result.id).is_none() {
                continue; // not ours to settle (cannot happen with a well-behaved executor)
            }
            let event = match result.outcome {
                Outcome::Trained { reward, top1, top5, loss, params } => JournalEvent::Result {
                    id: result.id,
                    reward: match &config.budget {
                        Some(budget) => budget
                            .cost(&summary.proposals[&result.id].spec)
                            .map_or(reward, |cost| budget.reward(reward, cost)),
                        None => reward,
                    },
                    top1: Some(top1),
                    top5: Some(top5),
                    loss: Some(loss),
                    params: Some(params),
                    seconds: result.seconds,
                    cached_from: None,
                },
                Outcome::Failed { reason } => JournalEvent::Failed { id: result.id, reason, seconds: result.seconds },
                // Stopped with the search: trained again (or resumed) by `--resume`.
                Outcome::Interrupted if stop_flag.load(Ordering::Relaxed) => continue,
                Outcome::Interrupted => JournalEvent::Failed {
                    id: result.id,
                    reason: "stopped from outside the search (its worker was signalled)".into(),
                    seconds: result.seconds,
                },
            };
            settle(journal, strategy, &strategy_dir, summary, &event, dir)?;
            reporter.child(&event, summary.done(), summary.top(1).first());
            // Proposals that waited for this cell take its reward now (or go back to the
            // queue when it failed).
            let hash = summary.proposals[&result.id].spec.canonical_hash().to_string();
            let (same, rest): (Vec<Proposal>, Vec<Proposal>) =
                waiting.drain(..).partition(|p| p.spec.canonical_hash().to_string() == hash);
            waiting = rest;
            for p in same.into_iter().rev() {
                queue.push_front(p);
            }
        }
    }
}

/// Journals `event`, then tells the strategy and saves it.
fn settle(
    journal: &mut Journal,
    strategy: &mut dyn Strategy,
    strategy_dir: &Path,
    summary: &mut JournalSummary,
    event: &JournalEvent,
    dir: &Path,
) -> Result<(), TrainError> {
    journal.append(event)?;
    match event {
        JournalEvent::Result { id, reward, cached_from, .. } => {
            let p = &summary.proposals[id];
            summary.results.push(Scored {
                id: *id,
                reward: *reward,
                hash: p.spec.canonical_hash().to_string(),
                spec: p.spec.clone(),
                cached: cached_from.is_some(),
            });
            strategy.report(*id, Some(*reward)).map_err(controller_err(dir))?;
        }
        JournalEvent::Failed { id, reason, .. } => {
            summary.failed.insert(*id, reason.clone());
            strategy.report(*id, None).map_err(controller_err(dir))?;
        }
        JournalEvent::Rejected { id, reason, penalty } => {
            summary.rejected.insert(*id, reason.clone());
            strategy.report(*id, Some(*penalty)).map_err(controller_err(dir))?;
        }
        _ => {}
    }
    strategy.save(strategy_dir).map_err(controller_err(dir))
}

/// Trains the best `retrain.top` distinct cells again for `retrain.epochs` epochs (those not
/// re-trained yet), `workers` at a time, journaling each as `retrained`. Returns false when
/// stopped.
fn retrain_top(
    dir: &Path,
    config: &SearchConfig,
    retrain: Retrain,
    executor: &mut dyn Executor,
    journal: &mut Journal,
    summary: &mut JournalSummary,
    reporter: &mut dyn SearchReporter,
) -> Result<bool, TrainError> {
    let todo: Vec<Scored> =
        summary.top(retrain.top).into_iter().filter(|s| !summary.retrained.contains_key(&s.id)).collect();
    if todo.is_empty() {
        return Ok(true);
    }
    reporter.message(&format!("re-training the top {} cells for {} epochs", todo.len(), retrain.epochs));
    let recipe = config.retrain_recipe();
    let trials = todo
        .iter()
        .map(|s| Trial {
            id: s.id,
            spec: s.spec.clone(),
            recipe: recipe.clone(),
            data: config.data.clone(),
            seed: config.seed.wrapping_mul(1_000_003).wrapping_add(s.id),
            dir: dir.join("retrain").join(format!("{:05}", s.id)),
            device: config.device.clone(),
        })
        .collect();
    train_all(trials, config.workers, executor, reporter, &mut |result, reward, reason| {
        journal.append(&JournalEvent::Retrained { id: result.id, reward, reason, seconds: result.seconds })?;
        summary.retrained.insert(result.id, reward);
        Ok(match reward {
            Some(r) => format!("re-trained child {}: reward {r:.4}", result.id),
            None => format!("re-training child {} failed", result.id),
        })
    })
}

/// Baseline trials' ids: above any proposal's.
const BASELINE_IDS: u64 = 1 << 48;

/// Trains the found cell again (fresh seed) beside `baseline_random` uniformly drawn cells
/// of the space, those not trained yet, journaling each as `baseline`. Returns false when
/// stopped.
fn run_baseline(
    dir: &Path,
    config: &SearchConfig,
    executor: &mut dyn Executor,
    journal: &mut Journal,
    summary: &mut JournalSummary,
    reporter: &mut dyn SearchReporter,
) -> Result<bool, TrainError> {
    let Some(found) = summary.found() else { return Ok(true) };
    // The random cells depend on the seed only, so a resumed search draws the same ones.
    let space = SearchSpace::with_blocks(config.num_blocks);
    let mut rng = nas_space::SpaceRng::new(config.seed ^ 0xBA5E_11E5);
    let mut cells = vec![found.spec];
    cells.extend((0..config.baseline_random).map(|_| space.sample(&mut rng)));
    let recipe = config.retrain_recipe();
    let trials: VecDeque<Trial> = cells
        .into_iter()
        .enumerate()
        .filter(|(k, _)| !summary.baseline.contains_key(k))
        .map(|(k, spec)| Trial {
            id: BASELINE_IDS + k as u64,
            spec,
            recipe: recipe.clone(),
            data: config.data.clone(),
            seed: (config.seed ^ 0xBA5E_11E5).wrapping_mul(1_000_003).wrapping_add(k as u64),
            dir: dir.join("baseline").join(format!("{k:02}")),
            device: config.device.clone(),
        })
        .collect();
    if trials.is_empty() {
        return Ok(true);
    }
    reporter.message(&format!(
        "baseline: training the found cell and {} random cells alike ({} to go)",
        config.baseline_random,
        trials.len()
    ));
    let specs: HashMap<u64, CellSpec> = trials.iter().map(|t| (t.id, t.spec.clone())).collect();
    train_all(trials, config.workers, executor, reporter, &mut |result, reward, reason| {
        let index = (result.id - BASELINE_IDS) as usize;
        let spec = specs[&result.id].clone();
        let hash = spec.canonical_hash().to_string();
        journal.append(&JournalEvent::Baseline {
            index,
            hash,
            spec: spec.clone(),
            reward,
            reason,
            seconds: result.seconds,
        })?;
        summary.baseline.insert(index, (spec, reward));
        let what = if index == 0 { "the found cell".to_string() } else { format!("random cell {index}") };
        Ok(match reward {
            Some(r) => format!("baseline: {what}: reward {r:.4}"),
            None => format!("baseline: {what} failed"),
        })
    })
}

/// Journals one training's result (its reward, or why it failed) and returns a line for the
/// reporter.
type Settle<'a> = dyn FnMut(&TrialResult, Option<f64>, Option<String>) -> Result<String, TrainError> + 'a;

/// Trains `trials`, `workers` at a time, handing each result (its reward, or why it failed)
/// to `settle`, which journals it and returns a line for the reporter. Returns false when
/// stopped.
fn train_all(
    mut trials: VecDeque<Trial>,
    workers: usize,
    executor: &mut dyn Executor,
    reporter: &mut dyn SearchReporter,
    settle: &mut Settle<'_>,
) -> Result<bool, TrainError> {
    let mut in_flight = 0;
    let mut stopped = false;
    loop {
        if !stopped {
            let n = trials.len().min(workers.saturating_sub(in_flight));
            if n > 0 {
                in_flight += n;
                executor.submit(trials.drain(..n).collect(), &mut |line| reporter.message(line))?;
            }
        }
        if in_flight == 0 {
            return Ok(!stopped);
        }
        let results = executor.wait(&mut |line| reporter.message(line))?;
        if results.is_empty() {
            return Err(TrainError::Config {
                field: "executor",
                message: format!("{} returned no result with {in_flight} trainings in flight", executor.name()),
            });
        }
        for result in results {
            in_flight -= 1;
            let (reward, reason) = match &result.outcome {
                Outcome::Trained { top1, .. } => (Some(*top1), None),
                Outcome::Failed { reason } => (None, Some(reason.clone())),
                Outcome::Interrupted => {
                    stopped = true;
                    continue;
                }
            };
            let line = settle(&result, reward, reason)?;
            reporter.message(&line);
        }
    }
}

/// The found cell trained again beside random cells of the space, all alike (`best.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The found cell's reward.
    pub found: f64,
    /// Each random cell's reward, in draw order (failed ones left out).
    pub random: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// Random cells the found cell beat (strictly).
    pub beaten: usize,
    /// The found cell's rank among all of them (1: none better).
    pub rank: usize,
    /// Random cells whose training failed.
    pub failed: usize,
}

impl Comparison {
    /// One sentence: "the found cell beat 4 of 5 random cells: 0.6100 vs median 0.4800".
    pub fn sentence(&self) -> String {
        let failed = if self.failed > 0 { format!(" ({} failed)", self.failed) } else { String::new() };
        format!(
            "the found cell beat {} of {} random cells{failed}: {:.4} vs median {:.4} (rank {} of {})",
            self.beaten,
            self.random.len(),
            self.found,
            self.median,
            self.rank,
            self.random.len() + 1
        )
    }
}

/// Writes `best.json` and `top.json` from the journal: the cells with their rewards, their
/// accuracy and their cost in the budget's target network (`mobile` without a budget).
pub fn write_best(dir: &Path, summary: &JournalSummary, config: &SearchConfig) -> Result<(), TrainError> {
    let budget = config.budget.clone().unwrap_or_else(|| Budget::on("mobile"));
    let costed = |spec: &CellSpec, reward: f64| match budget.cost(spec) {
        Ok(cost) => (Some(cost), budget.accuracy(reward, cost)),
        Err(_) => (None, reward),
    };
    let Some(best) = summary.found() else { return Ok(()) };
    let (cost, accuracy) = costed(&best.spec, best.reward);
    let best = BestCell {
        id: best.id,
        reward: best.reward,
        accuracy,
        retrain_reward: summary.retrained.get(&best.id).copied().flatten(),
        hash: best.hash.clone(),
        cell_spec: best.spec.clone(),
        cost,
        children_evaluated: summary.done(),
        vs_random: summary.comparison(),
    };
    write_json(&dir.join(files::BEST), &best)?;
    let cells = summary
        .top(config.top_k.max(1))
        .iter()
        .enumerate()
        .map(|(rank, s)| {
            let (cost, accuracy) = costed(&s.spec, s.reward);
            TopCell {
                rank: rank + 1,
                id: s.id,
                reward: s.reward,
                accuracy,
                cost,
                hash: s.hash.clone(),
                cell_spec: s.spec.clone(),
            }
        })
        .collect();
    Ok(write_json(&dir.join(files::TOP), &TopCells { cost_network: budget.target_net.clone(), cells })?)
}

/// `best.json`: the best cell of a search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestCell {
    /// Its child's proposal id.
    pub id: u64,
    /// Its reward in the search.
    pub reward: f64,
    /// Its validation accuracy in the search (the reward without a soft cost term).
    #[serde(default)]
    pub accuracy: f64,
    /// Its reward when trained again after the search (the best of those re-trained).
    pub retrain_reward: Option<f64>,
    /// The canonical hash of the cell.
    pub hash: String,
    /// The cell.
    pub cell_spec: CellSpec,
    /// Its cost in the budget's target network (`mobile` without a budget).
    #[serde(default)]
    pub cost: Option<CellCost>,
    /// Children evaluated when it was written.
    pub children_evaluated: usize,
    /// The found cell trained again beside random cells, when the search had a baseline.
    #[serde(default)]
    pub vs_random: Option<Comparison>,
}

impl JsonFile for BestCell {
    const VERSION: u64 = 1;
}

/// `top.json`: the best distinct cells, best first. Version 1 (the first with a version)
/// is an object; before it the file was a bare list of the same cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopCells {
    /// The network the costs are counted in.
    #[serde(default)]
    pub cost_network: String,
    /// The cells by rank.
    pub cells: Vec<TopCell>,
}

/// One cell of `top.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopCell {
    /// 1 for the best.
    pub rank: usize,
    /// Its child's proposal id.
    pub id: u64,
    /// Its reward.
    pub reward: f64,
    /// Its validation accuracy (the reward without a soft cost term).
    #[serde(default)]
    pub accuracy: f64,
    /// Its cost in [`TopCells::cost_network`].
    #[serde(default)]
    pub cost: Option<CellCost>,
    /// The canonical hash of the cell.
    pub hash: String,
    /// The cell.
    pub cell_spec: CellSpec,
}

impl JsonFile for TopCells {
    const VERSION: u64 = 1;
}

#[cfg(test)]
mod tests {
    use nas_controller::EvolutionConfig;

    use super::*;
    use crate::data::EvalSplit;

    /// The comparison counts strict wins, ranks ties in the found cell's favour, takes the
    /// median of an even count as the midpoint and leaves failed cells out.
    #[test]
    fn the_comparison_counts_wins_and_the_median() {
        let spec = CellSpec::nasnet_a();
        let mut summary = JournalSummary::default();
        assert_eq!(summary.comparison(), None);
        for (k, r) in [(0, Some(0.5)), (1, Some(0.4)), (2, Some(0.6)), (3, None), (4, Some(0.5)), (5, Some(0.3))] {
            summary.baseline.insert(k, (spec.clone(), r));
        }
        let c = summary.comparison().unwrap();
        assert_eq!(c.random, vec![0.4, 0.6, 0.5, 0.3]);
        assert_eq!((c.beaten, c.rank, c.failed), (2, 2, 1));
        assert!((c.median - 0.45).abs() < 1e-12);
        assert_eq!(
            c.sentence(),
            "the found cell beat 2 of 4 random cells (1 failed): 0.5000 vs median 0.4500 (rank 2 of 5)"
        );
        summary.baseline.insert(0, (spec, None));
        assert_eq!(summary.comparison(), None, "no comparison without the found cell's reward");
    }

    /// A child that trains in well under a second.
    pub(crate) fn tiny_child() -> Recipe {
        let mut r = Recipe::search_child();
        r.network.n = 1;
        r.network.num_conv_filters = 2;
        r.epochs = 1;
        r.max_steps = Some(2);
        r.batch_size = 16;
        r.eval = EvalSplit::Holdout { fraction: 0.25, seed: 0 };
        r.eval_batch_size = 16;
        r
    }

    fn config(strategy: StrategyConfig, children: usize) -> SearchConfig {
        SearchConfig {
            strategy,
            num_blocks: 5,
            children,
            workers: 2,
            child: tiny_child(),
            data: DataSource::Synthetic { seed: 1, train: 64, test: 8 },
            seed: 5,
            top_k: 3,
            retrain: None,
            baseline_random: 0,
            budget: None,
            device: "cpu".into(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nas-search-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// Raises the stop flag once `after` children are done.
    struct StopAfter(usize, Arc<AtomicBool>);

    impl SearchReporter for StopAfter {
        fn child(&mut self, _event: &JournalEvent, done: usize, _best: Option<&Scored>) {
            if done >= self.0 {
                self.1.store(true, Ordering::Relaxed);
            }
        }
    }

    fn results_by_id(events: &[JournalEvent]) -> BTreeMap<u64, usize> {
        let mut out = BTreeMap::new();
        for e in events {
            if let JournalEvent::Result { id, .. } | JournalEvent::Failed { id, .. } = e {
                *out.entry(*id).or_insert(0) += 1;
            }
        }
        out
    }

    /// A tiny evolution search writes a journal whose every proposal has one result, and a
    /// best.json holding the best re-trained of the top cells.
    #[test]
    fn a_tiny_search_writes_a_journal_and_the_best_cell() {
        let dir = temp_dir("e2e");
        let strategy =
            StrategyConfig::Evolution(EvolutionConfig { population_size: 3, sample_size: 2, failure_reward: None });
        let with_retrain =
            SearchConfig { retrain: Some(Retrain { top: 2, epochs: 2 }), baseline_random: 2, ..config(strategy, 6) };
        let outcome = search(&dir, &with_retrain, &mut LocalExecutor::threads(), None, &mut Silent2).unwrap();
        assert!(outcome.complete);
        let events = read_journal(&dir.join(files::JOURNAL)).unwrap();
        let results = results_by_id(&events);
        assert_eq!(results.len(), 6);
        assert!(results.values().all(|&n| n == 1));
        assert!(matches!(events.last(), Some(JournalEvent::End { .. })));
        // Evolution mutated tournament winners once the population of 3 was in.
        let summary = JournalSummary::of(&events);
        assert!(summary.failed.is_empty(), "{:?}", summary.failed);
        assert!(summary.proposals.values().filter(|p| p.parent.is_some()).count() >= 2);
        let best: BestCell = read_json(&dir.join(files::BEST)).unwrap();
        // With re-training, the best cell is the best re-trained one among the top 2 (not
        // necessarily the highest search reward: evolution's order of finishing, and so the
        // cells, varies from run to run).
        let retrained_max = summary.retrained.values().flatten().copied().fold(f64::MIN, f64::max);
        assert_eq!(best.retrain_reward, Some(retrained_max));
        let id = best.id;
        assert!(summary.top(2).iter().any(|s| s.id == id), "child {id} is not among the top 2");
        let reward = summary.results.iter().find(|r| r.id == id).map(|r| r.reward);
        assert_eq!(Some(best.reward), reward);
        best.cell_spec.validate().unwrap();
        let top: TopCells = read_json(&dir.join(files::TOP)).unwrap();
        assert_eq!(top.cells.iter().map(|c| c.rank).collect::<Vec<_>>(), (1..=top.cells.len()).collect::<Vec<_>>());
        assert_eq!(top.cells[0].id, summary.top(1)[0].id);
        // The baseline: the found cell again and 2 random cells, once each, before the end.
        let baseline: Vec<usize> = events
            .iter()
            .filter_map(|e| if let JournalEvent::Baseline { index, .. } = e { Some(*index) } else { None })
            .collect();
        let mut sorted = baseline.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert_eq!(summary.baseline[&0].0, best.cell_spec, "index 0 is the found cell");
        assert_ne!(summary.baseline[&1].0, summary.baseline[&2].0);
        let vs = best.vs_random.clone().expect("best.json compares with the random cells");
        assert_eq!((vs.random.len(), Some(vs.found)), (2, summary.baseline[&0].1));
        assert!(vs.sentence().starts_with(&format!("the found cell beat {} of 2 random cells", vs.beaten)));
        // Resuming a finished search trains nothing again.
        resume_search(&dir, None, &mut LocalExecutor::threads(), None, &mut Silent2).unwrap();
        let after = read_journal(&dir.join(files::JOURNAL)).unwrap();
        let count = |evs: &[JournalEvent]| evs.iter().filter(|e| matches!(e, JournalEvent::Baseline { .. })).count();
        assert_eq!(count(&after), 3);
        // Children keep their report but not their weights.
        let child = dir.join(files::CHILDREN).join("00000");
        assert!(child.join(run::files::REPORT).is_file());
        assert!(!child.join("checkpoint.json").exists());
        let again = search(&dir, &config(StrategyConfig::Random, 6), &mut LocalExecutor::threads(), None, &mut Silent2)
            .unwrap_err();
        assert!(again.to_string().contains("already holds a search"), "{again}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A search stopped after some children and resumed loses no finished child and trains
    /// none twice; the PPO controller's state comes back from its directory.
    #[test]
    fn a_stopped_search_resumes_without_training_a_child_twice() {
        let dir = temp_dir("resume");
        let stop = Arc::new(AtomicBool::new(false));
        let config = config("ppo".parse().unwrap(), 7);
        let outcome =
            search(&dir, &config, &mut LocalExecutor::threads(), Some(stop.clone()), &mut StopAfter(3, stop.clone()))
                .unwrap();
        assert!(!outcome.complete);
        let before = read_journal(&dir.join(files::JOURNAL)).unwrap();
        let finished: Vec<u64> = results_by_id(&before).into_keys().collect();
        assert!(finished.len() >= 3, "{finished:?}");

        let outcome = resume_search(&dir, None, &mut LocalExecutor::threads(), None, &mut Silent2).unwrap();
        assert!(outcome.complete);
        let after = read_journal(&dir.join(files::JOURNAL)).unwrap();
        assert_eq!(&after[..before.len()], &before[..], "the journal is only appended to");
        let results = results_by_id(&after);
        assert_eq!(results.len(), 7);
        assert!(results.values().all(|&n| n == 1), "{results:?}");
        for event in &after[before.len()..] {
            if let JournalEvent::Started { id, .. } = event {
                assert!(!finished.contains(id), "finished child {id} was started again");
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// With a hard limit on mult-adds, a search trains no cell over it: every proposal over
    /// it is journaled as rejected (with the penalty as the strategy's reward) and the budget
    /// of children is still spent on cells within it.
    #[test]
    fn a_search_never_trains_a_cell_over_its_budget() {
        let space = SearchSpace::with_blocks(5);
        let mut rng = nas_space::SpaceRng::new(9);
        let mut budget = Budget::on("mobile");
        let mut costs: Vec<u64> = (0..200).map(|_| budget.cost(&space.sample(&mut rng)).unwrap().mult_adds).collect();
        costs.sort();
        let limit = costs[costs.len() / 2];
        budget.max_mult_adds = Some(limit);
        budget.penalty = -0.5;
        budget.target_mult_adds = Some(limit / 2);
        let dir = temp_dir("budget");
        let limited = SearchConfig { budget: Some(budget.clone()), ..config(StrategyConfig::Random, 6) };
        let outcome = search(&dir, &limited, &mut LocalExecutor::threads(), None, &mut Silent2).unwrap();
        assert!(outcome.complete);
        let events = read_journal(&dir.join(files::JOURNAL)).unwrap();
        let summary = JournalSummary::of(&events);
        assert_eq!(summary.done(), 6);
        let cost = |id: &u64| budget.cost(&summary.proposals[id].spec).unwrap();
        for event in &events {
            match event {
                JournalEvent::Started { id, .. } => {
                    assert!(cost(id).mult_adds <= limit, "child {id} trained over budget")
                }
                // The strategy's reward is MnasNet's, from the child's accuracy and cost.
                JournalEvent::Result { id, reward, top1: Some(top1), .. } => {
                    assert!((reward - budget.reward(*top1, cost(id))).abs() < 1e-12, "child {id}: {reward} from {top1}")
                }
                JournalEvent::Rejected { id, reason, penalty } => {
                    assert!(cost(id).mult_adds > limit, "{reason}");
                    assert!(reason.contains("mult-adds over the limit") && reason.contains("mobile"), "{reason}");
                    assert_eq!(*penalty, -0.5);
                }
                _ => {}
            }
        }
        // Half the space is over the limit: 6 children are very unlikely to need no rejection.
        assert!(!summary.rejected.is_empty());
        // A limit no cell meets ends the search with an error naming the budget.
        let none = Budget { max_params: Some(1), ..Budget::on("mobile") };
        let dir2 = temp_dir("budget-none");
        let err = search(
            &dir2,
            &SearchConfig { budget: Some(none), ..config(StrategyConfig::Random, 1) },
            &mut LocalExecutor::threads(),
            None,
            &mut Silent2,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("budget") && err.contains("proposals over the budget"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&dir2).unwrap();
    }

    /// MnasNet's soft reward `acc × (m / T)^w`, and the hard limits' edges.
    #[test]
    fn the_soft_reward_is_mnasnets() {
        let cost = CellCost { mult_adds: 600_000_000, params: 5_000_000 };
        let mut budget = Budget::on("mobile");
        assert_eq!(budget.reward(0.75, cost), 0.75, "no target: the accuracy");
        budget.target_mult_adds = Some(300_000_000);
        // 0.75 × 2^−0.07 = 0.75 × 0.952638…
        assert!((budget.reward(0.75, cost) - 0.714_479).abs() < 1e-6, "{}", budget.reward(0.75, cost));
        assert!((budget.accuracy(budget.reward(0.75, cost), cost) - 0.75).abs() < 1e-12);
        budget.target_mult_adds = Some(600_000_000);
        assert!((budget.reward(0.75, cost) - 0.75).abs() < 1e-12);
        budget.target_mult_adds = Some(1_200_000_000);
        assert!(budget.reward(0.75, cost) > 0.75, "a cheaper cell than the target gains");
        budget.max_mult_adds = Some(600_000_000);
        budget.max_params = Some(5_000_000);
        assert_eq!(budget.over(cost), None, "a limit is inclusive");
        budget.max_params = Some(4_999_999);
        assert!(budget.over(cost).unwrap().contains("5000000 parameters over the limit of 4999999 in mobile"));
        let bad = Budget::on("tiny");
        assert!(bad.validate().unwrap_err().to_string().contains("target_net"));
    }

    #[test]
    fn a_torn_last_journal_line_is_ignored_and_others_are_named() {
        let dir = temp_dir("journal");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(files::JOURNAL);
        let start = serde_json::to_string(&JournalEvent::Start {
            time: 1,
            strategy: "ppo".into(),
            resumed: false,
            settings: None,
        })
        .unwrap();
        fs::write(&path, format!("{start}\n{{\"event\":\"resu")).unwrap();
        assert_eq!(read_journal(&path).unwrap().len(), 1);
        // Appending after a torn line first cuts the fragment off; after a whole last event
        // without its newline, first ends its line: either way every line reads.
        let event = JournalEvent::Started { id: 3, time: 2 };
        fs::write(&path, format!("{start}\n{{\"event\":\"resu")).unwrap();
        Journal::open(path.clone()).unwrap().append(&event).unwrap();
        assert_eq!(read_journal(&path).unwrap().len(), 2);
        fs::write(&path, format!("{start}\n{}", json_line(&event).trim_end())).unwrap();
        Journal::open(path.clone()).unwrap().append(&event).unwrap();
        assert_eq!(read_journal(&path).unwrap().len(), 3);
        fs::write(&path, format!("{{\"event\":\"resu\n{start}\n")).unwrap();
        let err = read_journal(&path).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains(files::JOURNAL), "{err}");
        // Lines without a version (older journals) and with one read alike; a line of an
        // unknown version is refused, even the last.
        let event = JournalEvent::Started { id: 3, time: 2 };
        fs::write(&path, format!("{start}\n{}", json_line(&event))).unwrap();
        assert_eq!(read_journal(&path).unwrap()[1], event);
        let newer = json_line(&event).replace("\"version\":1", "\"version\":2");
        fs::write(&path, format!("{start}\n{newer}")).unwrap();
        let err = read_journal(&path).unwrap_err().to_string();
        assert!(err.contains("journal.jsonl: format version 2 is not supported (this build reads version 1)"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The files of a search directory written before they had a version still read (a
    /// missing version is version 1), and a newer version is refused, naming the file.
    #[test]
    fn search_files_without_a_version_read_and_newer_ones_are_refused() {
        let dir = temp_dir("versions");
        fs::create_dir_all(&dir).unwrap();
        let config = config(StrategyConfig::Random, 4);
        let path = dir.join(files::CONFIG);
        fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        assert_eq!(read_search_config(&dir).unwrap(), config);
        write_json(&path, &config).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\n  \"version\": 1,\n  \"strategy\""), "{text}");
        assert_eq!(read_search_config(&dir).unwrap(), config);
        fs::write(&path, text.replace("\"version\": 1", "\"version\": 2")).unwrap();
        let err = read_search_config(&dir).unwrap_err().to_string();
        assert!(err.contains("search.json: format version 2 is not supported (this build reads version 1)"), "{err}");

        let result = TrialResult { id: 4, outcome: Outcome::Failed { reason: "nan".into() }, seconds: 1.5 };
        let path = dir.join(crate::executor::worker_files::RESULT);
        fs::write(&path, serde_json::to_string(&result).unwrap()).unwrap();
        assert_eq!(read_json::<TrialResult>(&path).unwrap(), result);
        let best = BestCell {
            id: 2,
            reward: 0.5,
            retrain_reward: None,
            hash: CellSpec::nasnet_a().canonical_hash().to_string(),
            cell_spec: CellSpec::nasnet_a(),
            children_evaluated: 4,
            vs_random: None,
            accuracy: 0.5,
            cost: None,
        };
        let path = dir.join(files::BEST);
        fs::write(&path, serde_json::to_string(&best).unwrap()).unwrap();
        assert_eq!(read_json::<BestCell>(&path).unwrap(), best);
        fs::remove_dir_all(&dir).unwrap();
    }

    struct Silent2;
    impl SearchReporter for Silent2 {}
}
