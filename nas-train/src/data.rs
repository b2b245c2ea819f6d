//! Where a run's images come from: the `--data` argument, the train/evaluation split and the
//! transforms, as one value that a run directory records.
//!
//! `synthetic[:N]` is the built-in dataset of `nas-data` (10 classes, 32×32, generated from a
//! seed: nothing to download); `cifar10:DIR` and `cifar100:DIR` read the binary releases;
//! `imagenet:DIR` reads an ImageNet-style folder of JPEGs (`DIR/train/<class>/…`,
//! `DIR/val/<class>/…`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Device;
use nas_data::{
    read_cifar10, read_cifar100, BatchConfig, Batcher, Cifar100Labels, CifarTransform, Dataset, ImageFolder,
    ImageNetTransform, Split, SyntheticConfig, Transform,
};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// A data set the runs can train on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// The built-in dataset: `train` training and `test` test images made from `seed`.
    Synthetic { seed: u64, train: usize, test: usize },
    /// CIFAR-10 binary version (`data_batch_1.bin` … `test_batch.bin`) in `dir`.
    Cifar10 { dir: PathBuf },
    /// CIFAR-100 binary version (`train.bin`, `test.bin`, fine labels) in `dir`.
    Cifar100 { dir: PathBuf },
    /// An ImageNet-style folder: `dir/train/<class>/*.JPEG` and `dir/val/<class>/*.JPEG`.
    ImageNet { dir: PathBuf },
}

impl DataSource {
    /// Training images of the built-in dataset when `synthetic` has no count.
    pub const SYNTHETIC_TRAIN: usize = 5000;

    /// The built-in dataset with `train` training images and a test set a fifth of that.
    pub fn synthetic(train: usize) -> DataSource {
        DataSource::Synthetic { seed: 0, train, test: (train / 5).max(1) }
    }

    /// Whether the images are small (32×32) and take CIFAR-style transforms.
    pub fn is_small(&self) -> bool {
        !matches!(self, DataSource::ImageNet { .. })
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Synthetic { seed: 0, train, test } if *test == (*train / 5).max(1) => {
                write!(f, "synthetic:{train}")
            }
            DataSource::Synthetic { seed, train, test } => write!(f, "synthetic:{train}:{test}:{seed}"),
            DataSource::Cifar10 { dir } => write!(f, "cifar10:{}", dir.display()),
            DataSource::Cifar100 { dir } => write!(f, "cifar100:{}", dir.display()),
            DataSource::ImageNet { dir } => write!(f, "imagenet:{}", dir.display()),
        }
    }
}

impl FromStr for DataSource {
    type Err = TrainError;

    /// `synthetic`, `synthetic:TRAIN`, `synthetic:TRAIN:TEST:SEED`, `cifar10:DIR`,
    /// `cifar100:DIR` or `imagenet:DIR`.
    fn from_str(s: &str) -> Result<DataSource, TrainError> {
        let bad = |message: String| TrainError::Config { field: "data", message };
        let (kind, rest) = match s.split_once(':') {
            Some((kind, rest)) => (kind, Some(rest)),
            None => (s, None),
        };
        let dir = |rest: Option<&str>| match rest {
            Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
            _ => Err(bad(format!("`{s}` names no directory (write `{kind}:DIR`)"))),
        };
        match kind {
            "synthetic" => {
                let Some(rest) = rest else { return Ok(DataSource::synthetic(DataSource::SYNTHETIC_TRAIN)) };
                let numbers = rest
                    .split(':')
                    .map(|x| x.parse::<u64>().map_err(|_| bad(format!("`{x}` in `{s}` is not a whole number"))))
                    .collect::<Result<Vec<u64>, _>>()?;
                let source = match numbers[..] {
                    [train] => DataSource::synthetic(train as usize),
                    [train, test] => DataSource::Synthetic { seed: 0, train: train as usize, test: test as usize },
                    [train, test, seed] => DataSource::Synthetic { seed, train: train as usize, test: test as usize },
                    _ => {
                        return Err(bad(format!(
                            "`{s}`: write synthetic, synthetic:TRAIN or synthetic:TRAIN:TEST:SEED"
                        )))
                    }
                };
                if let DataSource::Synthetic { train: 0, .. } = source {
                    return Err(bad(format!("`{s}` has no training images")));
                }
                Ok(source)
            }
            "cifar10" => Ok(DataSource::Cifar10 { dir: dir(rest)? }),
            "cifar100" => Ok(DataSource::Cifar100 { dir: dir(rest)? }),
            "imagenet" => Ok(DataSource::ImageNet { dir: dir(rest)? }),
            _ => Err(bad(format!(
                "unknown data set `{s}`: expected synthetic[:N], cifar10:DIR, cifar100:DIR or imagenet:DIR"
            ))),
        }
    }
}

