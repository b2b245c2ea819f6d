//! The CPU kernels of the windowed ops: depthwise convolution (forward, input gradient,
//! weight gradient) and SAME pooling, on contiguous row-major `(n, c, h, w)` slices.
//!
//! All of them are one loop, `correlate` (or `tap_dots`, its reduction twin, for the weight
//! gradient): each rayon task copies
//! the plane it reads into a zero-padded scratch plane (applying the fused ReLU on the way),
//! so no kernel tap ever tests a border. An output row is computed `LANES` columns at a
//! time, `BLOCK` chunks at once, with every tap of the kernel accumulated in registers and
//! one store per output. The loops run with the widest vectors and FMA the CPU has
//! (`kernels::simd`).
//!
//! With stride `s > 1` the padded plane is stored "phased": padded column `pc` sits at
//! `(pc % s) * wq + pc / s`, so the columns one tap meets are contiguous. The input gradient
//! at stride `s` splits into `s × s` phases (input rows and columns by their remainder mod
//! `s`); each phase is a stride-1 correlation of the padded output gradient with the kernel
//! taps of that remainder, and its results are scattered into every `s`-th input position.
//!
//! Two shapes take other routes: the depthwise weight gradient stacks the padded planes of
//! several samples in one scratch (one call for all of them), and outputs at most
//! `CHANNELS_MAX_WO` columns wide run the depthwise forward and both gradients channels-last
//! (`forward_channels`, `grad_input_channels`, `grad_weight_channels`), where 16 channels
//! fill a register that a row of 2 outputs would leave mostly empty.

use rayon::prelude::*;

use crate::kernels::depthwise::DepthwiseGeometry;
use crate::kernels::simd::{multiversion, Float, Isa};
use crate::kernels::Output;

/// Output columns one accumulator holds: one AVX-512 register of f32.
const LANES: usize = 16;
/// Accumulators in flight, so that consecutive fused multiply-adds do not wait on each
/// other (their latency is about four times their issue interval).
const BLOCK: usize = 4;

/// The index space of one correlation: `rows × cols` outputs, and the strides that place
/// them in the source and the output.
#[derive(Debug, Clone, Copy)]
struct Grid {
    rows: usize,
    cols: usize,
    /// Source elements between the windows of consecutive output rows.
    src_row: usize,
    /// Output elements between consecutive rows.
    out_row: usize,
    /// Output elements between consecutive columns (the stride of a phase's scatter).
    out_col: usize,
    /// The largest tap offset of the correlation (computed once per layout: for planes of a
    /// few pixels, taking it per call was 6 % of a `small` training step's profile).
    reach: usize,
}

/// What one block of output chunks computes: `block(bases)` gets where each chunk's window
/// starts in the source and returns the chunks' `LANES` outputs. A trait with an
/// `#[inline(always)]` method rather than a closure: a closure is compiled as its own
/// function, without the wrapper's target features (its fused multiply-adds would become
/// calls to libm's `fmaf`).
trait Block<T> {
    fn block(&self, bases: &[usize; BLOCK]) -> [[T; LANES]; BLOCK];
}

/// Runs `kernel` on the output chunks of `grid`, `BLOCK` at a time, and stores what it
/// returns. Dead slots of the last block repeat its last live chunk (computed,
/// never stored); the lanes past a row's last column are dropped.
#[inline(always)]
fn for_each_block<T: Float, K: Block<T>>(grid: &Grid, out: &mut [T], kernel: &K) {
    let chunks = grid.cols.div_ceil(LANES);
    let total = grid.rows * chunks;
    // The row and chunk of the block's first chunk, advanced without dividing (there were
    // two integer divisions per chunk, on the path of every block).
    let (mut y, mut c) = (0, 0);
    let mut first = 0;
    while first < total {
        let live = (total - first).min(BLOCK);
        let mut at = [(0usize, 0usize); BLOCK];
        let (mut yb, mut cb) = (y, c);
        for (b, at) in at.iter_mut().enumerate() {
            *at = (yb, cb * LANES);
            if b + 1 < live {
                cb += 1;
                if cb == chunks {
                    (yb, cb) = (yb + 1, 0);
                }
            }
        }
        let acc = kernel.block(&at.map(|(y, x0)| y * grid.src_row + x0));
        for (acc, &(y, x0)) in acc.iter().zip(&at).take(live) {
            let len = LANES.min(grid.cols - x0);
            let start = y * grid.out_row + x0 * grid.out_col;
            if grid.out_col == 1 && len == LANES {
                let dst: &mut [T; LANES] = (&mut out[start..start + LANES]).try_into().expect("LANES elements");
                *dst = *acc;
            } else if grid.out_col == 1 {
                // Element by element: a `copy_from_slice` of a variable length is a call to
                // `memmove`, which was 12 % of a 28×28 depthwise conv's profile.
                let dst = &mut out[start..start + len];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = acc[j];
                }
            } else {
                for (j, &v) in acc[..len].iter().enumerate() {
                    out[start + j * grid.out_col] = v;
                }
            }
        }
        (y, c) = if cb + 1 == chunks { (yb + 1, 0) } else { (yb, cb + 1) };
        first += live;
    }
}

/// Checks once that every chunk a block reads, at `base + offset` for `offset <= reach`, lies
/// inside `src`, so that its loads need no check each (a bounds check per load cost more
/// instructions than the multiply-adds).
#[inline(always)]
fn check_block<T>(src: &[T], bases: &[usize; BLOCK], reach: usize) {
    let top = bases.iter().copied().max().unwrap_or(0) + reach + LANES;
    assert!(top <= src.len(), "window kernel reads up to {top}, past the source's {} elements", src.len());
}

/// The `LANES` elements of `src` at `at`.
///
/// # Safety
/// `at + LANES <= src.len()` (see [`check_block`]).
#[inline(always)]
unsafe fn lanes<T>(src: &[T], at: usize) -> &[T; LANES] {
    debug_assert!(at + LANES <= src.len());
    // SAFETY: in bounds by the caller's contract; `[T; LANES]` has `T`'s alignment.
    unsafe { &*(src.as_ptr().add(at) as *const [T; LANES]) }
}

/// `out[y * out_row + x * out_col] = Σ over taps (offset, k) of k * src[y * src_row + x + offset]`
/// for `y < rows`, `x < cols`. The last chunk of a row reads up to `LANES - 1` elements
/// past the last column, so `src` must extend that far; those lanes are never stored.
#[inline(always)]
fn correlate_body<T: Float, const FMA: bool>(src: &[T], taps: &[(usize, T)], grid: &Grid, out: &mut [T]) {
    debug_assert!(taps.iter().all(|&(offset, _)| offset <= grid.reach));
    for_each_block(grid, out, &Correlation::<T, FMA> { src, taps, reach: grid.reach });
}

struct Correlation<'a, T, const FMA: bool> {
    src: &'a [T],
    taps: &'a [(usize, T)],
    /// The largest tap offset.
    reach: usize,
}

impl<T: Float, const FMA: bool> Block<T> for Correlation<'_, T, FMA> {
    #[inline(always)]
    fn block(&self, bases: &[usize; BLOCK]) -> [[T; LANES]; BLOCK] {
        check_block(self.src, bases, self.reach);
        let mut acc = [[T::ZERO; LANES]; BLOCK];
        for &(offset, k) in self.taps {
            for (acc, &base) in acc.iter_mut().zip(bases) {
                // SAFETY: `base + offset <= base + reach`, checked above.
                for (a, &v) in acc.iter_mut().zip(unsafe { lanes(self.src, base + offset) }) {
                    *a = T::madd::<FMA>(k, v, *a);
                }
            }
        }
        acc
    }
}

multiversion!(fn correlate(src: &[T], taps: &[(usize, T)], grid: &Grid, out: &mut [T]) => correlate_body);

/// Whether a depthwise geometry's correlations take [`correlate_rows`]: square 3, 5 or 7
/// kernels at stride 1, dilation 1.
fn takes_row_blocks(geom: &DepthwiseGeometry) -> bool {
    geom.stride == 1 && geom.dilation == 1 && geom.kh == geom.kw && matches!(geom.kh, 3 | 5 | 7)
}

