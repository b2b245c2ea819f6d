//! Batch normalisation over (N, H, W) per channel, with a fused training-mode CPU kernel.
//!
//! Follows Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
//! Reducing Internal Covariate Shift" (2015), and candle-nn's `batch_norm.rs`, whose
//! training path is the (slow, but differentiable anywhere) baseline here.
//! TF-Slim's NASNet puts a batch norm after nearly every convolution, so the training-mode
//! forward and backward run as two custom ops that are parallel over channels:
//!
//! - `batch-norm-stats` reads xs once per channel and returns the batch mean and the biased
//!   batch variance, from the sums of `x − s` and `(x − s)²` with `s` the channel's first
//!   element (numerically safe for inputs with a large common offset), kept in the tensor's
//!   precision for 64 rounds of 16 lanes at a time, then added into f64;
//! - `batch-norm-train` writes `ys = gamma * (xs - mean) / sqrt(var + eps) + beta` from those
//!   statistics (per channel one subtraction and one fused multiply-add in the tensor's
//!   precision, the coefficients from f64), which it keeps as fields so that its `bwd` does
//!   not compute them again;
//! - its `bwd` runs `batch-norm-train-bwd`, which returns all three gradients in one packed
//!   buffer: `dbeta = sum(dy)`, `dgamma = sum(dy * xhat)` and
//!   `dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma)` with `M = N * H * W`.
//!
//! With `BatchNormOptions::relu_output`, `batch-norm-train` applies a ReLU inside it (and masks the
//! gradient in its `bwd`), so the normalised tensor before the ReLU is never stored.
//! The CPU loops are compiled for each instruction set (`kernels::simd`).
//! Under the `cuda` feature each op has a CUDA twin (`cuda_fwd`, kernels in
//! `kernels/nas_ops.cu`); the statistics go through the host between the two forward ops, as
//! on the CPU.

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::kernels::simd::{multiversion, Float, Isa};
use crate::kernels::{cpu_dtype, cpu_kernel, cpu_slice, Output};

/// What a training-mode batch norm returns.
#[derive(Debug, Clone)]
pub struct BatchNormTrain {
    /// The normalised output, differentiable w.r.t. xs, gamma and beta: `(N, C, H, W)`.
    pub ys: Tensor,
    /// The batch mean per channel, detached: `(C)`.
    pub mean: Tensor,
    /// The biased batch variance per channel, detached: `(C)`.
    pub var: Tensor,
}

/// A batch norm's tensors (γ, β and the moving statistics, each `(channels)`) and its ε,
/// for ops that run a batch norm inside them (the separable convs): training uses γ, β and
/// the batch's statistics, inference the moving ones.
#[derive(Debug, Clone)]
pub struct BatchNormParams {
    /// γ.
    pub gamma: Tensor,
    /// β.
    pub beta: Tensor,
    /// The moving mean.
    pub running_mean: Tensor,
    /// The moving variance.
    pub running_var: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl BatchNormParams {
    /// The eval-mode `(scale, shift)` ([`batch_norm_eval_affine`]).
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        batch_norm_eval_affine(&self.gamma, &self.beta, &self.running_mean, &self.running_var, self.eps)
    }

    /// Checks that every tensor is `(channels)` of `dtype`, naming the first that is not.
    pub(crate) fn check(&self, channels: usize, dtype: DType) -> Result<()> {
        let named = [
            ("gamma", &self.gamma),
            ("beta", &self.beta),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ];
        for (what, t) in named {
            if t.dims() != [channels] {
                bail!("expected a batch-norm {what} of shape ({channels}), got {:?}", t.dims())
            }
            if t.dtype() != dtype {
                bail!("the batch-norm {what} is {:?}, the input {dtype:?}", t.dtype())
            }
        }
        Ok(())
    }
}

/// The ε of a batch norm op, and whether a ReLU is fused after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormOptions {
    /// Added to the variance.
    pub eps: f64,
    /// `ys = max(0, bn(xs))`, in the same pass. The gradient passes where `ys > 0` (candle's
    /// ReLU passes it where its input is `>= 0`; the two differ only where the normalised
    /// value is exactly 0); in training the tensor before the ReLU is never stored.
    pub relu_output: bool,
}

impl BatchNormOptions {
    /// A batch norm with `eps` and no ReLU.
    pub fn new(eps: f64) -> BatchNormOptions {
        BatchNormOptions { eps, relu_output: false }
    }

    /// These options with a ReLU after the batch norm when `relu`.
    pub fn relu_output(self, relu: bool) -> BatchNormOptions {
        BatchNormOptions { relu_output: relu, ..self }
    }
}

/// Training-mode batch norm over (N, H, W) per channel, as fused multi-threaded CPU ops.
///
/// `ys = gamma * (xs - mean) / sqrt(var + eps) + beta` (then the ReLU of
/// `opts.relu_output`), with the batch mean and the biased batch variance; `ys` is
/// differentiable w.r.t. xs, gamma and beta; `mean` and `var` are detached (for the
/// caller's running statistics). Supports f32 and f64.
///
/// # Shapes
/// - `xs`: `(batch, channels, height, width)`, not empty
/// - `gamma`, `beta`: `(channels)`
/// - returns: `ys` like `xs`; `mean` and `var` `(channels)`
pub fn batch_norm_train(xs: &Tensor, gamma: &Tensor, beta: &Tensor, opts: BatchNormOptions) -> Result<BatchNormTrain> {
    let xs = xs.contiguous()?;
    let step = batch_norm_train_step(&xs, gamma, beta, opts)?;
    let ys = xs.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, step.op)?;
    Ok(BatchNormTrain { ys, mean: step.mean, var: step.var })
}

/// A training-mode batch norm's statistics of one batch and the op that normalises with
/// them, for ops that run the batch norm inside them (their forward calls
/// [`forward_no_bwd`](Self::forward_no_bwd), their backward [`grads`](Self::grads)).
#[derive(Debug, Clone)]
pub(crate) struct BatchNormTrainStep {
    op: BatchNormTrainOp,
    /// The batch mean per channel, `(channels)`, in the input's dtype.
    pub(crate) mean: Tensor,
    /// The biased batch variance per channel, `(channels)`, in the input's dtype.
    pub(crate) var: Tensor,
}

