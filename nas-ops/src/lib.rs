//! NASNet ops, cells and whole networks as candle modules.
//!
//! This crate owns every operation of the NASNet search space with TF-Slim semantics
//! ([`ops`]), the cell module built from any `nas_space::Cell` ([`cell::CellModule`]), the
//! CIFAR and ImageNet networks built from a (`CellSpec`, `NetworkConfig`)
//! ([`network::NasNet`]), ScheduledDropPath, TF-Slim's initialisation, inference without
//! gradients ([`no_grad`]) and the custom kernels ([`kernels`]: CPU, with CUDA twins under
//! the `cuda` feature).
//!
//! A cell is lowered once into a schedule of nodes, read by three interpreters: candle ops
//! (any mode, any device), a tape that makes a training cell one node of candle's graph (CPU),
//! and a per-sample program for inference (CPU); each op states those three forms in one
//! place (`ops::OpForms`).
//!
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
pub mod supernet;
mod tape;

pub use grad::{grad_enabled, no_grad, with_grad_enabled};
pub use network::{NasNet, NetOutput};

#[cfg(test)]
mod tests;