/// Which images a run is evaluated on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EvalSplit {
    /// Hold out this fraction of the training set, seeded (the search children: 5,000 of
    /// CIFAR-10's 50,000, i.e. 0.1) and train on the rest.
    Holdout { fraction: f64, seed: u64 },
    /// Train on the whole training set and evaluate on the test (ImageNet: `val`) set.
    Test,
}

impl EvalSplit {
    /// The name used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            EvalSplit::Holdout { .. } => "validation",
            EvalSplit::Test => "test",
        }
    }
}

/// How training images are augmented.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// The search children's recipe (crop of the image upsampled to 40×40, flip, per-image
    /// whitening), paper §A.1.
    Search,
    /// Small images: pad-4 crop and flip (CIFAR final training); ImageNet: Inception-style
    /// random resized crop and flip.
    Standard,
    /// Mild: small images are only flipped; ImageNet-style crops keep at least half the
    /// image (area [0.5, 1]). For data whose object can fall outside a small crop, such as
    /// the built-in set.
    Light,
    /// None (the evaluation transform): for tests and sanity checks.
    None,
}

/// The batcher of a run's images.
pub type RunBatcher = Batcher<Arc<dyn Dataset>, Arc<dyn Transform>>;

/// The data of one run, ready to batch.
pub struct RunData {
    /// Training images.
    pub train: Arc<dyn Dataset>,
    /// Evaluation images.
    pub eval: Arc<dyn Dataset>,
    /// "validation" or "test".
    pub eval_name: &'static str,
    /// Class names, by label.
    pub class_names: Vec<String>,
    /// Training transform.
    pub train_transform: Arc<dyn Transform>,
    /// Evaluation transform.
    pub eval_transform: Arc<dyn Transform>,
    /// The recorded split when a validation set was held out.
    pub split: Option<Split>,
}

impl fmt::Debug for RunData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunData")
            .field("train", &self.train.len())
            .field("eval", &self.eval.len())
            .field("eval_name", &self.eval_name)
            .field("classes", &self.class_names.len())
            .finish_non_exhaustive()
    }
}

