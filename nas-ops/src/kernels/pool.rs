//! Max and average pooling with TF semantics: explicit (possibly asymmetric) padding that
//! never enters the result.
//! Max pooling treats padded positions as -inf and average pooling divides by the number of
//! real elements in each window (TF `count_include_pad = false`), as in `tf.nn.max_pool2d` and
//! `tf.nn.avg_pool2d` with `padding="SAME"`.
//! NASNet (Zoph et al. 2018, "Learning Transferable Architectures for Scalable Image
//! Recognition") uses them in its cells: tf-slim `nasnet_utils.py` `_pooling` (3x3 SAME, stride
//! 1 or 2), the aux head (5x5 stride-3 VALID average) and `factorized_reduction` (1x1 stride-2
//! VALID average, i.e. subsampling).
//!
//! Candle's own pooling has no padding and no backward when `kernel != stride`, so this file
//! keeps, side by side: the reference built from plain candle ops ([`pool2d_reference`]), the custom
//! ops `max-pool2d-tf` and `avg-pool2d-tf` with their CPU forward and backward kernels, and
//! (under the `cuda` feature) their CUDA twins (`cuda_fwd`, kernels in `kernels/nas_ops.cu`).
//! The geometry (`PoolGeom`) is plain data shared by all implementations.

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::depthwise::DepthwiseGeometry;
use super::simd::{Float, Isa};
use super::window;
use super::{cpu_kernel, Padding2d};
pub use nas_space::PoolKind;

const MAX_NAME: &str = "max-pool2d-tf";
const AVG_NAME: &str = "avg-pool2d-tf";

/// A pooling: its kind, its `kernel × kernel` window, its stride and its explicit padding,
/// which never enters the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// Max (padded positions act as -inf) or average (each output the mean of the real
    /// elements of its window, as TF does).
    pub kind: PoolKind,
    /// The window's side.
    pub kernel: usize,
    /// Stride on both axes.
    pub stride: usize,
    /// Explicit padding.
    pub padding: Padding2d,
}

impl PoolOptions {
    /// Max pooling.
    pub fn max(kernel: usize, stride: usize, padding: Padding2d) -> PoolOptions {
        PoolOptions { kind: PoolKind::Max, kernel, stride, padding }
    }

    /// Average pooling.
    pub fn avg(kernel: usize, stride: usize, padding: Padding2d) -> PoolOptions {
        PoolOptions { kind: PoolKind::Avg, kernel, stride, padding }
    }

    /// A pooling with TF "SAME" padding for an `h × w` input (the output
    /// `ceil(h / stride) × ceil(w / stride)`).
    pub fn same(kind: PoolKind, kernel: usize, stride: usize, (h, w): (usize, usize)) -> PoolOptions {
        // A zero kernel or stride is refused by the op, naming it.
        let padding = Padding2d::same(h, w, kernel.max(1), kernel.max(1), stride.max(1), 1);
        PoolOptions { kind, kernel, stride, padding }
    }

    fn params(&self) -> PoolParams {
        PoolParams { kernel: self.kernel, stride: self.stride, padding: self.padding }
    }

    fn name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => MAX_NAME,
            PoolKind::Avg => AVG_NAME,
        }
    }
}

/// Pooling over `kernel × kernel` windows with explicit padding; padded positions are
/// ignored. Every window must contain at least one real element.
/// In a max pooling, ties go to the first element of the window in row-major order (this is
/// the element that receives the gradient); a NaN shows in the output only as that first
/// element.
///
/// # Shapes
/// - `xs`: `(batch, channels, h, w)`, f32 or f64
/// - returns: `(batch, channels, ho, wo)` with
///   `ho = Padding2d::out_size(h, padding.top, padding.bottom, kernel, stride, 1)` and
///   `wo = Padding2d::out_size(w, padding.left, padding.right, kernel, stride, 1)`
pub fn pool2d(xs: &Tensor, opts: PoolOptions) -> Result<Tensor> {
    let params = opts.params();
    PoolGeom::new(opts.name(), xs.dims(), params)?;
    let xs = xs.contiguous()?;
    match opts.kind {
        PoolKind::Max => xs.apply_op1(MaxPool2dTf(params)),
        PoolKind::Avg => xs.apply_op1(AvgPool2dTf(params)),
    }
}

/// The gradient of [`pool2d`] of `xs` from the output's `grad`, for ops that run the
/// pooling inside them.
pub(crate) fn pool2d_grad(xs: &Tensor, grad: &Tensor, opts: PoolOptions) -> Result<Tensor> {
    let params = opts.params();
    let grad = match opts.kind {
        PoolKind::Max => xs.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2dTfBwd(params))?,
        PoolKind::Avg => {
            let (_, _, h, w) = xs.dims4()?;
            grad.contiguous()?.apply_op1_no_bwd(&AvgPool2dTfBwd { params, h, w })?
        }
    };
    Ok(grad)
}

/// Reference for [`pool2d`] built from differentiable candle ops (any device, any float
/// dtype). Max: pad with -inf, gather each window offset with `index_select`, take the max
/// over the stacked offsets; its gradient goes to every tied maximum, so it matches
/// [`pool2d`] only without ties. Average: pad with zeros, sum each window over the stacked
/// offsets, divide by the number of real elements (the same window sum over a padded tensor
/// of ones).
///
/// # Shapes
/// As [`pool2d`].
pub fn pool2d_reference(xs: &Tensor, opts: PoolOptions) -> Result<Tensor> {
    let g = PoolGeom::new(opts.name(), xs.dims(), opts.params())?;
    let padding = opts.padding;
    match opts.kind {
        PoolKind::Max => {
            let padded = pad_constant(xs, padding, f64::NEG_INFINITY)?;
            // The max never selects a padded -inf (every window has a real element), and the
            // backward multiplies the gradient by a 0/1 mask, so no inf reaches the gradients.
            stacked_windows(&padded, &g)?.max(4)
        }
        PoolKind::Avg => {
            let sums = stacked_windows(&pad_constant(xs, padding, 0.0)?, &g)?.sum(4)?;
            let ones = Tensor::ones((1, 1, g.h, g.w), xs.dtype(), xs.device())?;
            let counts = stacked_windows(&pad_constant(&ones, padding, 0.0)?, &g)?.sum(4)?;
            sums.broadcast_div(&counts)
        }
    }
}

