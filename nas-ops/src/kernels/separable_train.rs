//! Training of stacked separable convolutions (`sep_conv_kxk`: ReLU → depthwise → pointwise
//! → BN, twice) as one op on a cell's tape (`crate::tape`).
//!
//! Unfused, each half is three ops (depthwise conv, 1×1 conv, batch norm), and for every
//! op's output candle's backward first allocates a zeroed gradient buffer and adds the
//! incoming gradient into it (`GradStore::or_insert`, then `add`): two passes of the
//! activation's size per op before the op's own backward runs, six per separable conv.
//! `separable_train_traced` runs the same forward kernels on detached tensors, keeps the
//! intermediates candle would have kept, and records one op whose backward runs the same
//! gradient kernels in reverse. [`separable_train_reference`] is its twin from the unfused
//! ops (differentiable, any device), which a cell runs where it has no tape.

use candle_core::{Result, Tensor};

use super::batch_norm::{
    batch_norm_train, batch_norm_train_step, BatchNormOptions, BatchNormParams, BatchNormTrainStep,
};
use super::conv1x1::{conv1x1, conv1x1_grads, Conv1x1Options};
use super::depthwise::{depthwise_conv2d, depthwise_conv2d_grads};
use super::separable::SeparableHalf;
use crate::tape::{Grads, Tape, Traced};

const NAME: &str = "separable-train";

/// A batch norm's statistics of one batch.
#[derive(Debug, Clone)]
pub struct BatchStats {
    /// The mean per channel, `(c_out)`.
    pub mean: Tensor,
    /// The biased variance per channel, `(c_out)`.
    pub var: Tensor,
    /// The elements each statistic is over (`batch · h · w`).
    pub count: usize,
}

/// What [`separable_train_reference`] returns: the output and each half's batch statistics
/// (for the moving averages).
#[derive(Debug, Clone)]
pub struct SeparableTrain {
    /// `(batch, c_out, h', w')`.
    pub ys: Tensor,
    /// One per half, in order.
    pub stats: Vec<BatchStats>,
}

impl SeparableHalf {
    /// The depthwise then the pointwise conv, unfused (tracked when their inputs are).
    fn convs(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let mid = depthwise_conv2d(xs, &self.depthwise, self.depthwise_options(xs)?)?;
        let out = conv1x1(&mid, &self.pointwise, Conv1x1Options::default())?;
        Ok((mid, out))
    }

    /// The four weights training reads, in the order they are packed.
    fn train_weights(&self) -> [&Tensor; 4] {
        [&self.depthwise, &self.pointwise, &self.bn.gamma, &self.bn.beta]
    }

    fn bn_options(&self) -> BatchNormOptions {
        BatchNormOptions::new(self.bn.eps).relu_output(self.relu_output)
    }
}

/// The halves applied in order to `xs` in training mode, recorded on `tape` as one op (CPU,
/// f32 or f64, `halves` not empty): the weights registered in the order `depthwise,
/// pointwise, γ, β` per half.
///
/// # Shapes
/// - `xs`: `(batch, c_in, h, w)`; each half's `c_in` is the previous half's `c_out`
/// - returns: `ys` `(batch, c_out, h', w')` with `h' = ceil(h / Π stride)` (SAME), and each
///   half's statistics `(c_out)`
pub(crate) fn separable_train_traced(
    tape: &mut Tape,
    xs: &Traced,
    halves: &[SeparableHalf],
) -> Result<(Traced, Vec<BatchStats>)> {
    let weights =
        halves.iter().flat_map(SeparableHalf::train_weights).map(|w| tape.weight(w)).collect::<Result<Vec<_>>>()?;
    let (saved, ys) = forward_saved(&xs.tensor, halves)?;
    let stats = saved.iter().map(Saved::stats).collect::<Result<Vec<_>>>()?;
    let traced = tape.record(&[xs], &weights.iter().collect::<Vec<_>>(), ys, move |grad| {
        let (grad_xs, weights) = backward_saved(&saved, grad)?;
        Ok(Grads { inputs: vec![Some(grad_xs)], weights })
    });
    Ok((traced, stats))
}

/// The halves' forward on `xs` and the weights detached, every intermediate saved, and the
/// last half's output.
fn forward_saved(xs: &Tensor, halves: &[SeparableHalf]) -> Result<(Vec<Saved>, Tensor)> {
    let mut saved: Vec<Saved> = Vec::with_capacity(halves.len());
    let mut input = xs.detach();
    for (i, half) in halves.iter().enumerate() {
        let in_half = |e: candle_core::Error| candle_core::Error::Msg(format!("{NAME}: half {i}: {e}"));
        let [depthwise, pointwise, gamma, beta] = half.train_weights().map(Tensor::detach);
        let (gamma, beta) = (gamma.contiguous()?, beta.contiguous()?);
        let bn = BatchNormParams { gamma, beta, ..half.bn.clone() };
        let detached = SeparableHalf { depthwise, pointwise, bn, ..half.clone() };
        let (mid, pre) = detached.convs(&input).map_err(in_half)?;
        let (gamma, beta) = (&detached.bn.gamma, &detached.bn.beta);
        let step = batch_norm_train_step(&pre, gamma, beta, half.bn_options()).map_err(in_half)?;
        let output = step.forward_no_bwd(&pre, gamma, beta)?;
        saved.push(Saved { half: detached, input, mid, pre, step, output: output.clone() });
        input = output;
    }
    Ok((saved, input))
}

