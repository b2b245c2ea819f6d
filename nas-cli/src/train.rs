//! `nas train` and `nas eval`: one training run in a run directory (see `nas_train::run`),
//! with a progress bar on a terminal and plain log lines otherwise.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nas_space::NetworkConfig;
use nas_train::data::{DataSource, EvalSplit, RunData};
use nas_train::recipe::Recipe;
use nas_train::run::{self, EvalLine, LogLines, Reporter, RunConfig, RunOptions, RunStart, Silent, TrainLine};
use nas_train::trainer::Trainer;

/// How a long job shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Plain log lines on standard error.
    Plain,
    /// Nothing but errors.
    Quiet,
}

/// Arguments of `nas train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A preset (`nasnet-a`), `random:SEED` or a spec file. Ignored with --resume.
    #[arg(long, default_value = "nasnet-a")]
    pub cell: String,
    /// The skeleton: `cifar`, `mobile`, `large`, `N@P` or `cifar|mobile|large:N@P`
    /// (default: the recipe's own).
    #[arg(long)]
    pub net: Option<String>,
    /// `synthetic[:N]` (built in), `cifar10:DIR`, `cifar100:DIR` or `imagenet:DIR`.
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// `search-child`, `cifar`, `imagenet-mobile` or `imagenet-large` (default: `cifar` for
    /// 32×32 data, `imagenet-mobile` for ImageNet folders).
    #[arg(long)]
    pub recipe: Option<String>,
    /// Input side for ImageNet-style data (default: the skeleton's).
    #[arg(long)]
    pub image: Option<usize>,
    /// Evaluate every this many epochs (0: only at the end).
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The training options `nas train` and `nas transfer` share; each overrides the recipe.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Epochs (default: the recipe's; `nas transfer` on the built-in data: 12 for NASNet-A,
    /// fewer for costlier cells).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Stop after this many steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Images per step (default: the recipe's).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Base learning rate (default: the recipe's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Train without the aux head (it needs a 5×5 map: about 96×96 inputs on ImageNet skeletons).
    #[arg(long)]
    pub no_aux: bool,
    /// How the classifier starts: `tf-slim` (fan-out, the paper's) or `fan-in` (better for few
    /// classes on small final maps; `nas transfer` on the built-in data uses it).
    #[arg(long, value_parser = parse_classifier_init)]
    pub classifier_init: Option<nas_train::recipe::ClassifierInit>,
    /// Start from these weights (a run directory of ours or a safetensors file such as timm's
    /// NASNet-A), replacing the classifier when the class count differs.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Seed of the initialisation, masks and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The run directory (default: `runs/<verb>-<seconds since 1970>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint (the other options are ignored).
    #[arg(long)]
    pub resume: bool,
    /// Start even when the memory estimate exceeds the available memory.
    #[arg(long)]
    pub force_memory: bool,
    /// Where to train: `cpu`, or `cuda` / `cuda:N` (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How progress is shown.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

impl RunArgs {
    /// Applies the overrides to `recipe`.
    pub fn apply(&self, recipe: &mut Recipe) {
        if let Some(epochs) = self.epochs {
            recipe.epochs = epochs;
        }
        recipe.max_steps = self.max_steps.or(recipe.max_steps);
        if let Some(batch) = self.batch {
            recipe.batch_size = batch;
        }
        if let Some(lr) = self.lr {
            recipe.lr = lr;
        }
        if self.no_aux {
            recipe.network.use_aux_head = false;
        }
        if let Some(init) = self.classifier_init {
            recipe.classifier_init = init;
        }
    }

    /// The options of the run itself.
    pub fn options(&self) -> Result<RunOptions> {
        let device = nas_train::device::parse_device(&self.device)?;
        Ok(RunOptions { force_memory: self.force_memory, stop: Some(stop_on_ctrl_c()), device })
    }
}

/// Arguments of `nas eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory (its checkpoint and run.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The data (default: the run's own).
    #[arg(long)]
    pub data: Option<String>,
    /// `test` or `validation` (the run's held-out images; needs the run's data).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Where to evaluate: `cpu`, or `cuda` / `cuda:N` (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Parses `tf-slim` or `fan-in`.
pub fn parse_classifier_init(s: &str) -> Result<nas_train::recipe::ClassifierInit, String> {
    match s {
        "tf-slim" => Ok(nas_train::recipe::ClassifierInit::TfSlim),
        "fan-in" => Ok(nas_train::recipe::ClassifierInit::FanIn),
        _ => Err(format!("`{s}`: expected tf-slim or fan-in")),
    }
}

/// Builds the run configuration of `nas train` from its arguments.
pub fn run_config(args: &TrainArgs, spec: nas_space::CellSpec) -> Result<RunConfig> {
    let data: DataSource = args.data.parse()?;
    let recipe_name =
        args.recipe.clone().unwrap_or_else(|| if data.is_small() { "cifar" } else { "imagenet-mobile" }.into());
    let mut recipe = Recipe::preset(&recipe_name)?;
    if let Some(net) = &args.net {
        let network = NetworkConfig::parse_net(net, &spec).with_context(|| format!("--net {net}"))?;
        // The recipe's regularisation settings stay; the skeleton and its size change.
        recipe.network = NetworkConfig {
            drop_path_keep_prob: recipe.network.drop_path_keep_prob.min(network.drop_path_keep_prob),
            use_aux_head: recipe.network.use_aux_head && network.use_aux_head,
            ..network
        };
    }
    if let Some(image) = args.image {
        recipe.network.image_size = image;
    }
    args.run.apply(&mut recipe);
    if let Some(every) = args.eval_every {
        recipe.eval_every_epochs = every;
    }
    recipe.validate()?;
    Ok(RunConfig { cell_spec: spec, recipe, data, seed: args.run.seed, init: args.run.init.clone() })
}

/// A stop flag raised by Ctrl-C; a second Ctrl-C exits at once.
pub fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let presses = AtomicUsize::new(0);
    let flag = stop.clone();
    // A second handler cannot be installed (tests call this twice in one process): ignore.
    let _ = ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) > 0 {
            eprintln!("\ninterrupted again: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint (Ctrl-C again to exit at once)");
        flag.store(true, Ordering::SeqCst);
    });
    stop
}

