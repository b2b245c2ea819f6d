//! A NASNet cell as a candle module, for any cell of the search space.
//!
//! TF-Slim `nasnet_utils.py` (`NasNetABaseCell.__call__`, `_cell_base`,
//! `_reduce_prev_layer`, `_combine_unused_states`, `_apply_drop_path`); weight names
//! after timm `nasnet.py` (`conv_1x1`, `conv_prev_1x1`, `path_1`/`path_2`/`final_path_bn`,
//! `comb_iter_{b}_{left,right}`). Every shape and projection comes from
//! `nas_space::network::CellLayout`.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use nas_space::network::{CellLayout, PrevAdjust};
use nas_space::{Cell, Combine};

use crate::drop_path::{drop_path_add, scale_examples, DropPath};
use crate::kernels::concat::{cat_channels, Part};
use crate::layers::Conv2dConfig;
use crate::ops::{ActConvBn, BnConfig, CellOp, FactorizedReduction};

/// How state 1 is made from the previous input.
#[derive(Debug, Clone)]
enum Adjust {
    /// No previous input: state 1 is the raw newest input.
    UseX,
    /// The previous input as it is.
    Unchanged,
    /// ReLU → 1×1 → BN (`conv_prev_1x1`).
    Conv(ActConvBn),
    /// ReLU → factorized reduction (`path_1`, `path_2`, `final_path_bn`).
    Reduce(FactorizedReduction),
}

#[derive(Debug, Clone)]
struct BlockModule {
    inputs: [usize; 2],
    ops: [CellOp; 2],
    combine: Combine,
}

/// One cell instance with its own weights.
#[derive(Debug, Clone)]
pub struct CellModule {
    preamble: ActConvBn,
    adjust: Adjust,
    blocks: Vec<BlockModule>,
    /// `(state, projection)` in concat order.
    concat: Vec<(usize, Option<FactorizedReduction>)>,
    /// Per block: its output only enters the concat, unprojected, so an added block's two
    /// branches go to `cat_channels` as they are and their sum is never stored alone.
    concat_only: Vec<bool>,
    drop_path: Option<DropPath>,
}

impl CellModule {
    /// Builds `cell` laid out as `layout` (from `CellLayout::new`), with BN settings `bn`,
    /// and ScheduledDropPath `drop_path` (None when disabled).
    pub fn new(
        cell: &Cell,
        layout: &CellLayout,
        bn: BnConfig,
        drop_path: Option<DropPath>,
        vb: VarBuilder,
    ) -> Result<CellModule> {
        let f = layout.states[0].channels;
        let preamble = ActConvBn::new(true, Conv2dConfig::square(layout.x.channels, f, 1), bn, vb.pp("conv_1x1"))?;
        let adjust = match layout.prev_adjust {
            PrevAdjust::UseX => Adjust::UseX,
            PrevAdjust::Unchanged => Adjust::Unchanged,
            PrevAdjust::Conv1x1 { c_in } => {
                Adjust::Conv(ActConvBn::new(true, Conv2dConfig::square(c_in, f, 1), bn, vb.pp("conv_prev_1x1"))?)
            }
            PrevAdjust::FactorizedReduction { c_in } => {
                Adjust::Reduce(FactorizedReduction::new(c_in, f, 2, bn, vb.clone())?)
            }
        };
        let blocks: Vec<BlockModule> = cell
            .blocks
            .iter()
            .zip(&layout.ops)
            .enumerate()
            .map(|(b, (block, op_layouts))| {
                let left = CellOp::new(block.ops[0], &op_layouts[0], f, bn, vb.pp(format!("comb_iter_{b}_left")))?;
                let right = CellOp::new(block.ops[1], &op_layouts[1], f, bn, vb.pp(format!("comb_iter_{b}_right")))?;
                Ok(BlockModule { inputs: block.inputs, ops: [left, right], combine: block.combine })
            })
            .collect::<Result<_>>()?;
        let concat: Vec<(usize, Option<FactorizedReduction>)> = layout
            .concat
            .iter()
            .map(|entry| {
                let projection = match entry.factorized_reduction {
                    Some(stride) => Some(FactorizedReduction::new(
                        entry.input.channels,
                        entry.output.channels,
                        stride,
                        bn,
                        vb.pp("cell_output").pp(format!("reduction_{}", entry.state)),
                    )?),
                    None => None,
                };
                Ok((entry.state, projection))
            })
            .collect::<Result<_>>()?;
        let concat_only = (0..blocks.len())
            .map(|b| {
                let state = 2 + b;
                !blocks.iter().any(|blk| blk.inputs.contains(&state))
                    && concat.iter().any(|(s, p)| *s == state && p.is_none())
            })
            .collect();
        Ok(CellModule { preamble, adjust, blocks, concat, concat_only, drop_path })
    }

