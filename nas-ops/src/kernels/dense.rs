//! Dense 2-D convolution without bias, with explicit per-side zero padding; a direct CPU
//! kernel when the input has few channels (the stem's 3×3 conv on an RGB image).
//!
//! Candle's `conv2d` copies the input into columns (im2col) and multiplies them by a
//! matrix whose inner dimension is only `c_in·kh·kw` (27 for the stem), and its backward
//! always computes the input's gradient, even for an image that needs none: a transposed
//! convolution as large as the forward. Together that was about 7 % of a NASNet-A mobile
//! training step and 8 % of its inference. [`dense_conv2d`] runs the `window` kernels
//! instead (each padded input plane copied once per sample, all `c_in·kh·kw` taps of an
//! output row accumulated in registers) when the input has at most [`DIRECT_MAX_C_IN`]
//! channels, lives on the CPU and carries no gradient; its backward computes the weight's
//! gradient only. Any other input takes [`dense_conv2d_reference`], candle's own ops.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::kernels::depthwise::DepthwiseGeometry;
use crate::kernels::simd::Isa;
use crate::kernels::window as cpu;
use crate::kernels::{cpu_kernel, ConvOptions, Padding2d};

const FWD_NAME: &str = "dense-conv2d";
const GRAD_WEIGHT_NAME: &str = "dense-conv2d-grad-weight";

/// The most input channels the direct kernel takes. Its cost per output is `c_in·kh·kw`
/// multiply-adds streamed from one padded copy of the input, which beats im2col and a gemm
/// with a short inner dimension; with many channels the gemm wins.
pub const DIRECT_MAX_C_IN: usize = 4;

/// The convolution of `xs` with `weight`, through the direct CPU kernel when `xs` has at
/// most [`DIRECT_MAX_C_IN`] channels, is on the CPU and needs no gradient (an image); else
/// [`dense_conv2d_reference`] (also for `opts.relu_input`, whose ReLU it stores). Both give
/// the same values and the same weight gradient.
///
/// # Shapes
/// - `xs`: `(n, c_in, h, w)`
/// - `weight`: `(c_out, c_in, kh, kw)`
/// - returns: `(n, c_out, ho, wo)` with
///   `ho = Padding2d::out_size(h, padding.top, padding.bottom, kh, stride, dilation)` and
///   `wo` likewise
pub fn dense_conv2d(xs: &Tensor, weight: &Tensor, opts: ConvOptions) -> Result<Tensor> {
    let ConvOptions { stride, dilation, padding, relu_input } = opts;
    let geom = DenseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), stride, dilation, padding)?;
    if !xs.device().is_cpu() || xs.track_op() || geom.plane.c > DIRECT_MAX_C_IN || relu_input {
        return dense_conv2d_reference(xs, weight, opts);
    }
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    xs.apply_op2(&weight, DenseConv2d { stride, dilation, padding })
}

/// [`dense_conv2d`] from candle's ops (a ReLU with `opts.relu_input`, explicit zero padding,
/// then `conv2d`): any device, any number of channels, differentiable with respect to both
/// inputs.
///
/// # Shapes
/// As [`dense_conv2d`].
pub fn dense_conv2d_reference(xs: &Tensor, weight: &Tensor, opts: ConvOptions) -> Result<Tensor> {
    let ConvOptions { stride, dilation, padding, relu_input } = opts;
    let xs = &if relu_input { xs.relu()? } else { xs.clone() };
    let geom = DenseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), stride, dilation, padding)?.plane;
    let Padding2d { top, bottom, left, right } = padding;
    if stride == 1 && top == bottom && top == left && left == right {
        return xs.conv2d(weight, top, 1, dilation, 1);
    }
    let xs = xs.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
    if stride == 1 {
        return xs.conv2d(weight, 0, 1, dilation, 1);
    }
    // Candle 0.11's conv2d backward takes the transposed convolution's output padding from
    // the height alone and applies it to the width too, so a strided conv whose last rows
    // and last columns are unread by different amounts (a 1×7 kernel at stride 2) gets a
    // gradient of the wrong width. Cropping to the rows and columns some window reads makes
    // that padding 0 on both axes; the cropped ones get no gradient, as they would anyway.
    let used_h = (geom.ho - 1) * stride + (geom.kh - 1) * dilation + 1;
    let used_w = (geom.wo - 1) * stride + (geom.kw - 1) * dilation + 1;
    let xs = xs.narrow(2, 0, used_h)?.narrow(3, 0, used_w)?;
    xs.conv2d(weight, 0, stride, dilation, 1)
}

