//! A NASNet cell as a candle module, for any cell of the search space.
//!
//! TF-Slim `nasnet_utils.py` (`NasNetABaseCell.__call__`, `_cell_base`,
//! `_reduce_prev_layer`, `_combine_unused_states`, `_apply_drop_path`); weight names
//! after timm `nasnet.py` (`conv_1x1`, `conv_prev_1x1`, `path_1`/`path_2`/`final_path_bn`,
//! `comb_iter_{b}_{left,right}`). Every shape and projection comes from
//! `nas_space::network::CellLayout`.
//!
//! Training with gradients on the CPU runs the whole cell as one node of candle's graph
//! (`forward_taped`, on a `crate::tape::Tape`); inference without gradients on the CPU runs
//! it one sample at a time, each sample's states kept in cache (`eval_program`, a
//! `kernels::cell_eval::Program`); every other mode runs the ops as candle nodes
//! (`forward_ops`). All compute the same values, gradients and statistics.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, ModuleT, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use nas_space::network::{CellLayout, FeatureShape, PrevAdjust};
use nas_space::{Cell, Combine};

use crate::drop_path::{drop_path_add, scale_examples, DropPath};
use crate::kernels::cell_eval::{Program, Step, Val};
use crate::kernels::concat::{cat_channels, cat_channels_cpu, split_channels, Part};
use crate::layers::Conv2dConfig;
use crate::ops::{ActConvBn, BnConfig, CellOp, FactorizedReduction};
use crate::tape::{Grads, Tape, TapeGrads, Traced, Value};

/// How state 1 is made from the previous input.
#[derive(Debug, Clone)]
enum Adjust {
    /// No previous input: state 1 is the raw newest input.
    UseX,
    /// The previous input as it is.
    Unchanged,
    /// ReLU → 1×1 → BN (`conv_prev_1x1`).
    Conv(ActConvBn),
    /// ReLU → factorized reduction (`path_1`, `path_2`, `final_path_bn`).
    Reduce(FactorizedReduction),
}

#[derive(Debug, Clone)]
struct BlockModule {
    inputs: [usize; 2],
    ops: [CellOp; 2],
    combine: Combine,
}

/// One cell instance with its own weights.
#[derive(Debug, Clone)]
pub struct CellModule {
    preamble: ActConvBn,
    adjust: Adjust,
    blocks: Vec<BlockModule>,
    /// `(state, projection)` in concat order.
    concat: Vec<(usize, Option<FactorizedReduction>)>,
    /// Per block: its output only enters the concat, unprojected, so an added block's two
    /// branches go to `cat_channels` as they are and their sum is never stored alone.
    concat_only: Vec<bool>,
    drop_path: Option<DropPath>,
    /// Every shape of the cell (the per-sample program takes them from here).
    layout: CellLayout,
}

impl CellModule {
    /// Builds `cell` laid out as `layout` (from `CellLayout::new`), with BN settings `bn`,
    /// and ScheduledDropPath `drop_path` (None when disabled).
    pub fn new(
        cell: &Cell,
        layout: &CellLayout,
        bn: BnConfig,
        drop_path: Option<DropPath>,
        vb: VarBuilder,
    ) -> Result<CellModule> {
        let f = layout.states[0].channels;
        let preamble = ActConvBn::new(true, Conv2dConfig::square(layout.x.channels, f, 1), bn, vb.pp("conv_1x1"))?;
        let adjust = match layout.prev_adjust {
            PrevAdjust::UseX => Adjust::UseX,
            PrevAdjust::Unchanged => Adjust::Unchanged,
            PrevAdjust::Conv1x1 { c_in } => {
                Adjust::Conv(ActConvBn::new(true, Conv2dConfig::square(c_in, f, 1), bn, vb.pp("conv_prev_1x1"))?)
            }
            PrevAdjust::FactorizedReduction { c_in } => {
                Adjust::Reduce(FactorizedReduction::new(c_in, f, 2, bn, vb.clone())?)
            }
        };
        let blocks: Vec<BlockModule> = cell
            .blocks
            .iter()
            .zip(&layout.ops)
            .enumerate()
            .map(|(b, (block, op_layouts))| {
                let left = CellOp::new(block.ops[0], &op_layouts[0], f, bn, vb.pp(format!("comb_iter_{b}_left")))?;
                let right = CellOp::new(block.ops[1], &op_layouts[1], f, bn, vb.pp(format!("comb_iter_{b}_right")))?;
                Ok(BlockModule { inputs: block.inputs, ops: [left, right], combine: block.combine })
            })
            .collect::<Result<_>>()?;
        let concat: Vec<(usize, Option<FactorizedReduction>)> = layout
            .concat
            .iter()
            .map(|entry| {
                let projection = match entry.factorized_reduction {
                    Some(stride) => Some(FactorizedReduction::new(
                        entry.input.channels,
                        entry.output.channels,
                        stride,
                        bn,
                        vb.pp("cell_output").pp(format!("reduction_{}", entry.state)),
                    )?),
                    None => None,
                };
                Ok((entry.state, projection))
            })
            .collect::<Result<_>>()?;
        let concat_only = (0..blocks.len())
            .map(|b| {
                let state = 2 + b;
                !blocks.iter().any(|blk| blk.inputs.contains(&state))
                    && concat.iter().any(|(s, p)| *s == state && p.is_none())
            })
            .collect();
        Ok(CellModule { preamble, adjust, blocks, concat, concat_only, drop_path, layout: layout.clone() })
    }

