//! Optimisers, weight decay, gradient clipping and weight averaging with TF-Slim semantics.
//!
//! Follows the NASNet recipes as TF-Slim runs them:
//! - `tf.train.MomentumOptimizer` for CIFAR and the search children (momentum 0.9);
//! - `tf.train.RMSPropOptimizer` for ImageNet (decay 0.9, momentum 0.9, ε 1.0);
//! - L2 weight decay from the arg scopes (`slim.l2_regularizer`, a loss term `wd · Σw²/2`
//!   on conv, depthwise, pointwise and fully connected weights only);
//! - `tf.clip_by_global_norm` on the gradients of the total loss (CIFAR 5, ImageNet 10);
//! - `tf.train.ExponentialMovingAverage` of the weights for evaluation (paper: 0.9999);
//! - label-smoothed softmax cross-entropy (`tf.losses.softmax_cross_entropy`).
//!
//! Everything works on the candle `Var`s of a `VarMap`; BN moving statistics
//! (`running_mean`, `running_var`) are never trained nor weight-decayed.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Suffixes of the variables that hold BN moving statistics.
const STATISTICS_SUFFIXES: [&str; 2] = ["running_mean", "running_var"];

fn config_err(field: &'static str, message: impl Into<String>) -> TrainError {
    TrainError::Config { field, message: message.into() }
}

fn state_err(message: String) -> TrainError {
    TrainError::Checkpoint { path: PathBuf::from("optimizer state"), message }
}

/// Looks `key` up for a buffer shaped like `like`: the tensor on `like`'s device and dtype,
/// or `None` with the problem (missing, wrong shape) appended to `problems`.
fn take_buffer(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    like: &Tensor,
    problems: &mut Vec<String>,
) -> Result<Option<Tensor>, TrainError> {
    match tensors.get(key) {
        None => problems.push(format!("missing `{key}`")),
        Some(t) if t.dims() != like.dims() => {
            problems.push(format!("`{key}` has shape {:?}, expected {:?}", t.dims(), like.dims()))
        }
        Some(t) => return Ok(Some(t.to_device(like.device())?.to_dtype(like.dtype())?.detach())),
    }
    Ok(None)
}

/// One trainable variable.
#[derive(Debug, Clone)]
struct Param {
    name: String,
    var: Var,
    decay: bool,
}

/// The variables of a model split by role, sorted by name.
///
/// - *trainable*: every variable except BN moving statistics;
/// - *decay* (a subset of trainable): the weights that get L2 weight decay, i.e. conv,
///   depthwise, pointwise and fully connected weights, recognised as names ending in
///   `weight` with rank ≥ 2. BN γ/β (rank-1 `weight`/`bias`) and biases are not decayed,
///   as TF-Slim regularizes conv and FC weights only;
/// - *statistics*: names ending in `running_mean` or `running_var`, updated by the BN
///   layers themselves and never by an optimiser.
#[derive(Debug, Clone)]
pub struct ParamGroups {
    trainable: Vec<Param>,
    statistics: Vec<(String, Var)>,
}

impl ParamGroups {
    /// Splits the variables of `varmap` (see [`ParamGroups`]).
    pub fn from_varmap(varmap: &VarMap) -> ParamGroups {
        let data = varmap.data().lock().expect("varmap lock poisoned");
        ParamGroups::from_vars(data.iter().map(|(name, var)| (name.clone(), var.clone())))
    }

    /// Splits named variables (see [`ParamGroups`]).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, Var)>) -> ParamGroups {
        let mut vars: Vec<(String, Var)> = vars.into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut trainable = Vec::new();
        let mut statistics = Vec::new();
        for (name, var) in vars {
            if STATISTICS_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                statistics.push((name, var));
            } else {
                let is_weight = name == "weight" || name.ends_with(".weight");
                let decay = is_weight && var.as_tensor().rank() >= 2;
                trainable.push(Param { name, var, decay });
            }
        }
        ParamGroups { trainable, statistics }
    }

    /// Names of the trainable variables, sorted.
    pub fn trainable_names(&self) -> Vec<&str> {
        self.trainable.iter().map(|p| p.name.as_str()).collect()
    }

    /// Names of the weight-decayed variables, sorted.
    pub fn decay_names(&self) -> Vec<&str> {
        self.trainable.iter().filter(|p| p.decay).map(|p| p.name.as_str()).collect()
    }

    /// Names of the BN moving statistics, sorted.
    pub fn statistics_names(&self) -> Vec<&str> {
        self.statistics.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The trainable variables with their names, sorted.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.trainable.iter().map(|p| (p.name.clone(), p.var.clone())).collect()
    }

    /// The BN moving statistics with their names, sorted.
    pub fn statistics(&self) -> Vec<(String, Var)> {
        self.statistics.clone()
    }

    /// The number of trainable scalars.
    pub fn trainable_elem_count(&self) -> usize {
        self.trainable.iter().map(|p| p.var.elem_count()).sum()
    }
}