/// The gradients of the input and of every weight (`depthwise, pointwise, γ, β` per half,
/// in order) from the gradient of the output `res`.
fn backward_saved(saved: &[Saved], grad: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let mut grad = grad.contiguous()?;
    let mut weights = Vec::with_capacity(4 * saved.len());
    for saved in saved.iter().rev() {
        let half = &saved.half;
        let (grad_pre, grad_gamma, grad_beta) =
            saved.step.grads((&saved.pre, &half.bn.gamma, &half.bn.beta), &saved.output, &grad)?;
        let (grad_mid, grad_pointwise) =
            conv1x1_grads(&saved.mid, &half.pointwise, &grad_pre, Conv1x1Options::default())?;
        let opts = half.depthwise_options(&saved.input)?;
        let (grad_input, grad_depthwise) = depthwise_conv2d_grads((&saved.input, &half.depthwise, &grad_mid), opts)?;
        // Reversed at the end, with the halves.
        weights.extend([grad_beta, grad_gamma, grad_pointwise, grad_depthwise]);
        grad = grad_input;
    }
    weights.reverse();
    Ok((grad, weights))
}

/// Reference for `separable_train_traced`: each half as the unfused ops (`depthwise_conv2d`,
/// `conv1x1`, `batch_norm_train`), differentiable, any device.
pub fn separable_train_reference(xs: &Tensor, halves: &[SeparableHalf]) -> Result<SeparableTrain> {
    let mut xs = xs.clone();
    let mut stats = Vec::with_capacity(halves.len());
    for half in halves {
        let (_, pre) = half.convs(&xs)?;
        let out = batch_norm_train(&pre, &half.bn.gamma, &half.bn.beta, half.bn_options())?;
        let (n, _, h, w) = pre.dims4()?;
        stats.push(BatchStats { mean: out.mean, var: out.var, count: n * h * w });
        xs = out.ys;
    }
    Ok(SeparableTrain { ys: xs, stats })
}

/// What one half's backward needs: its detached weights, its input, the depthwise conv's
/// output, the pointwise conv's output (the batch norm's input), the batch norm's
/// statistics, and its output (the next half's input).
struct Saved {
    half: SeparableHalf,
    input: Tensor,
    mid: Tensor,
    pre: Tensor,
    step: BatchNormTrainStep,
    output: Tensor,
}