/// Output rows a [`correlate_rows`] block computes at once.
const ROWS: usize = 8;

/// [`correlate_body`] for a square `k × k` kernel at stride 1, dilation 1 (`weight`
/// row-major, `grid.src_row` the scratch's row length, `grid.out_col` 1): blocks of [`ROWS`]
/// output rows × one chunk, then at most one block of `ROWS / 2`, each input row's chunk
/// loaded once for every kernel row it meets (`ROWS + k − 1` loads per kernel column instead
/// of `ROWS · k`), with `ROWS` independent sums in flight. The rows left take
/// [`correlate_body`], as do kernels other than 3, 5 and 7 wide and other grids.
#[inline(always)]
fn correlate_rows_body<T: Float, const FMA: bool>(
    src: &[T],
    weight: &[T],
    taps: &[(usize, T)],
    grid: &Grid,
    out: &mut [T],
) {
    // Blocks of ROWS rows, then at most one of ROWS / 2 (a 7-row plane would otherwise
    // take the slower path entirely, a 14-row one for 6 of its rows). Inlined, like every
    // function a multiversioned body calls, so that it is compiled with the body's features.
    #[inline(always)]
    fn blocks<T: Float, const FMA: bool, const R: usize>(src: &[T], weight: &[T], grid: &Grid, out: &mut [T]) -> usize {
        if grid.out_col != 1 {
            return 0;
        }
        match weight.len() {
            9 => row_blocks::<T, FMA, 3, R>(src, weight, grid, out),
            25 => row_blocks::<T, FMA, 5, R>(src, weight, grid, out),
            49 => row_blocks::<T, FMA, 7, R>(src, weight, grid, out),
            _ => 0,
        }
    }
    let mut done = blocks::<T, FMA, ROWS>(src, weight, grid, out);
    if done < grid.rows {
        let rest = Grid { rows: grid.rows - done, ..*grid };
        let (src, out) = (&src[done * grid.src_row..], &mut out[done * grid.out_row..]);
        done += blocks::<T, FMA, { ROWS / 2 }>(src, weight, &rest, out);
    }
    if done < grid.rows {
        let rest = Grid { rows: grid.rows - done, ..*grid };
        correlate_body::<T, FMA>(&src[done * grid.src_row..], taps, &rest, &mut out[done * grid.out_row..]);
    }
}

multiversion!(
    fn correlate_rows(src: &[T], weight: &[T], taps: &[(usize, T)], grid: &Grid, out: &mut [T]) => correlate_rows_body
);

/// The whole `ROWS`-row blocks of [`correlate_rows_body`]; returns the rows done.
#[inline(always)]
fn row_blocks<T: Float, const FMA: bool, const K: usize, const ROWS: usize>(
    src: &[T],
    weight: &[T],
    grid: &Grid,
    out: &mut [T],
) -> usize {
    let Grid { rows, cols, src_row, out_row, .. } = *grid;
    let full = rows / ROWS * ROWS;
    let chunks = cols.div_ceil(LANES);
    if full == 0 || chunks == 0 {
        return 0;
    }
    // The furthest read: the last block's last input row, its last chunk, shifted by k − 1.
    let top = (full + K - 2) * src_row + (chunks - 1) * LANES + (K - 1) + LANES;
    assert!(top <= src.len(), "window kernel reads up to {top}, past the source's {} elements", src.len());
    assert!(weight.len() == K * K && out.len() >= (full - 1) * out_row + cols, "row_blocks: bad weight or output");
    for y0 in (0..full).step_by(ROWS) {
        for c in 0..chunks {
            let x0 = c * LANES;
            let mut acc = [[T::ZERO; LANES]; ROWS];
            for kx in 0..K {
                let w: [T; K] = std::array::from_fn(|ky| weight[ky * K + kx]);
                for (j, acc) in acc.iter_mut().enumerate() {
                    for (ky, &w) in w.iter().enumerate() {
                        // SAFETY: `(y0 + j + ky) · src_row + x0 + kx + LANES <= top`, checked
                        // above. Rows j and ky with the same sum load the same vector once.
                        let v = unsafe { lanes(src, (y0 + j + ky) * src_row + x0 + kx) };
                        for (a, &v) in acc.iter_mut().zip(v) {
                            *a = T::madd::<FMA>(w, v, *a);
                        }
                    }
                }
            }
            let len = LANES.min(cols - x0);
            for (j, acc) in acc.iter().enumerate() {
                let start = (y0 + j) * out_row + x0;
                if len == LANES {
                    let dst: &mut [T; LANES] = (&mut out[start..start + LANES]).try_into().expect("LANES elements");
                    *dst = *acc;
                } else {
                    for (d, &a) in out[start..start + len].iter_mut().zip(acc) {
                        *d = a;
                    }
                }
            }
        }
    }
    full
}

/// `out[y * out_row + x * out_col] = max over offsets of src[y * src_row + x + offset]`, laid
/// out as in [`correlate_body`] (a NaN never wins, as in the other max-pool paths).
#[inline(always)]
fn window_max_body<T: Float, const FMA: bool>(src: &[T], offsets: &[usize], grid: &Grid, out: &mut [T]) {
    debug_assert!(offsets.iter().all(|&offset| offset <= grid.reach));
    for_each_block(grid, out, &WindowMax { src, offsets, reach: grid.reach });
}

struct WindowMax<'a, T> {
    src: &'a [T],
    offsets: &'a [usize],
    /// The largest offset.
    reach: usize,
}

impl<T: Float> Block<T> for WindowMax<'_, T> {
    #[inline(always)]
    fn block(&self, bases: &[usize; BLOCK]) -> [[T; LANES]; BLOCK] {
        check_block(self.src, bases, self.reach);
        let mut acc = [[T::NEG_INFINITY; LANES]; BLOCK];
        for &offset in self.offsets {
            for (acc, &base) in acc.iter_mut().zip(bases) {
                // SAFETY: `base + offset <= base + reach`, checked above.
                for (a, &v) in acc.iter_mut().zip(unsafe { lanes(self.src, base + offset) }) {
                    *a = if v > *a { v } else { *a };
                }
            }
        }
        acc
    }
}

multiversion!(fn window_max(src: &[T], offsets: &[usize], grid: &Grid, out: &mut [T]) => window_max_body);

/// `dk[t] += Σ over y < rows, x < cols of g[y * g_row + x] * src[y * src_row + x + offsets[t]]`.
/// `g_row` is a multiple of `LANES` and `g` is zero from `cols` to the end of each row, so
/// the lanes read past the last column add nothing.
#[inline(always)]
fn tap_dots_body<T: Float, const FMA: bool>(
    src: &[T],
    offsets: &[usize],
    g: &[T],
    g_row: usize,
    grid: &Grid,
    dk: &mut [T],
) {
    let chunks = grid.cols.div_ceil(LANES);
    if chunks == 0 {
        return;
    }
    for (offs, dk) in offsets.chunks(BLOCK).zip(dk.chunks_mut(BLOCK)) {
        // Dead slots of the last block repeat its first tap (summed, never stored).
        let mut off = [offs[0]; BLOCK];
        off[..offs.len()].copy_from_slice(offs);
        debug_assert!(off.iter().all(|&offset| offset <= grid.reach));
        let reach = grid.reach;
        let mut acc = [[T::ZERO; LANES]; BLOCK];
        for y in 0..grid.rows {
            // The row's last chunk reads the furthest, in `g` and in `src`.
            let last = (chunks - 1) * LANES;
            assert!(y * g_row + last + LANES <= g.len(), "tap_dots: gradient row {y} past its buffer");
            check_block(src, &[y * grid.src_row + last; BLOCK], reach);
            for c in 0..chunks {
                // SAFETY: `c * LANES <= last`, checked above for this row.
                let gv = unsafe { lanes(g, y * g_row + c * LANES) };
                let base = y * grid.src_row + c * LANES;
                for (acc, &off) in acc.iter_mut().zip(&off) {
                    // SAFETY: as above, with `off <= reach`.
                    let s = unsafe { lanes(src, base + off) };
                    for ((a, &gv), &v) in acc.iter_mut().zip(gv).zip(s) {
                        *a = T::madd::<FMA>(gv, v, *a);
                    }
                }
            }
        }
        for (d, acc) in dk.iter_mut().zip(&acc) {
            *d += acc.iter().fold(T::ZERO, |s, &a| s + a);
        }
    }
}

