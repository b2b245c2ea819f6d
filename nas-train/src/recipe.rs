//! The paper's training recipes as values, every field overridable: the search child, CIFAR
//! final training, ImageNet Mobile and Large.

use nas_space::NetworkConfig;
use serde::{Deserialize, Serialize};

use crate::data::{Augment, EvalSplit};
use crate::optim::OptimSettings;
use crate::schedule::LrSchedule;
use crate::trainer::TrainConfig;
use crate::TrainError;

/// How the learning rate decays over a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decay {
    /// Single-period cosine decay to 0 over the whole run.
    Cosine,
    /// Staircase decay by `rate` every `epochs_per_decay` epochs (Inception-v3, ImageNet).
    Exponential { rate: f64, epochs_per_decay: f64 },
    /// No decay.
    Constant,
}

/// How the classifier's weights start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifierInit {
    /// TF-Slim's fan-out variance scaling, like every other layer (the paper's recipes).
    #[default]
    TfSlim,
    /// Fan-in scaling (std `sqrt(1 / fan_in)`): for few classes on small final maps, where
    /// the fan-out rule starts with logits of std near 10 (see
    /// `nas_ops::init::rescale_classifiers_fan_in`).
    FanIn,
}

/// Everything about how a network is trained, except the cell and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// The preset it came from (`search-child`, `cifar`, `imagenet-mobile`, `imagenet-large`).
    pub name: String,
    /// The skeleton. `num_classes` is set from the data when a run starts.
    pub network: NetworkConfig,
    /// Epochs of training.
    pub epochs: u64,
    /// Stop after this many steps even if the epochs are not done (tests, smoke runs).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Images per step.
    pub batch_size: usize,
    /// Base learning rate at `batch_size`.
    pub lr: f64,
    /// Its decay.
    pub decay: Decay,
    /// Linear warm-up, in epochs (0: none).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Optimiser, weight decay, clipping.
    pub optim: OptimSettings,
    /// Label smoothing ε.
    pub label_smoothing: f64,
    /// Weight of the aux head's loss.
    pub aux_weight: f64,
    /// Weight average for evaluation.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// How the classifier starts (the rest of the network is always TF-Slim's fan-out rule).
    #[serde(default)]
    pub classifier_init: ClassifierInit,
    /// Training augmentation.
    pub augment: Augment,
    /// Cutout side for small images.
    #[serde(default)]
    pub cutout: Option<u32>,
    /// What the run is evaluated on.
    pub eval: EvalSplit,
    /// Evaluate every this many epochs (and always at the end); 0: only at the end.
    pub eval_every_epochs: u64,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
    /// Write a `train` metrics line every this many steps.
    pub log_every_steps: u64,
    /// Checkpoint every this many epochs (and always at the end); 0: only at the end.
    pub checkpoint_every_epochs: u64,
    /// Also checkpoint mid-epoch when this many minutes have passed since the last one.
    #[serde(default)]
    pub checkpoint_every_minutes: Option<f64>,
}

