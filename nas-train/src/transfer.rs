//! The paper's transfer: a searched cell stacked into the ImageNet skeleton and trained with
//! an ImageNet recipe, on an ImageNet-style folder or on the built-in data written as one.
//!
//! On the built-in data (ten classes of small patterns, no files needed) the transfer is a
//! run of minutes instead of days: NASNet-A's `2 @ 384` skeleton at 64×64, epochs scaled by
//! the cell's mult-adds, light augmentation, a fan-in classifier, faster BN averages and no
//! aux head ([`prepare`] documents each). [`run::train`](crate::run::train) trains the
//! result.

use std::path::{Path, PathBuf};

use nas_data::{write_imagenet_folder, Dataset as _, ImageFolder, Part, SyntheticConfig, SYNTHETIC_CLASSES};
use nas_space::cost::network_cost;
use nas_space::{CellSpec, NetworkConfig, Stem};

use crate::data::{Augment, DataSource};
use crate::recipe::{ClassifierInit, Recipe};
use crate::TrainError;

/// The skeleton on the built-in data: N = 2, F = 16 (NASNet-A's `2 @ 384`).
pub const BUILTIN_NET: &str = "mobile:2@384";

/// The input side on the built-in data.
pub const BUILTIN_IMAGE_SIZE: usize = 64;

/// BN moving-average decay on the built-in data: its short run would leave the skeleton's
/// 0.9997 averages near their initial values.
pub const BUILTIN_BN_DECAY: f64 = 0.99;

/// Training images per class of the built-in data (a fifth as many validation images, at
/// least 2).
pub const BUILTIN_PER_CLASS: usize = 250;

/// Where a transfer's images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TransferData {
    /// An ImageNet-style folder (`DIR/train/<class>/*.JPEG`, `DIR/val/<class>/*.JPEG`).
    Folder(PathBuf),
    /// The built-in dataset, written as such a folder of JPEGs under `root` (once: a complete
    /// folder is reused); see [`builtin_folder`].
    Builtin { root: PathBuf, per_class: usize },
}

/// What a transfer is asked for. `None` takes the default of the data: the built-in data's
/// (the `BUILTIN_*` constants), or the skeleton's own on a folder.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferOptions {
    /// The recipe to start from ([`Recipe::imagenet_mobile`] or [`Recipe::imagenet_large`]).
    pub recipe: Recipe,
    /// The skeleton: `mobile`, `large` or `N@P` (default: [`BUILTIN_NET`] on the built-in data,
    /// `mobile` on a folder).
    pub net: Option<String>,
    /// The input side (default: [`BUILTIN_IMAGE_SIZE`] on the built-in data).
    pub image_size: Option<usize>,
    /// BN moving-average decay (default: [`BUILTIN_BN_DECAY`] on the built-in data).
    pub bn_decay: Option<f64>,
    /// Keep probability of the dropout before the classifier.
    pub dropout_keep: Option<f64>,
    /// The images.
    pub data: TransferData,
    /// Seed of the built-in images.
    pub seed: u64,
}

impl TransferOptions {
    /// The transfer on the built-in data written under `root`: Mobile's recipe,
    /// [`BUILTIN_PER_CLASS`] images per class, every other choice the built-in default.
    pub fn builtin(root: impl Into<PathBuf>) -> TransferOptions {
        TransferOptions {
            recipe: Recipe::imagenet_mobile(),
            net: None,
            image_size: None,
            bn_decay: None,
            dropout_keep: None,
            data: TransferData::Builtin { root: root.into(), per_class: BUILTIN_PER_CLASS },
            seed: 0,
        }
    }
}

/// A transfer ready to train.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// The recipe, its skeleton sized for the cell and the data's classes.
    pub recipe: Recipe,
    /// The ImageNet-style folder it trains on.
    pub data: DataSource,
    /// The folder the built-in data was written to (`None` on a folder of the caller's).
    pub builtin_dir: Option<PathBuf>,
}

