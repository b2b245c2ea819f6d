//! Inference of a whole cell one sample at a time, on the CPU.
//!
//! Run op by op over the batch, every state of a cell is written to memory by one op and
//! read back by the ops that take it (NASNet-A Mobile's 28×28 stage: 4.4 MB per state at
//! batch 32, twice the 2 MiB L2 of a core), and the cell's output is assembled by one more
//! pass, the concatenation. A [`Program`] runs every step of a cell on one sample on one
//! thread, in parallel over the samples: a sample's states stay in that core's cache, and
//! each part of the concatenation is written in place, in its channel range of the output.
//!
//! A program is a list of [`Step`]s over per-sample values ([`Val`]: where a value lives,
//! its first channel there, its shape). Each step writes its destination or adds to it. The
//! 1×1 convs carry their eval batch norm as `(scale, shift)`, folded into the weight rows
//! when the program is run, as `conv1x1::conv1x1_affine` does; the depthwise convs and
//! pools are `window::SampleWindow`s and the 1×1 convs `conv1x1::gemm_rows`, the kernels
//! of the batch-wide ops. No step records a backward: `cell::CellModule` runs a program
//! only in inference without gradients, and `separable::separable_stack` (a program of
//! one step) likewise.

use candle_core::{bail, DType, Device, Result, Storage, Tensor, WithDType};
use std::sync::Mutex;

use rayon::prelude::*;

use super::conv1x1::{gemm_rows, relu, shift_rows};
use super::depthwise::DepthwiseGeometry;
use super::pool::{same_sample_window, PoolKind};
use super::separable::SeparableHalf;
use super::simd::{Float, Isa};
use super::window::SampleWindow;
use super::{scratch_buffer, Output, Padding2d};

const NAME: &str = "cell-eval";

/// Where a per-sample value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    /// The sample of the program's first input.
    X,
    /// The sample of the program's second input.
    Prev,
    /// The sample's output.
    Out,
    /// A per-thread buffer of the program ([`Program::tmp`]).
    Tmp(usize),
}

/// A `(c, h, w)` value of one sample: channels `channel..channel + c` of the buffer at
/// `loc`, whose planes are `h × w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Val {
    pub(crate) loc: Loc,
    pub(crate) channel: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

impl Val {
    /// The whole of a `(c, h, w)` buffer at `loc`.
    pub(crate) fn at(loc: Loc, (c, h, w): (usize, usize, usize)) -> Val {
        Val { loc, channel: 0, c, h, w }
    }

    /// Channels `channel..channel + c` of this value.
    pub(crate) fn channels(self, channel: usize, c: usize) -> Val {
        assert!(channel + c <= self.c, "{NAME}: channels {channel}..{} of a {}-channel value", channel + c, self.c);
        Val { channel: self.channel + channel, c, ..self }
    }

    fn shape(&self) -> (usize, usize, usize) {
        (self.c, self.h, self.w)
    }

    fn range(&self) -> std::ops::Range<usize> {
        let plane = self.h * self.w;
        self.channel * plane..(self.channel + self.c) * plane
    }
}

/// A 1×1 conv followed by an eval batch norm: `scale · (weight · x) + shift` per output
/// channel.
#[derive(Debug, Clone)]
pub(crate) struct Affine1x1 {
    /// `(c_out, c_in, 1, 1)` or `(c_out, c_in)`.
    pub(crate) weight: Tensor,
    /// `(c_out)`.
    pub(crate) scale: Tensor,
    /// `(c_out)`.
    pub(crate) shift: Tensor,
}

/// How a step puts its result into its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// Overwrites it.
    Write,
    /// Adds to it.
    Add,
}

/// One step of a [`Program`]: it writes `dst` or adds to it, as `put` says.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// `dst = conv(relu?(src))`: a 1×1 conv with its batch norm.
    Pointwise { src: Val, relu: bool, conv: Affine1x1, dst: Val, put: Put },
    /// The halves in order (their batch norms in eval mode); only the last may add.
    Separable { src: Val, halves: Vec<SeparableHalf>, dst: Val, put: Put },
    /// A SAME `kernel × kernel` pooling at `stride`.
    Pool { src: Val, kind: PoolKind, kernel: usize, stride: usize, dst: Val, put: Put },
    /// `dst = relu?(src[:, offset::2, offset::2])`, zero past the edge (`subsample::subsample2`).
    Subsample { src: Val, offset: usize, relu: bool, dst: Val },
    /// `dst = src`.
    Copy { src: Val, dst: Val, put: Put },
    /// `dst = dst + dst`.
    Double { dst: Val },
}