/// Pads the two spatial axes of an `(N, C, H, W)` tensor with `value`.
fn pad_constant(xs: &Tensor, padding: Padding2d, value: f64) -> Result<Tensor> {
    let pad_dim = |xs: Tensor, dim: usize, before: usize, after: usize| -> Result<Tensor> {
        if before == 0 && after == 0 {
            return Ok(xs);
        }
        let mut dims = xs.dims().to_vec();
        let fill = |n: usize, dims: &mut Vec<usize>| -> Result<Tensor> {
            dims[dim] = n;
            Tensor::full(value, dims.as_slice(), xs.device())?.to_dtype(xs.dtype())
        };
        let mut parts = Vec::with_capacity(3);
        if before > 0 {
            parts.push(fill(before, &mut dims)?);
        }
        parts.push(xs.clone());
        if after > 0 {
            parts.push(fill(after, &mut dims)?);
        }
        Tensor::cat(&parts, dim)
    };
    let xs = pad_dim(xs.clone(), 2, padding.top, padding.bottom)?;
    pad_dim(xs, 3, padding.left, padding.right)
}

/// Gathers, for every window offset `(di, dj)`, the strided rows and columns of the padded
/// input, and stacks them: `(N, C, Ho, Wo, kernel * kernel)`.
fn stacked_windows(padded: &Tensor, g: &PoolGeom) -> Result<Tensor> {
    let (k, s) = (g.params.kernel, g.params.stride);
    let device = padded.device();
    // `index_select` needs a contiguous source.
    let padded = padded.contiguous()?;
    let strided = |n_out: usize, offset: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n_out).map(|o| (o * s + offset) as u32).collect();
        Tensor::from_vec(idx, n_out, device)
    };
    let mut windows = Vec::with_capacity(k * k);
    for di in 0..k {
        let rows = padded.index_select(&strided(g.ho, di)?, 2)?;
        for dj in 0..k {
            windows.push(rows.index_select(&strided(g.wo, dj)?, 3)?);
        }
    }
    Tensor::stack(&windows, 4)
}

/// The pooling parameters every implementation shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolParams {
    kernel: usize,
    stride: usize,
    padding: Padding2d,
}

/// Validated pooling geometry: input and output shapes with the parameters; the clipped window
/// ranges derive from it.
/// Plain data, so a CUDA launch can use it as the CPU kernels do.
#[derive(Debug, Clone, Copy)]
struct PoolGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    params: PoolParams,
}

impl PoolGeom {
    /// Checks the input shape and the parameters, and that every window holds at least one
    /// real element.
    fn new(name: &str, dims: &[usize], params: PoolParams) -> Result<PoolGeom> {
        let PoolParams { kernel, stride, padding } = params;
        let &[n, c, h, w] = dims else { bail!("{name}: expected an (N, C, H, W) input, got shape {dims:?}") };
        let what = || format!("input {dims:?}, kernel {kernel}, stride {stride}, padding {padding:?}");
        if kernel == 0 {
            bail!("{name}: kernel must be >= 1 ({})", what())
        }
        if stride == 0 {
            bail!("{name}: stride must be >= 1 ({})", what())
        }
        if h == 0 || w == 0 {
            bail!("{name}: empty spatial dims ({})", what())
        }
        // The kernels keep positions within a plane as u32.
        if h.checked_mul(w).is_none_or(|hw| hw > u32::MAX as usize) {
            bail!("{name}: spatial plane too large ({})", what())
        }
        if h + padding.top + padding.bottom < kernel || w + padding.left + padding.right < kernel {
            bail!("{name}: window larger than the padded input ({})", what())
        }
        let ho = Padding2d::out_size(h, padding.top, padding.bottom, kernel, stride, 1);
        let wo = Padding2d::out_size(w, padding.left, padding.right, kernel, stride, 1);
        // Windows slide monotonically over one interval of real elements, so if the first and
        // the last window along an axis touch it, every window in between does too.
        let empty = |before: usize, n: usize, n_out: usize| kernel <= before || (n_out - 1) * stride >= before + n;
        if empty(padding.top, h, ho) || empty(padding.left, w, wo) {
            bail!("{name}: a window holds only padding ({})", what())
        }
        Ok(PoolGeom { n, c, h, w, ho, wo, params })
    }