/// The update rule, with TF1 semantics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// `tf.train.MomentumOptimizer`: `accum = momentum · accum + grad`, then
    /// `var -= lr · accum`, or with Nesterov `var -= lr · (grad + momentum · accum)`.
    /// The accumulator starts at 0; `momentum = 0` is plain SGD.
    Sgd {
        /// The accumulator's decay (0.9 in every NASNet recipe).
        momentum: f64,
        /// Nesterov momentum (`use_nesterov`; off in the NASNet recipes).
        nesterov: bool,
    },
    /// `tf.train.RMSPropOptimizer` (uncentred):
    /// `ms = decay · ms + (1 − decay) · grad²`,
    /// `mom = momentum · mom + lr · grad / sqrt(ms + epsilon)`, `var -= mom`.
    ///
    /// As in TF1 (`rmsprop.py`, `_create_slots`), `ms` starts at **1.0**, not 0, and ε is
    /// inside the square root; `mom` starts at 0.
    /// Keras/TF2's `RMSprop` differs on both counts.
    #[serde(rename = "rmsprop")]
    RmsProp {
        /// Discount of the mean square (0.9 in TF-Slim and the paper).
        decay: f64,
        /// Momentum of the update (0.9 in TF-Slim).
        momentum: f64,
        /// Added to the mean square under the root (`opt_epsilon`, 1.0 for NASNet).
        epsilon: f64,
    },
}

impl OptimizerConfig {
    /// The names of the per-variable buffers this rule keeps, in export order.
    fn slot_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::Sgd { .. } => &["momentum"],
            OptimizerConfig::RmsProp { .. } => &["momentum", "rms"],
        }
    }
}

/// An update rule with weight decay and gradient clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimSettings {
    /// The update rule.
    pub optimizer: OptimizerConfig,
    /// The L2 coefficient `wd` of TF-Slim's `wd · Σw²/2` term, whose gradient `wd · w` is
    /// added for the decayed weights (see [`ParamGroups`]).
    pub weight_decay: f64,
    /// `tf.clip_by_global_norm` on all gradients (weight decay included), if set.
    pub clip_global_norm: Option<f64>,
}

impl OptimSettings {
    /// CIFAR: momentum 0.9 (not Nesterov), weight decay 5e-4,
    /// gradients clipped to global norm 5.
    /// The search children use the same optimiser; the paper does not give their
    /// weight decay.
    pub fn cifar() -> OptimSettings {
        OptimSettings {
            optimizer: OptimizerConfig::Sgd { momentum: 0.9, nesterov: false },
            weight_decay: 5e-4,
            clip_global_norm: Some(5.0),
        }
    }

    /// NASNet-A Mobile on ImageNet: RMSProp (decay 0.9, momentum 0.9, ε 1.0), weight decay
    /// 4e-5, clip 10.
    pub fn imagenet_mobile() -> OptimSettings {
        OptimSettings {
            optimizer: OptimizerConfig::RmsProp { decay: 0.9, momentum: 0.9, epsilon: 1.0 },
            weight_decay: 4e-5,
            clip_global_norm: Some(10.0),
        }
    }

    /// NASNet-A Large on ImageNet: RMSProp (decay 0.9, momentum 0.9, ε 1.0), weight decay
    /// 5e-5, clip 10.
    pub fn imagenet_large() -> OptimSettings {
        OptimSettings { weight_decay: 5e-5, ..OptimSettings::imagenet_mobile() }
    }

    /// Checks that every field is usable; the error names the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let unit = |field: &'static str, v: f64| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(config_err(field, format!("must be in [0, 1), got {v}")))
            }
        };
        match self.optimizer {
            OptimizerConfig::Sgd { momentum, .. } => unit("momentum", momentum)?,
            OptimizerConfig::RmsProp { decay, momentum, epsilon } => {
                unit("decay", decay)?;
                unit("momentum", momentum)?;
                if !epsilon.is_finite() || epsilon <= 0.0 {
                    return Err(config_err("epsilon", format!("must be finite and positive, got {epsilon}")));
                }
            }
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(config_err(
                "weight_decay",
                format!("must be finite and non-negative, got {}", self.weight_decay),
            ));
        }
        if let Some(clip) = self.clip_global_norm {
            if !clip.is_finite() || clip <= 0.0 {
                return Err(config_err("clip_global_norm", format!("must be finite and positive, got {clip}")));
            }
        }
        Ok(())
    }
}

/// What one [`Optimizer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The global norm of all gradients (weight decay included), before clipping.
    pub grad_norm: f64,
    /// Whether the gradients were scaled down by clipping.
    pub clipped: bool,
    /// How many variables had a gradient and were updated.
    pub updated: usize,
}

/// A trainable variable and its optimiser buffers.
#[derive(Debug)]
struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    /// `accum` of the momentum optimiser, or `mom` of RMSProp.
    momentum: Tensor,
    /// `ms` of RMSProp.
    rms: Option<Tensor>,
}

/// An optimiser over the trainable variables of a [`ParamGroups`].
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{Init, VarMap};
/// use nas_train::optim::{OptimSettings, Optimizer, ParamGroups};
/// use nas_train::schedule::LrSchedule;
///
/// # fn main() -> Result<(), nas_train::TrainError> {
/// let varmap = VarMap::new();
/// let w = varmap.get((1, 2), "fc.weight", Init::Const(1.0), DType::F32, &Device::Cpu)?;
/// let groups = ParamGroups::from_varmap(&varmap);
/// let schedule = LrSchedule::cifar(100);
/// let mut opt = Optimizer::new(OptimSettings::cifar(), &groups)?;
/// for step in 0..3 {
///     let loss = w.sqr()?.sum_all()?;
///     let stats = opt.step(&loss.backward()?, schedule.lr(step))?;
///     assert!(!stats.clipped);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Optimizer {
    settings: OptimSettings,
    params: Vec<ParamState>,
}

