//! `nas search` and `nas worker`: the architecture search (see `nas_train::search`) with a
//! progress bar, the top cells drawn as SVG and the reward plot (the paper's Figure 6 for the
//! user's own data).

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nas_controller::StrategyConfig;
use nas_space::cost::group;
use nas_space::files::read_json;
use nas_space::render;
use nas_train::data::DataSource;
use nas_train::executor;
use nas_train::recipe::Recipe;
use nas_train::search::{
    self, files, read_journal, BestCell, Budget, Comparison, Executor, JournalEvent, JournalSummary, LocalExecutor,
    Retrain, Scored, SearchConfig, SearchLog, SearchReporter, TopCells, Trial,
};
use nas_train::slurm::{self, SlurmConfig, SlurmExecutor};

use crate::train::{stop_on_ctrl_c, Progress};

/// Arguments of `nas search`; the defaults are `nas_train`'s ([`SearchConfig::default`]).
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// `ppo` (the paper's controller), `reinforce`, `random` or `evolution`.
    #[arg(long, default_value_t = SearchConfig::default().strategy.name().to_string())]
    pub strategy: String,
    /// Children to evaluate (the paper: 20,000).
    #[arg(long, default_value_t = SearchConfig::default().children)]
    pub children: usize,
    /// Children trained at once (default: the number of cores; with Slurm, 20, the
    /// paper's controller batch).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Proxy data: `synthetic[:N]` (built in), `cifar10:DIR` or `cifar100:DIR`.
    #[arg(long, default_value_t = SearchConfig::default().data.to_string())]
    pub data: String,
    /// The search folder; each strategy searches in its own subfolder.
    #[arg(long, default_value = "runs/search")]
    pub out: PathBuf,
    /// Continue the search of this strategy in --out.
    #[arg(long)]
    pub resume: bool,
    /// Seed of the strategy and the children.
    #[arg(long, default_value_t = SearchConfig::default().seed)]
    pub seed: u64,
    /// Normal cells per stack of a child (the paper: N = 2).
    #[arg(long, default_value_t = SearchConfig::default().child.network.n)]
    pub child_n: usize,
    /// Filters of a child's first cells, F (the paper's CIFAR children: 32).
    #[arg(long, default_value_t = SearchConfig::default().child.network.num_conv_filters)]
    pub child_filters: usize,
    /// Epochs per child (the paper: 20).
    #[arg(long, default_value_t = SearchConfig::default().child.epochs)]
    pub child_epochs: u64,
    /// Images per child step.
    #[arg(long, default_value_t = SearchConfig::default().child.batch_size)]
    pub child_batch: usize,
    /// Child learning rate (cosine decay over the child's steps).
    #[arg(long, default_value_t = SearchConfig::default().child.lr)]
    pub child_lr: f64,
    /// Use the paper's child recipe (N = 2, F = 32, 20 epochs, batch 32, lr 0.025, 10 % held
    /// out, TF-Slim's initialisation throughout) instead of the small defaults above (which
    /// start the classifier at a fan-in scale).
    #[arg(long)]
    pub paper_children: bool,
    /// Evolution: population size (default: children / 4, between 4 and 100).
    #[arg(long)]
    pub population: Option<usize>,
    /// Evolution: tournament size (default: population / 4, at least 2).
    #[arg(long)]
    pub sample_size: Option<usize>,
    /// Controller learning rate (the paper: 0.00035).
    #[arg(long)]
    pub controller_lr: Option<f64>,
    /// Controller: architectures per policy update (the paper: 20).
    #[arg(long)]
    pub controller_batch: Option<usize>,
    /// Controller: decay of the reward baseline's moving average (the paper: 0.95).
    #[arg(long)]
    pub baseline_decay: Option<f64>,
    /// Controller: what one step of the baseline's average takes in, `batch` (its mean
    /// reward; default) or `child` (each reward in turn). The paper does not say.
    #[arg(long)]
    pub baseline_per: Option<nas_controller::BaselineUpdate>,
    /// Controller: weight of the entropy bonus (the paper: 0.00001).
    #[arg(long, allow_hyphen_values = true)]
    pub entropy_weight: Option<f64>,
    /// Cells listed in top.json and drawn as SVG.
    #[arg(long, default_value_t = SearchConfig::default().top_k)]
    pub top_k: usize,
    /// After the budget, train the best K distinct cells again, longer, and pick the best of
    /// those (the paper re-trains its top 250).
    #[arg(long, default_value_t = 0)]
    pub retrain_top: usize,
    /// Epochs of each re-training.
    #[arg(long, default_value_t = Retrain::DEFAULT_EPOCHS)]
    pub retrain_epochs: u64,
    /// At the end, train the found cell again beside K cells drawn at random from the same
    /// space, with the same recipe (the re-training's, else the children's), and say how it
    /// ranks among them (best.json, report.md, baseline.svg); 0 skips it.
    #[arg(long, default_value_t = SearchConfig::DEFAULT_BASELINE)]
    pub baseline_random: usize,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Train children in this process (threads) instead of one `nas worker` process each.
    #[arg(long, conflicts_with = "executor")]
    pub in_process: bool,
    /// Where children are trained: `local` (this machine) or `slurm` (job arrays on a
    /// cluster; see the README).
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    pub executor: ExecutorKind,
    #[command(flatten)]
    pub slurm: SlurmArgs,
    /// Where each child trains: `cpu`, or `cuda` / `cuda:N` (a build with the `cuda`
    /// feature; on Slurm with `--gres gpu:1`, `cuda` is the task's own GPU).
    #[arg(long, default_value_t = SearchConfig::default().device)]
    pub device: String,
    /// How progress is shown.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

