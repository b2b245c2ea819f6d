//! One training run in its own directory: the epoch loop that the search children, `nas train`
//! and the ImageNet transfer all use.
//!
//! # The run directory
//!
//! ```text
//! run.json                    the RunConfig (cell, recipe, data, seed): `--resume` needs nothing else
//! split.json                  the held-out validation indices, when the recipe holds some out
//! classes.json                the class names, by label (ClassNames)
//! metrics.jsonl               one JSON object per line: {"version":1,"kind":"train",…} every
//!                             `log_every_steps` steps, {"version":1,"kind":"eval",…} per
//!                             evaluation (MetricsLine); flushed line by line
//! checkpoint.json, checkpoint-<step>.safetensors
//!                             the latest checkpoint (see `crate::checkpoint`): at the recipe's
//!                             epoch and minute intervals, when stopped, and at the end
//! report.json, report.md      the final report (RunReport)
//! nan-diagnostic.json, nan-checkpoint/
//!                             only when the loss became NaN or infinite: the step, the batch,
//!                             the recent metrics, and the weights just before that step
//! ```
//!
//! Each JSON file (and each line of `metrics.jsonl`) carries a format version, written and
//! checked by `nas_space::files`; files and lines written before they had one read as version 1.
//!
//! # Invariants
//! - A resumed run continues at the checkpoint's step with the same data order and
//!   augmentation (the epoch and the position in it are in the checkpoint), so a run killed and
//!   resumed computes what it would have computed straight; `metrics.jsonl` is cut back to the
//!   checkpoint's step so no line is counted twice.
//! - Nothing a previous run wrote is overwritten by a fresh run: a directory that holds a
//!   `run.json` must be resumed or changed.
//! - Settings whose estimated memory exceeds what the machine has are refused before any
//!   allocation (the estimate is in the error); `force_memory` overrides.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use nas_space::cost::network_cost;
use nas_space::files::{json_line, parse_json, read_json, write_atomic, write_json, JsonFile};
use nas_space::{CellSpec, NetworkConfig, Stem};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{has_checkpoint, read_checkpoint_state};
use crate::data::{check_source, DataSource, RunData};
use crate::eval::EvalMetrics;
use crate::recipe::Recipe;
use crate::trainer::{StepMetrics, Trainer};
use crate::TrainError;

/// File names inside a run directory.
pub mod files {
    /// The run's configuration.
    pub const CONFIG: &str = "run.json";
    /// The held-out split.
    pub const SPLIT: &str = "split.json";
    /// The class names, by label (for `nas predict`).
    pub const CLASSES: &str = "classes.json";
    /// Metrics, one JSON object per line.
    pub const METRICS: &str = "metrics.jsonl";
    /// The final report (JSON).
    pub const REPORT: &str = "report.json";
    /// The final report (Markdown).
    pub const REPORT_MD: &str = "report.md";
    /// What was known when the loss became non-finite.
    pub const NAN_DIAGNOSTIC: &str = "nan-diagnostic.json";
    /// The weights just before the non-finite step.
    pub const NAN_CHECKPOINT: &str = "nan-checkpoint";
}

/// What to train: a cell, a recipe, a data set and a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The cells.
    pub cell_spec: CellSpec,
    /// How to train.
    pub recipe: Recipe,
    /// On what.
    pub data: DataSource,
    /// Seed of the initialisation, the masks and the data order.
    pub seed: u64,
    /// Start from these weights (one of our run directories, or a safetensors file such as
    /// timm's NASNet-A) instead of a fresh initialisation; the classifier and the aux head
    /// are replaced when their shapes differ (see [`crate::init`]).
    #[serde(default)]
    pub init: Option<PathBuf>,
}

impl JsonFile for RunConfig {
    const VERSION: u64 = 1;
}

/// How to run (not recorded: a resumed run may change these).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Start even when the memory estimate exceeds the available memory.
    pub force_memory: bool,
    /// Set from elsewhere (Ctrl-C, a search shutting down): the run checkpoints and returns
    /// [`TrainError::Interrupted`].
    pub stop: Option<Arc<AtomicBool>>,
    /// Where the network and the batches live (checkpoints are device-independent, so a run
    /// may resume on another device).
    pub device: Device,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions { force_memory: false, stop: None, device: Device::Cpu }
    }
}

/// What the loop tells whoever watches it (a progress bar, log lines, nothing).
pub trait Reporter {
    /// The run starts (or resumes) at `start_step` of `total_steps`.
    fn start(&mut self, _info: &RunStart) {}
    /// A `train` metrics line was written.
    fn train(&mut self, _line: &TrainLine) {}
    /// An evaluation finished.
    fn eval(&mut self, _line: &EvalLine) {}
    /// Something worth a line in a log.
    fn message(&mut self, _text: &str) {}
    /// The run is over (successfully or not).
    fn finish(&mut self) {}
}

