//! The search space as the controller sees it: a cell is a sequence of discrete actions.
//!
//! Paper §3 and Fig. 3: each block takes five decisions (hidden state A, hidden state B,
//! op A, op B, combine); a cell is B consecutive blocks and a spec is the normal cell's
//! 5B decisions followed by the reduction cell's. Block b picks its inputs among the
//! 2 + b states that exist when it runs.
//! Mutations follow regularized evolution (Real et al. 2019, "hidden state mutation"
//! and "op mutation").

use std::fmt;

use crate::{Block, Cell, CellKind, CellOutput, CellSpec, Combine, Op, Side, SpaceRng, SpecError};

/// The grammar the controller samples from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SearchSpace {
    /// B: blocks per cell.
    pub num_blocks: usize,
    /// The op choices; an op's position is its action value.
    pub ops: Vec<Op>,
    /// The combine choices; a method's position is its action value.
    pub combines: Vec<Combine>,
}

/// What one action step decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Which state a block side reads (2 + block choices).
    Input,
    /// Which op a block side applies.
    Op,
    /// How the block combines its two sides.
    Combine,
}

/// One step of the action sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ActionStep {
    /// The cell the step belongs to.
    pub cell: CellKind,
    /// The block within the cell.
    pub block: usize,
    /// The side, for input and op decisions.
    pub side: Option<Side>,
    /// What is decided.
    pub decision: Decision,
    /// Number of choices at this step.
    pub choices: usize,
}

impl fmt::Display for ActionStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.decision {
            Decision::Input => "input",
            Decision::Op => "op",
            Decision::Combine => "combine",
        };
        match self.side {
            Some(side) => write!(f, "{} cell, block {}, {side} {what}", self.cell, self.block),
            None => write!(f, "{} cell, block {}, {what}", self.cell, self.block),
        }
    }
}

/// What a mutation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mutation {
    /// The mutated cell.
    pub cell: CellKind,
    /// The mutated block.
    pub block: usize,
    /// The mutated side (none for a combine, which belongs to the block).
    pub side: Option<Side>,
    /// The change itself.
    pub change: MutationChange,
}

/// The mutation kinds of regularized evolution (the paper's two, and the combine of this
/// project's space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutationChange {
    /// Hidden-state mutation: the side reads another state.
    Input { from: usize, to: usize },
    /// Op mutation: the side applies another op.
    Op { from: Op, to: Op },
    /// Combine mutation: the block combines its two sides another way.
    Combine { from: Combine, to: Combine },
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cell, block {}, ", self.cell, self.block)?;
        match (self.change, self.side) {
            (MutationChange::Input { from, to }, Some(side)) => write!(f, "{side} input: h{from} -> h{to}"),
            (MutationChange::Op { from, to }, Some(side)) => write!(f, "{side} op: {from} -> {to}"),
            (MutationChange::Combine { from, to }, _) => write!(f, "combine: {from} -> {to}"),
            (change, None) => write!(f, "{change:?}"),
        }
    }
}

impl SearchSpace {
    /// The paper's space: B = 5, the 13 ops, add and concat.
    pub fn nasnet() -> SearchSpace {
        SearchSpace { num_blocks: 5, ops: Op::ALL.to_vec(), combines: Combine::ALL.to_vec() }
    }

    /// The paper's space with B blocks.
    pub fn with_blocks(num_blocks: usize) -> SearchSpace {
        SearchSpace { num_blocks, ..SearchSpace::nasnet() }
    }

    /// ENAS's micro space (Pham et al. 2018): B = 5; `sep_conv_3x3`, `sep_conv_5x5`,
    /// `avg_pool_3x3`, `max_pool_3x3` and `identity`; add only.
    pub fn enas() -> SearchSpace {
        let ops = vec![Op::SepConv3x3, Op::SepConv5x5, Op::AvgPool3x3, Op::MaxPool3x3, Op::Identity];
        SearchSpace { num_blocks: 5, ops, combines: vec![Combine::Add] }
    }

    /// This space with add as the only combine: the space of weight sharing, where every
    /// state of a cell has the cell's width whatever the sampled cell (a concatenating block
    /// would double its state's width, and every op reading it would need other weights).
    pub fn add_only(&self) -> SearchSpace {
        SearchSpace { combines: vec![Combine::Add], ..self.clone() }
    }

