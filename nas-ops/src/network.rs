//! A whole NASNet network, built from a (`CellSpec`, `NetworkConfig`).
//!
//! TF-Slim `nasnet.py` (`_build_nasnet_base`, `_imagenet_stem`, `_cifar_stem`,
//! `_build_aux_head`); the wiring (which output feeds which cell, widths, strides,
//! shapes) is `nas_space::NetworkConfig::plan`, so this file only instantiates it.
//! Weight names follow timm `nasnet.py` (`conv0.conv`, `conv0.bn`, `cell_stem_0`,
//! `cell_{n}`, `reduction_cell_{k}`, `last_linear`); the aux head, which timm lacks,
//! lives under `aux_head`.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use nas_space::network::{NetworkPlan, Stem};
use nas_space::{CellSpec, NetworkConfig};

use crate::cell::CellModule;
use crate::drop_path::{DropPath, DropPathSchedule};
use crate::kernels::pool::{pool2d, PoolOptions};
use crate::kernels::Padding2d;
use crate::layers::{global_avg_pool, BatchNorm, Conv2d, Conv2dConfig};
use crate::ops::{ActConvBn, ActConvBnConfig, BnConfig};

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct NetOutput {
    /// `(batch, num_classes)` logits.
    pub logits: Tensor,
    /// The aux head's logits, in training mode when the config has an aux head.
    pub aux_logits: Option<Tensor>,
}

/// The auxiliary classifier (`_build_aux_head`, §5.10).
#[derive(Debug, Clone)]
struct AuxHead {
    proj: ActConvBn,
    conv: ActConvBn,
    fc: Linear,
}

impl AuxHead {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = pool2d(&xs.relu()?, PoolOptions::avg(5, 3, Padding2d::default()))?;
        let xs = self.proj.forward_t(&xs, train)?.relu()?;
        let xs = self.conv.forward_t(&xs, train)?.relu()?;
        self.fc.forward(&xs.flatten_from(1)?)
    }
}

/// A NASNet network with its own weights.
#[derive(Debug, Clone)]
pub struct NasNet {
    plan: NetworkPlan,
    stem_conv: Conv2d,
    stem_bn: BatchNorm,
    cells: Vec<CellModule>,
    aux: Option<AuxHead>,
    classifier: Linear,
    dense_dropout_keep_prob: f64,
    image_size: usize,
    schedule: DropPathSchedule,
}

fn spec_err(err: nas_space::SpecError) -> candle_core::Error {
    candle_core::Error::Msg(err.to_string())
}

impl NasNet {
    /// Builds the network `config` describes around `spec`. Masks for drop path and
    /// dropout come from `seed`.
    pub fn new(spec: &CellSpec, config: &NetworkConfig, seed: u64, vb: VarBuilder) -> Result<NasNet> {
        let plan = config.plan(spec).map_err(spec_err)?;
        let bn = BnConfig { eps: config.bn_epsilon, decay: config.bn_decay };
        let sc = plan.stem_conv;
        let stem_cfg = Conv2dConfig {
            c_in: sc.c_in,
            c_out: sc.c_out,
            kh: sc.kernel,
            kw: sc.kernel,
            stride: sc.stride,
            dilation: 1,
            same: sc.same_padding,
        };
        let stem_conv = Conv2d::new(stem_cfg, vb.pp("conv0").pp("conv"))?;
        let stem_bn = BatchNorm::new(sc.c_out, bn.eps, bn.decay, vb.pp("conv0").pp("bn"))?;
        let schedule = DropPathSchedule::new(seed);
        let cells = plan
            .cells
            .iter()
            .map(|cell| {
                let drop_path = (config.drop_path_keep_prob < 1.0).then(|| {
                    DropPath::new(
                        schedule.clone(),
                        cell.drop_path_index,
                        plan.total_num_cells,
                        config.drop_path_keep_prob,
                    )
                });
                CellModule::new(spec.cell(cell.kind), &cell.layout, bn, drop_path, vb.pp(&cell.name))
            })
            .collect::<Result<_>>()?;
        let aux = match plan.aux {
            Some(aux) => {
                let vb = vb.pp("aux_head");
                let proj_cfg =
                    ActConvBnConfig { relu_input: false, conv: Conv2dConfig::square(aux.input.channels, 128, 1) };
                let proj = ActConvBn::new(proj_cfg, bn, vb.pp("proj"))?;
                let k = aux.pooled_size;
                let conv_cfg =
                    Conv2dConfig { c_in: 128, c_out: 768, kh: k, kw: k, stride: 1, dilation: 1, same: false };
                let conv = ActConvBn::new(ActConvBnConfig { relu_input: false, conv: conv_cfg }, bn, vb.pp("conv"))?;
                let fc = linear(768, plan.head.num_classes, vb.pp("fc"))?;
                Some(AuxHead { proj, conv, fc })
            }
            None => None,
        };
        let classifier = linear(plan.head.c_in, plan.head.num_classes, vb.pp("last_linear"))?;
        Ok(NasNet {
            dense_dropout_keep_prob: plan.head.dense_dropout_keep_prob,
            image_size: config.image_size,
            plan,
            stem_conv,
            stem_bn,
            cells,
            aux,
            classifier,
            schedule,
        })
    }

