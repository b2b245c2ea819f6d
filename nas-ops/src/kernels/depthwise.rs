//! Depthwise 2-D convolution (channel multiplier 1) with explicit per-side zero padding.
//!
//! NASNet's separable convolutions (Zoph et al. 2018, "Learning Transferable Architectures
//! for Scalable Image Recognition") are a depthwise convolution followed by a 1x1 one.
//! This follows TF's `depthwise_conv2d_native` as used by tf-slim `separable_conv2d` in
//! `nasnet_utils.py`, and timm `nasnet.py` `SeparableConv2d` (a `Conv2d` with
//! `groups = in_channels`), with TF "SAME" padding given explicitly per side because it is
//! asymmetric on even inputs (see `Padding2d::same`).
//!
//! Candle's grouped convolution loops over groups and is very slow for `groups = C`, so
//! [`depthwise_conv2d`] is a custom op with a direct CPU kernel and its own backward pass.
//! [`depthwise_conv2d_reference`] composes plain tensor ops and stays as the reference.
//! [`depthwise_conv2d_relu`] reads its input through a ReLU inside the op, so the ReLU's
//! output is never stored (NASNet's separable convs all start with one).
//! Under the `cuda` feature each op has a CUDA twin (`cuda_fwd`, kernels in
//! `kernels/nas_ops.cu`).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::kernels::Padding2d;

/// Depthwise convolution of `xs` with one `kh × kw` filter per channel, through the direct
/// CPU kernel (custom op "depthwise-conv2d", differentiable with respect to both inputs).
///
/// # Shapes
/// - `xs`: `(n, c, h, w)`
/// - `weight`: `(c, 1, kh, kw)` (channel multiplier 1)
/// - returns: `(n, c, ho, wo)` with
///   `ho = Padding2d::out_size(h, padding.top, padding.bottom, kh, stride, dilation)` and
///   `wo` likewise
pub fn depthwise_conv2d(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    padding: Padding2d,
) -> Result<Tensor> {
    DepthwiseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), stride, dilation, padding)?;
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    xs.apply_op2(&weight, DepthwiseConv2d { stride, dilation, padding, relu_in: false })
}

/// `depthwise_conv2d(xs.relu(), ...)` as one op: the input is read through the ReLU and its
/// gradient passes where `xs >= 0` (candle's ReLU rule), without storing `xs.relu()`.
///
/// # Shapes
/// As [`depthwise_conv2d`].
pub fn depthwise_conv2d_relu(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    padding: Padding2d,
) -> Result<Tensor> {
    DepthwiseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), stride, dilation, padding)?;
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    xs.apply_op2(&weight, DepthwiseConv2d { stride, dilation, padding, relu_in: true })
}

/// Same contract as [`depthwise_conv2d`], composed from plain candle tensor ops (explicit
/// zero padding, then a grouped `conv2d` with `groups = c`): runs on any device and is
/// differentiable through candle's own backward pass.
///
/// # Shapes
/// - `xs`: `(n, c, h, w)`
/// - `weight`: `(c, 1, kh, kw)`
/// - returns: `(n, c, ho, wo)`, as for [`depthwise_conv2d`]
pub fn depthwise_conv2d_reference(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    padding: Padding2d,
) -> Result<Tensor> {
    let geom = DepthwiseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), stride, dilation, padding)?;
    let xs = xs.pad_with_zeros(2, padding.top, padding.bottom)?.pad_with_zeros(3, padding.left, padding.right)?;
    // Drop the trailing rows and columns no window reaches: candle 0.11's conv2d backward
    // takes its `output_padding` from the height alone, so it breaks when the two axes leave
    // different remainders, and cropping leaves none.
    let used_h = (geom.ho - 1) * stride + (geom.kh - 1) * dilation + 1;
    let used_w = (geom.wo - 1) * stride + (geom.kw - 1) * dilation + 1;
    let xs = xs.narrow(2, 0, used_h)?.narrow(3, 0, used_w)?;
    xs.conv2d(weight, 0, stride, dilation, geom.c)
}

const FWD_NAME: &str = "depthwise-conv2d";
const GRAD_INPUT_NAME: &str = "depthwise-conv2d-grad-input";
const GRAD_WEIGHT_NAME: &str = "depthwise-conv2d-grad-weight";

/// Every size of one depthwise convolution, checked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DepthwiseGeometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    dilation: usize,
    padding: Padding2d,
}

impl DepthwiseGeometry {
    /// Validates the input and weight shapes against the stride, dilation and padding.
    fn new(
        name: &str,
        xs_dims: &[usize],
        weight_dims: &[usize],
        stride: usize,
        dilation: usize,
        padding: Padding2d,
    ) -> Result<Self> {
        let &[n, c, h, w] = xs_dims else { bail!("{name}: expected an input of shape (n, c, h, w), got {xs_dims:?}") };
        let &[c_k, 1, kh, kw] = weight_dims else {
            bail!("{name}: expected a weight of shape (c, 1, kh, kw) with c = {c} for input {xs_dims:?}, got {weight_dims:?}")
        };
        if c_k != c || kh == 0 || kw == 0 {
            bail!("{name}: expected a weight of shape (c, 1, kh, kw) with c = {c} for input {xs_dims:?}, got {weight_dims:?}")
        }
        if stride == 0 || dilation == 0 {
            bail!("{name}: stride ({stride}) and dilation ({dilation}) must be at least 1")
        }
        let (span_h, span_w) = ((kh - 1) * dilation + 1, (kw - 1) * dilation + 1);
        let (padded_h, padded_w) = (h + padding.top + padding.bottom, w + padding.left + padding.right);
        if padded_h < span_h || padded_w < span_w {
            bail!(
                "{name}: input {xs_dims:?} padded by {padding:?} is {padded_h}x{padded_w}, smaller than the \
                 {span_h}x{span_w} span of weight {weight_dims:?} at dilation {dilation}"
            )
        }
        let ho = Padding2d::out_size(h, padding.top, padding.bottom, kh, stride, dilation);
        let wo = Padding2d::out_size(w, padding.left, padding.right, kw, stride, dilation);
        Ok(Self { n, c, h, w, kh, kw, ho, wo, stride, dilation, padding })
    }

