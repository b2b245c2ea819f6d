use super::TempDir;
use crate::*;

#[test]
fn generation_is_deterministic_balanced_and_prefix_stable() {
    let cfg = SyntheticConfig::new(12);
    let a = cfg.generate(Part::Train, 60);
    assert_eq!(a, cfg.generate(Part::Train, 60));
    assert_eq!(a.labels(), (0..60).map(|i| i % 10).collect::<Vec<u32>>());
    assert_eq!(a.class_names(), SYNTHETIC_CLASSES.map(String::from));
    let longer = cfg.generate(Part::Train, 80);
    assert_eq!(&longer.images()[..60], a.images());
    let other = SyntheticConfig::new(13).generate(Part::Train, 60);
    assert!(a.images().iter().zip(other.images()).all(|(x, y)| x != y));
    let test = cfg.generate(Part::Test, 60);
    assert!(a.images().iter().zip(test.images()).all(|(x, y)| x != y));
    let (img, label) = cfg.image(Part::Train, 17);
    assert_eq!((&img, label), (a.image(17), 7));
}

#[test]
fn sizes_scale_and_images_are_not_flat() {
    for size in [32, 64] {
        let set = SyntheticConfig { size, seed: 1 }.generate(Part::Train, 20);
        for img in set.images() {
            assert_eq!((img.width, img.height, img.pixels.len()), (size, size, (size * size * 3) as usize));
            let grey: Vec<f32> =
                img.pixels.chunks_exact(3).map(|p| (p[0] as f32 + p[1] as f32 + p[2] as f32) / 3.0).collect();
            let mean = grey.iter().sum::<f32>() / grey.len() as f32;
            let var = grey.iter().map(|g| (g - mean).powi(2)).sum::<f32>() / grey.len() as f32;
            assert!(var > 50.0, "image nearly flat: variance {var}");
        }
    }
}

/// The fraction of `test` items whose nearest class centroid of `feature` (fitted on `train`) is their class.
fn centroid_accuracy(train: &InMemory, test: &InMemory, feature: impl Fn(&Image) -> Vec<f32>) -> f32 {
    let d = feature(train.image(0)).len();
    let mut centroids = vec![vec![0f32; d]; 10];
    let mut counts = [0f32; 10];
    for (img, &l) in train.images().iter().zip(train.labels()) {
        for (c, f) in centroids[l as usize].iter_mut().zip(feature(img)) {
            *c += f;
        }
        counts[l as usize] += 1.0;
    }
    for (c, n) in centroids.iter_mut().zip(counts) {
        c.iter_mut().for_each(|v| *v /= n);
    }
    let correct = test
        .images()
        .iter()
        .zip(test.labels())
        .filter(|(img, &l)| {
            let f = feature(img);
            let dist = |c: &Vec<f32>| c.iter().zip(&f).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
            let best = (0..10).min_by(|&a, &b| dist(&centroids[a]).total_cmp(&dist(&centroids[b]))).unwrap();
            best == l as usize
        })
        .count();
    correct as f32 / test.len() as f32
}

#[test]
fn colour_statistics_do_not_tell_the_class() {
    let data = SyntheticConfig::new(2).train_test(1000, 500);
    // Mean and standard deviation of each channel: a classifier on them stays near chance
    // (0.106 when written).
    let stats = |img: &Image| {
        let mut f = Vec::new();
        for c in 0..3 {
            let v: Vec<f32> = img.pixels.iter().skip(c).step_by(3).map(|&x| x as f32).collect();
            let m = v.iter().sum::<f32>() / v.len() as f32;
            f.push(m);
            f.push((v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / v.len() as f32).sqrt());
        }
        f
    };
    let acc = centroid_accuracy(&data.train, &data.test, stats);
    assert!(acc < 0.2, "colour statistics give {acc} accuracy");
    // The spreads alone, unmasked by the larger spread of the means (0.116 when written).
    let spread = |img: &Image| stats(img).into_iter().skip(1).step_by(2).collect();
    let acc = centroid_accuracy(&data.train, &data.test, spread);
    assert!(acc < 0.2, "colour spreads give {acc} accuracy");
}

#[test]
fn imagenet_folder_round_trip() {
    let data = SyntheticConfig::new(4).train_test(30, 10);
    let tmp = TempDir::new("synthetic-folder");
    write_imagenet_folder(tmp.path(), &data.train, &data.test, 48).unwrap();
    assert!(tmp.path().join("train/00_disc/000000.JPEG").is_file());
    assert!(tmp.path().join("val/09_dots/000009.JPEG").is_file());
    let folder = ImageFolder::open_imagenet(tmp.path()).unwrap();
    assert_eq!(folder.train.len(), 30);
    assert_eq!(folder.test.len(), 10);
    let expected_names: Vec<String> =
        SYNTHETIC_CLASSES.iter().enumerate().map(|(i, n)| format!("{i:02}_{n}")).collect();
    assert_eq!(folder.train.class_names(), expected_names.as_slice());
    assert_eq!(folder.train.class_counts(), vec![3; 10]);
    // Folder order is by class, then by file name: item k of class c is original item c + 10 k.
    for i in 0..30 {
        let (class, k) = (i / 3, i % 3);
        let original = class + 10 * k;
        assert_eq!(folder.train.label(i), data.train.labels()[original]);
        let img = folder.train.get(i).unwrap().image.into_owned();
        assert_eq!((img.width, img.height), (48, 48));
        let expected =
            augment::resize(data.train.image(original), augment::Region::whole(data.train.image(original)), 48, 48);
        let mae = img.pixels.iter().zip(&expected.pixels).map(|(&a, &b)| (a as f32 - b as f32).abs()).sum::<f32>()
            / img.pixels.len() as f32;
        assert!(mae < 8.0, "item {i}: mean absolute JPEG error {mae}");
    }
    let err = write_imagenet_folder(tmp.path(), &data.train, &data.test, 0).unwrap_err();
    assert!(matches!(err, DataError::Config(_)));
}
