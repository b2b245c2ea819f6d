//! The NASNet controller and the search strategies beside it.
//!
//! This crate will own the one-layer LSTM policy (100 units) that emits the
//! 2 × 5B decisions of a `nas_space::CellSpec`, its PPO update, and the
//! random-search and regularized-evolution baselines.
//! It takes `(CellSpec, reward)` pairs and proposes `CellSpec`s; it never sees
//! the tensors of a child network.
//!
//! Status: not yet implemented (see the controller issue). The action grammar it
//! will sample from already lives in `nas_space::SearchSpace`.