    fn input_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.c, self.h, self.w)
    }

    fn weight_dims(&self) -> (usize, usize, usize, usize) {
        (self.c, 1, self.kh, self.kw)
    }

    fn output_dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.c, self.ho, self.wo)
    }

    /// Which output rows each kernel row `ky` reaches inside the input.
    fn row_taps(&self) -> Vec<TapRange> {
        TapRange::all(self.h, self.ho, self.kh, self.padding.top, self.stride, self.dilation)
    }

    /// Which output columns each kernel column `kx` reaches inside the input.
    fn col_taps(&self) -> Vec<TapRange> {
        TapRange::all(self.w, self.wo, self.kw, self.padding.left, self.stride, self.dilation)
    }
}

/// Along one axis, for one kernel tap: the output positions `lo..hi` whose tap lands inside
/// the input (the others read padding), and `first`, the input index read by `lo`.
/// Output `o` in `lo..hi` reads input `first + (o - lo) * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TapRange {
    lo: usize,
    hi: usize,
    first: usize,
}

impl TapRange {
    fn all(n_in: usize, n_out: usize, k: usize, before: usize, stride: usize, dilation: usize) -> Vec<TapRange> {
        (0..k)
            .map(|tap| {
                // Output `o` reads input `o * stride + tap * dilation - before`.
                let shift = tap * dilation;
                let lo = before.saturating_sub(shift).div_ceil(stride);
                // The last readable input is `n_in - 1`, so `o * stride <= n_in - 1 + before - shift`.
                let hi = match (n_in + before).checked_sub(shift + 1) {
                    Some(last) => (last / stride + 1).min(n_out),
                    None => 0,
                };
                if lo < hi {
                    TapRange { lo, hi, first: lo * stride + shift - before }
                } else {
                    TapRange { lo: 0, hi: 0, first: 0 }
                }
            })
            .collect()
    }

    /// The input index read by output `o`, when the tap lands inside the input.
    #[inline]
    fn input_index(&self, o: usize, stride: usize) -> Option<usize> {
        (self.lo <= o && o < self.hi).then(|| self.first + (o - self.lo) * stride)
    }
}

/// The float types the CPU kernels support.
trait Float: WithDType {
    const ZERO: Self;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
}

impl Float for f64 {
    const ZERO: Self = 0.0;
}

/// The contiguous data of one input of a custom op.
fn contiguous<'a, T: WithDType>(name: &str, what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("{name}: {what} must be contiguous, got shape {:?} strides {:?}", layout.dims(), layout.stride()),
    }
}

/// Checks that an input of a custom op has the shape the geometry expects.
fn check_dims(name: &str, what: &str, layout: &Layout, expected: (usize, usize, usize, usize)) -> Result<()> {
    let (a, b, c, d) = expected;
    if layout.dims() != [a, b, c, d] {
        bail!("{name}: expected {what} of shape {:?}, got {:?}", [a, b, c, d], layout.dims())
    }
    Ok(())
}

/// Runs the f32 or f64 kernel on two contiguous storages of that dtype and wraps its output.
fn dispatch(
    name: &str,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    kernel_f32: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    kernel_f64: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    let (d1, d2) = (s1.dtype(), s2.dtype());
    if d1 != d2 {
        bail!("{name}: dtypes differ, {d1:?} and {d2:?}")
    }
    match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            let out = kernel_f32(contiguous(name, "arg 1", s1, l1)?, contiguous(name, "arg 2", s2, l2)?);
            Ok(CpuStorage::F32(out))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => {
            let out = kernel_f64(contiguous(name, "arg 1", s1, l1)?, contiguous(name, "arg 2", s2, l2)?);
            Ok(CpuStorage::F64(out))
        }
        _ => bail!("{name}: unsupported dtype {d1:?}"),
    }
}

/// `xs` through a ReLU (a copy), when asked.
fn relu_copy<T: Float>(xs: &[T], relu: bool) -> std::borrow::Cow<'_, [T]> {
    if relu {
        let relu = |&v: &T| if v >= T::ZERO { v } else { T::ZERO };
        std::borrow::Cow::Owned(xs.par_iter().with_min_len(1 << 15).map(relu).collect())
    } else {
        std::borrow::Cow::Borrowed(xs)
    }
}

#[cfg(feature = "cuda")]
use super::cuda::{by_dtype, dw_bwd_input, dw_bwd_weight, dw_fwd, same_dtype, view, wrap};

/// The geometry as the CUDA kernels take it.
#[cfg(feature = "cuda")]
fn cuda_geom(name: &str, g: &DepthwiseGeometry) -> Result<super::cuda::DwGeom> {
    use super::cuda::int;
    Ok(super::cuda::DwGeom {
        n: int(name, "batch", g.n)?,
        c: int(name, "channels", g.c)?,
        h: int(name, "height", g.h)?,
        w: int(name, "width", g.w)?,
        kh: int(name, "kernel height", g.kh)?,
        kw: int(name, "kernel width", g.kw)?,
        ho: int(name, "output height", g.ho)?,
        wo: int(name, "output width", g.wo)?,
        stride: int(name, "stride", g.stride)?,
        dilation: int(name, "dilation", g.dilation)?,
        pad_top: int(name, "top padding", g.padding.top)?,
        pad_left: int(name, "left padding", g.padding.left)?,
    })
}