    /// Checks that the space can produce cells and that its choice lists have no repeats.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |reason: String| Err(SpecError::InvalidSpace { reason });
        if self.num_blocks == 0 {
            return bad("B must be at least 1".into());
        }
        if self.ops.is_empty() {
            return bad("the op list is empty".into());
        }
        if self.combines.is_empty() {
            return bad("the combine list is empty".into());
        }
        for (i, op) in self.ops.iter().enumerate() {
            if self.ops[..i].contains(op) {
                return bad(format!("op `{op}` is listed twice"));
            }
        }
        for (i, c) in self.combines.iter().enumerate() {
            if self.combines[..i].contains(c) {
                return bad(format!("combine `{c}` is listed twice"));
            }
        }
        Ok(())
    }

    /// Actions per cell: 5B.
    pub fn actions_per_cell(&self) -> usize {
        5 * self.num_blocks
    }

    /// Actions per spec: 2 × 5B.
    pub fn num_actions(&self) -> usize {
        2 * self.actions_per_cell()
    }

    /// Every step of the action sequence, in the controller's order.
    pub fn steps(&self) -> Vec<ActionStep> {
        let mut steps = Vec::with_capacity(self.num_actions());
        for cell in CellKind::ALL {
            for block in 0..self.num_blocks {
                for side in Side::BOTH {
                    steps.push(ActionStep {
                        cell,
                        block,
                        side: Some(side),
                        decision: Decision::Input,
                        choices: 2 + block,
                    });
                }
                for side in Side::BOTH {
                    let choices = self.ops.len();
                    steps.push(ActionStep { cell, block, side: Some(side), decision: Decision::Op, choices });
                }
                let choices = self.combines.len();
                steps.push(ActionStep { cell, block, side: None, decision: Decision::Combine, choices });
            }
        }
        steps
    }

    /// Checks that `spec` is valid and lies in this space (block count, ops, combines).
    pub fn validate_spec(&self, spec: &CellSpec) -> Result<(), SpecError> {
        spec.validate()?;
        for kind in CellKind::ALL {
            let cell = spec.cell(kind);
            if cell.blocks.len() != self.num_blocks {
                return Err(SpecError::BlockCount { cell: kind, expected: self.num_blocks, found: cell.blocks.len() });
            }
            for (b, block) in cell.blocks.iter().enumerate() {
                for side in Side::BOTH {
                    let op = block.ops[side.index()];
                    if !self.ops.contains(&op) {
                        return Err(SpecError::OpNotInSpace { cell: kind, block: b, side, op });
                    }
                }
                if !self.combines.contains(&block.combine) {
                    return Err(SpecError::CombineNotInSpace { cell: kind, block: b, combine: block.combine });
                }
            }
        }
        Ok(())
    }

    /// The action sequence of a spec: per cell and block `[input A, input B, op A, op B,
    /// combine]`. The output rule is not an action (the controller's cells use the
    /// paper's unused-states rule), so it is not encoded.
    pub fn encode(&self, spec: &CellSpec) -> Result<Vec<usize>, SpecError> {
        self.validate_spec(spec)?;
        let mut actions = Vec::with_capacity(self.num_actions());
        for kind in CellKind::ALL {
            for block in &spec.cell(kind).blocks {
                actions.extend_from_slice(&block.inputs);
                for op in block.ops {
                    actions.push(self.ops.iter().position(|&o| o == op).expect("validated op"));
                }
                actions.push(self.combines.iter().position(|&c| c == block.combine).expect("validated combine"));
            }
        }
        Ok(actions)
    }

    /// The spec of an action sequence; both cells get the paper's unused-states output.
    pub fn decode(&self, actions: &[usize]) -> Result<CellSpec, SpecError> {
        self.validate()?;
        if actions.len() != self.num_actions() {
            return Err(SpecError::ActionCount { expected: self.num_actions(), found: actions.len() });
        }
        let steps = self.steps();
        for (i, (&value, step)) in actions.iter().zip(&steps).enumerate() {
            if value >= step.choices {
                return Err(SpecError::ActionOutOfRange {
                    step: i,
                    what: step.to_string(),
                    value,
                    choices: step.choices,
                });
            }
        }
        let cell = |chunk: &[usize]| Cell {
            blocks: chunk
                .chunks(5)
                .map(|a| Block {
                    inputs: [a[0], a[1]],
                    ops: [self.ops[a[2]], self.ops[a[3]]],
                    combine: self.combines[a[4]],
                })
                .collect(),
            output: CellOutput::UnusedBlocks,
        };
        let (normal, reduction) = actions.split_at(self.actions_per_cell());
        Ok(CellSpec { normal: cell(normal), reduction: cell(reduction) })
    }

    /// Number of action sequences for one cell: ∏_b (2 + b)² · |ops|² · |combines|.
    /// `None` if it does not fit in a `u128`.
    pub fn cell_action_count(&self) -> Option<u128> {
        let ops = self.ops.len() as u128;
        let combines = self.combines.len() as u128;
        (0..self.num_blocks).try_fold(1u128, |acc, b| {
            let inputs = (2 + b) as u128;
            acc.checked_mul(inputs * inputs * ops * ops * combines)
        })
    }

    /// Number of cells once the two sides of every block are unordered (both combines
    /// are symmetric): ∏_b m_b (m_b + 1) / 2 · |combines| with m_b = (2 + b) · |ops|.
    /// Cells that differ only by the order of independent blocks are still counted
    /// apart, so this is an upper bound on distinct networks.
    pub fn cell_count_unordered_sides(&self) -> Option<u128> {
        let ops = self.ops.len() as u128;
        let combines = self.combines.len() as u128;
        (0..self.num_blocks).try_fold(1u128, |acc, b| {
            let m = (2 + b) as u128 * ops;
            acc.checked_mul(m * (m + 1) / 2 * combines)
        })
    }

    /// log10 of the number of action sequences for a whole spec (both cells), which
    /// never overflows.
    pub fn log10_spec_action_count(&self) -> f64 {
        let ops = self.ops.len() as f64;
        let combines = self.combines.len() as f64;
        let per_cell: f64 =
            (0..self.num_blocks).map(|b| 2.0 * ((2 + b) as f64).log10() + 2.0 * ops.log10() + combines.log10()).sum();
        2.0 * per_cell
    }

    /// A uniformly random cell of the space, with the unused-states output
    /// (the paper's random-search baseline draws every decision uniformly).
    pub fn sample_cell(&self, rng: &mut SpaceRng) -> Cell {
        let blocks = (0..self.num_blocks)
            .map(|b| Block {
                inputs: [rng.below(2 + b), rng.below(2 + b)],
                ops: [self.ops[rng.below(self.ops.len())], self.ops[rng.below(self.ops.len())]],
                combine: self.combines[rng.below(self.combines.len())],
            })
            .collect();
        Cell { blocks, output: CellOutput::UnusedBlocks }
    }

    /// A uniformly random spec (normal cell drawn first).
    pub fn sample(&self, rng: &mut SpaceRng) -> CellSpec {
        let normal = self.sample_cell(rng);
        let reduction = self.sample_cell(rng);
        CellSpec { normal, reduction }
    }

    /// Regularized evolution's mutation: pick a cell and a block uniformly, then one kind of
    /// change with equal odds among those the space allows: make one side (picked uniformly)
    /// read another state, make it apply another op (when the space has more than one op),
    /// or combine the block's sides another way (when it has more than one combine). In the
    /// paper's space each kind has probability 1/3; the new choice is uniform among the
    /// others. Exactly one decision changes. `spec` must lie in the space.
    pub fn mutate(&self, spec: &CellSpec, rng: &mut SpaceRng) -> Result<(CellSpec, Mutation), SpecError> {
        self.validate()?;
        self.validate_spec(spec)?;
        let mut child = spec.clone();
        let cell = CellKind::ALL[rng.below(2)];
        let block = rng.below(self.num_blocks);
        let side = Side::BOTH[rng.below(2)];
        let b = &mut child.cell_mut(cell).blocks[block];
        let mut kinds = vec![0];
        if self.ops.len() > 1 {
            kinds.push(1);
        }
        if self.combines.len() > 1 {
            kinds.push(2);
        }
        let (side, change) = match kinds[rng.below(kinds.len())] {
            1 => {
                let from = b.ops[side.index()];
                let others: Vec<Op> = self.ops.iter().copied().filter(|&op| op != from).collect();
                let to = others[rng.below(others.len())];
                b.ops[side.index()] = to;
                (Some(side), MutationChange::Op { from, to })
            }
            2 => {
                let from = b.combine;
                let others: Vec<Combine> = self.combines.iter().copied().filter(|&c| c != from).collect();
                let to = others[rng.below(others.len())];
                b.combine = to;
                (None, MutationChange::Combine { from, to })
            }
            _ => {
                let from = b.inputs[side.index()];
                // Block `block` reads among 2 + block states; skip `from`.
                let mut to = rng.below(1 + block);
                if to >= from {
                    to += 1;
                }
                b.inputs[side.index()] = to;
                (Some(side), MutationChange::Input { from, to })
            }
        };
        Ok((child, Mutation { cell, block, side, change }))
    }
}