/// Cost limits and the cost-aware reward. Costs are counted analytically in the network the
/// found cell is meant for (`--target-net`), so no training is spent on them.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Budget")]
pub struct BudgetArgs {
    /// Never train a cell whose network has more mult-adds per image than this.
    #[arg(long)]
    pub max_mult_adds: Option<u64>,
    /// Never train a cell whose network has more trainable parameters than this.
    #[arg(long)]
    pub max_params: Option<u64>,
    /// The reward a cell over a limit gets (the strategy learns from it).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub budget_penalty: f64,
    /// MnasNet's soft reward: accuracy × (mult-adds / T)^w.
    #[arg(long)]
    pub target_mult_adds: Option<u64>,
    /// The exponent w of the soft reward.
    #[arg(long, default_value_t = Budget::MNASNET_COST_WEIGHT, allow_hyphen_values = true)]
    pub cost_weight: f64,
    /// The network costs are counted in: `mobile`, `large`, `N@P` or `cifar|mobile|large:N@P`.
    #[arg(long, default_value = "mobile")]
    pub target_net: String,
}

impl BudgetArgs {
    /// The budget, when a limit or a target is given.
    fn budget(&self) -> Option<Budget> {
        if self.max_mult_adds.is_none() && self.max_params.is_none() && self.target_mult_adds.is_none() {
            return None;
        }
        Some(Budget {
            target_net: self.target_net.clone(),
            max_mult_adds: self.max_mult_adds,
            max_params: self.max_params,
            penalty: self.budget_penalty,
            target_mult_adds: self.target_mult_adds,
            cost_weight: self.cost_weight,
        })
    }
}

/// Where children are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    /// This machine: one `nas worker` process per child (threads with --in-process).
    Local,
    /// A Slurm cluster: each batch of children is one job array.
    Slurm,
}

