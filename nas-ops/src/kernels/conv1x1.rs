//! 1×1 stride-1 convolution as matrix products, with a weight gradient that needs no
//! reduction over the batch.
//!
//! The plain-tensor path ([`conv1x1_reference`]) is `W · X_b` for every sample as one
//! broadcast `matmul`. Its backward materialises the `(batch, c_out, c_in)` per-sample weight
//! gradients and sums them with candle's reduction over a leading axis, which runs on one
//! thread: 14 % of a `small` training step; and its input gradient copies `Wᵀ` once per
//! sample. On the CPU, [`conv1x1`] is a custom op: the forward and the input gradient are one
//! gemm per sample (in parallel over samples), and the weight gradient `Σ_b dY_b · X_bᵀ` is
//! accumulated by gemm straight into a `(c_out, c_in)` buffer, one task per band of output
//! rows. [`Conv1x1Options`] fuses a ReLU on its input, and an eval-mode batch norm (and a
//! ReLU) after it, into the same op. On other devices [`conv1x1`] is the reference, whose
//! ops run there already.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use crate::kernels::simd::Float;
use std::mem::MaybeUninit;

use crate::kernels::{assume_init_mut, cpu_kernel, cpu_slice, Output};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

const NAME: &str = "conv1x1";
const GRAD_INPUT_NAME: &str = "conv1x1-grad-input";
const GRAD_WEIGHT_NAME: &str = "conv1x1-grad-weight";

/// What a 1×1 conv fuses around its product: a ReLU on its input, and an eval-mode batch
/// norm with an optional ReLU after it. The default is the plain conv.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conv1x1Options<'a> {
    /// Read the input through a ReLU: on the CPU each sample is read through it into a
    /// scratch buffer before its gemm, and the input gradient is zeroed where `xs < 0`
    /// (candle's ReLU rule) in the same pass, so `xs.relu()` is never stored.
    pub relu_input: bool,
    /// A per-channel affine map after the conv (a batch norm in eval mode).
    pub affine: Option<Affine<'a>>,
}

/// `· scale + shift` per output channel (a batch norm in eval mode, from
/// `batch_norm_eval_affine`), then a ReLU with `relu_output`.
#[derive(Debug, Clone, Copy)]
pub struct Affine<'a> {
    /// `(c_out)`.
    pub scale: &'a Tensor,
    /// `(c_out)`.
    pub shift: &'a Tensor,
    /// ReLU on the output.
    pub relu_output: bool,
}

/// `ys[b] = weight · xs[b]` over the pixels: a 1×1 stride-1 convolution without bias, with
/// what `opts` fuses into it. With an affine map the weight's rows are scaled first
/// (`scale ⊙ W`, a `(c_out, c)` op), and the shift and the ReLU are applied to each sample's
/// output block right after its gemm, while it is in cache: one pass over the output instead
/// of two (the gradients of `scale` and `shift` flow back through plain ops). On other
/// devices, [`conv1x1_reference`].
///
/// # Shapes
/// - `xs`: `(batch, c_in, h, w)`
/// - `weight`: `(c_out, c_in, 1, 1)`
/// - `scale`, `shift`: `(c_out)`
/// - returns: `(batch, c_out, h, w)`
pub fn conv1x1(xs: &Tensor, weight: &Tensor, opts: Conv1x1Options) -> Result<Tensor> {
    let c_out = check_weight(xs, weight)?;
    if let Some(affine) = opts.affine {
        for (what, t) in [("scale", affine.scale), ("shift", affine.shift)] {
            if t.dims() != [c_out] {
                bail!("{NAME}: expected a {what} of shape ({c_out}) for weight {:?}, got {:?}", weight.dims(), t.dims())
            }
        }
    }
    if !xs.device().is_cpu() {
        return conv1x1_reference(xs, weight, opts);
    }
    // The op takes and returns the 4-d tensors themselves: a reshape to `(b, c, h·w)` and
    // back would be two more nodes of candle's graph, each costing the backward a zeroed
    // buffer and an add of the gradient's size.
    let xs = xs.contiguous()?;
    let relu_in = opts.relu_input;
    match opts.affine {
        None => xs.apply_op2(&weight.contiguous()?, Conv1x1 { relu_in, relu_out: false }),
        Some(Affine { scale, shift, relu_output }) => {
            let scaled = weight.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?.contiguous()?;
            xs.apply_op3(&scaled, &shift.contiguous()?, Conv1x1 { relu_in, relu_out: relu_output })
        }
    }
}

