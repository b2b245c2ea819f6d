//! NASNet ops, cells and whole networks as candle modules.
//!
//! This crate owns every operation of the NASNet search space with TF-Slim
//! semantics ([`ops`]), the cell module built from any `nas_space::Cell`
//! ([`cell::CellModule`]), the CIFAR and ImageNet networks built from a
//! (`CellSpec`, `NetworkConfig`) ([`network::NasNet`]), ScheduledDropPath, TF-Slim's
//! initialisation, inference without gradients ([`no_grad`]), a cell's training on the CPU
//! as one node of candle's graph (recorded on a crate-private tape), a cell's inference on
//! the CPU one sample at a time (a per-sample program of `kernels::cell_eval`) and the
//! custom CPU kernels ([`kernels`]; CUDA twins come with the `cuda` issue).
//! It does not own the grammar or the wiring (that is `nas-space`: `NetworkPlan` and
//! `CellLayout` decide every shape and projection) nor training (`nas-train`).
//!
//! Weight names follow timm's `nasnet.py` state-dict keys.

pub mod cell;
pub mod checkpoint;
pub mod drop_path;
pub mod grad;
pub mod init;
pub mod kernels;
pub mod layers;
pub mod network;
pub mod ops;
mod tape;

pub use grad::{grad_enabled, no_grad, with_grad_enabled};
pub use network::{NasNet, NetOutput};

#[cfg(test)]
mod tests;
