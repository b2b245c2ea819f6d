//! `nas infer`: eval-mode logits of a network loaded from named weights (timm's NASNet-A
//! state dict, or our own), from a `.npy` batch or from one picture.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use nas_data::{decode_image, DataRng, ImageNetTransform, Transform};
use nas_ops::checkpoint::load_safetensors;
use nas_ops::NasNet;
use nas_space::{CellSpec, NetSize, NetworkConfig, Stem};

/// Arguments of `nas infer`.
#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// The cells (NASNet-A for timm's weights).
    #[arg(long, default_value = "nasnet-a")]
    pub cell: String,
    /// Weights in safetensors, with timm's `nasnet.py` names.
    #[arg(long = "timm-checkpoint", visible_alias = "weights")]
    pub weights: PathBuf,
    /// The network the weights belong to.
    #[command(flatten)]
    pub timm: TimmNet,
    /// A float32 NCHW batch in `.npy` format.
    #[arg(long, conflicts_with = "image")]
    pub input: Option<PathBuf>,
    /// Where to write the logits (float32 `.npy`).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// One picture (any format `image` reads): central crop 0.875, resize, [−1, 1].
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Image size for `--image` (default: the skeleton's own).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Class names, one per line, to print beside the top-5.
    #[arg(long)]
    pub labels: Option<PathBuf>,
}

/// The network of a timm NASNet-A checkpoint (`nas infer`, `nas predict`).
#[derive(Debug, Clone, clap::Args)]
pub struct TimmNet {
    /// The skeleton: `large` for timm's `nasnetalarge`, or any `--net` value.
    #[arg(long, default_value = "large")]
    pub net: String,
    /// timm's `num_features`: filters of the penultimate layer (P).
    #[arg(long)]
    pub num_features: Option<usize>,
    /// timm's `stem_size`: filters of the ImageNet stem conv.
    #[arg(long)]
    pub stem_size: Option<usize>,
    /// Number of classes of the checkpoint (`nas predict`: default, the number of labels).
    #[arg(long)]
    pub classes: Option<usize>,
}

/// The network config `nas infer` builds: `--net`, then timm's `num_features` (P),
/// `stem_size` (the ImageNet stem's filters) and `num_classes`; no aux head.
pub fn config(spec: &CellSpec, args: &InferArgs) -> Result<NetworkConfig> {
    let timm = &args.timm;
    let mut config = NetworkConfig::parse_net(&timm.net, spec)?;
    if let Some(p) = timm.num_features {
        let n = config.n;
        config = config.with_size(NetSize { n, penultimate_filters: p }, spec)?;
    }
    if let Some(s) = timm.stem_size {
        config.stem_multiplier = match config.stem {
            Stem::ImageNet => s as f64 / 32.0,
            Stem::Cifar => s as f64 / config.num_conv_filters as f64,
        };
    }
    if let Some(c) = timm.classes {
        config.num_classes = c;
    }
    config.use_aux_head = false;
    Ok(config)
}

pub fn run(spec: &CellSpec, args: &InferArgs, out: &mut String) -> Result<()> {
    use std::fmt::Write as _;
    let mut config = config(spec, args)?;
    let (xs, from_image) = match (&args.input, &args.image) {
        (Some(input), None) => {
            let xs = Tensor::read_npy(input).with_context(|| format!("while reading {}", input.display()))?;
            (xs.to_dtype(DType::F32)?, false)
        }
        (None, Some(image)) => {
            let size = args.image_size.unwrap_or(config.image_size);
            (picture(image, size)?, true)
        }
        _ => bail!("give exactly one of --input X.npy and --image FILE"),
    };
    let dims = xs.dims().to_vec();
    if dims.len() != 4 || dims[2] != dims[3] {
        bail!("input must be float32 NCHW with square images, got shape {dims:?}");
    }
    config.image_size = dims[2];
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = NasNet::new(spec, &config, 0, vb)?;
    let report = load_safetensors(&varmap, &args.weights)
        .with_context(|| format!("while loading weights from {}", args.weights.display()))?;
    let logits = nas_ops::no_grad(|| net.forward_t(&xs, false))?.logits;
    if let Some(path) = &args.logits_out {
        logits.write_npy(path).with_context(|| format!("while writing {}", path.display()))?;
        writeln!(out, "wrote logits {:?} to {} ({} tensors loaded)", logits.dims(), path.display(), report.loaded)?;
    }
    if from_image || args.logits_out.is_none() {
        let names = match &args.labels {
            Some(path) => Some(read_labels(path, config.num_classes)?),
            None => None,
        };
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        for (i, row) in probs.to_vec2::<f32>()?.iter().enumerate() {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            writeln!(out, "image {i}:")?;
            for &class in order.iter().take(5) {
                let name = names.as_ref().map(|n| n[class].as_str()).unwrap_or("");
                writeln!(out, "  {class:>5} {:>7.3}%  {name}", 100.0 * row[class])?;
            }
        }
    }
    Ok(())
}

/// One picture as a (1, 3, size, size) batch: central crop 0.875, resize, pixels in [−1, 1].
fn picture(path: &Path, size: usize) -> Result<Tensor> {
    let image = decode_image(path).with_context(|| format!("while reading {}", path.display()))?;
    let transform = ImageNetTransform::eval(size as u32);
    let data = transform.apply_to_vec(&image, &mut DataRng::new(0));
    Ok(Tensor::from_vec(data, (1, 3, size, size), &Device::Cpu)?)
}

/// One class name per line; a file with a background class first (1001 lines) is accepted.
fn read_labels(path: &Path, classes: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("while reading {}", path.display()))?;
    let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    if names.len() != classes {
        bail!("{}: {} class names for a {classes}-class network", path.display(), names.len());
    }
    Ok(names)
}
