//! Every op of the NASNet search space as a candle module, with TF-Slim semantics.
//!
//! Paper §3 and §A.4; TF-Slim `nasnet_utils.py` (`_apply_conv_operation`,
//! `_stacked_separable_conv`, `_pooling`, `factorized_reduction`); timm `nasnet.py`
//! (`BranchSeparables`, `ActConvBn`) for the weight names.
//! The op-level contract (what each op is, in layers) is documented on `nas_space::Op`;
//! where projections go is decided by `nas_space::network::OpLayout`.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use nas_space::network::OpLayout;
use nas_space::{Op, OpKind, PoolKind};

use crate::kernels::cell_eval::{Affine1x1, Half, Program, Step, Val};
use crate::kernels::concat::{cat_channels, split_channels, Part};
use crate::kernels::conv1x1::conv1x1_grads;
use crate::kernels::pool::{avg_pool2d, max_pool2d, pool2d_grad};
use crate::kernels::separable::{separable_stack, SeparableHalf};
use crate::kernels::separable_train::{separable_train, separable_train_traced, TrainHalf};
use crate::kernels::subsample::{subsample2_grad, subsample2_pair_grad};
use crate::kernels::Padding2d;
use crate::layers::{pointwise, subsample2, BatchNorm, Conv2d, Conv2dConfig, DepthwiseConv2d};
use crate::tape::{Grads, Tape, Traced};

/// BN settings shared by every layer of a network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnConfig {
    /// Epsilon.
    pub eps: f64,
    /// Moving-average decay (TF-Slim `batch_norm_decay`).
    pub decay: f64,
}

impl BnConfig {
    fn bn(&self, channels: usize, vb: VarBuilder) -> Result<BatchNorm> {
        BatchNorm::new(channels, self.eps, self.decay, vb)
    }
}

/// ReLU (optional) → conv → BN, as timm's `ActConvBn` (`conv`, `bn`).
#[derive(Debug, Clone)]
pub struct ActConvBn {
    relu: bool,
    conv: Conv2d,
    bn: BatchNorm,
}

impl ActConvBn {
    /// Builds the block; the conv's output channels set the BN width.
    pub fn new(relu: bool, conv: Conv2dConfig, bn: BnConfig, vb: VarBuilder) -> Result<ActConvBn> {
        Ok(ActConvBn { relu, conv: Conv2d::new(conv, vb.pp("conv"))?, bn: bn.bn(conv.c_out, vb.pp("bn"))? })
    }
}

impl ModuleT for ActConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.after_conv_t(&self.conv, xs, self.relu, false, train)
    }
}

/// One separable conv: depthwise `k × k` then pointwise (timm `SeparableConv2d`).
#[derive(Debug, Clone)]
struct SeparableConv {
    depthwise: DepthwiseConv2d,
    pointwise: Conv2d,
}

impl SeparableConv {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<SeparableConv> {
        Ok(SeparableConv {
            depthwise: DepthwiseConv2d::new(c_in, k, stride, 1, vb.pp("depthwise_conv2d"))?,
            pointwise: Conv2d::new(Conv2dConfig::square(c_in, c_out, 1), vb.pp("pointwise_conv2d"))?,
        })
    }

    /// This conv and the eval-mode `bn` after it, for `kernels::separable`.
    fn half(&self, bn: &BatchNorm, relu_in: bool, relu_out: bool) -> Result<SeparableHalf> {
        let (depthwise, stride, dilation) = self.depthwise.parts();
        let (scale, shift) = bn.eval_affine()?;
        let pointwise = self.pointwise.weight().clone();
        Ok(SeparableHalf { depthwise: depthwise.clone(), stride, dilation, pointwise, scale, shift, relu_in, relu_out })
    }