impl Recipe {
    /// The names [`Recipe::preset`] knows.
    pub const PRESETS: [&'static str; 4] = ["search-child", "cifar", "imagenet-mobile", "imagenet-large"];

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Recipe, TrainError> {
        match name {
            "search-child" | "child" => Ok(Recipe::search_child()),
            "cifar" => Ok(Recipe::cifar()),
            "imagenet-mobile" | "mobile" => Ok(Recipe::imagenet_mobile()),
            "imagenet-large" | "large" => Ok(Recipe::imagenet_large()),
            _ => Err(TrainError::Config {
                field: "recipe",
                message: format!("unknown recipe `{name}`; expected one of {}", Recipe::PRESETS.join(", ")),
            }),
        }
    }

    /// The search child: N = 2 on the CIFAR skeleton, 20 epochs on the 45k/5k
    /// split, momentum 0.9, cosine decay, the search augmentation. The paper gives neither
    /// batch, learning rate nor weight decay for children: the CIFAR recipe's are used. No aux
    /// head and no drop path (a 20-epoch child gains nothing from either).
    pub fn search_child() -> Recipe {
        let mut network = NetworkConfig::cifar();
        network.n = 2;
        network.use_aux_head = false;
        network.drop_path_keep_prob = 1.0;
        Recipe {
            name: "search-child".into(),
            network,
            epochs: 20,
            max_steps: None,
            batch_size: 32,
            lr: 0.025,
            decay: Decay::Cosine,
            warmup_epochs: 0.0,
            optim: OptimSettings::cifar(),
            label_smoothing: 0.0,
            aux_weight: 0.0,
            ema_decay: None,
            classifier_init: ClassifierInit::TfSlim,
            augment: Augment::Search,
            cutout: None,
            eval: EvalSplit::Holdout { fraction: 0.1, seed: 0 },
            eval_every_epochs: 0,
            eval_batch_size: 250,
            log_every_steps: 50,
            checkpoint_every_epochs: 0,
            checkpoint_every_minutes: None,
        }
    }

    /// The held-out fraction of [`Recipe::small_search_child`].
    pub const SMALL_HOLDOUT: f64 = 0.52;

    /// The small search child a search trains unless asked for the paper's: N = 2 and F = 4 on
    /// the CIFAR skeleton, 2 epochs at batch 32 and lr 0.1, 52 % of the images held out (split
    /// by `seed`; on the search's 2,000 built-in images, 960 to train and 1,040 to validate,
    /// so a reward's sampling error is about ±0.015 instead of ±0.03 with 240), evaluation
    /// batches of 100, the rest as [`Recipe::search_child`].
    /// Its classifier starts at a fan-in scale ([`ClassifierInit::FanIn`]): with few classes on
    /// so small a child, TF-Slim's fan-out classifier starts with large logits and a 2-epoch
    /// child barely leaves chance (validation top-1 0.14 vs 0.23 with fan-in, measured on the
    /// built-in data).
    pub fn small_search_child(seed: u64) -> Recipe {
        let paper = Recipe::search_child();
        Recipe {
            network: NetworkConfig { num_conv_filters: 4, ..paper.network.clone() },
            epochs: 2,
            batch_size: 32,
            lr: 0.1,
            eval: EvalSplit::Holdout { fraction: Recipe::SMALL_HOLDOUT, seed },
            classifier_init: ClassifierInit::FanIn,
            eval_batch_size: 100,
            ..paper
        }
    }

    /// CIFAR final training: N = 6, F = 32, 600 epochs at batch 32,
    /// lr 0.025 with cosine decay, momentum 0.9, weight decay 5e-4, clip 5, aux head at 0.4,
    /// ScheduledDropPath 0.6, cutout 16 (the "+ cutout" rows; the paper does not state the
    /// size, 16 is DeVries & Taylor's for CIFAR-10). Evaluated on the test set.
    pub fn cifar() -> Recipe {
        Recipe {
            name: "cifar".into(),
            network: NetworkConfig::cifar(),
            epochs: 600,
            max_steps: None,
            batch_size: 32,
            lr: 0.025,
            decay: Decay::Cosine,
            warmup_epochs: 0.0,
            optim: OptimSettings::cifar(),
            label_smoothing: 0.0,
            aux_weight: 0.4,
            ema_decay: None,
            classifier_init: ClassifierInit::TfSlim,
            augment: Augment::Standard,
            cutout: Some(16),
            eval: EvalSplit::Test,
            eval_every_epochs: 10,
            eval_batch_size: 250,
            log_every_steps: 100,
            checkpoint_every_epochs: 1,
            checkpoint_every_minutes: Some(30.0),
        }
    }

    /// NASNet-A Mobile on ImageNet: RMSProp (0.9, momentum 0.9, ε 1),
    /// weight decay 4e-5, clip 10, label smoothing 0.1, aux 0.4, weight EMA 0.9999, decay 0.97
    /// every 2.4 epochs. TF-Slim ran 50 synchronous replicas of batch 32 at lr 0.04 · 50 for
    /// 250,000 steps (≈ 312 epochs); on one machine that is batch 32 at lr 0.04 (the same lr
    /// per image) for 312 epochs.
    pub fn imagenet_mobile() -> Recipe {
        Recipe {
            name: "imagenet-mobile".into(),
            network: NetworkConfig::mobile(),
            epochs: 312,
            max_steps: None,
            batch_size: 32,
            lr: 0.04,
            decay: Decay::Exponential { rate: 0.97, epochs_per_decay: 2.4 },
            warmup_epochs: 0.0,
            optim: OptimSettings::imagenet_mobile(),
            label_smoothing: 0.1,
            aux_weight: 0.4,
            ema_decay: Some(0.9999),
            classifier_init: ClassifierInit::TfSlim,
            augment: Augment::Standard,
            cutout: None,
            eval: EvalSplit::Test,
            eval_every_epochs: 1,
            eval_batch_size: 100,
            log_every_steps: 100,
            checkpoint_every_epochs: 1,
            checkpoint_every_minutes: Some(30.0),
        }
    }

    /// NASNet-A Large on ImageNet: as Mobile with weight decay 5e-5 and TF-Slim's 100
    /// replicas of batch 16 at lr 0.015 · 100, i.e. batch 16 at lr 0.015 here.
    pub fn imagenet_large() -> Recipe {
        Recipe {
            name: "imagenet-large".into(),
            network: NetworkConfig::large(),
            batch_size: 16,
            lr: 0.015,
            optim: OptimSettings::imagenet_large(),
            ..Recipe::imagenet_mobile()
        }
    }

    /// The learning-rate schedule over `total_steps` steps of `steps_per_epoch` each.
    pub fn schedule(&self, total_steps: u64, steps_per_epoch: u64) -> LrSchedule {
        let inner = match self.decay {
            Decay::Cosine => LrSchedule::Cosine { lr: self.lr, total_steps, min_lr: 0.0 },
            Decay::Exponential { rate, epochs_per_decay } => {
                LrSchedule::exponential_per_epochs(self.lr, rate, epochs_per_decay, steps_per_epoch as f64)
            }
            Decay::Constant => LrSchedule::Constant { lr: self.lr },
        };
        let warmup = (self.warmup_epochs * steps_per_epoch as f64).round() as u64;
        if warmup > 0 {
            inner.with_warmup(warmup)
        } else {
            inner
        }
    }

    /// The trainer's settings for `total_steps` steps of `steps_per_epoch` each, seeded by
    /// `seed`: the schedule, optimiser, label smoothing, aux weight and weight average.
    pub fn train_config(&self, total_steps: u64, steps_per_epoch: u64, seed: u64) -> TrainConfig {
        TrainConfig {
            total_steps,
            schedule: self.schedule(total_steps, steps_per_epoch),
            optim: self.optim,
            label_smoothing: self.label_smoothing,
            aux_weight: self.aux_weight,
            seed,
            ema_decay: self.ema_decay,
        }
    }

    /// Checks the fields the trainer does not check itself; the error names the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let err = |field: &'static str, message: String| Err(TrainError::Config { field, message });
        if self.epochs == 0 && self.max_steps.is_none() {
            return err("epochs", "must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return err("max_steps", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return err("batch_size", "must be at least 1".into());
        }
        if self.eval_batch_size == 0 {
            return err("eval_batch_size", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return err("lr", format!("must be finite and positive, got {}", self.lr));
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            return err("warmup_epochs", format!("must be finite and non-negative, got {}", self.warmup_epochs));
        }
        if let Decay::Exponential { rate, epochs_per_decay } = self.decay {
            if !(rate > 0.0 && rate <= 1.0) {
                return err("decay.rate", format!("must be in (0, 1], got {rate}"));
            }
            if !(epochs_per_decay.is_finite() && epochs_per_decay > 0.0) {
                return err("decay.epochs_per_decay", format!("must be positive, got {epochs_per_decay}"));
            }
        }
        if let EvalSplit::Holdout { fraction, .. } = self.eval {
            if !(fraction > 0.0 && fraction < 1.0) {
                return err("eval.fraction", format!("must be in (0, 1), got {fraction}"));
            }
        }
        if let Some(minutes) = self.checkpoint_every_minutes {
            if !(minutes.is_finite() && minutes > 0.0) {
                return err("checkpoint_every_minutes", format!("must be positive, got {minutes}"));
            }
        }
        if self.log_every_steps == 0 {
            return err("log_every_steps", "must be at least 1".into());
        }
        self.optim.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_follow_the_paper() {
        let child = Recipe::search_child();
        assert_eq!((child.network.n, child.epochs, child.eval), (2, 20, EvalSplit::Holdout { fraction: 0.1, seed: 0 }));
        assert_eq!(child.decay, Decay::Cosine);
        // The small child is the paper's child, smaller and shorter.
        let small = Recipe::small_search_child(7);
        assert_eq!((small.network.n, small.network.num_conv_filters, small.epochs, small.lr), (2, 4, 2, 0.1));
        assert_eq!(small.eval, EvalSplit::Holdout { fraction: 0.52, seed: 7 });
        // On the search's default images: 960 to train (as before), over 1,000 to validate.
        let held_out = (2000.0 * Recipe::SMALL_HOLDOUT).round() as usize;
        assert_eq!((2000 - held_out, held_out), (960, 1040));
        assert_eq!((small.augment, small.decay, small.optim), (child.augment, child.decay, child.optim));
        assert_eq!(small.network, NetworkConfig { num_conv_filters: 4, ..child.network.clone() });
        small.validate().unwrap();
        let cifar = Recipe::cifar();
        assert_eq!((cifar.epochs, cifar.batch_size, cifar.lr, cifar.cutout), (600, 32, 0.025, Some(16)));
        // 600 epochs of 50k at batch 32 is TF-Slim's total_training_steps (937,500); the run
        // loop drops each epoch's last partial batch, so it takes 600 × 1,562 = 937,200 steps.
        assert_eq!(600.0 * 50_000.0 / cifar.batch_size as f64, 937_500.0);
        let mobile = Recipe::imagenet_mobile();
        assert_eq!((mobile.label_smoothing, mobile.aux_weight, mobile.ema_decay), (0.1, 0.4, Some(0.9999)));
        let large = Recipe::imagenet_large();
        assert_eq!((large.network.num_conv_filters, large.batch_size, large.optim.weight_decay), (168, 16, 5e-5));
        for name in Recipe::PRESETS {
            Recipe::preset(name).unwrap().validate().unwrap();
        }
        assert!(Recipe::preset("huge").unwrap_err().to_string().contains("huge"));
    }

    #[test]
    fn schedules_of_the_recipes_at_known_steps() {
        // Cosine: half way is half the rate; the end is 0.
        let s = Recipe::cifar().schedule(1000, 10);
        assert_eq!(s.lr(0), 0.025);
        assert!((s.lr(500) - 0.0125).abs() < 1e-12);
        assert_eq!(s.lr(1000), 0.0);
        // Staircase: 0.97 after 2.4 epochs of 100 steps, i.e. from step 240.
        let s = Recipe::imagenet_mobile().schedule(100_000, 100);
        assert_eq!((s.lr(239), s.lr(240)), (0.04, 0.04 * 0.97));
        // Warm-up: linear over the first epoch.
        let s = Recipe { warmup_epochs: 1.0, ..Recipe::cifar() }.schedule(1000, 10);
        assert_eq!(s.lr(5), 0.025 * 0.5);
    }

    #[test]
    fn bad_fields_are_named() {
        for (recipe, field) in [
            (Recipe { batch_size: 0, ..Recipe::cifar() }, "batch_size"),
            (Recipe { lr: f64::NAN, ..Recipe::cifar() }, "lr"),
            (Recipe { eval: EvalSplit::Holdout { fraction: 1.0, seed: 0 }, ..Recipe::cifar() }, "eval.fraction"),
            (Recipe { epochs: 0, ..Recipe::cifar() }, "epochs"),
        ] {
            let err = recipe.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
