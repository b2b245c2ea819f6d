//! The seeded generator of the data pipeline: `nas-space`'s [`SpaceRng`](nas_space::SpaceRng),
//! whose stream never changes between releases, so a recorded seed reproduces the same split,
//! the same shuffles and the same augmentations forever.
//!
//! Independent streams for each purpose (split, shuffle, augmentation of one item, generation of one
//! synthetic image) come from [`DataRng::derive`], which hashes the seed together with the stream's
//! coordinates, so an item's randomness does not depend on batching, thread count or order.

/// Seeded generator used for every random choice in the crate (the workspace's one generator).
pub type DataRng = nas_space::SpaceRng;

/// The purposes that get their own streams. Values are part of the stable stream definition.
pub(crate) mod stream {
    pub const SPLIT: u64 = 1;
    pub const SHUFFLE: u64 = 2;
    pub const AUGMENT: u64 = 3;
    pub const SYNTHETIC: u64 = 4;
}
