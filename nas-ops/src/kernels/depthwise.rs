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
//! With `ConvOptions::relu_input` the op reads its input through a ReLU, so the ReLU's
//! output is never stored (NASNet's separable convs all start with one).
//! Under the `cuda` feature each op has a CUDA twin (`cuda_fwd`, kernels in
//! `kernels/nas_ops.cu`).

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::simd::Isa;
use crate::kernels::window as cpu;
use crate::kernels::{cpu_kernel, ConvOptions, Padding2d};

/// Depthwise convolution of `xs` with one `kh × kw` filter per channel, through the direct
/// CPU kernel (custom op "depthwise-conv2d", differentiable with respect to both inputs).
/// With `opts.relu_input` the input is read through a ReLU inside the op: `xs.relu()` is
/// never stored, and its gradient passes where `xs >= 0` (candle's ReLU rule).
///
/// # Shapes
/// - `xs`: `(n, c, h, w)`
/// - `weight`: `(c, 1, kh, kw)` (channel multiplier 1)
/// - returns: `(n, c, ho, wo)` with
///   `ho = Padding2d::out_size(h, padding.top, padding.bottom, kh, stride, dilation)` and
///   `wo` likewise
pub fn depthwise_conv2d(xs: &Tensor, weight: &Tensor, opts: ConvOptions) -> Result<Tensor> {
    let op = DepthwiseConv2d { opts };
    op.geometry(xs.dims(), weight.dims())?;
    xs.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// Same contract as [`depthwise_conv2d`], composed from plain candle tensor ops (a ReLU
/// with `opts.relu_input`, explicit zero padding, then a grouped `conv2d` with `groups = c`):
/// runs on any device and is differentiable through candle's own backward pass.
///
/// # Shapes
/// - `xs`: `(n, c, h, w)`
/// - `weight`: `(c, 1, kh, kw)`
/// - returns: `(n, c, ho, wo)`, as for [`depthwise_conv2d`]
pub fn depthwise_conv2d_reference(xs: &Tensor, weight: &Tensor, opts: ConvOptions) -> Result<Tensor> {
    let ConvOptions { stride, dilation, padding, relu_input } = opts;
    let xs = if relu_input { xs.relu()? } else { xs.clone() };
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
const GRAD_INPUT_RELU_NAME: &str = "depthwise-conv2d-relu-grad-input";
const GRAD_WEIGHT_NAME: &str = "depthwise-conv2d-grad-weight";

/// Every size of one depthwise convolution, checked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DepthwiseGeometry {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
    pub(crate) padding: Padding2d,
}

impl DepthwiseGeometry {
    /// Validates the input and weight shapes against the stride, dilation and padding.
    pub(crate) fn new(
        name: &str,
        xs_dims: &[usize],
        weight_dims: &[usize],
        stride: usize,
        dilation: usize,
        padding: Padding2d,
    ) -> Result<Self> {
        let &[_, c, _, _] = xs_dims else { bail!("{name}: expected an input of shape (n, c, h, w), got {xs_dims:?}") };
        let &[c_k, 1, kh, kw] = weight_dims else {
            bail!("{name}: expected a weight of shape (c, 1, kh, kw) with c = {c} for input {xs_dims:?}, got {weight_dims:?}")
        };
        if c_k != c || kh == 0 || kw == 0 {
            bail!("{name}: expected a weight of shape (c, 1, kh, kw) with c = {c} for input {xs_dims:?}, got {weight_dims:?}")
        }
        Self::window(name, xs_dims, weight_dims, (kh, kw), stride, dilation, padding)
    }

    /// The geometry of a `kh × kw` window over the planes of `xs_dims` `(n, c, h, w)`, after
    /// checking the stride, the dilation and that the padded input holds the window's span
    /// (`weight_dims` is quoted in the error). The caller has checked the weight's shape.
    pub(crate) fn window(
        name: &str,
        xs_dims: &[usize],
        weight_dims: &[usize],
        (kh, kw): (usize, usize),
        stride: usize,
        dilation: usize,
        padding: Padding2d,
    ) -> Result<Self> {
        let &[n, c, h, w] = xs_dims else { bail!("{name}: expected an input of shape (n, c, h, w), got {xs_dims:?}") };
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
}

/// Checks that an input of a custom op has the shape the geometry expects.
fn check_dims(name: &str, what: &str, layout: &Layout, expected: (usize, usize, usize, usize)) -> Result<()> {
    let (a, b, c, d) = expected;
    if layout.dims() != [a, b, c, d] {
        bail!("{name}: expected {what} of shape {:?}, got {:?}", [a, b, c, d], layout.dims())
    }
    Ok(())
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

/// The forward op on `(xs, weight)`; with `opts.relu_input` it convolves `xs.relu()`.
#[derive(Debug, Clone, Copy)]
struct DepthwiseConv2d {
    opts: ConvOptions,
}

impl CustomOp2 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        FWD_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geom = self.geometry(l1.dims(), l2.dims())?;
        let relu = self.opts.relu_input;
        let out = cpu_kernel!(
            FWD_NAME,
            [x = (s1, l1, "xs"), w = (s2, l2, "weight")],
            cpu::forward(Isa::detect(), &geom, x, w, relu)
        );
        Ok((out, geom.output_dims().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let geom = self.geometry(l1.dims(), l2.dims())?;
        let g = cuda_geom(FWD_NAME, &geom)?;
        let (x, w, dev) = (s1, s2, s1.device());
        let out = by_dtype!(same_dtype(FWD_NAME, &[x, w])?, T => wrap(
            dw_fwd::<T>(dev, &view(FWD_NAME, x, l1)?, &view(FWD_NAME, w, l2)?, g, self.opts.relu_input)?,
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
        let (grad_xs, grad_weight) = self.grads(xs, weight, grad)?;
        Ok((Some(grad_xs), Some(grad_weight)))
    }
}

impl DepthwiseConv2d {
    fn geometry(&self, xs_dims: &[usize], weight_dims: &[usize]) -> Result<DepthwiseGeometry> {
        let ConvOptions { stride, dilation, padding, .. } = self.opts;
        DepthwiseGeometry::new(FWD_NAME, xs_dims, weight_dims, stride, dilation, padding)
    }

    /// The gradients of the input and the weight from the output's `grad`.
    fn grads(&self, xs: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let geom = self.geometry(xs.dims(), weight.dims())?;
        let (xs, weight, grad) = (xs.contiguous()?, weight.contiguous()?, grad.contiguous()?);
        let grad_xs = match (self.opts.relu_input, xs.device().is_cpu()) {
            // On the CPU the ReLU's gradient mask is applied inside the kernel.
            (true, true) => grad.apply_op3_no_bwd(&weight, &xs, &DepthwiseConv2dGradInputRelu { geom })?,
            (true, false) => {
                (grad.apply_op2_no_bwd(&weight, &DepthwiseConv2dGradInput { geom })?
                    * xs.ge(0.0)?.to_dtype(xs.dtype())?)?
            }
            (false, _) => grad.apply_op2_no_bwd(&weight, &DepthwiseConv2dGradInput { geom })?,
        };
        let grad_weight =
            xs.apply_op2_no_bwd(&grad, &DepthwiseConv2dGradWeight { geom, relu_in: self.opts.relu_input })?;
        Ok((grad_xs, grad_weight))
    }
}

/// The gradients of `xs` and `weight` of [`depthwise_conv2d`] from the output's `grad`, for
/// ops that run the conv inside them.
pub(crate) fn depthwise_conv2d_grads(
    (xs, weight, grad): (&Tensor, &Tensor, &Tensor),
    opts: ConvOptions,
) -> Result<(Tensor, Tensor)> {
    DepthwiseConv2d { opts }.grads(xs, weight, grad)
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
        let out = cpu_kernel!(
            GRAD_INPUT_NAME,
            [g = (s1, l1, "grad"), w = (s2, l2, "weight")],
            cpu::grad_input(Isa::detect(), geom, g, w, None)
        );
        Ok((out, geom.input_dims().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
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

/// The input gradient of [`depthwise_conv2d`] with a ReLU on its input, on `(grad_out, weight, xs)`: the
/// transposed convolution, zeroed where `xs < 0`, in one pass (CPU only; other devices mask
/// the result of [`DepthwiseConv2dGradInput`]).
#[derive(Debug, Clone, Copy)]
struct DepthwiseConv2dGradInputRelu {
    geom: DepthwiseGeometry,
}

impl CustomOp3 for DepthwiseConv2dGradInputRelu {
    fn name(&self) -> &'static str {
        GRAD_INPUT_RELU_NAME
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
        let (name, geom) = (GRAD_INPUT_RELU_NAME, &self.geom);
        check_dims(name, "an output gradient", l1, geom.output_dims())?;
        check_dims(name, "a weight", l2, geom.weight_dims())?;
        check_dims(name, "an input", l3, geom.input_dims())?;
        let out = cpu_kernel!(name, [g = (s1, l1, "grad"), w = (s2, l2, "weight"), x = (s3, l3, "xs")], {
            cpu::grad_input(Isa::detect(), geom, g, w, Some(x))
        });
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
        let out = cpu_kernel!(
            GRAD_WEIGHT_NAME,
            [x = (s1, l1, "xs"), g = (s2, l2, "grad")],
            cpu::grad_weight(Isa::detect(), geom, x, g, self.relu_in)
        );
        Ok((out, geom.weight_dims().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    fn opts(stride: usize, dilation: usize, padding: Padding2d) -> ConvOptions {
        ConvOptions { stride, dilation, padding, relu_input: false }
    }

    use super::{depthwise_conv2d, depthwise_conv2d_reference};
    use crate::kernels::testutil::*;
    use crate::kernels::{ConvOptions, Padding2d};

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
                let out = depthwise_conv2d(&xs, &weight, opts(stride, dilation, padding)).unwrap();
                let expected = depthwise_conv2d_reference(&xs, &weight, opts(stride, dilation, padding)).unwrap();
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
        let out = depthwise_conv2d(&xs, &weight, opts(2, 1, padding)).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [9.0, 6.0, 6.0, 4.0]);
    }

    #[test]
    fn gradients_match_reference() {
        let mut rng = TestRng::new(2);
        for case in cases(&mut rng) {
            let (xs, weight) = case.inputs(&mut rng, DType::F32);
            let Case { stride, dilation, padding, .. } = case;
            let fast = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], opts(stride, dilation, padding));
            let reference = |ts: &[Tensor]| depthwise_conv2d_reference(&ts[0], &ts[1], opts(stride, dilation, padding));
            let out = fast(&[xs.clone(), weight.clone()]).unwrap();
            let probe = rng.tensor(out.dims(), DType::F32).unwrap();
            let inputs = [xs, weight];
            let grads = analytic_grads(&fast, &inputs, &probe).unwrap();
            let expected = analytic_grads(&reference, &inputs, &probe).unwrap();
            assert_close(&grads[0], &expected[0], 1e-5, &format!("input gradient {case:?}"));
            assert_close(&grads[1], &expected[1], 1e-5, &format!("weight gradient {case:?}"));
        }
    }

    /// The kernels themselves, on every instruction set this CPU has (`kernels::simd`), with
    /// and without the fused ReLU, against the reference: rows wider than one register block
    /// (17 to 53 columns, so rows end in partial chunks), strides 1 to 3, f32 and f64.
    #[test]
    fn every_instruction_set_matches_the_reference() {
        use super::{cpu, DepthwiseGeometry, FWD_NAME};
        use crate::kernels::simd::Isa;
        let mut rng = TestRng::new(5);
        let mut all = cases(&mut rng);
        for (k, stride, dilation) in [(3, 1, 1), (5, 2, 1), (7, 3, 1), (3, 2, 2), (5, 1, 2), (3, 3, 1)] {
            let (h, w) = (5 + rng.below(12), 17 + rng.below(37));
            let padding = Padding2d::same(h, w, k, k, stride, dilation);
            all.push(Case { n: 2, c: 3, h, w, k, stride, dilation, padding });
        }
        for case in all {
            let Case { stride, dilation, padding, .. } = case;
            for dtype in [DType::F32, DType::F64] {
                let (xs, weight) = case.inputs(&mut rng, dtype);
                let geom =
                    DepthwiseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), stride, dilation, padding).unwrap();
                let tol = if dtype == DType::F32 { 1e-4 } else { 1e-11 };
                for relu in [false, true] {
                    let reference = |ts: &[Tensor]| {
                        let x = if relu { ts[0].relu()? } else { ts[0].clone() };
                        depthwise_conv2d_reference(&x, &ts[1], opts(stride, dilation, padding))
                    };
                    let want = reference(&[xs.clone(), weight.clone()]).unwrap();
                    let probe = rng.tensor(want.dims(), dtype).unwrap();
                    let want_grads = analytic_grads(&reference, &[xs.clone(), weight.clone()], &probe).unwrap();
                    let flat = |t: &Tensor| t.flatten_all().unwrap();
                    for isa in Isa::available() {
                        let what = format!("{isa:?} relu={relu} {dtype:?} {case:?}");
                        let (out, dx, dk) = if dtype == DType::F32 {
                            let v = |t: &Tensor| flat(t).to_vec1::<f32>().unwrap();
                            let (x, k, g) = (v(&xs), v(&weight), v(&probe));
                            let tensor =
                                |d: Vec<f32>, like: &Tensor| Tensor::from_vec(d, like.dims(), &Device::Cpu).unwrap();
                            (
                                tensor(cpu::forward(isa, &geom, &x, &k, relu), &want),
                                tensor(cpu::grad_input(isa, &geom, &g, &k, relu.then_some(&x[..])), &xs),
                                tensor(cpu::grad_weight(isa, &geom, &x, &g, relu), &weight),
                            )
                        } else {
                            let v = |t: &Tensor| flat(t).to_vec1::<f64>().unwrap();
                            let (x, k, g) = (v(&xs), v(&weight), v(&probe));
                            let tensor =
                                |d: Vec<f64>, like: &Tensor| Tensor::from_vec(d, like.dims(), &Device::Cpu).unwrap();
                            (
                                tensor(cpu::forward(isa, &geom, &x, &k, relu), &want),
                                tensor(cpu::grad_input(isa, &geom, &g, &k, relu.then_some(&x[..])), &xs),
                                tensor(cpu::grad_weight(isa, &geom, &x, &g, relu), &weight),
                            )
                        };
                        assert_close(&out, &want, tol, &format!("forward {what}"));
                        assert_close(&dx, &want_grads[0], tol, &format!("input gradient {what}"));
                        assert_close(&dk, &want_grads[1], tol * 10.0, &format!("weight gradient {what}"));
                    }
                }
            }
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
            let f = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], opts(stride, dilation, padding));
            check_finite_differences(&f, &[xs, weight], 1e-6, 1e-6);
        }
    }

    #[test]
    fn non_contiguous_inputs_give_the_same_result() {
        let mut rng = TestRng::new(4);
        let padding = Padding2d::same(9, 8, 5, 5, 2, 1);
        let xs = rng.tensor(&[2, 3, 9, 8], DType::F32).unwrap();
        let weight = rng.tensor(&[3, 1, 5, 5], DType::F32).unwrap();
        let expected = depthwise_conv2d(&xs, &weight, opts(2, 1, padding)).unwrap();

        // The same values through a transposed layout and through a narrowed one.
        let transposed = xs.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        assert!(!transposed.is_contiguous());
        let wide = Tensor::cat(&[&xs, &xs], 3).unwrap();
        let narrowed = wide.narrow(3, 8, 8).unwrap();
        assert!(!narrowed.is_contiguous());
        let weight_t = weight.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        for (xs, weight) in [(&transposed, &weight), (&narrowed, &weight), (&xs, &weight_t)] {
            let out = depthwise_conv2d(xs, weight, opts(2, 1, padding)).unwrap();
            assert_eq!(max_abs_diff(&out, &expected).unwrap(), 0.0);
        }

        // A non-contiguous offset view of a bigger buffer also differentiates.
        let f = |ts: &[Tensor]| depthwise_conv2d(&ts[0].narrow(3, 8, 8)?, &ts[1], opts(2, 1, padding));
        let probe = rng.tensor(expected.dims(), DType::F32).unwrap();
        let grads = analytic_grads(&f, &[wide, weight.clone()], &probe).unwrap();
        let plain =
            analytic_grads(&|ts| depthwise_conv2d(&ts[0], &ts[1], opts(2, 1, padding)), &[xs, weight], &probe).unwrap();
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
            let fast = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], opts(stride, dilation, padding));
            let reference = |ts: &[Tensor]| depthwise_conv2d_reference(&ts[0], &ts[1], opts(stride, dilation, padding));
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
        let f = |ts: &[Tensor]| depthwise_conv2d(&ts[0], &ts[1], opts(1, 1, padding));
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
            let reference = depthwise_conv2d_reference(xs, weight, opts(stride, dilation, padding)).unwrap_err();
            assert!(reference.to_string().contains("depthwise-conv2d: "), "{reference}");
            depthwise_conv2d(xs, weight, opts(stride, dilation, padding)).unwrap_err().to_string()
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
        let msg = depthwise_conv2d(&xs16, &weight16, opts(1, 1, pad)).unwrap_err().to_string();
        assert!(msg.contains("depthwise-conv2d: unsupported dtype BF16"), "{msg}");
        let weight64 = weight.to_dtype(DType::F64).unwrap();
        let msg = depthwise_conv2d(&xs, &weight64, opts(1, 1, pad)).unwrap_err().to_string();
        assert!(msg.contains("depthwise-conv2d: weight is F64, xs is F32"), "{msg}");
    }
}
