//! The network skeleton around the cells, and the wiring it implies.
//!
//! Follows TF-Slim `nasnet.py` (`_build_nasnet_base`, `_imagenet_stem`, `_cifar_stem`,
//! `_build_aux_head`) and `nasnet_utils.py` (`calc_reduction_layers`,
//! `_reduce_prev_layer`, `_cell_base`, `_apply_conv_operation`,
//! `_combine_unused_states`, `factorized_reduction`).
//!
//! [`NetworkConfig::plan`] turns a config and a [`CellSpec`] into a [`NetworkPlan`]:
//! which outputs feed which cell, at what width and stride, with every tensor shape.
//! [`CellLayout`] goes one level down, to every projection inside a cell. Both are the
//! single description of the wiring: `nas-ops` builds modules from them and
//! [`crate::cost`] counts parameters and mult-adds from them.

use std::fmt;
use std::str::FromStr;

use crate::{Cell, CellKind, CellSpec, Combine, OpKind, SpecError};

/// The stem in front of the first cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
pub enum Stem {
    /// `_cifar_stem`: 3×3 conv (stride 1, SAME) to `F · stem_multiplier` filters → BN.
    Cifar,
    /// `_imagenet_stem`: 3×3 conv (stride 2, VALID) to `32 · stem_multiplier` filters →
    /// BN, then two reduction cells at filter scaling 1/4 and 1/2.
    ImageNet,
}

impl fmt::Display for Stem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stem::Cifar => "cifar",
            Stem::ImageNet => "imagenet",
        })
    }
}

/// The skeleton of a NASNet network: everything but the two cells (paper §4, TF-Slim hparams).
/// With the `serde` feature it reads and writes as a JSON object of these fields.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(deny_unknown_fields))]
pub struct NetworkConfig {
    /// Which stem reads the image.
    pub stem: Stem,
    /// N: normal cells per stack (TF-Slim `num_cells = (num_reduction_layers + 1) · N`).
    pub n: usize,
    /// F (`num_conv_filters`): the per-branch width of the first stack's normal cells.
    pub num_conv_filters: usize,
    /// Multiplies the stem conv's width.
    pub stem_multiplier: f64,
    /// The filter scaling applied at each reduction (2.0 in every published config).
    pub filter_scaling_rate: f64,
    /// Reduction cells in the main stack (2 in every published config).
    pub num_reduction_layers: usize,
    /// TF-Slim's `skip_reduction_layer_input`: when set, the first normal cell after a
    /// reduction takes as its previous input the cell before the reduction's input.
    pub skip_reduction_layer_input: bool,
    /// Whether training builds the auxiliary head (after the last normal cell before the
    /// second reduction).
    pub use_aux_head: bool,
    /// ScheduledDropPath's final keep probability (1.0 disables it).
    pub drop_path_keep_prob: f64,
    /// Keep probability of the dropout before the classifier.
    pub dense_dropout_keep_prob: f64,
    /// Classifier outputs (TF checkpoints use 1001, with class 0 as background).
    pub num_classes: usize,
    /// Height and width of the (square) input image.
    pub image_size: usize,
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Batch-norm epsilon.
    pub bn_epsilon: f64,
    /// Batch-norm moving-average decay (TF-Slim `batch_norm_decay`):
    /// `moving = decay · moving + (1 − decay) · batch`; PyTorch's momentum is `1 − decay`.
    pub bn_decay: f64,
}

impl NetworkConfig {
    /// NASNet-A CIFAR-10 (6 @ 768), TF-Slim `cifar_config`.
    /// Trained 600 epochs with batch 32, lr 0.025 single-period cosine, momentum 0.9,
    /// weight decay 5e-4, aux loss weight 0.4, gradients clipped to global norm 5.
    pub fn cifar() -> NetworkConfig {
        NetworkConfig {
            stem: Stem::Cifar,
            n: 6,
            num_conv_filters: 32,
            stem_multiplier: 3.0,
            filter_scaling_rate: 2.0,
            num_reduction_layers: 2,
            skip_reduction_layer_input: false,
            use_aux_head: true,
            drop_path_keep_prob: 0.6,
            dense_dropout_keep_prob: 1.0,
            num_classes: 10,
            image_size: 32,
            in_channels: 3,
            bn_epsilon: 1e-5,
            bn_decay: 0.9,
        }
    }