/// The steps of a cell, with the per-sample shapes of its inputs, its output and its
/// temporary buffers.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    x: (usize, usize, usize),
    prev: Option<(usize, usize, usize)>,
    out: (usize, usize, usize),
    tmps: Vec<(usize, usize, usize)>,
    steps: Vec<Step>,
}

impl Program {
    /// An empty program from inputs of per-sample shapes `x` and `prev` to an output `out`.
    pub(crate) fn new(
        x: (usize, usize, usize),
        prev: Option<(usize, usize, usize)>,
        out: (usize, usize, usize),
    ) -> Program {
        Program { x, prev, out, tmps: Vec::new(), steps: Vec::new() }
    }

    /// The first input, whole.
    pub(crate) fn x(&self) -> Val {
        Val::at(Loc::X, self.x)
    }

    /// The second input, whole.
    pub(crate) fn prev(&self) -> Option<Val> {
        self.prev.map(|shape| Val::at(Loc::Prev, shape))
    }

    /// The output, whole.
    pub(crate) fn out(&self) -> Val {
        Val::at(Loc::Out, self.out)
    }

    /// A new temporary buffer of shape `(c, h, w)` per sample.
    pub(crate) fn tmp(&mut self, shape: (usize, usize, usize)) -> Val {
        self.tmps.push(shape);
        Val::at(Loc::Tmp(self.tmps.len() - 1), shape)
    }

    pub(crate) fn push(&mut self, step: Step) {
        self.steps.push(step);
    }