/// The forward op on `(xs, weight)`; with `relu_in` it convolves `xs.relu()`.
#[derive(Debug, Clone, Copy)]
struct DepthwiseConv2d {
    stride: usize,
    dilation: usize,
    padding: Padding2d,
    relu_in: bool,
}

impl CustomOp2 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        FWD_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geom = DepthwiseGeometry::new(FWD_NAME, l1.dims(), l2.dims(), self.stride, self.dilation, self.padding)?;
        let relu = self.relu_in;
        let out = dispatch(
            FWD_NAME,
            s1,
            l1,
            s2,
            l2,
            |x, w| cpu::forward(&geom, &relu_copy(x, relu), w),
            |x, w| cpu::forward(&geom, &relu_copy(x, relu), w),
        )?;
        Ok((out, geom.output_dims().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let geom = DepthwiseGeometry::new(FWD_NAME, l1.dims(), l2.dims(), self.stride, self.dilation, self.padding)?;
        let g = cuda_geom(FWD_NAME, &geom)?;
        let (x, w, dev) = (s1, s2, s1.device());
        let out = by_dtype!(same_dtype(FWD_NAME, &[x, w])?, T => wrap(
            dw_fwd::<T>(dev, &view(FWD_NAME, x, l1)?, &view(FWD_NAME, w, l2)?, g, self.relu_in)?,
            dev,
        ));
        Ok((out, geom.output_dims().into()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let geom =
            DepthwiseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), self.stride, self.dilation, self.padding)?;
        let (xs, weight, grad) = (xs.contiguous()?, weight.contiguous()?, grad.contiguous()?);
        let mut grad_xs = grad.apply_op2_no_bwd(&weight, &DepthwiseConv2dGradInput { geom })?;
        if self.relu_in {
            grad_xs = (grad_xs * xs.ge(0.0)?.to_dtype(xs.dtype())?)?;
        }
        let grad_weight = xs.apply_op2_no_bwd(&grad, &DepthwiseConv2dGradWeight { geom, relu_in: self.relu_in })?;
        Ok((Some(grad_xs), Some(grad_weight)))
    }
}

/// The input gradient, on `(grad_out, weight)`: a transposed depthwise convolution.
#[derive(Debug, Clone, Copy)]
struct DepthwiseConv2dGradInput {
    geom: DepthwiseGeometry,
}

impl CustomOp2 for DepthwiseConv2dGradInput {
    fn name(&self) -> &'static str {
        GRAD_INPUT_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geom = &self.geom;
        check_dims(GRAD_INPUT_NAME, "an output gradient", l1, geom.output_dims())?;
        check_dims(GRAD_INPUT_NAME, "a weight", l2, geom.weight_dims())?;
        let out = dispatch(
            GRAD_INPUT_NAME,
            s1,
            l1,
            s2,
            l2,
            |g, w| cpu::grad_input(geom, g, w),
            |g, w| cpu::grad_input(geom, g, w),
        )?;
        Ok((out, geom.input_dims().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let geom = &self.geom;
        check_dims(GRAD_INPUT_NAME, "an output gradient", l1, geom.output_dims())?;
        check_dims(GRAD_INPUT_NAME, "a weight", l2, geom.weight_dims())?;
        let g = cuda_geom(GRAD_INPUT_NAME, geom)?;
        let (dy, w, dev) = (s1, s2, s1.device());
        let out = by_dtype!(same_dtype(GRAD_INPUT_NAME, &[dy, w])?, T => wrap(
            dw_bwd_input::<T>(dev, &view(GRAD_INPUT_NAME, dy, l1)?, &view(GRAD_INPUT_NAME, w, l2)?, g)?,
            dev,
        ));
        Ok((out, geom.input_dims().into()))
    }
}

/// The weight gradient, on `(xs, grad_out)`: a reduction over the batch and output positions
/// (of `xs.relu()` with `relu_in`).
#[derive(Debug, Clone, Copy)]
struct DepthwiseConv2dGradWeight {
    geom: DepthwiseGeometry,
    relu_in: bool,
}

impl CustomOp2 for DepthwiseConv2dGradWeight {
    fn name(&self) -> &'static str {
        GRAD_WEIGHT_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geom = &self.geom;
        check_dims(GRAD_WEIGHT_NAME, "an input", l1, geom.input_dims())?;
        check_dims(GRAD_WEIGHT_NAME, "an output gradient", l2, geom.output_dims())?;
        let out = dispatch(
            GRAD_WEIGHT_NAME,
            s1,
            l1,
            s2,
            l2,
            |x, g| cpu::grad_weight(geom, &relu_copy(x, self.relu_in), g),
            |x, g| cpu::grad_weight(geom, &relu_copy(x, self.relu_in), g),
        )?;
        Ok((out, geom.weight_dims().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let geom = &self.geom;
        check_dims(GRAD_WEIGHT_NAME, "an input", l1, geom.input_dims())?;
        check_dims(GRAD_WEIGHT_NAME, "an output gradient", l2, geom.output_dims())?;
        let g = cuda_geom(GRAD_WEIGHT_NAME, geom)?;
        let (x, dy, dev) = (s1, s2, s1.device());
        let out = by_dtype!(same_dtype(GRAD_WEIGHT_NAME, &[x, dy])?, T => wrap(
            dw_bwd_weight::<T>(dev, &view(GRAD_WEIGHT_NAME, x, l1)?, &view(GRAD_WEIGHT_NAME, dy, l2)?, g, self.relu_in)?,
            dev,
        ));
        Ok((out, geom.weight_dims().into()))
    }
}

/// The CPU kernels, on contiguous row-major slices.
///
/// Rows: every kernel walks the pairs (output row, kernel row) that meet an input row inside
/// the image, so padded rows are skipped. Columns: each kernel tap becomes a `RowTap`, a run
/// `out[lo..hi] += k * src[src..]` over the columns whose input lies inside the image, so
/// padding is never read or written. Where the taps of a `TapGroup` all overlap (the
/// interior), up to four taps are fused into one pass over the output; only the borders run
/// tap by tap. With stride `s > 1`, input and input-gradient planes go through a per-task
/// scratch buffer in "phased" column order (see `Plan`), so every run stays contiguous and
/// the loops vectorise.
mod cpu {
    use super::*;