/// Every size of one dense convolution, checked once: the spatial geometry as the window
/// kernels take it (`plane.c` is `c_in`) and the output channels.
#[derive(Debug, Clone, Copy)]
struct DenseGeometry {
    plane: DepthwiseGeometry,
    c_out: usize,
}

impl DenseGeometry {
    fn new(
        name: &str,
        xs_dims: &[usize],
        weight_dims: &[usize],
        stride: usize,
        dilation: usize,
        padding: Padding2d,
    ) -> Result<Self> {
        let &[_, c_in, _, _] = xs_dims else {
            bail!("{name}: expected an input of shape (n, c, h, w), got {xs_dims:?}")
        };
        let &[c_out, c_k, kh, kw] = weight_dims else {
            bail!(
                "{name}: expected a weight of shape (c_out, {c_in}, kh, kw) for input {xs_dims:?}, got {weight_dims:?}"
            )
        };
        if c_k != c_in || kh == 0 || kw == 0 {
            bail!(
                "{name}: expected a weight of shape (c_out, {c_in}, kh, kw) for input {xs_dims:?}, got {weight_dims:?}"
            )
        }
        let plane = DepthwiseGeometry::window(name, xs_dims, weight_dims, (kh, kw), stride, dilation, padding)?;
        Ok(DenseGeometry { plane, c_out })
    }

    fn output_dims(&self) -> (usize, usize, usize, usize) {
        let p = &self.plane;
        (p.n, self.c_out, p.ho, p.wo)
    }

    fn weight_dims(&self) -> (usize, usize, usize, usize) {
        let p = &self.plane;
        (self.c_out, p.c, p.kh, p.kw)
    }
}

/// The forward op on `(xs, weight)`.
#[derive(Debug, Clone, Copy)]
struct DenseConv2d {
    stride: usize,
    dilation: usize,
    padding: Padding2d,
}

impl CustomOp2 for DenseConv2d {
    fn name(&self) -> &'static str {
        FWD_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geom = DenseGeometry::new(FWD_NAME, l1.dims(), l2.dims(), self.stride, self.dilation, self.padding)?;
        let (p, c_out) = (&geom.plane, geom.c_out);
        let out = cpu_kernel!(
            FWD_NAME,
            [x = (s1, l1, "xs"), w = (s2, l2, "weight")],
            cpu::dense_forward(Isa::detect(), p, c_out, x, w)
        );
        Ok((out, geom.output_dims().into()))
    }

    /// The weight's gradient only: [`dense_conv2d`] runs this op on inputs that carry none.
    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let geom = DenseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), self.stride, self.dilation, self.padding)?;
        let grad_weight = xs.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &DenseConv2dGradWeight { geom })?;
        Ok((None, Some(grad_weight)))
    }
}

/// The weight gradient, on `(xs, grad_out)`.
#[derive(Debug, Clone, Copy)]
struct DenseConv2dGradWeight {
    geom: DenseGeometry,
}