/// The recipe and data of transferring `spec` as `options` asks.
///
/// The skeleton is `options.net` sized for `spec`'s concatenated outputs; the built-in default
/// fixes N = 2 and F = 16 whatever the cell, so that a cell with fewer concatenated outputs
/// does not get a wider, slower network. On the built-in data also:
/// - no aux head: 64×64 leaves it a 4×4 map, and it needs 5×5;
/// - [`builtin_epochs`] epochs (the caller may override them afterwards);
/// - light augmentation ([`Augment::Light`]): each image shows one small pattern, which
///   Inception crops down to 5 % of the area often cut away;
/// - a fan-in classifier ([`ClassifierInit::FanIn`]): with ten classes on a 2×2 final map,
///   TF-Slim's fan-out classifier starts with logits of std near 10 and the run would not
///   leave chance in its few hundred steps.
///
/// The built-in data is written first if it is not there yet. The classes are counted from
/// the folder.
pub fn prepare(spec: &CellSpec, options: &TransferOptions) -> Result<Transfer, TrainError> {
    let builtin = matches!(options.data, TransferData::Builtin { .. });
    let net = options.net.as_deref().unwrap_or(if builtin { BUILTIN_NET } else { "mobile" });
    let width_of = if builtin && options.net.is_none() { CellSpec::nasnet_a() } else { spec.clone() };
    let net_err = |message: String| TrainError::Config { field: "net", message: format!("`{net}`: {message}") };
    let mut network = NetworkConfig::parse_net(net, &width_of).map_err(|err| net_err(err.to_string()))?;
    if network.stem != Stem::ImageNet {
        return Err(net_err("transfer builds the ImageNet skeleton (mobile, large or N@P)".into()));
    }
    network.image_size = options.image_size.unwrap_or(if builtin { BUILTIN_IMAGE_SIZE } else { network.image_size });
    if let Some(decay) = options.bn_decay.or(builtin.then_some(BUILTIN_BN_DECAY)) {
        network.bn_decay = decay;
    }
    if let Some(keep) = options.dropout_keep {
        network.dense_dropout_keep_prob = keep;
    }
    let (dir, builtin_dir) = match &options.data {
        TransferData::Folder(dir) => (dir.clone(), None),
        TransferData::Builtin { root, per_class } => {
            network.use_aux_head = false;
            let dir = builtin_folder(root, network.image_size as u32, *per_class, options.seed)?;
            (dir.clone(), Some(dir))
        }
    };
    network.num_classes = ImageFolder::open_imagenet(&dir)?.train.class_names().len();
    let mut recipe = options.recipe.clone();
    recipe.network = network;
    if builtin {
        recipe.epochs = builtin_epochs(spec, &recipe.network);
        recipe.augment = Augment::Light;
        recipe.classifier_init = ClassifierInit::FanIn;
    }
    Ok(Transfer { recipe, data: DataSource::ImageNet { dir }, builtin_dir })
}

/// Epochs on the built-in data: about 4 minutes for NASNet-A (6.2M mult-adds per image in the
/// built-in skeleton), fewer for costlier cells; between 3 and 12.
pub fn builtin_epochs(spec: &CellSpec, network: &NetworkConfig) -> u64 {
    const NASNET_A_MULT_ADDS: f64 = 6.2e6;
    let madds = network_cost(spec, network).map_or(NASNET_A_MULT_ADDS, |c| c.network.mult_adds as f64);
    ((12.0 * NASNET_A_MULT_ADDS / madds).round() as u64).clamp(3, 12)
}

/// Writes the built-in dataset at `size` pixels as an ImageNet-style JPEG folder under `root`
/// (`per_class` training images per class, a fifth as many validation images, at least 2) and
/// returns it. A folder completed before is reused; an incomplete one is written again.
pub fn builtin_folder(root: &Path, size: u32, per_class: usize, seed: u64) -> Result<PathBuf, TrainError> {
    let classes = SYNTHETIC_CLASSES.len();
    let dir = root.join(format!("synthetic-{size}px-{per_class}-seed{seed}"));
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    let config = SyntheticConfig { size, seed };
    let train = config.generate(Part::Train, per_class * classes);
    let val = config.generate(Part::Test, (per_class / 5).max(2) * classes);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| TrainError::Io { path: dir.clone(), source })?;
    }
    write_imagenet_folder(&dir, &train, &val, size)?;
    std::fs::write(&done, "").map_err(|source| TrainError::Io { path: done.clone(), source })?;
    Ok(dir)
}