impl Optimizer {
    /// Validates `settings` and creates the buffers: momentum at 0, RMSProp's mean square at 1.
    pub fn new(settings: OptimSettings, groups: &ParamGroups) -> Result<Optimizer, TrainError> {
        settings.validate()?;
        let params = groups
            .trainable
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                let momentum = t.zeros_like()?.detach();
                let rms = match settings.optimizer {
                    OptimizerConfig::RmsProp { .. } => Some(t.ones_like()?.detach()),
                    OptimizerConfig::Sgd { .. } => None,
                };
                Ok(ParamState { name: p.name.clone(), var: p.var.clone(), decay: p.decay, momentum, rms })
            })
            .collect::<Result<_, TrainError>>()?;
        Ok(Optimizer { settings, params })
    }

    /// The settings this optimiser runs with.
    pub fn settings(&self) -> &OptimSettings {
        &self.settings
    }

    /// One update with learning rate `lr`.
    ///
    /// In order, as TF-Slim's trainer does:
    /// 1. for every trainable variable with a gradient in `grads` (the others are skipped,
    ///    buffers included), adds `weight_decay · w` if it is a decayed weight;
    /// 2. computes the global norm of these gradients and, when `clip_global_norm` is set,
    ///    scales them all by `clip / max(norm, clip)`;
    /// 3. applies the update rule.
    ///
    /// A non-finite global norm is an error and leaves every variable and buffer unchanged
    /// (TF would write NaNs into the weights).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats, TrainError> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(config_err("lr", format!("must be finite and non-negative, got {lr}")));
        }
        let wd = self.settings.weight_decay;
        let mut work = Vec::new();
        for (idx, p) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(p.var.as_tensor()) else { continue };
            let mut grad = grad.detach();
            if p.decay && wd > 0.0 {
                grad = (grad + (p.var.as_detached_tensor() * wd)?)?;
            }
            work.push((idx, grad));
        }
        let grad_norm = global_norm(work.iter().map(|(_, g)| g))?;
        if !grad_norm.is_finite() {
            let message = format!("gradient global norm is {grad_norm}; no update applied");
            return Err(TrainError::Candle(candle_core::Error::Msg(message)));
        }
        let mut clipped = false;
        if let Some(clip) = self.settings.clip_global_norm {
            if grad_norm > clip {
                clipped = true;
                let scale = clip / grad_norm;
                for (_, g) in work.iter_mut() {
                    *g = (&*g * scale)?;
                }
            }
        }
        let updated = work.len();
        for (idx, grad) in work {
            let p = &mut self.params[idx];
            let w = p.var.as_detached_tensor();
            match self.settings.optimizer {
                OptimizerConfig::Sgd { momentum, nesterov } => {
                    let accum = ((&p.momentum * momentum)? + &grad)?;
                    let delta = if nesterov { (&grad + (&accum * momentum)?)? } else { accum.clone() };
                    p.var.set(&(w - (delta * lr)?)?)?;
                    p.momentum = accum;
                }
                OptimizerConfig::RmsProp { decay, momentum, epsilon } => {
                    let ms = p.rms.as_ref().expect("rmsprop keeps a mean square");
                    let ms = ((ms * decay)? + (grad.sqr()? * (1.0 - decay))?)?;
                    let step = ((&grad * lr)? / (&ms + epsilon)?.sqrt()?)?;
                    let mom = ((&p.momentum * momentum)? + step)?;
                    p.var.set(&(w - &mom)?)?;
                    p.momentum = mom;
                    p.rms = Some(ms);
                }
            }
        }
        Ok(StepStats { grad_norm, clipped, updated })
    }

    /// The optimiser buffers, named `<var name>/momentum` (and `<var name>/rms` for RMSProp),
    /// sorted by variable name. The tensors are snapshots: later steps do not change them.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push((format!("{}/momentum", p.name), p.momentum.clone()));
            if let Some(rms) = &p.rms {
                out.push((format!("{}/rms", p.name), rms.clone()));
            }
        }
        out
    }

    /// Restores the buffers that [`Optimizer::state`] exported.
    ///
    /// Every buffer this optimiser keeps must be in `tensors` with its variable's shape;
    /// otherwise nothing is changed and the error (a [`TrainError::Checkpoint`] whose path
    /// reads `optimizer state`, for the caller to replace) names every missing or misshaped
    /// buffer. Entries this optimiser does not keep are ignored. Tensors are moved to each
    /// variable's device and dtype.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        let slots = self.settings.optimizer.slot_names();
        let mut problems = Vec::new();
        let mut loaded = Vec::new();
        for p in &self.params {
            let var = p.var.as_tensor();
            for slot in slots {
                if let Some(t) = take_buffer(tensors, &format!("{}/{slot}", p.name), var, &mut problems)? {
                    loaded.push(t);
                }
            }
        }
        if !problems.is_empty() {
            return Err(state_err(problems.join(", ")));
        }
        let mut loaded = loaded.into_iter();
        for p in &mut self.params {
            p.momentum = loaded.next().expect("one tensor per slot");
            if p.rms.is_some() {
                p.rms = Some(loaded.next().expect("one tensor per slot"));
            }
        }
        Ok(())
    }
}

/// `sqrt(Σ ‖g‖²)` over `grads`, accumulated in f64 (`tf.linalg.global_norm`); 0 when empty.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f64, TrainError> {
    let sums = grads.into_iter().map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64)).collect::<Result<Vec<_>, _>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// One averaged variable.
#[derive(Debug)]
struct EmaEntry {
    name: String,
    var: Var,
    shadow: Tensor,
}

/// An exponential moving average of variables, as TF's `tf.train.ExponentialMovingAverage`:
/// `shadow = decay · shadow + (1 − decay) · w`, each shadow starting at its variable's value
/// when the average is created.
///
/// The paper evaluates ImageNet models with the average at decay 0.9999.
/// TF-Slim's trainer passes `num_updates = global_step`, which makes the effective decay
/// `min(decay, (1 + step) / (10 + step))` ([`Ema::update_at`]), and averages all model
/// variables, BN moving statistics included ([`Ema::model_variables`]).
///
/// To evaluate with the averaged weights, [`Ema::swap`] them in, evaluate, and swap again to
/// restore the trained ones, or use [`Ema::with_averaged`].
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    entries: Vec<EmaEntry>,
    swapped: bool,
}

