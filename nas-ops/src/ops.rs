//! Every op of the NASNet search space as a candle module, with TF-Slim semantics.
//!
//! Paper §3 and §A.4; TF-Slim `nasnet_utils.py` (`_apply_conv_operation`,
//! `_stacked_separable_conv`, `_pooling`, `factorized_reduction`); timm `nasnet.py`
//! (`BranchSeparables`, `ActConvBn`) for the weight names.
//! The op-level contract (what each op is, in layers) is documented on `nas_space::Op`;
//! where projections go is decided by `nas_space::network::OpLayout`.
//!
//! Each op states its three forms in one place, its `impl OpForms`: as candle ops (every
//! mode, every device), traced on a tape (a training cell on the CPU, `crate::tape`), and as
//! per-sample steps (a cell in inference on the CPU, `kernels::cell_eval`). A cell runs
//! whichever its mode allows (`cell::CellModule`); a new op or fusion is one `impl`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use nas_space::network::OpLayout;
use nas_space::{Op, OpKind, PoolKind};

use crate::kernels::cell_eval::{Affine1x1, Program, Put, Step, Val};
use crate::kernels::concat::{cat_channels, split_channels, Part};
use crate::kernels::conv1x1::{conv1x1, conv1x1_grads, Conv1x1Options};
use crate::kernels::pool::{pool2d, pool2d_grad, PoolOptions};
use crate::kernels::separable::{separable_stack, SeparableHalf};
use crate::kernels::separable_train::{separable_train_reference, separable_train_traced, BatchStats};
use crate::kernels::subsample::{subsample2_grad, subsample2_pair_grad};
use crate::layers::{subsample2, BatchNorm, Conv2d, Conv2dConfig, DepthwiseConv2d, Relus};
use crate::tape::{Grads, Tape, Traced};

/// The three forms of an op inside a cell. Each computes the same values, gradients and
/// moving statistics (the tests of `crate::tests` hold them to it).
pub(crate) trait OpForms: std::fmt::Debug + Send + Sync {
    /// As candle ops, each a node of candle's graph: training mode with `train`, else
    /// evaluation with the moving statistics. Any mode, any device.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor>;

    /// `forward_t(xs, true)` on detached tensors, recorded on `tape` with its backward (CPU,
    /// f32 or f64). An op without a traced form of its own records candle's autograd on a
    /// graph of its own (`Tape::record_candle`).
    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced>;

    /// Appends to `program` the steps that put `forward_t(src, false)` into `dst` as `put`
    /// says. `Ok(false)`, having appended nothing, when the op has no per-sample steps (dense
    /// convs other than 1×1): the cell then runs as candle ops.
    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool>;
}

/// Implements candle's `ModuleT` for ops by their [`OpForms::forward_t`].
macro_rules! module_by_forms {
    ($($op:ty),*) => {$(
        impl candle_core::ModuleT for $op {
            fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
                OpForms::forward_t(self, xs, train)
            }
        }
    )*};
}

module_by_forms!(ActConvBn, SepConv, ConvChain, Pool, FactorizedReduction, CellOp);

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

/// A batch norm's eval-mode affine as the 1×1 conv `weight`'s step form.
fn affine(weight: &Tensor, bn: &BatchNorm) -> Result<Affine1x1> {
    let (scale, shift) = bn.params().eval_affine()?;
    Ok(Affine1x1 { weight: weight.clone(), scale, shift })
}

/// The shape of [`ActConvBn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActConvBnConfig {
    /// ReLU on the input.
    pub relu_input: bool,
    /// The conv; its output channels set the BN width.
    pub conv: Conv2dConfig,
}

/// ReLU (optional) → conv → BN, as timm's `ActConvBn` (`conv`, `bn`).
#[derive(Debug, Clone)]
pub struct ActConvBn {
    relu: bool,
    conv: Conv2d,
    bn: BatchNorm,
}

impl ActConvBn {
    /// Builds the block.
    pub fn new(cfg: ActConvBnConfig, bn: BnConfig, vb: VarBuilder) -> Result<ActConvBn> {
        let bn = bn.bn(cfg.conv.c_out, vb.pp("bn"))?;
        Ok(ActConvBn { relu: cfg.relu_input, conv: Conv2d::new(cfg.conv, vb.pp("conv"))?, bn })
    }

