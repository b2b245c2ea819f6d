use super::pattern_image;
use crate::augment::*;
use crate::*;

fn rng(seed: u64) -> DataRng {
    DataRng::new(seed)
}

fn range(xs: &[f32]) -> (f32, f32) {
    xs.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

fn mean_std(xs: &[f32]) -> (f32, f32) {
    let n = xs.len() as f32;
    let mean = xs.iter().sum::<f32>() / n;
    (mean, (xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt())
}

/// An image with black and white pixels, so every normalisation reaches its extremes.
fn extremes(size: u32) -> Image {
    let mut img = pattern_image(size, size, 1);
    img.pixels[..3].fill(0);
    let n = img.pixels.len();
    img.pixels[n - 3..].fill(255);
    img
}

#[test]
fn to_chw_layout_and_normalisation_ranges() {
    let img = extremes(8);
    let mut out = vec![0.0; 3 * 64];
    Normalize::Unit.to_chw(&img, &mut out);
    for (x, y, c) in [(0, 0, 0), (3, 5, 1), (7, 7, 2), (2, 6, 2)] {
        let expected = img.pixel(x, y)[c] as f32 / 255.0;
        assert!((out[c * 64 + y as usize * 8 + x as usize] - expected).abs() < 1e-6, "({x}, {y}, {c})");
    }
    assert_eq!(range(&out), (0.0, 1.0));

    Normalize::SignedUnit.to_chw(&img, &mut out);
    assert_eq!(range(&out), (-1.0, 1.0));

    let (mean, std) = ([0.5, 0.4, 0.3], [0.25, 0.2, 0.1]);
    Normalize::PerChannel { mean, std }.to_chw(&img, &mut out);
    for c in 0..3 {
        let (lo, hi) = range(&out[c * 64..(c + 1) * 64]);
        assert!((lo - (0.0 - mean[c]) / std[c]).abs() < 1e-5);
        assert!((hi - (1.0 - mean[c]) / std[c]).abs() < 1e-5);
    }

    Normalize::PerImage.to_chw(&img, &mut out);
    let (m, s) = mean_std(&out);
    assert!(m.abs() < 1e-4 && (s - 1.0).abs() < 1e-3, "whitened mean {m}, std {s}");
    // A flat image: the standard deviation floor keeps the values finite (all zero).
    Normalize::PerImage.to_chw(&Image::filled(8, 8, [77, 77, 77]), &mut out);
    assert!(out.iter().all(|&v| v == 0.0));
}

#[test]
fn pad_crop_is_a_shift_with_zero_border_covering_all_offsets() {
    let img = pattern_image(32, 32, 3);
    let mut seen = std::collections::HashSet::new();
    for seed in 0..300 {
        let out = pad_crop(&img, 4, &mut rng(seed));
        assert_eq!((out.width, out.height), (32, 32));
        let shift = (-4..=4i64)
            .flat_map(|dy| (-4..=4i64).map(move |dx| (dx, dy)))
            .find(|&(dx, dy)| {
                (0..32i64).all(|y| {
                    (0..32i64).all(|x| {
                        let (sx, sy) = (x + dx, y + dy);
                        let expected = if (0..32).contains(&sx) && (0..32).contains(&sy) {
                            img.pixel(sx as u32, sy as u32)
                        } else {
                            [0, 0, 0]
                        };
                        out.pixel(x as u32, y as u32) == expected
                    })
                })
            })
            .expect("output is a shifted copy");
        seen.insert(shift);
    }
    assert!(seen.contains(&(-4, -4)) && seen.contains(&(4, 4)) && seen.contains(&(0, 0)));
    assert!(seen.len() > 60, "only {} of 81 offsets", seen.len());
}

#[test]
fn upsample_crop_keeps_size_and_content() {
    let flat = Image::filled(32, 32, [10, 200, 30]);
    let out = upsample_crop(&flat, 40, &mut rng(1));
    assert_eq!(out, flat);
    let img = pattern_image(32, 32, 0);
    let a = upsample_crop(&img, 40, &mut rng(2));
    assert_eq!((a.width, a.height), (32, 32));
    assert_eq!(a, upsample_crop(&img, 40, &mut rng(2)));
    let distinct: std::collections::HashSet<Vec<u8>> =
        (0..20).map(|s| upsample_crop(&img, 40, &mut rng(s)).pixels).collect();
    assert!(distinct.len() > 10, "crops barely vary: {}", distinct.len());
}

#[test]
fn flip_mirrors_and_happens_half_the_time() {
    let img = pattern_image(5, 3, 2);
    let mut flipped = img.clone();
    hflip(&mut flipped);
    for y in 0..3 {
        for x in 0..5 {
            assert_eq!(flipped.pixel(x, y), img.pixel(4 - x, y));
        }
    }
    hflip(&mut flipped);
    assert_eq!(flipped, img);
    let mut r = rng(3);
    let flips = (0..1000)
        .filter(|_| {
            let mut copy = img.clone();
            random_flip(&mut copy, &mut r);
            copy != img
        })
        .count();
    assert!((430..570).contains(&flips), "{flips} flips in 1000");
}

#[test]
fn cutout_zeroes_one_clipped_square_in_every_channel() {
    let (mut full, mut smallest) = (0, usize::MAX);
    for seed in 0..400 {
        let mut chw = vec![1.0f32; 3 * 32 * 32];
        cutout(&mut chw, 32, 32, 16, &mut rng(seed));
        let zeros: Vec<usize> =
            (0..3).map(|c| chw[c * 1024..(c + 1) * 1024].iter().filter(|&&v| v == 0.0).count()).collect();
        assert!(zeros[0] == zeros[1] && zeros[1] == zeros[2]);
        // The zeros form one rectangle of at most 16x16.
        let cells: Vec<(usize, usize)> = (0..1024).filter(|&i| chw[i] == 0.0).map(|i| (i % 32, i / 32)).collect();
        let (x0, x1) = (cells.iter().map(|c| c.0).min().unwrap(), cells.iter().map(|c| c.0).max().unwrap());
        let (y0, y1) = (cells.iter().map(|c| c.1).min().unwrap(), cells.iter().map(|c| c.1).max().unwrap());
        assert_eq!((x1 - x0 + 1) * (y1 - y0 + 1), zeros[0]);
        assert!(x1 - x0 < 16 && y1 - y0 < 16);
        full = full.max(zeros[0]);
        smallest = smallest.min(zeros[0]);
    }
    assert_eq!(full, 256);
    assert!((64..128).contains(&smallest), "smallest clipped square {smallest}");
}

#[test]
fn random_resized_region_respects_its_ranges() {
    let mut r = rng(4);
    for _ in 0..500 {
        let reg = random_resized_region(300, 200, (0.05, 1.0), (0.75, 4.0 / 3.0), &mut r);
        assert!(reg.x >= 0.0 && reg.y >= 0.0 && reg.x + reg.width <= 300.0 && reg.y + reg.height <= 200.0);
        let area = reg.width * reg.height / 60_000.0;
        let ratio = reg.width / reg.height;
        let whole = reg.width == 300.0 && reg.height == 200.0;
        assert!(whole || (0.045..=1.0).contains(&area), "area fraction {area}");
        assert!(whole || (0.72..=1.39).contains(&ratio), "ratio {ratio}");
    }
    // A sliver cannot hold a crop of that ratio: the whole image is used.
    let reg = random_resized_region(200, 1, (0.5, 1.0), (0.75, 4.0 / 3.0), &mut r);
    assert_eq!((reg.width, reg.height), (200.0, 1.0));
}

#[test]
fn central_region_uses_tensorflow_rounding() {
    let reg = central_region(299, 299, 0.875);
    // int((299 - 261.625) / 2) = 18, size 299 - 36.
    assert_eq!((reg.x, reg.width), (18.0, 263.0));
    let reg = central_region(500, 375, 0.875);
    assert_eq!((reg.x, reg.y, reg.width, reg.height), (31.0, 23.0, 438.0, 329.0));
    assert_eq!(central_region(1, 1, 0.875).width, 1.0);
}

#[test]
fn resize_is_identity_at_same_size_and_interpolates() {
    let img = pattern_image(9, 7, 5);
    assert_eq!(resize(&img, Region::whole(&img), 9, 7), img);
    let flat = Image::filled(3, 5, [9, 99, 199]);
    assert_eq!(resize(&flat, Region::whole(&flat), 11, 4), Image::filled(11, 4, [9, 99, 199]));
    let mut two = Image::filled(2, 1, [0, 0, 0]);
    two.pixels[3..].fill(200);
    let up = resize(&two, Region::whole(&two), 4, 1);
    let reds: Vec<u8> = (0..4).map(|x| up.pixel(x, 0)[0]).collect();
    assert_eq!(reds, [0, 50, 150, 200]);
    let tiny = Image::filled(1, 1, [5, 6, 7]);
    assert_eq!(resize(&tiny, Region::whole(&tiny), 3, 3), Image::filled(3, 3, [5, 6, 7]));
}

#[test]
fn cifar_transforms_shape_range_and_determinism() {
    let img = extremes(32);
    let train = CifarTransform::train();
    assert_eq!(train.output_size(), (32, 32));
    let a = train.apply_to_vec(&img, &mut rng(1));
    assert_eq!(a.len(), 3 * 32 * 32);
    assert_eq!(a, train.apply_to_vec(&img, &mut rng(1)));
    assert_ne!(a, train.apply_to_vec(&img, &mut rng(2)));
    let Normalize::PerChannel { mean, std } = Normalize::CIFAR10 else { unreachable!() };
    for c in 0..3 {
        let (lo, hi) = range(&a[c * 1024..(c + 1) * 1024]);
        assert!(lo >= -mean[c] / std[c] - 1e-5 && hi <= (1.0 - mean[c]) / std[c] + 1e-5);
    }

    let search = CifarTransform::search();
    let s = search.apply_to_vec(&img, &mut rng(1));
    let (m, sd) = mean_std(&s);
    assert!(m.abs() < 1e-4 && (sd - 1.0).abs() < 1e-3);

    let cut = CifarTransform::train().with_cutout(16);
    let c = cut.apply_to_vec(&pattern_image(32, 32, 9), &mut rng(5));
    let zeros = c.iter().filter(|&&v| v == 0.0).count();
    assert!(zeros >= 3 * 64, "cutout left {zeros} zeros");

    // Evaluation is deterministic whatever the generator; other sizes are resized first.
    let eval = train.for_eval();
    assert_eq!(eval, CifarTransform::eval());
    assert_eq!(eval.apply_to_vec(&img, &mut rng(1)), eval.apply_to_vec(&img, &mut rng(2)));
    let big = pattern_image(64, 48, 0);
    assert_eq!(search.apply_to_vec(&big, &mut rng(1)).len(), 3 * 32 * 32);
}

#[test]
fn imagenet_transforms_shape_range_and_determinism() {
    let img = extremes(1).clone();
    let photo = {
        let mut p = pattern_image(120, 90, 4);
        p.pixels[..3].fill(0);
        p.pixels[300..303].fill(255);
        p
    };
    for t in [ImageNetTransform::train(64), ImageNetTransform::eval(64)] {
        assert_eq!(t.output_size(), (64, 64));
        for source in [&photo, &img] {
            let out = t.apply_to_vec(source, &mut rng(3));
            assert_eq!(out.len(), 3 * 64 * 64);
            let (lo, hi) = range(&out);
            assert!(lo >= -1.0 && hi <= 1.0, "range {lo}..{hi}");
        }
    }
    let train = ImageNetTransform::train(64);
    assert_eq!(train.apply_to_vec(&photo, &mut rng(3)), train.apply_to_vec(&photo, &mut rng(3)));
    assert_ne!(train.apply_to_vec(&photo, &mut rng(3)), train.apply_to_vec(&photo, &mut rng(4)));
    let eval = ImageNetTransform::eval(64);
    assert_eq!(eval.apply_to_vec(&photo, &mut rng(3)), eval.apply_to_vec(&photo, &mut rng(4)));
    // The evaluation crop keeps pixels 5..75 of 80 (start int(10 / 2)): the black frame around them
    // does not show, but one more black ring would.
    let mut framed = Image::filled(80, 80, [0, 0, 0]);
    for y in 5..75 {
        for x in 5..75 {
            let i = (y * 80 + x) * 3;
            framed.pixels[i..i + 3].copy_from_slice(&[255, 255, 255]);
        }
    }
    let out = eval.apply_to_vec(&framed, &mut rng(0));
    assert!(out.iter().all(|&v| v == 1.0));
    framed.pixels[(5 * 80 + 40) * 3] = 0;
    assert!(eval.apply_to_vec(&framed, &mut rng(0)).iter().any(|&v| v < 1.0));
}