    /// The wiring this network was built from.
    /// The cells, in the plan's order (tests compare their inference paths).
    #[cfg(test)]
    pub(crate) fn cells(&self) -> &[CellModule] {
        &self.cells
    }

    pub fn plan(&self) -> &NetworkPlan {
        &self.plan
    }

    /// The drop-path schedule: set the training progress on it every step.
    pub fn drop_path(&self) -> &DropPathSchedule {
        &self.schedule
    }

    /// Every output in `plan().outputs` order: the stem conv, then each cell.
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, image_size, image_size)`
    pub fn forward_outputs(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let stem = self.stem_bn.forward_t(&self.stem_conv.forward(xs)?, train)?;
        let stem = if crate::grad_enabled() { stem } else { stem.detach() };
        let mut outputs = vec![stem];
        for (cell, plan) in self.cells.iter().zip(&self.plan.cells) {
            let prev = plan.prev.map(|p| &outputs[p]);
            let out = cell.forward_t(&outputs[plan.x], prev, train)?;
            outputs.push(out);
        }
        Ok(outputs)
    }

    /// Logits, and aux logits while training.
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, image_size, image_size)`
    /// - returns: logits `(batch, num_classes)`
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<NetOutput> {
        let (_, c, h, w) = xs.dims4()?;
        let (expected_c, s) = (self.plan.stem_conv.c_in, self.image_size);
        if (c, h, w) != (expected_c, s, s) {
            candle_core::bail!("nasnet: expected input (batch, {expected_c}, {s}, {s}), got {:?}", xs.dims());
        }
        let outputs = self.forward_outputs(xs, train)?;
        let aux_logits = match (&self.aux, self.plan.aux) {
            (Some(head), Some(aux)) if train => Some(head.forward_t(&outputs[aux.after_output], train)?),
            _ => None,
        };
        let last = outputs.last().expect("a network has outputs").relu()?;
        let mut pooled = global_avg_pool(&last)?;
        // Dropout masks come from the drop-path generator, so one saved generator state
        // (`DropPathSchedule::rng_state`) resumes both.
        if train && self.dense_dropout_keep_prob < 1.0 {
            let keep = self.dense_dropout_keep_prob;
            let n = pooled.elem_count();
            let mask: Vec<f32> = self
                .schedule
                .uniforms(n)
                .into_iter()
                .map(|u| if u < keep { (1.0 / keep) as f32 } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, pooled.dims(), pooled.device())?.to_dtype(pooled.dtype())?;
            pooled = (pooled * mask)?;
        }
        Ok(NetOutput { logits: self.classifier.forward(&pooled)?, aux_logits })
    }

    /// Which stem this network has.
    pub fn stem(&self) -> Stem {
        self.plan.stem
    }
}

fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((c_out, c_in), "weight", Init::Const(0.0))?;
    let bias = vb.get_with_hints(c_out, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}
