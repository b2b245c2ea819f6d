//! The NASNet controller: a one-layer LSTM that emits the 2 × 5B decisions of a spec.
//!
//! Paper §3 and §A.2, with the autoregressive feeding of
//! NAS (Zoph & Le 2017): the first input is a learned "go" vector, and each sampled token
//! is embedded and fed back as the next input.
//!
//! There is one softmax head per decision kind (input, op, combine), shared by every step
//! of that kind, and one embedding table per kind. The input head has B + 1 outputs (the
//! most states any block can read); block b uses only the first 2 + b of them, so its
//! softmax covers exactly the states that exist when it runs.
//!
//! Weights, per `lstm_units` = H, B blocks, |ops| = 13 and |combines| = 2:
//!
//! | name | shape |
//! |------|-------|
//! | `go` | (1, H) |
//! | `embed.input`, `embed.op`, `embed.combine` | (B + 1, H), (13, H), (2, H) |
//! | `lstm.w_ih`, `lstm.w_hh`, `lstm.bias` | (H, 4H), (H, 4H), (4H) — gates i, f, g, o |
//! | `head.{input,op,combine}.weight` | (H, B + 1), (H, 13), (H, 2) |
//! | `head.{input,op,combine}.bias` | (B + 1), (13), (2) |
//!
//! For the paper's H = 100 and B = 5 that is 84,721 parameters ([`Controller::num_params`]).
//! Everything, biases included, starts uniform in `[-init_range, init_range]`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use nas_space::{ActionStep, Decision, SearchSpace, SpaceRng};

use crate::{ControllerError, PpoConfig};

/// The three decision kinds, in the order of the heads and embedding tables.
const KIND_NAMES: [&str; 3] = ["input", "op", "combine"];

fn kind_index(decision: Decision) -> usize {
    match decision {
        Decision::Input => 0,
        Decision::Op => 1,
        Decision::Combine => 2,
    }
}

/// One action sequence drawn from the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The 2 × 5B decisions, in `SearchSpace::steps` order.
    pub actions: Vec<usize>,
    /// Sum of the log-probabilities of the decisions.
    pub log_prob: f64,
    /// Sum of the entropies of the 2 × 5B softmaxes met on the way.
    pub entropy: f64,
}

/// The LSTM policy. Its weights are candle [`Var`]s on the CPU.
#[derive(Debug)]
pub struct Controller {
    space: SearchSpace,
    steps: Vec<ActionStep>,
    units: usize,
    temperature: f64,
    tanh_constant: Option<f64>,
    /// Named weights in a fixed order (see the module docs).
    vars: Vec<(String, Var)>,
}

/// The weights as plain tensors, tracked by autograd or detached.
struct Weights {
    go: Tensor,
    embed: [Tensor; 3],
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor,
    head_w: [Tensor; 3],
    head_b: [Tensor; 3],
}

impl Controller {
    /// The names and shapes of the weights, in their fixed order.
    pub fn param_shapes(space: &SearchSpace, units: usize) -> Vec<(String, Vec<usize>)> {
        let widths = Self::head_widths(space);
        let mut shapes = vec![("go".to_string(), vec![1, units])];
        for (name, width) in KIND_NAMES.iter().zip(widths) {
            shapes.push((format!("embed.{name}"), vec![width, units]));
        }
        shapes.push(("lstm.w_ih".into(), vec![units, 4 * units]));
        shapes.push(("lstm.w_hh".into(), vec![units, 4 * units]));
        shapes.push(("lstm.bias".into(), vec![4 * units]));
        for (name, width) in KIND_NAMES.iter().zip(widths) {
            shapes.push((format!("head.{name}.weight"), vec![units, width]));
            shapes.push((format!("head.{name}.bias"), vec![width]));
        }
        shapes
    }

    /// Outputs of the input, op and combine heads.
    fn head_widths(space: &SearchSpace) -> [usize; 3] {
        [space.num_blocks + 1, space.ops.len(), space.combines.len()]
    }

