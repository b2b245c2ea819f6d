//! Augmentation and normalisation, on 8-bit `HWC` buffers, converted once to `f32` `CHW`.
//!
//! CIFAR ([`CifarTransform`]):
//! - pad-4 random crop: zero-pad by 4 on every side and crop 32×32 at a uniform offset
//!   (TF-Slim's `cifarnet_preprocessing`, DARTS, most CIFAR references);
//! - the paper's crop: upsample to 40×40 (bilinear) and crop 32×32 at a uniform offset
//!   (paper §A.1);
//! - horizontal flip with probability 1/2;
//! - cutout: a square (16×16 by default) centred uniformly in the image and clipped at the border,
//!   set to 0 after normalisation, i.e. to the mean, as DeVries and Taylor's reference code does;
//! - normalisation: whitening per image (TensorFlow's `per_image_standardization`, which the paper
//!   means by "images are whitened") or per channel with data-set statistics.
//!
//! ImageNet ([`ImageNetTransform`], Inception preprocessing as TF-Slim maps NASNet to it, §4.5):
//! - training: random resized crop with area in [0.05, 1] of the image and aspect ratio in
//!   [3/4, 4/3] (TF-Slim's `distorted_bounding_box_crop` ranges), sampled as torchvision does
//!   (uniform area, log-uniform ratio, 10 attempts, then the whole image as TF-Slim falls back),
//!   horizontal flip, resize to the output size;
//! - evaluation: central crop of 0.875 of each side (TensorFlow's `central_crop` arithmetic) and resize;
//! - pixels scaled to [−1, 1] (x / 127.5 − 1).
//!
//! Inception's colour distortion (random brightness, saturation, hue, contrast) is left out.
//! Resizing is bilinear with half-pixel centres and no antialiasing (TensorFlow 2's `resize`).
//!
//! All randomness comes from the [`DataRng`] handed to [`Transform::apply`]; the batcher derives one
//! per (seed, epoch, item), so an epoch's augmentations are reproducible and independent of batching.

use crate::rng::DataRng;
use crate::Image;

/// Maps an 8-bit image to the network's `f32` input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalize {
    /// `x / 255`, in [0, 1].
    Unit,
    /// `x / 127.5 - 1`, in [−1, 1] (Inception, Keras "tf" mode, timm's NASNet).
    SignedUnit,
    /// `(x / 255 - mean[c]) / std[c]` per channel.
    PerChannel { mean: [f32; 3], std: [f32; 3] },
    /// Per-image whitening: `(x - mean) / max(std, 1 / sqrt(n))` over all `n` values of the image
    /// (TensorFlow's `per_image_standardization`); mean 0 and standard deviation 1 unless the image is flat.
    PerImage,
}

impl Normalize {
    /// CIFAR-10 training-set channel statistics (mean, population standard deviation on [0, 1]).
    pub const CIFAR10: Normalize =
        Normalize::PerChannel { mean: [0.4914, 0.4822, 0.4465], std: [0.2470, 0.2435, 0.2616] };

    /// Writes `img` as `CHW` `f32` into `out` (length `3 * width * height`).
    pub fn to_chw(&self, img: &Image, out: &mut [f32]) {
        let plane = img.width as usize * img.height as usize;
        assert_eq!(out.len(), 3 * plane, "output buffer does not match a {}x{} image", img.width, img.height);
        let (scale, offset): ([f32; 3], [f32; 3]) = match *self {
            Normalize::Unit => ([1.0 / 255.0; 3], [0.0; 3]),
            Normalize::SignedUnit => ([1.0 / 127.5; 3], [-1.0; 3]),
            Normalize::PerChannel { mean, std } => {
                let s = [0, 1, 2].map(|c| 1.0 / (255.0 * std[c]));
                (s, [0, 1, 2].map(|c| -mean[c] / std[c]))
            }
            Normalize::PerImage => {
                let (mut sum, mut sq) = (0u64, 0u64);
                for &v in &img.pixels {
                    sum += v as u64;
                    sq += v as u64 * v as u64;
                }
                let n = img.pixels.len().max(1) as f64;
                let mean = sum as f64 / n;
                let std = (sq as f64 / n - mean * mean).max(0.0).sqrt().max(1.0 / n.sqrt());
                ([(1.0 / std) as f32; 3], [(-mean / std) as f32; 3])
            }
        };
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.pixels.chunks_exact(3).enumerate() {
            r[i] = px[0] as f32 * scale[0] + offset[0];
            g[i] = px[1] as f32 * scale[1] + offset[1];
            b[i] = px[2] as f32 * scale[2] + offset[2];
        }
    }
}

