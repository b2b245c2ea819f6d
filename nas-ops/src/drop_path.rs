//! ScheduledDropPath (paper §4 and §A.5; TF-Slim `drop_path`, `_apply_drop_path`, "v3").
//!
//! Each non-identity op output of a cell is dropped per example with probability
//! `1 − keep`, where `keep = 1 − r · ((c + 1) / L) · (1 − p)`: `p` is the config's
//! `drop_path_keep_prob`, `c` the cell's index over all cells in forward order, `L` the
//! network's `total_num_cells`, and `r = min(1, step / total_steps)` the training progress.
//! Kept examples are divided by the current `keep`. Masks come from a seeded generator
//! (candle's CPU device cannot be seeded), so a run is reproducible.

use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use nas_space::SpaceRng;

use crate::kernels::cpu_kernel;
use rayon::prelude::*;

/// The training progress and the mask generator, shared by every cell of a network.
#[derive(Debug, Clone)]
pub struct DropPathSchedule {
    inner: Arc<Mutex<ScheduleState>>,
}

#[derive(Debug)]
struct ScheduleState {
    progress: f64,
    rng: SpaceRng,
}

impl DropPathSchedule {
    /// A schedule at progress 0 with masks drawn from `seed`.
    pub fn new(seed: u64) -> DropPathSchedule {
        DropPathSchedule { inner: Arc::new(Mutex::new(ScheduleState { progress: 0.0, rng: SpaceRng::new(seed) })) }
    }

    /// Sets `r`, the fraction of training done (clamped to [0, 1]).
    pub fn set_progress(&self, progress: f64) {
        self.inner.lock().expect("drop-path state").progress = progress.clamp(0.0, 1.0);
    }

    /// The current `r`.
    pub fn progress(&self) -> f64 {
        self.inner.lock().expect("drop-path state").progress
    }

    /// The mask generator's state, to checkpoint.
    pub fn rng_state(&self) -> [u64; 4] {
        self.inner.lock().expect("drop-path state").rng.state()
    }

    /// Restores the mask generator's state.
    pub fn set_rng_state(&self, state: [u64; 4]) {
        self.inner.lock().expect("drop-path state").rng = SpaceRng::from_state(state);
    }

    /// `n` uniform draws in [0, 1).
    pub(crate) fn uniforms(&self, n: usize) -> Vec<f64> {
        let mut state = self.inner.lock().expect("drop-path state");
        (0..n).map(|_| state.rng.unit_f64()).collect()
    }
}

/// Drop path for the ops of one cell.
#[derive(Debug, Clone)]
pub struct DropPath {
    schedule: DropPathSchedule,
    cell_index: usize,
    total_cells: usize,
    keep_prob: f64,
}

impl DropPath {
    /// Drop path for cell `cell_index` of `total_cells`, reaching `keep_prob` at the end.
    pub fn new(schedule: DropPathSchedule, cell_index: usize, total_cells: usize, keep_prob: f64) -> DropPath {
        DropPath { schedule, cell_index, total_cells, keep_prob }
    }

    /// The keep probability now.
    pub fn keep(&self) -> f64 {
        let r = self.schedule.progress();
        let depth = (self.cell_index + 1) as f64 / self.total_cells as f64;
        1.0 - r * depth * (1.0 - self.keep_prob)
    }

    /// The factor of each of `batch` examples now: 0 or `1 / keep` (drawn from the
    /// schedule's generator), or `None` when nothing is dropped.
    pub fn scales(&self, batch: usize) -> Option<Vec<f64>> {
        let keep = self.keep();
        if keep >= 1.0 {
            return None;
        }
        Some(self.schedule.uniforms(batch).into_iter().map(|u| if u < keep { 1.0 / keep } else { 0.0 }).collect())
    }

    /// Multiplies each example of `xs` by 0 or `1 / keep`.
    ///
    /// # Shapes
    /// - `xs`: `(batch, c, h, w)`; returns the same shape
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        match self.scales(xs.dim(0)?) {
            Some(scales) => scale_examples(xs, &scales),
            None => Ok(xs.clone()),
        }
    }
}