    /// NASNet-A Mobile (4 @ 1056, 224×224), TF-Slim `mobile_imagenet_config`.
    /// Trained with 50 replicas of batch 32, lr 0.04 × 50 decayed 0.97 every 2.4 epochs,
    /// RMSProp, weight decay 4e-5, label smoothing 0.1, aux weight 0.4, no drop path.
    pub fn mobile() -> NetworkConfig {
        NetworkConfig {
            stem: Stem::ImageNet,
            n: 4,
            num_conv_filters: 44,
            stem_multiplier: 1.0,
            filter_scaling_rate: 2.0,
            num_reduction_layers: 2,
            skip_reduction_layer_input: false,
            use_aux_head: true,
            drop_path_keep_prob: 1.0,
            dense_dropout_keep_prob: 0.5,
            num_classes: 1000,
            image_size: 224,
            in_channels: 3,
            bn_epsilon: 1e-3,
            bn_decay: 0.9997,
        }
    }

    /// NASNet-A Large (6 @ 4032, 331×331), TF-Slim `large_imagenet_config`.
    /// Trained with 100 replicas of batch 16, lr 0.015 × 100 decayed 0.97 every 2.4
    /// epochs, RMSProp, weight decay 5e-5, label smoothing 0.1, aux weight 0.4,
    /// drop path keep 0.7.
    pub fn large() -> NetworkConfig {
        NetworkConfig {
            stem: Stem::ImageNet,
            n: 6,
            num_conv_filters: 168,
            stem_multiplier: 3.0,
            filter_scaling_rate: 2.0,
            num_reduction_layers: 2,
            skip_reduction_layer_input: true,
            use_aux_head: true,
            drop_path_keep_prob: 0.7,
            dense_dropout_keep_prob: 0.5,
            num_classes: 1000,
            image_size: 331,
            in_channels: 3,
            bn_epsilon: 1e-3,
            bn_decay: 0.9997,
        }
    }

    /// A preset by name: `cifar`, `mobile` or `large`.
    pub fn preset(name: &str) -> Option<NetworkConfig> {
        match name.trim().to_ascii_lowercase().as_str() {
            "cifar" => Some(NetworkConfig::cifar()),
            "mobile" => Some(NetworkConfig::mobile()),
            "large" => Some(NetworkConfig::large()),
            _ => None,
        }
    }

    /// Resolves a `--net` value for the given cells: `cifar`, `mobile`, `large`, `N@P`
    /// (the mobile skeleton at that size), or `PRESET:N@P` (that preset's skeleton at
    /// that size), e.g. `cifar:6@768`.
    pub fn parse_net(value: &str, spec: &CellSpec) -> Result<NetworkConfig, SpecError> {
        let value = value.trim();
        if let Some(config) = NetworkConfig::preset(value) {
            return Ok(config);
        }
        let (base, size) = match value.split_once(':') {
            Some((base, size)) => {
                let config = NetworkConfig::preset(base).ok_or_else(|| SpecError::NetSize {
                    input: value.to_string(),
                    message: format!("unknown skeleton `{base}`; expected cifar, mobile or large"),
                })?;
                (config, size)
            }
            None => (NetworkConfig::mobile(), value),
        };
        let size: NetSize = size.parse().map_err(|err| match err {
            SpecError::NetSize { message, .. } => SpecError::NetSize { input: value.to_string(), message },
            other => other,
        })?;
        base.with_size(size, spec)
    }

    /// The same skeleton at `N @ P`: N normal cells per stack and P filters in the
    /// penultimate layer. F follows from P and the normal cell's output width
    /// (P = 24F for NASNet-A: 6 concatenated states, filters doubled twice).
    pub fn with_size(mut self, size: NetSize, spec: &CellSpec) -> Result<NetworkConfig, SpecError> {
        let err = |message: String| SpecError::NetSize { input: size.to_string(), message };
        if size.n == 0 {
            return Err(err("N must be at least 1".into()));
        }
        spec.validate()?;
        let units = normal_output_units(&spec.normal);
        let scale = self.filter_scaling_rate.powi(self.num_reduction_layers as i32);
        let per_f = units as f64 * scale;
        let f = (size.penultimate_filters as f64 / per_f).round() as usize;
        self.n = size.n;
        self.num_conv_filters = f;
        if f == 0 || self.penultimate_filters(spec) != size.penultimate_filters {
            let lower = (size.penultimate_filters as f64 / per_f).floor().max(1.0) as usize;
            let near = [lower, lower + 1]
                .iter()
                .map(|&f| format!("{} (F = {f})", units * (f as f64 * scale) as usize))
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(err(format!(
                "P = {} is not reachable: with these cells the penultimate layer has {units} × {scale} × F \
                 channels; nearest: {near}",
                size.penultimate_filters
            )));
        }
        Ok(self)
    }