    /// This conv and the training-mode `bn` after it, for `kernels::separable_train`.
    fn train_half(&self, bn: &BatchNorm, relu_in: bool, relu_out: bool) -> TrainHalf {
        let (depthwise, stride, dilation) = self.depthwise.parts();
        let (gamma, beta, eps) = bn.train_parts();
        TrainHalf {
            depthwise: depthwise.clone(),
            stride,
            dilation,
            pointwise: self.pointwise.weight().clone(),
            gamma: gamma.clone(),
            beta: beta.clone(),
            eps,
            relu_in,
            relu_out,
        }
    }

    /// The depthwise conv (reading `xs` through a ReLU with `relu_in`), the pointwise one,
    /// then `bn` (then a ReLU with `relu_out`; see `BatchNorm::after_conv_t`).
    fn forward_bn_t(&self, xs: &Tensor, relu_in: bool, bn: &BatchNorm, relu_out: bool, train: bool) -> Result<Tensor> {
        let xs = if relu_in { self.depthwise.forward_relu(xs)? } else { self.depthwise.forward(xs)? };
        bn.after_conv_t(&self.pointwise, &xs, false, relu_out, train)
    }
}

/// `sep_conv_kxk`: ReLU → sep(stride s, `c_in → F`) → BN → ReLU → sep(`F → F`) → BN
/// (TF-Slim `_stacked_separable_conv`; timm `BranchSeparables` with `stem_cell=True`
/// naming: `separable_1`, `bn_sep_1`, `separable_2`, `bn_sep_2`).
#[derive(Debug, Clone)]
pub struct SepConv {
    separable_1: SeparableConv,
    bn_sep_1: BatchNorm,
    separable_2: SeparableConv,
    bn_sep_2: BatchNorm,
}

impl SepConv {
    /// Builds the stacked separable conv; the stride is on the first depthwise only.
    pub fn new(c_in: usize, f: usize, k: usize, stride: usize, bn: BnConfig, vb: VarBuilder) -> Result<SepConv> {
        Ok(SepConv {
            separable_1: SeparableConv::new(c_in, f, k, stride, vb.pp("separable_1"))?,
            bn_sep_1: bn.bn(f, vb.pp("bn_sep_1"))?,
            separable_2: SeparableConv::new(f, f, k, 1, vb.pp("separable_2"))?,
            bn_sep_2: bn.bn(f, vb.pp("bn_sep_2"))?,
        })
    }
}

impl ModuleT for SepConv {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // Inference without gradients: both halves one sample at a time, each intermediate
        // kept in cache (`kernels::separable`).
        if !train && !crate::grad_enabled() && xs.device().is_cpu() {
            let halves = [
                self.separable_1.half(&self.bn_sep_1, true, true)?,
                self.separable_2.half(&self.bn_sep_2, false, false)?,
            ];
            return separable_stack(xs, &halves);
        }
        // Training with gradients: both halves as one node of candle's graph
        // (`kernels::separable_train`), the moving statistics updated from its batch ones.
        if train && crate::grad_enabled() {
            let halves = [
                self.separable_1.train_half(&self.bn_sep_1, true, true),
                self.separable_2.train_half(&self.bn_sep_2, false, false),
            ];
            let out = separable_train(xs, &halves)?;
            for (bn, stats) in [&self.bn_sep_1, &self.bn_sep_2].into_iter().zip(&out.stats) {
                bn.update_moving(&stats.mean, &stats.var, stats.count)?;
            }
            return Ok(out.ys);
        }
        // Both ReLUs are fused: the first into the depthwise conv's input read, the second
        // into the batch norm before it; neither's output is stored.
        let xs = self.separable_1.forward_bn_t(xs, true, &self.bn_sep_1, true, train)?;
        self.separable_2.forward_bn_t(&xs, false, &self.bn_sep_2, false, train)
    }
}

/// ReLU → a chain of dense convs (the first strided, `c_in → F`) → BN: `conv_1x1`,
/// `conv_3x3`, `dil_conv_3x3` (one conv, named `conv`) and `conv_1x3_3x1`,
/// `conv_1x7_7x1` (two convs, `conv_1`, `conv_2`).
#[derive(Debug, Clone)]
pub struct ConvChain {
    convs: Vec<Conv2d>,
    bn: BatchNorm,
}