/// The statistics of `xs` (with the options' ReLU after the batch norm), after the checks
/// of [`batch_norm_train`].
pub(crate) fn batch_norm_train_step(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    opts: BatchNormOptions,
) -> Result<BatchNormTrainStep> {
    let BatchNormOptions { eps, relu_output: relu } = opts;
    const OP: &str = "batch-norm-train";
    check_args(OP, xs, &[("gamma", gamma), ("beta", beta)])?;
    check_nonempty(OP, xs)?;
    let dtype = xs.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        bail!("{OP}: unsupported dtype {dtype:?}, expected f32 or f64")
    }
    // (2, C) in f64, detached: row 0 holds the means, row 1 the variances.
    let stats = xs.contiguous()?.apply_op1_no_bwd(&BatchNormStats)?;
    let mut rows = stats.to_vec2::<f64>()?.into_iter();
    let (mean, var) = match (rows.next(), rows.next()) {
        (Some(mean), Some(var)) => (mean, var),
        _ => bail!("{OP}: statistics must have two rows, got {:?}", stats.shape()),
    };
    let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    Ok(BatchNormTrainStep {
        op: BatchNormTrainOp { mean, invstd, relu },
        mean: stats.get(0)?.to_dtype(dtype)?,
        var: stats.get(1)?.to_dtype(dtype)?,
    })
}

impl BatchNormTrainStep {
    /// The normalised `xs` (contiguous, as are `gamma` and `beta`); records no backward.
    pub(crate) fn forward_no_bwd(&self, xs: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
        xs.apply_op3_no_bwd(gamma, beta, &self.op)
    }

    /// The gradients of `xs`, `gamma` and `beta` from the gradient of the output `ys`.
    pub(crate) fn grads(
        &self,
        (xs, gamma, beta): (&Tensor, &Tensor, &Tensor),
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.op.grads(xs, gamma, beta, ys, grad)
    }
}

/// The same as [`batch_norm_train`] from plain candle tensor ops (differentiable on any
/// device; the ReLU is candle's).
///
/// # Shapes
/// - `xs`: `(batch, channels, height, width)`, not empty
/// - `gamma`, `beta`: `(channels)`
/// - returns: `ys` like `xs`; `mean` and `var` `(channels)`
pub fn batch_norm_train_reference(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    opts: BatchNormOptions,
) -> Result<BatchNormTrain> {
    let eps = opts.eps;
    const OP: &str = "batch-norm-train-reference";
    let (n, c, h, w) = check_args(OP, xs, &[("gamma", gamma), ("beta", beta)])?;
    check_nonempty(OP, xs)?;
    let m = (n * h * w) as f64;
    let mean = (xs.sum_keepdim((0, 2, 3))? / m)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim((0, 2, 3))? / m)?;
    let xhat = xc.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let ys = xhat.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?.broadcast_add(&beta.reshape((1, c, 1, 1))?)?;
    let ys = if opts.relu_output { ys.relu()? } else { ys };
    Ok(BatchNormTrain { ys, mean: mean.flatten_all()?.detach(), var: var.flatten_all()?.detach() })
}

