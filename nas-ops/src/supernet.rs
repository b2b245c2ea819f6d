//! Weight sharing (ENAS-style): one store of weights over a search space, from which any cell
//! of the space is an ordinary [`NasNet`] over borrowed weights.
//!
//! # The store
//! [`SuperNet::new`] creates every weight that any cell of an add-only space
//! ([`SearchSpace::add_only`], [`SearchSpace::enas`]) can read in a given skeleton, keyed by
//! where it is used:
//! - an op's weights by cell position, block, side and op, and by what it reads as
//!   [`Sharing`] says: the shape and stride of its input (`…comb_iter_0_left.sep_conv_3x3.c8s2.…`:
//!   a strided op on a reduction cell's input, or an op reading a wider state, has weights of
//!   its own; the default) or the state itself (`….sep_conv_3x3.from_1.…`, ENAS's keying).
//!   Another op on the same edge never shares a tensor;
//! - a conv or classifier that reads a cell's output (the next cells' `conv_1x1`,
//!   `conv_prev_1x1` or `path_{1,2}` of a factorized reduction, `last_linear`, the aux
//!   head's projection) at its full width, one block of input channels per state of the
//!   producing cell (`(B + 2) · F`): a child takes the blocks of the states its producer
//!   concatenates, in their order. This is ENAS's `final_conv` (whose rows are taken for the
//!   states a cell leaves unused) moved into the consumer, where TF-Slim's NASNet already
//!   projects every cell input: the sampled child is then exactly the network that is
//!   retrained standalone, with no extra layer;
//! - everything else (stem, preambles' batch norms, the projections of unused cell inputs,
//!   the aux head, the classifier's bias) by its name in a standalone network.
//!
//! Add is the only combine, so every state of a cell is `F` wide whatever the sampled cell
//! and every shape in the store is fixed. Reduction cells are NASNet's own (ops on the cell
//! inputs at stride 2), as in the networks that are retrained, so the searched cell is the
//! one that is trained later.
//!
//! # A child
//! [`SuperNet::child`] builds the standard network of a `CellSpec` through a `VarBuilder`
//! whose tensors are the store's variables (or, for the wide consumers, differentiable
//! column selections of them): its forward, taped training and per-sample inference are
//! those of any network, it touches only its path, and its gradients flow into the store
//! (none to weights off the path; zeros in the unselected columns of a wide weight). Batch
//! norms' moving statistics are the store's, shared by every child that uses them.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use nas_space::network::NetworkPlan;
use nas_space::{Block, Cell, CellOutput, CellSpec, Combine, NetworkConfig, SearchSpace};

use crate::init::init_weights;
use crate::NasNet;

/// How finely an op's weights are shared between the cells that use it on one edge (one
/// block side of one cell position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// One set per shape and stride the op reads (a reduction cell's strided ops on its
    /// inputs apart from its stride-1 ops on block outputs): every weight is trained by every
    /// cell that puts the op there (NNI's degree of sharing).
    #[default]
    PerShape,
    /// One set per state read (ENAS's keying: `from_{state}`): less interference between
    /// cells, each weight trained less often.
    PerInput,
}

/// One store of weights for every cell of an add-only search space in one skeleton.
#[derive(Clone)]
pub struct SuperNet {
    space: SearchSpace,
    sharing: Sharing,
    config: NetworkConfig,
    store: VarMap,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for SuperNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuperNet").field("space", &self.space).field("tensors", &self.len()).finish()
    }
}

