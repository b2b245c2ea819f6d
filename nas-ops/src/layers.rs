//! The building layers of every op: TF-SAME convolutions, depthwise convs, 1×1 convs as
//! matmuls, batch norm with running statistics, subsampling.
//!
//! Follows TF-Slim's arg scopes (`nasnet.py`): convs have no bias, BN has γ and β,
//! padding is SAME (smaller half before) unless stated.

use candle_core::{Module, ModuleT, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use crate::kernels::batch_norm::{
    batch_norm_eval, batch_norm_train, batch_norm_train_step, BatchNormOptions, BatchNormParams, BatchNormTrainStep,
};
use crate::kernels::conv1x1::{conv1x1, conv1x1_grads, Affine, Conv1x1Options};
use crate::kernels::dense::dense_conv2d;
use crate::kernels::depthwise::depthwise_conv2d;
pub use crate::kernels::subsample::subsample2;
use crate::kernels::ConvOptions;
use crate::tape::{Grads, Tape, Traced, Weight};

/// The ReLUs fused around a conv and the batch norm after it: on the conv's input (read
/// through it, never stored) and on the batch norm's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relus {
    /// ReLU on the input.
    pub input: bool,
    /// ReLU on the output.
    pub output: bool,
}

impl Relus {
    /// No ReLU.
    pub const NONE: Relus = Relus { input: false, output: false };
    /// A ReLU on the input only.
    pub const INPUT: Relus = Relus { input: true, output: false };
    /// A ReLU on the output only.
    pub const OUTPUT: Relus = Relus { input: false, output: true };
}

/// A dense convolution without bias, TF SAME padding (or VALID), any kernel shape.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    dilation: usize,
    same: bool,
}

/// Shape and padding of a [`Conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Dilation on both axes.
    pub dilation: usize,
    /// TF SAME padding (true) or VALID (false).
    pub same: bool,
}

impl Conv2dConfig {
    /// A SAME `k × k` conv with stride 1 and no dilation.
    pub fn square(c_in: usize, c_out: usize, k: usize) -> Conv2dConfig {
        Conv2dConfig { c_in, c_out, kh: k, kw: k, stride: 1, dilation: 1, same: true }
    }
}

impl Conv2d {
    /// Weight `weight` of shape `(c_out, c_in, kh, kw)` (PyTorch layout, timm's names).
    pub fn new(cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
        let weight = vb.get_with_hints((cfg.c_out, cfg.c_in, cfg.kh, cfg.kw), "weight", Init::Const(0.0))?;
        Ok(Conv2d { weight, kh: cfg.kh, kw: cfg.kw, stride: cfg.stride, dilation: cfg.dilation, same: cfg.same })
    }
}

impl Module for Conv2d {
    /// # Shapes
    /// - `xs`: `(batch, c_in, h, w)`
    /// - returns: `(batch, c_out, ceil(h / stride), ceil(w / stride))` with SAME padding
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_relu_input(xs, false)
    }
}

impl Conv2d {
    /// [`forward`](Module::forward) of `xs`, read through a ReLU when `relu_input`. A 1×1
    /// stride-1 conv reads it inside the op (`kernels::conv1x1`), so `xs.relu()` is not stored.
    pub fn forward_relu_input(&self, xs: &Tensor, relu_input: bool) -> Result<Tensor> {
        if self.is_pointwise() {
            return conv1x1(xs, &self.weight, Conv1x1Options { relu_input, affine: None });
        }
        let (_, _, h, w) = xs.dims4()?;
        let opts = if self.same {
            ConvOptions::same((h, w), (self.kh, self.kw), self.stride, self.dilation)
        } else {
            ConvOptions { stride: self.stride, dilation: self.dilation, ..ConvOptions::default() }
        };
        dense_conv2d(xs, &self.weight, opts.relu_input(relu_input))
    }

    /// The weight, `(c_out, c_in, kh, kw)`.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The stride.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// A 1×1 stride-1 conv, which runs as `kernels::conv1x1`.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1
    }
}