    /// `num_cells` in TF-Slim terms: normal cells in the main stack.
    pub fn num_cells(&self) -> usize {
        self.n * (self.num_reduction_layers + 1)
    }

    /// Main-stack cell numbers before which a reduction cell runs
    /// (TF-Slim `calc_reduction_layers`: `int(k / (R + 1) · num_cells)`).
    pub fn reduction_indices(&self) -> Vec<usize> {
        let r = self.num_reduction_layers;
        (1..=r).map(|k| (k as f64 / (r + 1) as f64 * self.num_cells() as f64) as usize).collect()
    }

    /// The normal cell after which the aux head is attached, if any:
    /// `reduction_indices[1] − 1`.
    pub fn aux_head_cell(&self) -> Option<usize> {
        if !self.use_aux_head {
            return None;
        }
        self.reduction_indices().get(1).map(|&idx| idx - 1)
    }

    /// Number of stem cells (2 for ImageNet, 0 for CIFAR).
    pub fn num_stem_cells(&self) -> usize {
        match self.stem {
            Stem::Cifar => 0,
            Stem::ImageNet => 2,
        }
    }

    /// ScheduledDropPath's `total_num_cells`: every cell, stem and reduction cells included.
    pub fn total_num_cells(&self) -> usize {
        self.num_cells() + self.num_reduction_layers + self.num_stem_cells()
    }

    /// Channels of the last cell's output (the "P" of "N @ P").
    pub fn penultimate_filters(&self, spec: &CellSpec) -> usize {
        let scale = self.filter_scaling_rate.powi(self.num_reduction_layers as i32);
        normal_output_units(&spec.normal) * (self.num_conv_filters as f64 * scale) as usize
    }

