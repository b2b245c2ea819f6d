//! Custom kernels (candle `CustomOp`s) where candle is missing a feature or slow.
//!
//! Each kernel file keeps three things side by side: a reference built from plain candle
//! tensor ops (differentiable, any device), the custom op with its CPU forward and a
//! `bwd`, and, under the `cuda` feature, its CUDA twin (`cuda_fwd`, launching the kernels of
//! `kernels/nas_ops.cu` through `cuda.rs`).
//! Tests compare the custom op with its reference, forward and gradients, and check
//! gradients against finite differences in f64.

pub mod batch_norm;
pub(crate) mod cell_eval;
pub mod concat;
pub mod conv1x1;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod dense;
pub mod depthwise;
pub mod pool;
pub mod separable;
pub mod separable_train;
pub(crate) mod simd;
pub mod subsample;
pub(crate) mod window;

/// Binds each named input of a custom op's CPU forward to its contiguous slice (all f32
/// or all f64) and wraps the `Vec` that `$body` returns in a `CpuStorage`. Another dtype,
/// inputs of different dtypes and a strided input are errors naming the op and the input:
/// `cpu_kernel!(name, [x = (s1, l1, "xs"), w = (s2, l2, "weight")], forward(x, w))`.
macro_rules! cpu_kernel {
    ($op:expr, [$($v:ident = ($s:expr, $l:expr, $what:expr)),+ $(,)?], $body:expr) => {{
        let op: &str = $op;
        match $crate::kernels::cpu_dtype(op, &[$(($s, $what)),+])? {
            candle_core::DType::F32 => {
                $(let $v = $crate::kernels::cpu_slice::<f32>(op, $what, $s, $l)?;)+
                candle_core::CpuStorage::F32($body)
            }
            _ => {
                $(let $v = $crate::kernels::cpu_slice::<f64>(op, $what, $s, $l)?;)+
                candle_core::CpuStorage::F64($body)
            }
        }
    }};
}
pub(crate) use cpu_kernel;

/// The dtype of a custom op's CPU inputs, f32 or f64 and the same for all; otherwise an
/// error naming the op (and the input that differs from the first).
pub(crate) fn cpu_dtype(
    op: &str,
    inputs: &[(&candle_core::CpuStorage, &str)],
) -> candle_core::Result<candle_core::DType> {
    use candle_core::{backend::BackendStorage, DType};
    let (first, name) = inputs[0];
    let dtype = first.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        candle_core::bail!("{op}: unsupported dtype {dtype:?}, expected f32 or f64")
    }
    match inputs[1..].iter().find(|(s, _)| s.dtype() != dtype) {
        Some((s, what)) => candle_core::bail!("{op}: {what} is {:?}, {name} is {dtype:?}", s.dtype()),
        None => Ok(dtype),
    }
}

/// The elements of one contiguous input of a custom op's CPU forward.
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    op: &str,
    what: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => candle_core::bail!(
            "{op}: {what} must be contiguous, got shape {:?} strides {:?}",
            layout.dims(),
            layout.stride()
        ),
    }
}

#[cfg(test)]
mod device_tests;
#[cfg(test)]
pub(crate) mod testutil;

/// A kernel's output of `len` elements, allocated without a serial zeroing pass (zeroing
/// the outputs on one thread, before the threads wrote them, was 6 % of a mobile inference
/// pass). Its chunks are handed out once ([`par_chunks_mut`](Self::par_chunks_mut),
/// [`tail`](Self::tail)), each filled first by the task that then writes it, while the chunk
/// is in that core's cache: with zeros, or with NaN in debug builds, so an element a kernel
/// fails to write shows in every comparison with a reference (`testutil::assert_close`
/// rejects NaN the reference does not have). Writers that write every element of a chunk in
/// one pass (the 1×1 conv's gemm through a pointer, the batch norm's plane loops) take their
/// chunks unfilled (`par_chunks_uninit`, `unsafe`: they vouch for every element), which
/// saves the fill where it cost most.
/// [`into_vec`](Self::into_vec) checks that every element was handed out.
pub(crate) struct Output<T> {
    data: Box<[std::mem::MaybeUninit<T>]>,
    /// The elements handed out from the start, and those at the end (`tail`).
    filled: std::sync::atomic::AtomicUsize,
    tail: usize,
    handed: bool,
    /// Filled with zeros in every build.
    zeroed: bool,
}