multiversion!(
    fn tap_dots(src: &[T], offsets: &[usize], g: &[T], g_row: usize, grid: &Grid, dk: &mut [T]) => tap_dots_body
);

/// The padded (and, at stride > 1, phased) copy of one input plane that the forward pass
/// and the weight gradient read, and where each kernel tap starts in it.
#[derive(Debug)]
struct InputLayout {
    geom: DepthwiseGeometry,
    /// Padded rows held: exactly those some output window reads.
    rows: usize,
    /// Padded columns held, likewise.
    cols: usize,
    /// Columns per phase.
    wq: usize,
    /// `stride * wq`.
    row_len: usize,
    /// Where tap `ky * kw + kx` of output (0, 0) reads.
    offsets: Vec<usize>,
    /// The forward correlation: `ho × wo` outputs into a row-major plane.
    grid: Grid,
    /// Per phase `p` (one at stride 1), the image columns it holds: phase columns
    /// `q_lo..q_hi`, read from input column `first` on, every `stride`-th (the same for every
    /// row, so `fill` divides nothing). `fill` reads them at strides above 2; stride 2 fills
    /// both phases in one pass.
    phases: Vec<PhaseSpan>,
}

/// The image columns one column phase of an [`InputLayout`] holds.
#[derive(Debug, Clone, Copy)]
struct PhaseSpan {
    q_lo: usize,
    q_hi: usize,
    first: usize,
}

impl InputLayout {
    fn new(geom: &DepthwiseGeometry) -> Self {
        let &DepthwiseGeometry { kh, kw, ho, wo, stride: s, dilation: d, .. } = geom;
        let rows = (ho - 1) * s + (kh - 1) * d + 1;
        let cols = (wo - 1) * s + (kw - 1) * d + 1;
        let wq = cols.div_ceil(s);
        let row_len = s * wq;
        let offsets: Vec<usize> =
            (0..kh).flat_map(|ky| (0..kw).map(move |kx| ky * d * row_len + (kx * d % s) * wq + kx * d / s)).collect();
        let reach = offsets.iter().copied().max().unwrap_or(0);
        let grid = Grid { rows: ho, cols: wo, src_row: s * row_len, out_row: wo, out_col: 1, reach };
        // Phase `p` holds padded columns `p + s·q`; those inside the image are `q_lo..q_hi`,
        // reading input columns `first, first + s, ...`.
        let (left, end) = (geom.padding.left, cols.min(geom.padding.left + geom.w));
        let phases = (0..s)
            .map(|p| {
                let q_lo = left.saturating_sub(p).div_ceil(s);
                let q_hi = end.saturating_sub(p).div_ceil(s).max(q_lo);
                PhaseSpan { q_lo, q_hi, first: (p + s * q_lo).saturating_sub(left) }
            })
            .collect();
        InputLayout { geom: *geom, rows, cols, wq, row_len, offsets, grid, phases }
    }

    /// A scratch plane holding `pad` everywhere, with room for the reads past the last
    /// column. The padding positions are the same for every plane of one call, so `fill`
    /// writes only the image's own positions and the padding stays as written here.
    fn scratch<T: Float>(&self, pad: T) -> Vec<T> {
        vec![pad; self.rows * self.row_len + LANES]
    }

    /// Copies `plane` (one `h × w` input plane) into the image positions of `dst` (a
    /// `scratch`), through a ReLU when `relu` (`v >= 0 ? v : 0`, as the unfused path
    /// computes it).
    fn fill<T: Float>(&self, isa: Isa, plane: &[T], relu: bool, dst: &mut [T]) {
        fill_input(isa, self, plane, relu, dst)
    }
}

#[inline(always)]
fn fill_input_body<T: Float, const FMA: bool>(layout: &InputLayout, plane: &[T], relu: bool, dst: &mut [T]) {
    let &DepthwiseGeometry { h, w, stride: s, padding, .. } = &layout.geom;
    let act = |v: T| if !relu || v >= T::ZERO { v } else { T::ZERO };
    // Rows `r` of the scratch hold input row `r - top`; columns likewise (phased).
    let rows = padding.top.min(layout.rows)..(padding.top + h).min(layout.rows);
    let end = layout.cols.min(padding.left + w);
    for (iy, dst) in dst.chunks_exact_mut(layout.row_len).skip(rows.start).take(rows.len()).enumerate() {
        let src = &plane[iy * w..(iy + 1) * w];
        if s == 1 {
            if padding.left < end {
                for (d, &v) in dst[padding.left..end].iter_mut().zip(src) {
                    *d = act(v);
                }
            }
            continue;
        }
        if s == 2 {
            // One pass over the row: input column x is padded column left + x, which phase
            // (left + x) % 2 holds at (left + x) / 2. Each pair of input columns goes to both
            // phases at once (the loop vectorises with shuffles); before, each phase read the
            // whole row for its half.
            let stored = end.saturating_sub(padding.left);
            let (lo, hi) = dst[..layout.row_len].split_at_mut(layout.wq);
            let (first, second) = if padding.left % 2 == 0 { (lo, hi) } else { (hi, lo) };
            let (q_first, q_second) = (padding.left / 2, padding.left.div_ceil(2));
            let pairs = src[..stored].chunks_exact(2);
            let (last, n) = (pairs.remainder().first().copied(), pairs.len());
            let dsts = first[q_first..q_first + n].iter_mut().zip(&mut second[q_second..q_second + n]);
            for ((a, b), pair) in dsts.zip(pairs) {
                *a = act(pair[0]);
                *b = act(pair[1]);
            }
            if let Some(v) = last {
                first[q_first + n] = act(v);
            }
            continue;
        }
        for (span, dst) in layout.phases.iter().zip(dst.chunks_exact_mut(layout.wq)) {
            if span.q_lo >= span.q_hi {
                continue;
            }
            let (dst, src) = (&mut dst[span.q_lo..span.q_hi], &src[span.first..]);
            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(s)) {
                *d = act(v);
            }
        }
    }
}

multiversion!(fn fill_input(layout: &InputLayout, plane: &[T], relu: bool, dst: &mut [T]) => fill_input_body);

/// `out[(n, c)] = Σ over taps of weight[c, tap] * shifted xs[(n, c)]` (of `xs.relu()`
/// with `relu`), one rayon task per `(n, c)` plane.
pub(crate) fn forward<T: Float>(isa: Isa, geom: &DepthwiseGeometry, xs: &[T], weight: &[T], relu: bool) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
    if n * c * ho * wo == 0 || h * w == 0 {
        // An empty image pads to windows of zeros.
        return vec![T::ZERO; n * c * ho * wo];
    }
    if wo <= CHANNELS_MAX_WO {
        return forward_channels(isa, geom, xs, weight, relu);
    }
    let mut out = Output::new(n * c * ho * wo);
    let layout = InputLayout::new(geom);
    let row_blocked = takes_row_blocks(geom);
    out.par_chunks_mut(ho * wo).enumerate().for_each_init(
        || (layout.scratch(T::ZERO), Vec::with_capacity(kh * kw)),
        |(scratch, taps), (plane, out)| {
            let k = &weight[(plane % c) * kh * kw..(plane % c + 1) * kh * kw];
            taps.clear();
            taps.extend(layout.offsets.iter().copied().zip(k.iter().copied()));
            let xs = &xs[plane * h * w..(plane + 1) * h * w];
            depthwise_plane(isa, &layout, row_blocked, (xs, relu), (k, taps), scratch, out);
        },
    );
    out.into_vec()
}

/// One plane of the depthwise forward: `xs` (through a ReLU with `relu`) into `scratch`
/// (a `layout.scratch`), then correlated with the channel's kernel `k` (`taps` its
/// `(offset, weight)` pairs) into `out`.
fn depthwise_plane<T: Float>(
    isa: Isa,
    layout: &InputLayout,
    row_blocked: bool,
    (xs, relu): (&[T], bool),
    (k, taps): (&[T], &[(usize, T)]),
    scratch: &mut [T],
    out: &mut [T],
) {
    layout.fill(isa, xs, relu, scratch);
    if row_blocked {
        correlate_rows(isa, scratch, k, taps, &layout.grid, out);
    } else {
        correlate(isa, scratch, taps, &layout.grid, out);
    }
}