    /// Checks every field for a usable value.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &'static str, message: String| Err(SpecError::Config { field, message });
        if self.n == 0 {
            return bad("n", "must be at least 1".into());
        }
        if self.num_conv_filters == 0 {
            return bad("num_conv_filters", "must be at least 1".into());
        }
        if !(self.stem_multiplier > 0.0 && self.stem_multiplier.is_finite()) {
            return bad("stem_multiplier", format!("must be positive, got {}", self.stem_multiplier));
        }
        if !(self.filter_scaling_rate > 0.0 && self.filter_scaling_rate.is_finite()) {
            return bad("filter_scaling_rate", format!("must be positive, got {}", self.filter_scaling_rate));
        }
        for (field, p) in [
            ("drop_path_keep_prob", self.drop_path_keep_prob),
            ("dense_dropout_keep_prob", self.dense_dropout_keep_prob),
        ] {
            if !(p > 0.0 && p <= 1.0) {
                return bad(field, format!("must be in (0, 1], got {p}"));
            }
        }
        if self.num_classes == 0 {
            return bad("num_classes", "must be at least 1".into());
        }
        if self.in_channels == 0 {
            return bad("in_channels", "must be at least 1".into());
        }
        if self.image_size == 0 || (self.stem == Stem::ImageNet && self.image_size < 3) {
            return bad("image_size", format!("{} is too small for the {} stem", self.image_size, self.stem));
        }
        if !(self.bn_epsilon > 0.0 && self.bn_epsilon.is_finite()) {
            return bad("bn_epsilon", format!("must be positive, got {}", self.bn_epsilon));
        }
        if !(0.0..1.0).contains(&self.bn_decay) {
            return bad("bn_decay", format!("must be in [0, 1), got {}", self.bn_decay));
        }
        Ok(())
    }

    /// The whole network's wiring for these cells: every cell with its inputs, width,
    /// stride and shapes, the aux head and the classifier.
    pub fn plan(&self, spec: &CellSpec) -> Result<NetworkPlan, SpecError> {
        self.validate()?;
        spec.validate()?;
        let filter_size = |scaling: f64, what: &str| -> Result<usize, SpecError> {
            let size = (self.num_conv_filters as f64 * scaling) as usize;
            if size == 0 {
                return Err(SpecError::Config {
                    field: "num_conv_filters",
                    message: format!(
                        "F = {} gives {what} no filters (F × {scaling} < 1); use F ≥ {}",
                        self.num_conv_filters,
                        (1.0 / scaling).ceil()
                    ),
                });
            }
            Ok(size)
        };

        // outputs[0] is the stem conv; outputs[k + 1] is cells[k].
        let (stem_conv, stem_out) = match self.stem {
            Stem::Cifar => {
                let c = (self.num_conv_filters as f64 * self.stem_multiplier) as usize;
                let conv = StemConv { c_in: self.in_channels, c_out: c, kernel: 3, stride: 1, same_padding: true };
                (conv, FeatureShape { channels: c, size: self.image_size })
            }
            Stem::ImageNet => {
                let c = (32.0 * self.stem_multiplier) as usize;
                let conv = StemConv { c_in: self.in_channels, c_out: c, kernel: 3, stride: 2, same_padding: false };
                (conv, FeatureShape { channels: c, size: (self.image_size - 3) / 2 + 1 })
            }
        };
        if stem_conv.c_out == 0 {
            return Err(SpecError::Config {
                field: "stem_multiplier",
                message: "gives the stem conv no filters".into(),
            });
        }
        let mut outputs = vec![stem_out];
        // TF-Slim's `cell_outputs`, as indices into `outputs` (None for the missing input).
        let mut cell_outputs: Vec<Option<usize>> = vec![None, Some(0)];
        let mut cells = Vec::new();
        let push_cell = |cells: &mut Vec<CellPlan>,
                         outputs: &mut Vec<FeatureShape>,
                         name: String,
                         kind: CellKind,
                         x: usize,
                         prev: Option<usize>,
                         filter_size: usize|
         -> Result<usize, SpecError> {
            let stride = match kind {
                CellKind::Normal => 1,
                CellKind::Reduction => 2,
            };
            let x_shape = outputs[x];
            let prev_shape = prev.map(|p| outputs[p]);
            let layout = CellLayout::new(spec.cell(kind), kind, x_shape, prev_shape, filter_size, stride)
                .map_err(|err| shape_in(&name, err))?;
            let out = layout.output;
            cells.push(CellPlan { name, kind, x, prev, filter_size, stride, drop_path_index: cells.len(), layout });
            outputs.push(out);
            Ok(outputs.len() - 1)
        };

        let mut net = 0;
        if self.stem == Stem::ImageNet {
            let mut scaling = 1.0 / self.filter_scaling_rate.powi(2);
            for stem_idx in 0..2 {
                let fs = filter_size(scaling, &format!("cell_stem_{stem_idx}"))?;
                let prev = cell_outputs[cell_outputs.len() - 2];
                net = push_cell(
                    &mut cells,
                    &mut outputs,
                    format!("cell_stem_{stem_idx}"),
                    CellKind::Reduction,
                    net,
                    prev,
                    fs,
                )?;
                cell_outputs.push(Some(net));
                scaling *= self.filter_scaling_rate;
            }
        }
        let stem_output = net;

        let reduction_indices = self.reduction_indices();
        let mut scaling = 1.0;
        let mut aux = None;
        for cell_num in 0..self.num_cells() {
            let mut prev = cell_outputs[cell_outputs.len() - 2];
            if let Some(red_idx) = reduction_indices.iter().position(|&r| r == cell_num) {
                scaling *= self.filter_scaling_rate;
                let fs = filter_size(scaling, &format!("reduction_cell_{red_idx}"))?;
                let red_prev = cell_outputs[cell_outputs.len() - 2];
                net = push_cell(
                    &mut cells,
                    &mut outputs,
                    format!("reduction_cell_{red_idx}"),
                    CellKind::Reduction,
                    net,
                    red_prev,
                    fs,
                )?;
                cell_outputs.push(Some(net));
                if !self.skip_reduction_layer_input {
                    prev = cell_outputs[cell_outputs.len() - 2];
                }
            }
            let fs = filter_size(scaling, &format!("cell_{cell_num}"))?;
            net = push_cell(&mut cells, &mut outputs, format!("cell_{cell_num}"), CellKind::Normal, net, prev, fs)?;
            cell_outputs.push(Some(net));
            if self.aux_head_cell() == Some(cell_num) {
                let input = outputs[net];
                if input.size < 5 {
                    return Err(SpecError::Shape {
                        message: format!(
                            "the aux head after cell_{cell_num} needs a feature map of at least 5×5 for its \
                             5×5 stride-3 pool, but it is {s}×{s} at image size {}; raise image_size or set \
                             use_aux_head = false",
                            self.image_size,
                            s = input.size
                        ),
                    });
                }
                aux = Some(AuxPlan { after_output: net, input, pooled_size: (input.size - 5) / 3 + 1 });
            }
        }
        let last = outputs[net];
        Ok(NetworkPlan {
            stem: self.stem,
            stem_conv,
            stem_output,
            cells,
            outputs,
            aux,
            head: HeadPlan {
                c_in: last.channels,
                num_classes: self.num_classes,
                dense_dropout_keep_prob: self.dense_dropout_keep_prob,
            },
            total_num_cells: self.total_num_cells(),
        })
    }
}