impl<T: candle_core::WithDType> Output<T> {
    pub(crate) fn new(len: usize) -> Output<T> {
        Output { data: Box::new_uninit_slice(len), filled: 0.into(), tail: 0, handed: false, zeroed: false }
    }

    /// An output whose chunks start as zeros in every build (for kernels that accumulate).
    pub(crate) fn zeroed(len: usize) -> Output<T> {
        Output { zeroed: true, ..Output::new(len) }
    }

    fn start_value(&self) -> T {
        start_value(self.zeroed)
    }

    /// The last `len` elements, filled, apart from the chunks (call it first).
    pub(crate) fn tail(&mut self, len: usize) -> &mut [T] {
        assert!(!self.handed && self.tail == 0, "an output's tail is taken once, before its chunks");
        self.tail = len;
        let (at, v) = (self.data.len() - len, self.start_value());
        fill(&mut self.data[at..], v)
    }

    /// The elements before the tail in chunks of `size`, each filled, for the threads.
    pub(crate) fn par_chunks_mut(
        &mut self,
        size: usize,
    ) -> impl rayon::iter::IndexedParallelIterator<Item = &mut [T]> + '_ {
        use rayon::prelude::*;
        let (data, filled, v) = self.hand_out();
        data.par_chunks_mut(size).map(move |chunk| {
            filled.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            fill(chunk, v)
        })
    }

    /// The chunks of [`par_chunks_mut`](Self::par_chunks_mut), not filled: for a writer that
    /// writes every element in one pass.
    ///
    /// # Safety
    /// Every element of every chunk is written before [`into_vec`](Self::into_vec).
    pub(crate) unsafe fn par_chunks_uninit(
        &mut self,
        size: usize,
    ) -> impl rayon::iter::IndexedParallelIterator<Item = &mut [std::mem::MaybeUninit<T>]> + '_ {
        use rayon::prelude::*;
        let (data, filled, _) = self.hand_out();
        data.par_chunks_mut(size).inspect(move |chunk| {
            filled.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        })
    }

    /// [`par_chunks_uninit`](Self::par_chunks_uninit) on the calling thread.
    ///
    /// # Safety
    /// As [`par_chunks_uninit`](Self::par_chunks_uninit).
    pub(crate) unsafe fn chunks_uninit(
        &mut self,
        size: usize,
    ) -> impl Iterator<Item = &mut [std::mem::MaybeUninit<T>]> + '_ {
        let (data, filled, _) = self.hand_out();
        data.chunks_mut(size).inspect(move |chunk| {
            filled.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        })
    }

    fn hand_out(&mut self) -> (&mut [std::mem::MaybeUninit<T>], &std::sync::atomic::AtomicUsize, T) {
        assert!(!self.handed, "an output's chunks are handed out once");
        self.handed = true;
        let (end, v) = (self.data.len() - self.tail, self.start_value());
        (&mut self.data[..end], &self.filled, v)
    }

    /// The output, every element of which was handed out (else a panic: a kernel bug).
    pub(crate) fn into_vec(self) -> Vec<T> {
        let filled = self.filled.into_inner() + self.tail;
        assert_eq!(
            filled,
            self.data.len(),
            "a kernel handed out {filled} of its output's {} elements",
            self.data.len()
        );
        // SAFETY: the chunks and the tail are disjoint (each handed out once) and every
        // element of them was written by `fill`; together they cover the buffer.
        unsafe { self.data.assume_init() }.into_vec()
    }
}