    /// Runs the cell on the newest input `x` and the previous one `prev`.
    ///
    /// # Shapes
    /// - `x`, `prev`: as the cell's `CellLayout` records them
    /// - returns: `(batch, layout.output.channels, layout.output.size, layout.output.size)`
    pub fn forward_t(&self, x: &Tensor, prev: Option<&Tensor>, train: bool) -> Result<Tensor> {
        // The fused paths: CPU, f32 or f64, both inputs alike.
        let fusable = !unfused()
            && x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && prev.is_none_or(|p| p.device().is_cpu() && p.dtype() == x.dtype());
        if fusable && train && crate::grad_enabled() {
            return self.forward_taped(x, prev);
        }
        // One sample per thread at least: the program runs in parallel over samples.
        if fusable && !train && !crate::grad_enabled() && x.dim(0)? >= rayon::current_num_threads() {
            if let Some(program) = self.eval_program(x, prev)? {
                return program.run(x, prev);
            }
        }
        self.forward_ops(x, prev, train)
    }

    /// The cell in inference as a per-sample program (`kernels::cell_eval`), or `None`
    /// when one of its ops has no per-sample steps (dense convs other than 1×1) or `x`
    /// is not the shape its `CellLayout` records.
    ///
    /// Each state has a home: the concatenation's channel range when the state enters it
    /// unprojected, the input itself for an unadjusted state 1, else a temporary buffer.
    /// An added block's first op writes its home and the second adds to it (a 1×1 conv
    /// or a separable conv by its gemm accumulating into it).
    pub(crate) fn eval_program(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<Option<Program>> {
        if !self.blocks.iter().all(|b| b.ops.iter().all(CellOp::has_eval_steps)) {
            return Ok(None);
        }
        let sample = |t: &Tensor| t.dims4().map(|(_, c, h, w)| (c, h, w));
        let x_shape = sample(x)?;
        let prev_shape = prev.map(sample).transpose()?;
        // Every shape is the layout's (`CellLayout::new` decides them); inputs of other
        // sizes run as candle ops.
        let layout = &self.layout;
        let square = |f: FeatureShape| (f.channels, f.size, f.size);
        if x_shape != square(layout.x) {
            return Ok(None);
        }
        let shapes: Vec<(usize, usize, usize)> = layout.states.iter().copied().map(square).collect();
        let mut program = Program::new(x_shape, prev_shape, square(layout.output));
        let out = program.out();
        // Each concatenated part's place in the output.
        let mut parts = Vec::with_capacity(layout.concat.len());
        let mut channel = 0;
        for entry in &layout.concat {
            parts.push(out.channels(channel, entry.output.channels));
            channel += entry.output.channels;
        }
        // Homes.
        let input1 = match self.adjust {
            Adjust::UseX => Some(program.x()),
            Adjust::Unchanged => program.prev(),
            Adjust::Conv(_) | Adjust::Reduce(_) => None,
        };
        let mut homes: Vec<Option<Val>> = vec![None; shapes.len()];
        for ((state, projection), &part) in self.concat.iter().zip(&parts) {
            if projection.is_none() && homes[*state].is_none() {
                homes[*state] = Some(part);
            }
        }
        if homes[1].is_none() {
            homes[1] = input1;
        }
        for (home, &shape) in homes.iter_mut().zip(&shapes) {
            if home.is_none() {
                *home = Some(program.tmp(shape));
            }
        }
        let homes: Vec<Val> = homes.into_iter().map(|h| h.expect("every state has a home")).collect();
        // State 0 and 1.
        let x_val = program.x();
        self.preamble.eval_steps(&mut program, x_val, homes[0], false)?;
        match (&self.adjust, program.prev(), input1) {
            (Adjust::Conv(conv), Some(p), _) => conv.eval_steps(&mut program, p, homes[1], false)?,
            (Adjust::Reduce(reduce), Some(p), _) => reduce.eval_steps(&mut program, p, homes[1], true)?,
            (_, _, Some(input1)) if input1 != homes[1] => {
                program.push(Step::Copy { src: input1, dst: homes[1], add: false })
            }
            (Adjust::Conv(_) | Adjust::Reduce(_), None, _) => {
                candle_core::bail!("this cell was built for a previous input, but none was given")
            }
            _ => {}
        }
        // The blocks.
        for (b, block) in self.blocks.iter().enumerate() {
            let dst = homes[2 + b];
            let srcs = block.inputs.map(|i| homes[i]);
            match block.combine {
                Combine::Add => {
                    let same_pure = block.ops[0].pure_key().is_some()
                        && block.ops[0].pure_key() == block.ops[1].pure_key()
                        && block.inputs[0] == block.inputs[1];
                    if same_pure {
                        block.ops[0].eval_steps(&mut program, srcs[0], dst, false)?;
                        program.push(Step::Double { dst });
                        continue;
                    }
                    block.ops[0].eval_steps(&mut program, srcs[0], dst, false)?;
                    block.ops[1].eval_steps(&mut program, srcs[1], dst, true)?;
                }
                Combine::Concat => {
                    // Every op makes F channels (state 0's width).
                    let f = shapes[0].0;
                    block.ops[0].eval_steps(&mut program, srcs[0], dst.channels(0, f), false)?;
                    block.ops[1].eval_steps(&mut program, srcs[1], dst.channels(f, dst.c - f), false)?;
                }
            }
        }
        // The concatenation's parts that are not already in place.
        for ((state, projection), &dst) in self.concat.iter().zip(&parts) {
            match projection {
                Some(p) => p.eval_steps(&mut program, homes[*state], dst, false)?,
                None if homes[*state] != dst => program.push(Step::Copy { src: homes[*state], dst, add: false }),
                None => {}
            }
        }
        Ok(Some(program))
    }

    /// [`forward_t`](Self::forward_t) as candle ops, each a node of candle's graph.
    fn forward_ops(&self, x: &Tensor, prev: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let state1 = match (&self.adjust, prev) {
            (Adjust::UseX, _) => x.clone(),
            (Adjust::Unchanged, Some(p)) => p.clone(),
            (Adjust::Conv(conv), Some(p)) => conv.forward_t(p, train)?,
            (Adjust::Reduce(reduce), Some(p)) => reduce.forward_relu_t(p, train)?,
            (_, None) => candle_core::bail!("this cell was built for a previous input, but none was given"),
        };
        let state0 = self.preamble.forward_t(x, train)?;
        let mut states = vec![Part::Copy(state0), Part::Copy(state1)];
        // The outputs of weightless ops, computed once per (state, op): NASNet-A's normal
        // cell averages the previous input twice in one block (TF's graph optimiser
        // merges the two as well). Drop path is applied after, per branch.
        let mut pure = Vec::new();
        for (block, &concat_only) in self.blocks.iter().zip(&self.concat_only) {
            let mut sides = Vec::with_capacity(2);
            let mut scales = Vec::with_capacity(2);
            for (op, &input) in block.ops.iter().zip(&block.inputs) {
                let ys = match op.pure_key().map(|key| (input, key)) {
                    Some(key) => match pure.iter().find(|(k, _)| *k == key) {
                        Some((_, ys)) => Tensor::clone(ys),
                        None => {
                            let ys = op.forward_t(&states[input].value()?, train)?;
                            pure.push((key, ys.clone()));
                            ys
                        }
                    },
                    None => op.forward_t(&states[input].value()?, train)?,
                };
                let scale = match &self.drop_path {
                    Some(dp) if train && op.takes_drop_path() => dp.scales(ys.dim(0)?),
                    _ => None,
                };
                sides.push(ys);
                scales.push(scale);
            }
            let out = match block.combine {
                // Drop path folded into the add (one pass; the dropped branches are not stored).
                Combine::Add if concat_only && scales.iter().all(Option::is_none) => {
                    let [a, b] = <[Tensor; 2]>::try_from(sides).expect("two branches");
                    Part::Sum(a, b)
                }
                Combine::Add => {
                    Part::Copy(drop_path_add(&sides[0], scales[0].as_deref(), &sides[1], scales[1].as_deref())?)
                }
                Combine::Concat => {
                    let scaled = sides
                        .iter()
                        .zip(&scales)
                        .map(|(ys, s)| s.as_deref().map_or_else(|| Ok(ys.clone()), |s| scale_examples(ys, s)))
                        .collect::<Result<Vec<_>>>()?;
                    Part::Copy(Tensor::cat(&[&scaled[0], &scaled[1]], 1)?)
                }
            };
            states.push(out);
        }
        let parts = self
            .concat
            .iter()
            .map(|(state, projection)| match projection {
                Some(p) => Ok(Part::Copy(p.forward_t(&states[*state].value()?, train)?)),
                None => Ok(states[*state].clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = cat_channels(&parts)?;
        Ok(if crate::grad_enabled() { out } else { out.detach() })
    }
}

#[cfg(test)]
thread_local! {
    static UNFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests compare the fused paths (taped training, per-sample inference) with the candle
/// ops: inside `f`, cells on this thread run as candle ops.
#[cfg(test)]
pub(crate) fn with_unfused_cells<R>(f: impl FnOnce() -> R) -> R {
    UNFUSED.with(|u| u.set(true));
    let out = f();
    UNFUSED.with(|u| u.set(false));
    out
}

#[cfg(test)]
fn unfused() -> bool {
    UNFUSED.with(std::cell::Cell::get)
}

#[cfg(not(test))]
fn unfused() -> bool {
    false
}

/// A state on the tape: a value, or a block's two branches whose sum only enters the
/// concatenation (never stored on its own).
#[derive(Debug, Clone)]
enum TapedState {
    One(Traced),
    Sum(Traced, Traced),
}

impl TapedState {
    fn one(&self, state: usize) -> Result<&Traced> {
        match self {
            TapedState::One(t) => Ok(t),
            TapedState::Sum(..) => candle_core::bail!("cell: state {state} is read but was kept as an unsummed pair"),
        }
    }

    fn part(&self) -> Part {
        match self {
            TapedState::One(t) => Part::Copy(t.tensor.clone()),
            TapedState::Sum(a, b) => Part::Sum(a.tensor.clone(), b.tensor.clone()),
        }
    }
}

impl CellModule {
    /// Training with gradients on the CPU: the whole cell as one node of candle's graph.
    /// Every op runs its training forward on detached tensors, recorded on a [`Tape`]; one
    /// custom op on `(x, prev, packed weights)` concatenates the states in its forward and
    /// runs the tape in reverse in its backward (see `crate::tape` for what this saves).
    /// The same values, moving statistics and drop-path draws as [`forward_ops`](Self::forward_ops).
    fn forward_taped(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
        let mut tape = Tape::new();
        let xs = tape.input(x);
        let prev_in = prev.map(|p| tape.input(p));
        let state1 = match (&self.adjust, &prev_in) {
            (Adjust::UseX, _) => xs.clone(),
            (Adjust::Unchanged, Some(p)) => p.clone(),
            (Adjust::Conv(conv), Some(p)) => conv.trace(&mut tape, p)?,
            (Adjust::Reduce(reduce), Some(p)) => reduce.trace(&mut tape, p, true)?,
            (_, None) => candle_core::bail!("this cell was built for a previous input, but none was given"),
        };
        let state0 = self.preamble.trace(&mut tape, &xs)?;
        let mut states = vec![TapedState::One(state0), TapedState::One(state1)];
        let mut pure: Vec<(_, Traced)> = Vec::new();
        for (block, &concat_only) in self.blocks.iter().zip(&self.concat_only) {
            let mut sides = Vec::with_capacity(2);
            let mut scales = Vec::with_capacity(2);
            for (op, &input) in block.ops.iter().zip(&block.inputs) {
                let xs = states[input].one(input)?;
                let ys = match op.pure_key().map(|key| (input, key)) {
                    Some(key) => match pure.iter().find(|(k, _)| *k == key) {
                        Some((_, ys)) => ys.clone(),
                        None => {
                            let ys = op.trace(&mut tape, xs)?;
                            pure.push((key, ys.clone()));
                            ys
                        }
                    },
                    None => op.trace(&mut tape, xs)?,
                };
                let scale = match &self.drop_path {
                    Some(dp) if op.takes_drop_path() => dp.scales(ys.tensor.dim(0)?),
                    _ => None,
                };
                sides.push(ys);
                scales.push(scale);
            }
            let [a, b] = <[Traced; 2]>::try_from(sides).expect("two branches");
            let [sa, sb] = <[Option<Vec<f64>>; 2]>::try_from(scales).expect("two branches");
            let scaled = |grad: &Tensor, s: &Option<Vec<f64>>| match s {
                Some(s) => scale_examples(grad, s).map(Some),
                None => Ok(Some(grad.clone())),
            };
            let out = match block.combine {
                Combine::Add if concat_only && sa.is_none() && sb.is_none() => TapedState::Sum(a, b),
                Combine::Add => {
                    let ys = drop_path_add(&a.tensor, sa.as_deref(), &b.tensor, sb.as_deref())?;
                    TapedState::One(tape.record(&[&a, &b], &[], ys, move |grad| {
                        Ok(Grads { inputs: vec![scaled(grad, &sa)?, scaled(grad, &sb)?], weights: vec![] })
                    }))
                }
                Combine::Concat => {
                    let scale = |t: &Tensor, s: &Option<Vec<f64>>| {
                        s.as_deref().map_or_else(|| Ok(t.clone()), |s| scale_examples(t, s))
                    };
                    let ys = cat_channels(&[Part::Copy(scale(&a.tensor, &sa)?), Part::Copy(scale(&b.tensor, &sb)?)])?;
                    let widths = [a.tensor.dim(1)?, b.tensor.dim(1)?];
                    TapedState::One(tape.record(&[&a, &b], &[], ys, move |grad| {
                        let [ga, gb] = <[Tensor; 2]>::try_from(split_channels(grad, &widths)?).expect("two parts");
                        Ok(Grads { inputs: vec![scaled(&ga, &sa)?, scaled(&gb, &sb)?], weights: vec![] })
                    }))
                }
            };
            states.push(out);
        }
        let parts = self
            .concat
            .iter()
            .map(|(state, projection)| match projection {
                Some(p) => Ok(TapedState::One(p.trace(&mut tape, states[*state].one(*state)?, false)?)),
                None => Ok(states[*state].clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        let inputs = std::iter::once(&xs).chain(&prev_in).map(|t| t.value).collect();
        let packed = tape.weights().iter().map(Tensor::flatten_all).collect::<Result<Vec<_>>>()?;
        let packed = Tensor::cat(&packed, 0)?;
        let op = CellTrainOp { tape, parts, inputs };
        match prev {
            Some(p) => x.apply_op3(p, &packed, op),
            None => x.apply_op2(&packed, op),
        }
    }
}

const NAME: &str = "cell-train";

/// The recorded cell: its tape, the parts of its concatenation, and the tape values of its
/// inputs (`x`, then `prev` when given).
struct CellTrainOp {
    tape: Tape,
    parts: Vec<TapedState>,
    inputs: Vec<Value>,
}

impl CellTrainOp {
    fn forward(&self) -> Result<(CpuStorage, Shape)> {
        cat_channels_cpu(&self.parts.iter().map(TapedState::part).collect::<Vec<_>>())
    }

    /// The gradients of the `inputs` (`x`, then `prev` when given) and of the packed weights
    /// from the output's `grad`. An input or weight that no gradient reaches (a cell whose
    /// ops and concatenation leave state 0 unused) gets zeros: candle's backward expects a
    /// gradient for every tracked argument.
    fn grads(&self, grad: &Tensor, inputs: &[&Tensor]) -> Result<(Vec<Tensor>, Tensor)> {
        let widths = self
            .parts
            .iter()
            .map(|p| match p {
                TapedState::One(t) | TapedState::Sum(t, _) => t.tensor.dim(1),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut seeds = Vec::with_capacity(self.parts.len() + 5);
        for (part, g) in self.parts.iter().zip(split_channels(grad, &widths)?) {
            match part {
                TapedState::One(t) => seeds.push((t.value, g)),
                TapedState::Sum(a, b) => seeds.extend([(a.value, g.clone()), (b.value, g)]),
            }
        }
        let TapeGrads { values, weights } = self.tape.backward(seeds, &self.inputs)?;
        let inputs = values
            .into_iter()
            .zip(inputs)
            .map(|(g, input)| g.map_or_else(|| input.zeros_like(), Ok))
            .collect::<Result<_>>()?;
        let packed = weights
            .into_iter()
            .zip(self.tape.weights())
            .map(|(g, w)| g.map_or_else(|| w.zeros_like(), Ok)?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Ok((inputs, Tensor::cat(&packed, 0)?))
    }
}

impl CustomOp2 for CellTrainOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (inputs, packed) = self.grads(grad, &[x])?;
        let [x] = <[Tensor; 1]>::try_from(inputs).expect("x");
        Ok((Some(x), Some(packed)))
    }
}

impl CustomOp3 for CellTrainOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(
        &self,
        x: &Tensor,
        prev: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (inputs, packed) = self.grads(grad, &[x, prev])?;
        let [x, prev] = <[Tensor; 2]>::try_from(inputs).expect("x and prev");
        Ok((Some(x), Some(prev), Some(packed)))
    }
}
