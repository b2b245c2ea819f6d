//! Stride-2 subsampling with an offset, `x[:, :, offset::2, offset::2]` with zeros past the
//! edge: how the two paths of TF-Slim's `factorized_reduction` read their input (path 1 at
//! offset 0; path 2 pads one row and column of zeros after, drops the first ones and
//! subsamples, i.e. offset 1).
//!
//! The reference builds it from plain candle ops (pad, narrow, a 1×1 stride-2 pool): on the
//! CPU that was three full copies of the input plus the strided read, 6 % of a mobile
//! inference pass (profile). The custom op `subsample2` reads the input once, in parallel
//! over planes, and its gradient writes each input element once. Off the CPU the reference
//! runs (there is no CUDA twin yet: on the GPU these are cheap copies).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::pool::{pool2d, PoolOptions};
use super::Padding2d;
use super::{cpu_kernel, Output};

const NAME: &str = "subsample2";

/// `x[:, :, offset::2, offset::2]`, zero where `offset` pushes a row or column past the edge.
///
/// # Shapes
/// - `xs`: `(batch, c, h, w)`, f32 or f64; `offset` 0 or 1
/// - returns: `(batch, c, ceil(h / 2), ceil(w / 2))`
pub fn subsample2(xs: &Tensor, offset: usize) -> Result<Tensor> {
    Geom::new(xs.dims(), offset)?;
    if !xs.device().is_cpu() {
        return subsample2_reference(xs, offset);
    }
    xs.contiguous()?.apply_op1(Subsample2 { offset })
}

/// The gradient of [`subsample2`] of an input with planes `h × w` from the output's `grad`,
/// for ops that run the subsampling inside them (CPU).
pub(crate) fn subsample2_grad(grad: &Tensor, offset: usize, (h, w): (usize, usize)) -> Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&Subsample2Bwd { offset, h, w })
}

/// `subsample2_grad(grad_even, 0, (h, w)) + subsample2_grad(grad_odd, 1, (h, w))` in one pass
/// (the two paths of a factorized reduction; CPU, f32 or f64).
pub(crate) fn subsample2_pair_grad(grad_even: &Tensor, grad_odd: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (n, c, ..) = grad_even.dims4()?;
    let (even, odd) = (Geom::new(&[n, c, h, w], 0)?, Geom::new(&[n, c, h, w], 1)?);
    for (grad, g) in [(grad_even, even), (grad_odd, odd)] {
        if grad.shape() != &g.output_shape(&[n, c, h, w]) {
            bail!("{NAME}: expected a gradient of shape {:?}, got {:?}", g.output_shape(&[n, c, h, w]), grad.shape())
        }
    }
    let (ge, go) = (grad_even.contiguous()?, grad_odd.contiguous()?);
    let (se, le) = ge.storage_and_layout();
    let (so, lo) = go.storage_and_layout();
    let (Storage::Cpu(se), Storage::Cpu(so)) = (&*se, &*so) else { bail!("{NAME}: expected gradients on the CPU") };
    let storage = cpu_kernel!(NAME, [a = (se, le, "grad_even"), b = (so, lo, "grad_odd")], {
        scatter_cpu(&[(a, even), (b, odd)], even)
    });
    Ok(Tensor::from_storage(Storage::Cpu(storage), (n, c, h, w), candle_core::op::BackpropOp::none(), false))
}

/// Reference for [`subsample2`] from differentiable candle ops (any device): pad `offset`
/// zeros after, drop the first `offset` rows and columns, subsample by a 1×1 stride-2 pool.
///
/// # Shapes
/// As [`subsample2`].
pub fn subsample2_reference(xs: &Tensor, offset: usize) -> Result<Tensor> {
    let g = Geom::new(xs.dims(), offset)?;
    let xs = if offset == 0 {
        xs.clone()
    } else {
        xs.pad_with_zeros(2, 0, offset)?.pad_with_zeros(3, 0, offset)?.narrow(2, offset, g.h)?.narrow(3, offset, g.w)?
    };
    pool2d(&xs, PoolOptions::avg(1, 2, Padding2d::default()))
}

/// Shapes of one call: input planes `h × w`, output planes `ho × wo`.
#[derive(Debug, Clone, Copy)]
struct Geom {
    planes: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    offset: usize,
}