impl RunData {
    /// Opens `source`, splits it by `eval` and picks the transforms for `augment`
    /// (`image_size` is the side of ImageNet-style inputs; small images stay 32×32;
    /// `cutout` applies to small training images).
    pub fn open(
        source: &DataSource,
        eval_split: EvalSplit,
        augment: Augment,
        cutout: Option<u32>,
        image_size: u32,
    ) -> Result<RunData, TrainError> {
        let (train, test): (Arc<dyn Dataset>, Arc<dyn Dataset>) = match source {
            DataSource::Synthetic { seed, train, test } => {
                let set = SyntheticConfig::new(*seed).train_test(*train, *test);
                (Arc::new(set.train), Arc::new(set.test))
            }
            DataSource::Cifar10 { dir } => {
                let set = read_cifar10(dir)?;
                (Arc::new(set.train), Arc::new(set.test))
            }
            DataSource::Cifar100 { dir } => {
                let set = read_cifar100(dir, Cifar100Labels::Fine)?;
                (Arc::new(set.train), Arc::new(set.test))
            }
            DataSource::ImageNet { dir } => {
                let set = ImageFolder::open_imagenet(dir)?;
                (Arc::new(set.train), Arc::new(set.test))
            }
        };
        let class_names = train.class_names().to_vec();
        let (train, eval, split) = match eval_split {
            EvalSplit::Test => (train, test, None),
            EvalSplit::Holdout { fraction, seed } => {
                let split = Split::fraction(train.len(), fraction, seed)?;
                let (fit, valid) = split.apply(Arc::new(train))?;
                (Arc::new(fit) as Arc<dyn Dataset>, Arc::new(valid) as Arc<dyn Dataset>, Some(split))
            }
        };
        if train.is_empty() {
            return Err(TrainError::Config { field: "data", message: format!("{source} has no training images") });
        }
        if eval.is_empty() {
            return Err(TrainError::Config {
                field: "data",
                message: format!("{source} leaves no {} images", eval_split.name()),
            });
        }
        let (train_transform, eval_transform): (Arc<dyn Transform>, Arc<dyn Transform>) = if source.is_small() {
            let standard = match cutout {
                Some(size) => CifarTransform::train().with_cutout(size),
                None => CifarTransform::train(),
            };
            match augment {
                Augment::Search => (Arc::new(CifarTransform::search()), Arc::new(CifarTransform::search().for_eval())),
                Augment::Standard => (Arc::new(standard), Arc::new(standard.for_eval())),
                Augment::Light => {
                    let light = CifarTransform { crop: nas_data::CifarCrop::None, ..standard };
                    (Arc::new(light), Arc::new(standard.for_eval()))
                }
                Augment::None => (Arc::new(CifarTransform::eval()), Arc::new(CifarTransform::eval())),
            }
        } else {
            let eval_t = ImageNetTransform::eval(image_size);
            match augment {
                Augment::None => (Arc::new(eval_t), Arc::new(eval_t)),
                Augment::Light => (
                    Arc::new(ImageNetTransform { area: (0.5, 1.0), ..ImageNetTransform::train(image_size) }),
                    Arc::new(eval_t),
                ),
                _ => (Arc::new(ImageNetTransform::train(image_size)), Arc::new(eval_t)),
            }
        };
        Ok(RunData { train, eval, eval_name: eval_split.name(), class_names, train_transform, eval_transform, split })
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Training batches (shuffled by `seed`, last partial batch dropped).
    pub fn train_batcher(&self, batch_size: usize, seed: u64, device: &Device) -> Result<RunBatcher, TrainError> {
        let config = BatchConfig { drop_last: self.train.len() >= batch_size, ..BatchConfig::train(batch_size, seed) };
        Ok(Batcher::new(self.train.clone(), self.train_transform.clone(), config, device.clone())?)
    }

    /// Evaluation batches, in order.
    pub fn eval_batcher(&self, batch_size: usize, device: &Device) -> Result<RunBatcher, TrainError> {
        let config = BatchConfig::eval(batch_size);
        Ok(Batcher::new(self.eval.clone(), self.eval_transform.clone(), config, device.clone())?)
    }
}

/// Checks that the source's directory exists (an early, clear error before any work).
pub fn check_source(source: &DataSource) -> Result<(), TrainError> {
    let dir: Option<&Path> = match source {
        DataSource::Synthetic { .. } => None,
        DataSource::Cifar10 { dir } | DataSource::Cifar100 { dir } | DataSource::ImageNet { dir } => Some(dir),
    };
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(TrainError::Config {
                field: "data",
                message: format!("{}: no such directory (for {source})", dir.display()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_arguments_parse_and_print_back() {
        for (text, expected) in [
            ("synthetic", DataSource::synthetic(5000)),
            ("synthetic:600", DataSource::Synthetic { seed: 0, train: 600, test: 120 }),
            ("synthetic:600:50:3", DataSource::Synthetic { seed: 3, train: 600, test: 50 }),
            ("cifar10:/data/c10", DataSource::Cifar10 { dir: "/data/c10".into() }),
            ("imagenet:x", DataSource::ImageNet { dir: "x".into() }),
        ] {
            let parsed: DataSource = text.parse().unwrap();
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string().parse::<DataSource>().unwrap(), parsed);
        }
        for bad in ["cifar10", "cifar10:", "mnist:x", "synthetic:a", "synthetic:0", "synthetic:1:2:3:4"] {
            let err = bad.parse::<DataSource>().unwrap_err().to_string();
            assert!(err.contains("data"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_holdout_split_is_disjoint_and_sized() {
        let source = DataSource::Synthetic { seed: 1, train: 200, test: 30 };
        let data =
            RunData::open(&source, EvalSplit::Holdout { fraction: 0.1, seed: 4 }, Augment::Search, None, 32).unwrap();
        assert_eq!((data.train.len(), data.eval.len(), data.eval_name), (180, 20, "validation"));
        let split = data.split.as_ref().unwrap();
        assert!(split.valid.iter().all(|i| !split.train.contains(i)));
        let test = RunData::open(&source, EvalSplit::Test, Augment::Standard, Some(8), 32).unwrap();
        assert_eq!((test.train.len(), test.eval.len(), test.eval_name, test.num_classes()), (200, 30, "test", 10));
    }

    #[test]
    fn a_missing_directory_is_named() {
        let source: DataSource = "cifar10:/nonexistent/c10".parse().unwrap();
        let err = check_source(&source).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/c10"), "{err}");
        let err = RunData::open(&source, EvalSplit::Test, Augment::Standard, None, 32).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/c10"), "{err}");
    }
}
