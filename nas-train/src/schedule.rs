//! Learning-rate schedules, as the NASNet references use them.
//!
//! - The CIFAR recipe and the search children use a single-period cosine decay
//!   (TF `tf.train.cosine_decay`, TF-Slim `nasnet.py` comments: lr 0.025, batch 32).
//! - The ImageNet recipes use TF-Slim's staircase exponential decay, 0.97 every 2.4 epochs
//!   (`train_image_classifier.py`, `_configure_learning_rate`).
//! - A linear warm-up can wrap any of them (not used by TF-Slim; the semantics are those of
//!   the TF TPU reference trainers, see [`LrSchedule::Warmup`]).
//!
//! Steps count optimiser updates from 0, as TF's `global_step` does.

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// A learning rate as a function of the step.
///
/// Serialised with a `kind` tag, e.g. `{"kind":"cosine","lr":0.025,"total_steps":937500,"min_lr":0.0}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The same rate at every step.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// Single-period cosine decay from `lr` to `min_lr` over `total_steps`, then flat at
    /// `min_lr` (TF `tf.train.cosine_decay` with `alpha = min_lr / lr`):
    /// `lr · ((1 − α) · 0.5 · (1 + cos(π · min(step, T) / T)) + α)`.
    Cosine {
        /// The rate at step 0.
        lr: f64,
        /// `T`, the step at which the rate reaches `min_lr`.
        total_steps: u64,
        /// The final rate (`lr · alpha` in TF).
        min_lr: f64,
    },
    /// TF-Slim's staircase exponential decay: `lr · decay_rate^floor(step / decay_steps)`.
    ExponentialStaircase {
        /// The rate at step 0.
        lr: f64,
        /// The factor applied at every boundary.
        decay_rate: f64,
        /// Steps between two boundaries.
        decay_steps: u64,
    },
    /// A linear warm-up in front of another schedule.
    ///
    /// For `step < steps` the rate is `inner.lr(0) · step / steps` (it grows linearly from 0
    /// towards the inner schedule's base rate); from `step >= steps` on it is `inner.lr(step)`,
    /// the inner schedule at the *absolute* step, not shifted by the warm-up.
    /// This is what the TF TPU reference trainers do
    /// (`lr = tf.where(global_step < warmup_steps, base_lr · global_step / warmup_steps, lr)`),
    /// so the total length of a cosine schedule is unchanged by adding a warm-up.
    Warmup {
        /// Length of the warm-up; 0 disables it.
        steps: u64,
        /// The schedule that follows (not itself a warm-up).
        inner: Box<LrSchedule>,
    },
}

fn config_err(field: &'static str, message: impl Into<String>) -> TrainError {
    TrainError::Config { field, message: message.into() }
}

fn check_rate(field: &'static str, value: f64) -> Result<(), TrainError> {
    if !value.is_finite() || value < 0.0 {
        return Err(config_err(field, format!("must be finite and non-negative, got {value}")));
    }
    Ok(())
}

impl LrSchedule {
    /// The NASNet CIFAR recipe (TF-Slim `nasnet.py` comments): lr 0.025 at
    /// batch 32, single-period cosine decay to 0 over the whole training
    /// (`cifar_config.total_training_steps = 937,500` for 600 epochs).
    pub fn cifar(total_steps: u64) -> LrSchedule {
        LrSchedule::Cosine { lr: 0.025, total_steps, min_lr: 0.0 }
    }

    /// The NASNet ImageNet recipe (TF-Slim comments): staircase decay by 0.97
    /// every 2.4 epochs.
    /// The base rate is written per replica times replicas in TF-Slim: `0.04 · 50` for Mobile
    /// (batch 32 per replica), `0.015 · 100` for Large (batch 16 per replica).
    pub fn imagenet(lr: f64, steps_per_epoch: f64) -> LrSchedule {
        LrSchedule::exponential_per_epochs(lr, 0.97, 2.4, steps_per_epoch)
    }

    /// A staircase exponential decay whose period is given in epochs, as TF-Slim's
    /// `_configure_learning_rate` computes it:
    /// `decay_steps = int(samples_per_epoch / batch_size · epochs_per_decay)`.
    ///
    /// `steps_per_epoch` is `samples_per_epoch / batch_size` as a real number (divide it by
    /// `replicas_to_aggregate` too when emulating synchronous replicas, as TF-Slim does).
    /// A period that rounds down to 0 steps is caught by [`LrSchedule::validate`].
    pub fn exponential_per_epochs(lr: f64, decay_rate: f64, epochs_per_decay: f64, steps_per_epoch: f64) -> LrSchedule {
        let steps = steps_per_epoch * epochs_per_decay;
        let decay_steps = if steps.is_finite() && steps > 0.0 { steps.floor() as u64 } else { 0 };
        LrSchedule::ExponentialStaircase { lr, decay_rate, decay_steps }
    }

