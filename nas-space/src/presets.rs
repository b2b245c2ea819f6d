//! Published cells.
//!
//! NASNet-A is transcribed from TF-Slim `nasnet_utils.py` (`NasNetANormalCell`,
//! `NasNetAReductionCell`), including its hard-coded concat lists, which differ from
//! the paper's "unused states" rule (the released checkpoints follow the code).
//!
//! NASNet-B and NASNet-C are **not** provided: their wiring is published only in the
//! paper's Figures 8 and 9, no reference implementation (TF-Slim, Keras, Cadene, timm)
//! has them, and this crate does not guess. NASNet-B also lies outside this search
//! space (B = 4, four cell inputs, add+layer-norm and add+instance-norm combines).

use crate::{Block, Cell, CellOutput, CellSpec, Op};

/// Names accepted by [`preset`], with a one-line description each.
pub const PRESETS: [(&str, &str); 1] =
    [("nasnet-a", "NASNet-A normal and reduction cells, TF-Slim wiring and concat lists")];

/// Names of published cells that are deliberately absent, and why.
pub const UNAVAILABLE: [(&str, &str); 2] = [
    ("nasnet-b", "NASNet-B's wiring is only in the paper's Figure 8, which no reference implementation transcribes; it also uses B = 4, four inputs and normalised combines, outside this space"),
    ("nasnet-c", "NASNet-C's wiring is only in the paper's Figure 9, which no reference implementation transcribes"),
];

/// Looks a preset up by name (`nasnet-a`, also `nasnet_a` and `NASNet-A`).
/// `None` for unknown names; see [`UNAVAILABLE`] for the published cells left out.
pub fn preset(name: &str) -> Option<CellSpec> {
    match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "nasnet-a" | "nasneta" => Some(CellSpec::nasnet_a()),
        _ => None,
    }
}

impl CellSpec {
    /// NASNet-A (paper §4, Fig. 4), exactly as TF-Slim builds it.
    pub fn nasnet_a() -> CellSpec {
        CellSpec { normal: Cell::nasnet_a_normal(), reduction: Cell::nasnet_a_reduction() }
    }
}

impl Cell {
    /// NASNet-A normal cell (`NasNetANormalCell`):
    /// `hiddenstate_indices = [0, 1, 1, 1, 0, 1, 1, 1, 0, 0]`,
    /// `operations = [separable_5x5_2, separable_3x3_2, separable_5x5_2, separable_3x3_2,
    /// avg_pool_3x3, none, avg_pool_3x3, avg_pool_3x3, separable_3x3_2, none]`,
    /// `used_hiddenstates = [1, 0, 0, 0, 0, 0, 0]`, so the output concatenates states 1..=6.
    pub fn nasnet_a_normal() -> Cell {
        use Op::*;
        Cell {
            blocks: vec![
                Block::add((0, SepConv5x5), (1, SepConv3x3)),
                Block::add((1, SepConv5x5), (1, SepConv3x3)),
                Block::add((0, AvgPool3x3), (1, Identity)),
                Block::add((1, AvgPool3x3), (1, AvgPool3x3)),
                Block::add((0, SepConv3x3), (0, Identity)),
            ],
            output: CellOutput::Concat(vec![1, 2, 3, 4, 5, 6]),
        }
    }

    /// NASNet-A reduction cell (`NasNetAReductionCell`):
    /// `hiddenstate_indices = [0, 1, 0, 1, 0, 1, 3, 2, 2, 0]`,
    /// `operations = [separable_5x5_2, separable_7x7_2, max_pool_3x3, separable_7x7_2,
    /// avg_pool_3x3, separable_5x5_2, none, avg_pool_3x3, separable_3x3_2, max_pool_3x3]`,
    /// `used_hiddenstates = [1, 1, 1, 0, 0, 0, 0]`, so the output concatenates states 3..=6.
    pub fn nasnet_a_reduction() -> Cell {
        use Op::*;
        Cell {
            blocks: vec![
                Block::add((0, SepConv5x5), (1, SepConv7x7)),
                Block::add((0, MaxPool3x3), (1, SepConv7x7)),
                Block::add((0, AvgPool3x3), (1, SepConv5x5)),
                Block::add((3, Identity), (2, AvgPool3x3)),
                Block::add((2, SepConv3x3), (0, MaxPool3x3)),
            ],
            output: CellOutput::Concat(vec![3, 4, 5, 6]),
        }
    }
}
