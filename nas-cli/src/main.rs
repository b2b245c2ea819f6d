//! `nas`: the command line of the NASNet workspace.
//!
//! A thin clap layer: every verb parses its arguments, calls the library crates and
//! prints. The grammar, the wiring and the cost model live in `nas-space`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use nas_space::cost::{group, network_cost, CostReport};
use nas_space::presets::{preset, PRESETS, UNAVAILABLE};
use nas_space::{reference, render, CellSpec, NetworkConfig, SearchSpace, SpaceRng, Stem};
use nas_train::bench::BenchOptions;
use serde_json::json;

mod infer;
mod search;
mod train;
mod transfer;

/// `writeln!` into the output buffer of a verb.
macro_rules! outln {
    ($out:expr) => {{
        $out.push('\n');
    }};
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        writeln!($out, $($arg)*).expect("writing to a String cannot fail");
    }};
}

#[derive(Debug, Parser)]
#[command(name = "nas", version, about = "NASNet neural architecture search", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a cell spec as text, JSON, Graphviz DOT or SVG.
    Show {
        /// A preset (`nasnet-a`), `random:SEED` (a uniform sample of the paper's space),
        /// `-` (standard input) or a spec file (text form, or JSON if it ends in .json or
        /// starts with `{`).
        #[arg(long, default_value = "nasnet-a")]
        cell: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Count parameters and mult-adds of a cell stacked into a network.
    Cost {
        /// A preset (`nasnet-a`), `random:SEED`, `-` (standard input) or a spec file.
        #[arg(long, default_value = "nasnet-a")]
        cell: String,
        /// `cifar`, `mobile`, `large`, `N@P` (mobile skeleton) or `cifar|mobile|large:N@P`.
        #[arg(long, default_value = "mobile")]
        net: String,
        /// Image height and width (default: the skeleton's own, 32, 224 or 331).
        #[arg(long)]
        image: Option<usize>,
        /// Number of classes (default: the skeleton's own, 10 or 1000).
        #[arg(long)]
        classes: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Also print the cost of every stem, cell and head.
        #[arg(long)]
        layers: bool,
    },
    /// Eval-mode logits of a network loaded from named weights (a timm NASNet-A state
    /// dict in safetensors, or one of ours), for a float32 NCHW `.npy` batch or one picture.
    Infer(infer::InferArgs),
    /// Time a training step and an inference pass of a standard network.
    Bench {
        /// `small` (Keras NASNet 2@384 at 32×32), `mobile` (NASNet-A Mobile at 224), or any
        /// network such as `large:6@1056` (timm's `nasnetalarge` at that width).
        #[arg(long, default_value_t = BenchOptions::default().net)]
        net: String,
        /// Batch size (default 64 for small, 32 for mobile).
        #[arg(long)]
        batch: Option<usize>,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = BenchOptions::default().steps)]
        steps: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// `cpu`, or `cuda` / `cuda:N` (a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Filters of the ImageNet stem conv (timm's `stem_size`; the networks' default 32).
        #[arg(long)]
        stem_size: Option<usize>,
        /// Input size (default: the network's).
        #[arg(long)]
        image: Option<usize>,
    },
    /// Train a network built from a cell in a run directory (resumable).
    Train(train::TrainArgs),
    /// Evaluate a run's checkpoint (loss, top-1, top-5) on a data set.
    Eval(train::EvalArgs),
    /// Search for a cell: a strategy proposes, children train, accuracy is the reward.
    Search(Box<search::SearchArgs>),
    /// Train one child of a search from a trial file (how other executors dispatch work).
    Worker(search::WorkerArgs),
    /// Transfer a cell: stack it into the ImageNet skeleton and train it with the ImageNet
    /// recipe (on the built-in data written as JPEGs when no folder is given).
    Transfer(transfer::TransferArgs),
    /// Top classes of pictures under a trained network (ours, or timm's NASNet-A).
    Predict(transfer::PredictArgs),
    /// Print the size of the search space.
    Space {
        /// Blocks per cell (B).
        #[arg(long, default_value_t = 5)]
        blocks: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
    Dot,
    Svg,
}

