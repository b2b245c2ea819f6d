//! Images as plain values, and the [`Dataset`] trait over in-memory sets and lazy image folders.

use std::borrow::Cow;
use std::sync::Arc;

use crate::DataError;

/// An 8-bit RGB image, pixels interleaved and row-major (`HWC`): the byte of channel `c` at
/// row `y`, column `x` is `pixels[(y * width + x) * 3 + c]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Image {
    /// Wraps an `HWC` RGB buffer, checking its length.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Result<Image, DataError> {
        if pixels.len() != width as usize * height as usize * 3 {
            return Err(DataError::ImageSize { width, height, len: pixels.len() });
        }
        Ok(Image { width, height, pixels })
    }

    /// An image filled with one colour.
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> Image {
        let pixels = rgb.iter().copied().cycle().take(width as usize * height as usize * 3).collect();
        Image { width, height, pixels }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Converts any `image` buffer (grey, grey with alpha, RGBA, 16-bit, float, CMYK decoded
    /// by the JPEG decoder) to 8-bit RGB. Alpha is dropped, not composited, as TensorFlow's
    /// `decode_png(channels=3)` does.
    pub fn from_dynamic(img: image::DynamicImage) -> Image {
        let rgb = img.into_rgb8();
        let (width, height) = rgb.dimensions();
        Image { width, height, pixels: rgb.into_raw() }
    }

    /// The image as an `image` crate buffer (copies the pixels).
    pub fn to_rgb_image(&self) -> image::RgbImage {
        image::RgbImage::from_raw(self.width, self.height, self.pixels.clone()).expect("length checked at construction")
    }
}

/// One labelled image, borrowed from an in-memory set or decoded on demand.
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub image: Cow<'a, Image>,
    pub label: u32,
}

/// A labelled image collection that the batcher can read from many threads.
///
/// Labels are known without decoding, so splits and class counts never touch pixels.
/// [`InMemory`] holds decoded images (CIFAR, the built-in set); [`crate::ImageFolder`] decodes
/// JPEG/PNG files on demand and may fail on a corrupt file, which the batcher skips and counts.
pub trait Dataset: Send + Sync {
    /// The number of items.
    fn len(&self) -> usize;

    /// Whether the set has no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names, indexed by label.
    fn class_names(&self) -> &[String];

    /// The number of classes.
    fn num_classes(&self) -> usize {
        self.class_names().len()
    }

    /// The label of item `index` (no decoding). Panics if `index >= len()`.
    fn label(&self, index: usize) -> u32;

    /// Item `index`, decoding it if needed. Panics if `index >= len()`.
    fn get(&self, index: usize) -> Result<Item<'_>, DataError>;
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn class_names(&self) -> &[String] {
        (**self).class_names()
    }
    fn label(&self, index: usize) -> u32 {
        (**self).label(index)
    }
    fn get(&self, index: usize) -> Result<Item<'_>, DataError> {
        (**self).get(index)
    }
}

impl<D: Dataset + ?Sized> Dataset for &D {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn class_names(&self) -> &[String] {
        (**self).class_names()
    }
    fn label(&self, index: usize) -> u32 {
        (**self).label(index)
    }
    fn get(&self, index: usize) -> Result<Item<'_>, DataError> {
        (**self).get(index)
    }
}

/// Decoded images with their labels, all in memory (CIFAR, the built-in set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InMemory {
    images: Vec<Image>,
    labels: Vec<u32>,
    class_names: Vec<String>,
}

impl InMemory {
    /// Checks that there is one label per image and that every label names a class.
    pub fn new(images: Vec<Image>, labels: Vec<u32>, class_names: Vec<String>) -> Result<InMemory, DataError> {
        if images.len() != labels.len() {
            return Err(DataError::Dataset(format!("{} images but {} labels", images.len(), labels.len())));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= class_names.len()) {
            return Err(DataError::Dataset(format!(
                "item {i} has label {l}, but there are {} classes",
                class_names.len()
            )));
        }
        Ok(InMemory { images, labels, class_names })
    }

    /// All images, in order.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// All labels, in order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Image `index`. Panics if out of range.
    pub fn image(&self, index: usize) -> &Image {
        &self.images[index]
    }

    /// A copy of the items at `indices`, in that order (e.g. a split's training part).
    pub fn select(&self, indices: &[usize]) -> InMemory {
        InMemory {
            images: indices.iter().map(|&i| self.images[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
        }
    }

    /// Takes the set apart into images, labels and class names.
    pub fn into_parts(self) -> (Vec<Image>, Vec<u32>, Vec<String>) {
        (self.images, self.labels, self.class_names)
    }

    /// Mean and standard deviation of each channel over all pixels, on the `[0, 1]` scale
    /// (the inputs of [`crate::Normalize::PerChannel`]).
    pub fn channel_stats(&self) -> ([f32; 3], [f32; 3]) {
        let mut sum = [0f64; 3];
        let mut sq = [0f64; 3];
        let mut n = 0u64;
        for img in &self.images {
            let mut s = [0u64; 3];
            let mut q = [0u64; 3];
            for px in img.pixels.chunks_exact(3) {
                for c in 0..3 {
                    let v = px[c] as u64;
                    s[c] += v;
                    q[c] += v * v;
                }
            }
            for c in 0..3 {
                sum[c] += s[c] as f64;
                sq[c] += q[c] as f64;
            }
            n += img.pixels.len() as u64 / 3;
        }
        let mut mean = [0f32; 3];
        let mut std = [0f32; 3];
        if n > 0 {
            for c in 0..3 {
                let m = sum[c] / n as f64;
                mean[c] = (m / 255.0) as f32;
                std[c] = ((sq[c] / n as f64 - m * m).max(0.0).sqrt() / 255.0) as f32;
            }
        }
        (mean, std)
    }
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn label(&self, index: usize) -> u32 {
        self.labels[index]
    }
    fn get(&self, index: usize) -> Result<Item<'_>, DataError> {
        Ok(Item { image: Cow::Borrowed(&self.images[index]), label: self.labels[index] })
    }
}

/// A view of some items of a shared data set, in the given order, without copying
/// (e.g. the training or validation part of a [`crate::Split`] of an image folder).
#[derive(Debug, Clone)]
pub struct Subset<D> {
    inner: Arc<D>,
    indices: Vec<usize>,
}

impl<D: Dataset> Subset<D> {
    /// Checks that every index is in range.
    pub fn new(inner: Arc<D>, indices: Vec<usize>) -> Result<Subset<D>, DataError> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(DataError::Dataset(format!("subset index {bad} out of range for {} items", inner.len())));
        }
        Ok(Subset { inner, indices })
    }

    /// The indices into the underlying set.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// The underlying set.
    pub fn inner(&self) -> &Arc<D> {
        &self.inner
    }
}

impl<D: Dataset> Dataset for Subset<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn label(&self, index: usize) -> u32 {
        self.inner.label(self.indices[index])
    }
    fn get(&self, index: usize) -> Result<Item<'_>, DataError> {
        self.inner.get(self.indices[index])
    }
}

/// A training set and its test (or validation) set, as the distributions ship them.
#[derive(Debug, Clone)]
pub struct TrainTest<D> {
    pub train: D,
    pub test: D,
}
