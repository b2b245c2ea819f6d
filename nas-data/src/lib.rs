//! Dataset pipelines for NASNet search and transfer.
//!
//! This crate will own the CIFAR-10/100 binary readers, the ImageNet-style JPEG
//! folder reader, augmentation, batching into tensors, and the built-in
//! generated dataset that lets a fresh machine run a search with no files.
//!
//! Status: not yet implemented (see the `nas-data` issue).