    /// One kernel column as a contiguous run: `out[lo..hi] += k[kx] * src[src..src + hi - lo]`.
    #[derive(Debug, Clone, Copy)]
    struct RowTap {
        kx: usize,
        lo: usize,
        hi: usize,
        src: usize,
    }

    /// Taps that write into the same output row, with the interior `inner_lo..inner_hi`
    /// that all of them cover (empty when they do not overlap).
    #[derive(Debug, Clone)]
    struct TapGroup {
        taps: Vec<RowTap>,
        inner_lo: usize,
        inner_hi: usize,
    }

    impl TapGroup {
        fn new(taps: Vec<RowTap>) -> Self {
            let inner_lo = taps.iter().map(|t| t.lo).max().unwrap_or(0);
            let inner_hi = taps.iter().map(|t| t.hi).min().unwrap_or(0);
            let (inner_lo, inner_hi) = if inner_lo < inner_hi { (inner_lo, inner_hi) } else { (0, 0) };
            TapGroup { taps, inner_lo, inner_hi }
        }

        /// `out_row += sum over taps of k_row[kx] * shifted src_row`.
        #[inline]
        fn apply<T: Float>(&self, out_row: &mut [T], src_row: &[T], k_row: &[T]) {
            let (inner_lo, inner_hi) = (self.inner_lo, self.inner_hi);
            // Borders, tap by tap (with an empty interior, `inner_lo == inner_hi == 0` and
            // the second run is the whole tap).
            for t in &self.taps {
                for (lo, hi) in [(t.lo, inner_lo.clamp(t.lo, t.hi)), (inner_hi.clamp(t.lo, t.hi), t.hi)] {
                    let src = t.src + (lo - t.lo);
                    axpy(&mut out_row[lo..hi], k_row[t.kx], &src_row[src..src + (hi - lo)]);
                }
            }
            if inner_lo == inner_hi {
                return;
            }
            // The interior, four taps at a time.
            let out = &mut out_row[inner_lo..inner_hi];
            let n = out.len();
            let run = |t: &RowTap| (k_row[t.kx], &src_row[t.src + (inner_lo - t.lo)..][..n]);
            for chunk in self.taps.chunks(4) {
                match chunk {
                    [a, b, c, d] => {
                        let ((ka, xa), (kb, xb), (kc, xc), (kd, xd)) = (run(a), run(b), run(c), run(d));
                        for ((((o, &va), &vb), &vc), &vd) in out.iter_mut().zip(xa).zip(xb).zip(xc).zip(xd) {
                            *o += ka * va + kb * vb + kc * vc + kd * vd;
                        }
                    }
                    [a, b, c] => {
                        let ((ka, xa), (kb, xb), (kc, xc)) = (run(a), run(b), run(c));
                        for (((o, &va), &vb), &vc) in out.iter_mut().zip(xa).zip(xb).zip(xc) {
                            *o += ka * va + kb * vb + kc * vc;
                        }
                    }
                    [a, b] => {
                        let ((ka, xa), (kb, xb)) = (run(a), run(b));
                        for ((o, &va), &vb) in out.iter_mut().zip(xa).zip(xb) {
                            *o += ka * va + kb * vb;
                        }
                    }
                    [a] => {
                        let (ka, xa) = run(a);
                        axpy(out, ka, xa);
                    }
                    _ => unreachable!("chunks of one to four taps"),
                }
            }
        }
    }

    /// `out += k * x` over equal-length slices.
    #[inline]
    fn axpy<T: Float>(out: &mut [T], k: T, x: &[T]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += k * v;
        }
    }

    /// The loop plan shared by the three kernels.
    ///
    /// In the phased column order, column `ix = q * s + p` of a row sits at `p * wq + q`
    /// (`wq = ceil(w / s)`), so the columns one tap meets at stride `s` are contiguous.
    /// At stride 1 the order is the identity and planes are used in place.
    #[derive(Debug)]
    struct Plan {
        geom: DepthwiseGeometry,
        rows: Vec<TapRange>,
        wq: usize,
        row_len: usize,
        /// Forward and weight gradient: output columns read phased input columns.
        forward: TapGroup,
        /// Input gradient: phased input-gradient columns gather output-gradient columns,
        /// one group per phase.
        backward: Vec<TapGroup>,
    }

