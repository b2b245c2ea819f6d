//! A reverse-mode tape for running a group of ops as one node of candle's graph.
//!
//! Candle's backward pays for every edge of its graph: before an op's own backward runs, the
//! gradient of each of its inputs gets a zeroed buffer and the incoming gradient added into
//! it (`GradStore::or_insert`, then `add`), two passes of the activation's size per edge. A
//! NASNet-A cell's candle ops put about 18 activation-sized nodes in that graph (counted on
//! the `small` network's 10 cells: 192 nodes unfused, 14 taped). [`Tape`] records ops that
//! ran on detached tensors (each with its backward as a closure over what it saved), and
//! runs them in reverse from the gradients of its outputs: a gradient with one consumer is
//! passed on as it is, and only values with several consumers are summed. The caller wraps
//! the whole group in one candle custom op (`cell::CellModule`'s training path), whose
//! weights enter packed (one `cat`: a custom op takes at most three inputs), in the order
//! [`Tape::weights`] lists them.

use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor, Var, WithDType};
use rayon::prelude::*;

use crate::kernels::Output;

/// A value on a [`Tape`]: an input or an op's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Value(usize);

/// A detached tensor and the value it is on its tape.
#[derive(Debug, Clone)]
pub(crate) struct Traced {
    pub(crate) value: Value,
    pub(crate) tensor: Tensor,
}

/// A weight read on a tape: its slot (the order of [`Tape::weights`]) and its detached,
/// contiguous value, which the ops compute with.
#[derive(Debug, Clone)]
pub(crate) struct Weight {
    slot: usize,
    pub(crate) tensor: Tensor,
}

/// What one recorded op's backward returns: the gradients of its inputs and of its weights,
/// in the order it was recorded with (`None`: no gradient flows to that input).
pub(crate) struct Grads {
    pub(crate) inputs: Vec<Option<Tensor>>,
    pub(crate) weights: Vec<Tensor>,
}

/// What [`Tape::backward`] returns (`None` where no gradient reached).
#[derive(Debug)]
pub(crate) struct TapeGrads {
    /// The gradients of the values asked for, in order.
    pub(crate) values: Vec<Option<Tensor>>,
    /// The gradient of every weight slot.
    pub(crate) weights: Vec<Option<Tensor>>,
}

type Backward = Box<dyn Fn(&Tensor) -> Result<Grads> + Send + Sync>;

struct Step {
    inputs: Vec<Value>,
    weights: Vec<usize>,
    output: Value,
    backward: Backward,
}

/// Recorded ops on detached tensors, in the order they ran.
#[derive(Default)]
pub(crate) struct Tape {
    weights: Vec<Tensor>,
    steps: Vec<Step>,
    values: usize,
}

impl Tape {
    pub(crate) fn new() -> Tape {
        Tape::default()
    }

    /// A new input value: `tensor` detached.
    pub(crate) fn input(&mut self, tensor: &Tensor) -> Traced {
        Traced { value: self.new_value(), tensor: tensor.detach() }
    }

    /// Registers `weight` (the tracked original) and returns its detached, contiguous value.
    pub(crate) fn weight(&mut self, weight: &Tensor) -> Result<Weight> {
        self.weights.push(weight.clone());
        Ok(Weight { slot: self.weights.len() - 1, tensor: weight.detach().contiguous()? })
    }

    /// The tracked weights in slot order.
    pub(crate) fn weights(&self) -> &[Tensor] {
        &self.weights
    }

    /// Records an op that computed `output` (detached) from `inputs` and `weights`;
    /// `backward` maps the gradient of `output` to [`Grads`] in the same orders.
    pub(crate) fn record(
        &mut self,
        inputs: &[&Traced],
        weights: &[&Weight],
        output: Tensor,
        backward: impl Fn(&Tensor) -> Result<Grads> + Send + Sync + 'static,
    ) -> Traced {
        let value = self.new_value();
        self.steps.push(Step {
            inputs: inputs.iter().map(|t| t.value).collect(),
            weights: weights.iter().map(|w| w.slot).collect(),
            output: value,
            backward: Box::new(backward),
        });
        Traced { value, tensor: output }
    }