/// The reporter `progress` asks for.
pub fn reporter(progress: Progress) -> Box<dyn Reporter> {
    match progress {
        Progress::Auto if std::io::stderr().is_terminal() => Box::new(Bar::default()),
        Progress::Bar => Box::new(Bar::default()),
        Progress::Auto | Progress::Plain => Box::new(LogLines),
        Progress::Quiet => Box::new(Silent),
    }
}

/// A progress bar: steps, loss, accuracy, images/s and ETA.
#[derive(Debug, Default)]
pub struct Bar {
    bar: Option<ProgressBar>,
    last_eval: String,
}

impl Reporter for Bar {
    fn start(&mut self, info: &RunStart) {
        let bar = ProgressBar::new(info.total_steps);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg} ETA {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_position(info.start_step);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(500));
        bar.println(format!("{} trainable parameters, run directory {}", info.params, info.dir.display()));
        self.bar = Some(bar);
    }
    fn train(&mut self, l: &TrainLine) {
        if let Some(bar) = &self.bar {
            bar.set_position(l.step);
            bar.set_message(format!(
                "loss {:.3} acc {:.3} {:.0} img/s{}",
                l.loss, l.top1, l.images_per_s, self.last_eval
            ));
        }
    }
    fn eval(&mut self, l: &EvalLine) {
        self.last_eval = format!(" | {} top1 {:.3}", l.split, l.metrics.top1);
        if let Some(bar) = &self.bar {
            bar.println(format!(
                "epoch {} {}: loss {:.4} top1 {:.4} top5 {:.4}",
                l.epoch, l.split, l.metrics.loss, l.metrics.top1, l.metrics.top5
            ));
        }
    }
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The default run directory of a verb.
pub fn default_out(verb: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{verb}-{secs}"))
}

/// `nas train`.
pub fn train(args: &TrainArgs, spec: impl FnOnce() -> Result<nas_space::CellSpec>, out: &mut String) -> Result<()> {
    let options = args.run.options()?;
    let mut reporter = reporter(args.run.progress);
    let report = if args.run.resume {
        let Some(dir) = &args.run.out else { bail!("--resume needs --out DIR, the run to continue") };
        run::resume(dir, &options, reporter.as_mut())?
    } else {
        let config = run_config(args, spec()?)?;
        let dir = args.run.out.clone().unwrap_or_else(|| default_out("train"));
        run::train(&dir, &config, &options, reporter.as_mut())?
    };
    let m = &report.final_eval.metrics;
    use std::fmt::Write as _;
    writeln!(
        out,
        "{}: {} steps, {} top-1 {:.4} top-5 {:.4} loss {:.4} ({} images); best top-1 {:.4} at step {}",
        report.dir.display(),
        report.steps,
        report.final_eval.split,
        m.top1,
        m.top5,
        m.loss,
        m.images,
        report.best_eval.metrics.top1,
        report.best_eval.step
    )?;
    Ok(())
}

/// `nas eval`.
pub fn eval(args: &EvalArgs, out: &mut String) -> Result<()> {
    let device = nas_train::device::parse_device(&args.device)?;
    let dir: &Path = &args.checkpoint;
    let config = run::read_run_config(dir).ok();
    let data: DataSource = match (&args.data, &config) {
        (Some(text), _) => text.parse()?,
        (None, Some(config)) => config.data.clone(),
        (None, None) => bail!("{} has no run.json; say which data to evaluate on with --data", dir.display()),
    };
    let split = match args.split.as_str() {
        "test" => EvalSplit::Test,
        "validation" => match &config {
            Some(RunConfig { recipe, .. }) if matches!(recipe.eval, EvalSplit::Holdout { .. }) => recipe.eval,
            _ => bail!("{} held out no validation images; use --split test", dir.display()),
        },
        other => bail!("unknown --split `{other}`; expected test or validation"),
    };
    let (mut trainer, state) =
        Trainer::resume_on(dir, &device).with_context(|| format!("loading {}", dir.display()))?;
    let image_size = state.network.image_size as u32;
    let (augment, cutout) =
        config.as_ref().map_or((nas_train::data::Augment::Standard, None), |c| (c.recipe.augment, c.recipe.cutout));
    let run_data = RunData::open(&data, split, augment, cutout, image_size)?;
    if run_data.num_classes() != state.network.num_classes {
        bail!(
            "{} has {} classes but the network in {} was trained for {}",
            data,
            run_data.num_classes(),
            dir.display(),
            state.network.num_classes
        );
    }
    let metrics = trainer.evaluate(run_data.eval_batcher(args.batch, &device)?.epoch(0))?;
    use std::fmt::Write as _;
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "step": state.step, "split": split.name(), "data": data.to_string(), "metrics": metrics })
        )?;
    } else {
        writeln!(
            out,
            "{} at step {} on {} {}: top-1 {:.4} top-5 {:.4} loss {:.4} ({} images, {} skipped)",
            dir.display(),
            state.step,
            data,
            split.name(),
            metrics.top1,
            metrics.top5,
            metrics.loss,
            metrics.images,
            metrics.skipped
        )?;
    }
    Ok(())
}