/// `xs` with example `i` multiplied by `scales[i]` (taken in the dtype of `xs`).
///
/// # Shapes
/// - `xs`: `(batch, ...)`; `scales`: `batch` values; returns the shape of `xs`
pub fn scale_examples(xs: &Tensor, scales: &[f64]) -> Result<Tensor> {
    let mut dims = vec![1; xs.rank()];
    dims[0] = scales.len();
    let mask: Vec<f32> = scales.iter().map(|&s| s as f32).collect();
    let mask = Tensor::from_vec(mask, dims, xs.device())?.to_dtype(xs.dtype())?;
    xs.broadcast_mul(&mask)
}

/// `a · sa + b · sb` with per-example factors (`None`: 1), the add of a block with both
/// branches' drop path folded in: one pass, and the dropped branches are never stored.
/// Each product is rounded to the dtype before the add, as the unfused ops do.
///
/// # Shapes
/// - `a`, `b`: `(batch, ...)`, the same; `sa`, `sb`: `batch` values; returns the shape of `a`
pub fn drop_path_add(a: &Tensor, sa: Option<&[f64]>, b: &Tensor, sb: Option<&[f64]>) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("drop-path-add: the branches differ in shape, {:?} and {:?}", a.shape(), b.shape())
    }
    let batch = a.dim(0)?;
    for s in [sa, sb].into_iter().flatten() {
        if s.len() != batch {
            candle_core::bail!("drop-path-add: {} factors for a batch of {batch}", s.len())
        }
    }
    // Without factors the op is a plain add, which candle does on any device and dtype; on
    // the CPU in f32 or f64 the op runs it in parallel.
    let parallel_add = a.device().is_cpu() && matches!(a.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if sa.is_none() && sb.is_none() && !parallel_add {
        return a + b;
    }
    let op = ScaledAdd { sa: sa.map(<[f64]>::to_vec), sb: sb.map(<[f64]>::to_vec) };
    a.contiguous()?.apply_op2(&b.contiguous()?, op)
}

/// The op of [`drop_path_add`].
#[derive(Debug, Clone)]
struct ScaledAdd {
    sa: Option<Vec<f64>>,
    sb: Option<Vec<f64>>,
}

impl ScaledAdd {
    /// In parallel on rayon's pool, one task per example, or per chunk without factors.
    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        let per = match self.sa.as_ref().or(self.sb.as_ref()) {
            Some(factors) => a.len() / factors.len().max(1),
            None => 1 << 14,
        };
        if per == 0 {
            return Vec::new();
        }
        let factor = |s: &Option<Vec<f64>>, e: usize| s.as_ref().map(|s| T::from_f64(s[e] as f32 as f64));
        let mut out = crate::kernels::Output::<T>::new(a.len());
        out.par_chunks_mut(per).zip(a.par_chunks(per).zip(b.par_chunks(per))).enumerate().for_each(
            |(e, (out, (a, b)))| {
                let (fa, fb) = (factor(&self.sa, e), factor(&self.sb, e));
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    let x = fa.map_or(x, |f| x * f);
                    let y = fb.map_or(y, |f| y * f);
                    *o = x + y;
                }
            },
        );
        out.into_vec()
    }
}

impl CustomOp2 for ScaledAdd {
    fn name(&self) -> &'static str {
        "drop-path-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_kernel!(self.name(), [a = (s1, l1, "a"), b = (s2, l2, "b")], self.run(a, b));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        use crate::kernels::cuda::{by_dtype, same_dtype, scaled_add, view, wrap};
        let (op, dev) = (self.name(), s1.device());
        let total = l1.shape().elem_count();
        let per = total / l1.dims()[0].max(1);
        let out = by_dtype!(same_dtype(op, &[s1, s2])?, T => {
            // The factors rounded to f32 first, as `scale_examples` and the CPU kernel do.
            let cast = |s: &Option<Vec<f64>>| {
                s.as_ref().map(|s| s.iter().map(|&v| T::from_f64(f64::from(v as f32))).collect::<Vec<T>>())
            };
            let (sa, sb) = (cast(&self.sa), cast(&self.sb));
            let (a, b) = (view::<T>(op, s1, l1)?, view(op, s2, l2)?);
            wrap(scaled_add(dev, &a, sa.as_deref(), &b, sb.as_deref(), per, total)?, dev)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let side = |s: &Option<Vec<f64>>| match s {
            Some(s) => scale_examples(grad, s),
            None => Ok(grad.clone()),
        };
        Ok((Some(side(&self.sa)?), Some(side(&self.sb)?)))
    }
}