    impl Plan {
        fn new(geom: &DepthwiseGeometry) -> Self {
            let s = geom.stride;
            let wq = geom.w.div_ceil(s);
            let row_len = if s == 1 { geom.w } else { s * wq };
            let cols = geom.col_taps();
            let phased = |first: usize| (first % s) * wq + first / s;
            let forward = cols
                .iter()
                .enumerate()
                .filter(|(_, t)| t.lo < t.hi)
                .map(|(kx, t)| RowTap { kx, lo: t.lo, hi: t.hi, src: phased(t.first) })
                .collect();
            let backward = (0..s)
                .map(|phase| {
                    let taps = cols.iter().enumerate().filter(|(_, t)| t.lo < t.hi && t.first % s == phase);
                    let taps = taps.map(|(kx, t)| {
                        let start = phased(t.first);
                        RowTap { kx, lo: start, hi: start + (t.hi - t.lo), src: t.lo }
                    });
                    TapGroup::new(taps.collect())
                })
                .filter(|group| !group.taps.is_empty())
                .collect();
            Plan { geom: *geom, rows: geom.row_taps(), wq, row_len, forward: TapGroup::new(forward), backward }
        }

        /// Per-task scratch for one phased plane; empty at stride 1, where none is needed.
        fn scratch<T: Float>(&self) -> Vec<T> {
            if self.geom.stride == 1 {
                Vec::new()
            } else {
                vec![T::ZERO; self.geom.h * self.row_len]
            }
        }