/// Turns one image into network input. Implementations must write exactly
/// `3 * height * width` values (`CHW`) for the size [`Transform::output_size`] reports, whatever
/// the input's size.
pub trait Transform: Send + Sync {
    /// `(height, width)` of every output.
    fn output_size(&self) -> (u32, u32);

    /// Writes the transformed `image` into `out` (`CHW`, length `3 * height * width`).
    fn apply(&self, image: &Image, rng: &mut DataRng, out: &mut [f32]);

    /// [`Transform::apply`] into a new vector.
    fn apply_to_vec(&self, image: &Image, rng: &mut DataRng) -> Vec<f32> {
        let (h, w) = self.output_size();
        let mut out = vec![0.0; 3 * h as usize * w as usize];
        self.apply(image, rng, &mut out);
        out
    }
}

impl<T: Transform + ?Sized> Transform for std::sync::Arc<T> {
    fn output_size(&self) -> (u32, u32) {
        (**self).output_size()
    }
    fn apply(&self, image: &Image, rng: &mut DataRng, out: &mut [f32]) {
        (**self).apply(image, rng, out)
    }
}

/// How a CIFAR training image is cropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarCrop {
    /// No crop.
    None,
    /// Zero-pad by `pad` on each side, then crop the original size at a uniform offset.
    Pad { pad: u32 },
    /// Upsample to `size`×`size` (bilinear), then crop the original size at a uniform offset.
    Upsample { size: u32 },
}

/// CIFAR-style augmentation and normalisation.
///
/// An input that is not `size`×`size` is first resized to it (bilinear).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CifarTransform {
    /// Side of the (square) output.
    pub size: u32,
    pub crop: CifarCrop,
    /// Flip horizontally with probability 1/2.
    pub flip: bool,
    /// Side of the cutout square, if any.
    pub cutout: Option<u32>,
    pub normalize: Normalize,
}

impl CifarTransform {
    /// The usual CIFAR training recipe: pad-4 crop, flip, CIFAR-10 channel normalisation.
    /// Add cutout with [`CifarTransform::with_cutout`] for the paper's "+ cutout" rows.
    pub fn train() -> CifarTransform {
        CifarTransform {
            size: 32,
            crop: CifarCrop::Pad { pad: 4 },
            flip: true,
            cutout: None,
            normalize: Normalize::CIFAR10,
        }
    }

    /// The paper's child-training recipe during search (§2.1): a 32×32 crop of the image
    /// upsampled to 40×40, flip, per-image whitening.
    pub fn search() -> CifarTransform {
        CifarTransform {
            size: 32,
            crop: CifarCrop::Upsample { size: 40 },
            flip: true,
            cutout: None,
            normalize: Normalize::PerImage,
        }
    }

    /// Evaluation: no augmentation, CIFAR-10 channel normalisation (pairs with [`CifarTransform::train`]).
    pub fn eval() -> CifarTransform {
        CifarTransform::train().for_eval()
    }

    /// The same size and normalisation without crop, flip or cutout, for evaluating a model
    /// trained with `self`.
    pub fn for_eval(self) -> CifarTransform {
        CifarTransform { crop: CifarCrop::None, flip: false, cutout: None, ..self }
    }

    /// Adds cutout with a `size`×`size` square (16 is the usual CIFAR-10 size).
    pub fn with_cutout(self, size: u32) -> CifarTransform {
        CifarTransform { cutout: Some(size), ..self }
    }
}

impl Transform for CifarTransform {
    fn output_size(&self) -> (u32, u32) {
        (self.size, self.size)
    }

    fn apply(&self, image: &Image, rng: &mut DataRng, out: &mut [f32]) {
        let s = self.size;
        let resized;
        let base = if image.width == s && image.height == s {
            image
        } else {
            resized = resize(image, Region::whole(image), s, s);
            &resized
        };
        let mut img = match self.crop {
            CifarCrop::None => base.clone(),
            CifarCrop::Pad { pad } => pad_crop(base, pad, rng),
            CifarCrop::Upsample { size } => upsample_crop(base, size, rng),
        };
        if self.flip {
            random_flip(&mut img, rng);
        }
        self.normalize.to_chw(&img, out);
        if let Some(size) = self.cutout {
            cutout(out, s, s, size, rng);
        }
    }
}