/// Keeps freed memory in the process instead of returning it to the kernel.
///
/// Training allocates and frees the same large activation and gradient buffers every
/// step; with glibc's defaults each of them is a fresh `mmap` whose pages fault in again,
/// which on these VMs costs more than the kernels (NASNet-A Mobile: 5.2 → 7.1 training
/// images/s). A user's own `GLIBC_TUNABLES` or `MALLOC_*` settings win.
fn tune_allocator() {
    /// The threads of rayon's pool: `RAYON_NUM_THREADS`, else the available cores.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn compute_threads() -> usize {
        let from_env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
        from_env.filter(|&n| n > 0).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k == "GLIBC_TUNABLES" || k.starts_with("MALLOC_")
        });
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; it is called before any
            // other thread exists.
            // glibc refuses mmap thresholds above 32 MiB, so larger buffers (NASNet-A Mobile's
            // activations at batch 32 reach 70 MB) would still be mapped fresh each step:
            // M_MMAP_MAX = 0 serves them from the heap too, and the trim threshold keeps it.
            // Side by side on `nas bench --net mobile`: 7.1–7.3 vs 5.6–6.3 training images/s.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                // One arena per compute thread. glibc's default (8 per core) kept freed
                // buffers in many arenas: mobile peaked at 3.6–3.9 GiB instead of 2.9. One
                // arena for all made the threads queue on its lock (a futex wake per
                // contended free; 15 % of small inference's CPU time in profiles): side by
                // side, 2 arenas on 2 cores took small training from 688 to 1,164 images/s and
                // inference from 2,646 to 5,271, with mobile's speed and peak (2.46 GiB)
                // unchanged.
                libc::mallopt(libc::M_ARENA_MAX, compute_threads() as i32);
                // A thread arena is a chain of 64 MiB heaps, and glibc unmaps a heap as soon
                // as it is all free, whatever the trim threshold, unless the top pad is as
                // large as a heap: without this, in some runs (depending on which threads
                // share an arena) a mobile training step faulted in about 75,000 fresh pages
                // (16 % of its CPU time zeroing them) and ran at 13.5 instead of 15.5 images/s.
                // With it, 4 of 4 runs kept their page faults constant after the first step.
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        }
    }
}

/// Makes candle's own thread pool park soon after its work.
///
/// candle 0.11 runs large elementwise ops (above 64K elements) on a pool of `cores − 1`
/// threads of its own, beside rayon's (which runs this crate's kernels and gemm). An earlier
/// version ran them on the calling thread (`CANDLE_NUM_THREADS=1`): with rayon's threads
/// asleep between kernels that was faster. Now a step keeps rayon's other threads awake
/// (`nas_train::on_pool`), and they yield their core when idle, so candle's pool gets it for
/// the backward pass's gradient sums, which candle runs one per edge (`zeros_like` + `add`).
/// Side by side on `nas bench` (release, alternating, medians of 2 rounds): mobile training
/// 11.89 → 13.29 images/s with candle's pool (+11 %); small training 684 → 657 (−4 %,
/// median of 5), inference unchanged. Its threads spin 25,000 times before parking after
/// each op; between the small ops of a child network a spinning thread took a core from the
/// other search worker (a child's CPU time fell from 14.3 s to 9.5 s, same wall time, with a
/// limit of 1,000), so the limit is 1,000 here (with 100,000, mobile training fell to 9.1 images/s).
/// A user's own settings win.
fn tune_candle_pool() {
    // Called first thing in main, before any other thread exists.
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1000");
    }
}