fn shape_in(name: &str, err: SpecError) -> SpecError {
    match err {
        SpecError::Shape { message } => SpecError::Shape { message: format!("{name}: {message}") },
        other => other,
    }
}

/// Channels of a normal cell's output in units of its filter size, for any input
/// (every concatenated state is brought to the last block's width).
fn normal_output_units(cell: &Cell) -> usize {
    let last_units = match cell.blocks.last().map(|b| b.combine) {
        Some(Combine::Concat) => 2,
        _ => 1,
    };
    cell.output_states().len() * last_units
}

/// An `N @ P` network size (paper §4): N cell repeats, P filters in the penultimate layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSize {
    /// Normal cells per stack.
    pub n: usize,
    /// Channels of the last cell's output.
    pub penultimate_filters: usize,
}

impl fmt::Display for NetSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.n, self.penultimate_filters)
    }
}

impl FromStr for NetSize {
    type Err = SpecError;

    /// Parses `4@1056`, `4 @ 1056`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |message: &str| SpecError::NetSize { input: s.to_string(), message: message.to_string() };
        let (n, p) = s.split_once('@').ok_or_else(|| err("expected `N@P`, e.g. `4@1056`"))?;
        let n = n.trim().parse().map_err(|_| err("N (before `@`) is not a whole number"))?;
        let penultimate_filters = p.trim().parse().map_err(|_| err("P (after `@`) is not a whole number"))?;
        Ok(NetSize { n, penultimate_filters })
    }
}

/// Channels and (square) spatial size of a feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureShape {
    /// Channels.
    pub channels: usize,
    /// Height and width.
    pub size: usize,
}

impl FeatureShape {
    /// `HxWxC` in ASCII, as TF-Slim's endpoint tables write shapes.
    pub fn hwc(&self) -> String {
        format!("{}x{}x{}", self.size, self.size, self.channels)
    }
}

impl fmt::Display for FeatureShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}×{}", self.size, self.size, self.channels)
    }
}

/// The first convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StemConv {
    /// Image channels.
    pub c_in: usize,
    /// Filters.
    pub c_out: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// SAME (CIFAR) or VALID (ImageNet) padding.
    pub same_padding: bool,
}

/// The wiring of a whole network.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPlan {
    /// Which stem.
    pub stem: Stem,
    /// The stem's convolution (followed by BN, no ReLU).
    pub stem_conv: StemConv,
    /// Index into `outputs` of the stem's output (the conv, or the last ImageNet stem cell).
    pub stem_output: usize,
    /// Every cell in forward order, stem cells and reduction cells included.
    pub cells: Vec<CellPlan>,
    /// Output shapes: `outputs[0]` is the stem conv, `outputs[k + 1]` is `cells[k]`.
    pub outputs: Vec<FeatureShape>,
    /// The aux head, when the config asks for one.
    pub aux: Option<AuxPlan>,
    /// The classifier.
    pub head: HeadPlan,
    /// ScheduledDropPath's `total_num_cells`.
    pub total_num_cells: usize,
}

