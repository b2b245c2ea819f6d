//! `nas transfer` and `nas predict`: a searched cell stacked into the ImageNet skeleton and
//! trained with the ImageNet recipe (the paper's transfer), and top-5 predictions of a trained
//! network (ours or timm's NASNet-A) for pictures.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use clap::Args;
use nas_data::{decode_image, CifarTransform, DataRng, ImageNetTransform, Transform};
use nas_space::cost::network_cost;
use nas_space::files::read_json;
use nas_space::reference::{self, Reference};
use nas_space::{render, CellSpec, Stem};
use nas_train::recipe::Recipe;
use nas_train::run::{self, read_metrics, RunConfig};
use nas_train::search::BestCell;
use nas_train::trainer::Trainer;
use nas_train::transfer::{self, TransferData, TransferOptions};

use crate::train::{default_out, reporter, RunArgs};

/// Arguments of `nas transfer`.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// A search folder or one strategy's folder: its best cell (`best.json`) is transferred.
    /// Default: the most recent `best.json` under `runs/search`.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// A cell instead of a search's best: a preset (`nasnet-a`), `random:SEED` or a spec file.
    #[arg(long, conflicts_with = "from")]
    pub cell: Option<String>,
    /// The ImageNet skeleton: `mobile`, `large` or `N@P` (default on the built-in data: N = 2,
    /// F = 16, NASNet-A's `2@384`; `mobile` on an ImageNet folder).
    #[arg(long)]
    pub net: Option<String>,
    /// Input side (default: 64 on the built-in data, the skeleton's own otherwise).
    #[arg(long)]
    pub image: Option<usize>,
    /// An ImageNet-style folder (`DIR/train/<class>/*.JPEG`, `DIR/val/<class>/*.JPEG`).
    /// Without it the built-in dataset is written as such a folder of JPEGs and used.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Training images per class of the built-in data.
    #[arg(long, default_value_t = transfer::BUILTIN_PER_CLASS)]
    pub synthetic_per_class: usize,
    /// `imagenet-mobile` or `imagenet-large` (the recipe; every field below overrides it).
    #[arg(long, default_value = "imagenet-mobile")]
    pub recipe: String,
    /// Keep probability of the dropout before the classifier (the skeleton's: 0.5 on ImageNet).
    #[arg(long)]
    pub dropout_keep: Option<f64>,
    /// Evaluate the trained weights themselves instead of their moving average.
    #[arg(long)]
    pub no_ema: bool,
    /// BN moving-average decay (default: 0.99 on the built-in data, whose short run would leave
    /// the skeleton's 0.9997 averages near their initial values; the skeleton's otherwise).
    #[arg(long)]
    pub bn_decay: Option<f64>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The paper's NASNet-A ImageNet models (Tables 2 and 3), to print beside a transfer.
fn paper_imagenet() -> impl Iterator<Item = (&'static Reference, f64)> {
    reference::NASNET_A.iter().filter_map(|r| r.top1().map(|top1| (r, top1)))
}