/// Inception-style ImageNet preprocessing for training or evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageNetTransform {
    /// Side of the (square) output, e.g. 224 (mobile) or 331 (large).
    pub size: u32,
    /// Random resized crop and flip (training) or central crop (evaluation).
    pub train: bool,
    /// Range of the crop's area as a fraction of the image's (training).
    pub area: (f32, f32),
    /// Range of the crop's width / height (training).
    pub ratio: (f32, f32),
    /// Flip horizontally with probability 1/2 (training).
    pub flip: bool,
    /// Fraction of each side kept by the central crop (evaluation).
    pub central_fraction: f32,
    pub normalize: Normalize,
}

impl ImageNetTransform {
    /// Training: random resized crop (area [0.05, 1], ratio [3/4, 4/3]), flip, [−1, 1].
    pub fn train(size: u32) -> ImageNetTransform {
        ImageNetTransform {
            size,
            train: true,
            area: (0.05, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
            central_fraction: 0.875,
            normalize: Normalize::SignedUnit,
        }
    }

    /// Evaluation: central crop of 0.875, resize, [−1, 1].
    pub fn eval(size: u32) -> ImageNetTransform {
        ImageNetTransform { train: false, flip: false, ..ImageNetTransform::train(size) }
    }
}

impl Transform for ImageNetTransform {
    fn output_size(&self) -> (u32, u32) {
        (self.size, self.size)
    }

    fn apply(&self, image: &Image, rng: &mut DataRng, out: &mut [f32]) {
        let region = if self.train {
            random_resized_region(image.width, image.height, self.area, self.ratio, rng)
        } else {
            central_region(image.width, image.height, self.central_fraction)
        };
        let mut img = resize(image, region, self.size, self.size);
        if self.train && self.flip {
            random_flip(&mut img, rng);
        }
        self.normalize.to_chw(&img, out);
    }
}

/// A rectangle of source pixels (may be fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
}

impl Region {
    /// The whole image.
    pub fn whole(img: &Image) -> Region {
        Region { x: 0.0, y: 0.0, width: img.width as f32, height: img.height as f32 }
    }
}

/// Source positions and weights of one output axis for bilinear resampling with half-pixel centres.
fn axis_taps(start: f32, len: f32, src_len: u32, out_len: u32) -> Vec<(usize, usize, f32)> {
    let scale = len / out_len as f32;
    let max = src_len.saturating_sub(1) as f32;
    (0..out_len)
        .map(|o| {
            let s = (start + (o as f32 + 0.5) * scale - 0.5).clamp(0.0, max);
            let i0 = s.floor() as usize;
            let i1 = (i0 + 1).min(src_len.saturating_sub(1) as usize);
            (i0, i1, s - i0 as f32)
        })
        .collect()
}

/// Resamples `region` of `src` to `out_w`×`out_h` (bilinear, half-pixel centres, edges clamped).
pub fn resize(src: &Image, region: Region, out_w: u32, out_h: u32) -> Image {
    let xs = axis_taps(region.x, region.width, src.width, out_w);
    let ys = axis_taps(region.y, region.height, src.height, out_h);
    let stride = src.width as usize * 3;
    let mut pixels = Vec::with_capacity(out_w as usize * out_h as usize * 3);
    for &(y0, y1, fy) in &ys {
        let row0 = &src.pixels[y0 * stride..(y0 + 1) * stride];
        let row1 = &src.pixels[y1 * stride..(y1 + 1) * stride];
        for &(x0, x1, fx) in &xs {
            for c in 0..3 {
                let top = row0[x0 * 3 + c] as f32 * (1.0 - fx) + row0[x1 * 3 + c] as f32 * fx;
                let bottom = row1[x0 * 3 + c] as f32 * (1.0 - fx) + row1[x1 * 3 + c] as f32 * fx;
                pixels.push((top * (1.0 - fy) + bottom * fy + 0.5) as u8);
            }
        }
    }
    Image { width: out_w, height: out_h, pixels }
}