impl Geom {
    fn new(dims: &[usize], offset: usize) -> Result<Geom> {
        let &[n, c, h, w] = dims else { bail!("{NAME}: expected an (N, C, H, W) input, got shape {dims:?}") };
        if offset > 1 {
            bail!("{NAME}: offset must be 0 or 1, got {offset}")
        }
        Ok(Geom { planes: n * c, h, w, ho: h.div_ceil(2), wo: w.div_ceil(2), offset })
    }

    /// How many output columns read a real input column: those with `2j + offset < w`.
    fn real_cols(&self) -> usize {
        (self.w + 1).saturating_sub(self.offset) / 2
    }

    fn input_shape(&self, dims: &[usize]) -> Shape {
        Shape::from((dims[0], dims[1], self.h, self.w))
    }

    fn output_shape(&self, dims: &[usize]) -> Shape {
        Shape::from((dims[0], dims[1], self.ho, self.wo))
    }
}

/// The forward: every output element is written (a real input element or zero).
fn forward_cpu<T: WithDType>(xs: &[T], g: Geom) -> Vec<T> {
    let (plane_in, plane_out) = (g.h * g.w, g.ho * g.wo);
    if g.planes * plane_out == 0 {
        return Vec::new();
    }
    let real = g.real_cols();
    let mut out = Output::<T>::new(g.planes * plane_out);
    out.par_chunks_mut(plane_out).zip(xs.par_chunks(plane_in)).for_each(|(o, x)| {
        for (i, orow) in o.chunks_exact_mut(g.wo).enumerate() {
            let r = 2 * i + g.offset;
            if r >= g.h {
                orow.fill(T::zero());
                continue;
            }
            let xrow = &x[r * g.w + g.offset..(r + 1) * g.w];
            for (v, &x) in orow[..real].iter_mut().zip(xrow.iter().step_by(2)) {
                *v = x;
            }
            orow[real..].fill(T::zero());
        }
    });
    out.into_vec()
}

/// The input gradient: each sampled element takes its output's gradient, every other is zero.
fn backward_cpu<T: WithDType>(gy: &[T], g: Geom) -> Vec<T> {
    scatter_cpu(&[(gy, g)], g)
}

/// The input gradient of several subsamplings of one input (`(grad, geometry)` pairs, the same
/// planes, different offsets): every element is zero or the sum of the gradients of the
/// outputs that sampled it. Planes are zeroed on the threads (`Output::zeroed`).
fn scatter_cpu<T: WithDType>(grads: &[(&[T], Geom)], g: Geom) -> Vec<T> {
    let (plane_in, plane_out) = (g.h * g.w, g.ho * g.wo);
    if g.planes * plane_in == 0 {
        return Vec::new();
    }
    let mut gx = Output::<T>::zeroed(g.planes * plane_in);
    gx.par_chunks_mut(plane_in).enumerate().for_each(|(p, gx)| {
        if plane_out == 0 {
            return;
        }
        for &(gy, g) in grads {
            let real = g.real_cols();
            for (i, grow) in gy[p * plane_out..(p + 1) * plane_out].chunks_exact(g.wo).enumerate() {
                let r = 2 * i + g.offset;
                if r >= g.h {
                    break;
                }
                let xrow = &mut gx[r * g.w + g.offset..(r + 1) * g.w];
                for (x, &v) in xrow.iter_mut().step_by(2).zip(&grow[..real]) {
                    *x += v;
                }
            }
        }
    });
    gx.into_vec()
}

/// `subsample2`: the forward of [`subsample2`] on the CPU.
#[derive(Debug, Clone, Copy)]
struct Subsample2 {
    offset: usize,
}

impl CustomOp1 for Subsample2 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l.dims(), self.offset)?;
        let out = cpu_kernel!(NAME, [x = (s, l, "xs")], forward_cpu(x, g));
        Ok((out, g.output_shape(l.dims())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        Ok(Some(subsample2_grad(grad_res, self.offset, (h, w))?))
    }
}