/// Output widths up to this take [`forward_channels`] (measured against the row path:
/// 1.6-3.7x on 4x4 and 2x2 planes, 0.87x on 8x8 ones).
const CHANNELS_MAX_WO: usize = 4;

/// The sizes [`channel_correlate`] needs.
#[derive(Debug, Clone, Copy)]
struct ChannelGeom {
    ho: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    dilation: usize,
    /// Columns of the padded, transposed input.
    wp: usize,
    /// Channels rounded up to `LANES`: the innermost stride of both transposed buffers.
    cp: usize,
}

/// Output positions and channel registers [`channel_correlate`] accumulates at once: 8
/// independent sums, enough to hide the latency of the fused multiply-adds.
const CHANNEL_X: usize = 4;
const CHANNEL_C: usize = 2;

/// `yout[(y·wo + x)·cp + ch] = Σ over taps t of wt[t·cp + ch] · xin[((y·s + ky·d)·wp + x·s +
/// kx·d)·cp + ch]`: the depthwise correlation with channels innermost, `LANES` channels per
/// register, `CHANNEL_X` positions × `CHANNEL_C` registers in flight (dead slots of a
/// partial block repeat a live one and are not stored).
#[inline(always)]
fn channel_correlate_body<T: Float, const FMA: bool>(xin: &[T], wt: &[T], g: &ChannelGeom, yout: &mut [T]) {
    let &ChannelGeom { ho, wo, kh, kw, stride: s, dilation: d, wp, cp } = g;
    let chunks = cp / LANES;
    for y in 0..ho {
        for x0 in (0..wo).step_by(CHANNEL_X) {
            let xs_live = (wo - x0).min(CHANNEL_X);
            for c0 in (0..chunks).step_by(CHANNEL_C) {
                let cs_live = (chunks - c0).min(CHANNEL_C);
                let mut acc = [[[T::ZERO; LANES]; CHANNEL_C]; CHANNEL_X];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let t = (ky * kw + kx) * cp;
                        let row = (y * s + ky * d) * wp + kx * d;
                        for (j, acc) in acc.iter_mut().enumerate() {
                            let x = x0 + j.min(xs_live - 1);
                            let at = (row + x * s) * cp;
                            for (i, acc) in acc.iter_mut().enumerate() {
                                let ch = (c0 + i.min(cs_live - 1)) * LANES;
                                let k: &[T; LANES] = wt[t + ch..t + ch + LANES].try_into().expect("LANES elements");
                                let v: &[T; LANES] = xin[at + ch..at + ch + LANES].try_into().expect("LANES elements");
                                for ((a, &v), &k) in acc.iter_mut().zip(v).zip(k) {
                                    *a = T::madd::<FMA>(k, v, *a);
                                }
                            }
                        }
                    }
                }
                for (j, acc) in acc.iter().enumerate().take(xs_live) {
                    let at = (y * wo + x0 + j) * cp + c0 * LANES;
                    for (i, acc) in acc.iter().enumerate().take(cs_live) {
                        yout[at + i * LANES..at + (i + 1) * LANES].copy_from_slice(acc);
                    }
                }
            }
        }
    }
}

multiversion!(fn channel_correlate(xin: &[T], wt: &[T], g: &ChannelGeom, yout: &mut [T]) => channel_correlate_body);

/// The channels-last buffers of the narrow-output path: a zero-padded `(hp, wp, cp)` copy
/// of one sample's input (the rows and columns some window reads), and `(ho, wo, cp)`
/// outputs or output gradients.
#[derive(Debug)]
struct ChannelLayout {
    geom: DepthwiseGeometry,
    g: ChannelGeom,
    hp: usize,
    /// Padded rows and columns that hold input (row `r` holds input row `r − top`).
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl ChannelLayout {
    fn new(geom: &DepthwiseGeometry) -> Self {
        let &DepthwiseGeometry { c, h, w, kh, kw, ho, wo, stride, dilation, padding, .. } = geom;
        let cp = c.next_multiple_of(LANES);
        let hp = (ho - 1) * stride + (kh - 1) * dilation + 1;
        let wp = (wo - 1) * stride + (kw - 1) * dilation + 1;
        let rows = padding.top.min(hp)..(padding.top + h).min(hp);
        let cols = padding.left.min(wp)..(padding.left + w).min(wp);
        ChannelLayout { geom: *geom, g: ChannelGeom { ho, wo, kh, kw, stride, dilation, wp, cp }, hp, rows, cols }
    }

    /// The `(kh·kw, cp)` transpose of a `(c, kh·kw)` weight, zero past channel `c`.
    fn weight<T: Float>(&self, weight: &[T]) -> Vec<T> {
        let (k2, cp) = (self.geom.kh * self.geom.kw, self.g.cp);
        let mut wt = vec![T::ZERO; k2 * cp];
        for (ch, k) in weight.chunks_exact(k2).enumerate() {
            for (t, &v) in k.iter().enumerate() {
                wt[t * cp + ch] = v;
            }
        }
        wt
    }

    fn input_buffer<T: Float>(&self) -> Vec<T> {
        vec![T::ZERO; self.hp * self.g.wp * self.g.cp]
    }

    fn output_buffer<T: Float>(&self) -> Vec<T> {
        vec![T::ZERO; self.g.ho * self.g.wo * self.g.cp]
    }

    /// Copies one sample `(c, h, w)` into the input positions of `xin` (an `input_buffer`,
    /// whose padding stays zero), through a ReLU with `relu`.
    fn fill_input<T: Float>(&self, xs: &[T], relu: bool, xin: &mut [T]) {
        let (&DepthwiseGeometry { h, w, padding, .. }, &ChannelGeom { wp, cp, .. }) = (&self.geom, &self.g);
        for (ch, plane) in xs.chunks_exact(h * w).enumerate() {
            for r in self.rows.clone() {
                let src = &plane[(r - padding.top) * w..(r - padding.top + 1) * w];
                for q in self.cols.clone() {
                    let v = src[q - padding.left];
                    xin[(r * wp + q) * cp + ch] = if !relu || v >= T::ZERO { v } else { T::ZERO };
                }
            }
        }
    }

    /// Copies one sample's `(c, ho, wo)` planes into `(ho, wo, cp)` order.
    fn fill_output<T: Float>(&self, planes: &[T], dst: &mut [T]) {
        let cp = self.g.cp;
        for (ch, plane) in planes.chunks_exact(self.g.ho * self.g.wo).enumerate() {
            for (p, &v) in plane.iter().enumerate() {
                dst[p * cp + ch] = v;
            }
        }
    }

    /// Copies `(ho, wo, cp)` outputs back into one sample's `(c, ho, wo)` planes.
    fn unfill_output<T: Float>(&self, src: &[T], planes: &mut [T]) {
        let cp = self.g.cp;
        for (ch, plane) in planes.chunks_exact_mut(self.g.ho * self.g.wo).enumerate() {
            for (p, v) in plane.iter_mut().enumerate() {
                *v = src[p * cp + ch];
            }
        }
    }

    /// The depthwise forward of one sample `(c, h, w)` (through a ReLU with `relu`) into
    /// `out` `(c, ho, wo)`, with `wt` from [`weight`](Self::weight) and the buffers from
    /// [`input_buffer`](Self::input_buffer) (its padding zero) and
    /// [`output_buffer`](Self::output_buffer).
    fn forward<T: Float>(
        &self,
        isa: Isa,
        (xs, relu): (&[T], bool),
        wt: &[T],
        (xin, yout): (&mut [T], &mut [T]),
        out: &mut [T],
    ) {
        self.fill_input(xs, relu, xin);
        channel_correlate(isa, xin, wt, &self.g, yout);
        self.unfill_output(yout, out);
    }
}

/// [`forward`] for narrow outputs (at most `CHANNELS_MAX_WO` columns), vectorised over
/// channels instead of columns: a row of 2 outputs filled 2 of a register's 16 lanes, and
/// the work per plane was too small to pay for a call per plane. One rayon task per
/// sample transposes it into a zero-padded `(rows, cols, channels)` buffer (through the
/// ReLU with `relu`), correlates every position for all channels at once, and transposes
/// the result back.
fn forward_channels<T: Float>(isa: Isa, geom: &DepthwiseGeometry, xs: &[T], weight: &[T], relu: bool) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, ho, wo, .. } = geom;
    let layout = ChannelLayout::new(geom);
    let wt = layout.weight(weight);
    let mut out = Output::new(n * c * ho * wo);
    let buffers = || (layout.input_buffer(), layout.output_buffer());
    out.par_chunks_mut(c * ho * wo)
        .zip(xs.par_chunks(c * h * w))
        .for_each_init(buffers, |(xin, yout), (out, xs)| layout.forward(isa, (xs, relu), &wt, (xin, yout), out));
    out.into_vec()
}