impl ConvChain {
    /// Builds the chain from `nas_space::OpKind::Conv` entries `(kh, kw, dilation)`.
    pub fn new(
        chain: &[(usize, usize, usize)],
        c_in: usize,
        f: usize,
        stride: usize,
        bn: BnConfig,
        vb: VarBuilder,
    ) -> Result<ConvChain> {
        let convs = chain
            .iter()
            .enumerate()
            .map(|(i, &(kh, kw, dilation))| {
                let cfg = Conv2dConfig {
                    c_in: if i == 0 { c_in } else { f },
                    c_out: f,
                    kh,
                    kw,
                    stride: if i == 0 { stride } else { 1 },
                    dilation,
                    same: true,
                };
                let name = if chain.len() == 1 { "conv".to_string() } else { format!("conv_{}", i + 1) };
                Conv2d::new(cfg, vb.pp(name))
            })
            .collect::<Result<_>>()?;
        Ok(ConvChain { convs, bn: bn.bn(f, vb.pp("bn"))? })
    }
}

impl ModuleT for ConvChain {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (last, rest) = self.convs.split_last().expect("a conv chain has a conv");
        let mut xs = xs.clone();
        for (i, conv) in rest.iter().enumerate() {
            xs = conv.forward_relu_if(&xs, i == 0)?;
        }
        self.bn.after_conv_t(last, &xs, rest.is_empty(), false, train)
    }
}

/// A SAME pooling window, then 1×1 conv → BN (no ReLU) when `c_in != F` (TF-Slim `_pooling`).
#[derive(Debug, Clone)]
pub struct Pool {
    kind: PoolKind,
    kernel: usize,
    stride: usize,
    projection: Option<ActConvBn>,
}

impl ModuleT for Pool {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let pad = Padding2d::same(h, w, self.kernel, self.kernel, self.stride, 1);
        let ys = match self.kind {
            PoolKind::Avg => avg_pool2d(xs, self.kernel, self.stride, pad)?,
            PoolKind::Max => max_pool2d(xs, self.kernel, self.stride, pad)?,
        };
        match &self.projection {
            Some(p) => p.forward_t(&ys, train),
            None => Ok(ys),
        }
    }
}

/// TF-Slim `factorized_reduction` to `c_out` channels, without a leading ReLU.
/// Stride 2: two half-width 1×1 convs on the even and the odd (shifted) positions
/// (`path_1.conv`, `path_2.conv`; path 2 gets the odd channel) → concat → BN
/// (`final_path_bn`). Stride 1: one 1×1 conv (`path_1.conv`) → BN (`final_path_bn`).
#[derive(Debug, Clone)]
pub struct FactorizedReduction {
    path_1: Conv2d,
    path_2: Option<Conv2d>,
    bn: BatchNorm,
}

impl FactorizedReduction {
    /// Builds the reduction.
    pub fn new(c_in: usize, c_out: usize, stride: usize, bn: BnConfig, vb: VarBuilder) -> Result<FactorizedReduction> {
        let (path_1, path_2) = match stride {
            1 => (Conv2d::new(Conv2dConfig::square(c_in, c_out, 1), vb.pp("path_1").pp("conv"))?, None),
            2 => {
                let half = c_out / 2;
                let p1 = Conv2d::new(Conv2dConfig::square(c_in, half, 1), vb.pp("path_1").pp("conv"))?;
                let p2 = Conv2d::new(Conv2dConfig::square(c_in, c_out - half, 1), vb.pp("path_2").pp("conv"))?;
                (p1, Some(p2))
            }
            other => candle_core::bail!("factorized reduction: stride {other} is not 1 or 2"),
        };
        Ok(FactorizedReduction { path_1, path_2, bn: bn.bn(c_out, vb.pp("final_path_bn"))? })
    }
}