    /// Runs the program on every sample of `x` `(n, x…)` and `prev` `(n, prev…)`, in
    /// parallel over samples.
    ///
    /// # Shapes
    /// - returns: `(n, out…)`
    pub(crate) fn run(&self, x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let dims = |shape: (usize, usize, usize)| [n, shape.0, shape.1, shape.2];
        check_input("x", x, &dims(self.x), x.dtype())?;
        match (prev, self.prev) {
            (Some(p), Some(shape)) => check_input("prev", p, &dims(shape), x.dtype())?,
            (None, None) => {}
            (Some(_), None) => bail!("{NAME}: a previous input was given to a program without one"),
            (None, Some(_)) => bail!("{NAME}: the program reads a previous input, but none was given"),
        }
        let x = x.contiguous()?;
        let prev = prev.map(Tensor::contiguous).transpose()?;
        let (xs, xl) = x.storage_and_layout();
        let prev_storage = prev.as_ref().map(|p| p.storage_and_layout());
        let Storage::Cpu(xs) = &*xs else { bail!("{NAME}: expected tensors on the CPU") };
        let prev_cpu = match &prev_storage {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => Some((s, l.start_offset())),
                _ => bail!("{NAME}: expected tensors on the CPU"),
            },
            None => None,
        };
        let out_dims = dims(self.out);
        macro_rules! typed {
            ($t:ty) => {{
                let x = &xs.as_slice::<$t>()?[xl.start_offset()..];
                let prev = match prev_cpu {
                    Some((s, start)) => Some(&s.as_slice::<$t>()?[start..]),
                    None => None,
                };
                let out = self.compile::<$t>()?.run(x, prev, n);
                Tensor::from_vec(out, out_dims.to_vec(), &Device::Cpu)
            }};
        }
        match x.dtype() {
            DType::F32 => typed!(f32),
            DType::F64 => typed!(f64),
            dtype => bail!("{NAME}: unsupported dtype {dtype:?}, expected f32 or f64"),
        }
    }

    /// The steps with their weights in `T`, checked against the values they read and
    /// write.
    fn compile<T: Float>(&self) -> Result<Compiled<T>> {
        let mut scratches = 0;
        let mut window = |w: SampleWindow<T>| {
            scratches += 1;
            (w, scratches - 1)
        };
        let mut mid = 0;
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let at = |e: candle_core::Error| candle_core::Error::Msg(format!("{NAME}: step {i}: {e}"));
                let exec = match *step {
                    Step::Pointwise { src, relu, ref conv, dst, put } => {
                        self.check_pair(src, dst, (src.c, dst.c), 1).map_err(at)?;
                        if relu {
                            mid = mid.max(src.c * src.h * src.w);
                        }
                        Exec::Pointwise { src, relu, conv: fold(conv, src.c, dst.c).map_err(at)?, dst, put }
                    }
                    Step::Separable { src, ref halves, dst, put } => {
                        self.check_vals(src, dst).map_err(at)?;
                        let mut shape = src.shape();
                        let mut compiled = Vec::with_capacity(halves.len());
                        for (j, half) in halves.iter().enumerate() {
                            let at = |e: candle_core::Error| at(candle_core::Error::Msg(format!("half {j}: {e}")));
                            let (c, h, w) = shape;
                            let k = half.depthwise.dims();
                            let (kh, kw) = (k.get(2).copied().unwrap_or(1), k.get(3).copied().unwrap_or(1));
                            let pad = Padding2d::same(h, w, kh, kw, half.stride.max(1), half.dilation.max(1));
                            let geom = DepthwiseGeometry::new(NAME, &[1, c, h, w], k, half.stride, half.dilation, pad)
                                .map_err(at)?;
                            check_dtype("depthwise", &half.depthwise, T::DTYPE).map_err(at)?;
                            let c_out = half.c_out();
                            half.bn.check(c_out, T::DTYPE).map_err(at)?;
                            let (scale, shift) = half.bn.eval_affine().map_err(at)?;
                            let pointwise = Affine1x1 { weight: half.pointwise.clone(), scale, shift };
                            let conv = fold(&pointwise, c, c_out).map_err(at)?;
                            if put == Put::Add && half.relu_output && j + 1 == halves.len() {
                                return Err(at(candle_core::Error::Msg(
                                    "a half that adds to its destination cannot end in a ReLU".into(),
                                )));
                            }
                            let (depthwise, scratch) = window(SampleWindow::depthwise(&geom, values(&half.depthwise)?));
                            mid = mid.max(depthwise.out_len()).max(c_out * geom.ho * geom.wo);
                            compiled.push(ExecHalf {
                                depthwise,
                                scratch,
                                relu_in: half.relu_input,
                                conv,
                                relu_out: half.relu_output,
                            });
                            shape = (c_out, geom.ho, geom.wo);
                        }
                        if halves.is_empty() || shape != dst.shape() {
                            bail!(
                                "{NAME}: step {i}: the halves make {shape:?} from {:?}, the destination is {:?}",
                                src.shape(),
                                dst.shape()
                            )
                        }
                        Exec::Separable { src, halves: compiled, dst, put }
                    }
                    Step::Pool { src, kind, kernel, stride, dst, put } => {
                        let pool = same_sample_window::<T>(kind, src.shape(), kernel, stride).map_err(at)?;
                        self.check_pair(src, dst, (src.c, src.c), stride).map_err(at)?;
                        if put == Put::Add {
                            mid = mid.max(pool.out_len());
                        }
                        let (pool, scratch) = window(pool);
                        Exec::Window { src, window: Box::new(pool), scratch, dst, put }
                    }
                    Step::Subsample { src, offset, relu, dst } => {
                        if offset > 1 {
                            bail!("{NAME}: step {i}: subsample offset {offset} is not 0 or 1")
                        }
                        self.check_pair(src, dst, (src.c, src.c), 2).map_err(at)?;
                        Exec::Subsample { src, offset, relu, dst }
                    }
                    Step::Copy { src, dst, put } => {
                        self.check_pair(src, dst, (src.c, src.c), 1).map_err(at)?;
                        Exec::Copy { src, dst, put }
                    }
                    Step::Double { dst } => {
                        // `dst` inside its buffer and writable (an empty source overlaps nothing).
                        self.check_vals(dst, dst.channels(0, 0)).map_err(at)?;
                        Exec::Double { dst }
                    }
                };
                Ok(exec)
            })
            .collect::<Result<Vec<_>>>()?;
        let tmps = self.tmps.iter().map(|&(c, h, w)| c * h * w).collect();
        Ok(Compiled { steps, tmps, mid, x: self.x, prev: self.prev, out: self.out })
    }

    fn buffer_shape(&self, loc: Loc) -> Option<(usize, usize, usize)> {
        match loc {
            Loc::X => Some(self.x),
            Loc::Prev => self.prev,
            Loc::Out => Some(self.out),
            Loc::Tmp(i) => self.tmps.get(i).copied(),
        }
    }

    /// `val` lies inside its buffer.
    fn check_val(&self, val: Val) -> Result<()> {
        match self.buffer_shape(val.loc) {
            Some((c, h, w)) if (h, w) == (val.h, val.w) && val.channel + val.c <= c => Ok(()),
            Some(shape) => bail!("{val:?} does not lie inside its buffer of shape {shape:?}"),
            None => bail!("{val:?}: no such buffer"),
        }
    }

    /// `src` and `dst` lie in their buffers, `dst` is writable and the two do not overlap.
    fn check_vals(&self, src: Val, dst: Val) -> Result<()> {
        self.check_val(src)?;
        self.check_val(dst)?;
        if !matches!(dst.loc, Loc::Out | Loc::Tmp(_)) {
            bail!("cannot write an input")
        }
        let (s, d) = (src.range(), dst.range());
        if src.loc == dst.loc && s.start < d.end && d.start < s.end {
            bail!("{src:?} and {dst:?} overlap")
        }
        Ok(())
    }

    /// [`check_vals`](Self::check_vals), and `src` is `(c_in, h, w)` and `dst`
    /// `(c_out, ceil(h / stride), ceil(w / stride))`.
    fn check_pair(&self, src: Val, dst: Val, (c_in, c_out): (usize, usize), stride: usize) -> Result<()> {
        self.check_vals(src, dst)?;
        let expected = (c_out, src.h.div_ceil(stride), src.w.div_ceil(stride));
        if src.c != c_in || dst.shape() != expected {
            bail!("reads {:?} and writes {:?}; expected ({c_in}, …) to {expected:?}", src.shape(), dst.shape())
        }
        Ok(())
    }
}

