//! Inference of stacked separable convolutions (`sep_conv_kxk`: ReLU → depthwise →
//! pointwise → BN, twice), one sample at a time.
//!
//! Unfused, each half is a depthwise conv over the whole batch (one task per plane) and a
//! 1×1 conv (one gemm per sample): every intermediate is written out for the batch and read
//! back from memory by the next op (NASNet-A Mobile's 28×28 stage: 4.4 MB per intermediate
//! at batch 32, beyond the 2 MiB L2). [`separable_stack`] runs every half of one sample in a
//! row on one thread, in parallel over samples, so each intermediate (one sample's planes)
//! stays in cache. The depthwise and gemm kernels are the same as unfused
//! (`window::forward`, `conv1x1`'s gemm and epilogue), with the batch norm folded into the
//! pointwise weights as `conv1x1_affine` does. It records no backward, so it runs only where
//! no gradient is needed (inside `nas_ops::no_grad`, or no input tracks one) on the CPU;
//! elsewhere [`separable_stack_reference`], the unfused ops, runs.

use candle_core::{bail, DType, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::conv1x1::{conv1x1_affine, gemm_rows, shift_rows};
use super::depthwise::{depthwise_conv2d, depthwise_conv2d_relu, DepthwiseGeometry};
use super::simd::{Float, Isa};
use super::{output_buffer, window, Padding2d};

const NAME: &str = "separable-stack";

/// One half of a separable conv: ReLU (with `relu_in`) → depthwise `k × k` (SAME, `stride`,
/// `dilation`) → pointwise → `· scale + shift` per channel (an eval batch norm) → ReLU (with
/// `relu_out`).
#[derive(Debug, Clone)]
pub struct SeparableHalf {
    /// `(c_in, 1, k, k)`.
    pub depthwise: Tensor,
    /// Stride of the depthwise conv.
    pub stride: usize,
    /// Dilation of the depthwise conv.
    pub dilation: usize,
    /// `(c_out, c_in, 1, 1)`.
    pub pointwise: Tensor,
    /// `(c_out)`: the batch norm's `γ / sqrt(var + ε)`.
    pub scale: Tensor,
    /// `(c_out)`: the batch norm's `β − mean · scale`.
    pub shift: Tensor,
    /// ReLU on the half's input.
    pub relu_in: bool,
    /// ReLU on the half's output.
    pub relu_out: bool,
}

/// The halves applied in order to `xs`.
///
/// # Shapes
/// - `xs`: `(batch, c_in, h, w)`; each half's `c_in` is the previous half's `c_out`
/// - returns: `(batch, c_out, h', w')`, with `h' = ceil(h / Π stride)` (SAME)
pub fn separable_stack(xs: &Tensor, halves: &[SeparableHalf]) -> Result<Tensor> {
    let tensors = halves.iter().flat_map(|h| [&h.depthwise, &h.pointwise, &h.scale, &h.shift]);
    let tracked = crate::grad_enabled() && std::iter::once(xs).chain(tensors).any(Tensor::track_op);
    if halves.is_empty() || !matches!(xs.device(), Device::Cpu) || tracked {
        return separable_stack_reference(xs, halves);
    }
    let (n, c, h, w) = xs.dims4()?;
    let plans = plan(xs.dtype(), (c, h, w), halves)?;
    let xs = xs.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { bail!("{NAME}: expected a tensor on the CPU") };
    let last = plans.last().expect("at least one half");
    let shape = (n, last.c_out, last.geom.ho, last.geom.wo);
    match xs.dtype() {
        DType::F32 => {
            Tensor::from_vec(run::<f32>(&storage.as_slice()?[layout.start_offset()..], n, &plans)?, shape, &Device::Cpu)
        }
        DType::F64 => {
            Tensor::from_vec(run::<f64>(&storage.as_slice()?[layout.start_offset()..], n, &plans)?, shape, &Device::Cpu)
        }
        dtype => bail!("{NAME}: unsupported dtype {dtype:?}, expected f32 or f64"),
    }
}

/// Reference for [`separable_stack`]: each half as the unfused ops (`depthwise_conv2d`,
/// `conv1x1_affine`), differentiable, any device.
pub fn separable_stack_reference(xs: &Tensor, halves: &[SeparableHalf]) -> Result<Tensor> {
    let mut xs = xs.clone();
    for half in halves {
        let (_, _, h, w) = xs.dims4()?;
        let k = half.depthwise.dims();
        let (kh, kw) = (k.get(2).copied().unwrap_or(1), k.get(3).copied().unwrap_or(1));
        let pad = Padding2d::same(h, w, kh, kw, half.stride, half.dilation);
        let depthwise = if half.relu_in { depthwise_conv2d_relu } else { depthwise_conv2d };
        let ys = depthwise(&xs, &half.depthwise, half.stride, half.dilation, pad)?;
        xs = conv1x1_affine(&ys, &half.pointwise, (&half.scale, &half.shift), false, half.relu_out)?;
    }
    Ok(xs)
}

/// One half, checked and laid out for the CPU kernels (weights in the input's dtype).
struct Plan {
    geom: DepthwiseGeometry,
    c_in: usize,
    c_out: usize,
    relu_in: bool,
    relu_out: bool,
    depthwise: Tensor,
    /// `(c_out, c_in)`: the pointwise weight with each row scaled by the batch norm.
    folded: Tensor,
    shift: Tensor,
}

fn plan(dtype: DType, (mut c, mut h, mut w): (usize, usize, usize), halves: &[SeparableHalf]) -> Result<Vec<Plan>> {
    halves
        .iter()
        .enumerate()
        .map(|(i, half)| {
            let k = half.depthwise.dims();
            let (kh, kw) = (k.get(2).copied().unwrap_or(0), k.get(3).copied().unwrap_or(0));
            let pad = Padding2d::same(h, w, kh.max(1), kw.max(1), half.stride.max(1), half.dilation.max(1));
            let geom = DepthwiseGeometry::new(NAME, &[1, c, h, w], k, half.stride, half.dilation, pad)
                .map_err(|e| candle_core::Error::Msg(format!("half {i}: {e}")))?;
            let &[c_out, c_in, 1, 1] = half.pointwise.dims() else {
                bail!(
                    "{NAME}: half {i}: expected a pointwise weight of shape (c_out, {c}, 1, 1), got {:?}",
                    half.pointwise.dims()
                )
            };
            if c_in != c {
                bail!(
                    "{NAME}: half {i}: expected a pointwise weight of shape (c_out, {c}, 1, 1), got {:?}",
                    half.pointwise.dims()
                )
            }
            for (what, t) in [("scale", &half.scale), ("shift", &half.shift)] {
                if t.dims() != [c_out] {
                    bail!("{NAME}: half {i}: expected a {what} of shape ({c_out}), got {:?}", t.dims())
                }
            }
            let weights = [
                ("depthwise", &half.depthwise),
                ("pointwise", &half.pointwise),
                ("scale", &half.scale),
                ("shift", &half.shift),
            ];
            for (what, t) in weights {
                if t.dtype() != dtype {
                    bail!("{NAME}: half {i}: the {what} weight is {:?}, the input {dtype:?}", t.dtype())
                }
            }
            let folded = half.pointwise.reshape((c_out, c_in))?.broadcast_mul(&half.scale.reshape((c_out, 1))?)?;
            let plan = Plan {
                c_in,
                c_out,
                relu_in: half.relu_in,
                relu_out: half.relu_out,
                depthwise: half.depthwise.contiguous()?,
                folded: folded.contiguous()?,
                shift: half.shift.contiguous()?,
                geom,
            };
            (c, h, w) = (c_out, plan.geom.ho, plan.geom.wo);
            Ok(plan)
        })
        .collect()
}

fn values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Every sample through every half, in parallel over samples.
fn run<T: Float>(xs: &[T], n: usize, plans: &[Plan]) -> Result<Vec<T>> {
    struct Weights<T> {
        depthwise: Vec<T>,
        folded: Vec<T>,
        shift: Vec<T>,
    }
    let weights = plans
        .iter()
        .map(|p| Ok(Weights { depthwise: values(&p.depthwise)?, folded: values(&p.folded)?, shift: values(&p.shift)? }))
        .collect::<Result<Vec<_>>>()?;
    let first = &plans[0].geom;
    let last = plans.last().expect("at least one half");
    let (per_in, per_out) = (first.c * first.h * first.w, last.c_out * last.geom.ho * last.geom.wo);
    if n * per_out == 0 || per_in == 0 {
        return Ok(vec![T::zero(); n * per_out]);
    }
    let isa = Isa::detect();
    // SAFETY: each sample's block is written in full by its last gemm (`accumulate` false).
    let mut out = unsafe { output_buffer::<T>(n * per_out) };
    out.par_chunks_mut(per_out).zip(xs[..n * per_in].par_chunks(per_in)).for_each(|(out, xs)| {
        let mut held: Vec<T> = Vec::new();
        for (i, (plan, wts)) in plans.iter().zip(&weights).enumerate() {
            let input: &[T] = if i == 0 { xs } else { &held };
            let ys = window::forward(isa, &plan.geom, input, &wts.depthwise, plan.relu_in);
            let hw = plan.geom.ho * plan.geom.wo;
            let mut next =
                if i + 1 == plans.len() { Vec::new() } else { unsafe { output_buffer::<T>(plan.c_out * hw) } };
            let dst: &mut [T] = if i + 1 == plans.len() { &mut *out } else { &mut next };
            gemm_rows(dst, &wts.folded, &ys, (plan.c_out, hw, plan.c_in));
            shift_rows(dst, hw, &wts.shift, plan.relu_out);
            held = next;
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    fn half(
        rng: &mut TestRng,
        (c_in, c_out, k, stride, dilation): (usize, usize, usize, usize, usize),
        relu: (bool, bool),
    ) -> SeparableHalf {
        SeparableHalf {
            depthwise: rng.tensor(&[c_in, 1, k, k], DType::F32).unwrap(),
            stride,
            dilation,
            pointwise: rng.tensor(&[c_out, c_in, 1, 1], DType::F32).unwrap(),
            scale: (rng.tensor(&[c_out], DType::F32).unwrap() + 1.5).unwrap(),
            shift: rng.tensor(&[c_out], DType::F32).unwrap(),
            relu_in: relu.0,
            relu_out: relu.1,
        }
    }

    #[test]
    fn matches_the_unfused_ops() {
        let mut rng = TestRng::new(51);
        // (n, c, h, w), then the halves: sep 3x3, 5x5 stride 2, 7x7 on odd sizes, a dilated
        // one, outputs under 5 columns wide (the channels-last path), one sample.
        type Case = ((usize, usize, usize, usize), Vec<(usize, usize, usize, usize, usize)>);
        let cases: [Case; 6] = [
            ((2, 3, 9, 9), vec![(3, 4, 3, 1, 1), (4, 4, 3, 1, 1)]),
            ((3, 5, 14, 13), vec![(5, 6, 5, 2, 1), (6, 6, 5, 1, 1)]),
            ((2, 4, 11, 17), vec![(4, 3, 7, 2, 1), (3, 3, 7, 1, 1)]),
            ((2, 3, 10, 10), vec![(3, 3, 3, 1, 2)]),
            ((4, 6, 7, 7), vec![(6, 8, 3, 2, 1), (8, 8, 3, 1, 1)]),
            ((1, 2, 20, 24), vec![(2, 5, 5, 1, 1), (5, 5, 5, 1, 1)]),
        ];
        for ((n, c, h, w), shapes) in cases {
            for relus in [[(true, true), (false, false)], [(false, true), (true, false)]] {
                let halves: Vec<_> = shapes.iter().zip(relus).map(|(&s, r)| half(&mut rng, s, r)).collect();
                let xs = rng.tensor(&[n, c, h, w], DType::F32).unwrap();
                let what = format!("{n}x{c}x{h}x{w} {shapes:?} {relus:?}");
                let want = separable_stack_reference(&xs, &halves).unwrap();
                let got = crate::no_grad(|| separable_stack(&xs, &halves)).unwrap();
                assert_eq!(got.dims(), want.dims(), "{what}");
                assert_close(&got, &want, 1e-5, &what);
                let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let halves64: Vec<_> = halves
                    .iter()
                    .map(|h| SeparableHalf {
                        depthwise: f64s(&h.depthwise),
                        pointwise: f64s(&h.pointwise),
                        scale: f64s(&h.scale),
                        shift: f64s(&h.shift),
                        ..h.clone()
                    })
                    .collect();
                let xs64 = f64s(&xs);
                let want64 = separable_stack_reference(&xs64, &halves64).unwrap();
                assert_close(&crate::no_grad(|| separable_stack(&xs64, &halves64)).unwrap(), &want64, 1e-12, &what);
            }
        }
    }

    #[test]
    fn tracked_inputs_take_the_differentiable_path() {
        let mut rng = TestRng::new(52);
        let halves = [half(&mut rng, (3, 4, 3, 1, 1), (true, false))];
        let xs = candle_core::Var::from_tensor(&rng.tensor(&[2, 3, 6, 6], DType::F32).unwrap()).unwrap();
        let ys = separable_stack(xs.as_tensor(), &halves).unwrap();
        let grads = ys.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(xs.as_tensor()).is_some(), "no gradient reached the input");
    }

    #[test]
    fn bad_weights_are_named() {
        let mut rng = TestRng::new(53);
        let xs = rng.tensor(&[2, 3, 6, 6], DType::F32).unwrap();
        let mut halves =
            vec![half(&mut rng, (3, 4, 3, 1, 1), (true, false)), half(&mut rng, (5, 4, 3, 1, 1), (false, false))];
        let err = crate::no_grad(|| separable_stack(&xs, &halves)).unwrap_err().to_string();
        assert!(err.contains("separable-stack") && err.contains("half 1"), "{err}");
        halves.truncate(1);
        halves[0].shift = rng.tensor(&[3], DType::F32).unwrap();
        let err = crate::no_grad(|| separable_stack(&xs, &halves)).unwrap_err().to_string();
        assert!(err.contains("half 0") && err.contains("shift"), "{err}");
        halves[0].shift = rng.tensor(&[4], DType::F64).unwrap();
        let err = crate::no_grad(|| separable_stack(&xs, &halves)).unwrap_err().to_string();
        assert!(err.contains("half 0: the shift weight is F64, the input F32"), "{err}");
    }
}