    /// Wraps `self` in a linear warm-up of `steps` steps (see [`LrSchedule::Warmup`]).
    pub fn with_warmup(self, steps: u64) -> LrSchedule {
        LrSchedule::Warmup { steps, inner: Box::new(self) }
    }

    /// The learning rate at `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        match self {
            LrSchedule::Constant { lr } => *lr,
            LrSchedule::Cosine { lr, total_steps, min_lr } => {
                if *total_steps == 0 {
                    return *min_lr;
                }
                let t = step.min(*total_steps) as f64 / *total_steps as f64;
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                // `lr · ((1 − α) · cosine + α)` with `α = min_lr / lr`, without the division.
                (lr - min_lr) * cosine + min_lr
            }
            LrSchedule::ExponentialStaircase { lr, decay_rate, decay_steps } => {
                let boundaries = step / (*decay_steps).max(1);
                lr * decay_rate.powf(boundaries as f64)
            }
            LrSchedule::Warmup { steps, inner } => {
                if step < *steps {
                    inner.lr(0) * step as f64 / *steps as f64
                } else {
                    inner.lr(step)
                }
            }
        }
    }

    /// Checks that every field is usable; the error names the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        match self {
            LrSchedule::Constant { lr } => check_rate("lr", *lr),
            LrSchedule::Cosine { lr, total_steps, min_lr } => {
                check_rate("lr", *lr)?;
                check_rate("min_lr", *min_lr)?;
                if min_lr > lr {
                    return Err(config_err("min_lr", format!("must not exceed lr ({lr}), got {min_lr}")));
                }
                if *total_steps == 0 {
                    return Err(config_err("total_steps", "must be at least 1"));
                }
                Ok(())
            }
            LrSchedule::ExponentialStaircase { lr, decay_rate, decay_steps } => {
                check_rate("lr", *lr)?;
                if !decay_rate.is_finite() || *decay_rate <= 0.0 {
                    return Err(config_err("decay_rate", format!("must be finite and positive, got {decay_rate}")));
                }
                if *decay_steps == 0 {
                    return Err(config_err("decay_steps", "must be at least 1"));
                }
                Ok(())
            }
            LrSchedule::Warmup { inner, .. } => {
                if matches!(**inner, LrSchedule::Warmup { .. }) {
                    return Err(config_err("inner", "must not itself be a warm-up"));
                }
                inner.validate()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} != {b}");
    }

    #[test]
    fn constant_is_constant() {
        let s = LrSchedule::Constant { lr: 0.1 };
        for step in [0, 1, 1000, u64::MAX] {
            close(s.lr(step), 0.1);
        }
    }

    #[test]
    fn cosine_known_points() {
        let s = LrSchedule::Cosine { lr: 0.025, total_steps: 1000, min_lr: 0.001 };
        close(s.lr(0), 0.025);
        close(s.lr(500), (0.025 + 0.001) / 2.0);
        // A quarter of the way: 0.5 · (1 + cos(π/4)).
        let q = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        close(s.lr(250), 0.001 + 0.024 * q);
        close(s.lr(1000), 0.001);
        close(s.lr(5000), 0.001);
        // The TF formula with alpha = min_lr / lr gives the same values.
        let alpha = 0.001 / 0.025;
        let tf = |step: u64| {
            let t = step.min(1000) as f64 / 1000.0;
            0.025 * ((1.0 - alpha) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()) + alpha)
        };
        for step in [0, 1, 333, 999, 1000, 1001] {
            close(s.lr(step), tf(step));
        }
        // Decreasing over the period.
        assert!(s.lr(1) < s.lr(0) && s.lr(999) > s.lr(1000));
    }

    #[test]
    fn cifar_preset_decays_to_zero() {
        let s = LrSchedule::cifar(937_500);
        close(s.lr(0), 0.025);
        close(s.lr(937_500 / 2), 0.0125);
        assert!(s.lr(937_500).abs() < 1e-18);
        s.validate().unwrap();
    }

    #[test]
    fn staircase_boundaries() {
        let s = LrSchedule::ExponentialStaircase { lr: 1.0, decay_rate: 0.97, decay_steps: 100 };
        close(s.lr(0), 1.0);
        close(s.lr(99), 1.0);
        close(s.lr(100), 0.97);
        close(s.lr(199), 0.97);
        close(s.lr(200), 0.97 * 0.97);
        close(s.lr(1050), 0.97f64.powi(10));
    }

    #[test]
    fn staircase_from_epochs_truncates_like_tf_slim() {
        // ImageNet at batch 1600: int(1281167 / 1600 · 2.4) = int(1921.7505) = 1921.
        let s = LrSchedule::exponential_per_epochs(1.5, 0.97, 2.4, 1_281_167.0 / 1600.0);
        assert_eq!(s, LrSchedule::ExponentialStaircase { lr: 1.5, decay_rate: 0.97, decay_steps: 1921 });
        close(s.lr(1920), 1.5);
        close(s.lr(1921), 1.5 * 0.97);
        assert_eq!(LrSchedule::imagenet(1.5, 1_281_167.0 / 1600.0), s);
        // A period shorter than one step is rejected.
        let err = LrSchedule::exponential_per_epochs(1.0, 0.97, 0.1, 2.0).validate().unwrap_err();
        assert!(err.to_string().contains("decay_steps"), "{err}");
    }

    #[test]
    fn warmup_then_inner_at_absolute_step() {
        let inner = LrSchedule::Cosine { lr: 0.1, total_steps: 1000, min_lr: 0.0 };
        let s = inner.clone().with_warmup(100);
        close(s.lr(0), 0.0);
        close(s.lr(50), 0.05);
        close(s.lr(99), 0.099);
        close(s.lr(100), inner.lr(100));
        close(s.lr(500), 0.05);
        close(s.lr(2000), 0.0);
        // A zero-length warm-up is the inner schedule.
        let none = inner.clone().with_warmup(0);
        for step in [0, 10, 1000] {
            close(none.lr(step), inner.lr(step));
        }
    }

    #[test]
    fn validate_names_the_field() {
        let cases = [
            (LrSchedule::Constant { lr: -1.0 }, "lr"),
            (LrSchedule::Constant { lr: f64::NAN }, "lr"),
            (LrSchedule::Cosine { lr: 0.1, total_steps: 0, min_lr: 0.0 }, "total_steps"),
            (LrSchedule::Cosine { lr: 0.1, total_steps: 10, min_lr: 0.2 }, "min_lr"),
            (LrSchedule::Cosine { lr: 0.1, total_steps: 10, min_lr: -0.1 }, "min_lr"),
            (LrSchedule::ExponentialStaircase { lr: 0.1, decay_rate: 0.0, decay_steps: 10 }, "decay_rate"),
            (LrSchedule::ExponentialStaircase { lr: 0.1, decay_rate: 0.9, decay_steps: 0 }, "decay_steps"),
            (LrSchedule::Constant { lr: 0.1 }.with_warmup(5).with_warmup(5), "inner"),
            (LrSchedule::Constant { lr: -0.1 }.with_warmup(5), "lr"),
        ];
        for (schedule, field) in cases {
            match schedule.validate() {
                Err(TrainError::Config { field: f, .. }) => assert_eq!(f, field, "{schedule:?}"),
                other => panic!("{schedule:?}: expected a config error on {field}, got {other:?}"),
            }
        }
        LrSchedule::Constant { lr: 0.0 }.validate().unwrap();
        LrSchedule::imagenet(2.0, 800.0).with_warmup(10).validate().unwrap();
    }

    #[test]
    fn serde_round_trip() {
        let schedules = [
            LrSchedule::Constant { lr: 0.1 },
            LrSchedule::cifar(937_500),
            LrSchedule::imagenet(2.0, 1_281_167.0 / 1600.0),
            LrSchedule::cifar(100).with_warmup(10),
        ];
        for s in schedules {
            let json = serde_json::to_string(&s).unwrap();
            let back: LrSchedule = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s, "{json}");
        }
        let json = serde_json::to_string(&LrSchedule::cifar(10).with_warmup(2)).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"warmup","steps":2,"inner":{"kind":"cosine","lr":0.025,"total_steps":10,"min_lr":0.0}}"#
        );
        let parsed: LrSchedule =
            serde_json::from_str(r#"{"kind":"exponential_staircase","lr":1.0,"decay_rate":0.5,"decay_steps":3}"#)
                .unwrap();
        close(parsed.lr(3), 0.5);
    }
}
