//! A canonical form and a stable hash, so that cells that are the same network dedupe.
//!
//! Two cells are taken to be the same network when one becomes the other by:
//! - swapping the two sides of a block (add and concat are symmetric: concat only
//!   permutes channels, which every consumer absorbs into its learned weights);
//! - renumbering the blocks in another order that still runs every block after the
//!   blocks it reads, keeping a last block of the same width (TF-Slim brings every
//!   concatenated state to the last block's width, so that width is part of the network);
//! - reordering the output concat list (a channel permutation again);
//! - replacing a dead block (one the output does not depend on) by any other dead block
//!   of the same combine;
//! - writing the output as the paper's unused-states rule or as the explicit list it
//!   gives.
//!
//! The canonical form picks, among all such rewrites, the one whose encoding sorts
//! first, and always writes the output as an explicit, sorted concat list. For B ≤ 8 all
//! block orders are tried; for larger cells only the side, output and dead-block rules
//! apply (the hash is still stable, but may miss a block reordering).

use std::fmt;

use crate::{Block, Cell, CellOutput, CellSpec, Combine, Op};

/// Largest B for which every block order is tried.
const MAX_REORDER_BLOCKS: usize = 8;

/// A stable 64-bit hash of a spec's canonical form, printed as 16 hex digits.
/// It is FNV-1a over a text encoding made of the ops' stable names, so it never
/// changes between releases or platforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpecHash(pub u64);

impl fmt::Display for SpecHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl CellSpec {
    /// The canonical representative of this spec's equivalence class (see the module docs).
    pub fn canonical(&self) -> CellSpec {
        CellSpec { normal: self.normal.canonical(), reduction: self.reduction.canonical() }
    }

    /// The stable hash of [`CellSpec::canonical`]: equal for specs that are the same network.
    pub fn canonical_hash(&self) -> SpecHash {
        let canonical = self.canonical();
        let text = format!("v1|n:{}|r:{}", encode(&canonical.normal), encode(&canonical.reduction));
        SpecHash(fnv1a(text.as_bytes()))
    }
}

impl Cell {
    /// The canonical representative of this cell's equivalence class.
    /// The cell must be valid (see [`Cell::validate`]).
    pub fn canonical(&self) -> Cell {
        let n = self.blocks.len();
        let live = self.live_states();
        let mut blocks = self.blocks.clone();
        for (b, block) in blocks.iter_mut().enumerate() {
            if !live[2 + b] {
                *block = Block { inputs: [0, 0], ops: [Op::Identity, Op::Identity], combine: block.combine };
            }
        }
        let base = Cell { blocks, output: CellOutput::Concat(self.output_states()) };
        if n == 0 {
            return base;
        }
        if n > MAX_REORDER_BLOCKS {
            return relabel(&base, &(0..n).collect::<Vec<_>>());
        }
        let last_combine = base.blocks[n - 1].combine;
        let mut best: Option<(Vec<Key>, Cell)> = None;
        let mut order = Vec::with_capacity(n);
        let mut placed = vec![false; n];
        visit_orders(&base, &mut order, &mut placed, &mut |order| {
            if base.blocks[order[n - 1]].combine != last_combine {
                return;
            }
            let cell = relabel(&base, order);
            let key = keys(&cell);
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, cell));
            }
        });
        best.expect("the identity order is always a topological order").1
    }
}

/// Calls `f` with every order of the blocks in which each block comes after the blocks it reads.
fn visit_orders(cell: &Cell, order: &mut Vec<usize>, placed: &mut [bool], f: &mut impl FnMut(&[usize])) {
    let n = cell.blocks.len();
    if order.len() == n {
        f(order);
        return;
    }
    for b in 0..n {
        if placed[b] {
            continue;
        }
        let ready = cell.blocks[b].inputs.iter().all(|&s| s < 2 || placed[s - 2]);
        if ready {
            placed[b] = true;
            order.push(b);
            visit_orders(cell, order, placed, f);
            order.pop();
            placed[b] = false;
        }
    }
}

/// The cell with its blocks in `order` (old block indices), sides sorted, output sorted.
fn relabel(cell: &Cell, order: &[usize]) -> Cell {
    // The two cell inputs keep their numbers; block outputs follow `order`.
    let mut new_state: Vec<usize> = (0..cell.num_states()).collect();
    for (new, &old) in order.iter().enumerate() {
        new_state[2 + old] = 2 + new;
    }
    let blocks = order
        .iter()
        .map(|&old| {
            let block = cell.blocks[old];
            let mut sides = [(new_state[block.inputs[0]], block.ops[0]), (new_state[block.inputs[1]], block.ops[1])];
            sides.sort();
            Block { inputs: [sides[0].0, sides[1].0], ops: [sides[0].1, sides[1].1], combine: block.combine }
        })
        .collect();
    let mut output: Vec<usize> = cell.output_states().iter().map(|&s| new_state[s]).collect();
    output.sort_unstable();
    Cell { blocks, output: CellOutput::Concat(output) }
}

type Key = (usize, usize, usize, usize, usize);

fn keys(cell: &Cell) -> Vec<Key> {
    let mut key: Vec<Key> = cell
        .blocks
        .iter()
        .map(|b| (b.inputs[0], b.ops[0] as usize, b.inputs[1], b.ops[1] as usize, b.combine as usize))
        .collect();
    key.extend(cell.output_states().into_iter().map(|s| (usize::MAX, s, 0, 0, 0)));
    key
}

fn encode(cell: &Cell) -> String {
    let mut text = String::new();
    for block in &cell.blocks {
        let combine = match block.combine {
            Combine::Add => "add",
            Combine::Concat => "concat",
        };
        text.push_str(&format!(
            "{}.{},{}.{},{};",
            block.inputs[0],
            block.ops[0].name(),
            block.inputs[1],
            block.ops[1].name(),
            combine
        ));
    }
    let out: Vec<String> = cell.output_states().iter().map(|s| s.to_string()).collect();
    text.push_str(&format!("out={}", out.join(",")));
    text
}

/// 64-bit FNV-1a of `bytes`: a hash that never changes between releases or platforms
/// (unlike `std`'s `DefaultHasher`), for anything recorded or compared across runs: spec
/// hashes, checksums of saved files, seeds derived from names, job names.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