impl Saved {
    /// The batch statistics of this half's batch norm.
    fn stats(&self) -> Result<BatchStats> {
        let (n, _, h, w) = self.pre.dims4()?;
        Ok(BatchStats { mean: self.step.mean.clone(), var: self.step.var.clone(), count: n * h * w })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use candle_core::{DType, Var};

    use crate::kernels::testutil::separable_half as half;

    /// `half` reading `weights` (depthwise, pointwise, γ, β).
    fn with_weights(half: &SeparableHalf, weights: &[Var]) -> SeparableHalf {
        let [d, p, g, b] = weights else { panic!("four weights per half") };
        let bn = BatchNormParams { gamma: g.as_tensor().clone(), beta: b.as_tensor().clone(), ..half.bn.clone() };
        SeparableHalf { depthwise: d.as_tensor().clone(), pointwise: p.as_tensor().clone(), bn, ..half.clone() }
    }

    /// The reference's output, statistics and gradients of `sum(ys · probe)` with respect to
    /// the input and every weight (`depthwise, pointwise, γ, β` per half).
    fn run_reference(xs: &Tensor, halves: &[SeparableHalf], probe: &Tensor) -> (SeparableTrain, Vec<Tensor>) {
        let x = Var::from_tensor(xs).unwrap();
        let vars: Vec<[Var; 4]> =
            halves.iter().map(|h| h.train_weights().map(|t| Var::from_tensor(t).unwrap())).collect();
        let tracked: Vec<SeparableHalf> = halves.iter().zip(&vars).map(|(h, v)| with_weights(h, v)).collect();
        let out = separable_train_reference(x.as_tensor(), &tracked).unwrap();
        let grads = (&out.ys * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let mut all = vec![grads.get(x.as_tensor()).expect("a gradient for the input").clone()];
        for v in vars.iter().flatten() {
            all.push(grads.get(v.as_tensor()).expect("a gradient for every weight").clone());
        }
        (out, all)
    }

    /// The same through [`separable_train_traced`] and its tape's backward.
    fn run_traced(xs: &Tensor, halves: &[SeparableHalf], probe: &Tensor) -> (SeparableTrain, Vec<Tensor>) {
        let mut tape = Tape::new();
        let x = tape.input(xs);
        let (ys, stats) = separable_train_traced(&mut tape, &x, halves).unwrap();
        let grads = tape.backward(vec![(ys.value, probe.clone())], &[x.value]).unwrap();
        let all = grads.values.into_iter().chain(grads.weights).map(|g| g.expect("a gradient")).collect();
        (SeparableTrain { ys: ys.tensor, stats }, all)
    }

    fn traced(xs: &Tensor, halves: &[SeparableHalf]) -> Result<Traced> {
        let mut tape = Tape::new();
        let x = tape.input(xs);
        Ok(separable_train_traced(&mut tape, &x, halves)?.0)
    }

    #[test]
    fn matches_the_unfused_ops_forward_statistics_and_gradients() {
        let mut rng = TestRng::new(61);
        // (n, c, h, w), then the halves: sep 3x3, 5x5 stride 2 on odd sizes, 7x7 stride 2,
        // one half (dilated), three halves, one sample.
        type Case = ((usize, usize, usize, usize), Vec<(usize, usize, usize, usize, usize)>);
        let cases: [Case; 6] = [
            ((2, 3, 9, 9), vec![(3, 4, 3, 1, 1), (4, 4, 3, 1, 1)]),
            ((3, 5, 13, 14), vec![(5, 6, 5, 2, 1), (6, 6, 5, 1, 1)]),
            ((2, 4, 11, 17), vec![(4, 3, 7, 2, 1), (3, 3, 7, 1, 1)]),
            ((2, 3, 10, 10), vec![(3, 3, 3, 1, 2)]),
            ((3, 4, 8, 8), vec![(4, 4, 3, 1, 1), (4, 5, 3, 2, 1), (5, 2, 5, 1, 1)]),
            ((1, 2, 12, 10), vec![(2, 5, 5, 1, 1), (5, 5, 5, 1, 1)]),
        ];
        for ((n, c, h, w), shapes) in cases {
            for relus in [[(true, true), (false, false), (true, false)], [(false, true), (true, false), (false, true)]]
            {
                for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
                    let halves: Vec<_> = shapes.iter().zip(relus).map(|(&s, r)| half(&mut rng, s, r, dtype)).collect();
                    let xs = rng.tensor(&[n, c, h, w], dtype).unwrap();
                    let what = format!("{n}x{c}x{h}x{w} {shapes:?} {relus:?} {dtype:?}");
                    let want = separable_train_reference(&xs, &halves).unwrap();
                    let probe = rng.tensor(want.ys.dims(), dtype).unwrap();
                    let (got, got_grads) = run_traced(&xs, &halves, &probe);
                    let (want, want_grads) = run_reference(&xs, &halves, &probe);
                    assert_eq!(got.ys.dims(), want.ys.dims(), "{what}");
                    assert_close(&got.ys, &want.ys, tol, &what);
                    assert_eq!(got.stats.len(), halves.len());
                    for (i, (g, w)) in got.stats.iter().zip(&want.stats).enumerate() {
                        assert_eq!(g.count, w.count, "{what}: half {i}");
                        assert_close(&g.mean, &w.mean, tol, &format!("{what}: mean of half {i}"));
                        assert_close(&g.var, &w.var, tol, &format!("{what}: variance of half {i}"));
                    }
                    let names = ["depthwise", "pointwise", "gamma", "beta"];
                    for (j, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
                        let which = if j == 0 {
                            "input".to_string()
                        } else {
                            format!("half {} {}", (j - 1) / 4, names[(j - 1) % 4])
                        };
                        assert_eq!(g.dims(), w.dims(), "{what}: gradient of the {which}");
                        assert_close(g, w, tol, &format!("{what}: gradient of the {which}"));
                    }
                }
            }
        }
    }

    #[test]
    fn weights_of_another_dtype_are_refused() {
        let mut rng = TestRng::new(62);
        let mut halves = [half(&mut rng, (3, 4, 3, 1, 1), (true, true), DType::F32)];
        let xs = rng.tensor(&[2, 3, 6, 6], DType::F32).unwrap();
        halves[0].bn.gamma = halves[0].bn.gamma.to_dtype(DType::F64).unwrap();
        let err = traced(&xs, &halves).unwrap_err().to_string();
        assert!(err.contains("batch-norm-train") && err.contains("F64"), "{err}");
    }

    #[test]
    fn a_malformed_weight_names_the_half() {
        let mut rng = TestRng::new(63);
        let xs = rng.tensor(&[2, 3, 6, 6], DType::F32).unwrap();
        let halves = [
            half(&mut rng, (3, 4, 3, 1, 1), (true, true), DType::F32),
            half(&mut rng, (5, 4, 3, 1, 1), (false, false), DType::F32),
        ];
        let err = traced(&xs, &halves).unwrap_err().to_string();
        assert!(err.contains("separable-train: half 1"), "{err}");
    }
}