        /// The plane in phased order: `plane` itself at stride 1, else a copy in `scratch`.
        fn phased<'a, T: Float>(&self, plane: &'a [T], scratch: &'a mut [T]) -> &'a [T] {
            let (w, s) = (self.geom.w, self.geom.stride);
            if s == 1 {
                return plane;
            }
            for (src, dst) in plane.chunks_exact(w).zip(scratch.chunks_exact_mut(self.row_len)) {
                if s == 2 {
                    // The common case, as a pairwise loop that vectorises.
                    let (even, odd) = dst.split_at_mut(self.wq);
                    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
                        (*e, *o) = (pair[0], pair[1]);
                    }
                    if w % 2 == 1 {
                        even[self.wq - 1] = src[w - 1];
                    }
                    continue;
                }
                for (p, dst) in dst.chunks_exact_mut(self.wq).enumerate() {
                    for (d, &v) in dst.iter_mut().zip(src[p.min(w)..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
            scratch
        }

        /// Writes a phased plane back in row-major order.
        fn unphase<T: Float>(&self, phased: &[T], plane: &mut [T]) {
            let (w, s) = (self.geom.w, self.geom.stride);
            for (dst, src) in plane.chunks_exact_mut(w).zip(phased.chunks_exact(self.row_len)) {
                if s == 2 {
                    let (even, odd) = src.split_at(self.wq);
                    for ((&e, &o), pair) in even.iter().zip(odd).zip(dst.chunks_exact_mut(2)) {
                        (pair[0], pair[1]) = (e, o);
                    }
                    if w % 2 == 1 {
                        dst[w - 1] = even[self.wq - 1];
                    }
                    continue;
                }
                for (p, src) in src.chunks_exact(self.wq).enumerate() {
                    for (d, &v) in dst[p.min(w)..].iter_mut().step_by(s).zip(src) {
                        *d = v;
                    }
                }
            }
        }

        /// Calls `f(oy, iy, ky)` for every output row `oy` and kernel row `ky` that meet input
        /// row `iy` inside the image.
        #[inline]
        fn for_each_row_pair(&self, mut f: impl FnMut(usize, usize, usize)) {
            for oy in 0..self.geom.ho {
                for (ky, row_tap) in self.rows.iter().enumerate() {
                    if let Some(iy) = row_tap.input_index(oy, self.geom.stride) {
                        f(oy, iy, ky);
                    }
                }
            }
        }
    }

    /// `out[(n, c)] = sum over taps of weight[c, tap] * shifted xs[(n, c)]`, one rayon task
    /// per `(n, c)` plane.
    pub(super) fn forward<T: Float>(geom: &DepthwiseGeometry, xs: &[T], weight: &[T]) -> Vec<T> {
        let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
        let plan = Plan::new(geom);
        let mut out = vec![T::ZERO; n * c * ho * wo];
        if out.is_empty() || h * w == 0 {
            // An empty image pads to windows of zeros.
            return out;
        }
        out.par_chunks_mut(ho * wo).enumerate().for_each_init(
            || plan.scratch(),
            |scratch, (plane, out)| {
                let x = plan.phased(&xs[plane * h * w..(plane + 1) * h * w], scratch);
                let k = &weight[(plane % c) * kh * kw..(plane % c + 1) * kh * kw];
                plan.for_each_row_pair(|oy, iy, ky| {
                    let out_row = &mut out[oy * wo..(oy + 1) * wo];
                    let x_row = &x[iy * plan.row_len..(iy + 1) * plan.row_len];
                    plan.forward.apply(out_row, x_row, &k[ky * kw..(ky + 1) * kw]);
                });
            },
        );
        out
    }

    /// `grad_xs[(n, c)]`: every input position gathers the output gradients whose windows
    /// read it, one rayon task per plane (each task owns its plane, so there are no races).
    pub(super) fn grad_input<T: Float>(geom: &DepthwiseGeometry, grad: &[T], weight: &[T]) -> Vec<T> {
        let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, stride, .. } = geom;
        let plan = Plan::new(geom);
        let mut grad_xs = vec![T::ZERO; n * c * h * w];
        if grad_xs.is_empty() {
            return grad_xs;
        }
        grad_xs.par_chunks_mut(h * w).enumerate().for_each_init(
            || plan.scratch(),
            |scratch, (plane, dx_plane)| {
                let g = &grad[plane * ho * wo..(plane + 1) * ho * wo];
                let k = &weight[(plane % c) * kh * kw..(plane % c + 1) * kh * kw];
                let gather = |dx: &mut [T]| {
                    plan.for_each_row_pair(|oy, iy, ky| {
                        let dx_row = &mut dx[iy * plan.row_len..(iy + 1) * plan.row_len];
                        let (g_row, k_row) = (&g[oy * wo..(oy + 1) * wo], &k[ky * kw..(ky + 1) * kw]);
                        for group in &plan.backward {
                            group.apply(dx_row, g_row, k_row);
                        }
                    })
                };
                if stride == 1 {
                    gather(dx_plane);
                } else {
                    scratch.fill(T::ZERO);
                    gather(scratch);
                    plan.unphase(scratch, dx_plane);
                }
            },
        );
        grad_xs
    }

    /// `grad_weight[c, tap] = sum over n and output positions of grad * shifted xs`, one
    /// rayon task per channel that reduces over the batch. Each tap accumulates elementwise
    /// into its own row of `wo` partial sums (vectorised, and more accurate than one running
    /// sum), which are added up once per channel.
    pub(super) fn grad_weight<T: Float>(geom: &DepthwiseGeometry, xs: &[T], grad: &[T]) -> Vec<T> {
        let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
        let plan = Plan::new(geom);
        let mut grad_weight = vec![T::ZERO; c * kh * kw];
        if grad_weight.is_empty() || h * w == 0 {
            return grad_weight;
        }
        let scratch = || (plan.scratch(), vec![T::ZERO; kh * kw * wo]);
        grad_weight.par_chunks_mut(kh * kw).enumerate().for_each_init(scratch, |(scratch, partial), (channel, dk)| {
            partial.fill(T::ZERO);
            for batch_idx in 0..n {
                let plane = batch_idx * c + channel;
                let x = plan.phased(&xs[plane * h * w..(plane + 1) * h * w], scratch);
                let g = &grad[plane * ho * wo..(plane + 1) * ho * wo];
                plan.for_each_row_pair(|oy, iy, ky| {
                    let (g_row, x_row) = (&g[oy * wo..(oy + 1) * wo], &x[iy * plan.row_len..(iy + 1) * plan.row_len]);
                    for t in &plan.forward.taps {
                        let acc = &mut partial[(ky * kw + t.kx) * wo..][t.lo..t.hi];
                        let x = &x_row[t.src..t.src + acc.len()];
                        for ((a, &gv), &xv) in acc.iter_mut().zip(&g_row[t.lo..t.hi]).zip(x) {
                            *a += gv * xv;
                        }
                    }
                });
            }
            for (d, acc) in dk.iter_mut().zip(partial.chunks_exact(wo)) {
                *d = acc.iter().fold(T::ZERO, |s, &a| s + a);
            }
        });
        grad_weight
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{depthwise_conv2d, depthwise_conv2d_reference};
    use crate::kernels::testutil::*;
    use crate::kernels::Padding2d;

    /// One test case: shapes and convolution parameters.
    #[derive(Debug, Clone, Copy)]
    struct Case {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        stride: usize,
        dilation: usize,
        padding: Padding2d,
    }

    impl Case {
        fn inputs(&self, rng: &mut TestRng, dtype: DType) -> (Tensor, Tensor) {
            let xs = rng.tensor(&[self.n, self.c, self.h, self.w], dtype).unwrap();
            let weight = rng.tensor(&[self.c, 1, self.k, self.k], dtype).unwrap();
            (xs, weight)
        }
    }

    /// Random cases over k in {3, 5, 7}, stride {1, 2}, dilation {1, 2}, odd and even sizes,
    /// each with TF SAME, VALID (where the input is large enough) and an asymmetric padding.
    fn cases(rng: &mut TestRng) -> Vec<Case> {
        const SIZES: [usize; 4] = [7, 8, 15, 16];
        let mut cases = Vec::new();
        for k in [3, 5, 7] {
            for stride in [1, 2] {
                for dilation in [1, 2] {
                    let span = (k - 1) * dilation + 1;
                    let (n, c) = (1 + rng.below(3), 1 + rng.below(5));
                    let (h, w) = (SIZES[rng.below(4)], SIZES[rng.below(4)]);
                    let same = Padding2d::same(h, w, k, k, stride, dilation);
                    cases.push(Case { n, c, h, w, k, stride, dilation, padding: same });
                    let (h_big, w_big) = (span + rng.below(4), span + 1 + rng.below(4));
                    let valid = Padding2d::default();
                    cases.push(Case { n, c, h: h_big, w: w_big, k, stride, dilation, padding: valid });
                    let padding =
                        Padding2d { top: rng.below(4), bottom: rng.below(k), left: rng.below(k), right: rng.below(3) };
                    let (h, w) = (h.max(span), w.max(span));
                    cases.push(Case { n, c, h, w, k, stride, dilation, padding });
                }
            }
        }
        cases
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = TestRng::new(1);
        for case in cases(&mut rng) {
            for dtype in [DType::F32, DType::F64] {
                let (xs, weight) = case.inputs(&mut rng, dtype);
                let Case { stride, dilation, padding, .. } = case;
                let out = depthwise_conv2d(&xs, &weight, stride, dilation, padding).unwrap();
                let expected = depthwise_conv2d_reference(&xs, &weight, stride, dilation, padding).unwrap();
                let ho = Padding2d::out_size(case.h, padding.top, padding.bottom, case.k, stride, dilation);
                let wo = Padding2d::out_size(case.w, padding.left, padding.right, case.k, stride, dilation);
                assert_eq!(out.dims(), [case.n, case.c, ho, wo], "{case:?}");
                assert_eq!(out.dtype(), dtype);
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert_close(&out, &expected, tol, &format!("forward {dtype:?} {case:?}"));
            }
        }
    }

    /// TF SAME with stride 2 on an even input pads only after: on a 4x4 image of ones with a
    /// 3x3 filter of ones, the top-left window is full (9) and the bottom-right one is 2x2 (4).
    #[test]
    fn same_padding_is_asymmetric_on_even_inputs() {
        let xs = Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let weight = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let padding = Padding2d::same(4, 4, 3, 3, 2, 1);
        let out = depthwise_conv2d(&xs, &weight, 2, 1, padding).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [9.0, 6.0, 6.0, 4.0]);
    }

    #[test]
    fn gradients_match_reference() {
        let mut rng = TestRng::new(2);
        for case in cases(&mut rng) {
            let (xs, weight) = case.inputs(&mut rng, DType::F32);
            let Case { stride, dilation, padding, .. } = case;
            let fast = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], stride, dilation, padding);
            let reference = |ts: &[Tensor]| depthwise_conv2d_reference(&ts[0], &ts[1], stride, dilation, padding);
            let out = fast(&[xs.clone(), weight.clone()]).unwrap();
            let probe = rng.tensor(out.dims(), DType::F32).unwrap();
            let inputs = [xs, weight];
            let grads = analytic_grads(&fast, &inputs, &probe).unwrap();
            let expected = analytic_grads(&reference, &inputs, &probe).unwrap();
            assert_close(&grads[0], &expected[0], 1e-5, &format!("input gradient {case:?}"));
            assert_close(&grads[1], &expected[1], 1e-5, &format!("weight gradient {case:?}"));
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = TestRng::new(3);
        let asymmetric = Padding2d { top: 0, bottom: 3, left: 2, right: 1 };
        let small = [
            Case { n: 2, c: 2, h: 6, w: 5, k: 3, stride: 1, dilation: 1, padding: Padding2d::same(6, 5, 3, 3, 1, 1) },
            Case { n: 1, c: 3, h: 6, w: 7, k: 3, stride: 2, dilation: 2, padding: Padding2d::same(6, 7, 3, 3, 2, 2) },
            Case { n: 2, c: 1, h: 8, w: 6, k: 5, stride: 2, dilation: 1, padding: Padding2d::same(8, 6, 5, 5, 2, 1) },
            Case { n: 1, c: 2, h: 5, w: 6, k: 3, stride: 2, dilation: 2, padding: asymmetric },
            Case { n: 1, c: 2, h: 7, w: 8, k: 7, stride: 1, dilation: 1, padding: Padding2d::default() },
        ];
        for case in small {
            let (xs, weight) = case.inputs(&mut rng, DType::F64);
            let Case { stride, dilation, padding, .. } = case;
            let f = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], stride, dilation, padding);
            check_finite_differences(&f, &[xs, weight], 1e-6, 1e-6);
        }
    }