impl Ema {
    /// Averages `vars` with `decay`, which must lie in [0, 1].
    pub fn new(decay: f64, vars: impl IntoIterator<Item = (String, Var)>) -> Result<Ema, TrainError> {
        if !decay.is_finite() || !(0.0..=1.0).contains(&decay) {
            return Err(config_err("ema_decay", format!("must be in [0, 1], got {decay}")));
        }
        let mut entries = vars
            .into_iter()
            .map(|(name, var)| {
                let shadow = var.as_detached_tensor().copy()?;
                Ok(EmaEntry { name, var, shadow })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Ema { decay, entries, swapped: false })
    }

    /// Averages the trainable variables.
    pub fn trainable(decay: f64, groups: &ParamGroups) -> Result<Ema, TrainError> {
        Ema::new(decay, groups.trainable())
    }

    /// Averages the trainable variables and the BN moving statistics, as TF-Slim does
    /// (`slim.get_model_variables()`).
    pub fn model_variables(decay: f64, groups: &ParamGroups) -> Result<Ema, TrainError> {
        Ema::new(decay, groups.trainable().into_iter().chain(groups.statistics()))
    }

    /// The decay used at update number `num_updates`: `min(decay, (1 + n) / (10 + n))`, or
    /// `decay` when `None`.
    pub fn decay_at(&self, num_updates: Option<u64>) -> f64 {
        match num_updates {
            Some(n) => self.decay.min((1.0 + n as f64) / (10.0 + n as f64)),
            None => self.decay,
        }
    }

    /// Names of the averaged variables, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The averaged value of `name` (the trained one while swapped).
    pub fn shadow(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|e| e.name == name).map(|e| &e.shadow)
    }

    /// Whether the averaged weights are currently in the variables.
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// Moves every shadow towards its variable with the fixed decay.
    pub fn update(&mut self) -> Result<(), TrainError> {
        self.update_with(self.decay)
    }

    /// Moves every shadow towards its variable with TF's `num_updates` decay
    /// ([`Ema::decay_at`]), as TF-Slim does with `num_updates = global_step`.
    pub fn update_at(&mut self, num_updates: u64) -> Result<(), TrainError> {
        self.update_with(self.decay_at(Some(num_updates)))
    }

    fn update_with(&mut self, decay: f64) -> Result<(), TrainError> {
        if self.swapped {
            return Err(config_err("ema", "cannot update while the averaged weights are swapped in".to_string()));
        }
        for e in &mut self.entries {
            let w = e.var.as_detached_tensor();
            e.shadow = ((&e.shadow * decay)? + (w * (1.0 - decay))?)?;
        }
        Ok(())
    }

    /// Exchanges the variables' values with the shadows. Call once to evaluate with the
    /// averaged weights and once more to restore the trained ones.
    pub fn swap(&mut self) -> Result<(), TrainError> {
        for e in &mut self.entries {
            let current = e.var.as_detached_tensor().copy()?;
            e.var.set(&e.shadow)?;
            e.shadow = current;
        }
        self.swapped = !self.swapped;
        Ok(())
    }

    /// Runs `f` with the averaged weights swapped in, and restores the trained weights
    /// afterwards, also when `f` fails.
    pub fn with_averaged<T>(&mut self, f: impl FnOnce() -> Result<T, TrainError>) -> Result<T, TrainError> {
        self.swap()?;
        let out = f();
        self.swap()?;
        out
    }