/// `dxin[((y·s + ky·d)·wp + x·s + kx·d)·cp + ch] += wt[t·cp + ch] · g[(y·wo + x)·cp + ch]`
/// for every output position and tap: the transpose of [`channel_correlate_body`].
#[inline(always)]
fn channel_scatter_body<T: Float, const FMA: bool>(g: &[T], wt: &[T], geom: &ChannelGeom, dxin: &mut [T]) {
    let &ChannelGeom { ho, wo, kh, kw, stride: s, dilation: d, wp, cp } = geom;
    for y in 0..ho {
        for x in 0..wo {
            let gv = &g[(y * wo + x) * cp..(y * wo + x + 1) * cp];
            for ky in 0..kh {
                for kx in 0..kw {
                    let at = ((y * s + ky * d) * wp + x * s + kx * d) * cp;
                    let k = &wt[(ky * kw + kx) * cp..(ky * kw + kx + 1) * cp];
                    for ((dst, &gv), &k) in dxin[at..at + cp].iter_mut().zip(gv).zip(k) {
                        *dst = T::madd::<FMA>(k, gv, *dst);
                    }
                }
            }
        }
    }
}

multiversion!(fn channel_scatter(g: &[T], wt: &[T], geom: &ChannelGeom, dxin: &mut [T]) => channel_scatter_body);

/// [`grad_input`] for narrow outputs, channels innermost (see [`forward_channels`]): one
/// task per sample scatters its output gradient through the taps into a zeroed padded
/// buffer and copies the input positions back (zero where `relu_xs < 0`).
fn grad_input_channels<T: Float>(
    isa: Isa,
    geom: &DepthwiseGeometry,
    grad: &[T],
    weight: &[T],
    relu_xs: Option<&[T]>,
) -> Vec<T> {
    let &DepthwiseGeometry { c, h, w, ho, wo, padding, .. } = geom;
    let layout = ChannelLayout::new(geom);
    let wt = layout.weight(weight);
    let (wp, cp) = (layout.g.wp, layout.g.cp);
    // Input positions outside the padded window get no gradient: zeroed sample by sample on
    // the threads (`Output::zeroed`).
    let mut grad_xs = Output::<T>::zeroed(geom.n * c * h * w);
    let buffers = || (layout.output_buffer(), layout.input_buffer());
    grad_xs.par_chunks_mut(c * h * w).zip(grad.par_chunks(c * ho * wo)).enumerate().for_each_init(
        buffers,
        |(g, dxin), (b, (dx, grad))| {
            layout.fill_output(grad, g);
            dxin.fill(T::ZERO);
            channel_scatter(isa, g, &wt, &layout.g, dxin);
            for (ch, plane) in dx.chunks_exact_mut(h * w).enumerate() {
                let xs = relu_xs.map(|xs| &xs[(b * c + ch) * h * w..(b * c + ch + 1) * h * w]);
                for r in layout.rows.clone() {
                    for q in layout.cols.clone() {
                        let i = (r - padding.top) * w + q - padding.left;
                        let v = dxin[(r * wp + q) * cp + ch];
                        // Candle's ReLU rule: the gradient passes where `x >= 0`.
                        plane[i] = match xs {
                            Some(xs) if xs[i] >= T::ZERO => v,
                            Some(_) => T::ZERO,
                            None => v,
                        };
                    }
                }
            }
        },
    );
    grad_xs.into_vec()
}

/// `acc[t·cp + ch] += Σ over output positions of g[(y·wo + x)·cp + ch] · xin[((y·s + ky·d)·wp
/// + x·s + kx·d)·cp + ch]`: the weight gradient with channels innermost, one tap and up to
/// `BLOCK` channel registers at a time, summed over the positions in registers.
#[inline(always)]
fn channel_tap_dots_body<T: Float, const FMA: bool>(xin: &[T], g: &[T], geom: &ChannelGeom, acc: &mut [T]) {
    let &ChannelGeom { ho, wo, kh, kw, stride: s, dilation: d, wp, cp } = geom;
    let chunks = cp / LANES;
    for ky in 0..kh {
        for kx in 0..kw {
            let t = (ky * kw + kx) * cp;
            for c0 in (0..chunks).step_by(BLOCK) {
                let live = (chunks - c0).min(BLOCK);
                let mut sums = [[T::ZERO; LANES]; BLOCK];
                for y in 0..ho {
                    for x in 0..wo {
                        let at = ((y * s + ky * d) * wp + x * s + kx * d) * cp + c0 * LANES;
                        let gat = (y * wo + x) * cp + c0 * LANES;
                        for (i, sums) in sums.iter_mut().enumerate().take(live) {
                            let v: &[T; LANES] =
                                xin[at + i * LANES..at + (i + 1) * LANES].try_into().expect("LANES elements");
                            let gv: &[T; LANES] =
                                g[gat + i * LANES..gat + (i + 1) * LANES].try_into().expect("LANES elements");
                            for ((a, &v), &gv) in sums.iter_mut().zip(v).zip(gv) {
                                *a = T::madd::<FMA>(gv, v, *a);
                            }
                        }
                    }
                }
                for (i, sums) in sums.iter().enumerate().take(live) {
                    let at = t + (c0 + i) * LANES;
                    for (a, &v) in acc[at..at + LANES].iter_mut().zip(sums) {
                        *a += v;
                    }
                }
            }
        }
    }
}

multiversion!(fn channel_tap_dots(xin: &[T], g: &[T], geom: &ChannelGeom, acc: &mut [T]) => channel_tap_dots_body);

/// [`grad_weight`] for narrow outputs, channels innermost: the batch is cut into at most
/// `PARTS` runs of samples (fixed by the batch alone, so the sum is the same on every
/// machine); each run is one task accumulating `(kh·kw, cp)` sums, added in order.
fn grad_weight_channels<T: Float>(isa: Isa, geom: &DepthwiseGeometry, xs: &[T], grad: &[T], relu: bool) -> Vec<T> {
    const PARTS: usize = 16;
    let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
    let layout = ChannelLayout::new(geom);
    let (k2, cp) = (kh * kw, layout.g.cp);
    let per_part = n.div_ceil(n.min(PARTS));
    let parts: Vec<Vec<T>> = (0..n.div_ceil(per_part))
        .into_par_iter()
        .map(|part| {
            let (mut xin, mut g, mut acc) = (layout.input_buffer(), layout.output_buffer(), vec![T::ZERO; k2 * cp]);
            for b in part * per_part..((part + 1) * per_part).min(n) {
                layout.fill_input(&xs[b * c * h * w..(b + 1) * c * h * w], relu, &mut xin);
                layout.fill_output(&grad[b * c * ho * wo..(b + 1) * c * ho * wo], &mut g);
                channel_tap_dots(isa, &xin, &g, &layout.g, &mut acc);
            }
            acc
        })
        .collect();
    let mut grad_weight = vec![T::ZERO; c * k2];
    for part in &parts {
        for (ch, dk) in grad_weight.chunks_exact_mut(k2).enumerate() {
            for (t, d) in dk.iter_mut().enumerate() {
                *d += part[t * cp + ch];
            }
        }
    }
    grad_weight
}

