//! Dataset pipelines for NASNet search and transfer.
//!
//! This crate owns:
//! - readers for CIFAR-10 and CIFAR-100 in their binary distribution format ([`read_cifar10`],
//!   [`read_cifar100`]) and a writer for the CIFAR-10 format ([`write_cifar10_binary`]);
//! - the ImageNet-style folder reader ([`ImageFolder`]: `train/<class>/*.JPEG`, `val/<class>/*.JPEG`),
//!   decoding on demand with `image`, in parallel with rayon, every colour mode to RGB;
//! - the held-out validation split of the search (45,000 / 5,000 on CIFAR-10, paper
//!   §A.1), chosen with a seed and recorded as JSON ([`Split`]);
//! - augmentation and normalisation as the references use them ([`CifarTransform`],
//!   [`ImageNetTransform`], and the building blocks in [`augment`]);
//! - batching into candle tensors with a background prefetch thread ([`Batcher`]);
//! - the built-in generated data set, so a fresh machine can search with no files
//!   ([`SyntheticConfig`], [`write_imagenet_folder`]);
//! - the streams of its seeded generator, [`DataRng`] (`nas-space`'s, whose stream is fixed
//!   forever): which stream each random choice draws from.
//!
//! It does not own models, training loops, schedules or the search; those live in `nas-ops`,
//! `nas-train` and `nas-controller`.
//!
//! Items are plain Rust values: an [`Image`] is 8-bit RGB `HWC` with a `u32` label, and a
//! [`Transform`] turns it into `f32` `CHW`. Only [`Batcher`] (module `batch`) makes tensors.
//!
//! # Randomness
//! Every random choice comes from [`DataRng`] streams derived from a seed and coordinates:
//! the split from `(seed, total)`, an epoch's order from `(seed, epoch)`, an item's augmentation
//! from `(seed, epoch, index)`, a built-in image from `(seed, part, index)`. The same seed and epoch
//! give identical batches on every machine and thread count.
//!
//! # Downloads
//! Nothing is downloaded, at build time or at run time. `candle-datasets` can fetch CIFAR-10 from
//! the Hugging Face hub, but it brings hf-hub, parquet and a TLS stack that cannot be made
//! optional (452 crates and over half an hour for a cold build here), its CIFAR loader was found to
//! transpose height and width, and no machine of this project can reach the hub to test a fix; so
//! there is no `hf` feature.
//! Users with the data on disk point the readers at it; everyone else uses the built-in set.
//!
//! # Example
//! ```
//! use nas_data::{Batcher, BatchConfig, CifarTransform, Dataset, Split, SyntheticConfig};
//! use candle_core::Device;
//! use std::sync::Arc;
//!
//! let data = SyntheticConfig::new(7).train_test(200, 50);
//! let split = Split::fraction(data.train.len(), 0.1, 7).unwrap();
//! let (train, _valid) = split.apply(Arc::new(data.train)).unwrap();
//! let batcher = Batcher::new(train, CifarTransform::search(), BatchConfig::train(32, 7), Device::Cpu).unwrap();
//! let mut epoch = batcher.epoch(0);
//! let batch = epoch.next().unwrap().unwrap();
//! assert_eq!(batch.images.dims(), &[32, 3, 32, 32]);
//! let summary = epoch.finish().unwrap();
//! assert_eq!(summary.items, 160);
//! ```

pub mod augment;
mod batch;
mod cifar;
mod dataset;
mod error;
mod folder;
mod rng;
mod split;
mod synthetic;

pub use augment::{CifarCrop, CifarTransform, ImageNetTransform, Normalize, Transform};
pub use batch::{Batch, BatchConfig, Batcher, Epoch, EpochSummary, SkippedItem};
pub use cifar::{
    read_cifar10, read_cifar100, read_cifar10_file, write_cifar10_binary, Cifar100Labels, CIFAR10_CLASSES,
    CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES, CIFAR_PIXEL_BYTES, CIFAR_SIDE,
};
pub use dataset::{Dataset, Image, InMemory, Item, Subset, TrainTest};
pub use error::DataError;
pub use folder::{decode_image, ImageFolder};
pub use rng::DataRng;
pub use split::Split;
pub use synthetic::{write_imagenet_folder, Part, SyntheticConfig, SYNTHETIC_CLASSES};

#[cfg(test)]
mod tests;