/// [`conv1x1`] from plain tensor ops (a broadcast `matmul`, ReLUs, broadcast affine ops),
/// differentiable on any device.
///
/// # Shapes
/// As [`conv1x1`].
pub fn conv1x1_reference(xs: &Tensor, weight: &Tensor, opts: Conv1x1Options) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let c_out = weight.dim(0)?;
    let xs = if opts.relu_input { xs.relu()? } else { xs.clone() };
    let ys = weight.reshape((c_out, c))?.broadcast_matmul(&xs.reshape((b, c, h * w))?)?.reshape((b, c_out, h, w))?;
    let Some(Affine { scale, shift, relu_output }) = opts.affine else { return Ok(ys) };
    let ys = ys.broadcast_mul(&scale.reshape((1, c_out, 1, 1))?)?.broadcast_add(&shift.reshape((1, c_out, 1, 1))?)?;
    if relu_output {
        ys.relu()
    } else {
        Ok(ys)
    }
}

/// Checks that `weight` is `(c_out, c, 1, 1)` for `xs` `(b, c, h, w)`; returns `c_out`.
fn check_weight(xs: &Tensor, weight: &Tensor) -> Result<usize> {
    let (_, c, _, _) = xs.dims4()?;
    let c_out = weight.dim(0)?;
    if weight.dims() != [c_out, c, 1, 1] {
        bail!(
            "{NAME}: expected a weight of shape ({c_out}, {c}, 1, 1) for input {:?}, got {:?}",
            xs.dims(),
            weight.dims()
        )
    }
    Ok(c_out)
}

/// Checks that an optional third input of a `cpu_fwd` has shape `dims` and dtype `dtype`.
fn check_third(
    name: &str,
    what: &str,
    third: Option<(&CpuStorage, &Layout)>,
    dims: &[usize],
    dtype: candle_core::DType,
) -> Result<()> {
    if let Some((s, l)) = third {
        if l.dims() != dims || s.dtype() != dtype {
            bail!("{name}: expected {what} of shape {dims:?} and dtype {dtype:?}, got {:?} {:?}", l.dims(), s.dtype())
        }
    }
    Ok(())
}

/// `dst (m × n, row-major) [+]= lhs · rhs`, where `lhs` is `m × k` row-major (`lhs_t =
/// false`) or the transpose of a `k × m` row-major matrix, and `rhs` likewise `k × n` or the
/// transpose of `n × k`.
///
/// # Safety
/// The slices must hold `m·n`, `m·k` and `k·n` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: WithDType>(
    dst: &mut [T],
    lhs: (&[T], bool),
    rhs: (&[T], bool),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    debug_assert!(dst.len() == m * n);
    // SAFETY: the caller's contract; `dst` holds `m · n` elements.
    unsafe { matmul_into(dst.as_mut_ptr(), lhs, rhs, (m, n, k), accumulate, parallelism) }
}

