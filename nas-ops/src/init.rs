//! Deterministic weight initialisation as TF-Slim does it (`nasnet.py` arg scopes).
//!
//! Conv, depthwise, pointwise and FC weights: variance scaling with factor 2.0 in
//! FAN_OUT mode from a truncated normal, i.e. a normal with standard deviation
//! `sqrt(1.3 · 2 / fan_out)` cut at two standard deviations:
//! `fan_out = kh · kw · c_out` for a conv, `k · k` for a depthwise kernel (multiplier 1),
//! `c_out` for a dense layer. BN: γ = 1, β = 0, moving mean 0, moving variance 1.
//! Biases 0. Values come from a seeded generator, in sorted name order, so equal seeds
//! give equal networks (candle's CPU device cannot be seeded).

use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use nas_space::{fnv1a, SpaceRng};

/// Sets every variable of `varmap` from `seed`.
pub fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let parent = name.rsplit('.').nth(1).unwrap_or("");
        let value = match (leaf, dims.len()) {
            ("running_var", _) => Tensor::ones_like(var.as_tensor())?,
            ("running_mean" | "bias", _) => Tensor::zeros_like(var.as_tensor())?,
            ("weight", 1) => Tensor::ones_like(var.as_tensor())?,
            ("weight", 2 | 4) => {
                let fan_out = if parent == "depthwise_conv2d" {
                    dims[2] * dims[3]
                } else {
                    dims[0] * dims.get(2).copied().unwrap_or(1) * dims.get(3).copied().unwrap_or(1)
                };
                let std = (1.3 * 2.0 / fan_out as f64).sqrt();
                let mut rng = SpaceRng::new(seed ^ fnv1a(name.as_bytes()));
                let n: usize = dims.iter().product();
                let values: Vec<f32> = (0..n).map(|_| (truncated_normal(&mut rng) * std) as f32).collect();
                Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?
            }
            _ => candle_core::bail!("init_weights: no rule for variable `{name}` of shape {dims:?}"),
        };
        var.set(&value)?;
    }
    Ok(())
}

/// A standard normal redrawn until it lies within two standard deviations (Box–Muller).
fn truncated_normal(rng: &mut SpaceRng) -> f64 {
    loop {
        let u1 = rng.unit_f64().max(f64::MIN_POSITIVE);
        let u2 = rng.unit_f64();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        if z.abs() <= 2.0 {
            return z;
        }
    }
}

/// Rescales the classifiers (`last_linear.weight`, and `aux_head.fc.weight` if present) from
/// TF-Slim's fan-out scale to a fan-in scale, std `sqrt(1 / fan_in)` (LeCun; Keras and timm
/// start their classifiers near this), keeping the drawn values' shape.
///
/// TF-Slim's fan-out rule gives a 10-class classifier a std of `sqrt(2 / 10)`; on 1×1 or 2×2
/// final maps (the ImageNet skeleton on small images) the initial logits then have a std near
/// 10 and training barely moves for hundreds of steps. With 1000 classes the two rules are
/// close.
pub fn rescale_classifiers_fan_in(varmap: &VarMap) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for name in ["last_linear.weight", "aux_head.fc.weight"] {
        let Some(var) = data.get(name) else { continue };
        let (fan_out, fan_in) = var.dims2()?;
        let factor = (fan_out as f64 / (2.0 * fan_in as f64)).sqrt();
        var.set(&(var.as_tensor() * factor)?)?;
    }
    Ok(())
}
