//! Analytical cost model: parameters and multiply-adds of any (`CellSpec`, `NetworkConfig`),
//! counted layer by layer from a [`NetworkPlan`] without building tensors.
//!
//! What is counted: conv, depthwise and pointwise weights,
//! BN γ and β (trainable) and BN moving mean and variance (non-trainable), FC weight
//! and bias; multiply-adds of convs, depthwise and pointwise convs and FC layers
//! (pooling, BN, ReLU and additions are not counted, as in the paper's figures).
//! The aux head is reported apart, because it exists only while training.

use std::fmt;

use crate::network::{CellLayout, NetworkPlan, PrevAdjust};
use crate::{CellKind, CellSpec, NetworkConfig, OpKind, SpecError};

/// Parameters and mult-adds of one part of a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Trainable parameters: conv/FC weights, FC biases, BN γ and β.
    pub params_trainable: u64,
    /// Non-trainable parameters: BN moving mean and variance.
    pub bn_statistics: u64,
    /// Multiply-adds of one forward pass of one image.
    pub mult_adds: u64,
}

impl Cost {
    /// Trainable parameters plus BN statistics (what Keras calls "total params").
    pub fn params_total(&self) -> u64 {
        self.params_trainable + self.bn_statistics
    }
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, rhs: Cost) {
        self.params_trainable += rhs.params_trainable;
        self.bn_statistics += rhs.bn_statistics;
        self.mult_adds += rhs.mult_adds;
    }
}

/// The cost of a whole network, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostReport {
    /// The network used for inference: stem, cells and classifier (no aux head).
    pub network: Cost,
    /// The aux head, built only while training (`None` when the config has none).
    pub aux_head: Option<Cost>,
    /// One line per stem, cell and head, in forward order.
    pub parts: Vec<(String, Cost)>,
}

impl fmt::Display for CostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<18} {:>14} {:>14} {:>16}", "part", "trainable", "bn stats", "mult-adds")?;
        for (name, cost) in &self.parts {
            writeln!(
                f,
                "{:<18} {:>14} {:>14} {:>16}",
                name,
                group(cost.params_trainable),
                group(cost.bn_statistics),
                group(cost.mult_adds)
            )?;
        }
        writeln!(
            f,
            "{:<18} {:>14} {:>14} {:>16}",
            "total (no aux)",
            group(self.network.params_trainable),
            group(self.network.bn_statistics),
            group(self.network.mult_adds)
        )?;
        if let Some(aux) = &self.aux_head {
            writeln!(
                f,
                "{:<18} {:>14} {:>14} {:>16}",
                "aux head (train)",
                group(aux.params_trainable),
                group(aux.bn_statistics),
                group(aux.mult_adds)
            )?;
        }
        Ok(())
    }
}

/// Formats 5289978 as `5,289,978`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Counts parameters and mult-adds of the network `config` builds around `spec`.
pub fn network_cost(spec: &CellSpec, config: &NetworkConfig) -> Result<CostReport, SpecError> {
    let plan = config.plan(spec)?;
    Ok(plan_cost(spec, &plan))
}

/// Counts a plan made for `spec` (see [`NetworkConfig::plan`]).
pub fn plan_cost(spec: &CellSpec, plan: &NetworkPlan) -> CostReport {
    let mut parts = Vec::new();
    let mut stem = Counter::default();
    let conv = plan.stem_conv;
    stem.conv(conv.kernel, conv.kernel, conv.c_in, conv.c_out, plan.outputs[0].size);
    stem.bn(conv.c_out);
    parts.push(("stem conv".to_string(), stem.cost));
    for cell in &plan.cells {
        parts.push((cell.name.clone(), cell_cost(spec, cell.kind, &cell.layout)));
    }
    let mut head = Counter::default();
    head.fc(plan.head.c_in, plan.head.num_classes);
    parts.push(("final_layer".to_string(), head.cost));

    let mut network = Cost::default();
    for (_, cost) in &parts {
        network += *cost;
    }
    let aux_head = plan.aux.map(|aux| {
        let mut c = Counter::default();
        c.conv(1, 1, aux.input.channels, 128, aux.pooled_size);
        c.bn(128);
        c.conv(aux.pooled_size, aux.pooled_size, 128, 768, 1);
        c.bn(768);
        c.fc(768, plan.head.num_classes);
        c.cost
    });
    CostReport { network, aux_head, parts }
}