/// Eval-mode batch norm: `ys = gamma * (xs - running_mean) / sqrt(running_var + eps) + beta`
/// (then the ReLU of `opts.relu_output`), differentiable w.r.t. xs, gamma and beta. The
/// statistics fold into one per-channel scale and shift; on the CPU `xs · scale + shift` is
/// one pass (the op `batch-norm-eval`), elsewhere two broadcast tensor ops.
///
/// # Shapes
/// - `xs`: `(batch, channels, height, width)`
/// - `gamma`, `beta`, `running_mean`, `running_var`: `(channels)`
/// - returns: like `xs`
pub fn batch_norm_eval(
    xs: &Tensor,
    [gamma, beta, running_mean, running_var]: [&Tensor; 4],
    opts: BatchNormOptions,
) -> Result<Tensor> {
    let BatchNormOptions { eps, relu_output: relu } = opts;
    let named = [("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)];
    let (_n, c, _h, _w) = check_args("batch-norm-eval", xs, &named)?;
    let (scale, shift) = batch_norm_eval_affine(gamma, beta, running_mean, running_var, eps)?;
    if xs.device().is_cpu() {
        return xs.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, ScaleShift { relu });
    }
    let ys = xs.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
    if relu {
        ys.relu()
    } else {
        Ok(ys)
    }
}

/// The per-channel `(scale, shift)` of a batch norm in eval mode, `ys = xs · scale + shift`:
/// `scale = γ / sqrt(running_var + eps)`, `shift = β − running_mean · scale` (plain tensor
/// ops, differentiable). `kernels::conv1x1::conv1x1` folds them into a 1×1 conv (`Affine`).
///
/// # Shapes
/// - `gamma`, `beta`, `running_mean`, `running_var`: `(c)`; returns two `(c)` tensors
pub fn batch_norm_eval_affine(
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let scale = (gamma / (running_var + eps)?.sqrt()?)?;
    let shift = (beta - (running_mean * &scale)?)?;
    Ok((scale, shift))
}

/// `(xs (N, C, H, W), scale (C), shift (C)) -> xs · scale + shift` per channel, then
/// `max(·, 0)` with `relu`; each product is rounded before the add, as the two broadcast ops
/// round it.
#[derive(Debug, Clone, Copy)]
struct ScaleShift {
    relu: bool,
}

impl ScaleShift {
    fn run<T: WithDType>(&self, xs: &[T], scale: &[T], shift: &[T], (c, hw): (usize, usize)) -> Vec<T> {
        let mut ys = Output::new(xs.len());
        ys.par_chunks_mut(hw).zip(xs.par_chunks(hw)).enumerate().with_min_len(planes_per_task(hw)).for_each(
            |(plane_idx, (ys, xs))| {
                let (s, b) = (scale[plane_idx % c], shift[plane_idx % c]);
                for (y, &x) in ys.iter_mut().zip(xs) {
                    let v = x * s + b;
                    *y = if !self.relu || v >= T::zero() { v } else { T::zero() };
                }
            },
        );
        ys.into_vec()
    }
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_n, c, h, w) = l1.shape().dims4()?;
        let op = self.name();
        let ys = cpu_kernel!(
            op,
            [x = (s1, l1, "xs"), y = (s2, l2, "scale"), z = (s3, l3, "shift")],
            self.run(x, y, z, (c, h * w))
        );
        Ok((ys, l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = scale.dim(0)?;
        let grad = if self.relu { (grad * ys.gt(0.0)?.to_dtype(grad.dtype())?)? } else { grad.clone() };
        let grad_xs = grad.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?;
        let grad_scale = (&grad * xs)?.sum((0, 2, 3))?;
        let grad_shift = grad.sum((0, 2, 3))?;
        Ok((Some(grad_xs), Some(grad_scale), Some(grad_shift)))
    }
}

/// Checks that `xs` is `(N, C, H, W)` and every named parameter is `(C)` with the dtype of
/// `xs`; returns the dimensions of `xs`.
fn check_args(op: &str, xs: &Tensor, params: &[(&str, &Tensor)]) -> Result<(usize, usize, usize, usize)> {
    let &[n, c, h, w] = xs.dims() else { bail!("{op}: xs must be (N, C, H, W), got {:?}", xs.shape()) };
    for (name, p) in params {
        if p.dims() != [c] {
            bail!("{op}: {name} must be (C) = ({c}) for xs {:?}, got {:?}", xs.shape(), p.shape())
        }
        if p.dtype() != xs.dtype() {
            bail!("{op}: {name} has dtype {:?} but xs has {:?}", p.dtype(), xs.dtype())
        }
    }
    Ok((n, c, h, w))
}

/// Batch statistics need at least one element per channel.
fn check_nonempty(op: &str, xs: &Tensor) -> Result<()> {
    if xs.elem_count() == 0 {
        bail!("{op}: xs must not be empty, got {:?}", xs.shape())
    }
    Ok(())
}

/// Per-channel batch mean and biased variance of a contiguous `(N, C, H, W)` tensor, as an
/// f64 tensor of shape `(2, C)`: row 0 holds the means, row 1 the variances. No `bwd`.
#[derive(Debug, Clone, Copy)]
struct BatchNormStats;

impl CustomOp1 for BatchNormStats {
    fn name(&self) -> &'static str {
        "batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let op = self.name();
        // f64 statistics whatever the input's dtype.
        let stats = match cpu_dtype(op, &[(s, "xs")])? {
            DType::F32 => channel_stats(Isa::detect(), cpu_slice::<f32>(op, "xs", s, l)?, n, c, h * w),
            _ => channel_stats(Isa::detect(), cpu_slice::<f64>(op, "xs", s, l)?, n, c, h * w),
        };
        Ok((CpuStorage::F64(stats), Shape::from((2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use super::cuda::{bn_stats, by_dtype, same_dtype, view, wrap};
        let (n, c, h, w) = l.shape().dims4()?;
        let (op, dev) = (self.name(), s.device());
        let stats = by_dtype!(same_dtype(op, &[s])?, T => bn_stats::<T>(dev, &view(op, s, l)?, (n, c, h * w))?);
        Ok((wrap(stats, dev), Shape::from((2, c))))
    }
}

/// The training-mode forward from precomputed statistics; its `bwd` gives all three
/// gradients.
#[derive(Debug, Clone)]
struct BatchNormTrainOp {
    /// Batch mean per channel.
    mean: Vec<f64>,
    /// `1 / sqrt(var + eps)` per channel.
    invstd: Vec<f64>,
    /// Whether a ReLU follows inside the op.
    relu: bool,
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let op = self.name();
        let (mean, invstd, relu) = (&self.mean, &self.invstd, self.relu);
        let ys = cpu_kernel!(op, [x = (s1, l1, "xs"), y = (s2, l2, "gamma"), z = (s3, l3, "beta")], {
            normalize(Isa::detect(), x, y, z, mean, invstd, (n, c, h * w), relu)
        });
        Ok((ys, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use super::cuda::{bn_fwd, by_dtype, same_dtype, view, wrap};
        let (n, c, h, w) = l1.shape().dims4()?;
        let (op, dev) = (self.name(), s1.device());
        let dims = (n, c, h * w);
        let (mean, invstd, relu) = (&self.mean, &self.invstd, self.relu);
        let ys = by_dtype!(same_dtype(op, &[s1, s2, s3])?, T => {
            let (x, gamma, beta) = (view::<T>(op, s1, l1)?, view(op, s2, l2)?, view(op, s3, l3)?);
            wrap(bn_fwd(dev, &x, &gamma, &beta, mean, invstd, dims, relu)?, dev)
        });
        Ok((ys, l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, dbeta) = self.grads(xs, gamma, beta, ys, grad)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

impl BatchNormTrainOp {
    /// The gradients of `xs`, `gamma` and `beta` from the gradient of the output `ys`.
    fn grads(
        &self,
        xs: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = xs.dims4()?;
        let numel = n * c * h * w;
        // On the CPU the ReLU's mask is recomputed inside the backward kernel from xs, γ and
        // β (packed after γ); elsewhere it is taken from ys by plain ops.
        let relu_inside = self.relu && xs.device().is_cpu();
        let (params, grad) = match (self.relu, relu_inside) {
            (true, true) => (Tensor::cat(&[gamma, beta], 0)?, grad.clone()),
            (true, false) => (gamma.clone(), (grad * ys.gt(0.0)?.to_dtype(grad.dtype())?)?),
            (false, _) => (gamma.clone(), grad.clone()),
        };
        let (xs, params, grad) = (xs.contiguous()?, params.contiguous()?, grad.contiguous()?);
        let packed = xs.apply_op3_no_bwd(&params, &grad, &BatchNormTrainBwd { fwd: self, relu: relu_inside })?;
        let dx = packed.narrow(0, 0, numel)?.reshape((n, c, h, w))?;
        let dgamma = packed.narrow(0, numel, c)?;
        let dbeta = packed.narrow(0, numel + c, c)?;
        Ok((dx, dgamma, dbeta))
    }
}

/// The backward of [`BatchNormTrainOp`] on `(xs, gamma, dy)`, with the forward's statistics.
/// Returns one flat buffer of `N * C * H * W + 2 * C` elements: dx, then dgamma, then dbeta.
/// With `relu` (CPU only) the second input is γ followed by β, and `dy` is the gradient of
/// the ReLU's output: the kernel masks it where the forward's output was not positive.
#[derive(Debug, Clone, Copy)]
struct BatchNormTrainBwd<'a> {
    fwd: &'a BatchNormTrainOp,
    relu: bool,
}

impl CustomOp3 for BatchNormTrainBwd<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-train-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l3.dims() != l1.dims() {
            bail!("{}: dy must be shaped like xs {:?}, got {:?}", self.name(), l1.shape(), l3.shape())
        }
        let op = self.name();
        let (mean, invstd) = (&self.fwd.mean, &self.fwd.invstd);
        let expected = if self.relu { 2 * c } else { c };
        if l2.dims() != [expected] {
            bail!("{op}: expected {expected} parameters for {c} channels, got {:?}", l2.dims())
        }
        let relu = self.relu;
        let packed = cpu_kernel!(op, [x = (s1, l1, "xs"), y = (s2, l2, "gamma"), z = (s3, l3, "dy")], {
            let (gamma, beta) = if relu { (&y[..c], Some(&y[c..])) } else { (y, None) };
            backward(Isa::detect(), x, gamma, beta, z, mean, invstd, (n, c, h * w))
        });
        Ok((packed, Shape::from(n * c * h * w + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use super::cuda::{bn_bwd, by_dtype, same_dtype, view, wrap};
        let (n, c, h, w) = l1.shape().dims4()?;
        if l3.dims() != l1.dims() {
            bail!("{}: dy must be shaped like xs {:?}, got {:?}", self.name(), l1.shape(), l3.shape())
        }
        let (op, dev) = (self.name(), s1.device());
        let (mean, invstd, dims) = (&self.fwd.mean, &self.fwd.invstd, (n, c, h * w));
        let packed = by_dtype!(same_dtype(op, &[s1, s2, s3])?, T => {
            let (x, gamma, dy) = (view::<T>(op, s1, l1)?, view(op, s2, l2)?, view(op, s3, l3)?);
            wrap(bn_bwd(dev, &x, &gamma, &dy, mean, invstd, dims)?, dev)
        });
        Ok((packed, Shape::from(n * c * h * w + 2 * c)))
    }
}

/// Lanes of the partial sums of the reductions, in the tensor's own precision.
const LANES: usize = 16;
/// Elements each lane adds up in the tensor's precision before its partial sum is added
/// into an f64 total: an f32 partial sum then holds at most 64 terms, so its rounding error
/// stays within about 64 ulps of them.
const FLUSH: usize = 64;

/// Planes of `hw` elements per rayon task in the elementwise passes (at least one).
fn planes_per_task(hw: usize) -> usize {
    (1usize << 14).div_ceil(hw).max(1)
}

/// The `HW` plane of channel `ci` in sample `ni` of a contiguous `(N, C, HW)` buffer.
fn plane<T>(xs: &[T], ni: usize, ci: usize, c: usize, hw: usize) -> &[T] {
    let start = (ni * c + ci) * hw;
    &xs[start..start + hw]
}

/// The two terms element `i` adds to a pair of sums. A trait with an `#[inline(always)]`
/// method rather than a closure, so that it is compiled inside the multiversioned loop
/// with its instruction set (see `kernels::simd`).
trait PairTerms<T> {
    fn terms(&self, i: usize) -> (T, T);

    /// The terms of elements `base..base + LANES`, with one bounds check, so that the lanes
    /// vectorise.
    fn chunk(&self, base: usize) -> ([T; LANES], [T; LANES]);
}

/// `acc += (Σ terms(i).0, Σ terms(i).1)` over `i < len`: `LANES` partial sums in `T`, added
/// into the f64 totals every `FLUSH` rounds, then the tail in f64.
#[inline(always)]
fn sum_pairs<T: Float, F: PairTerms<T>>(len: usize, acc: &mut (f64, f64), f: &F) {
    let full = len / LANES * LANES;
    let mut start = 0;
    while start < full {
        let end = (start + FLUSH * LANES).min(full);
        let (mut a, mut b) = ([T::ZERO; LANES], [T::ZERO; LANES]);
        for base in (start..end).step_by(LANES) {
            let (u, v) = f.chunk(base);
            for j in 0..LANES {
                a[j] += u[j];
                b[j] += v[j];
            }
        }
        acc.0 += a.iter().map(|v| v.to_f64()).sum::<f64>();
        acc.1 += b.iter().map(|v| v.to_f64()).sum::<f64>();
        start = end;
    }
    for i in full..len {
        let (u, v) = f.terms(i);
        acc.0 += u.to_f64();
        acc.1 += v.to_f64();
    }
}

/// `acc += (Σ (x − shift), Σ (x − shift)²)` over one plane.
#[inline(always)]
fn shifted_sums_body<T: Float, const FMA: bool>(xs: &[T], shift: T, acc: &mut (f64, f64)) {
    sum_pairs(xs.len(), acc, &Shifted { xs, shift });
}

struct Shifted<'a, T> {
    xs: &'a [T],
    shift: T,
}

impl<T: Float> PairTerms<T> for Shifted<'_, T> {
    #[inline(always)]
    fn terms(&self, i: usize) -> (T, T) {
        let d = self.xs[i] - self.shift;
        (d, d * d)
    }

    #[inline(always)]
    fn chunk(&self, base: usize) -> ([T; LANES], [T; LANES]) {
        let xs: &[T; LANES] = self.xs[base..base + LANES].try_into().expect("LANES elements");
        let d = xs.map(|x| x - self.shift);
        (d, d.map(|d| d * d))
    }
}

multiversion!(fn shifted_sums(xs: &[T], shift: T, acc: &mut (f64, f64)) => shifted_sums_body);

/// Per-channel mean and biased variance, in parallel over channels; within a channel, over
/// samples then the contiguous plane, in one pass: the sums of `x − s` and `(x − s)²` for
/// `s` the channel's first element (so a large common offset cancels before squaring),
/// accumulated as [`sum_pairs`] does. Returns the `C` means followed by the `C` variances.
fn channel_stats<T: Float>(isa: Isa, xs: &[T], n: usize, c: usize, hw: usize) -> Vec<f64> {
    let m = (n * hw) as f64;
    let per_channel: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ci| {
            let shift = plane(xs, 0, ci, c, hw)[0];
            let mut acc = (0.0, 0.0);
            for ni in 0..n {
                shifted_sums(isa, plane(xs, ni, ci, c, hw), shift, &mut acc);
            }
            let d = acc.0 / m;
            (shift.to_f64() + d, (acc.1 / m - d * d).max(0.0))
        })
        .collect();
    let (means, vars): (Vec<f64>, Vec<f64>) = per_channel.into_iter().unzip();
    [means, vars].concat()
}

/// How one channel is normalised, in the tensor's precision: `y = (x − mean) · scale +
/// shift`, where `shift` also absorbs the rounding of `mean` (so the result is as if the
/// exact mean had been subtracted, up to one rounding of each product).
#[derive(Debug, Clone, Copy)]
struct Affine<T> {
    mean: T,
    scale: T,
    shift: T,
}

impl<T: Float> Affine<T> {
    fn new(mean: f64, scale: f64, beta: f64) -> Self {
        let mean_t = T::from_f64(mean);
        // (x − mean) · scale + β = (x − mean_t) · scale + (β + (mean_t − mean) · scale).
        let shift = beta + (mean_t.to_f64() - mean) * scale;
        Affine { mean: mean_t, scale: T::from_f64(scale), shift: T::from_f64(shift) }
    }

    /// The normalised value of `x`; the forward writes it (through the ReLU with
    /// a ReLU after it) and the backward recomputes it for the ReLU's mask, with
    /// the same instruction set, so the two agree bit for bit.
    #[inline(always)]
    fn apply<const FMA: bool>(&self, x: T) -> T {
        T::madd::<FMA>(x - self.mean, self.scale, self.shift)
    }
}

/// `ys = affine(xs)`, then `max(·, 0)` with `relu` (`v >= 0 ? v : 0`), over one plane:
/// every element of `ys` is written (it is as long as `xs`).
#[inline(always)]
fn normalize_plane_body<T: Float, const FMA: bool>(
    xs: &[T],
    affine: &Affine<T>,
    relu: bool,
    ys: &mut [MaybeUninit<T>],
) {
    assert_eq!(ys.len(), xs.len(), "a plane and its output");
    if relu {
        for (y, &x) in ys.iter_mut().zip(xs) {
            let v = affine.apply::<FMA>(x);
            y.write(if v >= T::ZERO { v } else { T::ZERO });
        }
    } else {
        for (y, &x) in ys.iter_mut().zip(xs) {
            y.write(affine.apply::<FMA>(x));
        }
    }
}

multiversion!(
    fn normalize_plane(xs: &[T], affine: &Affine<T>, relu: bool, ys: &mut [MaybeUninit<T>]) => normalize_plane_body
);

/// The normalisation of every channel.
fn affines<T: Float>(gamma: &[T], beta: &[T], mean: &[f64], invstd: &[f64]) -> Vec<Affine<T>> {
    (0..gamma.len()).map(|ci| Affine::new(mean[ci], gamma[ci].to_f64() * invstd[ci], beta[ci].to_f64())).collect()
}

/// `ys = (xs - mean) * gamma * invstd + beta` (then `max(ys, 0)` with `relu`), in parallel over
/// planes, in the tensor's precision (see [`Affine`]).
#[allow(clippy::too_many_arguments)]
fn normalize<T: Float>(
    isa: Isa,
    xs: &[T],
    gamma: &[T],
    beta: &[T],
    mean: &[f64],
    invstd: &[f64],
    (_n, c, hw): (usize, usize, usize),
    relu: bool,
) -> Vec<T> {
    let affines = affines(gamma, beta, mean, invstd);
    let mut ys = Output::new(xs.len());
    // SAFETY: `normalize_plane` writes every element of each plane (asserting that it is as
    // long as its input plane).
    unsafe { ys.par_chunks_uninit(hw) }
        .zip(xs.par_chunks(hw))
        .enumerate()
        .with_min_len(planes_per_task(hw))
        .for_each(|(plane_idx, (ys, xs))| normalize_plane(isa, xs, &affines[plane_idx % c], relu, ys));
    ys.into_vec()
}

/// `dy` where the forward's output at `x` was positive (recomputed by `mask`, the forward's
/// [`Affine`]), else zero; `dy` itself without a mask.
#[inline(always)]
fn masked<T: Float, const FMA: bool>(mask: Option<&Affine<T>>, x: T, dy: T) -> T {
    match mask {
        Some(affine) if affine.apply::<FMA>(x) <= T::ZERO => T::ZERO,
        _ => dy,
    }
}

/// `acc += (Σ dy, Σ dy · (x − mean))` over one plane, `dy` masked by the ReLU when given.
#[inline(always)]
fn grad_sums_body<T: Float, const FMA: bool>(
    dy: &[T],
    xs: &[T],
    mean: T,
    mask: Option<&Affine<T>>,
    acc: &mut (f64, f64),
) {
    sum_pairs(dy.len().min(xs.len()), acc, &GradTerms::<T, FMA> { dy, xs, mean, mask });
}

struct GradTerms<'a, T, const FMA: bool> {
    dy: &'a [T],
    xs: &'a [T],
    mean: T,
    mask: Option<&'a Affine<T>>,
}

impl<T: Float, const FMA: bool> PairTerms<T> for GradTerms<'_, T, FMA> {
    #[inline(always)]
    fn terms(&self, i: usize) -> (T, T) {
        let (x, d) = (self.xs[i], self.dy[i]);
        let d = masked::<T, FMA>(self.mask, x, d);
        (d, d * (x - self.mean))
    }

    #[inline(always)]
    fn chunk(&self, base: usize) -> ([T; LANES], [T; LANES]) {
        let xs: &[T; LANES] = self.xs[base..base + LANES].try_into().expect("LANES elements");
        let dy: &[T; LANES] = self.dy[base..base + LANES].try_into().expect("LANES elements");
        let mut d = [T::ZERO; LANES];
        let mut dxc = [T::ZERO; LANES];
        for j in 0..LANES {
            d[j] = masked::<T, FMA>(self.mask, xs[j], dy[j]);
            dxc[j] = d[j] * (xs[j] - self.mean);
        }
        (d, dxc)
    }
}

multiversion!(
    fn grad_sums(dy: &[T], xs: &[T], mean: T, mask: Option<&Affine<T>>, acc: &mut (f64, f64)) => grad_sums_body
);

/// `dx = dy · k + ((x − mean) · k1 + k0)` over one plane, `dy` masked when given.
#[inline(always)]
fn grad_input_plane_body<T: Float, const FMA: bool>(
    dy: &[T],
    xs: &[T],
    mask: Option<&Affine<T>>,
    (mean, k, k0, k1): (T, T, T, T),
    dx: &mut [MaybeUninit<T>],
) {
    assert!(dx.len() == xs.len() && dx.len() == dy.len(), "a plane, its gradient and the input's");
    for ((g, &x), &d) in dx.iter_mut().zip(xs).zip(dy) {
        let d = masked::<T, FMA>(mask, x, d);
        g.write(T::madd::<FMA>(d, k, T::madd::<FMA>(x - mean, k1, k0)));
    }
}

multiversion!(
    fn grad_input_plane(
        dy: &[T],
        xs: &[T],
        mask: Option<&Affine<T>>,
        coeffs: (T, T, T, T),
        dx: &mut [MaybeUninit<T>],
    ) => grad_input_plane_body
);

/// The three gradients, packed as dx, then dgamma, then dbeta. First the per-channel sums
/// `sum(dy)` and `sum(dy * (x - mean))`, in parallel over channels; then
/// `dx = k * dy + (x - mean) * k1 + k0` per plane, in parallel over planes. With `beta`, `dy`
/// is first masked by the ReLU that followed the forward (its [`Affine`] recomputed).
#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(
    isa: Isa,
    xs: &[T],
    gamma: &[T],
    beta: Option<&[T]>,
    dy: &[T],
    mean: &[f64],
    invstd: &[f64],
    (n, c, hw): (usize, usize, usize),
) -> Vec<T> {
    let m = (n * hw) as f64;
    let masks = beta.map(|beta| affines(gamma, beta, mean, invstd));
    let mask = |ci: usize| masks.as_ref().map(|masks| &masks[ci]);
    let means: Vec<T> = mean.iter().map(|&v| T::from_f64(v)).collect();
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ci| {
            let mut acc = (0.0, 0.0);
            for ni in 0..n {
                grad_sums(isa, plane(dy, ni, ci, c, hw), plane(xs, ni, ci, c, hw), means[ci], mask(ci), &mut acc);
            }
            // Σ dy·(x − mean) = Σ dy·(x − mean_t) + (mean_t − mean)·Σ dy.
            (acc.0, acc.1 + (means[ci].to_f64() - mean[ci]) * acc.0)
        })
        .collect();
    // dbeta = sum(dy); dgamma = sum(dy * xhat) = invstd * sum(dy * (x - mean)).
    let dbeta: Vec<f64> = sums.iter().map(|&(s_dy, _)| s_dy).collect();
    let dgamma: Vec<f64> = sums.iter().zip(invstd).map(|(&(_, s_dy_xc), &is)| is * s_dy_xc).collect();
    // dx = k / M * (M * dy - dbeta - xhat * dgamma) with k = gamma * invstd, i.e.
    // dx = k * dy + k0 + (x - mean) * k1 with k0 = -k * dbeta / M, k1 = -k * invstd * dgamma / M;
    // with the rounded mean, k0 also absorbs `(mean_t − mean) · k1`.
    let coeffs: Vec<(T, T, T, T)> = (0..c)
        .map(|ci| {
            let k = gamma[ci].to_f64() * invstd[ci];
            let (k0, k1) = (-k * dbeta[ci] / m, -k * invstd[ci] * dgamma[ci] / m);
            let k0 = k0 + (means[ci].to_f64() - mean[ci]) * k1;
            (means[ci], T::from_f64(k), T::from_f64(k0), T::from_f64(k1))
        })
        .collect();
    let numel = xs.len();
    let mut packed = Output::new(numel + 2 * c);
    let (dgamma_out, dbeta_out) = packed.tail(2 * c).split_at_mut(c);
    for ci in 0..c {
        dgamma_out[ci] = T::from_f64(dgamma[ci]);
        dbeta_out[ci] = T::from_f64(dbeta[ci]);
    }
    // SAFETY: `grad_input_plane` writes every element of each plane (asserting its length).
    unsafe { packed.par_chunks_uninit(hw) }
        .zip(xs.par_chunks(hw))
        .zip(dy.par_chunks(hw))
        .enumerate()
        .with_min_len(planes_per_task(hw))
        .for_each(|(plane_idx, ((dx, xs), dy))| {
            let ci = plane_idx % c;
            grad_input_plane(isa, dy, xs, mask(ci), coeffs[ci], dx);
        });
    packed.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{analytic_grads, assert_close, check_finite_differences, max_abs_diff, TestRng};
    use candle_core::{Device, Var};

    const EPS: f64 = 1e-3;

    /// Random `xs` with a common `offset`, and `gamma`, `beta` around 1 and 0.
    fn inputs(rng: &mut TestRng, shape: [usize; 4], offset: f64, dtype: DType) -> [Tensor; 3] {
        let xs = rng.tensor(&shape, DType::F64).unwrap().affine(2.0, offset).unwrap().to_dtype(dtype).unwrap();
        let gamma = rng.tensor(&[shape[1]], DType::F64).unwrap().affine(0.5, 1.0).unwrap().to_dtype(dtype).unwrap();
        let beta = rng.tensor(&[shape[1]], DType::F64).unwrap().to_dtype(dtype).unwrap();
        [xs, gamma, beta]
    }

    /// Fixed edge shapes (N = 1, odd H and W, H = W = 1 with N > 1, C up to 7) and random ones.
    fn shapes(rng: &mut TestRng) -> Vec<[usize; 4]> {
        let mut shapes = vec![[1, 3, 5, 7], [4, 2, 1, 1], [2, 7, 3, 3], [1, 1, 1, 9], [3, 5, 8, 9], [2, 4, 16, 16]];
        for _ in 0..6 {
            shapes.push([1 + rng.below(4), 1 + rng.below(7), 1 + rng.below(9), 1 + rng.below(9)]);
        }
        shapes
    }

    fn ys(
        f: fn(&Tensor, &Tensor, &Tensor, BatchNormOptions) -> Result<BatchNormTrain>,
    ) -> impl Fn(&[Tensor]) -> Result<Tensor> {
        move |ts: &[Tensor]| Ok(f(&ts[0], &ts[1], &ts[2], BatchNormOptions::new(EPS))?.ys)
    }

    #[test]
    fn forward_matches_reference_f32() -> Result<()> {
        let mut rng = TestRng::new(1);
        for shape in shapes(&mut rng) {
            let [xs, gamma, beta] = inputs(&mut rng, shape, 0.3, DType::F32);
            let fused = batch_norm_train(&xs, &gamma, &beta, BatchNormOptions::new(EPS))?;
            let reference = batch_norm_train_reference(&xs, &gamma, &beta, BatchNormOptions::new(EPS))?;
            assert_eq!(fused.ys.dims(), &shape[..]);
            assert_eq!(fused.mean.dims(), &[shape[1]]);
            assert_eq!(fused.var.dims(), &[shape[1]]);
            assert_eq!(fused.ys.dtype(), DType::F32);
            assert_eq!(fused.mean.dtype(), DType::F32);
            assert_close(&fused.ys, &reference.ys, 1e-5, &format!("ys {shape:?}"));
            assert_close(&fused.mean, &reference.mean, 1e-6, &format!("mean {shape:?}"));
            assert_close(&fused.var, &reference.var, 1e-5, &format!("var {shape:?}"));
        }
        Ok(())
    }

    #[test]
    fn forward_matches_reference_f64() -> Result<()> {
        let mut rng = TestRng::new(2);
        for shape in shapes(&mut rng) {
            let [xs, gamma, beta] = inputs(&mut rng, shape, -0.7, DType::F64);
            let fused = batch_norm_train(&xs, &gamma, &beta, BatchNormOptions::new(EPS))?;
            let reference = batch_norm_train_reference(&xs, &gamma, &beta, BatchNormOptions::new(EPS))?;
            assert_close(&fused.ys, &reference.ys, 1e-12, &format!("ys {shape:?}"));
            assert_close(&fused.mean, &reference.mean, 1e-12, &format!("mean {shape:?}"));
            assert_close(&fused.var, &reference.var, 1e-12, &format!("var {shape:?}"));
        }
        Ok(())
    }

    /// With a common offset of 1000 the f32 statistics must still be accurate: compare with
    /// the reference run in f64 on the same (f32-rounded) values.
    #[test]
    fn forward_is_stable_with_large_offset() -> Result<()> {
        let mut rng = TestRng::new(3);
        for shape in [[8, 3, 16, 16], [1, 5, 7, 9], [16, 2, 1, 1]] {
            let [xs, gamma, beta] = inputs(&mut rng, shape, 1000.0, DType::F32);
            let fused = batch_norm_train(&xs, &gamma, &beta, BatchNormOptions::new(EPS))?;
            let exact = batch_norm_train_reference(
                &xs.to_dtype(DType::F64)?,
                &gamma.to_dtype(DType::F64)?,
                &beta.to_dtype(DType::F64)?,
                BatchNormOptions::new(EPS),
            )?;
            assert_close(&fused.ys, &exact.ys, 1e-6, &format!("ys {shape:?}"));
            assert_close(&fused.mean, &exact.mean, 1e-7, &format!("mean {shape:?}"));
            // The variance (about 4/3) is small next to the offset, so compare it absolutely.
            let var_err = max_abs_diff(&fused.var, &exact.var)?;
            assert!(var_err < 1e-6, "var {shape:?}: max abs diff {var_err:e}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_reference_f32() -> Result<()> {
        let mut rng = TestRng::new(4);
        for shape in shapes(&mut rng) {
            let inputs = inputs(&mut rng, shape, 0.5, DType::F32);
            let probe = rng.tensor(&shape, DType::F32)?;
            let fused = analytic_grads(&ys(batch_norm_train), &inputs, &probe)?;
            let reference = analytic_grads(&ys(batch_norm_train_reference), &inputs, &probe)?;
            for (i, name) in ["dxs", "dgamma", "dbeta"].iter().enumerate() {
                assert_eq!(fused[i].dims(), inputs[i].dims());
                assert_close(&fused[i], &reference[i], 1e-5, &format!("{name} {shape:?}"));
            }
        }
        Ok(())
    }

    /// The CPU kernels on every instruction set of this CPU (`kernels::simd`), f32 and f64,
    /// with and without the ReLU, against the reference: statistics, output and all three
    /// gradients. Planes of up to 1,600 elements, past one flush of the partial sums.
    #[test]
    fn every_instruction_set_matches_the_reference() -> Result<()> {
        fn run<T: Float>(isa: Isa, ts: &[Tensor], probe: &Tensor, relu: bool) -> Result<Vec<Tensor>> {
            let (n, c, h, w) = ts[0].dims4()?;
            let v = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
            let (x, gamma, beta, g) = (v(&ts[0])?, v(&ts[1])?, v(&ts[2])?, v(probe)?);
            let stats = channel_stats(isa, &x, n, c, h * w);
            let (mean, var) = stats.split_at(c);
            let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
            let ys = normalize(isa, &x, &gamma, &beta, mean, &invstd, (n, c, h * w), relu);
            let packed = backward(isa, &x, &gamma, relu.then_some(&beta[..]), &g, mean, &invstd, (n, c, h * w));
            let dev = &Device::Cpu;
            Ok(vec![
                Tensor::from_vec(mean.to_vec(), c, dev)?,
                Tensor::from_vec(var.to_vec(), c, dev)?,
                Tensor::from_vec(ys, (n, c, h, w), dev)?,
                Tensor::from_vec(packed[..n * c * h * w].to_vec(), (n, c, h, w), dev)?,
                Tensor::from_vec(packed[n * c * h * w..n * c * h * w + c].to_vec(), c, dev)?,
                Tensor::from_vec(packed[n * c * h * w + c..].to_vec(), c, dev)?,
            ])
        }
        let mut rng = TestRng::new(8);
        let mut all = shapes(&mut rng);
        all.extend([[2, 3, 40, 40], [3, 2, 33, 17]]);
        for shape in all {
            for dtype in [DType::F32, DType::F64] {
                let ts = inputs(&mut rng, shape, 0.4, dtype);
                let probe = rng.tensor(&shape, dtype)?;
                for relu in [false, true] {
                    let reference = |t: &[Tensor]| {
                        let ys = batch_norm_train_reference(&t[0], &t[1], &t[2], BatchNormOptions::new(EPS))?.ys;
                        if relu {
                            ys.relu()
                        } else {
                            Ok(ys)
                        }
                    };
                    let want_stats = batch_norm_train_reference(&ts[0], &ts[1], &ts[2], BatchNormOptions::new(EPS))?;
                    let mut want = vec![want_stats.mean, want_stats.var, reference(&ts)?];
                    want.extend(analytic_grads(&reference, &ts, &probe)?);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-11 };
                    for isa in Isa::available() {
                        let got = if dtype == DType::F32 {
                            run::<f32>(isa, &ts, &probe, relu)?
                        } else {
                            run::<f64>(isa, &ts, &probe, relu)?
                        };
                        for (name, (g, w)) in
                            ["mean", "var", "ys", "dxs", "dgamma", "dbeta"].iter().zip(got.iter().zip(&want))
                        {
                            let w = w.to_dtype(g.dtype())?;
                            assert_close(g, &w, tol, &format!("{name} {isa:?} relu={relu} {dtype:?} {shape:?}"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The upstream gradient and the inputs need not be contiguous.
    #[test]
    fn gradients_with_strided_inputs_and_upstream() -> Result<()> {
        let mut rng = TestRng::new(5);
        let [xs, gamma, beta] = inputs(&mut rng, [3, 4, 5, 6], 0.0, DType::F32);
        // xs is handed over as a transposed view of a (4, 3, 5, 6) tensor.
        let xs_t = xs.transpose(0, 1)?.contiguous()?;
        let probe = rng.tensor(&[6, 4, 5, 3], DType::F32)?;
        let run = |f: fn(&Tensor, &Tensor, &Tensor, BatchNormOptions) -> Result<BatchNormTrain>| {
            let g = move |ts: &[Tensor]| {
                f(&ts[0].transpose(0, 1)?, &ts[1], &ts[2], BatchNormOptions::new(EPS))?.ys.permute((3, 1, 2, 0))
            };
            analytic_grads(&g, &[xs_t.clone(), gamma.clone(), beta.clone()], &probe)
        };
        let (fused, reference) = (run(batch_norm_train)?, run(batch_norm_train_reference)?);
        for i in 0..3 {
            assert_close(&fused[i], &reference[i], 1e-5, &format!("gradient {i}"));
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_f64() -> Result<()> {
        let mut rng = TestRng::new(6);
        for shape in [[2, 3, 2, 3], [1, 2, 3, 1], [3, 2, 1, 1]] {
            let inputs = inputs(&mut rng, shape, 0.2, DType::F64);
            check_finite_differences(&ys(batch_norm_train), &inputs, 1e-5, 1e-6);
        }
        Ok(())
    }

    #[test]
    fn mean_and_var_are_detached() -> Result<()> {
        let mut rng = TestRng::new(7);
        let [xs, gamma, beta] = inputs(&mut rng, [2, 3, 4, 4], 0.0, DType::F32);
        let vars = [Var::from_tensor(&xs)?, Var::from_tensor(&gamma)?, Var::from_tensor(&beta)?];
        let out = batch_norm_train(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            BatchNormOptions::new(EPS),
        )?;
        let grads = (out.mean.sum_all()? + out.var.sum_all()?)?.backward()?;
        assert!(vars.iter().all(|v| grads.get(v.as_tensor()).is_none()));
        let grads = out.ys.sum_all()?.backward()?;
        assert!(vars.iter().all(|v| grads.get(v.as_tensor()).is_some()));
        Ok(())
    }

    #[test]
    fn eval_matches_hand_computation() -> Result<()> {
        let (n, c, h, w) = (2, 3, 2, 2);
        let data: Vec<f64> = (0..n * c * h * w).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
        let (gamma, beta) = ([0.5, 1.0, -2.0], [0.1, -0.2, 0.3]);
        let (running_mean, running_var) = ([0.2, -1.0, 0.0], [1.5, 0.25, 4.0]);
        let expected: Vec<f64> = data
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let ci = (i / (h * w)) % c;
                gamma[ci] * (x - running_mean[ci]) / (running_var[ci] + EPS).sqrt() + beta[ci]
            })
            .collect();
        let dev = &Device::Cpu;
        let t = |v: &[f64]| Tensor::new(v, dev);
        let xs = Tensor::from_vec(data, (n, c, h, w), dev)?;
        let (gamma, beta, running_mean, running_var) = (t(&gamma)?, t(&beta)?, t(&running_mean)?, t(&running_var)?);
        let ys = batch_norm_eval(&xs, [&gamma, &beta, &running_mean, &running_var], BatchNormOptions::new(EPS))?;
        assert_close(&ys, &Tensor::from_vec(expected, (n, c, h, w), dev)?, 1e-12, "eval ys");
        // Differentiable w.r.t. xs, gamma and beta.
        let f = |ts: &[Tensor]| {
            batch_norm_eval(&ts[0], [&ts[1], &ts[2], &running_mean, &running_var], BatchNormOptions::new(EPS))
        };
        check_finite_differences(&f, &[xs.clone(), gamma.clone(), beta.clone()], 1e-5, 1e-7);
        // The same in f32.
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let params = [f32s(&gamma)?, f32s(&beta)?, f32s(&running_mean)?, f32s(&running_var)?];
        let ys32 = batch_norm_eval(&f32s(&xs)?, params.each_ref(), BatchNormOptions::new(EPS))?;
        assert_eq!(ys32.dtype(), DType::F32);
        assert_close(&ys32, &ys, 1e-6, "eval ys f32");
        Ok(())
    }

    #[test]
    fn bad_shapes_and_dtypes_error() -> Result<()> {
        let dev = &Device::Cpu;
        let xs = Tensor::zeros((2, 3, 4, 4), DType::F32, dev)?;
        let c3 = Tensor::ones(3, DType::F32, dev)?;
        let c4 = Tensor::ones(4, DType::F32, dev)?;
        let c13 = Tensor::ones((1, 3), DType::F32, dev)?;
        let err = |r: Result<BatchNormTrain>| r.expect_err("should fail").to_string();
        for f in [batch_norm_train, batch_norm_train_reference] {
            let msg = err(f(&xs.flatten_from(2)?, &c3, &c3, BatchNormOptions::new(EPS)));
            assert!(msg.contains("xs must be (N, C, H, W), got [2, 3, 16]"), "{msg}");
            let msg = err(f(&xs, &c4, &c3, BatchNormOptions::new(EPS)));
            assert!(msg.contains("gamma must be (C) = (3) for xs [2, 3, 4, 4], got [4]"), "{msg}");
            let msg = err(f(&xs, &c3, &c13, BatchNormOptions::new(EPS)));
            assert!(msg.contains("beta must be (C) = (3) for xs [2, 3, 4, 4], got [1, 3]"), "{msg}");
            let msg = err(f(&xs, &c3.to_dtype(DType::F64)?, &c3, BatchNormOptions::new(EPS)));
            assert!(msg.contains("gamma has dtype F64 but xs has F32"), "{msg}");
            let msg = err(f(&Tensor::zeros((0, 3, 4, 4), DType::F32, dev)?, &c3, &c3, BatchNormOptions::new(EPS)));
            assert!(msg.contains("xs must not be empty, got [0, 3, 4, 4]"), "{msg}");
        }
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let msg = err(batch_norm_train(&half(&xs)?, &half(&c3)?, &half(&c3)?, BatchNormOptions::new(EPS)));
        assert!(msg.contains("batch-norm-train: unsupported dtype F16, expected f32 or f64"), "{msg}");
        let msg = batch_norm_eval(&xs, [&c3, &c3, &c3, &c4], BatchNormOptions::new(EPS))
            .expect_err("should fail")
            .to_string();
        assert!(msg.contains("batch-norm-eval: running_var must be (C) = (3) for xs [2, 3, 4, 4], got [4]"), "{msg}");
        Ok(())
    }
}