    #[test]
    fn non_contiguous_inputs_give_the_same_result() {
        let mut rng = TestRng::new(4);
        let padding = Padding2d::same(9, 8, 5, 5, 2, 1);
        let xs = rng.tensor(&[2, 3, 9, 8], DType::F32).unwrap();
        let weight = rng.tensor(&[3, 1, 5, 5], DType::F32).unwrap();
        let expected = depthwise_conv2d(&xs, &weight, 2, 1, padding).unwrap();

        // The same values through a transposed layout and through a narrowed one.
        let transposed = xs.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        assert!(!transposed.is_contiguous());
        let wide = Tensor::cat(&[&xs, &xs], 3).unwrap();
        let narrowed = wide.narrow(3, 8, 8).unwrap();
        assert!(!narrowed.is_contiguous());
        let weight_t = weight.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        for (xs, weight) in [(&transposed, &weight), (&narrowed, &weight), (&xs, &weight_t)] {
            let out = depthwise_conv2d(xs, weight, 2, 1, padding).unwrap();
            assert_eq!(max_abs_diff(&out, &expected).unwrap(), 0.0);
        }

        // A non-contiguous offset view of a bigger buffer also differentiates.
        let f = |ts: &[Tensor]| depthwise_conv2d(&ts[0].narrow(3, 8, 8)?, &ts[1], 2, 1, padding);
        let probe = rng.tensor(expected.dims(), DType::F32).unwrap();
        let grads = analytic_grads(&f, &[wide, weight.clone()], &probe).unwrap();
        let plain =
            analytic_grads(&|ts| depthwise_conv2d(&ts[0], &ts[1], 2, 1, padding), &[xs, weight], &probe).unwrap();
        assert_eq!(max_abs_diff(&grads[0].narrow(3, 8, 8).unwrap(), &plain[0]).unwrap(), 0.0);
        assert_eq!(
            grads[0].narrow(3, 0, 8).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert_eq!(max_abs_diff(&grads[1], &plain[1]).unwrap(), 0.0);
    }

    /// Edge shapes: a 1x1 filter, a kernel wider than the image that only padding makes fit,
    /// a stride larger than the image and an empty image; forward and gradients against the
    /// reference where it runs, and zeros for the empty image.
    #[test]
    fn edge_shapes() {
        let mut rng = TestRng::new(7);
        let cases = [
            (Case { n: 2, c: 3, h: 4, w: 5, k: 1, stride: 1, dilation: 1, padding: Padding2d::default() }, 1e-5),
            (
                Case {
                    n: 1,
                    c: 2,
                    h: 2,
                    w: 3,
                    k: 5,
                    stride: 1,
                    dilation: 1,
                    padding: Padding2d::same(2, 3, 5, 5, 1, 1),
                },
                1e-5,
            ),
            (
                Case {
                    n: 1,
                    c: 2,
                    h: 3,
                    w: 1,
                    k: 3,
                    stride: 3,
                    dilation: 2,
                    padding: Padding2d::same(3, 1, 3, 3, 3, 2),
                },
                1e-5,
            ),
            (
                Case {
                    n: 1,
                    c: 2,
                    h: 3,
                    w: 5,
                    k: 3,
                    stride: 4,
                    dilation: 1,
                    padding: Padding2d { top: 2, bottom: 0, left: 0, right: 3 },
                },
                1e-5,
            ),
        ];
        for (case, tol) in cases {
            let (xs, weight) = case.inputs(&mut rng, DType::F32);
            let Case { stride, dilation, padding, .. } = case;
            let fast = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], stride, dilation, padding);
            let reference = |ts: &[Tensor]| depthwise_conv2d_reference(&ts[0], &ts[1], stride, dilation, padding);
            let inputs = [xs, weight];
            let out = fast(&inputs).unwrap();
            assert_close(&out, &reference(&inputs).unwrap(), tol, &format!("forward {case:?}"));
            let probe = rng.tensor(out.dims(), DType::F32).unwrap();
            let grads = analytic_grads(&fast, &inputs, &probe).unwrap();
            let expected = analytic_grads(&reference, &inputs, &probe).unwrap();
            assert_close(&grads[0], &expected[0], tol, &format!("input gradient {case:?}"));
            assert_close(&grads[1], &expected[1], tol, &format!("weight gradient {case:?}"));
        }

