//! A NASNet cell as a candle module, for any cell of the search space.
//!
//! TF-Slim `nasnet_utils.py` (`NasNetABaseCell.__call__`, `_cell_base`,
//! `_reduce_prev_layer`, `_combine_unused_states`, `_apply_drop_path`); weight names
//! after timm `nasnet.py` (`conv_1x1`, `conv_prev_1x1`, `path_1`/`path_2`/`final_path_bn`,
//! `comb_iter_{b}_{left,right}`). Every shape and projection comes from
//! `nas_space::network::CellLayout`.
//!
//! [`CellModule::new`] lowers the cell once into a `Schedule`: a list of nodes (the
//! preamble, the adjustment of the previous input, each block's two branches, the
//! concatenation's projections), each with the state it reads, where its result goes, its
//! drop path, the earlier node it shares a result with, and each state's home in a
//! per-sample program. Three small interpreters run it: training with gradients on the CPU
//! runs the whole cell as one node of candle's graph (`forward_taped`, on a
//! `crate::tape::Tape`); inference without gradients on the CPU runs it one sample at a
//! time, each sample's states kept in cache (`eval_program`, a
//! `kernels::cell_eval::Program`); every other mode runs the ops as candle nodes
//! (`forward_ops`). All compute the same values, gradients and statistics.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use nas_space::network::{CellLayout, FeatureShape, PrevAdjust};
use nas_space::{Cell, Combine};

use crate::drop_path::{drop_path_add, scale_examples, DropPath};
use crate::kernels::cell_eval::{Program, Put, Step, Val};
use crate::kernels::concat::{cat_channels, cat_channels_cpu, split_channels, Part};
use crate::layers::Conv2dConfig;
use crate::ops::{
    ActConvBn, ActConvBnConfig, BnConfig, CellOp, FactorizedReduction, FactorizedReductionConfig, OpForms,
};
use crate::tape::{Grads, Tape, TapeGrads, Traced, Value};

/// What a node reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The newest input.
    X,
    /// The previous input.
    Prev,
    /// A state of the cell.
    State(usize),
}

/// Where a node's result goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// State 0 (the preamble) or 1 (the adjusted previous input), whole.
    State(usize),
    /// Side `side` of block `block` (state `2 + block`), combined with the other side.
    Branch { block: usize, side: usize, combine: Combine },
    /// Part `part` of the concatenation (a projection).
    Part(usize),
}

/// One op of the lowered cell.
#[derive(Debug, Clone)]
struct Node {
    op: Arc<dyn OpForms>,
    input: Source,
    target: Target,
    /// ScheduledDropPath applies to the result (training only).
    drop_path: bool,
    /// An earlier node computes the same value (a weightless op on the same state): its
    /// result is taken instead of computing it again, as TF's graph optimiser does.
    shares: Option<usize>,
    /// A later node shares this result.
    kept: bool,
    /// A node of a later block shares this result, so the per-sample program keeps it in a
    /// buffer of its own (a node of the same block finds it in its block's home).
    own: bool,
}

/// Where a state lives in the per-sample program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    /// Its range of the output, from this channel: it enters the concatenation unprojected.
    Out(usize),
    /// An input, as it is (state 1 without adjustment).
    Input(Source),
    /// A buffer of its own.
    Tmp,
}

/// One part of the concatenation.
#[derive(Debug, Clone, Copy)]
struct ConcatPart {
    state: usize,
    /// The node that projects the state, if any.
    projection: Option<usize>,
    /// Where it starts in the output.
    channel: usize,
    width: usize,
}

/// A cell lowered once: every decision about its wiring that the interpreters need.
#[derive(Debug, Clone)]
struct Schedule {
    /// In the order they run: preamble, adjustment, the blocks' sides, projections.
    nodes: Vec<Node>,
    /// Per state.
    homes: Vec<Home>,
    /// Per state: only the concatenation reads it, unprojected, so an added block's two
    /// branches may go to the concatenation as they are, their sum never stored alone.
    concat_only: Vec<bool>,
    parts: Vec<ConcatPart>,
    /// State 1 is this input, unadjusted.
    state1: Option<Source>,
    needs_prev: bool,
}