fn check_input(what: &str, t: &Tensor, dims: &[usize], dtype: DType) -> Result<()> {
    if t.dims() != dims {
        bail!("{NAME}: expected {what} of shape {dims:?}, got {:?}", t.dims())
    }
    if t.dtype() != dtype {
        bail!("{NAME}: {what} is {:?}, the first input {dtype:?}", t.dtype())
    }
    if !t.device().is_cpu() {
        bail!("{NAME}: expected {what} on the CPU")
    }
    Ok(())
}

fn check_dtype(what: &str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        bail!("the {what} weight is {:?}, the input {dtype:?}", t.dtype())
    }
    Ok(())
}

fn values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// The weight `(c_out, c_in)` with each row scaled, and the shift.
fn fold<T: Float>(conv: &Affine1x1, c_in: usize, c_out: usize) -> Result<Folded<T>> {
    let dims = conv.weight.dims();
    if dims.len() < 2 || dims[..2] != [c_out, c_in] || dims[2..].iter().any(|&d| d != 1) {
        bail!("expected a 1×1 weight of shape ({c_out}, {c_in}, 1, 1), got {dims:?}")
    }
    for (what, t) in [("scale", &conv.scale), ("shift", &conv.shift)] {
        if t.dims() != [c_out] {
            bail!("expected a {what} of shape ({c_out}), got {:?}", t.dims())
        }
    }
    for (what, t) in [("pointwise", &conv.weight), ("scale", &conv.scale), ("shift", &conv.shift)] {
        check_dtype(what, t, T::DTYPE)?;
    }
    let weight = conv.weight.reshape((c_out, c_in))?.broadcast_mul(&conv.scale.reshape((c_out, 1))?)?;
    Ok(Folded { weight: values(&weight)?, shift: values(&conv.shift)?, c_in, c_out })
}