impl ModuleT for FactorizedReduction {
    /// # Shapes
    /// - `xs`: `(batch, c_in, h, w)`
    /// - returns: `(batch, c_out, ceil(h / stride), ceil(w / stride))`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(xs, train, false)
    }
}

impl FactorizedReduction {
    /// `forward_t(&xs.relu(), train)` with the ReLU read inside the 1×1 convs (it commutes
    /// with the subsampling, whose padding is zeros).
    pub fn forward_relu_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(xs, train, true)
    }

    fn forward_with(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let ys = match &self.path_2 {
            None => self.path_1.forward_relu_if(xs, relu)?,
            Some(path_2) => {
                let a = self.path_1.forward_relu_if(&subsample2(xs, 0)?, relu)?;
                let b = path_2.forward_relu_if(&subsample2(xs, 1)?, relu)?;
                Tensor::cat(&[&a, &b], 1)?
            }
        };
        self.bn.forward_t(&ys, train)
    }
}

/// One op of a block, built from its `nas_space::Op` and where it sits (`OpLayout`).
#[derive(Debug, Clone)]
pub enum CellOp {
    /// A true identity.
    Identity,
    /// Identity with ReLU → strided 1×1 conv → BN (stride > 1 or `c_in != F`).
    IdentityProjection {
        /// The projection.
        projection: ActConvBn,
        /// Its stride (the 1×1 conv reads every stride-th position).
        stride: usize,
    },
    /// Stacked separable conv.
    SepConv(SepConv),
    /// Dense conv chain.
    Conv(ConvChain),
    /// Pooling, with a projection when needed.
    Pool(Pool),
}

impl CellOp {
    /// The single place where the grammar meets candle: builds `op` for the input,
    /// stride and projection that `layout` records, with width `f`.
    pub fn new(op: Op, layout: &OpLayout, f: usize, bn: BnConfig, vb: VarBuilder) -> Result<CellOp> {
        let c_in = layout.input.channels;
        let stride = layout.stride;
        Ok(match op.kind() {
            OpKind::Identity if layout.projection => {
                // A strided 1×1 conv reads the top-left of every window: subsample, then project.
                let cfg = Conv2dConfig::square(c_in, f, 1);
                CellOp::IdentityProjection { projection: ActConvBn::new(true, cfg, bn, vb)?, stride }
            }
            OpKind::Identity => CellOp::Identity,
            OpKind::SepConv { kernel } => CellOp::SepConv(SepConv::new(c_in, f, kernel, stride, bn, vb)?),
            OpKind::Conv(chain) => CellOp::Conv(ConvChain::new(chain, c_in, f, stride, bn, vb)?),
            OpKind::Pool { kind, kernel } => {
                let projection = if layout.projection {
                    Some(ActConvBn::new(false, Conv2dConfig::square(c_in, f, 1), bn, vb)?)
                } else {
                    None
                };
                CellOp::Pool(Pool { kind, kernel, stride, projection })
            }
        })
    }

    /// For an op without weights whose output depends only on its input (a pooling
    /// without projection), what identifies it: two such ops with equal keys on the same
    /// state give the same tensor, so a cell computes it once. `None` for every other op.
    pub fn pure_key(&self) -> Option<(PoolKind, usize, usize)> {
        match self {
            CellOp::Pool(Pool { kind, kernel, stride, projection: None }) => Some((*kind, *kernel, *stride)),
            _ => None,
        }
    }

    /// Whether ScheduledDropPath applies to this op's output (never to identities, even
    /// projected ones: TF-Slim §5.9).
    pub fn takes_drop_path(&self) -> bool {
        !matches!(self, CellOp::Identity | CellOp::IdentityProjection { .. })
    }
}

impl ModuleT for CellOp {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            CellOp::Identity => Ok(xs.clone()),
            CellOp::IdentityProjection { projection, stride } => {
                let xs = match stride {
                    1 => xs.clone(),
                    2 => subsample2(xs, 0)?,
                    s => avg_pool2d(xs, 1, *s, Padding2d::default())?,
                };
                projection.forward_t(&xs, train)
            }
            CellOp::SepConv(op) => op.forward_t(xs, train),
            CellOp::Conv(op) => op.forward_t(xs, train),
            CellOp::Pool(op) => op.forward_t(xs, train),
        }
    }
}

