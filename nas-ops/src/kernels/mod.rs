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

#[cfg(test)]
mod device_tests;
#[cfg(test)]
pub(crate) mod testutil;

/// A buffer of `len` elements for a kernel that overwrites all of them, not zeroed first:
/// zeroing outputs that are written in full anyway was 6 % of a mobile inference pass.
/// In debug builds (the tests) it is filled with NaN instead, so an element a kernel fails
/// to write shows up in every comparison with a reference (`testutil::assert_close`
/// rejects NaN the reference does not have).
///
/// # Safety
/// The caller writes every element before the buffer is read, returned or dropped into a
/// tensor.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_buffer<T: candle_core::WithDType>(len: usize) -> Vec<T> {
    if cfg!(debug_assertions) {
        return vec![T::from_f64(f64::NAN); len];
    }
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; the caller initialises every element before reading.
    unsafe { buffer.set_len(len) };
    buffer
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