#[derive(Debug)]
struct Folded<T> {
    /// `(c_out, c_in)`, each row scaled.
    weight: Vec<T>,
    shift: Vec<T>,
    c_in: usize,
    c_out: usize,
}

impl<T: Float> Folded<T> {
    /// `dst (+)= weight · src + shift`, then the ReLU with `relu` (never when adding).
    fn apply(&self, src: &[T], dst: &mut [T], put: Put, relu: bool) {
        let hw = dst.len() / self.c_out;
        gemm_rows(dst, &self.weight, src, (self.c_out, hw, self.c_in), put == Put::Add);
        shift_rows(dst, hw, &self.shift, relu);
    }
}

#[derive(Debug)]
struct ExecHalf<T> {
    depthwise: SampleWindow<T>,
    scratch: usize,
    relu_in: bool,
    conv: Folded<T>,
    relu_out: bool,
}

#[derive(Debug)]
enum Exec<T> {
    Pointwise { src: Val, relu: bool, conv: Folded<T>, dst: Val, put: Put },
    Separable { src: Val, halves: Vec<ExecHalf<T>>, dst: Val, put: Put },
    Window { src: Val, window: Box<SampleWindow<T>>, scratch: usize, dst: Val, put: Put },
    Subsample { src: Val, offset: usize, relu: bool, dst: Val },
    Copy { src: Val, dst: Val, put: Put },
    Double { dst: Val },
}

/// A program with its weights in `T`.
struct Compiled<T> {
    steps: Vec<Exec<T>>,
    /// Elements of each temporary buffer.
    tmps: Vec<usize>,
    /// Elements of each of the two intermediate buffers.
    mid: usize,
    x: (usize, usize, usize),
    prev: Option<(usize, usize, usize)>,
    out: (usize, usize, usize),
}

/// One thread's working memory.
struct Arena<T> {
    tmps: Vec<Vec<T>>,
    scratches: Vec<Vec<T>>,
    mid: [Vec<T>; 2],
}

/// The buffers of one sample.
struct Buffers<'a, T> {
    x: &'a [T],
    prev: &'a [T],
    out: &'a mut [T],
    tmps: &'a mut [Vec<T>],
}

impl<T> Buffers<'_, T> {
    /// `src` to read and `dst` to write (checked by `Program::compile`: `dst` is never an
    /// input, and two values in one buffer do not overlap).
    fn src_dst(&mut self, src: Val, dst: Val) -> (&[T], &mut [T]) {
        let (s, d) = (src.range(), dst.range());
        let Buffers { x, prev, out, tmps } = self;
        match (src.loc, dst.loc) {
            (_, Loc::X | Loc::Prev) => unreachable!("compile checks that inputs are never written"),
            (Loc::X, _) | (Loc::Prev, _) => {
                let read = if src.loc == Loc::X { &x[s] } else { &prev[s] };
                let write = match dst.loc {
                    Loc::Out => &mut out[d],
                    Loc::Tmp(j) => &mut tmps[j][d],
                    Loc::X | Loc::Prev => unreachable!(),
                };
                (read, write)
            }
            (Loc::Out, Loc::Out) => disjoint(out, s, d),
            (Loc::Out, Loc::Tmp(j)) => (&out[s], &mut tmps[j][d]),
            (Loc::Tmp(i), Loc::Out) => (&tmps[i][s], &mut out[d]),
            (Loc::Tmp(i), Loc::Tmp(j)) if i == j => disjoint(&mut tmps[i], s, d),
            (Loc::Tmp(i), Loc::Tmp(j)) => {
                let (low, high) = tmps.split_at_mut(i.max(j));
                if i < j {
                    (&low[i][s], &mut high[0][d])
                } else {
                    (&high[0][s], &mut low[j][d])
                }
            }
        }
    }

    fn get_mut(&mut self, val: Val) -> &mut [T] {
        match val.loc {
            Loc::Out => &mut self.out[val.range()],
            Loc::Tmp(j) => &mut self.tmps[j][val.range()],
            Loc::X | Loc::Prev => unreachable!("compile checks that inputs are never written"),
        }
    }
}

