//! NASNet ops, cells and whole networks as candle modules.
//!
//! This crate will own every operation of the NASNet search space with
//! TF-Slim semantics, the cell module built from any `nas_space::Cell`, the
//! CIFAR and ImageNet skeletons described by `nas_space::NetworkConfig`, and the
//! custom CPU/CUDA kernels.
//! It does not own the grammar (that is `nas-space`) nor training (`nas-train`).
//!
//! Status: not yet implemented (see the `nas-ops` issue). The analytical
//! parameter and mult-add counts of every network it will build are already
//! given by `nas_space::cost`, and its tests will check against them.