/// Parameters and mult-adds of one cell instance.
pub fn cell_cost(spec: &CellSpec, kind: CellKind, layout: &CellLayout) -> Cost {
    let cell = spec.cell(kind);
    let f = layout.states[0].channels;
    let size = layout.x.size;
    let mut c = Counter::default();
    match layout.prev_adjust {
        PrevAdjust::UseX | PrevAdjust::Unchanged => {}
        PrevAdjust::Conv1x1 { c_in } => {
            c.conv(1, 1, c_in, f, size);
            c.bn(f);
        }
        PrevAdjust::FactorizedReduction { c_in } => c.factorized_reduction(c_in, f, size),
    }
    // Preamble: ReLU → 1×1 → BN on the newest input.
    c.conv(1, 1, layout.x.channels, f, size);
    c.bn(f);
    for (block, sides) in cell.blocks.iter().zip(&layout.ops) {
        for (op, op_layout) in block.ops.iter().zip(sides) {
            let c_in = op_layout.input.channels;
            let out = op_layout.output.size;
            match op.kind() {
                OpKind::Identity | OpKind::Pool { .. } => {
                    if op_layout.projection {
                        c.conv(1, 1, c_in, f, out);
                        c.bn(f);
                    }
                }
                OpKind::Conv(chain) => {
                    for (i, &(kh, kw, _dilation)) in chain.iter().enumerate() {
                        c.conv(kh, kw, if i == 0 { c_in } else { f }, f, out);
                    }
                    c.bn(f);
                }
                OpKind::SepConv { kernel } => {
                    c.depthwise(kernel, c_in, out);
                    c.conv(1, 1, c_in, f, out);
                    c.bn(f);
                    c.depthwise(kernel, f, out);
                    c.conv(1, 1, f, f, out);
                    c.bn(f);
                }
            }
        }
    }
    for entry in &layout.concat {
        if entry.factorized_reduction.is_some() {
            c.factorized_reduction(entry.input.channels, entry.output.channels, entry.output.size);
        }
    }
    c.cost
}

#[derive(Default)]
struct Counter {
    cost: Cost,
}

impl Counter {
    /// A dense conv without bias producing `out × out` positions.
    fn conv(&mut self, kh: usize, kw: usize, c_in: usize, c_out: usize, out: usize) {
        let weights = (kh * kw * c_in * c_out) as u64;
        self.cost.params_trainable += weights;
        self.cost.mult_adds += weights * (out * out) as u64;
    }

    /// A depthwise conv (multiplier 1) producing `out × out` positions.
    fn depthwise(&mut self, k: usize, c: usize, out: usize) {
        let weights = (k * k * c) as u64;
        self.cost.params_trainable += weights;
        self.cost.mult_adds += weights * (out * out) as u64;
    }

    fn bn(&mut self, c: usize) {
        self.cost.params_trainable += 2 * c as u64;
        self.cost.bn_statistics += 2 * c as u64;
    }

    fn fc(&mut self, c_in: usize, c_out: usize) {
        self.cost.params_trainable += (c_in * c_out + c_out) as u64;
        self.cost.mult_adds += (c_in * c_out) as u64;
    }

    /// TF-Slim `factorized_reduction` to `c_out` channels at `out × out`: one 1×1 conv
    /// at stride 1, or two half-width paths at stride 2 (the second gets the odd channel),
    /// then BN.
    fn factorized_reduction(&mut self, c_in: usize, c_out: usize, out: usize) {
        // Both forms have c_in · c_out weights in total; the stride only changes `out`.
        let half = c_out / 2;
        self.conv(1, 1, c_in, half, out);
        self.conv(1, 1, c_in, c_out - half, out);
        self.bn(c_out);
    }
}