    /// Runs the cell on the newest input `x` and the previous one `prev`.
    ///
    /// # Shapes
    /// - `x`, `prev`: as the cell's `CellLayout` records them
    /// - returns: `(batch, layout.output.channels, layout.output.size, layout.output.size)`
    pub fn forward_t(&self, x: &Tensor, prev: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let state1 = match (&self.adjust, prev) {
            (Adjust::UseX, _) => x.clone(),
            (Adjust::Unchanged, Some(p)) => p.clone(),
            (Adjust::Conv(conv), Some(p)) => conv.forward_t(p, train)?,
            (Adjust::Reduce(reduce), Some(p)) => reduce.forward_relu_t(p, train)?,
            (_, None) => candle_core::bail!("this cell was built for a previous input, but none was given"),
        };
        let state0 = self.preamble.forward_t(x, train)?;
        let mut states = vec![Part::Copy(state0), Part::Copy(state1)];
        // The outputs of weightless ops, computed once per (state, op): NASNet-A's normal
        // cell averages the previous input twice in one block (TF's graph optimiser
        // merges the two as well). Drop path is applied after, per branch.
        let mut pure = Vec::new();
        for (block, &concat_only) in self.blocks.iter().zip(&self.concat_only) {
            let mut sides = Vec::with_capacity(2);
            let mut scales = Vec::with_capacity(2);
            for (op, &input) in block.ops.iter().zip(&block.inputs) {
                let ys = match op.pure_key().map(|key| (input, key)) {
                    Some(key) => match pure.iter().find(|(k, _)| *k == key) {
                        Some((_, ys)) => Tensor::clone(ys),
                        None => {
                            let ys = op.forward_t(&states[input].value()?, train)?;
                            pure.push((key, ys.clone()));
                            ys
                        }
                    },
                    None => op.forward_t(&states[input].value()?, train)?,
                };
                let scale = match &self.drop_path {
                    Some(dp) if train && op.takes_drop_path() => dp.scales(ys.dim(0)?),
                    _ => None,
                };
                sides.push(ys);
                scales.push(scale);
            }
            let out = match block.combine {
                // Drop path folded into the add (one pass; the dropped branches are not stored).
                Combine::Add if concat_only && scales.iter().all(Option::is_none) => {
                    let [a, b] = <[Tensor; 2]>::try_from(sides).expect("two branches");
                    Part::Sum(a, b)
                }
                Combine::Add => {
                    Part::Copy(drop_path_add(&sides[0], scales[0].as_deref(), &sides[1], scales[1].as_deref())?)
                }
                Combine::Concat => {
                    let scaled = sides
                        .iter()
                        .zip(&scales)
                        .map(|(ys, s)| s.as_deref().map_or_else(|| Ok(ys.clone()), |s| scale_examples(ys, s)))
                        .collect::<Result<Vec<_>>>()?;
                    Part::Copy(Tensor::cat(&[&scaled[0], &scaled[1]], 1)?)
                }
            };
            states.push(out);
        }
        let parts = self
            .concat
            .iter()
            .map(|(state, projection)| match projection {
                Some(p) => Ok(Part::Copy(p.forward_t(&states[*state].value()?, train)?)),
                None => Ok(states[*state].clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = cat_channels(&parts)?;
        Ok(if crate::grad_enabled() { out } else { out.detach() })
    }
}