/// Settings of `--executor slurm`. On `--resume` the settings the search last ran with are
/// kept unless given again.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Slurm (with --executor slurm)")]
pub struct SlurmArgs {
    /// sbatch --partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// sbatch --gres, e.g. gpu:1.
    #[arg(long)]
    pub gres: Option<String>,
    /// sbatch --time: the limit of one child, e.g. 1:00:00.
    #[arg(long)]
    pub time: Option<String>,
    /// sbatch --cpus-per-task; each worker uses as many threads.
    #[arg(long)]
    pub cpus_per_task: Option<usize>,
    /// sbatch --mem, e.g. 8G.
    #[arg(long)]
    pub mem: Option<String>,
    /// Most tasks per job array (the cluster's MaxArraySize bounds it too).
    #[arg(long)]
    pub max_array: Option<usize>,
    /// Where job files and the children's run directories go: a folder every node sees at
    /// the same path (default: the search folder, which then must be shared).
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
    /// Another sbatch argument, passed as it is (repeatable): --sbatch-arg=--account=lab.
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Submissions of a task Slurm lost (crash, time limit, node failure) before its child
    /// counts as failed (default 2).
    #[arg(long)]
    pub retries: Option<u32>,
    /// Seconds between looks at the queue (default 10).
    #[arg(long)]
    pub poll_seconds: Option<f64>,
    /// The nas binary as the compute nodes see it (default: this one).
    #[arg(long)]
    pub worker_program: Option<PathBuf>,
}

impl SlurmArgs {
    /// The settings: `saved` (a resumed search's) overridden by what was given.
    pub fn config(&self, saved: Option<SlurmConfig>) -> Result<SlurmConfig> {
        let program = match &self.worker_program {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding the nas binary for the workers")?,
        };
        let mut c = saved.unwrap_or_else(|| SlurmConfig::new(program.clone()));
        if self.worker_program.is_some() {
            c.program = program;
        }
        let set = |slot: &mut Option<String>, value: &Option<String>| {
            if value.is_some() {
                slot.clone_from(value);
            }
        };
        set(&mut c.partition, &self.partition);
        set(&mut c.gres, &self.gres);
        set(&mut c.time, &self.time);
        set(&mut c.mem, &self.mem);
        if self.cpus_per_task.is_some() {
            c.cpus_per_task = self.cpus_per_task;
        }
        if self.max_array.is_some() {
            c.max_array = self.max_array;
        }
        if self.shared_dir.is_some() {
            c.shared_dir.clone_from(&self.shared_dir);
        }
        if !self.sbatch_args.is_empty() {
            c.sbatch_args.clone_from(&self.sbatch_args);
        }
        if let Some(r) = self.retries {
            c.retries = r;
        }
        if let Some(p) = self.poll_seconds {
            c.poll_seconds = p;
        }
        Ok(c)
    }

    fn any_given(&self) -> bool {
        self.partition.is_some()
            || self.gres.is_some()
            || self.time.is_some()
            || self.cpus_per_task.is_some()
            || self.mem.is_some()
            || self.max_array.is_some()
            || self.shared_dir.is_some()
            || !self.sbatch_args.is_empty()
            || self.retries.is_some()
            || self.poll_seconds.is_some()
            || self.worker_program.is_some()
    }
}

/// Arguments of `nas worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The trial (JSON, as the search writes it).
    #[arg(long)]
    pub trial: PathBuf,
    /// Where to write the result (JSON, atomically; default: result.json in the trial's
    /// directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The search configuration of the arguments.
