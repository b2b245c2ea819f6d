//! NASNet ops, cells and whole networks as candle modules.
//!
//! This crate owns every operation of the NASNet search space with TF-Slim
//! semantics, the cell module built from any `nas_space::Cell`, the CIFAR and
//! ImageNet skeletons described by `nas_space::NetworkConfig`, and the custom
//! CPU kernels (CUDA twins come with the `cuda` issue).
//! It does not own the grammar or the wiring (that is `nas-space`: `NetworkPlan`
//! and `CellLayout` decide every shape) nor training (`nas-train`).

pub mod kernels;