// Training on a tape (`cell::CellModule`'s fused path): each op's training forward on
// detached tensors, recorded with its backward. Dense convs have no traced form: they run
// by candle's autograd on a graph of their own (`Tape::record_candle`).

impl ActConvBn {
    /// `forward_t(xs, true)` recorded on `tape`.
    pub(crate) fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        if self.conv.is_pointwise() {
            return self.bn.trace_after_pointwise(tape, &self.conv, xs, self.relu);
        }
        let (gamma, beta, _) = self.bn.train_parts();
        tape.record_candle(xs, &[self.conv.weight(), gamma, beta], |xs| self.forward_t(xs, true))
    }
}

impl ConvChain {
    /// By candle's autograd (`Tape::record_candle`): dense convs have no traced form.
    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let (gamma, beta, _) = self.bn.train_parts();
        let weights: Vec<&Tensor> = self.convs.iter().map(Conv2d::weight).chain([gamma, beta]).collect();
        tape.record_candle(xs, &weights, |xs| self.forward_t(xs, true))
    }
}

impl SepConv {
    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let halves = [
            self.separable_1.train_half(&self.bn_sep_1, true, true),
            self.separable_2.train_half(&self.bn_sep_2, false, false),
        ];
        let (ys, stats) = separable_train_traced(tape, xs, &halves)?;
        for (bn, stats) in [&self.bn_sep_1, &self.bn_sep_2].into_iter().zip(&stats) {
            bn.update_moving(&stats.mean, &stats.var, stats.count)?;
        }
        Ok(ys)
    }
}

impl Pool {
    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let (_, _, h, w) = xs.tensor.dims4()?;
        let (kernel, stride) = (self.kernel, self.stride);
        let pad = Padding2d::same(h, w, kernel, kernel, stride, 1);
        let max = self.kind == PoolKind::Max;
        let ys = if max {
            max_pool2d(&xs.tensor, kernel, stride, pad)?
        } else {
            avg_pool2d(&xs.tensor, kernel, stride, pad)?
        };
        let input = xs.tensor.clone();
        let pooled = tape.record(&[xs], &[], ys, move |grad| {
            Ok(Grads { inputs: vec![Some(pool2d_grad(max, &input, grad, kernel, stride, pad)?)], weights: vec![] })
        });
        match &self.projection {
            Some(p) => p.trace(tape, &pooled),
            None => Ok(pooled),
        }
    }
}

impl FactorizedReduction {
    /// `forward_relu_t(xs, true)` (with `relu`) or `forward_t(xs, true)` recorded on `tape`.
    pub(crate) fn trace(&self, tape: &mut Tape, xs: &Traced, relu: bool) -> Result<Traced> {
        let Some(path_2) = &self.path_2 else { return self.bn.trace_after_pointwise(tape, &self.path_1, xs, relu) };
        let (w1, w2) = (tape.weight(self.path_1.weight())?, tape.weight(path_2.weight())?);
        let (_, _, h, w) = xs.tensor.dims4()?;
        let (even, odd) = (subsample2(&xs.tensor, 0)?, subsample2(&xs.tensor, 1)?);
        let a = pointwise(&even, &w1.tensor, relu)?;
        let b = pointwise(&odd, &w2.tensor, relu)?;
        let widths = [a.dim(1)?, b.dim(1)?];
        let pre = cat_channels(&[Part::Copy(a), Part::Copy(b)])?;
        let bn = self.bn.train_on(tape, &pre)?;
        let (weight_1, weight_2) = (w1.tensor.clone(), w2.tensor.clone());
        let (gamma, beta, ys) = (bn.gamma.clone(), bn.beta.clone(), bn.ys.clone());
        Ok(tape.record(&[xs], &[&w1, &w2, &gamma, &beta], ys, move |grad| {
            let (grad_pre, grad_gamma, grad_beta) = bn.grads(&pre, grad)?;
            let [grad_a, grad_b] = <[Tensor; 2]>::try_from(split_channels(&grad_pre, &widths)?).expect("two parts");
            let (grad_even, grad_w1) = conv1x1_grads(&even, &weight_1, &grad_a, relu)?;
            let (grad_odd, grad_w2) = conv1x1_grads(&odd, &weight_2, &grad_b, relu)?;
            let grad_xs = subsample2_pair_grad(&grad_even, &grad_odd, (h, w))?;
            Ok(Grads { inputs: vec![Some(grad_xs)], weights: vec![grad_w1, grad_w2, grad_gamma, grad_beta] })
        }))
    }
}