/// Copies a `width`×`height` window whose top-left corner is at (`x0`, `y0`) in `src` coordinates
/// (possibly negative or past the edge); pixels outside `src` are black.
fn window(src: &Image, x0: i64, y0: i64, width: u32, height: u32) -> Image {
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    let (sw, sh) = (src.width as i64, src.height as i64);
    let xa = x0.max(0);
    let xb = (x0 + width as i64).min(sw);
    if xa < xb {
        for oy in 0..height as i64 {
            let sy = y0 + oy;
            if sy < 0 || sy >= sh {
                continue;
            }
            let src_row = (sy * sw) as usize * 3;
            let dst_row = (oy * width as i64) as usize * 3;
            let n = (xb - xa) as usize * 3;
            let s = src_row + xa as usize * 3;
            let d = dst_row + (xa - x0) as usize * 3;
            pixels[d..d + n].copy_from_slice(&src.pixels[s..s + n]);
        }
    }
    Image { width, height, pixels }
}

/// Zero-pads `src` by `pad` on every side and crops its original size at a uniform offset.
pub fn pad_crop(src: &Image, pad: u32, rng: &mut DataRng) -> Image {
    let dx = rng.range_inclusive(0, 2 * pad as i64) - pad as i64;
    let dy = rng.range_inclusive(0, 2 * pad as i64) - pad as i64;
    window(src, dx, dy, src.width, src.height)
}

/// Upsamples `src` to `size`×`size` and crops its original size at a uniform offset
/// (the paper's 32-from-40 crop). A `size` smaller than the image is treated as the image's size.
pub fn upsample_crop(src: &Image, size: u32, rng: &mut DataRng) -> Image {
    let (w, h) = (src.width, src.height);
    let (uw, uh) = (size.max(w), size.max(h));
    let up = resize(src, Region::whole(src), uw, uh);
    let x0 = rng.range_inclusive(0, (uw - w) as i64);
    let y0 = rng.range_inclusive(0, (uh - h) as i64);
    window(&up, x0, y0, w, h)
}

/// Mirrors `img` left to right.
pub fn hflip(img: &mut Image) {
    let w = img.width as usize;
    for row in img.pixels.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// Mirrors `img` with probability 1/2.
pub fn random_flip(img: &mut Image, rng: &mut DataRng) {
    if rng.bernoulli(0.5) {
        hflip(img);
    }
}

/// Sets a `size`×`size` square of a `CHW` buffer to 0 in every channel; its centre is uniform over
/// the image and it is clipped at the border (DeVries and Taylor's reference code).
pub fn cutout(chw: &mut [f32], height: u32, width: u32, size: u32, rng: &mut DataRng) {
    let (h, w) = (height as i64, width as i64);
    let cy = rng.below(height as usize) as i64;
    let cx = rng.below(width as usize) as i64;
    let half = size as i64 / 2;
    let (y0, y1) = ((cy - half).max(0), (cy - half + size as i64).min(h));
    let (x0, x1) = ((cx - half).max(0), (cx - half + size as i64).min(w));
    let plane = (h * w) as usize;
    for c in 0..3 {
        for y in y0..y1 {
            let row = c * plane + (y * w) as usize;
            chw[row + x0 as usize..row + x1 as usize].fill(0.0);
        }
    }
}

/// An Inception-style random crop region of a `width`×`height` image: area a uniform fraction in
/// `area`, aspect ratio (width / height) log-uniform in `ratio`, 10 attempts, else the whole image.
pub fn random_resized_region(
    width: u32,
    height: u32,
    area: (f32, f32),
    ratio: (f32, f32),
    rng: &mut DataRng,
) -> Region {
    let total = width as f32 * height as f32;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = total * rng.uniform(area.0, area.1);
        let r = rng.uniform(log_lo, log_hi).exp();
        let w = (target * r).sqrt().round() as u32;
        let h = (target / r).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let x = rng.below((width - w) as usize + 1) as f32;
            let y = rng.below((height - h) as usize + 1) as f32;
            return Region { x, y, width: w as f32, height: h as f32 };
        }
    }
    Region { x: 0.0, y: 0.0, width: width as f32, height: height as f32 }
}

/// The central `fraction` of each side, with TensorFlow's `central_crop` rounding:
/// start `int((side - side * fraction) / 2)`, size `side - 2 * start`.
pub fn central_region(width: u32, height: u32, fraction: f32) -> Region {
    let start = |side: u32| ((side as f64 - side as f64 * fraction as f64) / 2.0) as u32;
    let (x, y) = (start(width), start(height));
    Region { x: x as f32, y: y as f32, width: (width - 2 * x) as f32, height: (height - 2 * y) as f32 }
}