/// `chunk` filled with `v`.
fn fill<T: Copy>(chunk: &mut [std::mem::MaybeUninit<T>], v: T) -> &mut [T] {
    chunk.fill(std::mem::MaybeUninit::new(v));
    // SAFETY: every element was written just above.
    unsafe { assume_init_mut(chunk) }
}

/// `chunk` as the values it holds.
///
/// # Safety
/// Every element of `chunk` is initialised.
pub(crate) unsafe fn assume_init_mut<T>(chunk: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the caller vouches for the values.
    unsafe { &mut *(chunk as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// A per-thread working buffer of `len` elements: zeros, NaN in debug builds (so a read
/// before a write shows in the tests).
pub(crate) fn scratch_buffer<T: candle_core::WithDType>(len: usize) -> Vec<T> {
    vec![start_value(false); len]
}

/// Zero, or NaN in debug builds unless `zeroed`.
fn start_value<T: candle_core::WithDType>(zeroed: bool) -> T {
    if cfg!(debug_assertions) && !zeroed {
        T::from_f64(f64::NAN)
    } else {
        T::zero()
    }
}

/// Explicit zero padding of the two spatial axes: rows before/after, columns before/after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Padding2d {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Padding2d {
    /// TF "SAME" padding for a `kh × kw` window with `stride` and `dilation` on an
    /// `h × w` input: the output is `ceil(n / stride)` and the smaller half of the padding
    /// goes before (so a stride-2 op on an even input pads only after).
    pub fn same(h: usize, w: usize, kh: usize, kw: usize, stride: usize, dilation: usize) -> Padding2d {
        let (top, bottom) = same_1d(h, kh, stride, dilation);
        let (left, right) = same_1d(w, kw, stride, dilation);
        Padding2d { top, bottom, left, right }
    }

    /// Output size of a window op along one axis of size `n`.
    pub fn out_size(n: usize, before: usize, after: usize, k: usize, stride: usize, dilation: usize) -> usize {
        let span = (k - 1) * dilation + 1;
        (n + before + after - span) / stride + 1
    }
}

/// Stride, dilation and padding of a windowed convolution (depthwise or dense), and whether
/// its input is read through a ReLU, in the manner of candle-nn's `Conv2dConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvOptions {
    /// Stride on both axes.
    pub stride: usize,
    /// Dilation on both axes.
    pub dilation: usize,
    /// Explicit zero padding.
    pub padding: Padding2d,
    /// Read the input through a ReLU. The depthwise conv does it inside the op (`xs.relu()`
    /// is never stored; its gradient passes where `xs >= 0`, candle's rule).
    pub relu_input: bool,
}

impl Default for ConvOptions {
    /// Stride 1, dilation 1, no padding, no ReLU.
    fn default() -> ConvOptions {
        ConvOptions { stride: 1, dilation: 1, padding: Padding2d::default(), relu_input: false }
    }
}

impl ConvOptions {
    /// TF "SAME" padding ([`Padding2d::same`]) for a `kh × kw` kernel on an `h × w` input.
    pub fn same((h, w): (usize, usize), (kh, kw): (usize, usize), stride: usize, dilation: usize) -> ConvOptions {
        let padding = Padding2d::same(h, w, kh, kw, stride, dilation);
        ConvOptions { stride, dilation, padding, relu_input: false }
    }

    /// These options with the input read through a ReLU when `relu`.
    pub fn relu_input(self, relu: bool) -> ConvOptions {
        ConvOptions { relu_input: relu, ..self }
    }
}

/// TF SAME padding along one axis: `(before, after)`.
pub fn same_1d(n: usize, k: usize, stride: usize, dilation: usize) -> (usize, usize) {
    let span = (k - 1) * dilation + 1;
    let out = n.div_ceil(stride);
    let total = ((out - 1) * stride + span).saturating_sub(n);
    (total / 2, total - total / 2)
}