pub fn search_config(args: &SearchArgs) -> Result<SearchConfig> {
    let mut strategy: StrategyConfig = args.strategy.parse()?;
    match &mut strategy {
        StrategyConfig::Evolution(c) => *c = search::sized_evolution(args.children, args.population, args.sample_size),
        StrategyConfig::Ppo(c) | StrategyConfig::Reinforce(c) => {
            if let Some(lr) = args.controller_lr {
                c.learning_rate = lr;
            }
            if let Some(n) = args.controller_batch {
                c.batch_size = n;
            }
            if let Some(d) = args.baseline_decay {
                c.baseline_decay = d;
            }
            if let Some(per) = args.baseline_per {
                c.baseline_per = per;
            }
            if let Some(w) = args.entropy_weight {
                c.entropy_weight = w;
            }
        }
        StrategyConfig::Random => {}
    }
    let child = if args.paper_children {
        Recipe::search_child()
    } else {
        let mut child = Recipe::small_search_child(args.seed);
        child.network.n = args.child_n;
        child.network.num_conv_filters = args.child_filters;
        child.epochs = args.child_epochs;
        child.batch_size = args.child_batch;
        child.lr = args.child_lr;
        child
    };
    let workers = args.workers.unwrap_or(match args.executor {
        ExecutorKind::Local => SearchConfig::local_workers(),
        ExecutorKind::Slurm => SearchConfig::CLUSTER_WORKERS,
    });
    let config = SearchConfig {
        strategy,
        children: args.children,
        workers,
        child,
        data: args.data.parse::<DataSource>()?,
        seed: args.seed,
        top_k: args.top_k,
        retrain: (args.retrain_top > 0).then_some(Retrain { top: args.retrain_top, epochs: args.retrain_epochs }),
        baseline_random: args.baseline_random,
        budget: args.budget.budget(),
        device: args.device.clone(),
        ..SearchConfig::default()
    };
    config.validate()?;
    Ok(config)
}

/// A progress bar: children done, best reward, ETA.
struct Bar {
    bar: ProgressBar,
}

