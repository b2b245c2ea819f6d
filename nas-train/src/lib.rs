//! Training and evaluation of NASNet networks built from a `nas_space::CellSpec`.
//!
//! This crate will own optimisers, learning-rate schedules, the training and
//! evaluation loops, checkpoints and resume, and the outer search loop.
//!
//! Status: not yet implemented (see the `nas-train` issue).