/// [`matmul`] into `dst`, which need not be initialised unless `accumulate` (the product
/// is written, not added, otherwise: gemm does not read it).
///
/// # Safety
/// As [`matmul`]; `dst` points to `m · n` writable elements.
unsafe fn matmul_into<T: WithDType>(
    dst: *mut T,
    (lhs, lhs_t): (&[T], bool),
    (rhs, rhs_t): (&[T], bool),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    debug_assert!(lhs.len() == m * k && rhs.len() == k * n);
    let (lhs_cs, lhs_rs) = if lhs_t { (m as isize, 1) } else { (1, k as isize) };
    let (rhs_cs, rhs_rs) = if rhs_t { (k as isize, 1) } else { (1, n as isize) };
    // SAFETY: the strides describe the slices' extents (checked above in debug builds).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `(xs (b, c, h, w), weight (c_out, c, 1, 1)) -> (b, c_out, h, w)`, of `xs.relu()` with
/// `relu_in`, each sample a `(c_out, c) × (c, h·w)` gemm. As a `CustomOp3`, a third argument
/// `shift (c_out)` is added to every output row, then the ReLU applied with `relu_out` (which
/// only the `CustomOp3` reads).
#[derive(Debug, Clone, Copy)]
struct Conv1x1 {
    relu_in: bool,
    relu_out: bool,
}

impl Conv1x1 {
    fn forward<T: Float>(
        &self,
        xs: &[T],
        w: &[T],
        shift: Option<&[T]>,
        (b, c, p, c_out): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let rows = shift.map_or(Rows::Keep, |shift| Rows::Shift { shift, relu: self.relu_out });
        per_sample(b, (w, false), xs, (c_out, p, c), self.relu_in, rows)
    }

    /// Checks the shapes and runs the forward, with the shift when given.
    fn cpu(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        shift: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[b, c, h, w], &[c_out, c_w, 1, 1]) = (l1.dims(), l2.dims()) else {
            bail!("{NAME}: expected (b, c, h, w) and (c_out, c, 1, 1), got {:?} and {:?}", l1.dims(), l2.dims())
        };
        if c_w != c {
            bail!("{NAME}: the weight has {c_w} input channels, the input {c}")
        }
        let p = h * w;
        check_third(NAME, "a shift", shift, &[c_out], s1.dtype())?;
        let dims = (b, c, p, c_out);
        let out = cpu_kernel!(NAME, [x = (s1, l1, "xs"), w = (s2, l2, "weight")], {
            let shift = shift.map(|(s3, l3)| cpu_slice(NAME, "shift", s3, l3)).transpose()?;
            self.forward(x, w, shift, dims)
        });
        Ok((out, Shape::from((b, c_out, h, w))))
    }

    /// The gradients of the input and the weight from `grad`, the gradient of the output
    /// before any shift or ReLU.
    fn input_and_weight_grads(&self, xs: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let grad = grad.contiguous()?;
        let grad_xs = if self.relu_in {
            grad.apply_op3_no_bwd(w, xs, &Conv1x1GradInput)?
        } else {
            grad.apply_op2_no_bwd(w, &Conv1x1GradInput)?
        };
        let grad_w = xs.apply_op2_no_bwd(&grad, &Conv1x1GradWeight { relu_in: self.relu_in })?;
        Ok((grad_xs, grad_w))
    }
}

/// The gradients of `xs` and `weight` of [`conv1x1`] without an affine map (`opts.affine`
/// must be `None`)
/// from the output's `grad`, for ops that run the conv inside them (CPU).
pub(crate) fn conv1x1_grads(
    xs: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    opts: Conv1x1Options,
) -> Result<(Tensor, Tensor)> {
    if opts.affine.is_some() {
        bail!("{NAME}: the gradients of a conv with an affine map run through candle's graph")
    }
    Conv1x1 { relu_in: opts.relu_input, relu_out: false }.input_and_weight_grads(xs, weight, grad)
}

/// What [`per_sample`] does to each sample's output block after its gemm.
#[derive(Debug, Clone, Copy)]
enum Rows<'a, T> {
    /// Nothing.
    Keep,
    /// Zero it where `mask` (shaped like the whole output) is negative.
    Mask(&'a [T]),
    /// Add `shift[r]` to row `r`, then the ReLU if `relu`.
    Shift { shift: &'a [T], relu: bool },
}

/// `max(v, 0)` with candle's rule (`v >= 0 ? v : 0`).
#[inline]
pub(crate) fn relu<T: Float>(v: T) -> T {
    if v >= T::ZERO {
        v
    } else {
        T::ZERO
    }
}

/// Adds `shift[r]` to row `r` of `out` (rows of `n` values), then the ReLU if `relu`.
pub(crate) fn shift_rows<T: Float>(out: &mut [T], n: usize, shift: &[T], relu: bool) {
    for (row, &s) in out.chunks_exact_mut(n).zip(shift) {
        for v in row.iter_mut() {
            let y = *v + s;
            *v = if !relu || y >= T::ZERO { y } else { T::ZERO };
        }
    }
}

/// `dst = lhs · rhs` (`dst += lhs · rhs` with `accumulate`) for row-major `m × k` and
/// `k × n` matrices, on the calling thread.
pub(crate) fn gemm_rows<T: WithDType>(
    dst: &mut [T],
    lhs: &[T],
    rhs: &[T],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n, "gemm_rows: slice lengths");
    // SAFETY: the lengths match the shapes (asserted above).
    unsafe { matmul(dst, (lhs, false), (rhs, false), (m, n, k), accumulate, Parallelism::None) }
}