/// A reporter that says nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl Reporter for Silent {}

/// A reporter that writes plain lines to standard error (for logs, pipes and batch jobs).
#[derive(Debug, Default)]
pub struct LogLines;

impl Reporter for LogLines {
    fn start(&mut self, info: &RunStart) {
        eprintln!(
            "training {} params, {} steps ({} per epoch){}",
            info.params,
            info.total_steps,
            info.steps_per_epoch,
            if info.start_step > 0 { format!(", resuming at step {}", info.start_step) } else { String::new() }
        );
    }
    fn train(&mut self, l: &TrainLine) {
        eprintln!(
            "step {}/{} epoch {} loss {:.4} top1 {:.3} lr {:.5} {:.1} img/s",
            l.step, l.total_steps, l.epoch, l.loss, l.top1, l.lr, l.images_per_s
        );
    }
    fn eval(&mut self, l: &EvalLine) {
        eprintln!(
            "eval step {} epoch {} {}: loss {:.4} top1 {:.4} top5 {:.4} ({} images)",
            l.step, l.epoch, l.split, l.metrics.loss, l.metrics.top1, l.metrics.top5, l.metrics.images
        );
    }
    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// What a reporter learns when a run starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStart {
    /// The run directory.
    pub dir: PathBuf,
    /// Trainable parameters.
    pub params: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Steps already done (resume).
    pub start_step: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// Images per step.
    pub batch_size: usize,
}

/// One `train` line of `metrics.jsonl`: the mean over the steps since the previous line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLine {
    /// Step after the update.
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// The epoch the step belongs to (0-based).
    pub epoch: u64,
    /// Mean training loss.
    pub loss: f64,
    /// Mean training top-1 accuracy.
    pub top1: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Mean global gradient norm.
    pub grad_norm: f64,
    /// Training throughput.
    pub images_per_s: f64,
    /// Seconds since this process started the run.
    pub elapsed_s: f64,
}

/// One `eval` line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLine {
    /// Step at which the weights were evaluated.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// "validation" or "test".
    pub split: String,
    /// What was measured.
    #[serde(flatten)]
    pub metrics: EvalMetrics,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// One line of `metrics.jsonl`, tagged by its `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    /// Every `log_every_steps` steps.
    Train(TrainLine),
    /// Every evaluation.
    Eval(EvalLine),
}

impl JsonFile for MetricsLine {
    const VERSION: u64 = 1;
}

/// `classes.json`: the class names, by label (for `nas predict`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassNames {
    /// Name of class 0, 1, ….
    pub classes: Vec<String>,
}

impl JsonFile for ClassNames {
    const VERSION: u64 = 1;
}

/// `nan-diagnostic.json`: what was known when the loss stopped being finite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NanDiagnostic {
    /// The step whose loss was not finite.
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Its batch within the epoch.
    pub batch_in_epoch: u64,
    /// The loss, as text (`NaN`, `inf`).
    pub loss: String,
    /// The learning rate of the step.
    pub lr: f64,
    /// The items of the batch.
    pub batch_indices: Vec<usize>,
    /// The metrics of the steps before it (up to 20).
    pub recent_steps: Vec<StepMetrics>,
    /// The checkpoint of the weights before the step, in the run directory.
    pub checkpoint: String,
    /// What the files mean.
    pub explanation: String,
}

impl JsonFile for NanDiagnostic {
    const VERSION: u64 = 1;
}

/// What a run keeps in its checkpoint's `metrics`: where in the epoch it stopped.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Progress {
    /// Batches of the epoch already trained.
    #[serde(default)]
    batch_in_epoch: u64,
}

/// What a finished run reports (also `report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run directory.
    pub dir: PathBuf,
    /// Steps trained.
    pub steps: u64,
    /// Epochs trained (fractional when `max_steps` cut the last one).
    pub epochs: f64,
    /// The last evaluation (at the end of training).
    pub final_eval: EvalLine,
    /// The evaluation with the highest top-1.
    pub best_eval: EvalLine,
    /// Mean training loss of the last logged steps.
    pub last_train_loss: Option<f64>,
    /// Trainable parameters.
    pub params: u64,
    /// Multiply-adds of one image's forward pass.
    pub mult_adds: u64,
    /// Seconds of training in this process (a resumed run counts from its resumption).
    pub train_seconds: f64,
    /// Mean training throughput in this process.
    pub images_per_s: f64,
}