/// The most recent `best.json` under `root` (a strategy folder or a folder of them).
fn latest_best(root: &Path) -> Option<PathBuf> {
    let mut candidates = vec![root.join("best.json")];
    if let Ok(entries) = std::fs::read_dir(root) {
        candidates.extend(entries.flatten().map(|e| e.path().join("best.json")));
    }
    candidates
        .into_iter()
        .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

/// The cell to transfer and where it came from.
fn resolve_cell(args: &TransferArgs, load_cell: &dyn Fn(&str) -> Result<CellSpec>) -> Result<(CellSpec, String)> {
    if let Some(cell) = &args.cell {
        return Ok((load_cell(cell)?, cell.clone()));
    }
    let root = args.from.clone().unwrap_or_else(|| PathBuf::from("runs/search"));
    let Some(best) = latest_best(&root) else {
        bail!(
            "no best.json in {} or its subfolders: run `cargo xtask search` first, or give --from RUN_DIR or --cell",
            root.display()
        );
    };
    // Reading a cell spec validates it.
    let cell: BestCell = read_json(&best)?;
    let reward = cell.retrain_reward.unwrap_or(cell.reward);
    Ok((cell.cell_spec, format!("{} (child {}, reward {reward:.4})", best.display(), cell.id)))
}

/// `nas transfer`.
pub fn transfer(args: &TransferArgs, load_cell: &dyn Fn(&str) -> Result<CellSpec>, out: &mut String) -> Result<()> {
    use std::fmt::Write as _;
    let options = args.run.options()?;
    let mut reporter = reporter(args.run.progress);
    let (config, dir) = if args.run.resume {
        let Some(dir) = &args.run.out else { bail!("--resume needs --out DIR, the run to continue") };
        (run::read_run_config(dir)?, dir.clone())
    } else {
        let (spec, source) = resolve_cell(args, load_cell)?;
        let data = match &args.data {
            Some(dir) => TransferData::Folder(dir.clone()),
            None => {
                TransferData::Builtin { root: PathBuf::from("runs/transfer-data"), per_class: args.synthetic_per_class }
            }
        };
        let options = TransferOptions {
            recipe: Recipe::preset(&args.recipe)?,
            net: args.net.clone(),
            image_size: args.image,
            bn_decay: args.bn_decay,
            dropout_keep: args.dropout_keep,
            data,
            seed: args.run.seed,
        };
        let prepared = transfer::prepare(&spec, &options)?;
        if let Some(dir) = &prepared.builtin_dir {
            writeln!(out, "built-in data as an ImageNet-style JPEG folder: {}", dir.display())?;
        }
        let mut recipe = prepared.recipe;
        args.run.apply(&mut recipe);
        if args.no_ema {
            recipe.ema_decay = None;
        }
        recipe.validate()?;
        let network = recipe.network.clone();
        let classes = network.num_classes;
        let cost =
            network_cost(&spec, &network).with_context(|| format!("the network at {} px", network.image_size))?;
        writeln!(out, "cell: {source}")?;
        writeln!(out, "| network | parameters | mult-adds | ImageNet top-1 |")?;
        writeln!(out, "|---|---|---|---|")?;
        writeln!(
            out,
            "| this cell, N = {}, F = {}, {} px, {classes} classes | {:.2}M | {:.1}M | (training) |",
            network.n,
            network.num_conv_filters,
            network.image_size,
            cost.network.params_trainable as f64 / 1e6,
            cost.network.mult_adds as f64 / 1e6
        )?;
        for (r, top1) in paper_imagenet() {
            let madds = r.mult_adds_text().unwrap_or_default();
            writeln!(out, "| {} {} (paper) | {} | {madds} | {top1:.1} % |", r.name, r.skeleton(), r.params_text())?;
        }
        let dir = args.run.out.clone().unwrap_or_else(|| default_out("transfer"));
        let config = RunConfig {
            cell_spec: spec,
            recipe,
            data: prepared.data,
            seed: args.run.seed,
            init: args.run.init.clone(),
        };
        (config, dir)
    };
    eprint!("{out}");
    out.clear();
    let report = if args.run.resume {
        run::resume(&dir, &options, reporter.as_mut())?
    } else {
        run::train(&dir, &config, &options, reporter.as_mut())?
    };
    std::fs::write(dir.join("cell.svg"), render::spec_to_svg(&config.cell_spec)?)
        .with_context(|| format!("writing {}", dir.join("cell.svg").display()))?;
    let plot = plot_curves(&dir)?;
    let md = dir.join(run::files::REPORT_MD);
    let mut text = std::fs::read_to_string(&md).unwrap_or_default();
    let paper: Vec<String> = paper_imagenet()
        .map(|(r, top1)| {
            let madds = r.mult_adds_text().unwrap_or_default();
            format!("{} {} parameters, {madds} mult-adds, {top1:.1} % top-1", r.name, r.params_text())
        })
        .collect();
    text.push_str(&format!(
        "\n![cell](cell.svg)\n\n![training curves]({})\n\nPaper, for scale: {}.\n",
        plot.file_name().and_then(|n| n.to_str()).unwrap_or("curves.svg"),
        paper.join("; ")
    ));
    std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    let m = &report.final_eval.metrics;
    writeln!(
        out,
        "{}: {} steps ({:.1} epochs), {} top-1 {:.4} top-5 {:.4}; report {}, curves {}",
        dir.display(),
        report.steps,
        report.epochs,
        report.final_eval.split,
        m.top1,
        m.top5,
        md.display(),
        plot.display()
    )?;
    Ok(())
}

/// Plots training loss and evaluation top-1/top-5 against epochs into `dir/curves.svg`.
pub fn plot_curves(dir: &Path) -> Result<PathBuf> {
    use plotters::prelude::*;
    let (train, eval) = read_metrics(dir)?;
    let path = dir.join("curves.svg");
    // The run's report (written before the plot) knows its steps and epochs exactly.
    let report = run::read_report(dir)?;
    let steps_per_epoch = report.steps as f64 / report.epochs.max(1e-9);
    let loss: Vec<(f64, f64)> = train.iter().map(|l| (l.step as f64 / steps_per_epoch.max(1.0), l.loss)).collect();
    let top1: Vec<(f64, f64)> = eval.iter().map(|e| (e.epoch as f64, e.metrics.top1)).collect();
    let top5: Vec<(f64, f64)> = eval.iter().map(|e| (e.epoch as f64, e.metrics.top5)).collect();
    let max_x = loss.iter().chain(&top1).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = loss.iter().map(|p| p.1).fold(0.1, f64::max) * 1.05;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    {
        let root = SVGBackend::new(&path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, right) = root.split_horizontally(500);
        let mut chart = ChartBuilder::on(&left)
            .caption("training loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_x, 0.0..max_loss)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
        chart.draw_series(LineSeries::new(loss, BLUE.stroke_width(2))).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&right)
            .caption("evaluation accuracy", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_x, 0.0..1.0)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(top1.clone(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("top-1")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        chart.draw_series(top1.iter().map(|&p| Circle::new(p, 3, RED.filled()))).map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(top5.clone(), GREEN.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("top-5")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], GREEN.stroke_width(2)));
        chart.draw_series(top5.iter().map(|&p| Circle::new(p, 3, GREEN.filled()))).map_err(|e| err(&e))?;
        chart.configure_series_labels().border_style(BLACK).draw().map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(path)
}

/// Arguments of `nas predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A run directory of ours (its checkpoint, classes.json and run.json).
    #[arg(long, conflicts_with = "timm_checkpoint")]
    pub checkpoint: Option<PathBuf>,
    /// Or a timm NASNet-A state dict in safetensors (timm's `nasnetalarge` by default; see
    /// `nas infer` for --net, --num-features, --stem-size).
    #[arg(long)]
    pub timm_checkpoint: Option<PathBuf>,
    /// Class names, one per line (required with --timm-checkpoint; overrides classes.json).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// The network of the timm checkpoint.
    #[command(flatten)]
    pub timm: crate::infer::TimmNet,
    /// Input side for --timm-checkpoint (default: the skeleton's own).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// How many classes to print per picture.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Pictures (any format the `image` crate reads).
    #[arg(long = "image", required = true, num_args = 1..)]
    pub images: Vec<PathBuf>,
}

fn read_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
}