impl NetworkPlan {
    /// Endpoint names and shapes as TF-Slim names them (`Stem`, `Cell_0`, `Reduction_Cell_0`, …).
    pub fn endpoints(&self) -> Vec<(String, FeatureShape)> {
        let mut out = vec![("Stem".to_string(), self.outputs[self.stem_output])];
        for (k, cell) in self.cells.iter().enumerate() {
            if cell.name.starts_with("cell_stem") {
                continue;
            }
            let name = match cell.name.strip_prefix("reduction_cell_") {
                Some(idx) => format!("Reduction_Cell_{idx}"),
                None => cell.name.replacen("cell_", "Cell_", 1),
            };
            out.push((name, self.outputs[k + 1]));
        }
        out
    }
}

/// One cell of a network.
#[derive(Debug, Clone, PartialEq)]
pub struct CellPlan {
    /// TF-Slim scope: `cell_stem_0`, `cell_3`, `reduction_cell_1`.
    pub name: String,
    /// Normal or reduction.
    pub kind: CellKind,
    /// Index into `NetworkPlan::outputs` of the newest input (h_i).
    pub x: usize,
    /// Index of the previous input (h_{i-1}); `None` for the first cell after the stem conv.
    pub prev: Option<usize>,
    /// `int(F · filter_scaling)`: every branch's width.
    pub filter_size: usize,
    /// 1 for normal cells, 2 for reduction cells.
    pub stride: usize,
    /// The cell's position among all cells, for ScheduledDropPath (0-based).
    pub drop_path_index: usize,
    /// Every projection inside the cell.
    pub layout: CellLayout,
}

/// The auxiliary classifier (`_build_aux_head`): ReLU → 5×5 avg pool (stride 3, VALID) →
/// 1×1 conv to 128 → BN → ReLU → conv over the whole map to 768 → BN → ReLU → FC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuxPlan {
    /// Index into `NetworkPlan::outputs` of its input.
    pub after_output: usize,
    /// Its input shape.
    pub input: FeatureShape,
    /// Spatial size after the pool, which is also the second conv's kernel size.
    pub pooled_size: usize,
}

/// ReLU → global average pool → dropout → FC with bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadPlan {
    /// Channels into the classifier.
    pub c_in: usize,
    /// Classes out.
    pub num_classes: usize,
    /// Dropout keep probability before the FC layer.
    pub dense_dropout_keep_prob: f64,
}

/// How the previous input h_{i-1} becomes state 1 (`_reduce_prev_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrevAdjust {
    /// No previous input: state 1 is the raw newest input, unprocessed.
    UseX,
    /// Already the right shape: used as it is.
    Unchanged,
    /// ReLU → 1×1 conv (`prev_1x1`, `c_in → F`) → BN (`prev_bn`).
    Conv1x1 {
        /// Channels in.
        c_in: usize,
    },
    /// ReLU → factorized reduction (stride 2) to F channels.
    FactorizedReduction {
        /// Channels in.
        c_in: usize,
    },
}

/// How one op of a block is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpLayout {
    /// The state read.
    pub input: FeatureShape,
    /// 2 for ops of a reduction cell that read state 0 or 1, else 1.
    pub stride: usize,
    /// Whether a 1×1 projection to F is added: for identity when strided or `c_in != F`
    /// (ReLU → 1×1 → BN), for pools when `c_in != F` (1×1 → BN, no ReLU).
    pub projection: bool,
    /// The op's output.
    pub output: FeatureShape,
}

/// How one concatenated state reaches the output (`_combine_unused_states`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLayout {
    /// The state.
    pub state: usize,
    /// Its shape before any projection.
    pub input: FeatureShape,
    /// `Some(stride)` when it differs from the last block's output in channels or size:
    /// then a factorized reduction (no ReLU) brings it there.
    pub factorized_reduction: Option<usize>,
    /// Its shape in the concat.
    pub output: FeatureShape,
}