    /// A controller with fresh weights, uniform in `[-init_range, init_range]`, drawn from `rng`
    /// in the order of [`Controller::param_shapes`], row-major.
    pub fn new(space: &SearchSpace, config: &PpoConfig, rng: &mut SpaceRng) -> Result<Controller, ControllerError> {
        space.validate()?;
        let range = config.init_range;
        let mut tensors = HashMap::new();
        for (name, shape) in Self::param_shapes(space, config.lstm_units) {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = (0..len).map(|_| ((rng.unit_f64() * 2.0 - 1.0) * range) as f32).collect();
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Ok(Self::from_tensors(space, config, &tensors).expect("fresh tensors have the declared shapes"))
    }

    /// A controller with the given weights; `Err` names a missing tensor or a wrong shape.
    pub(crate) fn from_tensors(
        space: &SearchSpace,
        config: &PpoConfig,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Controller, String> {
        let mut vars = Vec::new();
        for (name, shape) in Self::param_shapes(space, config.lstm_units) {
            let tensor = tensors.get(&name).ok_or_else(|| format!("tensor `{name}` is missing"))?;
            if tensor.dims() != shape.as_slice() || tensor.dtype() != DType::F32 {
                return Err(format!(
                    "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                    tensor.dtype(),
                    tensor.dims()
                ));
            }
            let var = Var::from_tensor(tensor).map_err(|e| e.to_string())?;
            vars.push((name, var));
        }
        Ok(Controller {
            space: space.clone(),
            steps: space.steps(),
            units: config.lstm_units,
            temperature: config.temperature,
            tanh_constant: config.tanh_constant,
            vars,
        })
    }

    /// The search space the controller samples.
    pub fn space(&self) -> &SearchSpace {
        &self.space
    }

    /// LSTM hidden units.
    pub fn units(&self) -> usize {
        self.units
    }

    /// The named weights, in their fixed order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Number of scalar weights: 84,721 for the paper's controller.
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn weights(&self, track: bool) -> Weights {
        let t = |i: usize| {
            let tensor = self.vars[i].1.as_tensor();
            if track {
                tensor.clone()
            } else {
                tensor.detach()
            }
        };
        Weights {
            go: t(0),
            embed: [t(1), t(2), t(3)],
            w_ih: t(4),
            w_hh: t(5),
            bias: t(6),
            head_w: [t(7), t(9), t(11)],
            head_b: [t(8), t(10), t(12)],
        }
    }

    /// Runs the LSTM over the 2 × 5B steps for `n` sequences at once. At each step `choose`
    /// gets the step index and the `(n, choices)` log-probabilities and returns the `n`
    /// tokens to feed back. Returns the summed log-probability of the chosen tokens and the
    /// summed entropy, both of shape `(n)`.
    fn unroll(
        &self,
        w: &Weights,
        n: usize,
        mut choose: impl FnMut(usize, &Tensor) -> Result<Vec<u32>, ControllerError>,
    ) -> Result<(Tensor, Tensor), ControllerError> {
        let dev = Device::Cpu;
        let mut h = Tensor::zeros((n, self.units), DType::F32, &dev)?;
        let mut c = h.clone();
        let mut x = w.go.broadcast_as((n, self.units))?;
        let mut log_prob = Tensor::zeros(n, DType::F32, &dev)?;
        let mut entropy = Tensor::zeros(n, DType::F32, &dev)?;
        for (i, step) in self.steps.iter().enumerate() {
            let gates = (x.matmul(&w.w_ih)? + h.matmul(&w.w_hh)?)?.broadcast_add(&w.bias)?;
            let g = gates.chunk(4, 1)?;
            let input_gate = candle_nn::ops::sigmoid(&g[0])?;
            let forget_gate = candle_nn::ops::sigmoid(&g[1])?;
            let cell_gate = g[2].tanh()?;
            let output_gate = candle_nn::ops::sigmoid(&g[3])?;
            c = ((forget_gate * &c)? + (input_gate * cell_gate)?)?;
            h = (output_gate * c.tanh()?)?;

            let k = kind_index(step.decision);
            let mut logits = h.matmul(&w.head_w[k])?.broadcast_add(&w.head_b[k])?.narrow(1, 0, step.choices)?;
            if self.temperature != 1.0 {
                logits = (logits / self.temperature)?;
            }
            if let Some(tanh_c) = self.tanh_constant {
                logits = (logits.tanh()? * tanh_c)?;
            }
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let tokens = choose(i, &logp)?;
            let tokens = Tensor::from_vec(tokens, n, &dev)?;
            let chosen = logp.gather(&tokens.unsqueeze(1)?, 1)?.squeeze(1)?;
            log_prob = (log_prob + chosen)?;
            let step_entropy = (logp.exp()? * &logp)?.sum(1)?.neg()?;
            entropy = (entropy + step_entropy)?;
            x = w.embed[k].index_select(&tokens, 0)?;
        }
        Ok((log_prob, entropy))
    }

    /// Draws `n` action sequences, each decision from its softmax with `rng` (on the host,
    /// so a seed fixes the result). The log-probabilities and entropies are summed in f64
    /// from the softmax values, apart from the tensor path [`Controller::evaluate`] uses.
    pub fn sample(&self, n: usize, rng: &mut SpaceRng) -> Result<Vec<Sampled>, ControllerError> {
        let w = self.weights(false);
        let mut out: Vec<Sampled> = (0..n)
            .map(|_| Sampled { actions: Vec::with_capacity(self.steps.len()), log_prob: 0.0, entropy: 0.0 })
            .collect();
        self.unroll(&w, n, |_, logp| {
            let rows = logp.to_vec2::<f32>()?;
            let mut tokens = Vec::with_capacity(n);
            for (row, sample) in rows.iter().zip(out.iter_mut()) {
                let probs: Vec<f64> = row.iter().map(|&l| (l as f64).exp()).collect();
                let token = draw(&probs, rng);
                sample.actions.push(token);
                sample.log_prob += row[token] as f64;
                sample.entropy -= row.iter().zip(&probs).map(|(&l, &p)| p * l as f64).sum::<f64>();
                tokens.push(token as u32);
            }
            Ok(tokens)
        })?;
        Ok(out)
    }

    /// Teacher forcing: feeds the given action sequences and returns, for each, the summed
    /// log-probability of its decisions and the summed entropy of the softmaxes, tracked by
    /// autograd.
    ///
    /// # Shapes
    /// - `actions`: n sequences of 2 × 5B decisions
    /// - returns: `(n)`, `(n)`
    pub fn evaluate(&self, actions: &[Vec<usize>]) -> Result<(Tensor, Tensor), ControllerError> {
        let n = actions.len();
        for seq in actions {
            if seq.len() != self.steps.len() {
                return Err(nas_space::SpecError::ActionCount { expected: self.steps.len(), found: seq.len() }.into());
            }
            for (i, (&a, step)) in seq.iter().zip(&self.steps).enumerate() {
                if a >= step.choices {
                    return Err(nas_space::SpecError::ActionOutOfRange {
                        step: i,
                        what: step.to_string(),
                        value: a,
                        choices: step.choices,
                    }
                    .into());
                }
            }
        }
        let w = self.weights(true);
        self.unroll(&w, n, |i, _| Ok(actions.iter().map(|seq| seq[i] as u32).collect()))
    }

    /// The weights as named tensors (for saving).
    pub(crate) fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect()
    }
}

/// Inverse-CDF draw from `probs` (which sum to about 1); never returns a zero-probability
/// token.
fn draw(probs: &[f64], rng: &mut SpaceRng) -> usize {
    let total: f64 = probs.iter().sum();
    let u = rng.unit_f64() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p;
            last = i;
            if u < acc {
                return i;
            }
        }
    }
    last
}