    fn relus(&self) -> Relus {
        Relus { input: self.relu, output: false }
    }
}

impl OpForms for ActConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.after_conv_t(&self.conv, xs, self.relus(), train)
    }

    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        if self.conv.is_pointwise() {
            return self.bn.trace_after_pointwise(tape, &self.conv, xs, self.relus());
        }
        let params = self.bn.params();
        tape.record_candle(xs, &[self.conv.weight(), &params.gamma, &params.beta], |xs| self.forward_t(xs, true))
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        if !self.conv.is_pointwise() {
            return Ok(false);
        }
        let conv = affine(self.conv.weight(), &self.bn)?;
        program.push(Step::Pointwise { src, relu: self.relu, conv, dst, put });
        Ok(true)
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

    /// This conv, the `bn` after it and the ReLUs around them, for `kernels::separable`.
    fn half(&self, bn: &BatchNorm, relus: Relus) -> SeparableHalf {
        let (depthwise, stride, dilation) = self.depthwise.parts();
        SeparableHalf {
            depthwise: depthwise.clone(),
            stride,
            dilation,
            pointwise: self.pointwise.weight().clone(),
            bn: bn.params(),
            relu_input: relus.input,
            relu_output: relus.output,
        }
    }
}

/// The shape of [`SepConv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SepConvConfig {
    /// Input channels.
    pub c_in: usize,
    /// Output channels (F).
    pub c_out: usize,
    /// The depthwise kernel's side.
    pub kernel: usize,
    /// Stride of the first depthwise conv.
    pub stride: usize,
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
    pub fn new(cfg: SepConvConfig, bn: BnConfig, vb: VarBuilder) -> Result<SepConv> {
        let SepConvConfig { c_in, c_out, kernel, stride } = cfg;
        Ok(SepConv {
            separable_1: SeparableConv::new(c_in, c_out, kernel, stride, vb.pp("separable_1"))?,
            bn_sep_1: bn.bn(c_out, vb.pp("bn_sep_1"))?,
            separable_2: SeparableConv::new(c_out, c_out, kernel, 1, vb.pp("separable_2"))?,
            bn_sep_2: bn.bn(c_out, vb.pp("bn_sep_2"))?,
        })
    }

    /// Both halves: the first reads its input through a ReLU and ends in one, the second
    /// has neither.
    fn halves(&self) -> [SeparableHalf; 2] {
        [
            self.separable_1.half(&self.bn_sep_1, Relus { input: true, output: true }),
            self.separable_2.half(&self.bn_sep_2, Relus::NONE),
        ]
    }

    fn update_moving(&self, stats: &[BatchStats]) -> Result<()> {
        for (bn, stats) in [&self.bn_sep_1, &self.bn_sep_2].into_iter().zip(stats) {
            bn.update_moving(&stats.mean, &stats.var, stats.count)?;
        }
        Ok(())
    }
}

impl OpForms for SepConv {
    /// Training: the unfused ops, the moving statistics updated from their batch ones (a
    /// cell on the CPU traces both halves as one op instead: `trace`). Inference: both
    /// halves one sample at a time where no gradient is needed on the CPU
    /// (`kernels::separable`), otherwise each kernel's unfused reference.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return separable_stack(xs, &self.halves());
        }
        let out = separable_train_reference(xs, &self.halves())?;
        self.update_moving(&out.stats)?;
        Ok(out.ys)
    }

    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let (ys, stats) = separable_train_traced(tape, xs, &self.halves())?;
        self.update_moving(&stats)?;
        Ok(ys)
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        program.push(Step::Separable { src, halves: self.halves().to_vec(), dst, put });
        Ok(true)
    }
}