impl CellOp {
    /// `forward_t(xs, true)` recorded on `tape`.
    pub(crate) fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        match self {
            CellOp::Identity => Ok(xs.clone()),
            CellOp::IdentityProjection { projection, stride: 1 } => projection.trace(tape, xs),
            CellOp::IdentityProjection { projection, stride: 2 } => {
                let (_, _, h, w) = xs.tensor.dims4()?;
                let ys = subsample2(&xs.tensor, 0)?;
                let sub = tape.record(&[xs], &[], ys, move |grad| {
                    Ok(Grads { inputs: vec![Some(subsample2_grad(grad, 0, (h, w))?)], weights: vec![] })
                });
                projection.trace(tape, &sub)
            }
            CellOp::IdentityProjection { projection, .. } => {
                let (gamma, beta, _) = projection.bn.train_parts();
                let weights = [projection.conv.weight(), gamma, beta];
                tape.record_candle(xs, &weights, |xs| self.forward_t(xs, true))
            }
            CellOp::SepConv(op) => op.trace(tape, xs),
            CellOp::Conv(op) => op.trace(tape, xs),
            CellOp::Pool(op) => op.trace(tape, xs),
        }
    }
}

// Inference one sample at a time (`cell::CellModule`'s per-sample path): each op appends
// its steps to a `kernels::cell_eval::Program`. Dense convs other than 1×1 have none.

impl ActConvBn {
    /// Appends `dst (+)= self(src)`. Only 1×1 convs, which every `ActConvBn` of a cell is.
    pub(crate) fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, add: bool) -> Result<()> {
        if !self.conv.is_pointwise() {
            candle_core::bail!("a {:?} conv has no per-sample steps", self.conv.weight().dims())
        }
        let (scale, shift) = self.bn.eval_affine()?;
        let conv = Affine1x1 { weight: self.conv.weight().clone(), scale, shift };
        program.push(Step::Pointwise { src, relu: self.relu, conv, dst, add });
        Ok(())
    }
}

impl SepConv {
    fn eval_half(&self, second: bool) -> Result<Half> {
        let (conv, bn) = if second { (&self.separable_2, &self.bn_sep_2) } else { (&self.separable_1, &self.bn_sep_1) };
        let (depthwise, stride, dilation) = conv.depthwise.parts();
        let (scale, shift) = bn.eval_affine()?;
        Ok(Half {
            depthwise: depthwise.clone(),
            stride,
            dilation,
            pointwise: Affine1x1 { weight: conv.pointwise.weight().clone(), scale, shift },
            relu_in: !second,
            relu_out: !second,
        })
    }
}

