//! ScheduledDropPath (paper §4 and §A.5; TF-Slim `drop_path`, `_apply_drop_path`, "v3").
//!
//! Each non-identity op output of a cell is dropped per example with probability
//! `1 − keep`, where `keep = 1 − r · ((c + 1) / L) · (1 − p)`: `p` is the config's
//! `drop_path_keep_prob`, `c` the cell's index over all cells in forward order, `L` the
//! network's `total_num_cells`, and `r = min(1, step / total_steps)` the training progress.
//! Kept examples are divided by the current `keep`. Masks come from a seeded generator
//! (candle's CPU device cannot be seeded), so a run is reproducible.

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use nas_space::SpaceRng;

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

    /// Multiplies each example of `xs` by 0 or `1 / keep`.
    ///
    /// # Shapes
    /// - `xs`: `(batch, c, h, w)`; returns the same shape
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let keep = self.keep();
        if keep >= 1.0 {
            return Ok(xs.clone());
        }
        let batch = xs.dim(0)?;
        let mask: Vec<f32> = self
            .schedule
            .uniforms(batch)
            .into_iter()
            .map(|u| if u < keep { (1.0 / keep) as f32 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (batch, 1, 1, 1), xs.device())?.to_dtype(xs.dtype())?;
        xs.broadcast_mul(&mask)
    }
}