impl JsonFile for RunReport {
    const VERSION: u64 = 1;
}

/// An estimate of a run's peak memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Weights, gradients and optimiser buffers.
    pub weights_bytes: u64,
    /// Activations kept for the backward pass, and their gradients.
    pub activation_bytes: u64,
}

impl MemoryEstimate {
    /// Elements of activation memory per element of cell output, calibrated on this code
    /// (`nas bench`, with the fused separable convs and batch norms): NASNet-A Mobile at 224, batch
    /// 32, peaks at 2.75–2.77 GiB resident, which a factor of 10.3 would match exactly; 11
    /// keeps about 7 % of margin (the estimate refuses settings, so it errs high). The small
    /// benchmark network (N = 2, 32×32, batch 64) peaks at 61–63 MiB, mostly the fixed
    /// overhead, and is estimated at 94 MiB. (Before those fusions it was 17, for peaks of 4.5
    /// GiB and 107 MiB.)
    pub const ACTIVATION_FACTOR: f64 = 11.0;
    /// Fixed overhead of the process (code, allocator, data pipeline).
    pub const BASE_BYTES: u64 = 48 << 20;

    /// The estimate for training `network` around `spec` at `batch` images per step.
    pub fn of(spec: &CellSpec, network: &NetworkConfig, batch: usize, ema: bool) -> Result<MemoryEstimate, TrainError> {
        let plan =
            network.plan(spec).map_err(|err| TrainError::Config { field: "network", message: err.to_string() })?;
        let cost = network_cost(spec, network)
            .map_err(|err| TrainError::Config { field: "network", message: err.to_string() })?;
        let elements: u64 = plan.outputs.iter().map(|o| (o.channels * o.size * o.size) as u64).sum();
        let activation_bytes = (elements as f64 * batch as f64 * 4.0 * Self::ACTIVATION_FACTOR) as u64;
        // weights, gradients, two optimiser buffers at most, the average.
        let copies = 4 + u64::from(ema);
        let weights_bytes = cost.network.params_total() * 4 * copies + Self::BASE_BYTES;
        Ok(MemoryEstimate { weights_bytes, activation_bytes })
    }