impl Schedule {
    fn new(cell: &Cell, layout: &CellLayout, bn: BnConfig, vb: &VarBuilder) -> Result<Schedule> {
        let f = layout.states[0].channels;
        let node = |op: Arc<dyn OpForms>, input, target| Node {
            op,
            input,
            target,
            drop_path: false,
            shares: None,
            kept: false,
            own: false,
        };
        let pointwise = |c_in: usize| ActConvBnConfig { relu_input: true, conv: Conv2dConfig::square(c_in, f, 1) };
        let mut nodes = vec![node(
            Arc::new(ActConvBn::new(pointwise(layout.x.channels), bn, vb.pp("conv_1x1"))?),
            Source::X,
            Target::State(0),
        )];
        let state1 = match layout.prev_adjust {
            PrevAdjust::UseX => Some(Source::X),
            PrevAdjust::Unchanged => Some(Source::Prev),
            PrevAdjust::Conv1x1 { c_in } => {
                let op = ActConvBn::new(pointwise(c_in), bn, vb.pp("conv_prev_1x1"))?;
                nodes.push(node(Arc::new(op), Source::Prev, Target::State(1)));
                None
            }
            PrevAdjust::FactorizedReduction { c_in } => {
                let cfg = FactorizedReductionConfig { c_in, c_out: f, stride: 2, relu_input: true };
                nodes.push(node(
                    Arc::new(FactorizedReduction::new(cfg, bn, vb.clone())?),
                    Source::Prev,
                    Target::State(1),
                ));
                None
            }
        };
        let needs_prev =
            matches!(layout.prev_adjust, PrevAdjust::Unchanged) || nodes.iter().any(|n| n.input == Source::Prev);
        // The blocks' branches; a weightless op shares the result of an earlier one on the
        // same state.
        let mut pure = Vec::new();
        for (b, (block, op_layouts)) in cell.blocks.iter().zip(&layout.ops).enumerate() {
            for (side, name) in ["left", "right"].into_iter().enumerate() {
                let vb = vb.pp(format!("comb_iter_{b}_{name}"));
                let op = CellOp::new(block.ops[side], &op_layouts[side], f, bn, vb)?;
                let input = block.inputs[side];
                let key = op.pure_key().map(|key| (input, key));
                let shares = key.and_then(|key| pure.iter().find(|(k, _)| *k == key).map(|(_, at)| *at));
                match (key, shares) {
                    (Some(key), None) => pure.push((key, nodes.len())),
                    (_, Some(j)) => {
                        let earlier: &mut Node = &mut nodes[j];
                        earlier.kept = true;
                        earlier.own |= !matches!(earlier.target, Target::Branch { block, .. } if block == b);
                    }
                    (None, None) => {}
                }
                let target = Target::Branch { block: b, side, combine: block.combine };
                nodes.push(Node {
                    drop_path: op.takes_drop_path(),
                    shares,
                    ..node(Arc::new(op), Source::State(input), target)
                });
            }
        }
        // The concatenation.
        let mut parts = Vec::with_capacity(layout.concat.len());
        let mut channel = 0;
        for (p, entry) in layout.concat.iter().enumerate() {
            let projection = match entry.factorized_reduction {
                Some(stride) => {
                    let cfg = FactorizedReductionConfig {
                        c_in: entry.input.channels,
                        c_out: entry.output.channels,
                        stride,
                        relu_input: false,
                    };
                    let op = FactorizedReduction::new(
                        cfg,
                        bn,
                        vb.pp("cell_output").pp(format!("reduction_{}", entry.state)),
                    )?;
                    nodes.push(node(Arc::new(op), Source::State(entry.state), Target::Part(p)));
                    Some(nodes.len() - 1)
                }
                None => None,
            };
            let width = entry.output.channels;
            parts.push(ConcatPart { state: entry.state, projection, channel, width });
            channel += width;
        }
        // Each state's home, and whether only the concatenation reads it.
        let states = layout.states.len();
        let mut homes = vec![Home::Tmp; states];
        for part in parts.iter().rev().filter(|p| p.projection.is_none()) {
            homes[part.state] = Home::Out(part.channel);
        }
        if let (Some(input), Home::Tmp) = (state1, homes[1]) {
            homes[1] = Home::Input(input);
        }
        let read: Vec<bool> = (0..states).map(|s| nodes.iter().any(|n| n.input == Source::State(s))).collect();
        let concat_only = (0..states).map(|s| !read[s] && matches!(homes[s], Home::Out(_))).collect();
        Ok(Schedule { nodes, homes, concat_only, parts, state1, needs_prev })
    }
}