    fn in_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.ho, self.wo))
    }

    /// Real rows `[start, end)` of output row `o` (non-empty once validated).
    fn rows(&self, o: usize) -> (usize, usize) {
        clip(o, self.params.kernel, self.params.stride, self.params.padding.top, self.h)
    }

    /// Output columns `[lo, hi)` whose windows hold `kernel` real columns, starting at input
    /// column `o * stride - left`; the others are clipped at the borders.
    fn interior_cols(&self) -> (usize, usize) {
        let PoolParams { kernel, stride, padding } = self.params;
        let lo = padding.left.div_ceil(stride).min(self.wo);
        let hi = match (self.w + padding.left).checked_sub(kernel) {
            Some(last_start) => (last_start / stride + 1).min(self.wo),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// The same window as a depthwise geometry (a `kernel × kernel` filter per channel,
    /// dilation 1), for the shared CPU kernels of `kernels::window`.
    fn window(&self) -> DepthwiseGeometry {
        let PoolParams { kernel, stride, padding } = self.params;
        let (n, c, h, w, ho, wo) = (self.n, self.c, self.h, self.w, self.ho, self.wo);
        DepthwiseGeometry { n, c, h, w, kh: kernel, kw: kernel, ho, wo, stride, dilation: 1, padding }
    }

    /// The number of real elements of each output's window, as an `ho × wo` plane (the
    /// average pool's divisors).
    fn counts<T: Float>(&self) -> Vec<T> {
        let cols = self.col_ranges();
        (0..self.ho)
            .flat_map(|o| {
                let (h0, h1) = self.rows(o);
                cols.iter().map(move |&(w0, w1)| T::from_f64(((h1 - h0) * (w1 - w0)) as f64))
            })
            .collect()
    }

    /// Real columns `[start, end)` of every output column.
    fn col_ranges(&self) -> Vec<(usize, usize)> {
        let p = self.params;
        (0..self.wo).map(|o| clip(o, p.kernel, p.stride, p.padding.left, self.w)).collect()
    }
}

/// A SAME `kernel × kernel` pooling at `stride` of one `(c, h, w)` sample, prepared for
/// `window::SampleWindow`: average (with its divisors) or max.
pub(crate) fn same_sample_window<T: Float>(
    kind: PoolKind,
    (c, h, w): (usize, usize, usize),
    kernel: usize,
    stride: usize,
) -> Result<window::SampleWindow<T>> {
    let opts = PoolOptions::same(kind, kernel, stride, (h, w));
    let g = PoolGeom::new(opts.name(), &[1, c, h, w], opts.params())?;
    Ok(match kind {
        PoolKind::Max => window::SampleWindow::max_pool(&g.window()),
        PoolKind::Avg => window::SampleWindow::avg_pool(&g.window(), g.counts()),
    })
}

/// The real part `[start, end)` of window `o` along an axis of `n` elements with `before`
/// padding.
fn clip(o: usize, kernel: usize, stride: usize, before: usize, n: usize) -> (usize, usize) {
    let start = o * stride;
    (start.max(before) - before, (start + kernel).min(before + n) - before)
}

/// The geometry as the CUDA kernels take it.
#[cfg(feature = "cuda")]
fn cuda_geom(name: &str, g: &PoolGeom) -> Result<super::cuda::PoolGeom> {
    use super::cuda::int;
    Ok(super::cuda::PoolGeom {
        n: int(name, "batch", g.n)?,
        c: int(name, "channels", g.c)?,
        h: int(name, "height", g.h)?,
        w: int(name, "width", g.w)?,
        ho: int(name, "output height", g.ho)?,
        wo: int(name, "output width", g.wo)?,
        kernel: int(name, "kernel", g.params.kernel)?,
        stride: int(name, "stride", g.params.stride)?,
        pad_top: int(name, "top padding", g.params.padding.top)?,
        pad_left: int(name, "left padding", g.params.padding.left)?,
    })
}

/// A pooling forward (`kind`: `max` or `avg`) on the GPU.
#[cfg(feature = "cuda")]
fn cuda_pool_fwd(
    name: &str,
    kind: &str,
    params: PoolParams,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    use super::cuda::{by_dtype, pool_fwd, same_dtype, view, wrap};
    let g = PoolGeom::new(name, l.dims(), params)?;
    let cg = cuda_geom(name, &g)?;
    let dev = s.device();
    let out = by_dtype!(same_dtype(name, &[s])?, T => wrap(pool_fwd::<T>(dev, kind, &view(name, s, l)?, cg)?, dev));
    Ok((out, g.out_shape()))
}

/// `max-pool2d-tf`: forward of [`max_pool2d`].
#[derive(Debug, Clone, Copy)]
struct MaxPool2dTf(PoolParams);

impl CustomOp1 for MaxPool2dTf {
    fn name(&self) -> &'static str {
        MAX_NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(self.name(), l.dims(), self.0)?;
        let out = cpu_kernel!(self.name(), [x = (s, l, "xs")], max_fwd_cpu(x, &g));
        Ok((out, g.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda_pool_fwd(self.name(), "max", self.0, s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let PoolParams { kernel, stride, padding } = self.0;
        Ok(Some(pool2d_grad(arg, grad_res, PoolOptions::max(kernel, stride, padding))?))
    }
}

/// `max-pool2d-tf-bwd`: `(xs, grad_out) -> grad_in`, routing each output gradient to the
/// argmax of its window (recomputed exactly as in the forward).
#[derive(Debug, Clone, Copy)]
struct MaxPool2dTfBwd(PoolParams);

impl CustomOp2 for MaxPool2dTfBwd {
    fn name(&self) -> &'static str {
        "max-pool2d-tf-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let g = PoolGeom::new(name, l1.dims(), self.0)?;
        if l2.shape() != &g.out_shape() {
            bail!("{name}: expected a gradient of shape {:?}, got {:?}", g.out_shape(), l2.shape())
        }
        let out = cpu_kernel!(name, [x = (s1, l1, "xs"), gy = (s2, l2, "grad")], max_bwd_cpu(x, gy, &g));
        Ok((out, g.in_shape()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        use super::cuda::{by_dtype, max_pool_bwd, same_dtype, view, wrap};
        let name = self.name();
        let g = PoolGeom::new(name, l1.dims(), self.0)?;
        if l2.shape() != &g.out_shape() {
            bail!("{name}: expected a gradient of shape {:?}, got {:?}", g.out_shape(), l2.shape())
        }
        let cg = cuda_geom(name, &g)?;
        let dev = s1.device();
        let out = by_dtype!(same_dtype(name, &[s1, s2])?, T => wrap(
            max_pool_bwd::<T>(dev, &view(name, s1, l1)?, &view(name, s2, l2)?, cg)?,
            dev,
        ));
        Ok((out, g.in_shape()))
    }
}

/// `avg-pool2d-tf`: forward of [`avg_pool2d`].
#[derive(Debug, Clone, Copy)]
struct AvgPool2dTf(PoolParams);

impl CustomOp1 for AvgPool2dTf {
    fn name(&self) -> &'static str {
        AVG_NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = PoolGeom::new(self.name(), l.dims(), self.0)?;
        let out = cpu_kernel!(self.name(), [x = (s, l, "xs")], avg_fwd_cpu(x, &g));
        Ok((out, g.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda_pool_fwd(self.name(), "avg", self.0, s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let PoolParams { kernel, stride, padding } = self.0;
        Ok(Some(pool2d_grad(arg, grad_res, PoolOptions::avg(kernel, stride, padding))?))
    }
}

/// `avg-pool2d-tf-bwd`: `grad_out -> grad_in`, scattering `grad / count` to the real elements
/// of each window.
#[derive(Debug, Clone, Copy)]
struct AvgPool2dTfBwd {
    params: PoolParams,
    h: usize,
    w: usize,
}

impl CustomOp1 for AvgPool2dTfBwd {
    fn name(&self) -> &'static str {
        "avg-pool2d-tf-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let &[n, c, ..] = l.dims() else { bail!("{name}: expected an (N, C, Ho, Wo) gradient, got {:?}", l.shape()) };
        let g = PoolGeom::new(name, &[n, c, self.h, self.w], self.params)?;
        if l.shape() != &g.out_shape() {
            bail!("{name}: expected a gradient of shape {:?}, got {:?}", g.out_shape(), l.shape())
        }
        let out = cpu_kernel!(name, [gy = (s, l, "grad")], avg_bwd_cpu(gy, &g));
        Ok((out, g.in_shape()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use super::cuda::{avg_pool_bwd, by_dtype, same_dtype, view, wrap};
        let name = self.name();
        let &[n, c, ..] = l.dims() else { bail!("{name}: expected an (N, C, Ho, Wo) gradient, got {:?}", l.shape()) };
        let g = PoolGeom::new(name, &[n, c, self.h, self.w], self.params)?;
        if l.shape() != &g.out_shape() {
            bail!("{name}: expected a gradient of shape {:?}, got {:?}", g.out_shape(), l.shape())
        }
        let cg = cuda_geom(name, &g)?;
        let dev = s.device();
        let out = by_dtype!(same_dtype(name, &[s])?, T => wrap(avg_pool_bwd::<T>(dev, &view(name, s, l)?, cg)?, dev));
        Ok((out, g.in_shape()))
    }
}

// CPU kernels. Each works on whole (n, c) planes, in parallel with rayon. Inside a plane it
// walks one output row at a time: for every real input row of that row's windows, the interior
// output columns (windows holding `kernel` real columns) take one window column `dj` at a time
// as a pass over a contiguous slice, which vectorises; the few border columns use their clipped
// ranges. For stride > 1 the input row is first split by phase (`split_phases`) so that the
// strided reads of a pass become contiguous too. Every window is still visited in row-major
// order, so sums and tie-breaking do not depend on where a window sits.

/// Per-thread scratch of the CPU kernels: one value (and, for the max backward, one position)
/// per output column, and a phase-split copy of one row when the stride is > 1.
struct Scratch<T> {
    acc: Vec<T>,
    arg: Vec<u32>,
    phases: Vec<T>,
}

impl<T: WithDType> Scratch<T> {
    fn new(g: &PoolGeom) -> Scratch<T> {
        let s = g.params.stride;
        let phases = if s == 1 { 0 } else { s * g.w.div_ceil(s) };
        Scratch { acc: vec![T::zero(); g.wo], arg: vec![0; g.wo], phases: vec![T::zero(); phases] }
    }
}

/// Where `row[off]` sits in a phase-split row (see [`split_phases`]); `row[off + j * stride]`
/// follows at `+ j`.
#[inline]
fn phase_start(off: usize, stride: usize, phases_len: usize) -> usize {
    (off % stride) * (phases_len / stride) + off / stride
}

/// Copies `row` into `phases` so that `row[i * stride + p]` lands at `p * len + i`, with
/// `len = phases.len() / stride`.
fn split_phases<T: Copy>(row: &[T], phases: &mut [T], stride: usize) {
    let len = phases.len() / stride;
    for (i, chunk) in row.chunks(stride).enumerate() {
        for (p, &v) in chunk.iter().enumerate() {
            phases[p * len + i] = v;
        }
    }
}

/// The `n` values `row[off + j * stride]` as one slice: taken from `row` itself for stride 1,
/// else from its phase-split copy.
#[inline]
fn strided<'a, T>(row: &'a [T], phases: &'a [T], stride: usize, off: usize, n: usize) -> &'a [T] {
    if stride == 1 {
        &row[off..off + n]
    } else {
        let start = phase_start(off, stride, phases.len());
        &phases[start..start + n]
    }
}

/// Gradient of max pooling for one plane: each output's gradient goes to the first maximum of
/// its window in row-major order. `acc` and `arg` hold, per output column, the running max and
/// where it is: for interior columns the window offset `di * kernel + dj` (the same for every
/// lane of a pass, so the select vectorises), for border columns the index in the plane.
fn max_bwd_plane<T: WithDType>(
    xs: &[T],
    gy: &[T],
    gx: &mut [T],
    g: &PoolGeom,
    cols: &[(usize, usize)],
    sc: &mut Scratch<T>,
) {
    let (k, s, w, left) = (g.params.kernel, g.params.stride, g.w, g.params.padding.left);
    let (lo, hi) = g.interior_cols();
    let (acc, arg) = (&mut sc.acc, &mut sc.arg);
    for (o, gy) in gy.chunks_exact(g.wo).enumerate() {
        let (h0, h1) = g.rows(o);
        for (oj, ((b, a), &(w0, _))) in acc.iter_mut().zip(arg.iter_mut()).zip(cols).enumerate() {
            *b = xs[h0 * w + w0];
            *a = if (lo..hi).contains(&oj) { 0 } else { (h0 * w + w0) as u32 };
        }
        for r in h0..h1 {
            let row = &xs[r * w..(r + 1) * w];
            if lo < hi {
                if s > 1 {
                    split_phases(row, &mut sc.phases, s);
                }
                for dj in 0..k {
                    let code = ((r - h0) * k + dj) as u32;
                    let vs = strided(row, &sc.phases, s, lo * s + dj - left, hi - lo);
                    for ((b, a), &v) in acc[lo..hi].iter_mut().zip(&mut arg[lo..hi]).zip(vs) {
                        // A bit mask instead of `if`: LLVM otherwise emits a branch here, which
                        // random data mispredicts half the time, and does not vectorise.
                        let mask = 0u32.wrapping_sub((v > *b) as u32);
                        *a = (*a & !mask) | (code & mask);
                        *b = if v > *b { v } else { *b };
                    }
                }
            }
            for oj in (0..lo).chain(hi..g.wo) {
                let (w0, w1) = cols[oj];
                for (j, &v) in row[w0..w1].iter().enumerate() {
                    if v > acc[oj] {
                        acc[oj] = v;
                        arg[oj] = (r * w + w0 + j) as u32;
                    }
                }
            }
        }
        for (oj, (&a, &gy)) in arg.iter().zip(gy).enumerate() {
            let a = a as usize;
            let idx = if (lo..hi).contains(&oj) { (h0 + a / k) * w + oj * s - left + a % k } else { a };
            gx[idx] += gy;
        }
    }
}

fn max_fwd_cpu<T: Float>(xs: &[T], g: &PoolGeom) -> Vec<T> {
    window::max_pool(Isa::detect(), &g.window(), xs)
}

fn max_bwd_cpu<T: WithDType>(xs: &[T], grad_out: &[T], g: &PoolGeom) -> Vec<T> {
    let cols = g.col_ranges();
    let mut grad_in = vec![T::zero(); g.n * g.c * g.h * g.w];
    grad_in
        .par_chunks_mut(g.h * g.w)
        .zip(xs.par_chunks(g.h * g.w))
        .zip(grad_out.par_chunks(g.ho * g.wo))
        .for_each_init(|| Scratch::new(g), |sc, ((gx, xs), gy)| max_bwd_plane(xs, gy, gx, g, &cols, sc));
    grad_in
}

fn avg_fwd_cpu<T: Float>(xs: &[T], g: &PoolGeom) -> Vec<T> {
    window::avg_pool(Isa::detect(), &g.window(), xs, &g.counts())
}

fn avg_bwd_cpu<T: Float>(grad_out: &[T], g: &PoolGeom) -> Vec<T> {
    window::avg_pool_grad(Isa::detect(), &g.window(), grad_out, &g.counts())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use candle_core::DType;
    use candle_core::Device;

    type PoolFn = fn(&Tensor, usize, usize, Padding2d) -> Result<Tensor>;

    fn max(xs: &Tensor, kernel: usize, stride: usize, padding: Padding2d) -> Result<Tensor> {
        pool2d(xs, PoolOptions::max(kernel, stride, padding))
    }

    fn max_reference(xs: &Tensor, kernel: usize, stride: usize, padding: Padding2d) -> Result<Tensor> {
        pool2d_reference(xs, PoolOptions::max(kernel, stride, padding))
    }

    fn avg(xs: &Tensor, kernel: usize, stride: usize, padding: Padding2d) -> Result<Tensor> {
        pool2d(xs, PoolOptions::avg(kernel, stride, padding))
    }

    fn avg_reference(xs: &Tensor, kernel: usize, stride: usize, padding: Padding2d) -> Result<Tensor> {
        pool2d_reference(xs, PoolOptions::avg(kernel, stride, padding))
    }

    /// `(name, custom op, reference)` for both pools.
    const POOLS: [(&str, PoolFn, PoolFn); 2] = [("max", max, max_reference), ("avg", avg, avg_reference)];

    const VALID: Padding2d = Padding2d { top: 0, bottom: 0, left: 0, right: 0 };

    /// A tensor holding a random permutation of `0.1, 0.2, ...` (no ties, differences far
    /// above any finite-difference step), shifted to be centred on zero.
    fn distinct(rng: &mut TestRng, shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let mut vals: Vec<f64> = (0..n).map(|i| (i as f64 - n as f64 / 2.0) * 0.1).collect();
        for i in (1..n).rev() {
            vals.swap(i, rng.below(i + 1));
        }
        Tensor::from_vec(vals, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn grid(vals: &Tensor) -> Vec<Vec<f64>> {
        vals.to_dtype(DType::F64).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    }

    /// The paddings tried on an `h × w` input: SAME, VALID and an asymmetric one.
    fn paddings(h: usize, w: usize, kernel: usize, stride: usize) -> [Padding2d; 3] {
        let asym = Padding2d { top: kernel / 2, bottom: kernel.saturating_sub(1), left: 0, right: kernel.div_ceil(2) };
        [Padding2d::same(h, w, kernel, kernel, stride, 1), VALID, asym]
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = TestRng::new(7);
        let sizes = [(5, 7), (8, 8), (14, 15), (16, 16), (15, 8), (7, 14), (1, 2), (3, 4)];
        let mut compared = 0;
        for kernel in [1, 3, 5, 7] {
            for stride in [1, 2, 3] {
                for (h, w) in sizes {
                    let xs = rng.tensor(&[2, 3, h, w], DType::F32).unwrap();
                    for padding in paddings(h, w, kernel, stride) {
                        for (name, fast, reference) in POOLS {
                            let what = format!("{name} k{kernel} s{stride} {h}x{w} {padding:?}");
                            match (fast(&xs, kernel, stride, padding), reference(&xs, kernel, stride, padding)) {
                                (Ok(a), Ok(b)) => {
                                    let ho = Padding2d::out_size(h, padding.top, padding.bottom, kernel, stride, 1);
                                    let wo = Padding2d::out_size(w, padding.left, padding.right, kernel, stride, 1);
                                    assert_eq!(a.dims(), &[2, 3, ho, wo], "{what}");
                                    assert_close(&a, &b, 1e-6, &what);
                                    compared += 1;
                                }
                                (Err(_), Err(_)) => {}
                                (a, b) => panic!("{what}: custom op {:?} vs reference {:?}", a.err(), b.err()),
                            }
                        }
                    }
                }
            }
        }
        assert!(compared > 300, "only {compared} cases compared");
    }

    /// The shared window kernels on every instruction set this CPU has, on rows wider than
    /// one register block: max and average forward, and the average's gradient.
    #[test]
    fn every_instruction_set_matches_the_reference() {
        let mut rng = TestRng::new(17);
        for (kernel, stride, h, w) in [(3, 1, 9, 37), (3, 2, 12, 50), (5, 2, 7, 33), (3, 3, 10, 41), (5, 1, 6, 17)] {
            for dtype in [DType::F32, DType::F64] {
                let xs = rng.tensor(&[2, 3, h, w], dtype).unwrap();
                let padding = Padding2d::same(h, w, kernel, kernel, stride, 1);
                let g = PoolGeom::new("test", xs.dims(), PoolParams { kernel, stride, padding }).unwrap();
                let want_max = pool2d_reference(&xs, PoolOptions::max(kernel, stride, padding)).unwrap();
                let avg = |t: &[Tensor]| pool2d_reference(&t[0], PoolOptions::avg(kernel, stride, padding));
                let want_avg = avg(std::slice::from_ref(&xs)).unwrap();
                let probe = rng.tensor(want_avg.dims(), dtype).unwrap();
                let want_grad = analytic_grads(&avg, std::slice::from_ref(&xs), &probe).unwrap().remove(0);
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                for isa in Isa::available() {
                    let what = format!("{isa:?} k{kernel} s{stride} {h}x{w} {dtype:?}");
                    let (max, avg, grad) = if dtype == DType::F32 {
                        let (x, p) = (
                            xs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                            probe.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        );
                        let t = |v: Vec<f32>, like: &Tensor| Tensor::from_vec(v, like.dims(), &Device::Cpu).unwrap();
                        let counts = g.counts::<f32>();
                        (
                            t(window::max_pool(isa, &g.window(), &x), &want_max),
                            t(window::avg_pool(isa, &g.window(), &x, &counts), &want_avg),
                            t(window::avg_pool_grad(isa, &g.window(), &p, &counts), &xs),
                        )
                    } else {
                        let (x, p) = (
                            xs.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                            probe.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                        );
                        let t = |v: Vec<f64>, like: &Tensor| Tensor::from_vec(v, like.dims(), &Device::Cpu).unwrap();
                        let counts = g.counts::<f64>();
                        (
                            t(window::max_pool(isa, &g.window(), &x), &want_max),
                            t(window::avg_pool(isa, &g.window(), &x, &counts), &want_avg),
                            t(window::avg_pool_grad(isa, &g.window(), &p, &counts), &xs),
                        )
                    };
                    assert_close(&max, &want_max, 0.0, &format!("max {what}"));
                    assert_close(&avg, &want_avg, tol, &format!("avg {what}"));
                    assert_close(&grad, &want_grad, tol, &format!("avg gradient {what}"));
                }
            }
        }
    }

    #[test]
    fn forward_f64_and_strided_inputs() {
        let mut rng = TestRng::new(8);
        // A transposed (non-contiguous) view, in f64.
        let xs = rng.tensor(&[2, 3, 9, 12], DType::F64).unwrap().transpose(2, 3).unwrap();
        for (name, fast, reference) in POOLS {
            for (kernel, stride) in [(3, 1), (3, 2), (5, 2)] {
                let padding = Padding2d::same(12, 9, kernel, kernel, stride, 1);
                let a = fast(&xs, kernel, stride, padding).unwrap();
                let b = reference(&xs, kernel, stride, padding).unwrap();
                assert_eq!(a.dtype(), DType::F64);
                assert_close(&a, &b, 1e-12, &format!("{name} k{kernel} s{stride}"));
            }
            // An empty batch passes through.
            let empty = Tensor::zeros((0, 3, 5, 5), DType::F64, &Device::Cpu).unwrap();
            assert_eq!(fast(&empty, 3, 2, Padding2d::same(5, 5, 3, 3, 2, 1)).unwrap().dims(), &[0, 3, 3, 3]);
        }
    }

    #[test]
    fn same_conveniences_use_tf_padding() {
        let mut rng = TestRng::new(9);
        for (h, w) in [(8, 8), (7, 9), (56, 42)] {
            let xs = rng.tensor(&[1, 2, h, w], DType::F32).unwrap();
            for (kernel, stride) in [(3, 1), (3, 2), (5, 2), (7, 2)] {
                let padding = Padding2d::same(h, w, kernel, kernel, stride, 1);
                let max = pool2d(&xs, PoolOptions::same(PoolKind::Max, kernel, stride, hw(&xs))).unwrap();
                let avg = pool2d(&xs, PoolOptions::same(PoolKind::Avg, kernel, stride, hw(&xs))).unwrap();
                assert_eq!(max.dims(), &[1, 2, h.div_ceil(stride), w.div_ceil(stride)]);
                assert_close(&max, &pool2d(&xs, PoolOptions::max(kernel, stride, padding)).unwrap(), 0.0, "max same");
                assert_close(&avg, &pool2d(&xs, PoolOptions::avg(kernel, stride, padding)).unwrap(), 0.0, "avg same");
            }
        }
    }

    /// TF semantics on a 4x4 input holding 1..=16 row by row.
    /// 3x3 stride-2 SAME pads one row and one column after only (pad_total = 1, smaller half
    /// before), and the average counts only real elements:
    /// ```python
    /// x = tf.reshape(tf.range(1.0, 17.0), [1, 4, 4, 1])
    /// tf.nn.avg_pool2d(x, 3, 2, "SAME")[0, :, :, 0]  # [[6, 7.5], [12, 13.5]]
    /// tf.nn.max_pool2d(-x, 3, 2, "SAME")[0, :, :, 0] # [[-1, -3], [-9, -11]]
    /// ```
    #[test]
    fn tf_same_semantics_by_hand() {
        let xs = Tensor::arange(1f32, 17f32, &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
        assert_eq!(Padding2d::same(4, 4, 3, 3, 2, 1), Padding2d { top: 0, bottom: 1, left: 0, right: 1 });

        // Top-left: 9 real elements (1+2+3+5+6+7+9+10+11 = 54); top-right: 6 (3,4,7,8,11,12);
        // bottom-left: 6 (9,10,11,13,14,15); bottom-right: 4 (11,12,15,16), no padding before.
        let avg = pool2d(&xs, PoolOptions::same(PoolKind::Avg, 3, 2, hw(&xs))).unwrap();
        assert_eq!(grid(&avg), vec![vec![54.0 / 9.0, 45.0 / 6.0], vec![72.0 / 6.0, 54.0 / 4.0]]);
        assert_eq!(
            grid(&pool2d_reference(&xs, PoolOptions::avg(3, 2, Padding2d::same(4, 4, 3, 3, 2, 1))).unwrap()),
            grid(&avg)
        );

        // All values negative: a padded zero must never win the max.
        let neg = xs.neg().unwrap();
        assert_eq!(
            grid(&pool2d(&neg, PoolOptions::same(PoolKind::Max, 3, 2, hw(&neg))).unwrap()),
            vec![vec![-1.0, -3.0], vec![-9.0, -11.0]]
        );
        // Stride 1 pads one on every side: each output is the window's top-left real element.
        let want: Vec<Vec<f64>> = (0..4)
            .map(|i: usize| {
                (0..4).map(|j: usize| -((4 * i.saturating_sub(1) + j.saturating_sub(1) + 1) as f64)).collect()
            })
            .collect();
        assert_eq!(grid(&pool2d(&neg, PoolOptions::same(PoolKind::Max, 3, 1, hw(&neg))).unwrap()), want);
        // The stride-1 average corners see 4 real elements: (1 + 2 + 5 + 6) / 4.
        assert_eq!(grid(&pool2d(&xs, PoolOptions::same(PoolKind::Avg, 3, 1, hw(&xs))).unwrap())[0][0], 3.5);
    }

    /// The aux head's 5x5 stride-3 VALID average pool (tf-slim `_build_aux_head`).
    #[test]
    fn aux_head_avg_pool() {
        let mut rng = TestRng::new(10);
        for (size, out) in [(16, 4), (21, 6)] {
            let xs = rng.tensor(&[2, 4, size, size], DType::F32).unwrap();
            let ys = pool2d(&xs, PoolOptions::avg(5, 3, VALID)).unwrap();
            assert_eq!(ys.dims(), &[2, 4, out, out]);
            assert_close(&ys, &pool2d_reference(&xs, PoolOptions::avg(5, 3, VALID)).unwrap(), 1e-6, "aux avg");
            // The last window starts at row/col 3 * (out - 1).
            let start = 3 * (out - 1);
            let window = xs.narrow(2, start, 5).unwrap().narrow(3, start, 5).unwrap();
            let want = (window.sum_keepdim((2, 3)).unwrap() / 25.0).unwrap();
            let got = ys.narrow(2, out - 1, 1).unwrap().narrow(3, out - 1, 1).unwrap();
            assert_close(&got, &want, 1e-6, "aux last window");
        }
    }

    /// `factorized_reduction`'s 1x1 stride-2 VALID average pool is subsampling.
    #[test]
    fn one_by_one_stride_two_subsamples() {
        let mut rng = TestRng::new(11);
        let xs = rng.tensor(&[2, 3, 9, 8], DType::F32).unwrap();
        let rows = Tensor::new(&[0u32, 2, 4, 6, 8], &Device::Cpu).unwrap();
        let cols = Tensor::new(&[0u32, 2, 4, 6], &Device::Cpu).unwrap();
        let want = xs.index_select(&rows, 2).unwrap().index_select(&cols, 3).unwrap();
        assert_close(&pool2d(&xs, PoolOptions::avg(1, 2, VALID)).unwrap(), &want, 0.0, "avg 1x1 s2");
        assert_close(&pool2d(&xs, PoolOptions::max(1, 2, VALID)).unwrap(), &want, 0.0, "max 1x1 s2");
    }

    #[test]
    fn gradients_match_reference() {
        let mut rng = TestRng::new(12);
        let asym = Padding2d { top: 1, bottom: 2, left: 2, right: 0 };
        let cases = [
            (3, 1, 8, 8, None),
            (3, 2, 8, 8, None),
            (3, 2, 7, 9, None),
            (5, 2, 14, 15, None),
            (7, 2, 16, 16, None),
            (7, 1, 5, 6, None),
            (5, 3, 16, 16, Some(VALID)),
            (1, 2, 8, 9, Some(VALID)),
            (3, 3, 10, 11, Some(asym)),
            (5, 2, 1, 3, None),
            (7, 1, 3, 2, None),
        ];
        for (kernel, stride, h, w, padding) in cases {
            let padding = padding.unwrap_or(Padding2d::same(h, w, kernel, kernel, stride, 1));
            let xs = distinct(&mut rng, &[2, 3, h, w], DType::F32);
            for (name, fast, reference) in POOLS {
                let out = fast(&xs, kernel, stride, padding).unwrap();
                let probe = rng.tensor(out.dims(), DType::F32).unwrap();
                let a = analytic_grads(&|t| fast(&t[0], kernel, stride, padding), std::slice::from_ref(&xs), &probe)
                    .unwrap();
                let b =
                    analytic_grads(&|t| reference(&t[0], kernel, stride, padding), std::slice::from_ref(&xs), &probe)
                        .unwrap();
                assert_close(&a[0], &b[0], 1e-6, &format!("{name} grad k{kernel} s{stride} {h}x{w} {padding:?}"));
            }
        }
    }

    #[test]
    fn finite_differences_f64() {
        let mut rng = TestRng::new(13);
        let asym = Padding2d { top: 2, bottom: 0, left: 1, right: 1 };
        for (kernel, stride, h, w, padding) in
            [(3, 2, 6, 5, None), (3, 1, 5, 4, None), (5, 3, 7, 7, Some(VALID)), (3, 2, 5, 6, Some(asym))]
        {
            let padding = padding.unwrap_or(Padding2d::same(h, w, kernel, kernel, stride, 1));
            let xs = distinct(&mut rng, &[1, 2, h, w], DType::F64);
            for (_, fast, _) in POOLS {
                check_finite_differences(
                    &|t| fast(&t[0], kernel, stride, padding),
                    std::slice::from_ref(&xs),
                    1e-6,
                    1e-6,
                );
            }
        }
    }

    /// On ties the gradient goes to the first element of the window in row-major order.
    #[test]
    fn max_ties_go_to_first_element() {
        let xs = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let probe = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let grads =
            analytic_grads(&|t| pool2d(&t[0], PoolOptions::same(PoolKind::Max, 3, 2, hw(&t[0]))), &[xs], &probe)
                .unwrap();
        let mut want = vec![vec![0.0; 4]; 4];
        for (i, j) in [(0, 0), (0, 2), (2, 0), (2, 2)] {
            want[i][j] = 1.0;
        }
        assert_eq!(grid(&grads[0]), want);
    }

    #[test]
    fn errors_name_the_op_and_parameters() {
        let xs = Tensor::zeros((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let err = |r: Result<Tensor>| r.expect_err("expected an error").to_string();
        for (name, fast, reference) in POOLS {
            let cases = [
                // The first window holds only the three rows of top padding.
                (3, 1, Padding2d { top: 3, ..VALID }, "a window holds only padding"),
                // Windows start at 0, 3, 6: the last one sees only the bottom padding.
                (1, 3, Padding2d { bottom: 2, ..VALID }, "a window holds only padding"),
                (0, 1, VALID, "kernel must be >= 1"),
                (3, 0, VALID, "stride must be >= 1"),
                (7, 1, Padding2d { top: 1, ..VALID }, "window larger than the padded input"),
            ];
            for (kernel, stride, padding, msg) in cases {
                for e in [err(fast(&xs, kernel, stride, padding)), err(reference(&xs, kernel, stride, padding))] {
                    assert!(e.contains(msg) && e.contains(&format!("kernel {kernel}, stride {stride}")), "{name}: {e}");
                    assert!(e.contains("-pool2d-tf"), "{name}: {e}");
                }
            }
        }
        let e = err(pool2d(&xs, PoolOptions::same(PoolKind::Max, 0, 2, hw(&xs))));
        assert!(e.contains("kernel must be >= 1") && e.contains("kernel 0"), "{e}");
        let e = err(pool2d(&xs.squeeze(0).unwrap(), PoolOptions::avg(3, 1, VALID)));
        assert!(e.contains("avg-pool2d-tf: expected an (N, C, H, W) input, got shape [2, 5, 5]"), "{e}");
        let e = err(pool2d(&xs.to_dtype(DType::U32).unwrap(), PoolOptions::max(3, 1, VALID)));
        assert!(e.contains("max-pool2d-tf: unsupported dtype U32"), "{e}");
        let e = err(pool2d(&xs.to_dtype(DType::F16).unwrap(), PoolOptions::avg(3, 1, VALID)));
        assert!(e.contains("avg-pool2d-tf: unsupported dtype F16"), "{e}");
    }
}