/// One phase of the input gradient: the input positions `(iy0 + s·i, ix0 + s·j)` and the
/// kernel taps whose shift has their remainder mod `s`.
#[derive(Debug)]
struct Phase {
    /// Where output `(0, 0)` of the phase's correlation sits in the padded gradient.
    src_start: usize,
    /// Where it sits in the input-gradient plane.
    out_start: usize,
    grid: Grid,
    /// `(offset, index of the tap in the kernel)`.
    taps: Vec<(usize, usize)>,
}

/// The padded output-gradient plane the input gradient reads, and its phases.
///
/// Input row `iy` receives from output row `oy` through kernel row `ky` when
/// `iy + top = oy·s + ky·d`. Writing `iy + top = Q·s + a` (`a < s`), the rows that reach
/// it are the `ky` with `ky·d ≡ a (mod s)`, at `oy = Q - ⌊ky·d / s⌋`. With the gradient
/// shifted down by `offy = ⌊(kh - 1)·d / s⌋` rows, every offset is non-negative.
/// Columns likewise.
#[derive(Debug)]
struct GradLayout {
    rows: usize,
    row_len: usize,
    offy: usize,
    offx: usize,
    phases: Vec<Phase>,
}

impl GradLayout {
    fn new(geom: &DepthwiseGeometry) -> Self {
        let &DepthwiseGeometry { h, w, kh, kw, stride: s, dilation: d, padding, .. } = geom;
        let (offy, offx) = ((kh - 1) * d / s, (kw - 1) * d / s);
        let rows = (h - 1 + padding.top) / s + offy + 1;
        let row_len = (w - 1 + padding.left) / s + offx + 1;
        // For remainder `a` along an axis of `size` input positions padded by `before`:
        // the first position, how many there are, and the first `Q`.
        let axis = |a: usize, size: usize, before: usize| {
            let first = (a + s - before % s) % s;
            (first < size).then(|| (first, (size - first).div_ceil(s), (first + before) / s))
        };
        let mut phases = Vec::new();
        for a in 0..s {
            let Some((iy0, n_rows, q0)) = axis(a, h, padding.top) else { continue };
            for b in 0..s {
                let Some((ix0, n_cols, r0)) = axis(b, w, padding.left) else { continue };
                let taps: Vec<(usize, usize)> = (0..kh)
                    .filter(|ky| ky * d % s == a)
                    .flat_map(|ky| {
                        (0..kw)
                            .filter(move |kx| kx * d % s == b)
                            .map(move |kx| ((offy - ky * d / s) * row_len + (offx - kx * d / s), ky * kw + kx))
                    })
                    .collect();
                if taps.is_empty() {
                    // No tap reaches these positions: their gradient stays zero.
                    continue;
                }
                let reach = taps.iter().map(|&(offset, _)| offset).max().unwrap_or(0);
                let grid = Grid { rows: n_rows, cols: n_cols, src_row: row_len, out_row: s * w, out_col: s, reach };
                phases.push(Phase { src_start: q0 * row_len + r0, out_start: iy0 * w + ix0, grid, taps });
            }
        }
        GradLayout { rows, row_len, offy, offx, phases }
    }

    /// A zeroed scratch plane; `fill` writes only the gradient's own positions.
    fn scratch<T: Float>(&self) -> Vec<T> {
        vec![T::ZERO; self.rows * self.row_len + LANES]
    }

    /// Copies one `ho × wo` output-gradient plane into `dst` (a `scratch`), shifted by
    /// `(offy, offx)`; divided elementwise by `divisor` (an `ho × wo` plane) if given.
    fn fill<T: Float>(&self, geom: &DepthwiseGeometry, plane: &[T], divisor: Option<&[T]>, dst: &mut [T]) {
        let (ho, wo) = (geom.ho, geom.wo);
        let held = wo.min(self.row_len - self.offx);
        let rows = ho.min(self.rows.saturating_sub(self.offy));
        for (oy, dst) in dst.chunks_exact_mut(self.row_len).skip(self.offy).take(rows).enumerate() {
            let (dst, src) = (&mut dst[self.offx..self.offx + held], &plane[oy * wo..oy * wo + held]);
            match divisor {
                Some(divisor) => {
                    for ((d, &v), &q) in dst.iter_mut().zip(src).zip(&divisor[oy * wo..]) {
                        *d = v / q;
                    }
                }
                None => dst.copy_from_slice(src),
            }
        }
    }
}

/// `grad_xs[(n, c)]`, one rayon task per plane (each task owns its plane, so there are no
/// races). With `relu_xs`, the gradient of `xs.relu()` is taken back through the ReLU:
/// it is zero where `xs < 0`.
pub(crate) fn grad_input<T: Float>(
    isa: Isa,
    geom: &DepthwiseGeometry,
    grad: &[T],
    weight: &[T],
    relu_xs: Option<&[T]>,
) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, wo, .. } = geom;
    if wo <= CHANNELS_MAX_WO && n * c * h * w > 0 {
        return grad_input_channels(isa, geom, grad, weight, relu_xs);
    }
    transpose(isa, geom, grad, weight, None, relu_xs)
}

/// The input gradient of a windowed op whose output is `Σ weight[c, tap] * shifted xs`,
/// divided by `divisor` (an `ho × wo` plane) when given: the gradient is divided first,
/// then gathered back through the taps.
fn transpose<T: Float>(
    isa: Isa,
    geom: &DepthwiseGeometry,
    grad: &[T],
    weight: &[T],
    divisor: Option<&[T]>,
    relu_xs: Option<&[T]>,
) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
    if n * c * h * w == 0 {
        return Vec::new();
    }
    // Zeroed plane by plane on the threads (`Output::zeroed`).
    let mut grad_xs = Output::<T>::zeroed(n * c * h * w);
    let layout = GradLayout::new(geom);
    // At stride 1 and dilation 1 the one phase is a correlation with the kernel flipped
    // (tap (ky, kx) sits at offset (k − 1 − ky) · row + k − 1 − kx), so a square kernel
    // takes the row-blocked loop with the weights reversed.
    let row_blocked = takes_row_blocks(geom);
    grad_xs.par_chunks_mut(h * w).enumerate().for_each_init(
        || (layout.scratch(), Vec::with_capacity(kh * kw), Vec::with_capacity(kh * kw)),
        |(scratch, taps, flipped), (plane, dx)| {
            layout.fill(geom, &grad[plane * ho * wo..(plane + 1) * ho * wo], divisor, scratch);
            let k = &weight[(plane % c) * kh * kw..(plane % c + 1) * kh * kw];
            for phase in &layout.phases {
                taps.clear();
                taps.extend(phase.taps.iter().map(|&(offset, tap)| (offset, k[tap])));
                let (src, dx) = (&scratch[phase.src_start..], &mut dx[phase.out_start..]);
                if row_blocked {
                    flipped.clear();
                    flipped.extend(k.iter().rev().copied());
                    correlate_rows(isa, src, flipped, taps, &phase.grid, dx);
                } else {
                    correlate(isa, src, taps, &phase.grid, dx);
                }
            }
            if let Some(xs) = relu_xs {
                // Candle's ReLU rule: the gradient passes where `x >= 0` (not where x is NaN).
                for (d, &x) in dx.iter_mut().zip(&xs[plane * h * w..(plane + 1) * h * w]) {
                    *d = if x >= T::ZERO { *d } else { T::ZERO };
                }
            }
        },
    );
    grad_xs.into_vec()
}

/// Scratch elements the weight gradient stacks samples into (a few hundred KiB at most).
const STACK_ELEMS: usize = 1 << 15;