impl SuperNet {
    /// Creates every weight the cells of `space` can read in `config`, initialised as
    /// TF-Slim initialises a network (`init::init_weights` with `seed`).
    pub fn new(
        space: &SearchSpace,
        config: &NetworkConfig,
        sharing: Sharing,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<SuperNet> {
        space.validate().map_err(msg)?;
        if space.combines != [Combine::Add] {
            candle_core::bail!(
                "a super-net needs add as the only combine (SearchSpace::add_only), got {:?}",
                space.combines
            )
        }
        let net = SuperNet {
            space: space.clone(),
            sharing,
            config: config.clone(),
            store: VarMap::new(),
            dtype,
            device: device.clone(),
        };
        // Cells that together read every (block, side, op, input) of the space: block b reads
        // state min(r, b + 1) with `op` on both sides; one of them outputs every state (the
        // projections of cell inputs that a spec may concatenate).
        let all_states = CellOutput::Concat((0..space.num_blocks + 2).collect());
        for (i, &op) in space.ops.iter().enumerate() {
            for r in 0..=space.num_blocks {
                let blocks = (0..space.num_blocks)
                    .map(|b| Block { inputs: [r.min(b + 1); 2], ops: [op; 2], combine: Combine::Add })
                    .collect();
                let output = if i + r == 0 { all_states.clone() } else { CellOutput::UnusedBlocks };
                let cell = Cell { blocks, output };
                let spec = CellSpec { normal: cell.clone(), reduction: cell };
                net.build(&spec, 0, true)?;
            }
        }
        init_weights(&net.store, seed)?;
        Ok(net)
    }

    /// The network of `spec` over the store's weights (drop path and dropout masks from
    /// `seed`). `spec` must lie in the super-net's space.
    pub fn child(&self, spec: &CellSpec, seed: u64) -> Result<NasNet> {
        self.space.validate_spec(spec).map_err(msg)?;
        self.build(spec, seed, false)
    }

    fn build(&self, spec: &CellSpec, seed: u64, create: bool) -> Result<NasNet> {
        let plan = self.config.plan(spec).map_err(msg)?;
        let backend = Borrow { store: self.store.clone(), routes: Routes::new(spec, &plan, self.sharing), create };
        let vb = VarBuilder::from_backend(Box::new(backend), self.dtype, self.device.clone());
        NasNet::new(spec, &self.config, seed, vb)
    }

    /// The same store, with children that apply no dropout and no drop path (for rewards).
    pub fn without_dropout(&self) -> SuperNet {
        let mut config = self.config.clone();
        config.dense_dropout_keep_prob = 1.0;
        config.drop_path_keep_prob = 1.0;
        SuperNet { config, ..self.clone() }
    }

    /// The store: every shared variable by its key (for the optimiser and checkpoints).
    pub fn store(&self) -> &VarMap {
        &self.store
    }

    /// The number of tensors in the store.
    pub fn len(&self) -> usize {
        self.store.data().lock().expect("store lock").len()
    }

    /// Whether the store is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The space whose cells the store serves.
    pub fn space(&self) -> &SearchSpace {
        &self.space
    }

    /// The skeleton.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The store key and column selection of `name`, a weight of the standalone network of
    /// `spec` (for tests and for copying a child's weights out).
    pub fn route(&self, spec: &CellSpec, name: &str) -> Result<(String, Option<Vec<u32>>)> {
        let plan = self.config.plan(spec).map_err(msg)?;
        let (key, gather) = Routes::new(spec, &plan, self.sharing).route(name);
        Ok((key, gather.map(|g| g.columns())))
    }
}

fn msg(err: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(err.to_string())
}

/// The input channels a wide consumer takes: one block of `width` per concatenated state.
#[derive(Debug, Clone, PartialEq)]
struct Gather {
    width: usize,
    states: Vec<usize>,
    num_states: usize,
}

impl Gather {
    fn columns(&self) -> Vec<u32> {
        self.states.iter().flat_map(|&s| (s * self.width..(s + 1) * self.width).map(|c| c as u32)).collect()
    }
}

/// How the weight names of one child map onto the store.
struct Routes {
    /// Per cell scope (`cell_3`): its cell of the spec and the gathers of its consumers.
    cells: HashMap<String, CellRoute>,
    /// `last_linear.weight` and `aux_head.proj.conv.weight`.
    heads: Vec<(&'static str, Option<Gather>)>,
}

struct CellRoute {
    cell: Cell,
    /// Each block side's key segment (`c8s2` or `from_1`).
    keys: Vec<[String; 2]>,
    x: Option<Gather>,
    prev: Option<Gather>,
}

impl Routes {
    fn new(spec: &CellSpec, plan: &NetworkPlan, sharing: Sharing) -> Routes {
        // The gather of a consumer of `outputs[i]`: none for the stem conv's output.
        let gather = |i: usize| -> Option<Gather> {
            let producer = plan.cells.get(i.checked_sub(1)?)?;
            Some(Gather {
                width: producer.filter_size,
                states: producer.layout.concat.iter().map(|e| e.state).collect(),
                num_states: producer.layout.states.len(),
            })
        };
        let cells = plan
            .cells
            .iter()
            .map(|c| {
                let cell = spec.cell(c.kind).clone();
                let keys = (cell.blocks.iter().zip(&c.layout.ops))
                    .map(|(block, ops)| {
                        [0, 1].map(|side| match sharing {
                            Sharing::PerShape => format!("c{}s{}", ops[side].input.channels, ops[side].stride),
                            Sharing::PerInput => format!("from_{}", block.inputs[side]),
                        })
                    })
                    .collect();
                let route = CellRoute { cell, keys, x: gather(c.x), prev: c.prev.and_then(gather) };
                (c.name.clone(), route)
            })
            .collect();
        let mut heads = vec![("last_linear.weight", gather(plan.outputs.len() - 1))];
        if let Some(aux) = plan.aux {
            heads.push(("aux_head.proj.conv.weight", gather(aux.after_output)));
        }
        Routes { cells, heads }
    }