impl SearchReporter for Bar {
    fn start(&mut self, dir: &Path, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.reset_eta();
        self.bar.println(format!("searching in {}", dir.display()));
    }
    fn child(&mut self, event: &JournalEvent, done: usize, best: Option<&Scored>) {
        self.bar.set_position(done as u64);
        if let Some(best) = best {
            self.bar.set_message(format!("best {:.4} (child {})", best.reward, best.id));
        }
        match event {
            JournalEvent::Failed { id, reason, .. } => {
                self.bar.println(format!("child {id} failed: {}", reason.lines().next().unwrap_or("")))
            }
            JournalEvent::Rejected { id, reason, .. } => {
                self.bar.println(format!("proposal {id}: not trained: {reason}"))
            }
            _ => {}
        }
    }
    fn message(&mut self, text: &str) {
        self.bar.println(text);
    }
    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

struct Quiet;
impl SearchReporter for Quiet {}

fn reporter(progress: Progress) -> Box<dyn SearchReporter> {
    let bar = || {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} children {msg} ETA {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        Box::new(Bar { bar }) as Box<dyn SearchReporter>
    };
    match progress {
        Progress::Auto if std::io::stderr().is_terminal() => bar(),
        Progress::Bar => bar(),
        Progress::Auto | Progress::Plain => Box::new(SearchLog::default()),
        Progress::Quiet => Box::new(Quiet),
    }
}

/// `nas search`.
pub fn run(args: &SearchArgs, out: &mut String) -> Result<()> {
    let stop = stop_on_ctrl_c();
    let mut reporter = reporter(args.progress);
    let name = args.strategy.as_str();
    let dir = args.out.join(name);
    if args.executor == ExecutorKind::Local && args.slurm.any_given() {
        bail!("the Slurm options need --executor slurm");
    }
    if args.executor == ExecutorKind::Local && !args.resume {
        // Children on this machine: the device must open here (on Slurm, on the nodes).
        nas_train::device::parse_device(&args.device)?;
    }
    let mut executor: Box<dyn Executor> = match args.executor {
        ExecutorKind::Slurm => {
            let saved = if args.resume { SlurmConfig::saved(&dir)? } else { None };
            Box::new(SlurmExecutor::new(args.slurm.config(saved)?))
        }
        ExecutorKind::Local => {
            let live = slurm::live_jobs(&dir)?;
            if args.resume && !live.is_empty() {
                bail!(
                    "{} has children in flight on Slurm (jobs {}): resume it with --executor slurm, or \
                     cancel them (scancel) and delete {}",
                    dir.display(),
                    live.join(", "),
                    dir.join(slurm::STATE_FILE).display()
                );
            }
            if args.in_process {
                Box::new(LocalExecutor::threads())
            } else {
                Box::new(LocalExecutor::processes(
                    std::env::current_exe().context("finding the nas binary for its workers")?,
                ))
            }
        }
    };
    let outcome = if args.resume {
        if !dir.join(files::CONFIG).exists() {
            bail!("{} holds no {name} search to resume", dir.display());
        }
        search::resume_search(&dir, Some(args.children), executor.as_mut(), Some(stop), reporter.as_mut())?
    } else {
        let config = search_config(args)?;
        search::search(&dir, &config, executor.as_mut(), Some(stop), reporter.as_mut())?
    };
    let config = search::read_search_config(&dir)?;
    write_pictures(&dir, &outcome.summary, config.top_k)?;
    let plot = plot_rewards(&args.out)?;
    let costs = plot_costs(&dir, &outcome.summary, &config)?;
    use std::fmt::Write as _;
    let s = &outcome.summary;
    let trained = s.results.iter().filter(|r| !r.cached).count();
    if !outcome.complete {
        writeln!(out, "search stopped: {} of {} children done; continue with --resume", s.done(), config.children)?;
    }
    writeln!(
        out,
        "{} children evaluated ({trained} trained, {} cached, {} failed) in {}",
        s.done(),
        s.results.len() - trained,
        s.failed.len(),
        dir.display()
    )?;
    if let Ok(best) = read_json::<BestCell>(&dir.join(files::BEST)) {
        let retrained = best.retrain_reward.map_or(String::new(), |r| format!(", re-trained {r:.4}"));
        writeln!(
            out,
            "best: child {} reward {:.4}{retrained} ({}), cell in {}",
            best.id,
            best.reward,
            best.hash,
            dir.join(files::BEST).display()
        )?;
    }
    let vs = read_json::<BestCell>(&dir.join(files::BEST)).ok().and_then(|b| b.vs_random);
    if let Some(vs) = &vs {
        writeln!(out, "{}", vs.sentence())?;
    }
    if dir.join(files::TOP).exists() {
        writeln!(out, "report: {}", write_report(&dir, &config, vs.as_ref())?.display())?;
    }
    writeln!(out, "journal: {}", dir.join(files::JOURNAL).display())?;
    writeln!(out, "top cells: {}", dir.join("cells").display())?;
    writeln!(out, "reward plot: {}", plot.display())?;
    if let Some(costs) = costs {
        writeln!(out, "accuracy against cost: {}", costs.display())?;
    }
    Ok(())
}

/// Writes `dir/report.md`: the comparison with the random cells in a sentence and a table
/// (with `dir/baseline.svg`, every reward of the comparison) when there is one, then the top
/// cells with their accuracy and cost; returns the report's path.
fn write_report(dir: &Path, config: &SearchConfig, vs: Option<&Comparison>) -> Result<PathBuf> {
    use std::fmt::Write as _;
    let mut md = String::new();
    writeln!(md, "# Search report\n")?;
    if let Some(vs) = vs {
        comparison_md(&mut md, dir, config, vs)?;
    }
    let top: TopCells = read_json(&dir.join(files::TOP))?;
    writeln!(md, "## Top cells\n")?;
    writeln!(md, "Costs are those of the cell in `{}` (inference, no aux head).\n", top.cost_network)?;
    writeln!(md, "| rank | child | reward | accuracy | mult-adds | parameters |\n|---|---|---|---|---|---|")?;
    for c in &top.cells {
        let (m, p) = c.cost.map_or(("-".into(), "-".into()), |c| (group(c.mult_adds), group(c.params)));
        writeln!(md, "| {} | {} | {:.4} | {:.4} | {m} | {p} |", c.rank, c.id, c.reward, c.accuracy)?;
    }
    let path = dir.join("report.md");
    nas_space::files::write_atomic(&path, md.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The comparison with the random cells: a sentence, what was trained, a table and the plot.
fn comparison_md(md: &mut String, dir: &Path, config: &SearchConfig, vs: &Comparison) -> Result<()> {
    use std::fmt::Write as _;
    let plot = plot_baseline(dir, vs)?;
    let recipe = config.retrain_recipe();
    writeln!(md, "**{}.**\n", capitalise(&vs.sentence()))?;
    writeln!(
        md,
        "The found cell was trained again with a fresh seed beside {} cells drawn uniformly from the same \
         space, each for {} epochs with the same recipe (N = {}, F = {}, batch {}, lr {}). Its reward in the \
         search was the best of many noisy draws; this one is not.\n",
        config.baseline_random,
        recipe.epochs,
        recipe.network.n,
        recipe.network.num_conv_filters,
        recipe.batch_size,
        recipe.lr
    )?;
    writeln!(md, "| cell | reward |\n|---|---|")?;
    writeln!(md, "| found | {:.4} |", vs.found)?;
    for (k, r) in vs.random.iter().enumerate() {
        writeln!(md, "| random {} | {r:.4} |", k + 1)?;
    }
    writeln!(md, "| random median | {:.4} |\n", vs.median)?;
    writeln!(
        md,
        "![rewards of the found and the random cells]({})\n",
        plot.file_name().unwrap_or_default().to_string_lossy()
    )?;
    Ok(())
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or(String::new(), |c| c.to_uppercase().chain(chars).collect())
}

/// `dir/baseline.svg`: the random cells' rewards as points, their median and the found
/// cell's reward as lines.
fn plot_baseline(dir: &Path, vs: &Comparison) -> Result<PathBuf> {
    use plotters::prelude::*;
    let path = dir.join("baseline.svg");
    let all = vs.random.iter().copied().chain([vs.found]);
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let (lo, hi) = ((lo - 0.05).max(0.0), (hi + 0.05).min(1.0));
    let n = vs.random.len();
    let svg_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    {
        let backend = SVGBackend::new(&path, (700, 420)).into_drawing_area();
        backend.fill(&WHITE).map_err(|e| svg_err(&e))?;
        let mut chart = ChartBuilder::on(&backend)
            .caption("The found cell against random cells, trained alike", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..(n + 1) as f64, lo..hi)
            .map_err(|e| svg_err(&e))?;
        chart.configure_mesh().x_desc("random cell").y_desc("validation top-1").draw().map_err(|e| svg_err(&e))?;
        chart
            .draw_series(vs.random.iter().enumerate().map(|(k, &r)| Circle::new(((k + 1) as f64, r), 5, BLUE.filled())))
            .map_err(|e| svg_err(&e))?
            .label("random cells")
            .legend(|(x, y)| Circle::new((x + 9, y), 5, BLUE.filled()));
        for (value, color, label) in [(vs.median, BLUE, "random median"), (vs.found, RED, "found cell")] {
            chart
                .draw_series(LineSeries::new([(0.0, value), ((n + 1) as f64, value)], color.stroke_width(2)))
                .map_err(|e| svg_err(&e))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        legend(&mut chart).map_err(|e| svg_err(&e))?;
        backend.present().map_err(|e| svg_err(&e))?;
    }
    Ok(path)
}

/// `dir/costs.svg`: each trained child's accuracy against its mult-adds in the budget's
/// target network (`mobile` without a budget), the Pareto front (no other child both more
/// accurate and cheaper) drawn as a line. None when no child trained.
fn plot_costs(dir: &Path, summary: &JournalSummary, config: &SearchConfig) -> Result<Option<PathBuf>> {
    use plotters::prelude::*;
    let budget = config.budget.clone().unwrap_or_else(|| Budget::on("mobile"));
    let mut points: Vec<(f64, f64)> = summary
        .results
        .iter()
        .filter(|r| !r.cached)
        .filter_map(|r| budget.cost(&r.spec).ok().map(|c| (c.mult_adds as f64 / 1e6, budget.accuracy(r.reward, c))))
        .collect();
    if points.is_empty() {
        return Ok(None);
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for &(m, acc) in &points {
        if front.last().is_none_or(|&(_, best)| acc > best) {
            front.push((m, acc));
        }
    }
    let path = dir.join("costs.svg");
    let (x_lo, x_hi) = (points[0].0 * 0.95, points[points.len() - 1].0 * 1.05 + 1e-9);
    let (y_lo, y_hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (y_lo, y_hi) = ((y_lo - 0.02).max(0.0), (y_hi + 0.02).min(1.0));
    let svg_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    {
        let backend = SVGBackend::new(&path, (900, 560)).into_drawing_area();
        backend.fill(&WHITE).map_err(|e| svg_err(&e))?;
        let caption =
            format!("Validation accuracy against mult-adds in {} (line: the Pareto front)", budget.target_net);
        let mut chart = ChartBuilder::on(&backend)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(|e| svg_err(&e))?;
        chart
            .configure_mesh()
            .x_desc(format!("millions of mult-adds per image in {}", budget.target_net))
            .y_desc("validation top-1")
            .draw()
            .map_err(|e| svg_err(&e))?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.mix(0.5).filled())))
            .map_err(|e| svg_err(&e))?
            .label("children")
            .legend(|(x, y)| Circle::new((x + 9, y), 3, BLUE.filled()));
        chart
            .draw_series(LineSeries::new(front.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| svg_err(&e))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        for (limit, label) in [(budget.max_mult_adds, "mult-add limit"), (budget.target_mult_adds, "target")] {
            if let Some(limit) = limit {
                let x = limit as f64 / 1e6;
                if (x_lo..x_hi).contains(&x) {
                    chart
                        .draw_series(LineSeries::new([(x, y_lo), (x, y_hi)], BLACK.stroke_width(1)))
                        .map_err(|e| svg_err(&e))?
                        .label(label)
                        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(1)));
                }
            }
        }
        legend(&mut chart).map_err(|e| svg_err(&e))?;
        backend.present().map_err(|e| svg_err(&e))?;
    }
    Ok(Some(path))
}

/// The legend every plot of a search draws: lower right, on a light background.
fn legend<'a, DB: plotters::prelude::DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut plotters::prelude::ChartContext<'a, DB, CT>,
) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// Draws the top cells as SVG into `dir/cells/`.
fn write_pictures(dir: &Path, summary: &JournalSummary, top_k: usize) -> Result<()> {
    let cells = dir.join("cells");
    std::fs::create_dir_all(&cells).with_context(|| format!("creating {}", cells.display()))?;
    for (rank, scored) in summary.top(top_k).iter().enumerate() {
        let path = cells.join(format!("top-{}-child-{}.svg", rank + 1, scored.id));
        let svg = render::spec_to_svg(&scored.spec)?;
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The k of the "top-k found so far" curves (the paper's Figure 6).
const TOP_KS: [usize; 3] = [1, 5, 25];

/// One child of a strategy's curve.
struct CurvePoint {
    /// Children evaluated so far (failures included).
    n: usize,
    reward: f64,
    /// For each k of [`TOP_KS`], the mean of the k best rewards so far (once there are k).
    top: [Option<f64>; 3],
}

/// One strategy's curve, from its journal.
fn curves(journal: &Path) -> Result<Vec<CurvePoint>> {
    let mut rewards = Vec::new();
    let mut n = 0;
    let mut out = Vec::new();
    for e in read_journal(journal)? {
        match e {
            JournalEvent::Result { reward, .. } => {
                n += 1;
                rewards.push(reward);
                out.push(CurvePoint { n, reward, top: TOP_KS.map(|k| top_k_mean(&rewards, k)) });
            }
            JournalEvent::Failed { .. } => n += 1,
            _ => {}
        }
    }
    Ok(out)
}

/// The mean of the `k` largest of `rewards`, when there are at least `k`.
fn top_k_mean(rewards: &[f64], k: usize) -> Option<f64> {
    if rewards.len() < k || k == 0 {
        return None;
    }
    let mut sorted = rewards.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    Some(sorted[..k].iter().sum::<f64>() / k as f64)
}

/// Plots the rewards of every strategy searched in `root` (one subfolder each) into
/// `root/rewards.svg`: each child's reward as a point and, as lines, the mean of the best 1,
/// 5 and 25 rewards found so far (thinner for larger k).
pub fn plot_rewards(root: &Path) -> Result<PathBuf> {
    use plotters::prelude::*;
    let mut series = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .flatten()
        .filter(|e| e.path().join(files::JOURNAL).is_file())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let points = curves(&entry.path().join(files::JOURNAL))?;
        if !points.is_empty() {
            series.push((entry.file_name().to_string_lossy().into_owned(), points));
        }
    }
    let path = root.join("rewards.svg");
    let max_n = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.n)).max().unwrap_or(1).max(1);
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.reward))
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let (lo, hi) = if lo <= hi { ((lo - 0.02).max(0.0), (hi + 0.02).min(1.0)) } else { (0.0, 1.0) };
    let svg_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    {
        let backend = SVGBackend::new(&path, (900, 560)).into_drawing_area();
        backend.fill(&WHITE).map_err(|e| svg_err(&e))?;
        let mut chart = ChartBuilder::on(&backend)
            .caption("Each child's reward (points); mean of the best 1, 5 and 25 so far (lines)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0..max_n + 1, lo..hi)
            .map_err(|e| svg_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("children evaluated")
            .y_desc("validation top-1 (reward)")
            .draw()
            .map_err(|e| svg_err(&e))?;
        for (k, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(points.iter().map(|p| Circle::new((p.n, p.reward), 2, color.mix(0.45).filled())))
                .map_err(|e| svg_err(&e))?;
            for (j, k) in TOP_KS.iter().enumerate() {
                let line = points.iter().filter_map(|p| p.top[j].map(|t| (p.n, t)));
                let style = color.mix(1.0 - 0.3 * j as f64).stroke_width(3 - j as u32);
                chart
                    .draw_series(LineSeries::new(line, style))
                    .map_err(|e| svg_err(&e))?
                    .label(format!("{name}: top-{k}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            }
        }
        legend(&mut chart).map_err(|e| svg_err(&e))?;
        backend.present().map_err(|e| svg_err(&e))?;
    }
    Ok(path)
}

/// Makes the kernel kill this worker when the search that started it dies (even by SIGKILL),
/// so that a resumed search never trains a child beside an orphan training the same one.
fn die_with_parent() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid only change or read this process's own
    // attributes.
    unsafe {
        let parent = libc::getppid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The parent may have died before the call: then we were re-parented already.
        if libc::getppid() != parent {
            std::process::exit(1);
        }
    }
}

/// `nas worker`: trains one trial and writes its result atomically.
pub fn worker(args: &WorkerArgs, out: &mut String) -> Result<()> {
    if std::env::var_os("NAS_WORKER_OF_SEARCH").is_some() {
        die_with_parent();
    }
    let trial: Trial = read_json(&args.trial)?;
    let result = search::run_trial(&trial, Some(stop_on_ctrl_c()));
    let path = args.out.clone().unwrap_or_else(|| trial.dir.join(executor::worker_files::RESULT));
    executor::write_result(&path, &result)?;
    use std::fmt::Write as _;
    writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The top-k mean needs k rewards and takes the k largest.
    #[test]
    fn top_k_means_take_the_best_k() {
        let rewards = [0.3, 0.1, 0.5, 0.2, 0.4];
        assert_eq!(super::top_k_mean(&rewards, 1), Some(0.5));
        assert!((super::top_k_mean(&rewards, 2).unwrap() - 0.45).abs() < 1e-12);
        assert!((super::top_k_mean(&rewards, 5).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(super::top_k_mean(&rewards, 6), None);
        assert_eq!(super::top_k_mean(&rewards, 0), None);
    }
}