/// `buffer[s]` to read and `buffer[d]` to write, two disjoint ranges.
fn disjoint<T>(buffer: &mut [T], s: std::ops::Range<usize>, d: std::ops::Range<usize>) -> (&[T], &mut [T]) {
    if s.end <= d.start {
        let (head, tail) = buffer.split_at_mut(d.start);
        (&head[s], &mut tail[..d.len()])
    } else {
        assert!(d.end <= s.start, "{NAME}: ranges {s:?} and {d:?} overlap");
        let (head, tail) = buffer.split_at_mut(s.start);
        (&tail[..s.len()], &mut head[d])
    }
}

/// `dst = src` or `dst += src`.
fn put<T: Float>(src: &[T], dst: &mut [T], how: Put) {
    if how == Put::Add {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

impl<T: Float> Compiled<T> {
    fn run(&self, x: &[T], prev: Option<&[T]>, n: usize) -> Vec<T> {
        let size = |(c, h, w): (usize, usize, usize)| c * h * w;
        let (per_x, per_prev, per_out) = (size(self.x), self.prev.map_or(0, size), size(self.out));
        if n * per_out == 0 {
            return vec![T::ZERO; n * per_out];
        }
        let isa = Isa::detect();
        let mut out = Output::<T>::new(n * per_out);
        // Every step writes the part of a buffer it reads later in full first (a home is
        // written by its block's first op, an intermediate by the kernel before the next
        // reads it); in debug builds the buffers start as NaN, so a read before a write shows
        // in the tests' comparisons. The window scratches hold their padding, written here.
        // One arena per pool thread, made (and filled) once per run: rayon's `for_each_init`
        // makes one per split of the work, several per thread.
        let arena_new = || Arena {
            tmps: self.tmps.iter().map(|&len| scratch_buffer(len)).collect(),
            scratches: self.scratch_buffers(),
            mid: [scratch_buffer(self.mid), scratch_buffer(self.mid)],
        };
        let threads = rayon::current_num_threads().max(1);
        let arenas: Vec<Mutex<Option<Arena<T>>>> = (0..threads).map(|_| Mutex::new(None)).collect();
        out.par_chunks_mut(per_out).enumerate().for_each(|(i, out)| {
            let prev = prev.map_or(&[][..], |p| &p[i * per_prev..(i + 1) * per_prev]);
            let slot = &arenas[rayon::current_thread_index().unwrap_or(0) % threads];
            let mut arena = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Arena { tmps, scratches, mid } = arena.get_or_insert_with(arena_new);
            let mut bufs = Buffers { x: &x[i * per_x..(i + 1) * per_x], prev, out, tmps };
            for step in &self.steps {
                self.step(isa, step, &mut bufs, scratches, mid);
            }
        });
        out.into_vec()
    }

    fn scratch_buffers(&self) -> Vec<Vec<T>> {
        let mut scratches = Vec::new();
        for step in &self.steps {
            match step {
                Exec::Separable { halves, .. } => scratches.extend(halves.iter().map(|h| h.depthwise.scratch())),
                Exec::Window { window, .. } => scratches.push(window.scratch()),
                _ => {}
            }
        }
        scratches
    }

    fn step(
        &self,
        isa: Isa,
        step: &Exec<T>,
        bufs: &mut Buffers<'_, T>,
        scratches: &mut [Vec<T>],
        mid: &mut [Vec<T>; 2],
    ) {
        match step {
            Exec::Pointwise { src, relu: relu_in, conv, dst, put: how } => {
                let (s, d) = bufs.src_dst(*src, *dst);
                let s = if *relu_in {
                    let r = &mut mid[0][..s.len()];
                    for (r, &v) in r.iter_mut().zip(s) {
                        *r = relu(v);
                    }
                    &*r
                } else {
                    s
                };
                conv.apply(s, d, *how, false);
            }
            Exec::Separable { src, halves, dst, put: how } => {
                let (s, d) = bufs.src_dst(*src, *dst);
                let [a, b] = mid;
                // The input of half `j` is `s` for the first, then `b`; each depthwise
                // output goes to `a`.
                for (j, half) in halves.iter().enumerate() {
                    let ys = &mut a[..half.depthwise.out_len()];
                    let input: &[T] = if j == 0 { s } else { &b[..half.depthwise.in_len()] };
                    half.depthwise.run(isa, input, half.relu_in, ys, &mut scratches[half.scratch]);
                    if j + 1 == halves.len() {
                        half.conv.apply(ys, d, *how, half.relu_out);
                    } else {
                        let hw = ys.len() / half.conv.c_in;
                        half.conv.apply(ys, &mut b[..half.conv.c_out * hw], Put::Write, half.relu_out);
                    }
                }
            }
            Exec::Window { src, window, scratch, dst, put: how } => {
                let (s, d) = bufs.src_dst(*src, *dst);
                if *how == Put::Add {
                    let pooled = &mut mid[0][..d.len()];
                    window.run(isa, s, false, pooled, &mut scratches[*scratch]);
                    put(pooled, d, Put::Add);
                } else {
                    window.run(isa, s, false, d, &mut scratches[*scratch]);
                }
            }
            Exec::Subsample { src, offset, relu: r, dst } => {
                let (s, d) = bufs.src_dst(*src, *dst);
                subsample_sample(s, d, (src.h, src.w), (dst.h, dst.w), *offset, *r);
            }
            Exec::Copy { src, dst, put: how } => {
                let (s, d) = bufs.src_dst(*src, *dst);
                put(s, d, *how);
            }
            Exec::Double { dst } => {
                for v in bufs.get_mut(*dst) {
                    *v = *v + *v;
                }
            }
        }
    }
}

/// `dst[ch, i, j] = relu?(src[ch, 2i + offset, 2j + offset])`, zero past the edge.
fn subsample_sample<T: Float>(
    src: &[T],
    dst: &mut [T],
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    offset: usize,
    relu_on: bool,
) {
    let act = |v: T| if relu_on { relu(v) } else { v };
    let real = w.saturating_sub(offset).div_ceil(2).min(wo);
    for (src, dst) in src.chunks_exact(h * w).zip(dst.chunks_exact_mut(ho * wo)) {
        for (i, row) in dst.chunks_exact_mut(wo).enumerate() {
            let r = 2 * i + offset;
            if r >= h {
                row.fill(T::ZERO);
                continue;
            }
            let xrow = &src[r * w + offset.min(w)..(r + 1) * w];
            for (v, &x) in row[..real].iter_mut().zip(xrow.iter().step_by(2)) {
                *v = act(x);
            }
            row[real..].fill(T::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    fn affine(rng: &mut TestRng, c_in: usize, c_out: usize) -> Affine1x1 {
        Affine1x1 {
            weight: rng.tensor(&[c_out, c_in, 1, 1], DType::F32).unwrap(),
            scale: (rng.tensor(&[c_out], DType::F32).unwrap() + 1.5).unwrap(),
            shift: rng.tensor(&[c_out], DType::F32).unwrap(),
        }
    }

    /// A hand-written program against the same ops on the batch: a 1×1 conv into a
    /// temporary, a max pool and a strided subsample added into the output's channel
    /// ranges, a copy of the previous input, and a doubled value.
    #[test]
    fn steps_compute_what_the_batch_ops_compute() {
        use crate::kernels::conv1x1::{conv1x1, Affine, Conv1x1Options};
        use crate::kernels::pool::{pool2d, PoolOptions};
        use crate::kernels::subsample::subsample2;
        use crate::kernels::testutil::hw;
        let mut rng = TestRng::new(61);
        let (n, c, h, w) = (3, 4, 7, 6);
        let x = rng.tensor(&[n, c, h, w], DType::F32).unwrap();
        let prev = rng.tensor(&[n, 2, 4, 3], DType::F32).unwrap();
        let conv = affine(&mut rng, c, 2);
        // Output: [conv(relu x) strided + subsample(prev)... ] laid out as 2 + 2 + 4 channels of 4×3.
        let mut program = Program::new((c, h, w), Some((2, 4, 3)), (8, 4, 3));
        let (xv, pv, out) = (program.x(), program.prev().unwrap(), program.out());
        let full = program.tmp((2, h, w));
        program.push(Step::Pointwise { src: xv, relu: true, conv: conv.clone(), dst: full, put: Put::Write });
        program.push(Step::Subsample { src: full, offset: 1, relu: false, dst: out.channels(0, 2) });
        program.push(Step::Copy { src: pv, dst: out.channels(0, 2), put: Put::Add });
        program.push(Step::Copy { src: pv, dst: out.channels(2, 2), put: Put::Write });
        program.push(Step::Double { dst: out.channels(2, 2) });
        program.push(Step::Pool {
            src: xv,
            kind: PoolKind::Max,
            kernel: 3,
            stride: 2,
            dst: out.channels(4, 4),
            put: Put::Write,
        });
        let got = crate::no_grad(|| program.run(&x, Some(&prev))).unwrap();
        let affine = Affine { scale: &conv.scale, shift: &conv.shift, relu_output: false };
        let full = conv1x1(&x, &conv.weight, Conv1x1Options { relu_input: true, affine: Some(affine) }).unwrap();
        let want = Tensor::cat(
            &[
                &(subsample2(&full, 1).unwrap() + &prev).unwrap(),
                &(&prev + &prev).unwrap(),
                &pool2d(&x, PoolOptions::same(PoolKind::Max, 3, 2, hw(&x))).unwrap(),
            ],
            1,
        )
        .unwrap();
        assert_close(&got, &want, 1e-5, "program");
    }

    #[test]
    fn bad_programs_and_inputs_are_named_errors() {
        let mut rng = TestRng::new(62);
        let x = rng.tensor(&[2, 4, 5, 5], DType::F32).unwrap();
        let run = |program: &Program, x: &Tensor| program.run(x, None).unwrap_err().to_string();
        // A 1×1 weight of the wrong width.
        let mut program = Program::new((4, 5, 5), None, (3, 5, 5));
        let (xv, out) = (program.x(), program.out());
        program.push(Step::Pointwise { src: xv, relu: false, conv: affine(&mut rng, 5, 3), dst: out, put: Put::Write });
        let err = run(&program, &x);
        assert!(
            err.contains("cell-eval: step 0") && err.contains("(3, 4, 1, 1)") && err.contains("[3, 5, 1, 1]"),
            "{err}"
        );
        // A destination of the wrong size, an input written to, overlapping ranges.
        let mut program = Program::new((4, 5, 5), None, (8, 5, 5));
        let (xv, out) = (program.x(), program.out());
        program.push(Step::Pool {
            src: xv,
            kind: PoolKind::Avg,
            kernel: 3,
            stride: 2,
            dst: out.channels(0, 4),
            put: Put::Write,
        });
        assert!(run(&program, &x).contains("step 0: reads (4, 5, 5) and writes (4, 5, 5)"), "{}", run(&program, &x));
        let mut program = Program::new((4, 5, 5), None, (8, 5, 5));
        let (xv, out) = (program.x(), program.out());
        program.push(Step::Copy { src: out.channels(0, 4), dst: xv, put: Put::Write });
        assert!(run(&program, &x).contains("cannot write an input"), "{}", run(&program, &x));
        let mut program = Program::new((4, 5, 5), None, (8, 5, 5));
        let out = program.out();
        program.push(Step::Copy { src: out.channels(0, 4), dst: out.channels(2, 4), put: Put::Write });
        assert!(run(&program, &x).contains("overlap"), "{}", run(&program, &x));
        // Inputs that do not match the program.
        let program = Program::new((4, 5, 5), Some((4, 5, 5)), (8, 5, 5));
        let err = program.run(&x, None).unwrap_err().to_string();
        assert!(err.contains("reads a previous input, but none was given"), "{err}");
        let err = program.run(&x, Some(&x.narrow(1, 0, 3).unwrap())).unwrap_err().to_string();
        assert!(err.contains("expected prev of shape [2, 4, 5, 5], got [2, 3, 5, 5]"), "{err}");
        let err = program.run(&x, Some(&x.to_dtype(DType::F64).unwrap())).unwrap_err().to_string();
        assert!(err.contains("prev is F64, the first input F32"), "{err}");
    }
}