    /// The store key of a standalone weight name, and the columns it takes.
    fn route(&self, name: &str) -> (String, Option<Gather>) {
        if let Some((_, gather)) = self.heads.iter().find(|(n, _)| *n == name) {
            return (name.to_string(), gather.clone());
        }
        let Some((scope, rest)) = name.split_once('.') else { return (name.to_string(), None) };
        let Some(cell) = self.cells.get(scope) else { return (name.to_string(), None) };
        match rest {
            "conv_1x1.conv.weight" => return (name.to_string(), cell.x.clone()),
            "conv_prev_1x1.conv.weight" | "path_1.conv.weight" | "path_2.conv.weight" => {
                return (name.to_string(), cell.prev.clone())
            }
            _ => {}
        }
        if let Some((branch, leaf)) = rest.split_once('.') {
            if let Some((b, side)) = parse_branch(branch) {
                if let (Some(block), Some(keys)) = (cell.cell.blocks.get(b), cell.keys.get(b)) {
                    return (format!("{scope}.{branch}.{}.{}.{leaf}", block.ops[side], keys[side]), None);
                }
            }
        }
        (name.to_string(), None)
    }
}

/// `comb_iter_{b}_{left|right}` as (block, side).
fn parse_branch(branch: &str) -> Option<(usize, usize)> {
    let rest = branch.strip_prefix("comb_iter_")?;
    let (b, side) = rest.split_once('_')?;
    let side = match side {
        "left" => 0,
        "right" => 1,
        _ => return None,
    };
    Some((b.parse().ok()?, side))
}

/// The `VarBuilder` backend of a child: the store's variables under their keys.
struct Borrow {
    store: VarMap,
    routes: Routes,
    /// Create what is missing (while the super-net is built); otherwise a missing key is an
    /// error.
    create: bool,
}

impl SimpleBackend for Borrow {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (key, gather) = self.routes.route(name);
        let stored_shape = match &gather {
            Some(g) => {
                let mut dims = shape.dims().to_vec();
                if dims.len() < 2 || dims[1] != g.states.len() * g.width {
                    candle_core::bail!(
                        "super-net: `{name}` of shape {shape:?} does not read a concatenation of {} states of width {}",
                        g.states.len(),
                        g.width
                    )
                }
                dims[1] = g.num_states * g.width;
                Shape::from(dims)
            }
            None => shape.clone(),
        };
        if !self.create && !self.store.data().lock().expect("store lock").contains_key(&key) {
            candle_core::bail!("super-net: no weight `{key}` (for `{name}`) in the store")
        }
        let stored = self.store.get(stored_shape, &key, init, dtype, dev)?;
        match gather {
            Some(g) => stored.index_select(&Tensor::new(g.columns(), dev)?, 1),
            None => Ok(stored),
        }
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("super-net: `{name}` must be asked for with its shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let (key, _) = self.routes.route(name);
        self.store.data().lock().expect("store lock").contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_close, TestRng};
    use nas_space::SpaceRng;