/// `grad_weight[c, tap] = Σ over n and output positions of grad * shifted xs` (of
/// `xs.relu()` with `relu`), one rayon task per channel that reduces over the batch.
/// Each block of taps accumulates in `LANES`-wide partial sums.
///
/// The padded planes of several samples are stacked in one scratch, each in a block of
/// `hb · stride` rows (`hb` output rows, the last `hb − ho` of them zero in the stacked
/// gradient), so that one `tap_dots` covers them all: on planes of a few pixels (the `small`
/// network's 4×4 and 2×2 cells) the work per call is so small that a call per plane was a
/// quarter of a training step.
pub(crate) fn grad_weight<T: Float>(isa: Isa, geom: &DepthwiseGeometry, xs: &[T], grad: &[T], relu: bool) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, stride: s, .. } = geom;
    let mut grad_weight = vec![T::ZERO; c * kh * kw];
    if grad_weight.is_empty() || h * w == 0 || n == 0 {
        return grad_weight;
    }
    if wo <= CHANNELS_MAX_WO {
        return grad_weight_channels(isa, geom, xs, grad, relu);
    }
    let layout = InputLayout::new(geom);
    let g_row = wo.next_multiple_of(LANES);
    // Output rows per stacked sample, and the padded rows they read.
    let hb = layout.rows.div_ceil(s);
    let block_len = hb * s * layout.row_len;
    let group = (STACK_ELEMS / block_len).clamp(1, n);
    // The gradient rows are copied into `g_row`-long rows whose tails (and the rows past
    // `ho` in each block) stay zero.
    let scratch = || (vec![T::ZERO; group * block_len + LANES], vec![T::ZERO; group * hb * g_row]);
    grad_weight.par_chunks_mut(kh * kw).enumerate().for_each_init(scratch, |(scratch, g), (channel, dk)| {
        for first in (0..n).step_by(group) {
            let m = group.min(n - first);
            for i in 0..m {
                let plane = (first + i) * c + channel;
                layout.fill(isa, &xs[plane * h * w..(plane + 1) * h * w], relu, &mut scratch[i * block_len..]);
                let src = &grad[plane * ho * wo..(plane + 1) * ho * wo];
                let dst = &mut g[i * hb * g_row..];
                for (dst, src) in dst.chunks_exact_mut(g_row).zip(src.chunks_exact(wo)) {
                    dst[..wo].copy_from_slice(src);
                }
            }
            let grid = Grid { rows: (m - 1) * hb + ho, ..layout.grid };
            tap_dots(isa, scratch, &layout.offsets, g, g_row, &grid, dk);
        }
    });
    grad_weight
}

/// SAME average pooling: the sum over each window (the kernel's taps, every weight one, the
/// padding zero) divided by `counts`, the number of real elements of each window (an
/// `ho × wo` plane, the same for every channel).
pub(crate) fn avg_pool<T: Float>(isa: Isa, geom: &DepthwiseGeometry, xs: &[T], counts: &[T]) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, ho, wo, .. } = geom;
    if n * c * ho * wo == 0 {
        return Vec::new();
    }
    let mut out = Output::new(n * c * ho * wo);
    let layout = InputLayout::new(geom);
    let taps: Vec<(usize, T)> = layout.offsets.iter().map(|&offset| (offset, T::ONE)).collect();
    out.par_chunks_mut(ho * wo).enumerate().for_each_init(
        || layout.scratch(T::ZERO),
        |scratch, (plane, out)| {
            avg_plane(isa, &layout, &taps, counts, &xs[plane * h * w..(plane + 1) * h * w], scratch, out)
        },
    );
    out.into_vec()
}

/// One plane of [`avg_pool`] (`taps` the kernel's offsets, each weight one).
fn avg_plane<T: Float>(
    isa: Isa,
    layout: &InputLayout,
    taps: &[(usize, T)],
    counts: &[T],
    xs: &[T],
    scratch: &mut [T],
    out: &mut [T],
) {
    layout.fill(isa, xs, false, scratch);
    correlate(isa, scratch, taps, &layout.grid, out);
    for (v, &count) in out.iter_mut().zip(counts) {
        *v /= count;
    }
}

/// The input gradient of [`avg_pool`]: `grad / count` goes to every real element of each
/// window.
pub(crate) fn avg_pool_grad<T: Float>(isa: Isa, geom: &DepthwiseGeometry, grad: &[T], counts: &[T]) -> Vec<T> {
    let ones = vec![T::ONE; geom.c * geom.kh * geom.kw];
    transpose(isa, geom, grad, &ones, Some(counts), None)
}

/// SAME max pooling: the largest real element of each window (the padding is `-inf`, and
/// every window holds a real element).
pub(crate) fn max_pool<T: Float>(isa: Isa, geom: &DepthwiseGeometry, xs: &[T]) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, ho, wo, .. } = geom;
    if n * c * ho * wo == 0 {
        return Vec::new();
    }
    let mut out = Output::new(n * c * ho * wo);
    let layout = InputLayout::new(geom);
    out.par_chunks_mut(ho * wo).enumerate().for_each_init(
        || layout.scratch(T::NEG_INFINITY),
        |scratch, (plane, out)| max_plane(isa, &layout, &xs[plane * h * w..(plane + 1) * h * w], scratch, out),
    );
    out.into_vec()
}

/// One plane of [`max_pool`] (`scratch` padded with `-inf`).
fn max_plane<T: Float>(isa: Isa, layout: &InputLayout, xs: &[T], scratch: &mut [T], out: &mut [T]) {
    layout.fill(isa, xs, false, scratch);
    window_max(isa, scratch, &layout.offsets, &layout.grid, out);
}

/// A windowed op prepared to run on one sample at a time, on the calling thread (the
/// per-sample cell inference of `kernels::cell_eval`): a depthwise forward or a SAME pool,
/// through the kernels of [`forward`], [`avg_pool`] and [`max_pool`]. Each instance needs
/// its own [`scratch`](Self::scratch): the padding written there once stays valid for
/// every sample of its geometry.
#[derive(Debug)]
pub(crate) struct SampleWindow<T> {
    /// Input `(c, h, w)` and output `(c, ho, wo)` of one sample.
    geom: DepthwiseGeometry,
    kind: SampleKind<T>,
}

#[derive(Debug)]
enum SampleKind<T> {
    /// Row path: the weight `(c, kh·kw)` and every channel's taps `(offset, weight)`.
    Depthwise {
        layout: InputLayout,
        weight: Vec<T>,
        taps: Vec<(usize, T)>,
        row_blocked: bool,
    },
    /// Channels-last path (narrow outputs), with the transposed weight.
    Channels {
        layout: ChannelLayout,
        wt: Vec<T>,
    },
    Avg {
        layout: InputLayout,
        taps: Vec<(usize, T)>,
        counts: Vec<T>,
    },
    Max {
        layout: InputLayout,
    },
}

impl<T: Float> SampleWindow<T> {
    /// The depthwise forward of `geom` (its `n` ignored) with `weight` `(c, kh·kw)`.
    pub(crate) fn depthwise(geom: &DepthwiseGeometry, weight: Vec<T>) -> Self {
        let geom = DepthwiseGeometry { n: 1, ..*geom };
        let kind = if geom.wo <= CHANNELS_MAX_WO {
            let layout = ChannelLayout::new(&geom);
            let wt = layout.weight(&weight);
            SampleKind::Channels { layout, wt }
        } else {
            let layout = InputLayout::new(&geom);
            let k2 = geom.kh * geom.kw;
            let taps =
                weight.chunks_exact(k2).flat_map(|k| layout.offsets.iter().copied().zip(k.iter().copied())).collect();
            SampleKind::Depthwise { row_blocked: takes_row_blocks(&geom), layout, weight, taps }
        };
        SampleWindow { geom, kind }
    }

    /// SAME average pooling over `geom`'s window, `counts` from `pool::PoolGeom::counts`.
    pub(crate) fn avg_pool(geom: &DepthwiseGeometry, counts: Vec<T>) -> Self {
        let geom = DepthwiseGeometry { n: 1, ..*geom };
        let layout = InputLayout::new(&geom);
        let taps = layout.offsets.iter().map(|&offset| (offset, T::ONE)).collect();
        SampleWindow { geom, kind: SampleKind::Avg { layout, taps, counts } }
    }

    /// SAME max pooling over `geom`'s window.
    pub(crate) fn max_pool(geom: &DepthwiseGeometry) -> Self {
        let geom = DepthwiseGeometry { n: 1, ..*geom };
        SampleWindow { geom, kind: SampleKind::Max { layout: InputLayout::new(&geom) } }
    }

    /// The working memory of [`run`](Self::run), padding written.
    pub(crate) fn scratch(&self) -> Vec<T> {
        match &self.kind {
            SampleKind::Depthwise { layout, .. } | SampleKind::Avg { layout, .. } => layout.scratch(T::ZERO),
            SampleKind::Max { layout } => layout.scratch(T::NEG_INFINITY),
            SampleKind::Channels { layout, .. } => {
                let mut buffer = layout.input_buffer();
                buffer.extend(layout.output_buffer::<T>());
                buffer
            }
        }
    }