/// `nas predict`.
pub fn predict(args: &PredictArgs, load_cell: &dyn Fn(&str) -> Result<CellSpec>, out: &mut String) -> Result<()> {
    use std::fmt::Write as _;
    if let Some(weights) = &args.timm_checkpoint {
        let Some(labels) = &args.labels else {
            bail!("--timm-checkpoint needs --labels FILE (one class name per line)")
        };
        let classes = args.timm.classes.unwrap_or(read_names(labels)?.len());
        for image in &args.images {
            let infer = crate::infer::InferArgs {
                cell: "nasnet-a".into(),
                weights: weights.clone(),
                timm: crate::infer::TimmNet { classes: Some(classes), ..args.timm.clone() },
                input: None,
                logits_out: None,
                image: Some(image.clone()),
                image_size: args.image_size,
                labels: Some(labels.clone()),
            };
            writeln!(out, "{}:", image.display())?;
            crate::infer::run(&load_cell("nasnet-a")?, &infer, out)?;
        }
        return Ok(());
    }
    let Some(dir) = &args.checkpoint else { bail!("give --checkpoint RUN_DIR or --timm-checkpoint FILE") };
    let (mut trainer, state) = Trainer::resume(dir).with_context(|| format!("loading {}", dir.display()))?;
    let names = match &args.labels {
        Some(path) => read_names(path)?,
        None => run::read_class_names(dir)?,
    };
    let classes = state.network.num_classes;
    if names.len() != classes {
        bail!("{} class names for a {classes}-class network", names.len());
    }
    let size = state.network.image_size;
    let transform: Box<dyn Transform> = match state.network.stem {
        Stem::ImageNet => Box::new(ImageNetTransform::eval(size as u32)),
        Stem::Cifar => {
            // The run's own normalisation: the search recipe whitens each image.
            let search = run::read_run_config(dir).is_ok_and(|c| c.recipe.augment == nas_train::data::Augment::Search);
            Box::new(if search { CifarTransform::search().for_eval() } else { CifarTransform::eval() })
        }
    };
    for path in &args.images {
        let image = decode_image(path).with_context(|| format!("reading {}", path.display()))?;
        let data = transform.apply_to_vec(&image, &mut DataRng::new(0));
        let (h, w) = transform.output_size();
        let xs = Tensor::from_vec(data, (1, 3, h as usize, w as usize), &Device::Cpu)?;
        let logits = trainer.predict(&xs)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.squeeze(0)?.to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        writeln!(out, "{}:", path.display())?;
        for &class in order.iter().take(args.top) {
            writeln!(out, "  {:>7.3}%  {}", 100.0 * probs[class], names[class])?;
        }
    }
    Ok(())
}