    /// CIFAR, N = 1, F = 8 at 16×16, with an aux head and no drop path or dropout.
    fn tiny() -> NetworkConfig {
        let mut config = NetworkConfig::cifar();
        config.n = 1;
        config.num_conv_filters = 8;
        config.image_size = 16;
        config.drop_path_keep_prob = 1.0;
        config.dense_dropout_keep_prob = 1.0;
        config.num_classes = 5;
        config
    }

    /// A standalone network of `spec` with the child's weights copied in, and its varmap.
    fn standalone_copy(supernet: &SuperNet, spec: &CellSpec) -> (VarMap, NasNet) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let net = NasNet::new(spec, supernet.config(), 0, vb).unwrap();
        let store = supernet.store().data().lock().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let (key, columns) = supernet.route(spec, name).unwrap();
            let stored = store[&key].as_tensor();
            let value = match columns {
                Some(c) => stored.index_select(&Tensor::new(c, &Device::Cpu).unwrap(), 1).unwrap(),
                None => stored.clone(),
            };
            var.set(&value).unwrap();
        }
        (varmap, net)
    }

    /// A child of the super-net computes what the standalone network of its cell computes
    /// with the same weights, logits and every gradient; weights off its path get none.
    #[test]
    fn a_child_is_the_standalone_network_over_borrowed_weights() {
        let config = tiny();
        let cases = [
            (SearchSpace::enas(), Sharing::PerInput, 1),
            (SearchSpace::nasnet().add_only(), Sharing::PerShape, 2),
            (SearchSpace::nasnet().add_only(), Sharing::PerInput, 3),
        ];
        for (space, sharing, seed) in cases {
            let supernet = SuperNet::new(&space, &config, sharing, seed, DType::F64, &Device::Cpu).unwrap();
            let mut rng = SpaceRng::new(seed);
            let mut trng = TestRng::new(seed);
            for _ in 0..3 {
                let spec = space.sample(&mut rng);
                let child = supernet.child(&spec, 0).unwrap();
                let (varmap, standalone) = standalone_copy(&supernet, &spec);
                let xs = trng.tensor(&[2, 3, 16, 16], DType::F64).unwrap();
                for train in [false, true] {
                    let a = child.forward_t(&xs, train).unwrap();
                    let b = standalone.forward_t(&xs, train).unwrap();
                    assert_close(&a.logits, &b.logits, 1e-9, &format!("{spec} logits, train {train}"));
                }
                // Per-sample inference (no gradients: the cells' programs).
                let a = crate::no_grad(|| child.forward_t(&xs, false)).unwrap();
                let b = standalone.forward_t(&xs, false).unwrap();
                assert_close(&a.logits, &b.logits, 1e-9, &format!("{spec} logits without gradients"));
                let a = child.forward_t(&xs, true).unwrap();
                let b = standalone.forward_t(&xs, true).unwrap();
                let probe = trng.tensor(a.logits.dims(), DType::F64).unwrap();
                let loss = |o: &crate::NetOutput| {
                    let aux = o.aux_logits.as_ref().expect("an aux head").sum_all().unwrap();
                    ((&o.logits * &probe).unwrap().sum_all().unwrap() + aux).unwrap()
                };
                let (ga, gb) = (loss(&a).backward().unwrap(), loss(&b).backward().unwrap());
                let store = supernet.store().data().lock().unwrap();
                let mut on_path = std::collections::HashSet::new();
                for (name, var) in varmap.data().lock().unwrap().iter() {
                    let Some(want) = gb.get(var.as_tensor()) else { continue };
                    let (key, columns) = supernet.route(&spec, name).unwrap();
                    let got =
                        ga.get(store[&key].as_tensor()).unwrap_or_else(|| panic!("{spec}: no gradient for `{key}`"));
                    let got = match &columns {
                        Some(c) => got.index_select(&Tensor::new(c.clone(), &Device::Cpu).unwrap(), 1).unwrap(),
                        None => got.clone(),
                    };
                    assert_close(&got, want, 1e-9, &format!("{spec}: gradient of `{name}` (`{key}`)"));
                    on_path.insert(key);
                }
                assert!(on_path.len() > 20, "{}", on_path.len());
                for (key, var) in store.iter() {
                    if !on_path.contains(key) && !key.contains("running_") {
                        assert!(
                            ga.get(var.as_tensor()).is_none(),
                            "{spec}: `{key}` is off the path but has a gradient"
                        );
                    }
                }
            }
        }
    }