/// `rhs`, or its ReLU copied into `scratch`.
fn relu_into<'a, T: Float>(rhs: &'a [T], relu_rhs: bool, scratch: &'a mut Vec<T>) -> &'a [T] {
    if !relu_rhs {
        return rhs;
    }
    scratch.clear();
    scratch.extend(rhs.iter().map(|&v| relu(v)));
    scratch
}

/// `out_b = lhs · rhs_b` for every sample: `rhs` holds `b` row-major `k × n` matrices and
/// the result `b` row-major `m × n` ones. One gemm per sample, in parallel over the samples,
/// or a threaded gemm each when there are fewer samples than threads. With `relu_rhs` each
/// `rhs_b` is read through a ReLU; `rows` says what is done to each `out_b` after its gemm.
fn per_sample<T: Float>(
    b: usize,
    lhs: (&[T], bool),
    rhs: &[T],
    (m, n, k): (usize, usize, usize),
    relu_rhs: bool,
    rows: Rows<'_, T>,
) -> Vec<T> {
    if b * m * n == 0 || k == 0 {
        return vec![T::zero(); b * m * n];
    }
    let mut out = Output::new(b * m * n);
    let run = |scratch: &mut Vec<T>, i: usize, o: &mut [MaybeUninit<T>], r: &[T], parallelism: Parallelism| {
        let r = relu_into(r, relu_rhs, scratch);
        // SAFETY: o is m × n, lhs m × k, r k × n; the product is written, not added.
        unsafe { matmul_into(o.as_mut_ptr().cast::<T>(), lhs, (r, false), (m, n, k), false, parallelism) }
        // SAFETY: the gemm wrote every element.
        let o = unsafe { assume_init_mut(o) };
        match rows {
            Rows::Keep => {}
            Rows::Mask(mask) => {
                for (o, &x) in o.iter_mut().zip(&mask[i * m * n..(i + 1) * m * n]) {
                    *o = if x >= T::ZERO { *o } else { T::ZERO };
                }
            }
            Rows::Shift { shift, relu } => shift_rows(o, n, shift, relu),
        }
    };
    // SAFETY (both loops): `run` writes each chunk in full by its gemm.
    if b >= rayon::current_num_threads() {
        unsafe { out.par_chunks_uninit(m * n) }
            .zip(rhs.par_chunks(k * n))
            .enumerate()
            .for_each_init(Vec::new, |scratch, (i, (o, r))| run(scratch, i, o, r, Parallelism::None));
    } else {
        let mut scratch = Vec::new();
        for (i, (o, r)) in unsafe { out.chunks_uninit(m * n) }.zip(rhs.chunks(k * n)).enumerate() {
            run(&mut scratch, i, o, r, threads());
        }
    }
    out.into_vec()
}

impl CustomOp2 for Conv1x1 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, xs: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, grad_w) = self.input_and_weight_grads(xs, w, grad)?;
        Ok((Some(grad_xs), Some(grad_w)))
    }
}

impl CustomOp3 for Conv1x1 {
    fn name(&self) -> &'static str {
        NAME
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
        self.cpu((s1, l1), (s2, l2), Some((s3, l3)))
    }

    /// The output ReLU's gradient passes where the output is `> 0` (as candle's `relu`
    /// after the unfused ops); the shift's gradient is the sum over samples and pixels.
    fn bwd(
        &self,
        xs: &Tensor,
        w: &Tensor,
        _shift: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = if self.relu_out { (grad * res.gt(0.0)?.to_dtype(grad.dtype())?)? } else { grad.clone() };
        let (grad_xs, grad_w) = self.input_and_weight_grads(xs, w, &grad)?;
        let grad_shift = grad.sum((0, 2, 3))?;
        Ok((Some(grad_xs), Some(grad_w), Some(grad_shift)))
    }
}

/// `(grad (b, c_out, h, w), weight (c_out, c, 1, 1)) -> weightᵀ · grad_b (b, c, h, w)`. As a
/// `CustomOp3`, a third argument `xs (b, c, h, w)` zeroes it where `xs < 0` (the input gradient
/// of [`conv1x1`] reading its input through a ReLU).
#[derive(Debug, Clone, Copy)]
struct Conv1x1GradInput;