impl FactorizedReduction {
    /// Appends `dst = self(relu?(src))`.
    pub(crate) fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, relu: bool) -> Result<()> {
        let (scale, shift) = self.bn.eval_affine()?;
        let Some(path_2) = &self.path_2 else {
            let conv = Affine1x1 { weight: self.path_1.weight().clone(), scale, shift };
            program.push(Step::Pointwise { src, relu, conv, dst, add: false });
            return Ok(());
        };
        let half = self.path_1.weight().dims()[0];
        let rest = dst.c - half;
        let sub = program.tmp((src.c, src.h.div_ceil(2), src.w.div_ceil(2)));
        for (offset, conv, (first, c)) in [(0, &self.path_1, (0, half)), (1, path_2, (half, rest))] {
            program.push(Step::Subsample { src, offset, relu, dst: sub });
            let conv = Affine1x1 {
                weight: conv.weight().clone(),
                scale: scale.narrow(0, first, c)?,
                shift: shift.narrow(0, first, c)?,
            };
            program.push(Step::Pointwise { src: sub, relu: false, conv, dst: dst.channels(first, c), add: false });
        }
        Ok(())
    }
}

impl ConvChain {
    /// The stride of a chain that is one 1×1 conv.
    fn pointwise_stride(&self) -> Option<usize> {
        match &self.convs[..] {
            [conv] if conv.weight().dims()[2..] == [1, 1] => Some(conv.stride()),
            _ => None,
        }
    }
}

impl CellOp {
    /// Whether [`eval_steps`](Self::eval_steps) has steps for this op.
    pub(crate) fn has_eval_steps(&self) -> bool {
        match self {
            CellOp::Identity | CellOp::SepConv(_) => true,
            CellOp::IdentityProjection { stride, .. } => *stride <= 2,
            CellOp::Conv(op) => op.pointwise_stride().is_some_and(|s| s <= 2),
            CellOp::Pool(op) => op.projection.as_ref().is_none_or(|p| p.conv.is_pointwise()),
        }
    }

    /// Appends `dst (+)= self(src)` (see [`has_eval_steps`](Self::has_eval_steps)).
    pub(crate) fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, add: bool) -> Result<()> {
        let done = match self {
            CellOp::Identity => {
                program.push(Step::Copy { src, dst, add });
                true
            }
            CellOp::IdentityProjection { projection, stride: 1 } => {
                projection.eval_steps(program, src, dst, add)?;
                true
            }
            CellOp::IdentityProjection { projection, stride: 2 } => {
                let sub = program.tmp((src.c, dst.h, dst.w));
                program.push(Step::Subsample { src, offset: 0, relu: false, dst: sub });
                projection.eval_steps(program, sub, dst, add)?;
                true
            }
            CellOp::IdentityProjection { .. } => false,
            CellOp::SepConv(op) => {
                let halves = vec![op.eval_half(false)?, op.eval_half(true)?];
                program.push(Step::Separable { src, halves, dst, add });
                true
            }
            CellOp::Conv(op) if op.pointwise_stride().is_some_and(|s| s <= 2) => {
                let (scale, shift) = op.bn.eval_affine()?;
                let conv = Affine1x1 { weight: op.convs[0].weight().clone(), scale, shift };
                // A strided 1×1 conv reads the top-left of every window: subsample, then convolve.
                let (src, relu) = if op.pointwise_stride() == Some(2) {
                    let sub = program.tmp((src.c, dst.h, dst.w));
                    program.push(Step::Subsample { src, offset: 0, relu: true, dst: sub });
                    (sub, false)
                } else {
                    (src, true)
                };
                program.push(Step::Pointwise { src, relu, conv, dst, add });
                true
            }
            CellOp::Conv(_) => false,
            CellOp::Pool(op) => {
                let (max, kernel, stride) = (op.kind == PoolKind::Max, op.kernel, op.stride);
                match &op.projection {
                    None => {
                        program.push(Step::Pool { src, max, kernel, stride, dst, add });
                        true
                    }
                    Some(projection) => {
                        let pooled = program.tmp((src.c, dst.h, dst.w));
                        program.push(Step::Pool { src, max, kernel, stride, dst: pooled, add: false });
                        projection.eval_steps(program, pooled, dst, add)?;
                        true
                    }
                }
            }
        };
        if !done {
            candle_core::bail!("this op has no per-sample steps (see CellOp::has_eval_steps)")
        }
        Ok(())
    }
}