    /// Children of random cells build from the store alone, and the store's keys name each
    /// op's weights apart: no two (op, input) pairs of a branch share a key, and no key of
    /// one op appears under another.
    #[test]
    fn every_cell_of_the_space_is_in_the_store_and_keys_never_collide() {
        let config = tiny();
        let space = SearchSpace::nasnet().add_only();
        let supernet = SuperNet::new(&space, &config, Sharing::PerInput, 3, DType::F32, &Device::Cpu).unwrap();
        let shared = SuperNet::new(&space, &config, Sharing::PerShape, 3, DType::F32, &Device::Cpu).unwrap();
        // Per shape: an op has one set for strided and one for stride-1 reads in a reduction
        // cell, so far fewer tensors than one per state.
        assert!(shared.len() < supernet.len() * 2 / 3, "{} vs {}", shared.len(), supernet.len());
        let before = supernet.len();
        let mut rng = SpaceRng::new(4);
        for _ in 0..40 {
            let spec = space.sample(&mut rng);
            supernet.child(&spec, 0).unwrap();
        }
        assert_eq!(supernet.len(), before, "a child created weights");
        let data = supernet.store().data().lock().unwrap();
        let mut owners: HashMap<String, (String, String)> = HashMap::new();
        for key in data.keys() {
            let parts: Vec<&str> = key.split('.').collect();
            if let Some(i) = parts.iter().position(|p| p.starts_with("comb_iter_")) {
                let (op, from) = (parts[i + 1], parts[i + 2]);
                assert!(space.ops.iter().any(|o| o.name() == op), "`{key}`: `{op}` is not an op of the space");
                assert!(from.starts_with("from_"), "`{key}`");
                let branch = parts[..=i].join(".");
                let leaf = parts[i + 3..].join(".");
                let prev = owners.insert(format!("{branch}/{op}/{from}/{leaf}"), (op.into(), from.into()));
                assert!(prev.is_none(), "`{key}` twice");
            }
        }
        // Every op of the space has weights somewhere, or is weightless everywhere but on a
        // strided input (identity, pools: a projection only there).
        for op in &space.ops {
            let keyed = data.keys().any(|k| k.contains(&format!(".{}.from_", op.name())));
            assert!(keyed, "no weights for `{op}`");
        }
        drop(data);
        // NASNet-A is add-only: a child (its explicit outputs include a cell input).
        supernet.child(&CellSpec::nasnet_a(), 0).unwrap();
        let mut with_concat = CellSpec::nasnet_a();
        with_concat.reduction.blocks[2].combine = Combine::Concat;
        let err = supernet.child(&with_concat, 0).unwrap_err().to_string();
        assert!(err.contains("concat"), "{err}");
    }

    #[test]
    fn concat_spaces_are_refused() {
        let err = SuperNet::new(&SearchSpace::nasnet(), &tiny(), Sharing::default(), 0, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("add as the only combine"), "{err}");
    }
}