impl CustomOp2 for DenseConv2dGradWeight {
    fn name(&self) -> &'static str {
        GRAD_WEIGHT_NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let geom = self.geom;
        let p = &geom.plane;
        if l1.dims() != [p.n, p.c, p.h, p.w] || l2.dims() != <[usize; 4]>::from(geom.output_dims()) {
            bail!(
                "{GRAD_WEIGHT_NAME}: expected an input of shape {:?} and an output gradient of shape {:?}, got {:?} \
                 and {:?}",
                [p.n, p.c, p.h, p.w],
                geom.output_dims(),
                l1.dims(),
                l2.dims()
            )
        }
        let c_out = geom.c_out;
        let out = cpu_kernel!(
            GRAD_WEIGHT_NAME,
            [x = (s1, l1, "xs"), g = (s2, l2, "grad")],
            cpu::dense_grad_weight(Isa::detect(), p, c_out, x, g)
        );
        Ok((out, geom.weight_dims().into()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::kernels::simd::Float;
    use crate::kernels::testutil::{analytic_grads, assert_close, check_finite_differences, TestRng};

    #[derive(Debug, Clone, Copy)]
    struct Case {
        n: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        dilation: usize,
        padding: Padding2d,
    }

    impl Case {
        fn inputs(&self, rng: &mut TestRng, dtype: DType) -> (Tensor, Tensor) {
            let xs = rng.tensor(&[self.n, self.c_in, self.h, self.w], dtype).unwrap();
            let weight = rng.tensor(&[self.c_out, self.c_in, self.kh, self.kw], dtype).unwrap();
            (xs, weight)
        }

        fn direct(&self, xs: &Tensor, weight: &Tensor) -> Tensor {
            dense_conv2d(xs, weight, self.opts()).unwrap()
        }

        fn reference(&self, xs: &Tensor, weight: &Tensor) -> Tensor {
            dense_conv2d_reference(xs, weight, self.opts()).unwrap()
        }

        fn opts(&self) -> ConvOptions {
            ConvOptions { stride: self.stride, dilation: self.dilation, padding: self.padding, relu_input: false }
        }
    }

    /// Random cases: 1 to 4 input channels, square and 1×k / k×1 kernels, strides 1 to 3,
    /// dilation 1 and 2, rows wider than a register block, SAME, VALID and asymmetric
    /// padding; the stem's own shape (3×3, stride 2, VALID, 3 → 32 channels) last.
    fn cases(rng: &mut TestRng) -> Vec<Case> {
        let mut cases = Vec::new();
        for (kh, kw) in [(3, 3), (1, 1), (5, 5), (1, 3), (7, 1), (2, 4)] {
            for stride in [1, 2, 3] {
                for dilation in [1, 2] {
                    let (span_h, span_w) = ((kh - 1) * dilation + 1, (kw - 1) * dilation + 1);
                    let (n, c_in, c_out) = (1 + rng.below(3), 1 + rng.below(DIRECT_MAX_C_IN), 1 + rng.below(9));
                    let (h, w) = (span_h + rng.below(9), span_w + rng.below(40));
                    let same = Padding2d::same(h, w, kh, kw, stride, dilation);
                    let valid = Padding2d::default();
                    let odd = Padding2d { top: rng.below(3), bottom: rng.below(kh), left: rng.below(kw), right: 1 };
                    for padding in [same, valid, odd] {
                        cases.push(Case { n, c_in, c_out, h, w, kh, kw, stride, dilation, padding });
                    }
                }
            }
        }
        let stem = Case {
            n: 2,
            c_in: 3,
            c_out: 32,
            h: 37,
            w: 41,
            kh: 3,
            kw: 3,
            stride: 2,
            dilation: 1,
            padding: Padding2d::default(),
        };
        cases.push(stem);
        cases
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = TestRng::new(1);
        for case in cases(&mut rng) {
            for dtype in [DType::F32, DType::F64] {
                let (xs, weight) = case.inputs(&mut rng, dtype);
                let out = case.direct(&xs, &weight);
                let expected = case.reference(&xs, &weight);
                assert_eq!(out.dims(), expected.dims(), "{case:?}");
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert_close(&out, &expected, tol, &format!("forward {dtype:?} {case:?}"));
            }
        }
    }

    /// With an image input (no gradient) the direct op gives the weight the reference's
    /// gradient and the image none.
    #[test]
    fn weight_gradient_matches_reference() {
        let mut rng = TestRng::new(2);
        for case in cases(&mut rng) {
            let (xs, weight) = case.inputs(&mut rng, DType::F32);
            let weight = Var::from_tensor(&weight).unwrap();
            let probe = rng.tensor(case.direct(&xs, &weight).dims(), DType::F32).unwrap();
            let grads = (case.direct(&xs, &weight) * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(grads.get(&xs).is_none(), "an image gets no gradient: {case:?}");
            let expected =
                analytic_grads(&|ts| Ok(case.reference(&xs, &ts[0])), &[weight.as_tensor().clone()], &probe).unwrap();
            assert_close(grads.get(&weight).unwrap(), &expected[0], 1e-5, &format!("weight gradient {case:?}"));
        }
    }

    /// An input that carries a gradient takes the reference path, so both gradients exist.
    #[test]
    fn an_input_with_a_gradient_gets_one() {
        let mut rng = TestRng::new(3);
        let case = cases(&mut rng)[7];
        let (xs, weight) = case.inputs(&mut rng, DType::F32);
        let probe = rng.tensor(case.reference(&xs, &weight).dims(), DType::F32).unwrap();
        let inputs = [xs, weight];
        let grads = analytic_grads(&|ts| Ok(case.direct(&ts[0], &ts[1])), &inputs, &probe).unwrap();
        let expected = analytic_grads(&|ts| Ok(case.reference(&ts[0], &ts[1])), &inputs, &probe).unwrap();
        assert_close(&grads[0], &expected[0], 1e-5, "input gradient");
        assert_close(&grads[1], &expected[1], 1e-5, "weight gradient");
    }

    /// The kernels on every instruction set of this CPU, f32 and f64, against the reference;
    /// batches larger than the weight gradient's 16 runs of samples.
    #[test]
    fn every_instruction_set_matches_the_reference() {
        let mut rng = TestRng::new(4);
        let mut all = cases(&mut rng);
        all.push(Case { n: 19, ..all[all.len() - 1] });
        all.push(Case { n: 33, c_out: 2, ..all[4] });
        for case in all {
            for dtype in [DType::F32, DType::F64] {
                let (xs, weight) = case.inputs(&mut rng, dtype);
                let geom =
                    DenseGeometry::new(FWD_NAME, xs.dims(), weight.dims(), case.stride, case.dilation, case.padding)
                        .unwrap();
                let want = case.reference(&xs, &weight);
                let probe = rng.tensor(want.dims(), dtype).unwrap();
                let want_grad =
                    analytic_grads(&|ts| Ok(case.reference(&xs, &ts[0])), std::slice::from_ref(&weight), &probe)
                        .unwrap()
                        .remove(0);
                for isa in Isa::available() {
                    let what = format!("{isa:?} {dtype:?} {case:?}");
                    let (out, dk) = run_kernels(isa, &geom, &xs, &weight, &probe);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    assert_close(&out, &want, tol, &format!("forward {what}"));
                    assert_close(&dk, &want_grad, tol * 10.0, &format!("weight gradient {what}"));
                }
            }
        }
    }

    /// The forward and weight-gradient kernels of one instruction set, as tensors.
    fn run_kernels(isa: Isa, geom: &DenseGeometry, xs: &Tensor, weight: &Tensor, probe: &Tensor) -> (Tensor, Tensor) {
        fn go<T: Float>(
            isa: Isa,
            geom: &DenseGeometry,
            xs: &Tensor,
            weight: &Tensor,
            probe: &Tensor,
        ) -> (Tensor, Tensor) {
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<T>().unwrap();
            let (x, k, g) = (v(xs), v(weight), v(probe));
            let out = cpu::dense_forward(isa, &geom.plane, geom.c_out, &x, &k);
            let dk = cpu::dense_grad_weight(isa, &geom.plane, geom.c_out, &x, &g);
            let tensor = |d: Vec<T>, like: &Tensor| Tensor::from_vec(d, like.dims(), &Device::Cpu).unwrap();
            (tensor(out, probe), tensor(dk, weight))
        }
        match xs.dtype() {
            DType::F32 => go::<f32>(isa, geom, xs, weight, probe),
            _ => go::<f64>(isa, geom, xs, weight, probe),
        }
    }

    #[test]
    fn weight_gradient_matches_finite_differences() {
        let mut rng = TestRng::new(5);
        let padding = Padding2d { top: 0, bottom: 2, left: 1, right: 0 };
        let case = Case { n: 2, c_in: 3, c_out: 2, h: 7, w: 6, kh: 3, kw: 3, stride: 2, dilation: 1, padding };
        let (xs, weight) = case.inputs(&mut rng, DType::F64);
        check_finite_differences(&|ts| Ok(case.direct(&xs, &ts[0])), &[weight], 1e-6, 1e-6);
    }

    #[test]
    fn bad_shapes_are_errors_that_quote_them() {
        let mut rng = TestRng::new(6);
        let xs = rng.tensor(&[2, 3, 8, 8], DType::F32).unwrap();
        let wrong_c = rng.tensor(&[4, 2, 3, 3], DType::F32).unwrap();
        let err = dense_conv2d(&xs, &wrong_c, ConvOptions::default()).unwrap_err().to_string();
        assert!(err.contains("[4, 2, 3, 3]") && err.contains("[2, 3, 8, 8]"), "{err}");
        let big = rng.tensor(&[4, 3, 9, 9], DType::F32).unwrap();
        let err = dense_conv2d(&xs, &big, ConvOptions::default()).unwrap_err().to_string();
        assert!(err.contains("8x8") && err.contains("9x9"), "{err}");
        let three = rng.tensor(&[2, 3, 8], DType::F32).unwrap();
        let err = dense_conv2d(&three, &wrong_c, ConvOptions::default()).unwrap_err().to_string();
        assert!(err.contains("(n, c, h, w)") && err.contains("[2, 3, 8]"), "{err}");
        let weight = rng.tensor(&[4, 3, 3, 3], DType::F32).unwrap();
        let err =
            dense_conv2d(&xs, &weight, ConvOptions { stride: 0, ..ConvOptions::default() }).unwrap_err().to_string();
        assert!(err.contains("stride (0)"), "{err}");
    }

    #[test]
    fn mixed_dtypes_are_named_errors() {
        let mut rng = TestRng::new(7);
        let xs = rng.tensor(&[1, 3, 8, 8], DType::F32).unwrap();
        let weight = rng.tensor(&[4, 3, 3, 3], DType::F64).unwrap();
        let err = dense_conv2d(&xs, &weight, ConvOptions::default()).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("F64"), "{err}");
    }
}