/// The shape of [`ConvChain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvChainConfig<'a> {
    /// `nas_space::OpKind::Conv` entries `(kh, kw, dilation)`.
    pub chain: &'a [(usize, usize, usize)],
    /// Input channels.
    pub c_in: usize,
    /// Output channels (F).
    pub c_out: usize,
    /// Stride of the first conv.
    pub stride: usize,
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
    /// Builds the chain.
    pub fn new(cfg: ConvChainConfig, bn: BnConfig, vb: VarBuilder) -> Result<ConvChain> {
        let ConvChainConfig { chain, c_in, c_out, stride } = cfg;
        if chain.is_empty() {
            candle_core::bail!("a conv chain needs at least one conv")
        }
        let convs = chain
            .iter()
            .enumerate()
            .map(|(i, &(kh, kw, dilation))| {
                let cfg = Conv2dConfig {
                    c_in: if i == 0 { c_in } else { c_out },
                    c_out,
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
        Ok(ConvChain { convs, bn: bn.bn(c_out, vb.pp("bn"))? })
    }

    /// The stride of a chain that is one 1×1 conv at stride 1 or 2 (which has per-sample
    /// steps).
    fn pointwise_stride(&self) -> Option<usize> {
        match &self.convs[..] {
            [conv] if conv.weight().dims()[2..] == [1, 1] && conv.stride() <= 2 => Some(conv.stride()),
            _ => None,
        }
    }
}

impl OpForms for ConvChain {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (last, rest) = self.convs.split_last().expect("a conv chain has a conv");
        let mut xs = xs.clone();
        for (i, conv) in rest.iter().enumerate() {
            xs = conv.forward_relu_input(&xs, i == 0)?;
        }
        let relus = if rest.is_empty() { Relus::INPUT } else { Relus::NONE };
        self.bn.after_conv_t(last, &xs, relus, train)
    }

    /// Dense convs have no traced form: candle's autograd on a graph of its own.
    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let params = self.bn.params();
        let weights: Vec<&Tensor> =
            self.convs.iter().map(Conv2d::weight).chain([&params.gamma, &params.beta]).collect();
        tape.record_candle(xs, &weights, |xs| self.forward_t(xs, true))
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        let Some(stride) = self.pointwise_stride() else { return Ok(false) };
        let conv = affine(self.convs[0].weight(), &self.bn)?;
        // A strided 1×1 conv reads the top-left of every window: subsample, then convolve.
        let (src, relu) = if stride == 2 {
            let sub = program.tmp((src.c, dst.h, dst.w));
            program.push(Step::Subsample { src, offset: 0, relu: true, dst: sub });
            (sub, false)
        } else {
            (src, true)
        };
        program.push(Step::Pointwise { src, relu, conv, dst, put });
        Ok(true)
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

impl Pool {
    fn options(&self, xs: &Tensor) -> Result<PoolOptions> {
        let (_, _, h, w) = xs.dims4()?;
        Ok(PoolOptions::same(self.kind, self.kernel, self.stride, (h, w)))
    }
}

impl OpForms for Pool {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = pool2d(xs, self.options(xs)?)?;
        match &self.projection {
            Some(p) => p.forward_t(&ys, train),
            None => Ok(ys),
        }
    }

    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let opts = self.options(&xs.tensor)?;
        let ys = pool2d(&xs.tensor, opts)?;
        let input = xs.tensor.clone();
        let pooled = tape.record(&[xs], &[], ys, move |grad| {
            Ok(Grads { inputs: vec![Some(pool2d_grad(&input, grad, opts)?)], weights: vec![] })
        });
        match &self.projection {
            Some(p) => p.trace(tape, &pooled),
            None => Ok(pooled),
        }
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        let (kind, kernel, stride) = (self.kind, self.kernel, self.stride);
        match &self.projection {
            None => program.push(Step::Pool { src, kind, kernel, stride, dst, put }),
            Some(projection) if projection.conv.is_pointwise() => {
                let pooled = program.tmp((src.c, dst.h, dst.w));
                program.push(Step::Pool { src, kind, kernel, stride, dst: pooled, put: Put::Write });
                return projection.eval_steps(program, pooled, dst, put);
            }
            Some(_) => return Ok(false),
        }
        Ok(true)
    }
}

/// The shape of [`FactorizedReduction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactorizedReductionConfig {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// 1 or 2.
    pub stride: usize,
    /// Read the input through a ReLU (inside the 1×1 convs: it commutes with the
    /// subsampling, whose padding is zeros).
    pub relu_input: bool,
}