    /// The total.
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes + self.activation_bytes
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (Linux); `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Reads the `run.json` of `dir`.
pub fn read_run_config(dir: &Path) -> Result<RunConfig, TrainError> {
    Ok(read_json(&dir.join(files::CONFIG))?)
}

/// Reads the `report.json` of `dir`.
pub fn read_report(dir: &Path) -> Result<RunReport, TrainError> {
    Ok(read_json(&dir.join(files::REPORT))?)
}

/// Reads the `classes.json` of `dir`. A bare list of names (written before the file had a
/// version) reads as well.
pub fn read_class_names(dir: &Path) -> Result<Vec<String>, TrainError> {
    let path = dir.join(files::CLASSES);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    match serde_json::from_str::<Vec<String>>(&text) {
        Ok(bare) => Ok(bare),
        Err(_) => Ok(parse_json::<ClassNames>(&path, &text)?.classes),
    }
}

/// The network a run builds: the recipe's skeleton with the data's classes and image size.
pub fn run_network(config: &RunConfig, num_classes: usize) -> NetworkConfig {
    let mut network = config.recipe.network.clone();
    network.num_classes = num_classes;
    if config.data.is_small() {
        network.image_size = 32;
    }
    network
}

/// Starts a fresh run of `config` in `dir` (created if needed). A directory that already holds
/// a run is refused: resume it with [`resume`] or choose another.
pub fn train(
    dir: &Path,
    config: &RunConfig,
    options: &RunOptions,
    reporter: &mut dyn Reporter,
) -> Result<RunReport, TrainError> {
    if dir.join(files::CONFIG).exists() || has_checkpoint(dir) {
        return Err(TrainError::Config {
            field: "out",
            message: format!("{} already holds a run; resume it (--resume) or choose another directory", dir.display()),
        });
    }
    config.recipe.validate()?;
    check_source(&config.data)?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_json(&dir.join(files::CONFIG), config)?;
    run(dir, config, options, reporter)
}

/// Continues the run in `dir` from its checkpoint (or from the start when it stopped before
/// the first one), with the configuration recorded in its `run.json`.
pub fn resume(dir: &Path, options: &RunOptions, reporter: &mut dyn Reporter) -> Result<RunReport, TrainError> {
    let config = read_run_config(dir)?;
    run(dir, &config, options, reporter)
}

struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log for appending, first cutting away every line past `keep_through_step`
    /// (and a line cut short by a kill).
    fn open(path: PathBuf, keep_through_step: u64) -> Result<MetricsLog, TrainError> {
        if path.exists() {
            let text = fs::read_to_string(&path).map_err(io_err(&path))?;
            let mut kept = String::new();
            let mut dropped = false;
            for line in text.lines() {
                match parse_json::<MetricsLine>(&path, line) {
                    Ok(MetricsLine::Train(TrainLine { step, .. }) | MetricsLine::Eval(EvalLine { step, .. }))
                        if step <= keep_through_step =>
                    {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                    _ => dropped = true,
                }
            }
            if dropped {
                write_atomic(&path, &kept)?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        Ok(MetricsLog { path, file })
    }

    fn write(&mut self, line: &MetricsLine) -> Result<(), TrainError> {
        self.file.write_all(json_line(line).as_bytes()).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}

/// Running means between two `train` lines.
#[derive(Default)]
struct Window {
    steps: u64,
    images: u64,
    loss: f64,
    top1: f64,
    grad_norm: f64,
    started: Option<Instant>,
}

impl Window {
    fn add(&mut self, m: &StepMetrics, images: usize) {
        self.steps += 1;
        self.images += images as u64;
        self.loss += m.loss;
        self.top1 += m.top1;
        self.grad_norm += m.grad_norm;
    }
}

fn run(
    dir: &Path,
    config: &RunConfig,
    options: &RunOptions,
    reporter: &mut dyn Reporter,
) -> Result<RunReport, TrainError> {
    let result = run_inner(dir, config, options, reporter);
    if let Err(err) = &result {
        reporter.message(&format!("run {} stopped: {err}", dir.display()));
    }
    reporter.finish();
    result
}

fn run_inner(
    dir: &Path,
    config: &RunConfig,
    options: &RunOptions,
    reporter: &mut dyn Reporter,
) -> Result<RunReport, TrainError> {
    let recipe = &config.recipe;
    recipe.validate()?;
    let image_size = recipe.network.image_size as u32;
    let data = RunData::open(&config.data, recipe.eval, recipe.augment, recipe.cutout, image_size)?;
    if let Some(split) = &data.split {
        let path = dir.join(files::SPLIT);
        if !path.exists() {
            split.save(&path)?;
        }
    }
    write_json(&dir.join(files::CLASSES), &ClassNames { classes: data.class_names.clone() })?;
    let network = run_network(config, data.num_classes());
    if recipe.network.stem == Stem::Cifar && !config.data.is_small() {
        reporter.message("note: the CIFAR skeleton on ImageNet-sized images (no stride in the stem)");
    }
    let cost = network_cost(&config.cell_spec, &network)
        .map_err(|err| TrainError::Config { field: "network", message: err.to_string() })?;

    let estimate = MemoryEstimate::of(&config.cell_spec, &network, recipe.batch_size, recipe.ema_decay.is_some())?;
    // The estimate is of this machine's memory; a GPU's is not checked up front.
    if let Some(available) = available_memory().filter(|_| options.device.is_cpu()) {
        if estimate.total_bytes() > available && !options.force_memory {
            return Err(TrainError::Memory {
                estimate: gib(estimate.total_bytes()),
                available: gib(available),
                detail: format!(
                    "weights and optimiser {}, activations {} at batch {}",
                    gib(estimate.weights_bytes),
                    gib(estimate.activation_bytes),
                    recipe.batch_size
                ),
            });
        }
    }

    let data_seed = config.seed.wrapping_add(0x5EED);
    let train_batches = data.train_batcher(recipe.batch_size, data_seed, &options.device)?;
    let eval_batches = data.eval_batcher(recipe.eval_batch_size, &options.device)?;
    let steps_per_epoch = train_batches.batches_per_epoch() as u64;
    let total_steps = recipe.max_steps.unwrap_or(recipe.epochs * steps_per_epoch).max(1);
    let train_config = recipe.train_config(total_steps, steps_per_epoch, config.seed);

    let (mut trainer, mut epoch, mut offset) = if has_checkpoint(dir) {
        let saved = read_checkpoint_state(dir)?;
        if saved.network != network || saved.cell_spec != config.cell_spec {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("was saved for another network or cell than {} describes", files::CONFIG),
            });
        }
        let (trainer, state) = Trainer::resume_on(dir, &options.device)?;
        if trainer.config() != &train_config {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("its training settings differ from what {} gives now", files::CONFIG),
            });
        }
        let progress: Progress = serde_json::from_value(state.metrics).unwrap_or_default();
        (trainer, state.epoch, progress.batch_in_epoch)
    } else {
        let trainer = Trainer::new_on(&config.cell_spec, &network, train_config, &options.device)?;
        if recipe.classifier_init == crate::recipe::ClassifierInit::FanIn {
            nas_ops::init::rescale_classifiers_fan_in(trainer.varmap())?;
        }
        if let Some(source) = &config.init {
            let report = crate::init::init_from(trainer.varmap(), source)?;
            reporter.message(&format!("initialised from {}: {report}", source.display()));
        }
        (trainer, 0, 0)
    };
    let mut log = MetricsLog::open(dir.join(files::METRICS), trainer.step())?;
    let start_step = trainer.step();
    reporter.start(&RunStart {
        dir: dir.to_path_buf(),
        params: cost.network.params_trainable,
        total_steps,
        start_step,
        steps_per_epoch,
        batch_size: recipe.batch_size,
    });

    let progress = |offset: u64| serde_json::to_value(Progress { batch_in_epoch: offset }).expect("plain fields");
    let save = |trainer: &Trainer, epoch: u64, offset: u64| {
        trainer.save_checkpoint(dir, &config.cell_spec, &network, epoch, data_seed, progress(offset))
    };
    let started = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut window = Window { started: Some(Instant::now()), ..Window::default() };
    let mut last_loss = None;
    let mut images_trained = 0u64;
    let mut recent: Vec<StepMetrics> = Vec::new();
    let evaluate = |trainer: &mut Trainer, epoch: u64, log: &mut MetricsLog, reporter: &mut dyn Reporter| {
        let t = Instant::now();
        let metrics = trainer.evaluate(eval_batches.epoch(0))?;
        let line = EvalLine {
            step: trainer.step(),
            epoch,
            split: data.eval_name.to_string(),
            metrics,
            seconds: t.elapsed().as_secs_f64(),
        };
        log.write(&MetricsLine::Eval(line.clone()))?;
        reporter.eval(&line);
        Ok::<EvalLine, TrainError>(line)
    };

    while trainer.step() < total_steps {
        let mut batches = train_batches.epoch_from(epoch, offset as usize);
        for batch in batches.by_ref() {
            let batch = batch?;
            let step_metrics = match crate::on_pool(|| trainer.train_step(&batch)) {
                Ok(m) => m,
                Err(TrainError::NonFinite { step, loss }) => {
                    let path = dir.join(files::NAN_DIAGNOSTIC);
                    let diagnostic = NanDiagnostic {
                        step,
                        epoch,
                        batch_in_epoch: offset,
                        loss: loss.to_string(),
                        lr: trainer.config().schedule.lr(step),
                        batch_indices: batch.indices.clone(),
                        recent_steps: recent.clone(),
                        checkpoint: files::NAN_CHECKPOINT.into(),
                        explanation: "the loss of this batch was not finite; the weights in the checkpoint are those \
                                      just before the step (never updated with it)"
                            .into(),
                    };
                    write_json(&path, &diagnostic)?;
                    trainer.save_checkpoint(
                        &dir.join(files::NAN_CHECKPOINT),
                        &config.cell_spec,
                        &network,
                        epoch,
                        data_seed,
                        progress(offset),
                    )?;
                    return Err(TrainError::Diverged { step, loss, diagnostic: path });
                }
                Err(err) => return Err(err),
            };
            offset += 1;
            images_trained += batch.indices.len() as u64;
            window.add(&step_metrics, batch.indices.len());
            recent.push(step_metrics);
            if recent.len() > 20 {
                recent.remove(0);
            }
            let step = trainer.step();
            if step % recipe.log_every_steps == 0 || step == total_steps {
                let seconds = window.started.map_or(0.0, |t| t.elapsed().as_secs_f64()).max(1e-9);
                let n = window.steps as f64;
                let line = TrainLine {
                    step,
                    total_steps,
                    epoch,
                    loss: window.loss / n,
                    top1: window.top1 / n,
                    lr: step_metrics.lr,
                    grad_norm: window.grad_norm / n,
                    images_per_s: window.images as f64 / seconds,
                    elapsed_s: started.elapsed().as_secs_f64(),
                };
                last_loss = Some(line.loss);
                log.write(&MetricsLine::Train(line.clone()))?;
                reporter.train(&line);
                window = Window { started: Some(Instant::now()), ..Window::default() };
            }
            if step == total_steps {
                break;
            }
            let stop = options.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
            let due =
                recipe.checkpoint_every_minutes.is_some_and(|m| last_checkpoint.elapsed().as_secs_f64() >= m * 60.0);
            if stop || due {
                save(&trainer, epoch, offset)?;
                last_checkpoint = Instant::now();
                if stop {
                    reporter.message(&format!("stopped at step {step}; checkpoint saved in {}", dir.display()));
                    return Err(TrainError::Interrupted { step, dir: dir.to_path_buf() });
                }
            }
        }
        if trainer.step() == total_steps && offset < steps_per_epoch {
            break; // max_steps ended the run mid-epoch
        }
        let summary = batches.finish()?;
        if summary.skipped > 0 {
            reporter.message(&summary.to_string());
        }
        epoch += 1;
        offset = 0;
        if trainer.step() == total_steps {
            break;
        }
        if recipe.eval_every_epochs > 0 && epoch % recipe.eval_every_epochs == 0 {
            evaluate(&mut trainer, epoch, &mut log, reporter)?;
        }
        if recipe.checkpoint_every_epochs > 0 && epoch % recipe.checkpoint_every_epochs == 0 {
            save(&trainer, epoch, offset)?;
            last_checkpoint = Instant::now();
        }
    }
    let final_eval = evaluate(&mut trainer, epoch, &mut log, reporter)?;
    save(&trainer, epoch, offset)?;
    // Every evaluation of the run, this process's and earlier ones', is in metrics.jsonl.
    let best_eval = read_metrics(dir)?.1.into_iter().fold(final_eval.clone(), |best, e| {
        if e.metrics.top1 > best.metrics.top1 {
            e
        } else {
            best
        }
    });
    let train_seconds = started.elapsed().as_secs_f64();
    let report = RunReport {
        dir: dir.to_path_buf(),
        steps: trainer.step(),
        epochs: trainer.step() as f64 / steps_per_epoch.max(1) as f64,
        final_eval,
        best_eval,
        last_train_loss: last_loss,
        params: cost.network.params_trainable,
        mult_adds: cost.network.mult_adds,
        train_seconds,
        images_per_s: images_trained as f64 / train_seconds.max(1e-9),
    };
    write_json(&dir.join(files::REPORT), &report)?;
    write_atomic(&dir.join(files::REPORT_MD), report_markdown(config, &network, &report))?;
    Ok(report)
}

/// Reads every line of a run's `metrics.jsonl` (for plots and reports).
pub fn read_metrics(dir: &Path) -> Result<(Vec<TrainLine>, Vec<EvalLine>), TrainError> {
    let path = dir.join(files::METRICS);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (k, line) in text.lines().enumerate() {
        match parse_json(&path, line).map_err(|err| err.at_line(k + 1))? {
            MetricsLine::Train(line) => train.push(line),
            MetricsLine::Eval(line) => eval.push(line),
        }
    }
    Ok((train, eval))
}

fn report_markdown(config: &RunConfig, network: &NetworkConfig, r: &RunReport) -> String {
    let m = &r.final_eval.metrics;
    format!(
        "# Training report\n\n\
         - cell: `{}`\n- network: {:?} skeleton, N = {}, F = {}, {} classes, {}×{} input\n- recipe: {} ({} steps, {:.2} epochs)\n\
         - data: {}\n- parameters: {}\n- mult-adds: {}\n\n\
         | split | top-1 | top-5 | loss | images |\n|---|---|---|---|---|\n\
         | {} (final, step {}) | {:.4} | {:.4} | {:.4} | {} |\n| {} (best, step {}) | {:.4} | {:.4} | {:.4} | {} |\n\n\
         Trained {:.1} s in this process, {:.1} images/s.\n",
        config.cell_spec.canonical_hash(),
        network.stem,
        network.n,
        network.num_conv_filters,
        network.num_classes,
        network.image_size,
        network.image_size,
        config.recipe.name,
        r.steps,
        r.epochs,
        config.data,
        r.params,
        r.mult_adds,
        r.final_eval.split,
        r.final_eval.step,
        m.top1,
        m.top5,
        m.loss,
        m.images,
        r.best_eval.split,
        r.best_eval.step,
        r.best_eval.metrics.top1,
        r.best_eval.metrics.top5,
        r.best_eval.metrics.loss,
        r.best_eval.metrics.images,
        r.train_seconds,
        r.images_per_s,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Augment, EvalSplit};

    fn tiny(steps: u64) -> RunConfig {
        let mut recipe = Recipe::search_child();
        recipe.network.n = 1;
        recipe.network.num_conv_filters = 4;
        recipe.network.drop_path_keep_prob = 0.8;
        recipe.epochs = 3;
        recipe.max_steps = Some(steps);
        recipe.batch_size = 16;
        recipe.lr = 0.05;
        recipe.augment = Augment::Search;
        recipe.eval = EvalSplit::Holdout { fraction: 0.2, seed: 1 };
        recipe.eval_every_epochs = 1;
        recipe.eval_batch_size = 32;
        recipe.log_every_steps = 1;
        recipe.checkpoint_every_epochs = 1;
        RunConfig {
            cell_spec: CellSpec::nasnet_a(),
            recipe,
            data: DataSource::Synthetic { seed: 2, train: 80, test: 16 },
            seed: 3,
            init: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nas-train-run-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
        let state = read_checkpoint_state(dir).unwrap();
        let (trainer, _) = Trainer::resume(dir).unwrap();
        assert_eq!(trainer.step(), state.step);
        let data = trainer.varmap().data().lock().unwrap();
        let mut out: Vec<(String, Vec<f32>)> =
            data.iter().map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A reporter that raises the stop flag after a given step.
    struct StopAt(u64, Arc<AtomicBool>);

    impl Reporter for StopAt {
        fn train(&mut self, line: &TrainLine) {
            if line.step == self.0 {
                self.1.store(true, Ordering::Relaxed);
            }
        }
    }

    /// A run writes its directory; a run stopped mid-epoch and resumed ends with the same
    /// weights, metrics and report as the run done straight.
    #[test]
    fn a_stopped_and_resumed_run_equals_a_straight_run() {
        let config = tiny(9); // 4 steps per epoch: the stop at 6 is mid-epoch
        let straight = temp_dir("straight");
        let report = train(&straight, &config, &RunOptions::default(), &mut Silent).unwrap();
        assert_eq!(
            (report.steps, report.final_eval.split.as_str(), report.final_eval.metrics.images),
            (9, "validation", 16)
        );
        for file in [files::CONFIG, files::SPLIT, files::METRICS, files::REPORT, files::REPORT_MD, "checkpoint.json"] {
            assert!(straight.join(file).is_file(), "{file} missing");
        }
        let (train_lines, eval_lines) = read_metrics(&straight).unwrap();
        assert_eq!(train_lines.iter().map(|l| l.step).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
        // Two epoch-end evaluations and the final one.
        assert_eq!(eval_lines.iter().map(|l| l.step).collect::<Vec<_>>(), [4, 8, 9]);
        assert!(train_lines.iter().all(|l| l.loss.is_finite() && l.images_per_s > 0.0));

        let stopped = temp_dir("stopped");
        let stop = Arc::new(AtomicBool::new(false));
        let options = RunOptions { stop: Some(stop.clone()), ..RunOptions::default() };
        let err = train(&stopped, &config, &options, &mut StopAt(6, stop.clone())).unwrap_err();
        assert!(matches!(err, TrainError::Interrupted { step: 6, .. }), "{err}");
        // A fresh run into the same directory is refused rather than overwriting it.
        let err = train(&stopped, &config, &RunOptions::default(), &mut Silent).unwrap_err();
        assert!(err.to_string().contains("already holds a run"), "{err}");
        let resumed = resume(&stopped, &RunOptions::default(), &mut Silent).unwrap();
        assert_eq!(resumed.steps, 9);
        assert_eq!(resumed.final_eval.metrics, report.final_eval.metrics);
        assert_eq!(weights(&straight), weights(&stopped));
        let (lines, evals) = read_metrics(&stopped).unwrap();
        let strip = |l: &TrainLine| (l.step, l.loss, l.top1, l.lr, l.grad_norm);
        assert_eq!(lines.iter().map(strip).collect::<Vec<_>>(), train_lines.iter().map(strip).collect::<Vec<_>>());
        assert_eq!(
            evals.iter().map(|e| e.metrics).collect::<Vec<_>>(),
            eval_lines.iter().map(|e| e.metrics).collect::<Vec<_>>()
        );
        fs::remove_dir_all(&straight).unwrap();
        fs::remove_dir_all(&stopped).unwrap();
    }

    /// A diverging run stops with an error naming its diagnostic, which holds the step and
    /// the batch, and a checkpoint of the weights before that step.
    #[test]
    fn a_non_finite_loss_stops_the_run_with_a_diagnostic() {
        let mut config = tiny(12);
        config.recipe.lr = 1e30;
        config.recipe.optim.clip_global_norm = None;
        let dir = temp_dir("nan");
        let err = train(&dir, &config, &RunOptions::default(), &mut Silent).unwrap_err();
        let TrainError::Diverged { step, diagnostic, .. } = &err else { panic!("expected divergence, got {err}") };
        assert!(err.to_string().contains(files::NAN_DIAGNOSTIC), "{err}");
        let d: NanDiagnostic = read_json(diagnostic).unwrap();
        assert_eq!((d.step, d.batch_indices.len(), d.checkpoint.as_str()), (*step, 16, files::NAN_CHECKPOINT));
        assert!(d.loss == "NaN" || d.loss.contains("inf"), "{}", d.loss);
        assert_eq!(read_checkpoint_state(dir.join(files::NAN_CHECKPOINT)).unwrap().step, *step);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A run directory written before its files had a version still reads (and so resumes):
    /// a missing version is version 1, and `classes.json` may be a bare list. A newer version
    /// is refused, naming the file.
    #[test]
    fn run_files_without_a_version_read_and_newer_ones_are_refused() {
        let dir = temp_dir("versions");
        fs::create_dir_all(&dir).unwrap();
        let config = tiny(3);
        fs::write(dir.join(files::CONFIG), serde_json::to_string_pretty(&config).unwrap()).unwrap();
        assert_eq!(read_run_config(&dir).unwrap(), config);
        write_json(&dir.join(files::CONFIG), &config).unwrap();
        assert_eq!(read_run_config(&dir).unwrap(), config);
        let text = fs::read_to_string(dir.join(files::CONFIG)).unwrap();
        fs::write(dir.join(files::CONFIG), text.replace("\"version\": 1,", "\"version\": 4,")).unwrap();
        let err = read_run_config(&dir).unwrap_err().to_string();
        assert!(err.contains("run.json: format version 4 is not supported (this build reads version 1)"), "{err}");

        fs::write(dir.join(files::CLASSES), r#"["cat", "dog"]"#).unwrap();
        assert_eq!(read_class_names(&dir).unwrap(), ["cat", "dog"]);
        write_json(&dir.join(files::CLASSES), &ClassNames { classes: vec!["ant".into()] }).unwrap();
        assert_eq!(read_class_names(&dir).unwrap(), ["ant"]);

        let train = TrainLine {
            step: 1,
            total_steps: 2,
            epoch: 0,
            loss: 2.5,
            top1: 0.25,
            lr: 0.1,
            grad_norm: 1.0,
            images_per_s: 10.0,
            elapsed_s: 0.5,
        };
        let old = format!("{{\"kind\":\"train\",{}", &serde_json::to_string(&train).unwrap()[1..]);
        let new = json_line(&MetricsLine::Train(TrainLine { step: 2, ..train.clone() }));
        assert!(new.starts_with("{\"version\":1,\"kind\":\"train\",\"step\":2,"), "{new}");
        fs::write(dir.join(files::METRICS), format!("{old}\n{new}")).unwrap();
        let (lines, evals) = read_metrics(&dir).unwrap();
        assert_eq!((lines.iter().map(|l| l.step).collect::<Vec<_>>(), evals.len()), (vec![1, 2], 0));
        assert_eq!(lines[0], train);
        fs::write(dir.join(files::METRICS), format!("{old}\n{}", new.replace("\"version\":1", "\"version\":2")))
            .unwrap();
        let err = read_metrics(&dir).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl: format version 2 is not supported"), "{err}");
        fs::write(dir.join(files::METRICS), format!("{old}\n{{\"kind\":\"train\"}}\n")).unwrap();
        let err = read_metrics(&dir).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl: line 2: missing field `step`"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_beyond_the_memory_are_refused_up_front() {
        let mut config = tiny(1);
        config.recipe.network = NetworkConfig::cifar();
        config.recipe.batch_size = 1 << 20;
        let dir = temp_dir("memory");
        let err = train(&dir, &config, &RunOptions::default(), &mut Silent).unwrap_err();
        assert!(matches!(err, TrainError::Memory { .. }), "{err}");
        assert!(err.to_string().contains("GiB"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The estimate against the peaks measured with `nas bench` (see ACTIVATION_FACTOR).
    #[test]
    fn the_memory_estimate_is_near_the_measured_peaks() {
        let spec = CellSpec::nasnet_a();
        let mut mobile = NetworkConfig::mobile();
        mobile.use_aux_head = false;
        let gib = MemoryEstimate::of(&spec, &mobile, 32, false).unwrap().total_bytes() as f64 / (1u64 << 30) as f64;
        assert!((2.75..3.3).contains(&gib), "mobile at batch 32: {gib:.2} GiB, measured 2.75-2.77");
        let mut small = NetworkConfig::parse_net("mobile:2@384", &spec).unwrap();
        small.image_size = 32;
        small.num_classes = 10;
        small.use_aux_head = false;
        let mib = MemoryEstimate::of(&spec, &small, 64, false).unwrap().total_bytes() as f64 / (1u64 << 20) as f64;
        assert!((61.0..110.0).contains(&mib), "small at batch 64: {mib:.0} MiB, measured 61-63");
    }
}
