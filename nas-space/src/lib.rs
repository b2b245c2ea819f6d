//! The NASNet search space as data.
//!
//! This crate owns the grammar every other crate of the workspace meets at:
//! the 13 [`Op`]s and two [`Combine`]s of the paper, [`Block`], [`Cell`] and
//! [`CellSpec`] with their validation, a human-readable text form and a versioned
//! JSON form (and reading either from a file, `CellSpec::read_file`), the NASNet-A
//! preset, the controller's action grammar
//! ([`SearchSpace`]: actions, counting, seeded sampling, mutation, canonical
//! form and stable hash), the network skeleton around the cells
//! ([`NetworkConfig`]), an analytical cost model (parameters and mult-adds,
//! no tensors), the paper's published figures to compare with ([`reference`](mod@reference)),
//! and Graphviz/SVG drawings of cells.
//!
//! It also owns the few helpers every crate of the workspace shares, being the one
//! below them all: the seeded generator whose stream never changes ([`SpaceRng`]),
//! the stable hash ([`fnv1a`]), and [`files`]: the atomic write and the versioned
//! JSON form of every file the workspace writes and reads back.
//!
//! It does not own tensors: it never depends on candle, and builds in seconds,
//! so other projects can import it to read, write and reason about NASNet cells.
//!
//! Conventions (from TF-Slim `nasnet_utils.py`): state 0 is h_i (the
//! previous cell's output after the preamble), state 1 is h_{i-1}, state 2 + b is
//! the output of block b.
//!
//! ```
//! use nas_space::{cost::network_cost, CellSpec, NetworkConfig, SearchSpace, SpaceRng};
//!
//! // Read a spec (text form or JSON) and count it in the Mobile skeleton.
//! let spec = CellSpec::from_text(&CellSpec::nasnet_a().to_text())?;
//! let report = network_cost(&spec, &NetworkConfig::mobile())?;
//! assert_eq!(report.network.params_trainable, 5_289_978);
//!
//! // Sample the paper's space, turn a cell into the controller's 50 decisions and back.
//! let space = SearchSpace::nasnet();
//! let mut rng = SpaceRng::new(42);
//! let sampled = space.sample(&mut rng);
//! let actions = space.encode(&sampled)?;
//! assert_eq!(actions.len(), 50);
//! assert_eq!(space.decode(&actions)?, sampled);
//!
//! // Cells that are the same network share a canonical hash.
//! let mut swapped = spec.clone();
//! swapped.normal.blocks[0].inputs.swap(0, 1);
//! swapped.normal.blocks[0].ops.swap(0, 1);
//! assert_eq!(swapped.canonical_hash(), spec.canonical_hash());
//! # Ok::<(), nas_space::SpecError>(())
//! ```

mod canonical;
mod cell;
pub mod cost;
mod error;
pub mod files;
pub mod network;
mod op;
pub mod presets;
pub mod reference;
pub mod render;
mod rng;
mod space;
mod text;

#[cfg(feature = "serde")]
pub mod json;

pub use canonical::{fnv1a, SpecHash};
pub use cell::{Block, Cell, CellKind, CellOutput, CellSpec, Side};
pub use error::SpecError;
pub use network::{NetSize, NetworkConfig, Stem};
pub use op::{Combine, Op, OpKind, PoolKind};
pub use rng::SpaceRng;
pub use space::{ActionStep, Decision, Mutation, MutationChange, SearchSpace};

#[cfg(test)]
mod tests;
