//! The 13 candidate operations of the NASNet search space and the two combine methods.
//!
//! Paper §3 (list of operations) and TF-Slim `nasnet_utils.py`
//! (`_apply_conv_operation`, `_stacked_separable_conv`, `_pooling`).
//! Every op maps its input to the cell's `filter_size` channels; the layer-level
//! contract of each op (which is what `nas-ops` builds and `cost` counts) is in the
//! doc comment of its variant.

use std::fmt;
use std::str::FromStr;

use crate::SpecError;

/// One candidate operation on a hidden state (paper §3, steps 3 and 4 of a block).
///
/// Every op reads a state with `c_in` channels and returns `filter_size` (F)
/// channels. In a reduction cell an op that reads one of the two cell inputs
/// (states 0 and 1) runs with stride 2; every other op runs with stride 1.
/// All convolutions are ReLU → conv → BN, without bias (paper §A.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `identity`. A true identity, except when the op is strided or `c_in != F`:
    /// then ReLU → 1×1 conv (stride s, `c_in → F`) → BN (TF-Slim `none`).
    /// Drop path never applies to it.
    Identity,
    /// `conv_1x3_3x1`: ReLU → 1×3 conv (stride s, `c_in → F`) → 3×1 conv (`F → F`) → BN.
    Conv1x3Then3x1,
    /// `conv_1x7_7x1`: ReLU → 1×7 conv (stride s, `c_in → F`) → 7×1 conv (`F → F`) → BN.
    Conv1x7Then7x1,
    /// `dil_conv_3x3`: ReLU → 3×3 conv with dilation 2 (stride s, `c_in → F`) → BN.
    DilConv3x3,
    /// `avg_pool_3x3`: SAME average pool (padding excluded from the divisor), then
    /// 1×1 conv → BN (no ReLU) when `c_in != F` (TF-Slim `avg_pool_3x3`).
    AvgPool3x3,
    /// `max_pool_3x3`: SAME max pool (padding ignored), then 1×1 conv → BN when `c_in != F`.
    MaxPool3x3,
    /// `max_pool_5x5`: as `max_pool_3x3` with a 5×5 window.
    MaxPool5x5,
    /// `max_pool_7x7`: as `max_pool_3x3` with a 7×7 window.
    MaxPool7x7,
    /// `conv_1x1`: ReLU → 1×1 conv (stride s, `c_in → F`) → BN.
    Conv1x1,
    /// `conv_3x3`: ReLU → 3×3 conv (stride s, `c_in → F`) → BN.
    Conv3x3,
    /// `sep_conv_3x3`: the separable conv applied twice (TF-Slim `separable_3x3_2`):
    /// ReLU → depthwise 3×3 (stride s) → pointwise `c_in → F` → BN → ReLU →
    /// depthwise 3×3 → pointwise `F → F` → BN. The stride is on the first depthwise only.
    SepConv3x3,
    /// `sep_conv_5x5`: as `sep_conv_3x3` with 5×5 depthwise kernels (`separable_5x5_2`).
    SepConv5x5,
    /// `sep_conv_7x7`: as `sep_conv_3x3` with 7×7 depthwise kernels (`separable_7x7_2`).
    SepConv7x7,
}

/// How an op is built, in layer terms: what the cost model counts and `nas-ops` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Identity (with a strided or channel-changing 1×1 projection when needed).
    Identity,
    /// ReLU → a chain of dense convs (the first one strided and `c_in → F`, the rest
    /// `F → F`) → one BN. Each entry is `(kernel_h, kernel_w, dilation)`.
    Conv(&'static [(usize, usize, usize)]),
    /// A SAME pooling window, followed by a 1×1 conv and BN when `c_in != F`.
    Pool { kind: PoolKind, kernel: usize },
    /// Two stacked separable convs with a `kernel × kernel` depthwise part.
    SepConv { kernel: usize },
}

/// Average or max pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Average over the real (non-padded) elements of the window.
    Avg,
    /// Max over the real elements of the window (padding acts as −∞).
    Max,
}

impl Op {
    /// The 13 operations in the paper's order (§3). This is the op action space of
    /// [`crate::SearchSpace::nasnet`]: an op's position here is its action value.
    pub const ALL: [Op; 13] = [
        Op::Identity,
        Op::Conv1x3Then3x1,
        Op::Conv1x7Then7x1,
        Op::DilConv3x3,
        Op::AvgPool3x3,
        Op::MaxPool3x3,
        Op::MaxPool5x5,
        Op::MaxPool7x7,
        Op::Conv1x1,
        Op::Conv3x3,
        Op::SepConv3x3,
        Op::SepConv5x5,
        Op::SepConv7x7,
    ];