/// `subsample2-bwd`: `grad_out -> grad_in` of [`subsample2`] on the CPU.
#[derive(Debug, Clone, Copy)]
struct Subsample2Bwd {
    offset: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for Subsample2Bwd {
    fn name(&self) -> &'static str {
        "subsample2-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let &[n, c, ..] = dims else { bail!("{}: expected an (N, C, Ho, Wo) gradient, got {dims:?}", self.name()) };
        let g = Geom::new(&[n, c, self.h, self.w], self.offset)?;
        if l.shape() != &g.output_shape(dims) {
            bail!("{}: expected a gradient of shape {:?}, got {dims:?}", self.name(), g.output_shape(dims))
        }
        let out = cpu_kernel!(NAME, [gy = (s, l, "grad")], backward_cpu(gy, g));
        Ok((out, g.input_shape(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use candle_core::{DType, Device};

    const SIZES: [(usize, usize); 9] = [(1, 1), (1, 2), (2, 1), (3, 3), (4, 5), (5, 4), (7, 7), (8, 8), (11, 6)];

    /// The two paths' gradients scattered in one pass equal the two scatters summed.
    #[test]
    fn pair_gradient_is_the_sum_of_both_offsets() {
        let mut rng = TestRng::new(61);
        for dtype in [DType::F32, DType::F64] {
            for (h, w) in SIZES {
                let shape = |offset| Geom::new(&[2, 3, h, w], offset).unwrap().output_shape(&[2, 3, h, w]);
                let even = rng.tensor(shape(0).dims(), dtype).unwrap();
                let odd = rng.tensor(shape(1).dims(), dtype).unwrap();
                let got = subsample2_pair_grad(&even, &odd, (h, w)).unwrap();
                let want =
                    (subsample2_grad(&even, 0, (h, w)).unwrap() + subsample2_grad(&odd, 1, (h, w)).unwrap()).unwrap();
                assert_close(&got, &want, 0.0, &format!("{dtype:?} {h}x{w}"));
            }
        }
        let even = rng.tensor(&[2, 3, 2, 2], DType::F32).unwrap();
        let err = subsample2_pair_grad(&even, &even, (5, 5)).unwrap_err().to_string();
        assert!(err.contains("subsample2: expected a gradient of shape"), "{err}");
    }

    #[test]
    fn forward_and_gradient_match_the_reference() {
        let mut rng = TestRng::new(31);
        for dtype in [DType::F32, DType::F64] {
            for (h, w) in SIZES {
                for offset in [0, 1] {
                    let what = format!("{dtype:?} {h}x{w} offset {offset}");
                    let xs = rng.tensor(&[2, 3, h, w], dtype).unwrap();
                    let got = subsample2(&xs, offset).unwrap();
                    let want = subsample2_reference(&xs, offset).unwrap();
                    assert_eq!(got.dims(), &[2, 3, h.div_ceil(2), w.div_ceil(2)], "{what}");
                    assert_close(&got, &want, 0.0, &what);
                    let probe = rng.tensor(got.dims(), dtype).unwrap();
                    let fast = analytic_grads(&|t| subsample2(&t[0], offset), std::slice::from_ref(&xs), &probe);
                    let reference =
                        analytic_grads(&|t| subsample2_reference(&t[0], offset), std::slice::from_ref(&xs), &probe);
                    assert_close(&fast.unwrap()[0], &reference.unwrap()[0], 0.0, &format!("{what} gradient"));
                }
            }
        }
    }

    #[test]
    fn reads_the_right_elements_by_hand() {
        let xs = Tensor::arange(0f32, 20., &Device::Cpu).unwrap().reshape((1, 1, 4, 5)).unwrap();
        let at = |offset| subsample2(&xs, offset).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(at(0), [0., 2., 4., 10., 12., 14.]);
        assert_eq!(at(1), [6., 8., 0., 16., 18., 0.]);
    }

    #[test]
    fn strided_inputs_are_read_as_their_values() {
        let mut rng = TestRng::new(32);
        let xs = rng.tensor(&[2, 3, 6, 5], DType::F32).unwrap().transpose(2, 3).unwrap();
        for offset in [0, 1] {
            let want = subsample2_reference(&xs.contiguous().unwrap(), offset).unwrap();
            assert_close(&subsample2(&xs, offset).unwrap(), &want, 0.0, "transposed input");
        }
    }

    #[test]
    fn errors_name_the_op_and_the_value() {
        let xs = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let err = subsample2(&xs, 0).unwrap_err().to_string();
        assert!(err.contains("subsample2") && err.contains("[2, 3, 4]"), "{err}");
        let xs = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = subsample2(&xs, 2).unwrap_err().to_string();
        assert!(err.contains("offset must be 0 or 1, got 2"), "{err}");
        let err = subsample2(&xs.to_dtype(DType::U8).unwrap(), 0).unwrap_err().to_string();
        assert!(err.contains("subsample2") && err.contains("U8"), "{err}");
    }
}