    /// Writes the averaged values into the variables of the same names in another
    /// `varmap` (e.g. a separate evaluation copy of the network). Every averaged name must
    /// exist there with the same shape.
    pub fn apply_to(&self, varmap: &VarMap) -> Result<(), TrainError> {
        let data = varmap.data().lock().expect("varmap lock poisoned");
        let mut problems = Vec::new();
        for e in &self.entries {
            match data.get(&e.name) {
                None => problems.push(format!("missing `{}`", e.name)),
                Some(v) if v.dims() != e.shadow.dims() => {
                    problems.push(format!("`{}` has shape {:?}, expected {:?}", e.name, v.dims(), e.shadow.dims()))
                }
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(config_err("ema", format!("cannot apply to varmap: {}", problems.join(", "))));
        }
        for e in &self.entries {
            let v = &data[&e.name];
            // While swapped the averages live in the variables; copy them so that applying to
            // the averaged VarMap itself is a no-op rather than a self-assignment.
            let avg = if self.swapped { e.var.as_detached_tensor().copy()? } else { e.shadow.clone() };
            v.set(&avg.to_device(v.device())?.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    /// The shadows, named `<var name>/ema` and sorted (the averaged values even while
    /// swapped).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        self.entries
            .iter()
            .map(|e| {
                let avg = if self.swapped { e.var.as_detached_tensor().copy()? } else { e.shadow.clone() };
                Ok((format!("{}/ema", e.name), avg))
            })
            .collect()
    }

    /// Restores the shadows that [`Ema::state`] exported; errors like
    /// [`Optimizer::load_state`]. Must not be called while swapped.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        if self.swapped {
            return Err(config_err("ema", "cannot load while the averaged weights are swapped in".to_string()));
        }
        let mut problems = Vec::new();
        let mut loaded = Vec::new();
        for e in &self.entries {
            if let Some(t) = take_buffer(tensors, &format!("{}/ema", e.name), e.var.as_tensor(), &mut problems)? {
                loaded.push(t);
            }
        }
        if !problems.is_empty() {
            return Err(state_err(problems.join(", ")));
        }
        for (e, t) in self.entries.iter_mut().zip(loaded) {
            e.shadow = t;
        }
        Ok(())
    }
}

/// Softmax cross-entropy with label smoothing, averaged over the batch, as TF's
/// `tf.losses.softmax_cross_entropy(onehot, logits, label_smoothing=ε)`: the targets are
/// `(1 − ε) · onehot + ε / K`. NASNet uses ε = 0.1 on ImageNet; ε = 0 is
/// `candle_nn::loss::cross_entropy`.
///
/// # Shapes
/// - `logits`: `(batch, num_classes)`
/// - `labels`: `(batch,)`, integer class indices
/// - returns: a scalar
pub fn cross_entropy_smoothed(logits: &Tensor, labels: &Tensor, smoothing: f64) -> candle_core::Result<Tensor> {
    if !(0.0..=1.0).contains(&smoothing) {
        candle_core::bail!("cross_entropy_smoothed: smoothing must be in [0, 1], got {smoothing}");
    }
    let (b, _k) = logits.dims2()?;
    if labels.dims() != [b] {
        candle_core::bail!(
            "cross_entropy_smoothed: logits {:?} need labels of shape [{b}], got {:?}",
            logits.dims(),
            labels.dims()
        );
    }
    let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
    // −log p[label] per example.
    let nll = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    if smoothing == 0.0 {
        return nll.mean_all();
    }
    // −(1/K) Σ_k log p[k] per example.
    let uniform = log_probs.mean(1)?.neg()?;
    ((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?.mean_all()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::VarMap;

    use super::*;

    fn var(values: &[f32]) -> Var {
        Var::from_slice(values, values.len(), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{got:?} vs {want:?}");
        }
    }

    fn grads_for(pairs: &[(&Var, &[f32])]) -> GradStore {
        let mut grads = GradStore::default();
        for (v, g) in pairs {
            grads.insert(v.as_tensor(), Tensor::from_slice(g, v.shape(), &Device::Cpu).unwrap());
        }
        grads
    }

    /// One variable `w` (rank 1, so never decayed) under `settings`.
    fn single(settings: OptimSettings, init: &[f32]) -> (Var, Optimizer) {
        let w = var(init);
        let groups = ParamGroups::from_vars([("w".to_string(), w.clone())]);
        let opt = Optimizer::new(settings, &groups).unwrap();
        (w, opt)
    }

    fn sgd(momentum: f64, nesterov: bool) -> OptimSettings {
        OptimSettings {
            optimizer: OptimizerConfig::Sgd { momentum, nesterov },
            weight_decay: 0.0,
            clip_global_norm: None,
        }
    }

    #[test]
    fn plain_sgd_one_step() {
        let (w, mut opt) = single(sgd(0.0, false), &[1.0, -2.0]);
        let stats = opt.step(&grads_for(&[(&w, &[0.5, 1.0])]), 0.1).unwrap();
        assert_close(&values(w.as_tensor()), &[1.0 - 0.05, -2.0 - 0.1]);
        assert!(!stats.clipped);
        assert_eq!(stats.updated, 1);
        assert!((stats.grad_norm - 1.25f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn momentum_two_steps() {
        // accum1 = g1 = 1; w1 = 1 − 0.1·1 = 0.9.
        // accum2 = 0.9·1 + 2 = 2.9; w2 = 0.9 − 0.1·2.9 = 0.61.
        let (w, mut opt) = single(sgd(0.9, false), &[1.0]);
        opt.step(&grads_for(&[(&w, &[1.0])]), 0.1).unwrap();
        assert_close(&values(w.as_tensor()), &[0.9]);
        opt.step(&grads_for(&[(&w, &[2.0])]), 0.1).unwrap();
        assert_close(&values(w.as_tensor()), &[0.61]);
        assert_close(&values(&opt.state()[0].1), &[2.9]);
    }

    #[test]
    fn nesterov_two_steps() {
        // accum1 = 1; w1 = 1 − 0.1·(1 + 0.9·1) = 0.81.
        // accum2 = 0.9 + 2 = 2.9; w2 = 0.81 − 0.1·(2 + 0.9·2.9) = 0.81 − 0.461 = 0.349.
        let (w, mut opt) = single(sgd(0.9, true), &[1.0]);
        opt.step(&grads_for(&[(&w, &[1.0])]), 0.1).unwrap();
        assert_close(&values(w.as_tensor()), &[0.81]);
        opt.step(&grads_for(&[(&w, &[2.0])]), 0.1).unwrap();
        assert_close(&values(w.as_tensor()), &[0.349]);
    }

    #[test]
    fn rmsprop_two_steps_tf1_semantics() {
        let settings = OptimSettings {
            optimizer: OptimizerConfig::RmsProp { decay: 0.9, momentum: 0.9, epsilon: 1.0 },
            weight_decay: 0.0,
            clip_global_norm: None,
        };
        let (w, mut opt) = single(settings, &[1.0, 0.0]);
        let (lr, g1, g2) = (0.1f64, [2.0f64, -1.0], [1.0f64, 3.0]);
        // ms starts at 1 (TF1), mom at 0.
        let mut expected_w = [1.0f64, 0.0];
        let mut ms = [1.0f64, 1.0];
        let mut mom = [0.0f64, 0.0];
        for g in [g1, g2] {
            for i in 0..2 {
                ms[i] = 0.9 * ms[i] + 0.1 * g[i] * g[i];
                mom[i] = 0.9 * mom[i] + lr * g[i] / (ms[i] + 1.0).sqrt();
                expected_w[i] -= mom[i];
            }
            let gf: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            opt.step(&grads_for(&[(&w, &gf)]), lr).unwrap();
            assert_close(&values(w.as_tensor()), &expected_w);
        }
        // First step by hand: ms = 0.9 + 0.4 = 1.3, mom = 0.2 / sqrt(2.3), w = 1 − 0.131876.
        let first = 1.0 - 0.2 / 2.3f64.sqrt();
        assert!((first - 0.868_124).abs() < 1e-6);
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        assert_close(&values(&state["w/rms"]), &ms);
        assert_close(&values(&state["w/momentum"]), &mom);
    }

    /// A VarMap shaped like one ActConvBn + classifier, with timm's names.
    fn tiny_varmap() -> VarMap {
        let vm = VarMap::new();
        let dev = Device::Cpu;
        let put = |name: &str, t: Tensor| {
            vm.data().lock().unwrap().insert(name.to_string(), Var::from_tensor(&t).unwrap());
        };
        put("cell_0.conv_1x1.conv.weight", Tensor::ones((2, 2, 1, 1), DType::F32, &dev).unwrap());
        put("cell_0.sep.depthwise_conv2d.weight", Tensor::ones((2, 1, 3, 3), DType::F32, &dev).unwrap());
        put("cell_0.conv_1x1.bn.weight", Tensor::ones(2, DType::F32, &dev).unwrap());
        put("cell_0.conv_1x1.bn.bias", Tensor::ones(2, DType::F32, &dev).unwrap());
        put("cell_0.conv_1x1.bn.running_mean", Tensor::ones(2, DType::F32, &dev).unwrap());
        put("cell_0.conv_1x1.bn.running_var", Tensor::ones(2, DType::F32, &dev).unwrap());
        put("last_linear.weight", Tensor::ones((3, 2), DType::F32, &dev).unwrap());
        put("last_linear.bias", Tensor::ones(3, DType::F32, &dev).unwrap());
        vm
    }

    fn get(vm: &VarMap, name: &str) -> Var {
        vm.data().lock().unwrap()[name].clone()
    }

    #[test]
    fn groups_split_by_name_and_rank() {
        let groups = ParamGroups::from_varmap(&tiny_varmap());
        assert_eq!(
            groups.trainable_names(),
            [
                "cell_0.conv_1x1.bn.bias",
                "cell_0.conv_1x1.bn.weight",
                "cell_0.conv_1x1.conv.weight",
                "cell_0.sep.depthwise_conv2d.weight",
                "last_linear.bias",
                "last_linear.weight",
            ]
        );
        assert_eq!(
            groups.decay_names(),
            ["cell_0.conv_1x1.conv.weight", "cell_0.sep.depthwise_conv2d.weight", "last_linear.weight"]
        );
        assert_eq!(groups.statistics_names(), ["cell_0.conv_1x1.bn.running_mean", "cell_0.conv_1x1.bn.running_var"]);
        assert_eq!(groups.trainable_elem_count(), 2 + 2 + 4 + 18 + 3 + 6);
    }

    #[test]
    fn weight_decay_only_on_conv_and_fc_weights() {
        let vm = tiny_varmap();
        let groups = ParamGroups::from_varmap(&vm);
        let settings = OptimSettings { weight_decay: 0.5, ..sgd(0.0, false) };
        let mut opt = Optimizer::new(settings, &groups).unwrap();
        // Zero gradients everywhere, running statistics included: only decay moves weights.
        let mut grads = GradStore::default();
        for v in vm.all_vars() {
            grads.insert(v.as_tensor(), v.as_tensor().zeros_like().unwrap());
        }
        let stats = opt.step(&grads, 0.1).unwrap();
        assert_eq!(stats.updated, 6, "running statistics are never updated");
        // w = 1 − 0.1 · 0.5 · 1 = 0.95 for decayed weights; 1 for the others.
        for name in groups.trainable_names().into_iter().chain(groups.statistics_names()) {
            let want = if groups.decay_names().contains(&name) { 0.95 } else { 1.0 };
            let got = values(get(&vm, name).as_tensor());
            assert_close(&got, &vec![want; got.len()]);
        }
        // The pre-clip norm includes the decay gradient: 0.5 · sqrt(4 + 18 + 6).
        assert!((stats.grad_norm - 0.5 * 28f64.sqrt()).abs() < 1e-6, "{}", stats.grad_norm);
    }

    #[test]
    fn variables_without_gradient_are_skipped() {
        let a = var(&[1.0]);
        let b = var(&[1.0]);
        let groups = ParamGroups::from_vars([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]);
        let mut opt = Optimizer::new(sgd(0.9, false), &groups).unwrap();
        let stats = opt.step(&grads_for(&[(&a, &[1.0])]), 0.1).unwrap();
        assert_eq!(stats.updated, 1);
        assert_close(&values(a.as_tensor()), &[0.9]);
        assert_close(&values(b.as_tensor()), &[1.0]);
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        assert_close(&values(&state["b/momentum"]), &[0.0]);
    }

    #[test]
    fn global_norm_clipping() {
        let a = var(&[0.0, 0.0]);
        let b = var(&[0.0]);
        let groups = ParamGroups::from_vars([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]);
        let settings = OptimSettings { clip_global_norm: Some(2.5), ..sgd(0.0, false) };
        let mut opt = Optimizer::new(settings, &groups).unwrap();
        // Global norm sqrt(9 + 16 + 0) = 5 > 2.5: every gradient is halved.
        let stats = opt.step(&grads_for(&[(&a, &[3.0, 4.0]), (&b, &[0.0])]), 1.0).unwrap();
        assert!(stats.clipped);
        assert!((stats.grad_norm - 5.0).abs() < 1e-6);
        assert_close(&values(a.as_tensor()), &[-1.5, -2.0]);
        // Below the threshold nothing is scaled.
        let stats = opt.step(&grads_for(&[(&a, &[1.0, 0.0]), (&b, &[-2.0])]), 1.0).unwrap();
        assert!(!stats.clipped);
        assert!((stats.grad_norm - 5f64.sqrt()).abs() < 1e-6);
        assert_close(&values(a.as_tensor()), &[-2.5, -2.0]);
        assert_close(&values(b.as_tensor()), &[2.0]);
    }

    #[test]
    fn non_finite_gradient_changes_nothing() {
        let (w, mut opt) = single(sgd(0.9, false), &[1.0]);
        let err = opt.step(&grads_for(&[(&w, &[f32::NAN])]), 0.1).unwrap_err();
        assert!(err.to_string().contains("norm"), "{err}");
        assert_close(&values(w.as_tensor()), &[1.0]);
        assert_close(&values(&opt.state()[0].1), &[0.0]);
    }

    #[test]
    fn real_backward_pass() {
        // loss = Σ (w · x) with w a (1, 2) FC weight: dloss/dw = x.
        let vm = VarMap::new();
        let w = vm.get((1, 2), "fc.weight", candle_nn::Init::Const(1.0), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[3.0f32], [4.0]], &Device::Cpu).unwrap();
        let loss = w.matmul(&x).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let groups = ParamGroups::from_varmap(&vm);
        let settings = OptimSettings { weight_decay: 0.1, ..sgd(0.0, false) };
        let mut opt = Optimizer::new(settings, &groups).unwrap();
        opt.step(&grads, 0.5).unwrap();
        // g = x + 0.1 · w = (3.1, 4.1); w = 1 − 0.5 · g.
        assert_close(&values(&vm.all_vars()[0].as_tensor().clone()), &[1.0 - 1.55, 1.0 - 2.05]);
    }

    #[test]
    fn state_round_trip_gives_identical_next_step() {
        for settings in [sgd(0.9, true), OptimSettings::imagenet_mobile()] {
            let (w1, mut opt1) = single(settings, &[1.0, 2.0]);
            opt1.step(&grads_for(&[(&w1, &[0.3, -0.7])]), 0.1).unwrap();
            let exported: HashMap<String, Tensor> = opt1.state().into_iter().collect();
            let state = opt1.state();
            let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
            match settings.optimizer {
                OptimizerConfig::Sgd { .. } => assert_eq!(names, ["w/momentum"]),
                OptimizerConfig::RmsProp { .. } => assert_eq!(names, ["w/momentum", "w/rms"]),
            }
            // A fresh optimiser on a copy of the weights, restored from the export.
            let (w2, mut opt2) = single(settings, &values(w1.as_tensor()));
            opt2.load_state(&exported).unwrap();
            opt1.step(&grads_for(&[(&w1, &[1.0, 0.5])]), 0.05).unwrap();
            opt2.step(&grads_for(&[(&w2, &[1.0, 0.5])]), 0.05).unwrap();
            assert_eq!(values(w1.as_tensor()), values(w2.as_tensor()));
            // The export was a snapshot: the step did not change it.
            let after: HashMap<String, Tensor> = opt1.state().into_iter().collect();
            assert_ne!(values(&after["w/momentum"]), values(&exported["w/momentum"]));
        }
    }

    #[test]
    fn load_state_names_missing_and_misshaped_buffers() {
        let (_w, mut opt) = single(OptimSettings::imagenet_large(), &[1.0, 2.0]);
        let mut tensors = HashMap::new();
        tensors.insert("w/momentum".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        let err = opt.load_state(&tensors).unwrap_err().to_string();
        assert!(err.contains("missing `w/rms`"), "{err}");
        assert!(err.contains("`w/momentum` has shape [3], expected [2]"), "{err}");
        // Nothing was changed.
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        assert_close(&values(&state["w/rms"]), &[1.0, 1.0]);
    }

    #[test]
    fn settings_validate_and_serialize() {
        for s in [OptimSettings::cifar(), OptimSettings::imagenet_mobile(), OptimSettings::imagenet_large()] {
            s.validate().unwrap();
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<OptimSettings>(&json).unwrap(), s);
        }
        let json = serde_json::to_string(&OptimSettings::imagenet_mobile()).unwrap();
        assert_eq!(
            json,
            r#"{"optimizer":{"kind":"rmsprop","decay":0.9,"momentum":0.9,"epsilon":1.0},"weight_decay":0.00004,"clip_global_norm":10.0}"#
        );
        let bad = [
            (OptimSettings { weight_decay: -1.0, ..OptimSettings::cifar() }, "weight_decay"),
            (OptimSettings { clip_global_norm: Some(0.0), ..OptimSettings::cifar() }, "clip_global_norm"),
            (sgd(1.0, false), "momentum"),
            (
                OptimSettings {
                    optimizer: OptimizerConfig::RmsProp { decay: 0.9, momentum: 0.9, epsilon: 0.0 },
                    ..OptimSettings::cifar()
                },
                "epsilon",
            ),
            (
                OptimSettings {
                    optimizer: OptimizerConfig::RmsProp { decay: 1.5, momentum: 0.9, epsilon: 1.0 },
                    ..OptimSettings::cifar()
                },
                "decay",
            ),
        ];
        for (s, field) in bad {
            match s.validate() {
                Err(TrainError::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{s:?}: expected a config error on {field}, got {other:?}"),
            }
        }
        let (w, mut opt) = single(sgd(0.0, false), &[1.0]);
        assert!(matches!(opt.step(&grads_for(&[(&w, &[1.0])]), -0.1), Err(TrainError::Config { field: "lr", .. })));
    }

    #[test]
    fn ema_math_and_swap() {
        let w = var(&[1.0, 2.0]);
        let mut ema = Ema::new(0.9, [("w".to_string(), w.clone())]).unwrap();
        w.set(&Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        // 0.9 · (1, 2) + 0.1 · (3, 0) = (1.2, 1.8).
        assert_close(&values(ema.shadow("w").unwrap()), &[1.2, 1.8]);
        w.set(&Tensor::new(&[5.0f32, 5.0], &Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        // 0.9 · (1.2, 1.8) + 0.1 · 5 = (1.58, 2.12).
        assert_close(&values(ema.shadow("w").unwrap()), &[1.58, 2.12]);

        ema.swap().unwrap();
        assert!(ema.is_swapped());
        assert_close(&values(w.as_tensor()), &[1.58, 2.12]);
        assert!(ema.update().is_err(), "no update while swapped");
        let exported: HashMap<String, Tensor> = ema.state().unwrap().into_iter().collect();
        assert_close(&values(&exported["w/ema"]), &[1.58, 2.12]);
        ema.swap().unwrap();
        assert_close(&values(w.as_tensor()), &[5.0, 5.0]);
        assert_close(&values(ema.shadow("w").unwrap()), &[1.58, 2.12]);

        let seen = ema.with_averaged(|| Ok(values(w.as_tensor()))).unwrap();
        assert_close(&seen, &[1.58, 2.12]);
        assert_close(&values(w.as_tensor()), &[5.0, 5.0]);
        let failed: Result<(), TrainError> = ema.with_averaged(|| Err(config_err("x", "boom")));
        assert!(failed.is_err());
        assert!(!ema.is_swapped());
        assert_close(&values(w.as_tensor()), &[5.0, 5.0]);

        // Export → import into a fresh average.
        let mut other = Ema::new(0.9, [("w".to_string(), w.clone())]).unwrap();
        other.load_state(&exported).unwrap();
        assert_close(&values(other.shadow("w").unwrap()), &[1.58, 2.12]);
        assert!(other.load_state(&HashMap::new()).unwrap_err().to_string().contains("missing `w/ema`"));
    }

    #[test]
    fn ema_num_updates_decay_and_groups() {
        let vm = tiny_varmap();
        let groups = ParamGroups::from_varmap(&vm);
        let mut ema = Ema::trainable(0.9999, &groups).unwrap();
        assert_eq!(ema.names(), groups.trainable_names());
        assert!((ema.decay_at(Some(0)) - 0.1).abs() < 1e-12);
        assert!((ema.decay_at(Some(90)) - 0.91).abs() < 1e-12);
        assert!((ema.decay_at(Some(100_000_000)) - 0.9999).abs() < 1e-12);
        assert_eq!(ema.decay_at(None), 0.9999);
        // At step 0 the decay is 0.1: shadow = 0.1 · 1 + 0.9 · 3 = 2.8.
        let fc = get(&vm, "last_linear.bias");
        fc.set(&Tensor::full(3f32, 3, &Device::Cpu).unwrap()).unwrap();
        ema.update_at(0).unwrap();
        assert_close(&values(ema.shadow("last_linear.bias").unwrap()), &[2.8, 2.8, 2.8]);

        let all = Ema::model_variables(0.9999, &groups).unwrap();
        assert!(all.names().contains(&"cell_0.conv_1x1.bn.running_var"));
        assert_eq!(all.names().len(), 8);

        // apply_to copies the averages into an evaluation copy of the network.
        let eval = tiny_varmap();
        ema.apply_to(&eval).unwrap();
        assert_close(&values(get(&eval, "last_linear.bias").as_tensor()), &[2.8, 2.8, 2.8]);
        assert!(all.apply_to(&VarMap::new()).is_err());
        assert!(Ema::new(1.5, []).is_err());
    }

    #[test]
    fn smoothed_cross_entropy_by_hand() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        let labels = Tensor::new(&[2u32, 0], &dev).unwrap();
        // Row 0: log p = x − logsumexp(1, 2, 3); row 1: log p = −ln 3 for every class.
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let lp0 = [1.0 - lse, 2.0 - lse, 3.0 - lse];
        let lp1 = [-(3f64.ln()); 3];
        let eps = 0.1;
        let row = |lp: &[f64; 3], label: usize| {
            (0..3).map(|k| -((if k == label { 1.0 - eps } else { 0.0 }) + eps / 3.0) * lp[k]).sum::<f64>()
        };
        let want = (row(&lp0, 2) + row(&lp1, 0)) / 2.0;
        let got = cross_entropy_smoothed(&logits, &labels, eps).unwrap().to_scalar::<f32>().unwrap();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");

        let plain = candle_nn::loss::cross_entropy(&logits, &labels).unwrap().to_scalar::<f32>().unwrap();
        let zero = cross_entropy_smoothed(&logits, &labels, 0.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((plain - zero).abs() < 1e-7);
        assert!(((zero as f64) - (-(lp0[2]) + 3f64.ln()) / 2.0).abs() < 1e-6);
        assert!(cross_entropy_smoothed(&logits, &labels, 1.5).is_err());
        assert!(cross_entropy_smoothed(&logits, &Tensor::new(&[0u32], &dev).unwrap(), 0.1).is_err());
    }
}