/// A depthwise convolution (multiplier 1) without bias, TF SAME padding.
#[derive(Debug, Clone)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    k: usize,
    stride: usize,
    dilation: usize,
}

impl DepthwiseConv2d {
    /// Weight `weight` of shape `(channels, 1, k, k)`.
    pub fn new(channels: usize, k: usize, stride: usize, dilation: usize, vb: VarBuilder) -> Result<DepthwiseConv2d> {
        let weight = vb.get_with_hints((channels, 1, k, k), "weight", Init::Const(0.0))?;
        Ok(DepthwiseConv2d { weight, k, stride, dilation })
    }

    /// The weight `(channels, 1, k, k)`, the stride and the dilation.
    pub(crate) fn parts(&self) -> (&Tensor, usize, usize) {
        (&self.weight, self.stride, self.dilation)
    }
}

impl Module for DepthwiseConv2d {
    /// # Shapes
    /// - `xs`: `(batch, c, h, w)`
    /// - returns: `(batch, c, ceil(h / stride), ceil(w / stride))`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        depthwise_conv2d(xs, &self.weight, ConvOptions::same((h, w), (self.k, self.k), self.stride, self.dilation))
    }
}

/// Batch norm with γ, β and moving statistics (`weight`, `bias`, `running_mean`,
/// `running_var`, as timm and PyTorch name them).
///
/// Training normalises with the batch statistics and updates the moving ones as TF-Slim
/// does: `moving = decay · moving + (1 − decay) · batch` (the variance unbiased);
/// evaluation uses the moving statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    decay: f64,
}

impl BatchNorm {
    /// A BN over `channels` with the network's epsilon and decay.
    pub fn new(channels: usize, eps: f64, decay: f64, vb: VarBuilder) -> Result<BatchNorm> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        Ok(BatchNorm { weight, bias, running_mean, running_var, eps, decay })
    }
}

impl BatchNorm {
    /// `conv` on `xs`, then this batch norm, with the ReLUs of `relus` (the output's fused
    /// into the batch-norm op, so the tensor before it is not kept for the backward pass). In
    /// eval mode a 1×1 conv takes the batch norm inside (`kernels::conv1x1` with an
    /// `Affine`), so the conv's output is written once.
    ///
    /// # Shapes
    /// - `xs`: the conv's input; returns the conv's output shape
    pub fn after_conv_t(&self, conv: &Conv2d, xs: &Tensor, relus: Relus, train: bool) -> Result<Tensor> {
        if !train && conv.is_pointwise() {
            let (scale, shift) = self.params().eval_affine()?;
            let affine = Affine { scale: &scale, shift: &shift, relu_output: relus.output };
            return conv1x1(xs, &conv.weight, Conv1x1Options { relu_input: relus.input, affine: Some(affine) });
        }
        let opts = BatchNormOptions::new(self.eps).relu_output(relus.output);
        self.forward_with(&conv.forward_relu_input(xs, relus.input)?, train, opts)
    }

    /// γ, β, the moving statistics and ε, for ops that run the batch norm inside them.
    pub(crate) fn params(&self) -> BatchNormParams {
        BatchNormParams {
            gamma: self.weight.clone(),
            beta: self.bias.clone(),
            running_mean: self.running_mean.as_tensor().clone(),
            running_var: self.running_var.as_tensor().clone(),
            eps: self.eps,
        }
    }

    fn forward_with(&self, xs: &Tensor, train: bool, opts: BatchNormOptions) -> Result<Tensor> {
        if !train {
            let (rm, rv) = (self.running_mean.as_tensor(), self.running_var.as_tensor());
            return batch_norm_eval(xs, [&self.weight, &self.bias, rm, rv], opts);
        }
        let out = batch_norm_train(xs, &self.weight, &self.bias, opts)?;
        let (b, _, h, w) = xs.dims4()?;
        self.update_moving(&out.mean, &out.var, b * h * w)?;
        Ok(out.ys)
    }

