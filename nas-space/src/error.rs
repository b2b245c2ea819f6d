//! The one error type of the crate.

use std::path::PathBuf;

use thiserror::Error;

use crate::{CellKind, Combine, Op, Side};

/// Everything that can be wrong with a spec, an action sequence, a search space or
/// a network configuration. Messages name the cell, the block and the value.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// An op name that is neither a stable name nor a known alias.
    #[error("unknown op `{name}`; known ops: {}", known_op_names())]
    UnknownOp { name: String },

    /// A combine name other than `add` or `concat`.
    #[error("unknown combine `{name}`; known: add, concat")]
    UnknownCombine { name: String },

    /// A cell with no block at all.
    #[error("{cell} cell has no blocks")]
    NoBlocks { cell: CellKind },

    /// A block reads a state that does not exist yet.
    #[error(
        "{cell} cell, block {block}: {side} input {index} is out of range \
         (block {block} may read states 0..={})",
        available - 1
    )]
    InputOutOfRange { cell: CellKind, block: usize, side: Side, index: usize, available: usize },

    /// An explicit concat list with no entry.
    #[error("{cell} cell: the output concat list is empty")]
    EmptyConcat { cell: CellKind },

    /// An explicit concat list names a state the cell does not have.
    #[error("{cell} cell: output state {index} is out of range (the cell has states 0..={})", num_states - 1)]
    ConcatOutOfRange { cell: CellKind, index: usize, num_states: usize },

    /// An explicit concat list names a state twice.
    #[error("{cell} cell: output state {index} is listed twice in the concat list")]
    DuplicateConcat { cell: CellKind, index: usize },

    /// The cell does not have the search space's number of blocks.
    #[error("{cell} cell has {found} blocks, but the search space has B = {expected}")]
    BlockCount { cell: CellKind, expected: usize, found: usize },

    /// A block uses an op the search space does not offer.
    #[error("{cell} cell, block {block}: {side} op `{op}` is not in the search space's op list")]
    OpNotInSpace { cell: CellKind, block: usize, side: Side, op: Op },

    /// A block uses a combine method the search space does not offer.
    #[error("{cell} cell, block {block}: combine `{combine}` is not in the search space's combine list")]
    CombineNotInSpace { cell: CellKind, block: usize, combine: Combine },

    /// A syntax error in the text form.
    #[error("line {line}, column {column}: {message}")]
    Syntax { line: usize, column: usize, message: String },

    /// A semantic error found while parsing the text form, with where it was found.
    /// The inner error is part of the message (not a `source()`), so it prints once.
    #[error("line {line}, column {column}: {error}")]
    At { line: usize, column: usize, error: Box<SpecError> },

    /// Malformed JSON, or JSON of the wrong shape.
    #[error("invalid cell spec JSON at line {line}, column {column}: {message}")]
    Json { line: usize, column: usize, message: String },

    /// A spec file that could not be read. The I/O error is part of the message (not a
    /// `source()`), so it prints once.
    #[error("cannot read cell spec {}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },

    /// A mistake in a spec file, with the file's name.
    /// The inner error is part of the message (not a `source()`), so it prints once.
    #[error("in cell spec {}: {error}", path.display())]
    InFile { path: PathBuf, error: Box<SpecError> },

    /// A file written by a newer (or unknown) version of the format.
    #[error("cell spec format version {found} is not supported (this build reads version {supported})")]
    FormatVersion { found: u64, supported: u64 },

    /// An action sequence of the wrong length for the search space.
    #[error("expected {expected} actions for this search space, got {found}")]
    ActionCount { expected: usize, found: usize },

    /// An action value outside its step's choices.
    #[error("action {step} ({what}) is {value}, but that step has only {choices} choices")]
    ActionOutOfRange { step: usize, what: String, value: usize, choices: usize },

    /// A search space that cannot produce any cell.
    #[error("invalid search space: {reason}")]
    InvalidSpace { reason: String },

    /// A network configuration field with an unusable value.
    #[error("network config: `{field}` {message}")]
    Config { field: &'static str, message: String },

    /// An `N@P` size or `--net` value that does not parse or does not fit the cell.
    #[error("network size `{input}`: {message}")]
    NetSize { input: String, message: String },

    /// A network whose tensors cannot be wired with the given image size and cells.
    #[error("network shape: {message}")]
    Shape { message: String },
}

impl SpecError {
    /// The error without its text position or file name, for matching on the kind of mistake.
    pub fn kind(&self) -> &SpecError {
        match self {
            SpecError::At { error, .. } | SpecError::InFile { error, .. } => error.kind(),
            other => other,
        }
    }
}

fn known_op_names() -> String {
    Op::ALL.iter().map(|op| op.name()).collect::<Vec<_>>().join(", ")
}