    /// The stable text name, used by the text form, JSON, and every printout.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Identity => "identity",
            Op::Conv1x3Then3x1 => "conv_1x3_3x1",
            Op::Conv1x7Then7x1 => "conv_1x7_7x1",
            Op::DilConv3x3 => "dil_conv_3x3",
            Op::AvgPool3x3 => "avg_pool_3x3",
            Op::MaxPool3x3 => "max_pool_3x3",
            Op::MaxPool5x5 => "max_pool_5x5",
            Op::MaxPool7x7 => "max_pool_7x7",
            Op::Conv1x1 => "conv_1x1",
            Op::Conv3x3 => "conv_3x3",
            Op::SepConv3x3 => "sep_conv_3x3",
            Op::SepConv5x5 => "sep_conv_5x5",
            Op::SepConv7x7 => "sep_conv_7x7",
        }
    }

    /// TF-Slim's name for the op, where TF-Slim implements it (`nasnet_utils.py`
    /// knows only the four ops NASNet-A uses, plus the other separable kernels).
    pub const fn tf_slim_name(self) -> Option<&'static str> {
        match self {
            Op::Identity => Some("none"),
            Op::AvgPool3x3 => Some("avg_pool_3x3"),
            Op::MaxPool3x3 => Some("max_pool_3x3"),
            Op::MaxPool5x5 => Some("max_pool_5x5"),
            Op::MaxPool7x7 => Some("max_pool_7x7"),
            Op::SepConv3x3 => Some("separable_3x3_2"),
            Op::SepConv5x5 => Some("separable_5x5_2"),
            Op::SepConv7x7 => Some("separable_7x7_2"),
            _ => None,
        }
    }

    /// A short label for drawings.
    pub const fn short_label(self) -> &'static str {
        match self {
            Op::Identity => "identity",
            Op::Conv1x3Then3x1 => "1x3+3x1",
            Op::Conv1x7Then7x1 => "1x7+7x1",
            Op::DilConv3x3 => "dil 3x3",
            Op::AvgPool3x3 => "avg 3x3",
            Op::MaxPool3x3 => "max 3x3",
            Op::MaxPool5x5 => "max 5x5",
            Op::MaxPool7x7 => "max 7x7",
            Op::Conv1x1 => "conv 1x1",
            Op::Conv3x3 => "conv 3x3",
            Op::SepConv3x3 => "sep 3x3",
            Op::SepConv5x5 => "sep 5x5",
            Op::SepConv7x7 => "sep 7x7",
        }
    }

    /// The layer-level shape of the op.
    pub const fn kind(self) -> OpKind {
        match self {
            Op::Identity => OpKind::Identity,
            Op::Conv1x3Then3x1 => OpKind::Conv(&[(1, 3, 1), (3, 1, 1)]),
            Op::Conv1x7Then7x1 => OpKind::Conv(&[(1, 7, 1), (7, 1, 1)]),
            Op::DilConv3x3 => OpKind::Conv(&[(3, 3, 2)]),
            Op::Conv1x1 => OpKind::Conv(&[(1, 1, 1)]),
            Op::Conv3x3 => OpKind::Conv(&[(3, 3, 1)]),
            Op::AvgPool3x3 => OpKind::Pool { kind: PoolKind::Avg, kernel: 3 },
            Op::MaxPool3x3 => OpKind::Pool { kind: PoolKind::Max, kernel: 3 },
            Op::MaxPool5x5 => OpKind::Pool { kind: PoolKind::Max, kernel: 5 },
            Op::MaxPool7x7 => OpKind::Pool { kind: PoolKind::Max, kernel: 7 },
            Op::SepConv3x3 => OpKind::SepConv { kernel: 3 },
            Op::SepConv5x5 => OpKind::SepConv { kernel: 5 },
            Op::SepConv7x7 => OpKind::SepConv { kernel: 7 },
        }
    }

    /// Whether ScheduledDropPath may drop this op's output (never on identity, §5.9).
    pub const fn takes_drop_path(self) -> bool {
        !matches!(self, Op::Identity)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = SpecError;

    /// Accepts the stable names, TF-Slim's names (`none`, `separable_5x5_2`, …) and
    /// DARTS's (`skip_connect`, `conv_7x1_1x7`, `dil_conv_3x3`), case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(op) = Op::ALL.iter().find(|op| op.name() == lower) {
            return Ok(*op);
        }
        let op = match lower.as_str() {
            "none" | "skip_connect" | "skip" => Op::Identity,
            "separable_3x3_2" => Op::SepConv3x3,
            "separable_5x5_2" => Op::SepConv5x5,
            "separable_7x7_2" => Op::SepConv7x7,
            "conv_3x1_1x3" | "1x3_3x1" | "1x3_then_3x1" => Op::Conv1x3Then3x1,
            "conv_7x1_1x7" | "1x7_7x1" | "1x7_then_7x1" => Op::Conv1x7Then7x1,
            "dilated_conv_3x3" | "dilated_3x3" => Op::DilConv3x3,
            "avg_3x3" | "avgpool_3x3" => Op::AvgPool3x3,
            "max_3x3" | "maxpool_3x3" => Op::MaxPool3x3,
            "max_5x5" | "maxpool_5x5" => Op::MaxPool5x5,
            "max_7x7" | "maxpool_7x7" => Op::MaxPool7x7,
            "1x1" => Op::Conv1x1,
            "3x3" => Op::Conv3x3,
            _ => return Err(SpecError::UnknownOp { name: s.trim().to_string() }),
        };
        Ok(op)
    }
}

/// How a block joins its two op outputs (paper §3, step 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Combine {
    /// Element-wise addition (the only one TF-Slim implements, and NASNet-A's choice).
    Add,
    /// Concatenation along the channel axis (the block output has 2F channels).
    Concat,
}

impl Combine {
    /// Both combine methods in the paper's order; a method's position is its action value.
    pub const ALL: [Combine; 2] = [Combine::Add, Combine::Concat];

    /// The stable text name.
    pub const fn name(self) -> &'static str {
        match self {
            Combine::Add => "add",
            Combine::Concat => "concat",
        }
    }
}

impl fmt::Display for Combine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Combine {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "add" | "sum" => Ok(Combine::Add),
            "concat" | "cat" => Ok(Combine::Concat),
            _ => Err(SpecError::UnknownCombine { name: s.trim().to_string() }),
        }
    }
}