    /// Moves the moving statistics towards a batch's `mean` and biased `var` over `count`
    /// elements per channel (the variance made unbiased first).
    pub(crate) fn update_moving(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let m = count as f64;
        let unbiased = if m > 1.0 { (var * (m / (m - 1.0)))? } else { var.clone() };
        let d = self.decay;
        let mean = ((self.running_mean.as_tensor() * d)? + (mean * (1.0 - d))?)?;
        let var = ((self.running_var.as_tensor() * d)? + (unbiased * (1.0 - d))?)?;
        self.running_mean.set(&mean.detach())?;
        self.running_var.set(&var.detach())
    }
}

/// A training-mode batch norm that ran on a tape: its statistics, its registered γ and β,
/// and its output.
pub(crate) struct TracedBatchNorm {
    step: BatchNormTrainStep,
    pub(crate) gamma: Weight,
    pub(crate) beta: Weight,
    pub(crate) ys: Tensor,
}

impl TracedBatchNorm {
    /// The gradients of the input `xs`, of γ and of β from the output's `grad`.
    pub(crate) fn grads(&self, xs: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.step.grads((xs, &self.gamma.tensor, &self.beta.tensor), &self.ys, grad)
    }
}

impl BatchNorm {
    /// The training forward of `xs` (detached) with γ and β registered on `tape`, the moving
    /// statistics updated; the caller records the op that ends with it.
    pub(crate) fn train_on(&self, tape: &mut Tape, xs: &Tensor) -> Result<TracedBatchNorm> {
        let (gamma, beta) = (tape.weight(&self.weight)?, tape.weight(&self.bias)?);
        let step = batch_norm_train_step(xs, &gamma.tensor, &beta.tensor, BatchNormOptions::new(self.eps))?;
        let ys = step.forward_no_bwd(xs, &gamma.tensor, &beta.tensor)?;
        let (b, _, h, w) = xs.dims4()?;
        self.update_moving(&step.mean, &step.var, b * h * w)?;
        Ok(TracedBatchNorm { step, gamma, beta, ys })
    }

    /// `after_conv_t(conv, xs, relus, true)` recorded on `tape` as one op, for a 1×1 stride-1
    /// `conv` ([`Conv2d::is_pointwise`]) and no ReLU on the output.
    pub(crate) fn trace_after_pointwise(
        &self,
        tape: &mut Tape,
        conv: &Conv2d,
        xs: &Traced,
        relus: Relus,
    ) -> Result<Traced> {
        if !conv.is_pointwise() || relus.output {
            candle_core::bail!("trace_after_pointwise: the conv is not 1x1 with stride 1, or a ReLU follows")
        }
        let opts = Conv1x1Options { relu_input: relus.input, affine: None };
        let weight = tape.weight(&conv.weight)?;
        let pre = conv1x1(&xs.tensor, &weight.tensor, opts)?;
        let bn = self.train_on(tape, &pre)?;
        let (input, w) = (xs.tensor.clone(), weight.tensor.clone());
        let (gamma, beta, ys) = (bn.gamma.clone(), bn.beta.clone(), bn.ys.clone());
        Ok(tape.record(&[xs], &[&weight, &gamma, &beta], ys, move |grad| {
            let (grad_pre, grad_gamma, grad_beta) = bn.grads(&pre, grad)?;
            let (grad_xs, grad_w) = conv1x1_grads(&input, &w, &grad_pre, opts)?;
            Ok(Grads { inputs: vec![Some(grad_xs)], weights: vec![grad_w, grad_gamma, grad_beta] })
        }))
    }
}

impl ModuleT for BatchNorm {
    /// # Shapes
    /// - `xs`: `(batch, c, h, w)`; returns the same shape
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(xs, train, BatchNormOptions::new(self.eps))
    }
}

/// Global average pool over height and width: `(batch, c, h, w)` → `(batch, c)`.
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    xs.mean(D::Minus1)?.mean(D::Minus1)
}