/// One cell instance with its own weights.
#[derive(Debug, Clone)]
pub struct CellModule {
    schedule: Schedule,
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
        let schedule = Schedule::new(cell, layout, bn, &vb)?;
        Ok(CellModule { schedule, drop_path, layout: layout.clone() })
    }

    /// Runs the cell on the newest input `x` and the previous one `prev`.
    ///
    /// # Shapes
    /// - `x`, `prev`: as the cell's `CellLayout` records them
    /// - returns: `(batch, layout.output.channels, layout.output.size, layout.output.size)`
    pub fn forward_t(&self, x: &Tensor, prev: Option<&Tensor>, train: bool) -> Result<Tensor> {
        if self.schedule.needs_prev && prev.is_none() {
            candle_core::bail!("this cell was built for a previous input, but none was given")
        }
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

    /// Walks the schedule over values of `run` (candle tensors or values on a tape): the
    /// concatenation's parts, a part being a state or an added block's two branches.
    fn walk<R: Run>(&self, run: &mut R, x: R::V, prev: Option<R::V>, train: bool) -> Result<Vec<State<R::V>>> {
        let schedule = &self.schedule;
        let mut states: Vec<Option<State<R::V>>> = vec![None; schedule.homes.len()];
        states[1] = schedule.state1.map(|input| match input {
            Source::Prev => State::One(prev.clone().expect("checked by forward_t")),
            _ => State::One(x.clone()),
        });
        let mut parts: Vec<Option<State<R::V>>> = vec![None; schedule.parts.len()];
        let mut kept: Vec<Option<R::V>> = vec![None; schedule.nodes.len()];
        let mut first_side = None;
        for (i, node) in schedule.nodes.iter().enumerate() {
            let ys = match node.shares {
                Some(j) => kept[j].clone().expect("a shared result is kept"),
                None => {
                    let xs = match node.input {
                        Source::X => &x,
                        Source::Prev => prev.as_ref().expect("checked by forward_t"),
                        Source::State(s) => match &states[s] {
                            Some(State::One(v)) => v,
                            _ => candle_core::bail!("cell: state {s} is read before it is one value"),
                        },
                    };
                    run.op(&*node.op, xs)?
                }
            };
            if node.kept {
                kept[i] = Some(ys.clone());
            }
            match node.target {
                Target::State(s) => states[s] = Some(State::One(ys)),
                Target::Part(p) => parts[p] = Some(State::One(ys)),
                Target::Branch { block, side, combine } => {
                    let scale = match &self.drop_path {
                        Some(dp) if train && node.drop_path => dp.scales(R::batch(&ys)?),
                        _ => None,
                    };
                    if side == 0 {
                        first_side = Some((ys, scale));
                        continue;
                    }
                    let (a, sa) = first_side.take().expect("a block's left side runs first");
                    let state = match combine {
                        Combine::Add if schedule.concat_only[2 + block] && sa.is_none() && scale.is_none() => {
                            State::Sum(a, ys)
                        }
                        Combine::Add => State::One(run.add([a, ys], [sa, scale])?),
                        Combine::Concat => State::One(run.cat([a, ys], [sa, scale])?),
                    };
                    states[2 + block] = Some(state);
                }
            }
        }
        schedule
            .parts
            .iter()
            .zip(parts)
            .map(|(part, projected)| match projected.or_else(|| states[part.state].clone()) {
                Some(state) => Ok(state),
                None => candle_core::bail!("cell: state {} is concatenated but never computed", part.state),
            })
            .collect()
    }

    /// [`forward_t`](Self::forward_t) as candle ops, each a node of candle's graph.
    fn forward_ops(&self, x: &Tensor, prev: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let parts = self.walk(&mut CandleRun { train }, x.clone(), prev.cloned(), train)?;
        let out = cat_channels(&parts.into_iter().map(State::into_part).collect::<Vec<_>>())?;
        Ok(if crate::grad_enabled() { out } else { out.detach() })
    }

    /// Training with gradients on the CPU: the whole cell as one node of candle's graph.
    /// Every op runs its training forward on detached tensors, recorded on a [`Tape`]; one
    /// custom op on `(x, prev, packed weights)` concatenates the states in its forward and
    /// runs the tape in reverse in its backward (see `crate::tape` for what this saves).
    /// The same values, moving statistics and drop-path draws as [`forward_ops`](Self::forward_ops).
    fn forward_taped(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
        let mut run = TapeRun { tape: Tape::new() };
        let xs = run.tape.input(x);
        let prev_in = prev.map(|p| run.tape.input(p));
        let parts = self.walk(&mut run, xs.clone(), prev_in.clone(), true)?;
        let tape = run.tape;
        let inputs = std::iter::once(&xs).chain(&prev_in).map(|t| t.value).collect();
        let packed = tape.weights().iter().map(Tensor::flatten_all).collect::<Result<Vec<_>>>()?;
        let packed = Tensor::cat(&packed, 0)?;
        let op = CellTrainOp { tape, parts, inputs };
        match prev {
            Some(p) => x.apply_op3(p, &packed, op),
            None => x.apply_op2(&packed, op),
        }
    }

    /// The cell in inference as a per-sample program (`kernels::cell_eval`), or `None`
    /// when one of its ops has no per-sample steps (dense convs other than 1×1) or `x`
    /// is not the shape its `CellLayout` records.
    ///
    /// Each state lives in its home (the schedule's); an added block's first branch writes
    /// it and the second adds to it (a 1×1 conv or a separable conv by its gemm
    /// accumulating into it); a branch that shares its block's first branch's result
    /// doubles it.
    pub(crate) fn eval_program(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<Option<Program>> {
        let layout = &self.layout;
        let square = |f: FeatureShape| (f.channels, f.size, f.size);
        let sample = |t: &Tensor| t.dims4().map(|(_, c, h, w)| (c, h, w));
        // Every shape is the layout's (`CellLayout::new` decides them); inputs of other
        // sizes run as candle ops.
        if sample(x)? != square(layout.x) {
            return Ok(None);
        }
        let schedule = &self.schedule;
        let mut program = Program::new(square(layout.x), prev.map(sample).transpose()?, square(layout.output));
        let out = program.out();
        let input = |program: &Program, source: Source| match source {
            Source::Prev => program.prev().expect("checked by forward_t"),
            _ => program.x(),
        };
        let homes: Vec<Val> = schedule
            .homes
            .iter()
            .zip(&layout.states)
            .map(|(home, &shape)| match *home {
                Home::Out(channel) => out.channels(channel, shape.channels),
                Home::Input(source) => input(&program, source),
                Home::Tmp => program.tmp(square(shape)),
            })
            .collect();
        if let Some(source) = schedule.state1 {
            let src = input(&program, source);
            if src != homes[1] {
                program.push(Step::Copy { src, dst: homes[1], put: Put::Write });
            }
        }
        // Where each node's result can be read alone, for the nodes that share it.
        let mut results: Vec<Option<Val>> = vec![None; schedule.nodes.len()];
        for (i, node) in schedule.nodes.iter().enumerate() {
            let src = match node.input {
                Source::State(s) => homes[s],
                source => input(&program, source),
            };
            let (dst, put) = match node.target {
                Target::State(s) => (homes[s], Put::Write),
                Target::Part(p) => (out.channels(schedule.parts[p].channel, schedule.parts[p].width), Put::Write),
                Target::Branch { block, side, combine: Combine::Add } => {
                    (homes[2 + block], if side == 0 { Put::Write } else { Put::Add })
                }
                Target::Branch { block, side, combine: Combine::Concat } => {
                    // Every op makes F channels (state 0's width).
                    let (dst, f) = (homes[2 + block], layout.states[0].channels);
                    (if side == 0 { dst.channels(0, f) } else { dst.channels(f, dst.c - f) }, Put::Write)
                }
            };
            match node.shares.map(|j| results[j].expect("a shared result has a place")) {
                Some(src) if src == dst && put == Put::Add => program.push(Step::Double { dst }),
                Some(src) => program.push(Step::Copy { src, dst, put }),
                None if node.own => {
                    let own = program.tmp((dst.c, dst.h, dst.w));
                    if !node.op.eval_steps(&mut program, src, own, Put::Write)? {
                        return Ok(None);
                    }
                    program.push(Step::Copy { src: own, dst, put });
                    results[i] = Some(own);
                }
                None => {
                    if !node.op.eval_steps(&mut program, src, dst, put)? {
                        return Ok(None);
                    }
                    results[i] = (put == Put::Write).then_some(dst);
                }
            }
        }
        // The concatenation's unprojected parts that are not already in place.
        for part in schedule.parts.iter().filter(|p| p.projection.is_none()) {
            let dst = out.channels(part.channel, part.width);
            if homes[part.state] != dst {
                program.push(Step::Copy { src: homes[part.state], dst, put: Put::Write });
            }
        }
        Ok(Some(program))
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

/// A state during a walk: a value, or an added block's two branches whose sum only enters
/// the concatenation (never stored on its own).
#[derive(Debug, Clone)]
enum State<V> {
    One(V),
    Sum(V, V),
}

impl State<Tensor> {
    fn into_part(self) -> Part {
        match self {
            State::One(t) => Part::Copy(t),
            State::Sum(a, b) => Part::Sum(a, b),
        }
    }
}

impl State<Traced> {
    fn part(&self) -> Part {
        match self {
            State::One(t) => Part::Copy(t.tensor.clone()),
            State::Sum(a, b) => Part::Sum(a.tensor.clone(), b.tensor.clone()),
        }
    }
}

/// Drop-path scales per example of each branch (`None`: kept whole).
type Scales = [Option<Vec<f64>>; 2];

/// What a walk of the schedule computes with: candle tensors or values on a tape.
trait Run {
    type V: Clone;
    fn op(&mut self, op: &dyn OpForms, xs: &Self::V) -> Result<Self::V>;
    fn batch(v: &Self::V) -> Result<usize>;
    /// `a · sa + b · sb`, the drop-path scales folded into the add.
    fn add(&mut self, branches: [Self::V; 2], scales: Scales) -> Result<Self::V>;
    /// The branches, scaled, concatenated along the channels.
    fn cat(&mut self, branches: [Self::V; 2], scales: Scales) -> Result<Self::V>;
}

fn scaled(t: &Tensor, s: &Option<Vec<f64>>) -> Result<Tensor> {
    s.as_deref().map_or_else(|| Ok(t.clone()), |s| scale_examples(t, s))
}

struct CandleRun {
    train: bool,
}

impl Run for CandleRun {
    type V = Tensor;

    fn op(&mut self, op: &dyn OpForms, xs: &Tensor) -> Result<Tensor> {
        op.forward_t(xs, self.train)
    }

    fn batch(v: &Tensor) -> Result<usize> {
        v.dim(0)
    }

    fn add(&mut self, [a, b]: [Tensor; 2], [sa, sb]: Scales) -> Result<Tensor> {
        drop_path_add(&a, sa.as_deref(), &b, sb.as_deref())
    }

    fn cat(&mut self, [a, b]: [Tensor; 2], [sa, sb]: Scales) -> Result<Tensor> {
        Tensor::cat(&[&scaled(&a, &sa)?, &scaled(&b, &sb)?], 1)
    }
}

struct TapeRun {
    tape: Tape,
}

impl Run for TapeRun {
    type V = Traced;

    fn op(&mut self, op: &dyn OpForms, xs: &Traced) -> Result<Traced> {
        op.trace(&mut self.tape, xs)
    }

    fn batch(v: &Traced) -> Result<usize> {
        v.tensor.dim(0)
    }

    fn add(&mut self, [a, b]: [Traced; 2], [sa, sb]: Scales) -> Result<Traced> {
        let ys = drop_path_add(&a.tensor, sa.as_deref(), &b.tensor, sb.as_deref())?;
        Ok(self.tape.record(&[&a, &b], &[], ys, move |grad| {
            Ok(Grads { inputs: vec![Some(scaled(grad, &sa)?), Some(scaled(grad, &sb)?)], weights: vec![] })
        }))
    }

    fn cat(&mut self, [a, b]: [Traced; 2], [sa, sb]: Scales) -> Result<Traced> {
        let ys = cat_channels(&[Part::Copy(scaled(&a.tensor, &sa)?), Part::Copy(scaled(&b.tensor, &sb)?)])?;
        let widths = [a.tensor.dim(1)?, b.tensor.dim(1)?];
        Ok(self.tape.record(&[&a, &b], &[], ys, move |grad| {
            let [ga, gb] = <[Tensor; 2]>::try_from(split_channels(grad, &widths)?).expect("two parts");
            Ok(Grads { inputs: vec![Some(scaled(&ga, &sa)?), Some(scaled(&gb, &sb)?)], weights: vec![] })
        }))
    }
}

const NAME: &str = "cell-train";

/// The recorded cell: its tape, the parts of its concatenation, and the tape values of its
/// inputs (`x`, then `prev` when given).
struct CellTrainOp {
    tape: Tape,
    parts: Vec<State<Traced>>,
    inputs: Vec<Value>,
}

impl CellTrainOp {
    fn forward(&self) -> Result<(CpuStorage, Shape)> {
        cat_channels_cpu(&self.parts.iter().map(State::part).collect::<Vec<_>>())
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
                State::One(t) | State::Sum(t, _) => t.tensor.dim(1),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut seeds = Vec::with_capacity(self.parts.len() + 5);
        for (part, g) in self.parts.iter().zip(split_channels(grad, &widths)?) {
            match part {
                State::One(t) => seeds.push((t.value, g)),
                State::Sum(a, b) => seeds.extend([(a.value, g.clone()), (b.value, g)]),
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
