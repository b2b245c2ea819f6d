//! Inference of stacked separable convolutions (`sep_conv_kxk`: ReLU → depthwise →
//! pointwise → BN, twice), one sample at a time.
//!
//! Unfused, each half is a depthwise conv over the whole batch (one task per plane) and a
//! 1×1 conv (one gemm per sample): every intermediate is written out for the batch and read
//! back from memory by the next op (NASNet-A Mobile's 28×28 stage: 4.4 MB per intermediate
//! at batch 32, beyond the 2 MiB L2). [`separable_stack`] runs every half of one sample in a
//! row on one thread, in parallel over samples, so each intermediate (one sample's planes)
//! stays in cache: it is a per-sample program of one step (`kernels::cell_eval`, which runs
//! whole cells the same way), with the batch norm folded into the pointwise weights as
//! `conv1x1` with an `Affine` does. It records no backward, so it runs only where no gradient is
//! needed (inside `nas_ops::no_grad`, or no input tracks one) on the CPU, with at least one
//! sample per thread; elsewhere [`separable_stack_reference`], the unfused ops, runs.

use candle_core::{Device, Result, Tensor};

use super::batch_norm::BatchNormParams;
use super::cell_eval::{Program, Put, Step};
use super::conv1x1::{conv1x1, Affine, Conv1x1Options};
use super::depthwise::depthwise_conv2d;
use super::ConvOptions;

const NAME: &str = "separable-stack";

/// One half of a separable conv: ReLU (with `relu_input`) → depthwise `k × k` (SAME,
/// `stride`, `dilation`) → pointwise → batch norm → ReLU (with `relu_output`). The one
/// description of a half for every path: inference folds the batch norm's moving
/// statistics into the pointwise weights ([`separable_stack`], the per-sample programs),
/// training normalises with the batch's statistics (`separable_train`).
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
    /// The batch norm after the pointwise conv, `(c_out)` each.
    pub bn: BatchNormParams,
    /// ReLU on the half's input.
    pub relu_input: bool,
    /// ReLU on the half's output.
    pub relu_output: bool,
}

impl SeparableHalf {
    /// The depthwise conv's options for an input `xs`: SAME padding, the input's ReLU.
    pub(crate) fn depthwise_options(&self, xs: &Tensor) -> Result<ConvOptions> {
        let (_, _, h, w) = xs.dims4()?;
        let (_, _, kh, kw) = self.depthwise.dims4()?;
        Ok(ConvOptions::same((h, w), (kh, kw), self.stride, self.dilation).relu_input(self.relu_input))
    }

    /// The output channels.
    pub(crate) fn c_out(&self) -> usize {
        self.pointwise.dims().first().copied().unwrap_or(0)
    }
}

/// The halves applied in order to `xs`, in inference (the moving statistics).
///
/// # Shapes
/// - `xs`: `(batch, c_in, h, w)`; each half's `c_in` is the previous half's `c_out`
/// - returns: `(batch, c_out, h', w')`, with `h' = ceil(h / Π stride)` (SAME)
pub fn separable_stack(xs: &Tensor, halves: &[SeparableHalf]) -> Result<Tensor> {
    let tensors = halves
        .iter()
        .flat_map(|h| [&h.depthwise, &h.pointwise, &h.bn.gamma, &h.bn.beta, &h.bn.running_mean, &h.bn.running_var]);
    let tracked = crate::grad_enabled() && std::iter::once(xs).chain(tensors).any(Tensor::track_op);
    let (n, c, mut h, mut w) = xs.dims4()?;
    if halves.is_empty() || !matches!(xs.device(), Device::Cpu) || tracked || n < rayon::current_num_threads() {
        return separable_stack_reference(xs, halves);
    }
    for half in halves {
        let stride = half.stride.max(1);
        (h, w) = (h.div_ceil(stride), w.div_ceil(stride));
    }
    let c_out = halves[halves.len() - 1].c_out();
    let mut program = Program::new((c, xs.dim(2)?, xs.dim(3)?), None, (c_out, h, w));
    let (src, dst) = (program.x(), program.out());
    program.push(Step::Separable { src, halves: halves.to_vec(), dst, put: Put::Write });
    program.run(xs, None).map_err(|e| candle_core::Error::Msg(format!("{NAME}: {e}")))
}

/// Reference for [`separable_stack`]: each half as the unfused ops (`depthwise_conv2d`,
/// `conv1x1` with the batch norm's eval affine), differentiable, any device.
pub fn separable_stack_reference(xs: &Tensor, halves: &[SeparableHalf]) -> Result<Tensor> {
    let mut xs = xs.clone();
    for half in halves {
        let ys = depthwise_conv2d(&xs, &half.depthwise, half.depthwise_options(&xs)?)?;
        let (scale, shift) = half.bn.eval_affine()?;
        let affine = Affine { scale: &scale, shift: &shift, relu_output: half.relu_output };
        xs = conv1x1(&ys, &half.pointwise, Conv1x1Options { relu_input: false, affine: Some(affine) })?;
    }
    Ok(xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use candle_core::DType;

    fn half(rng: &mut TestRng, shape: (usize, usize, usize, usize, usize), relu: (bool, bool)) -> SeparableHalf {
        separable_half(rng, shape, relu, DType::F32)
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
                        bn: BatchNormParams {
                            gamma: f64s(&h.bn.gamma),
                            beta: f64s(&h.bn.beta),
                            running_mean: f64s(&h.bn.running_mean),
                            running_var: f64s(&h.bn.running_var),
                            eps: h.bn.eps,
                        },
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
        halves[0].bn.beta = rng.tensor(&[3], DType::F32).unwrap();
        let err = crate::no_grad(|| separable_stack(&xs, &halves)).unwrap_err().to_string();
        assert!(err.contains("half 0") && err.contains("beta of shape (4)"), "{err}");
        halves[0].bn.beta = rng.tensor(&[4], DType::F64).unwrap();
        let err = crate::no_grad(|| separable_stack(&xs, &halves)).unwrap_err().to_string();
        assert!(err.contains("half 0: the batch-norm beta is F64, the input F32"), "{err}");
    }
}