fn main() -> ExitCode {
    tune_allocator();
    tune_candle_pool();
    match run(Cli::parse()) {
        Ok(text) => {
            // A closed pipe (`nas show | head`) is not an error.
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("error: while writing to standard output: {err}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one verb and returns what it prints.
fn run(cli: Cli) -> Result<String> {
    let mut out = String::new();
    match cli.command {
        Command::Show { cell, format, out: file } => show(&mut out, &cell, format, file.as_deref())?,
        Command::Cost { cell, net, image, classes, json, layers } => {
            cost(&mut out, &cell, &net, image, classes, json, layers)?
        }
        Command::Space { blocks, json } => space(&mut out, blocks, json)?,
        Command::Train(args) => train::train(&args, || load_cell(&args.cell), &mut out)?,
        Command::Eval(args) => train::eval(&args, &mut out)?,
        Command::Search(args) => search::run(&args, &mut out)?,
        Command::Worker(args) => search::worker(&args, &mut out)?,
        Command::Transfer(args) => transfer::transfer(&args, &load_cell, &mut out)?,
        Command::Predict(args) => transfer::predict(&args, &load_cell, &mut out)?,
        Command::Infer(args) => {
            let spec = load_cell(&args.cell)?;
            infer::run(&spec, &args, &mut out)?
        }
        Command::Bench { net, batch, steps, json, device, stem_size, image } => {
            let device = nas_train::device::parse_device(&device)?;
            let options = BenchOptions { net, batch, steps, stem_size, image_size: image };
            let r = nas_train::bench::run(&options, &device)?;
            if json {
                outln!(out, "{}", r.to_json());
            } else {
                outln!(
                    out,
                    "{}: batch {}, train {:.1} images/s ({:.3} s/step), inference {:.1} images/s, peak RSS {:.0} MiB",
                    r.net,
                    r.batch,
                    r.train_images_per_s,
                    r.train_step_s,
                    r.infer_images_per_s,
                    r.peak_rss_mib.unwrap_or(0.0)
                );
            }
        }
    }
    Ok(out)
}

/// Loads `--cell`: a preset name, `random:SEED`, `-` (standard input) or a spec file.
fn load_cell(arg: &str) -> Result<CellSpec> {
    if let Some(spec) = preset(arg) {
        return Ok(spec);
    }
    if let Some(seed) = arg.strip_prefix("random:") {
        let seed: u64 = seed.parse().with_context(|| format!("`{arg}`: the seed must be a whole number"))?;
        return Ok(SearchSpace::nasnet().sample(&mut SpaceRng::new(seed)));
    }
    if arg == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("while reading a cell spec from standard input")?;
        return CellSpec::from_text_or_json(&text).context("in the cell spec on standard input");
    }
    let path = Path::new(arg);
    if !path.exists() {
        let lower = arg.to_ascii_lowercase().replace('_', "-");
        if let Some((_, why)) = UNAVAILABLE.iter().find(|(name, _)| *name == lower) {
            bail!("`{arg}` is not available: {why}");
        }
        let presets: Vec<&str> = PRESETS.iter().map(|(name, _)| *name).collect();
        bail!("`{arg}` is neither a preset ({}) nor an existing file", presets.join(", "));
    }
    Ok(CellSpec::read_file(path)?)
}

fn show(out: &mut String, cell: &str, format: Format, file: Option<&Path>) -> Result<()> {
    let spec = load_cell(cell)?;
    let text = match format {
        Format::Text => spec.to_text(),
        Format::Json => spec.to_json(),
        Format::Dot => render::spec_to_dot(&spec),
        Format::Svg => render::spec_to_svg(&spec)?,
    };
    match file {
        Some(path) => std::fs::write(path, text).with_context(|| format!("while writing {}", path.display())),
        None => {
            out.push_str(&text);
            Ok(())
        }
    }
}

fn cost(
    out: &mut String,
    cell: &str,
    net: &str,
    image: Option<usize>,
    classes: Option<usize>,
    as_json: bool,
    layers: bool,
) -> Result<()> {
    let spec = load_cell(cell)?;
    let mut config = NetworkConfig::parse_net(net, &spec)?;
    if let Some(image) = image {
        config.image_size = image;
    }
    if let Some(classes) = classes {
        config.num_classes = classes;
    }
    let report = network_cost(&spec, &config).with_context(|| format!("for --net {net}"))?;
    let penultimate = config.penultimate_filters(&spec);
    if as_json {
        let aux = report.aux_head.map(|aux| {
            json!({
                "params_trainable": aux.params_trainable,
                "params_total": aux.params_total(),
                "mult_adds": aux.mult_adds,
            })
        });
        let mut object = json!({
            "cell_hash": spec.canonical_hash().to_string(),
            "net": {
                "stem": config.stem.to_string(),
                "n": config.n,
                "num_conv_filters": config.num_conv_filters,
                "penultimate_filters": penultimate,
                "image_size": config.image_size,
                "num_classes": config.num_classes,
            },
            "params_trainable": report.network.params_trainable,
            "params_total": report.network.params_total(),
            "bn_statistics": report.network.bn_statistics,
            "mult_adds": report.network.mult_adds,
            "aux_head": aux,
        });
        if layers {
            object["parts"] = report
                .parts
                .iter()
                .map(|(name, c)| {
                    json!({"name": name, "params_trainable": c.params_trainable, "bn_statistics": c.bn_statistics, "mult_adds": c.mult_adds})
                })
                .collect();
        }
        outln!(out, "{}", serde_json::to_string_pretty(&object)?);
        return Ok(());
    }
    let stem = match config.stem {
        Stem::Cifar => "CIFAR stem",
        Stem::ImageNet => "ImageNet stem",
    };
    outln!(out, "cell         {} (canonical hash {})", cell, spec.canonical_hash());
    outln!(
        out,
        "network      {} @ {penultimate} (N = {}, F = {}), {stem}, {s}×{s} input, {} classes",
        config.n,
        config.n,
        config.num_conv_filters,
        config.num_classes,
        s = config.image_size
    );
    print_cost(out, &report);
    if let Some(published) = reference::published(&spec, &config) {
        outln!(out, "paper        {published}");
    }
    if layers {
        outln!(out);
        out.push_str(&report.to_string());
    }
    Ok(())
}

fn print_cost(out: &mut String, report: &CostReport) {
    let n = report.network;
    outln!(out, "parameters   {} trainable, {} with BN statistics", group(n.params_trainable), group(n.params_total()));
    outln!(out, "mult-adds    {} ({})", group(n.mult_adds), short(n.mult_adds));
    match report.aux_head {
        Some(aux) => outln!(
            out,
            "aux head     {} trainable parameters, {} mult-adds (training only, not in the totals)",
            group(aux.params_trainable),
            short(aux.mult_adds)
        ),
        None => outln!(out, "aux head     none"),
    }
}

/// 563638816 as `563.6M`.
fn short(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

fn space(out: &mut String, blocks: usize, as_json: bool) -> Result<()> {
    let space = SearchSpace::with_blocks(blocks);
    space.validate()?;
    let per_cell = space.cell_action_count();
    let per_spec = per_cell.and_then(|c| c.checked_mul(c));
    let unordered = space.cell_count_unordered_sides();
    let log10 = space.log10_spec_action_count();
    let steps: Vec<usize> = space.steps().iter().map(|s| s.choices).collect();
    if as_json {
        let as_str = |v: Option<u128>| v.map(|v| v.to_string());
        let object = json!({
            "blocks": blocks,
            "ops": space.ops.iter().map(|op| op.name()).collect::<Vec<_>>(),
            "combines": space.combines.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "num_actions": space.num_actions(),
            "choices_per_step": steps,
            "cell_action_sequences": as_str(per_cell),
            "spec_action_sequences": as_str(per_spec),
            "log10_spec_action_sequences": log10,
            "cell_count_unordered_sides": as_str(unordered),
            "spec_count_unordered_sides": as_str(unordered.and_then(|c| c.checked_mul(c))),
        });
        outln!(out, "{}", serde_json::to_string_pretty(&object)?);
        return Ok(());
    }
    let fmt = |v: Option<u128>| match v {
        Some(v) => format!("{v} (~{:.3e})", v as f64),
        None => "more than 2^128".to_string(),
    };
    outln!(out, "blocks per cell (B)         {blocks}");
    outln!(
        out,
        "ops ({})                    {}",
        space.ops.len(),
        space.ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(", ")
    );
    outln!(
        out,
        "combines                    {}",
        space.combines.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
    );
    outln!(out, "decisions per spec          {} (2 cells × B blocks × 5 decisions)", space.num_actions());
    outln!(
        out,
        "choices of one block b      inputs 2+b each, ops {} each, combine {}",
        space.ops.len(),
        space.combines.len()
    );
    outln!(out, "action sequences per cell   {}", fmt(per_cell));
    outln!(out, "action sequences per spec   {} (10^{log10:.2})", fmt(per_spec));
    outln!(out, "cells, sides unordered      {}", fmt(unordered));
    outln!(out, "specs, sides unordered      {}", fmt(unordered.and_then(|c| c.checked_mul(c))));
    outln!(out, "(block reorderings are not factored out, so the last two are upper bounds on distinct networks)");
    Ok(())
}