    /// Records `forward` of `xs` (any differentiable candle computation that reads the
    /// tracked `weights`), its backward by candle's autograd on a graph of its own: for ops
    /// without a traced form. Costs a copy of the input and, in the backward, the product of
    /// the output with its gradient.
    pub(crate) fn record_candle(
        &mut self,
        xs: &Traced,
        weights: &[&Tensor],
        forward: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Traced> {
        let input = Var::from_tensor(&xs.tensor)?.as_tensor().clone();
        let ys = forward(&input)?;
        let slots = weights.iter().map(|w| self.weight(w)).collect::<Result<Vec<_>>>()?;
        let params: Vec<Tensor> = weights.iter().map(|w| (*w).clone()).collect();
        let output = ys.detach();
        Ok(self.record(&[xs], &slots.iter().collect::<Vec<_>>(), output, move |grad| {
            let store = (&ys * grad)?.sum_all()?.backward()?;
            let weights = params
                .iter()
                .map(|w| store.get(w).map_or_else(|| w.zeros_like(), |g| Ok(g.clone())))
                .collect::<Result<_>>()?;
            Ok(Grads { inputs: vec![store.get(&input).cloned()], weights })
        }))
    }

    fn new_value(&mut self) -> Value {
        self.values += 1;
        Value(self.values - 1)
    }

    /// Runs the recorded ops in reverse from `seeds` (gradients of values; several for one
    /// value are summed), for the gradients of `wanted` and of every weight slot.
    pub(crate) fn backward(&self, seeds: Vec<(Value, Tensor)>, wanted: &[Value]) -> Result<TapeGrads> {
        let mut pending: Vec<Vec<Tensor>> = vec![Vec::new(); self.values];
        for (value, grad) in seeds {
            pending[value.0].push(grad);
        }
        let mut weights: Vec<Vec<Tensor>> = vec![Vec::new(); self.weights.len()];
        for (i, step) in self.steps.iter().enumerate().rev() {
            let Some(grad) = sum(std::mem::take(&mut pending[step.output.0]))? else { continue };
            let grads = (step.backward)(&grad)?;
            if grads.inputs.len() != step.inputs.len() || grads.weights.len() != step.weights.len() {
                bail!(
                    "tape: op {i} returned {} input and {} weight gradients for {} inputs and {} weights",
                    grads.inputs.len(),
                    grads.weights.len(),
                    step.inputs.len(),
                    step.weights.len()
                )
            }
            for (value, g) in step.inputs.iter().zip(grads.inputs) {
                if let Some(g) = g {
                    pending[value.0].push(g);
                }
            }
            for (&slot, g) in step.weights.iter().zip(grads.weights) {
                weights[slot].push(g);
            }
        }
        let values = wanted.iter().map(|v| sum(std::mem::take(&mut pending[v.0]))).collect::<Result<_>>()?;
        let weights = weights.into_iter().map(sum).collect::<Result<_>>()?;
        Ok(TapeGrads { values, weights })
    }
}

/// The sum of `grads`, `None` when there are none (one is passed on as it is), in one
/// parallel pass on rayon's pool. A tape runs on the CPU in f32 or f64 only (the taped cell's
/// condition), so anything else is an error.
fn sum(grads: Vec<Tensor>) -> Result<Option<Tensor>> {
    match grads.len() {
        0 => return Ok(None),
        1 => return Ok(grads.into_iter().next()),
        _ => {}
    }
    let first = &grads[0];
    let same = grads.iter().all(|g| g.shape() == first.shape() && g.dtype() == first.dtype());
    if !(same && first.device().is_cpu() && matches!(first.dtype(), DType::F32 | DType::F64)) {
        let found: Vec<_> = grads.iter().map(|g| (g.dims().to_vec(), g.dtype(), g.device().location())).collect();
        bail!("tape: gradients to sum must be CPU f32 or f64 tensors of one shape, got {found:?}")
    }
    let grads = grads.iter().map(Tensor::contiguous).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let mut f32s = Vec::new();
    let mut f64s = Vec::new();
    for (storage, layout) in &guards {
        let start = layout.start_offset();
        match &**storage {
            Storage::Cpu(CpuStorage::F32(v)) => f32s.push(&v[start..start + layout.shape().elem_count()]),
            Storage::Cpu(CpuStorage::F64(v)) => f64s.push(&v[start..start + layout.shape().elem_count()]),
            _ => bail!("tape: a gradient to sum is not an f32 or f64 CPU tensor"),
        }
    }
    let storage = if f64s.is_empty() { CpuStorage::F32(sum_slices(&f32s)) } else { CpuStorage::F64(sum_slices(&f64s)) };
    let shape = first.shape().clone();
    Ok(Some(Tensor::from_storage(Storage::Cpu(storage), shape, candle_core::op::BackpropOp::none(), false)))
}

/// `Σ parts[k][i]` for every `i` (the parts of one length), in parallel chunks.
fn sum_slices<T: WithDType>(parts: &[&[T]]) -> Vec<T> {
    const CHUNK: usize = 1 << 14;
    let len = parts[0].len();
    let mut out = Output::<T>::new(len);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, out)| {
        let at = i * CHUNK;
        out.copy_from_slice(&parts[0][at..at + out.len()]);
        for part in &parts[1..] {
            for (o, &v) in out.iter_mut().zip(&part[at..]) {
                *o += v;
            }
        }
    });
    out.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `y = (x·w)·w + x` on the tape (x used twice, w twice) against candle's autograd.
    #[test]
    fn gradients_sum_over_every_use_of_a_value_and_a_weight() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1.0f64, -2.0, 3.0], 3, &dev).unwrap();
        let w = Var::from_vec(vec![0.5f64, 4.0, -1.5], 3, &dev).unwrap();
        let grad_y = Tensor::new(&[2.0f64, 1.0, -3.0], &dev).unwrap();

        let mut tape = Tape::new();
        let xt = tape.input(x.as_tensor());
        let mul = |tape: &mut Tape, a: &Traced| {
            let wt = tape.weight(w.as_tensor()).unwrap();
            let (a_saved, w_saved) = (a.tensor.clone(), wt.tensor.clone());
            let out = (&a.tensor * &wt.tensor).unwrap();
            tape.record(&[a], &[&wt], out, move |g| {
                Ok(Grads { inputs: vec![Some((g * &w_saved)?)], weights: vec![(g * &a_saved)?] })
            })
        };
        let once = mul(&mut tape, &xt);
        let twice = mul(&mut tape, &once);
        let y = (&twice.tensor + &xt.tensor).unwrap();
        let yt =
            tape.record(&[&twice, &xt], &[], y, |g| Ok(Grads { inputs: vec![Some(g.clone()); 2], weights: vec![] }));
        let TapeGrads { values: inputs, weights } =
            tape.backward(vec![(yt.value, grad_y.clone())], &[xt.value]).unwrap();
        assert_eq!(tape.weights().len(), 2, "one slot per read");

        let y_ref = ((x.as_tensor() * w.as_tensor()).unwrap() * w.as_tensor()).unwrap() + x.as_tensor();
        let grads = (y_ref.unwrap() * &grad_y).unwrap().sum_all().unwrap().backward().unwrap();
        let want_x = grads.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(inputs[0].as_ref().unwrap().to_vec1::<f64>().unwrap(), want_x);
        let got_w = (weights[0].as_ref().unwrap() + weights[1].as_ref().unwrap()).unwrap();
        let want_w = grads.get(w.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(got_w.to_vec1::<f64>().unwrap(), want_w);
    }

    #[test]
    fn sums_of_several_gradients_match_candles_adds() {
        let mut rng = crate::kernels::testutil::TestRng::new(3);
        for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
            for (k, len) in [(2, 7), (3, 40_000), (4, 1)] {
                let parts: Vec<Tensor> = (0..k).map(|_| rng.tensor(&[len], dtype).unwrap()).collect();
                let want = parts[1..].iter().fold(parts[0].clone(), |acc, p| (acc + p).unwrap());
                let got = sum(parts).unwrap().unwrap();
                crate::kernels::testutil::assert_close(&got, &want, 0.0, &format!("{dtype:?} {k} x {len}"));
            }
        }
        // Strided gradients are read as their values.
        let t = rng.tensor(&[3, 5], candle_core::DType::F32).unwrap();
        let got = sum(vec![t.t().unwrap(), t.t().unwrap()]).unwrap().unwrap();
        crate::kernels::testutil::assert_close(&got, &(t.t().unwrap() * 2.0).unwrap(), 0.0, "transposed");
        assert!(sum(Vec::new()).unwrap().is_none());
        let mixed = vec![
            rng.tensor(&[3], candle_core::DType::F32).unwrap(),
            rng.tensor(&[4], candle_core::DType::F32).unwrap(),
        ];
        let err = sum(mixed).unwrap_err().to_string();
        assert!(err.contains("tape: gradients to sum must be") && err.contains("[4]"), "{err}");
    }

    #[test]
    fn values_no_gradient_reaches_have_none() {
        let dev = Device::Cpu;
        let mut tape = Tape::new();
        let a = tape.input(&Tensor::ones(2, candle_core::DType::F32, &dev).unwrap());
        let unused = tape.input(&Tensor::ones(2, candle_core::DType::F32, &dev).unwrap());
        let b =
            tape.record(&[&a], &[], a.tensor.clone(), |g| Ok(Grads { inputs: vec![Some(g.clone())], weights: vec![] }));
        let seed = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        let TapeGrads { values: got, weights } =
            tape.backward(vec![(b.value, seed)], &[a.value, unused.value]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert!(got[1].is_none() && weights.is_empty());
    }

    #[test]
    fn a_backward_with_the_wrong_number_of_gradients_is_an_error() {
        let dev = Device::Cpu;
        let mut tape = Tape::new();
        let a = tape.input(&Tensor::ones(2, candle_core::DType::F32, &dev).unwrap());
        let b = tape.record(&[&a], &[], a.tensor.clone(), |_| Ok(Grads { inputs: vec![], weights: vec![] }));
        let seed = Tensor::ones(2, candle_core::DType::F32, &dev).unwrap();
        let err = tape.backward(vec![(b.value, seed)], &[a.value]).unwrap_err().to_string();
        assert!(err.contains("tape: op 0 returned 0 input"), "{err}");
    }
}
