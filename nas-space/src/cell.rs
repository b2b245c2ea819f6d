//! Blocks, cells and the `CellSpec` every other crate meets at.
//!
//! State indices follow TF-Slim (`nasnet_utils.py`, `_cell_base`): state 0 is h_i,
//! the output of the previous cell after the cell's ReLU → 1×1 conv → BN preamble;
//! state 1 is h_{i-1}, the output of the cell before that after the "adjust" step;
//! state 2 + b is the output of block b. DARTS numbers the two inputs the other way.

use std::fmt;

use crate::{Combine, Op, SpecError};

/// Which of the two cells of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellKind {
    /// Keeps the spatial size of its input.
    Normal,
    /// Halves height and width: ops reading the cell inputs run with stride 2.
    Reduction,
}

impl CellKind {
    /// Both kinds, in the controller's order (normal first, paper §3).
    pub const ALL: [CellKind; 2] = [CellKind::Normal, CellKind::Reduction];

    /// `normal` or `reduction`.
    pub const fn name(self) -> &'static str {
        match self {
            CellKind::Normal => "normal",
            CellKind::Reduction => "reduction",
        }
    }
}

impl fmt::Display for CellKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The first (left) or second (right) half of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The first hidden-state choice and the first op.
    Left,
    /// The second hidden-state choice and the second op.
    Right,
}

impl Side {
    /// Both sides, left first.
    pub const BOTH: [Side; 2] = [Side::Left, Side::Right];

    /// 0 for left, 1 for right: the position in `Block::inputs` and `Block::ops`.
    pub const fn index(self) -> usize {
        match self {
            Side::Left => 0,
            Side::Right => 1,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Left => "left",
            Side::Right => "right",
        })
    }
}

/// One block: two hidden states, an op on each, and how the two results combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    /// The states read by the left and right op (TF-Slim `hiddenstate_indices` pair).
    pub inputs: [usize; 2],
    /// The left and right op (TF-Slim `operations` pair).
    pub ops: [Op; 2],
    /// How the two op outputs become the block output.
    pub combine: Combine,
}

impl Block {
    /// An `add` block.
    pub const fn add(left: (usize, Op), right: (usize, Op)) -> Block {
        Block { inputs: [left.0, right.0], ops: [left.1, right.1], combine: Combine::Add }
    }
}

/// Which states form a cell's output, concatenated along channels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellOutput {
    /// An explicit list of states, concatenated in list order, as TF-Slim's hard-coded
    /// `used_hiddenstates` does. It may include the cell inputs (NASNet-A's normal cell
    /// concatenates state 1).
    Concat(Vec<usize>),
    /// The paper's rule (§3): every block output that no block of the cell reads,
    /// in index order.
    UnusedBlocks,
}

/// A cell: B blocks and its output rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// The blocks in order; block b's output is state 2 + b.
    pub blocks: Vec<Block>,
    /// Which states are concatenated into the cell output.
    pub output: CellOutput,
}

impl Cell {
    /// Number of hidden states: the two cell inputs plus one per block.
    pub fn num_states(&self) -> usize {
        2 + self.blocks.len()
    }

    /// Whether any block of the cell reads `state`.
    pub fn is_read(&self, state: usize) -> bool {
        self.blocks.iter().any(|block| block.inputs.contains(&state))
    }

    /// The states concatenated into the cell output, in concat order.
    pub fn output_states(&self) -> Vec<usize> {
        match &self.output {
            CellOutput::Concat(states) => states.clone(),
            CellOutput::UnusedBlocks => (2..self.num_states()).filter(|&s| !self.is_read(s)).collect(),
        }
    }

    /// TF-Slim's `used_hiddenstates` mask for this cell: 1 for every state that is not
    /// concatenated into the output. Meaningful for outputs in index order (both presets).
    pub fn used_hiddenstates(&self) -> Vec<bool> {
        let out = self.output_states();
        (0..self.num_states()).map(|s| !out.contains(&s)).collect()
    }

    /// Checks that every block reads existing states and the output list is usable.
    pub fn validate(&self, kind: CellKind) -> Result<(), SpecError> {
        if self.blocks.is_empty() {
            return Err(SpecError::NoBlocks { cell: kind });
        }
        for (b, block) in self.blocks.iter().enumerate() {
            for side in Side::BOTH {
                let index = block.inputs[side.index()];
                if index >= 2 + b {
                    return Err(SpecError::InputOutOfRange { cell: kind, block: b, side, index, available: 2 + b });
                }
            }
        }
        if let CellOutput::Concat(states) = &self.output {
            if states.is_empty() {
                return Err(SpecError::EmptyConcat { cell: kind });
            }
            for (i, &index) in states.iter().enumerate() {
                if index >= self.num_states() {
                    return Err(SpecError::ConcatOutOfRange { cell: kind, index, num_states: self.num_states() });
                }
                if states[..i].contains(&index) {
                    return Err(SpecError::DuplicateConcat { cell: kind, index });
                }
            }
        }
        Ok(())
    }

    /// States that influence the cell output: the output states and, transitively,
    /// everything they read. Blocks outside this set are dead code.
    pub fn live_states(&self) -> Vec<bool> {
        let mut live = vec![false; self.num_states()];
        for s in self.output_states() {
            live[s] = true;
        }
        for b in (0..self.blocks.len()).rev() {
            if live[2 + b] {
                for &input in &self.blocks[b].inputs {
                    live[input] = true;
                }
            }
        }
        live
    }
}

/// A normal and a reduction cell: one point of the NASNet search space.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellSpec {
    /// The cell that keeps the spatial size.
    pub normal: Cell,
    /// The cell that halves the spatial size (also the ImageNet stem cells).
    pub reduction: Cell,
}

impl CellSpec {
    /// The cell of the given kind.
    pub fn cell(&self, kind: CellKind) -> &Cell {
        match kind {
            CellKind::Normal => &self.normal,
            CellKind::Reduction => &self.reduction,
        }
    }

    /// Mutable access to the cell of the given kind.
    pub fn cell_mut(&mut self, kind: CellKind) -> &mut Cell {
        match kind {
            CellKind::Normal => &mut self.normal,
            CellKind::Reduction => &mut self.reduction,
        }
    }

    /// Validates both cells (the first error wins, normal cell first).
    pub fn validate(&self) -> Result<(), SpecError> {
        self.normal.validate(CellKind::Normal)?;
        self.reduction.validate(CellKind::Reduction)
    }
}