/// Every shape and projection inside one cell instance.
#[derive(Debug, Clone, PartialEq)]
pub struct CellLayout {
    /// The newest input before the preamble (ReLU → 1×1 conv `c → F` → BN).
    pub x: FeatureShape,
    /// How h_{i-1} is adjusted.
    pub prev_adjust: PrevAdjust,
    /// Shapes of all states: 0 and 1 after preamble and adjust, then one per block.
    pub states: Vec<FeatureShape>,
    /// The two ops of every block.
    pub ops: Vec<[OpLayout; 2]>,
    /// The concatenated states, in concat order.
    pub concat: Vec<OutputLayout>,
    /// The cell output.
    pub output: FeatureShape,
}

impl CellLayout {
    /// Lays out one cell (TF-Slim semantics) reading `x` and `prev` at width `filter_size`.
    pub fn new(
        cell: &Cell,
        kind: CellKind,
        x: FeatureShape,
        prev: Option<FeatureShape>,
        filter_size: usize,
        stride: usize,
    ) -> Result<CellLayout, SpecError> {
        cell.validate(kind)?;
        let f = filter_size;
        let (prev_adjust, state1) = match prev {
            None => (PrevAdjust::UseX, x),
            Some(p) if p.size != x.size => {
                if p.size.div_ceil(2) != x.size {
                    return Err(SpecError::Shape {
                        message: format!(
                            "previous input {p} cannot be reduced to the newest input's {s}×{s} by one stride-2 \
                             factorized reduction",
                            s = x.size
                        ),
                    });
                }
                (PrevAdjust::FactorizedReduction { c_in: p.channels }, FeatureShape { channels: f, size: x.size })
            }
            Some(p) if p.channels != f => {
                (PrevAdjust::Conv1x1 { c_in: p.channels }, FeatureShape { channels: f, size: x.size })
            }
            Some(p) => (PrevAdjust::Unchanged, p),
        };
        let mut states = vec![FeatureShape { channels: f, size: x.size }, state1];
        let mut ops = Vec::with_capacity(cell.blocks.len());
        for (b, block) in cell.blocks.iter().enumerate() {
            let sides = [0, 1].map(|side| {
                let input = states[block.inputs[side]];
                let op_stride = if block.inputs[side] < 2 { stride } else { 1 };
                let size = input.size.div_ceil(op_stride);
                let projection = match block.ops[side].kind() {
                    OpKind::Identity => op_stride > 1 || input.channels != f,
                    OpKind::Pool { .. } => input.channels != f,
                    OpKind::Conv(_) | OpKind::SepConv { .. } => false,
                };
                let channels = match block.ops[side].kind() {
                    OpKind::Identity | OpKind::Pool { .. } if !projection => input.channels,
                    _ => f,
                };
                OpLayout { input, stride: op_stride, projection, output: FeatureShape { channels, size } }
            });
            let [left, right] = sides;
            if left.output.size != right.output.size {
                return Err(SpecError::Shape {
                    message: format!(
                        "{kind} cell, block {b}: the left op gives {} but the right op gives {}",
                        left.output, right.output
                    ),
                });
            }
            let out = match block.combine {
                Combine::Add => {
                    if left.output.channels != right.output.channels {
                        return Err(SpecError::Shape {
                            message: format!("{kind} cell, block {b}: cannot add {} and {}", left.output, right.output),
                        });
                    }
                    left.output
                }
                Combine::Concat => {
                    FeatureShape { channels: left.output.channels + right.output.channels, size: left.output.size }
                }
            };
            states.push(out);
            ops.push(sides);
        }
        let last = *states.last().expect("validated cell has blocks");
        let mut concat = Vec::new();
        for state in cell.output_states() {
            let input = states[state];
            let factorized_reduction = if input.size != last.size {
                if input.size.div_ceil(2) != last.size {
                    return Err(SpecError::Shape {
                        message: format!(
                            "{kind} cell: output state {state} is {input}, which cannot be brought to {last}"
                        ),
                    });
                }
                Some(2)
            } else if input.channels != last.channels {
                Some(1)
            } else {
                None
            };
            let output = if factorized_reduction.is_some() { last } else { input };
            concat.push(OutputLayout { state, input, factorized_reduction, output });
        }
        let output = FeatureShape { channels: concat.iter().map(|c| c.output.channels).sum(), size: last.size };
        Ok(CellLayout { x, prev_adjust, states, ops, concat, output })
    }
}