        let empty = Tensor::zeros((2, 3, 4, 0), DType::F32, &Device::Cpu).unwrap();
        let weight = rng.tensor(&[3, 1, 3, 3], DType::F32).unwrap();
        let padding = Padding2d { top: 1, bottom: 1, left: 2, right: 1 };
        let f = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], 1, 1, padding);
        let out = f(&[empty.clone(), weight.clone()]).unwrap();
        assert_eq!(out.dims(), [2, 3, 4, 1]);
        assert_eq!(out.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let probe = rng.tensor(out.dims(), DType::F32).unwrap();
        let grads = analytic_grads(&f, &[empty, weight], &probe).unwrap();
        assert_eq!(grads[0].dims(), [2, 3, 4, 0]);
        assert_eq!(grads[1].abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn bad_shapes_are_errors_that_quote_them() {
        let mut rng = TestRng::new(5);
        let xs = rng.tensor(&[2, 3, 8, 8], DType::F32).unwrap();
        let pad = Padding2d::same(8, 8, 3, 3, 1, 1);
        let err = |xs: &Tensor, weight: &Tensor, stride: usize, dilation: usize, padding: Padding2d| {
            let reference = depthwise_conv2d_reference(xs, weight, stride, dilation, padding).unwrap_err();
            assert!(reference.to_string().contains("depthwise-conv2d: "), "{reference}");
            depthwise_conv2d(xs, weight, stride, dilation, padding).unwrap_err().to_string()
        };

        let wrong_channels = rng.tensor(&[4, 1, 3, 3], DType::F32).unwrap();
        let msg = err(&xs, &wrong_channels, 1, 1, pad);
        assert!(msg.contains("[2, 3, 8, 8]") && msg.contains("[4, 1, 3, 3]"), "{msg}");

        let multiplier_two = rng.tensor(&[3, 2, 3, 3], DType::F32).unwrap();
        let msg = err(&xs, &multiplier_two, 1, 1, pad);
        assert!(msg.contains("[3, 2, 3, 3]"), "{msg}");

        let weight = rng.tensor(&[3, 1, 3, 3], DType::F32).unwrap();
        let rank3 = rng.tensor(&[3, 8, 8], DType::F32).unwrap();
        let msg = err(&rank3, &weight, 1, 1, pad);
        assert!(msg.contains("[3, 8, 8]"), "{msg}");

        let tiny = rng.tensor(&[1, 3, 4, 8], DType::F32).unwrap();
        let msg = err(&tiny, &weight, 1, 2, Padding2d::default());
        assert!(msg.contains("[1, 3, 4, 8]") && msg.contains("[3, 1, 3, 3]") && msg.contains("5x5"), "{msg}");

        let msg = err(&xs, &weight, 0, 1, pad);
        assert!(msg.contains("stride (0)"), "{msg}");
    }

    #[test]
    fn unsupported_and_mixed_dtypes_are_named_errors() {
        let mut rng = TestRng::new(6);
        let pad = Padding2d::same(5, 5, 3, 3, 1, 1);
        let xs = rng.tensor(&[1, 2, 5, 5], DType::F32).unwrap();
        let weight = rng.tensor(&[2, 1, 3, 3], DType::F32).unwrap();
        let (xs16, weight16) = (xs.to_dtype(DType::BF16).unwrap(), weight.to_dtype(DType::BF16).unwrap());
        let msg = depthwise_conv2d(&xs16, &weight16, 1, 1, pad).unwrap_err().to_string();
        assert!(msg.contains("depthwise-conv2d: unsupported dtype BF16"), "{msg}");
        let weight64 = weight.to_dtype(DType::F64).unwrap();
        let msg = depthwise_conv2d(&xs, &weight64, 1, 1, pad).unwrap_err().to_string();
        assert!(msg.contains("depthwise-conv2d: dtypes differ, F32 and F64"), "{msg}");
    }
}