    /// Input elements of one sample.
    pub(crate) fn in_len(&self) -> usize {
        self.geom.c * self.geom.h * self.geom.w
    }

    /// Output elements of one sample.
    pub(crate) fn out_len(&self) -> usize {
        self.geom.c * self.geom.ho * self.geom.wo
    }

    /// The op on one sample `xs` `(c, h, w)`, read through a ReLU with `relu` (depthwise
    /// only), into `out` `(c, ho, wo)`; `scratch` from this instance's
    /// [`scratch`](Self::scratch).
    pub(crate) fn run(&self, isa: Isa, xs: &[T], relu: bool, out: &mut [T], scratch: &mut [T]) {
        let &DepthwiseGeometry { c, h, w, ho, wo, .. } = &self.geom;
        let (plane, plane_out) = (h * w, ho * wo);
        assert!(xs.len() == c * plane && out.len() == c * plane_out, "SampleWindow::run: slice lengths");
        debug_assert!(!relu || matches!(self.kind, SampleKind::Depthwise { .. } | SampleKind::Channels { .. }));
        let planes = xs.chunks_exact(plane).zip(out.chunks_exact_mut(plane_out));
        match &self.kind {
            SampleKind::Depthwise { layout, weight, taps, row_blocked } => {
                let k2 = self.geom.kh * self.geom.kw;
                for (ch, (xs, out)) in planes.enumerate() {
                    let (k, taps) = (&weight[ch * k2..(ch + 1) * k2], &taps[ch * k2..(ch + 1) * k2]);
                    depthwise_plane(isa, layout, *row_blocked, (xs, relu), (k, taps), scratch, out);
                }
            }
            SampleKind::Channels { layout, wt } => {
                let (xin, yout) = scratch.split_at_mut(layout.hp * layout.g.wp * layout.g.cp);
                layout.forward(isa, (xs, relu), wt, (xin, yout), out);
            }
            SampleKind::Avg { layout, taps, counts } => {
                for (xs, out) in planes {
                    avg_plane(isa, layout, taps, counts, xs, scratch, out);
                }
            }
            SampleKind::Max { layout } => {
                for (xs, out) in planes {
                    max_plane(isa, layout, xs, scratch, out);
                }
            }
        }
    }
}

/// The offsets of every tap of a dense kernel `(c_in, kh, kw)` in a scratch holding the
/// `c_in` padded planes of one sample back to back, `plane_len` apart.
fn dense_offsets(layout: &InputLayout, c_in: usize, plane_len: usize) -> Vec<usize> {
    (0..c_in).flat_map(|ci| layout.offsets.iter().map(move |&offset| ci * plane_len + offset)).collect()
}

/// The forward grid of `layout` for the dense taps `offsets` (which reach further).
fn dense_grid(layout: &InputLayout, offsets: &[usize]) -> Grid {
    Grid { reach: offsets.iter().copied().max().unwrap_or(0), ..layout.grid }
}

/// Copies the `c_in` planes of sample `b` into `scratch` (`c_in` scratch planes back to back).
fn fill_sample<T: Float>(isa: Isa, layout: &InputLayout, xs: &[T], b: usize, plane_len: usize, scratch: &mut [T]) {
    let &DepthwiseGeometry { c, h, w, .. } = &layout.geom;
    for ci in 0..c {
        let plane = &xs[(b * c + ci) * h * w..(b * c + ci + 1) * h * w];
        layout.fill(isa, plane, false, &mut scratch[ci * plane_len..]);
    }
}

/// A dense convolution: `out[(b, co)] = Σ over ci and taps of weight[co, ci, tap] * shifted
/// xs[(b, ci)]`, for an input of `geom.c` channels and `c_out` output channels. Each task
/// copies the padded planes of one sample once and correlates them with the `c_in·kh·kw`
/// taps of each of its output channels; a sample is split across tasks by output channels
/// when there are fewer samples than tasks the threads need.
pub(crate) fn dense_forward<T: Float>(
    isa: Isa,
    geom: &DepthwiseGeometry,
    c_out: usize,
    xs: &[T],
    weight: &[T],
) -> Vec<T> {
    let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
    if n * c_out * ho * wo == 0 || h * w == 0 || c == 0 {
        return vec![T::ZERO; n * c_out * ho * wo];
    }
    let mut out = Output::new(n * c_out * ho * wo);
    let layout = InputLayout::new(geom);
    let plane_len = layout.rows * layout.row_len;
    let offsets = dense_offsets(&layout, c, plane_len);
    let grid = dense_grid(&layout, &offsets);
    let taps_per = c * kh * kw;
    let splits = (4 * rayon::current_num_threads()).div_ceil(n).clamp(1, c_out);
    let group = c_out.div_ceil(splits);
    out.par_chunks_mut(c_out * ho * wo).enumerate().for_each(|(b, out)| {
        out.par_chunks_mut(group * ho * wo).enumerate().for_each_init(
            || (vec![T::ZERO; c * plane_len + LANES], Vec::with_capacity(taps_per)),
            |(scratch, taps), (g, out)| {
                fill_sample(isa, &layout, xs, b, plane_len, scratch);
                for (j, out) in out.chunks_exact_mut(ho * wo).enumerate() {
                    let co = g * group + j;
                    let k = &weight[co * taps_per..(co + 1) * taps_per];
                    taps.clear();
                    taps.extend(offsets.iter().copied().zip(k.iter().copied()));
                    correlate(isa, scratch, taps, &grid, out);
                }
            },
        );
    });
    out.into_vec()
}

/// The weight gradient of [`dense_forward`]: `grad_weight[co, ci, tap] = Σ over samples and
/// output positions of grad[(b, co)] * shifted xs[(b, ci)]`. The batch is cut into at most
/// `DENSE_PARTS` contiguous runs of samples (a number fixed by the batch alone, so the sum
/// is the same on every machine and every run); each run is summed by one task, which
/// copies a sample's planes once for all output channels, and the runs' sums are added in
/// order.
pub(crate) fn dense_grad_weight<T: Float>(
    isa: Isa,
    geom: &DepthwiseGeometry,
    c_out: usize,
    xs: &[T],
    grad: &[T],
) -> Vec<T> {
    const DENSE_PARTS: usize = 16;
    let &DepthwiseGeometry { n, c, h, w, kh, kw, ho, wo, .. } = geom;
    let taps_per = c * kh * kw;
    let total = c_out * taps_per;
    if total == 0 || n == 0 || h * w == 0 {
        return vec![T::ZERO; total];
    }
    let layout = InputLayout::new(geom);
    let plane_len = layout.rows * layout.row_len;
    let offsets = dense_offsets(&layout, c, plane_len);
    let grid = dense_grid(&layout, &offsets);
    let g_row = wo.next_multiple_of(LANES);
    let per_part = n.div_ceil(n.min(DENSE_PARTS));
    let parts: Vec<Vec<T>> = (0..n.div_ceil(per_part))
        .into_par_iter()
        .map(|part| {
            let mut dk = vec![T::ZERO; total];
            let mut scratch = vec![T::ZERO; c * plane_len + LANES];
            // Output-gradient rows copied into `g_row`-long rows whose tails stay zero.
            let mut g = vec![T::ZERO; ho * g_row];
            for b in part * per_part..((part + 1) * per_part).min(n) {
                fill_sample(isa, &layout, xs, b, plane_len, &mut scratch);
                for (co, dk) in dk.chunks_exact_mut(taps_per).enumerate() {
                    let src = &grad[(b * c_out + co) * ho * wo..(b * c_out + co + 1) * ho * wo];
                    for (dst, src) in g.chunks_exact_mut(g_row).zip(src.chunks_exact(wo)) {
                        dst[..wo].copy_from_slice(src);
                    }
                    tap_dots(isa, &scratch, &offsets, &g, g_row, &grid, dk);
                }
            }
            dk
        })
        .collect();
    let mut sum = vec![T::ZERO; total];
    for part in &parts {
        for (s, &v) in sum.iter_mut().zip(part) {
            *s += v;
        }
    }
    sum
}
