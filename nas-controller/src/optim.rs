//! The controller's optimizer, written out so that its moments can be saved and restored
//! exactly (candle-nn's `AdamW` keeps them private).
//!
//! Adam follows Kingma and Ba (2015) with bias correction and no weight decay, the same
//! arithmetic as candle-nn's `AdamW` with `weight_decay = 0`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{ControllerError, OptimizerKind, PpoConfig};

/// Adam or SGD over a fixed list of named variables.
#[derive(Debug)]
pub(crate) struct Optimizer {
    kind: OptimizerKind,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Steps taken so far (Adam's t).
    pub(crate) steps: u64,
    /// First and second moments per variable, in the variables' order (Adam only).
    moments: Vec<(Tensor, Tensor)>,
}

impl Optimizer {
    /// An optimizer with zero moments for `vars`.
    pub(crate) fn new(config: &PpoConfig, vars: &[(String, Var)]) -> Result<Optimizer, ControllerError> {
        let moments = match config.optimizer {
            OptimizerKind::Adam => vars
                .iter()
                .map(|(_, v)| Ok((v.zeros_like()?, v.zeros_like()?)))
                .collect::<Result<Vec<_>, ControllerError>>()?,
            OptimizerKind::Sgd => Vec::new(),
        };
        Ok(Optimizer {
            kind: config.optimizer,
            lr: config.learning_rate,
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_eps,
            steps: 0,
            moments,
        })
    }

    /// Global L2 norm of the gradients of `vars`.
    pub(crate) fn grad_norm(vars: &[(String, Var)], grads: &GradStore) -> Result<f64, ControllerError> {
        let mut total = 0.0f64;
        for (_, var) in vars {
            if let Some(g) = grads.get(var) {
                total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(total.sqrt())
    }

    /// One update of `vars` from `grads`, each gradient multiplied by `scale` first.
    pub(crate) fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        scale: f64,
    ) -> Result<(), ControllerError> {
        self.steps += 1;
        let t = self.steps as i32;
        for (i, (_, var)) in vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let g = if scale != 1.0 { (g * scale)? } else { g.clone() };
            match self.kind {
                OptimizerKind::Sgd => var.set(&(var.as_tensor() - (g * self.lr)?)?)?,
                OptimizerKind::Adam => {
                    let (m, v) = &self.moments[i];
                    let next_m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
                    let next_v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                    let m_hat = (&next_m * (1.0 / (1.0 - self.beta1.powi(t))))?;
                    let v_hat = (&next_v * (1.0 / (1.0 - self.beta2.powi(t))))?;
                    let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                    var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
                    self.moments[i] = (next_m, next_v);
                }
            }
        }
        Ok(())
    }

    /// The moments as named tensors `adam.m.<var>` and `adam.v.<var>` (for saving).
    pub(crate) fn tensors(&self, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((name, _), (m, v)) in vars.iter().zip(&self.moments) {
            out.insert(format!("adam.m.{name}"), m.clone());
            out.insert(format!("adam.v.{name}"), v.clone());
        }
        out
    }

    /// Restores the moments saved by [`Optimizer::tensors`]; `Err` names a missing tensor
    /// or a wrong shape.
    pub(crate) fn restore(
        &mut self,
        vars: &[(String, Var)],
        tensors: &HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        self.steps = steps;
        if self.kind == OptimizerKind::Sgd {
            return Ok(());
        }
        for (i, (name, var)) in vars.iter().enumerate() {
            let get = |key: String| {
                let t = tensors.get(&key).ok_or_else(|| format!("tensor `{key}` is missing"))?;
                if t.dims() != var.dims() || t.dtype() != var.dtype() {
                    return Err(format!("tensor `{key}` is {:?} {:?}, expected {:?}", t.dtype(), t.dims(), var.dims()));
                }
                Ok(t.clone())
            };
            self.moments[i] = (get(format!("adam.m.{name}"))?, get(format!("adam.v.{name}"))?);
        }
        Ok(())
    }
}