impl Conv1x1GradInput {
    fn run<T: Float>(g: &[T], w: &[T], mask: Option<&[T]>, (b, c, p, c_out): (usize, usize, usize, usize)) -> Vec<T> {
        per_sample(b, (w, true), g, (c, p, c_out), false, mask.map_or(Rows::Keep, Rows::Mask))
    }

    /// Checks the shapes and runs the kernel, on `xs` too when given.
    fn cpu(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        xs: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = GRAD_INPUT_NAME;
        let (&[b, c_out, h, w], &[c_out_w, c, 1, 1]) = (l1.dims(), l2.dims()) else {
            bail!("{name}: expected (b, c_out, h, w) and (c_out, c, 1, 1), got {:?} and {:?}", l1.dims(), l2.dims())
        };
        if c_out_w != c_out {
            bail!("{name}: gradient {:?} and weight {:?} differ", l1.dims(), l2.dims())
        }
        check_third(name, "xs", xs, &[b, c, h, w], s1.dtype())?;
        let p = h * w;
        let dims = (b, c, p, c_out);
        let out = cpu_kernel!(name, [g = (s1, l1, "grad"), w = (s2, l2, "weight")], {
            let mask = xs.map(|(s3, l3)| cpu_slice(name, "xs", s3, l3)).transpose()?;
            Conv1x1GradInput::run(g, w, mask, dims)
        });
        Ok((out, Shape::from((b, c, h, w))))
    }
}

impl CustomOp2 for Conv1x1GradInput {
    fn name(&self) -> &'static str {
        GRAD_INPUT_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for Conv1x1GradInput {
    fn name(&self) -> &'static str {
        GRAD_INPUT_NAME
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
        self.cpu(s1, l1, s2, l2, Some((s3, l3)))
    }
}

/// `(xs (b, c, h, w), grad (b, c_out, h, w)) -> Σ_b grad_b · xs_bᵀ (c_out, c, 1, 1)`, of
/// `xs.relu()` with `relu_in`.
#[derive(Debug, Clone, Copy)]
struct Conv1x1GradWeight {
    relu_in: bool,
}

impl Conv1x1GradWeight {
    /// The rows of `dw` are cut into one band per thread; each band is one task that
    /// accumulates its rows over the whole batch, one single-threaded gemm per sample.
    /// (A threaded gemm per sample left a core idle: the output is small, and gemm splits
    /// the output, so this op ran 2.5× slower than the forward with as many multiply-adds.)
    /// Each element is summed over the samples in order, whatever the number of threads.
    fn run<T: Float>(&self, xs: &[T], g: &[T], (b, c, p, c_out): (usize, usize, usize, usize)) -> Vec<T> {
        let mut dw = vec![T::zero(); c_out * c];
        if dw.is_empty() || p == 0 {
            return dw;
        }
        let band = c_out.div_ceil(rayon::current_num_threads().max(1));
        dw.par_chunks_mut(band * c).enumerate().for_each_init(Vec::new, |scratch, (i, dw)| {
            let (first, rows) = (i * band, dw.len() / c);
            for (k, (x, g)) in xs.chunks(c * p).zip(g.chunks(c_out * p)).take(b).enumerate() {
                let x = relu_into(x, self.relu_in, scratch);
                let g = &g[first * p..(first + rows) * p];
                // SAFETY: dw is rows × c, g is rows × p, x is c × p (read transposed).
                unsafe { matmul(dw, (g, false), (x, true), (rows, c, p), k > 0, Parallelism::None) }
            }
        });
        dw
    }
}

impl CustomOp2 for Conv1x1GradWeight {
    fn name(&self) -> &'static str {
        GRAD_WEIGHT_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (&[b, c, h, w], &[b_g, c_out, h_g, w_g]) = (l1.dims(), l2.dims()) else {
            bail!(
                "{GRAD_WEIGHT_NAME}: expected (b, c, h, w) and (b, c_out, h, w), got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )
        };
        if (b_g, h_g, w_g) != (b, h, w) {
            bail!("{GRAD_WEIGHT_NAME}: input {:?} and gradient {:?} differ", l1.dims(), l2.dims())
        }
        let p = h * w;
        let dims = (b, c, p, c_out);
        let out = cpu_kernel!(GRAD_WEIGHT_NAME, [x = (s1, l1, "xs"), g = (s2, l2, "grad")], self.run(x, g, dims));
        Ok((out, Shape::from((c_out, c, 1, 1))))
    }
}