/// TF-Slim `factorized_reduction` to `c_out` channels, after a ReLU when configured.
/// Stride 2: two half-width 1×1 convs on the even and the odd (shifted) positions
/// (`path_1.conv`, `path_2.conv`; path 2 gets the odd channel) → concat → BN
/// (`final_path_bn`). Stride 1: one 1×1 conv (`path_1.conv`) → BN (`final_path_bn`).
#[derive(Debug, Clone)]
pub struct FactorizedReduction {
    path_1: Conv2d,
    path_2: Option<Conv2d>,
    bn: BatchNorm,
    relu: bool,
}

impl FactorizedReduction {
    /// Builds the reduction.
    ///
    /// # Shapes
    /// - input: `(batch, c_in, h, w)`
    /// - output: `(batch, c_out, ceil(h / stride), ceil(w / stride))`
    pub fn new(cfg: FactorizedReductionConfig, bn: BnConfig, vb: VarBuilder) -> Result<FactorizedReduction> {
        let FactorizedReductionConfig { c_in, c_out, stride, relu_input } = cfg;
        let conv = |c: usize, path: &str| Conv2d::new(Conv2dConfig::square(c_in, c, 1), vb.pp(path).pp("conv"));
        let (path_1, path_2) = match stride {
            1 => (conv(c_out, "path_1")?, None),
            2 => (conv(c_out / 2, "path_1")?, Some(conv(c_out - c_out / 2, "path_2")?)),
            other => candle_core::bail!("factorized reduction: stride {other} is not 1 or 2"),
        };
        Ok(FactorizedReduction { path_1, path_2, bn: bn.bn(c_out, vb.pp("final_path_bn"))?, relu: relu_input })
    }
}

impl OpForms for FactorizedReduction {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = match &self.path_2 {
            None => self.path_1.forward_relu_input(xs, self.relu)?,
            Some(path_2) => {
                let a = self.path_1.forward_relu_input(&subsample2(xs, 0)?, self.relu)?;
                let b = path_2.forward_relu_input(&subsample2(xs, 1)?, self.relu)?;
                Tensor::cat(&[&a, &b], 1)?
            }
        };
        candle_core::ModuleT::forward_t(&self.bn, &ys, train)
    }

    /// Stride 2: both subsamples, both convs, the concatenation and the batch norm as one
    /// op, the subsamples' gradients in one pass (`subsample2_pair_grad`).
    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        let relus = Relus { input: self.relu, output: false };
        let Some(path_2) = &self.path_2 else { return self.bn.trace_after_pointwise(tape, &self.path_1, xs, relus) };
        let opts = Conv1x1Options { relu_input: self.relu, affine: None };
        let (w1, w2) = (tape.weight(self.path_1.weight())?, tape.weight(path_2.weight())?);
        let (_, _, h, w) = xs.tensor.dims4()?;
        let (even, odd) = (subsample2(&xs.tensor, 0)?, subsample2(&xs.tensor, 1)?);
        let a = conv1x1(&even, &w1.tensor, opts)?;
        let b = conv1x1(&odd, &w2.tensor, opts)?;
        let widths = [a.dim(1)?, b.dim(1)?];
        let pre = cat_channels(&[Part::Copy(a), Part::Copy(b)])?;
        let bn = self.bn.train_on(tape, &pre)?;
        let (weight_1, weight_2) = (w1.tensor.clone(), w2.tensor.clone());
        let (gamma, beta, ys) = (bn.gamma.clone(), bn.beta.clone(), bn.ys.clone());
        Ok(tape.record(&[xs], &[&w1, &w2, &gamma, &beta], ys, move |grad| {
            let (grad_pre, grad_gamma, grad_beta) = bn.grads(&pre, grad)?;
            let [grad_a, grad_b] = <[Tensor; 2]>::try_from(split_channels(&grad_pre, &widths)?).expect("two parts");
            let (grad_even, grad_w1) = conv1x1_grads(&even, &weight_1, &grad_a, opts)?;
            let (grad_odd, grad_w2) = conv1x1_grads(&odd, &weight_2, &grad_b, opts)?;
            let grad_xs = subsample2_pair_grad(&grad_even, &grad_odd, (h, w))?;
            Ok(Grads { inputs: vec![Some(grad_xs)], weights: vec![grad_w1, grad_w2, grad_gamma, grad_beta] })
        }))
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        let relu = self.relu;
        let Some(path_2) = &self.path_2 else {
            let conv = affine(self.path_1.weight(), &self.bn)?;
            program.push(Step::Pointwise { src, relu, conv, dst, put });
            return Ok(true);
        };
        let Affine1x1 { scale, shift, .. } = affine(self.path_1.weight(), &self.bn)?;
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
            program.push(Step::Pointwise { src: sub, relu: false, conv, dst: dst.channels(first, c), put });
        }
        Ok(true)
    }
}

/// An identity: the state as it is.
#[derive(Debug, Clone, Copy)]
pub struct Identity;

impl OpForms for Identity {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(xs.clone())
    }

    fn trace(&self, _tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        Ok(xs.clone())
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        program.push(Step::Copy { src, dst, put });
        Ok(true)
    }
}

/// An identity that must change the width or the size: ReLU → 1×1 conv at stride 1 or 2 →
/// BN. A strided 1×1 conv reads the top-left of every window: subsample, then project.
#[derive(Debug, Clone)]
pub struct ProjectedIdentity {
    projection: ActConvBn,
    stride: usize,
}

impl OpForms for ProjectedIdentity {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = if self.stride == 2 { subsample2(xs, 0)? } else { xs.clone() };
        self.projection.forward_t(&xs, train)
    }

    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        if self.stride == 1 {
            return self.projection.trace(tape, xs);
        }
        let (_, _, h, w) = xs.tensor.dims4()?;
        let ys = subsample2(&xs.tensor, 0)?;
        let sub = tape.record(&[xs], &[], ys, move |grad| {
            Ok(Grads { inputs: vec![Some(subsample2_grad(grad, 0, (h, w))?)], weights: vec![] })
        });
        self.projection.trace(tape, &sub)
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        if self.stride == 1 {
            return self.projection.eval_steps(program, src, dst, put);
        }
        let sub = program.tmp((src.c, dst.h, dst.w));
        program.push(Step::Subsample { src, offset: 0, relu: false, dst: sub });
        self.projection.eval_steps(program, sub, dst, put)
    }
}

/// One op of a block, built from its `nas_space::Op` and where it sits (`OpLayout`).
#[derive(Debug, Clone)]
pub enum CellOp {
    /// A true identity.
    Identity(Identity),
    /// Identity with ReLU → strided 1×1 conv → BN (stride > 1 or `c_in != F`).
    ProjectedIdentity(ProjectedIdentity),
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
        let projection = |relu_input: bool, vb: VarBuilder| {
            ActConvBn::new(ActConvBnConfig { relu_input, conv: Conv2dConfig::square(c_in, f, 1) }, bn, vb)
        };
        Ok(match op.kind() {
            OpKind::Identity if layout.projection => {
                if stride > 2 {
                    candle_core::bail!("a projected identity at stride {stride}: a cell's ops have stride 1 or 2")
                }
                CellOp::ProjectedIdentity(ProjectedIdentity { projection: projection(true, vb)?, stride })
            }
            OpKind::Identity => CellOp::Identity(Identity),
            OpKind::SepConv { kernel } => {
                CellOp::SepConv(SepConv::new(SepConvConfig { c_in, c_out: f, kernel, stride }, bn, vb)?)
            }
            OpKind::Conv(chain) => {
                CellOp::Conv(ConvChain::new(ConvChainConfig { chain, c_in, c_out: f, stride }, bn, vb)?)
            }
            OpKind::Pool { kind, kernel } => {
                let projection = if layout.projection { Some(projection(false, vb)?) } else { None };
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
        !matches!(self, CellOp::Identity(_) | CellOp::ProjectedIdentity(_))
    }

    /// The op's forms.
    pub(crate) fn forms(&self) -> &dyn OpForms {
        match self {
            CellOp::Identity(op) => op,
            CellOp::ProjectedIdentity(op) => op,
            CellOp::SepConv(op) => op,
            CellOp::Conv(op) => op,
            CellOp::Pool(op) => op,
        }
    }
}

impl OpForms for CellOp {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forms().forward_t(xs, train)
    }

    fn trace(&self, tape: &mut Tape, xs: &Traced) -> Result<Traced> {
        self.forms().trace(tape, xs)
    }

    fn eval_steps(&self, program: &mut Program, src: Val, dst: Val, put: Put) -> Result<bool> {
        self.forms().eval_steps(program, src, dst, put)
    }
}
