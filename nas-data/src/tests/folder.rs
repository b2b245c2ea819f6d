use std::fs;
use std::path::Path;

use candle_core::Device;
use image::{ImageFormat, Luma, LumaA, Rgb, Rgba};

use super::TempDir;
use crate::*;

fn write_cmyk(path: &Path, w: u16, h: u16, cmyk: [u8; 4]) {
    let data: Vec<u8> = cmyk.iter().copied().cycle().take(w as usize * h as usize * 4).collect();
    jpeg_encoder::Encoder::new_file(path, 95).unwrap().encode(&data, w, h, jpeg_encoder::ColorType::Cmyk).unwrap();
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_fn(w, h, |x, y| Rgb([x as u8 * 3, y as u8 * 3, 90]))
        .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Jpeg)
        .unwrap();
    bytes
}

/// `train/` with two classes of images in every colour mode (and an empty class), `val/` with a
/// corrupt and a truncated file among good ones, and files and folders the reader must ignore.
fn write_tree(root: &Path) {
    let mk = |p: &str| fs::create_dir_all(root.join(p)).unwrap();
    for d in ["train/b_cls/sub", "train/a_cls", "train/c_cls", "train/.git", "val/a_cls", "val/b_cls"] {
        mk(d);
    }
    let t = root.join("train");
    image::GrayImage::from_pixel(40, 30, Luma([128]))
        .save_with_format(t.join("b_cls/grey.JPEG"), ImageFormat::Jpeg)
        .unwrap();
    image::RgbaImage::from_pixel(20, 10, Rgba([10, 200, 30, 50]))
        .save_with_format(t.join("b_cls/rgba.png"), ImageFormat::Png)
        .unwrap();
    fs::write(t.join("b_cls/notes.txt"), "not an image").unwrap();
    fs::write(t.join("b_cls/.hidden.JPEG"), jpeg_bytes(8, 8)).unwrap();
    fs::write(t.join("b_cls/sub/deeper.JPEG"), jpeg_bytes(8, 8)).unwrap();
    fs::write(t.join(".git/x.JPEG"), jpeg_bytes(8, 8)).unwrap();
    write_cmyk(&t.join("a_cls/cmyk.JPEG"), 16, 12, [0, 255, 255, 0]);
    fs::write(t.join("a_cls/rgb.jpg"), jpeg_bytes(64, 48)).unwrap();
    image::ImageBuffer::<LumaA<u16>, Vec<u16>>::from_pixel(9, 7, LumaA([65535, 1000]))
        .save_with_format(t.join("a_cls/la16.png"), ImageFormat::Png)
        .unwrap();
    // PNG content under a JPEG name: the format is guessed from the bytes.
    image::RgbImage::from_pixel(5, 5, Rgb([1, 2, 3]))
        .save_with_format(t.join("a_cls/zz_png.JPEG"), ImageFormat::Png)
        .unwrap();

    let v = root.join("val");
    fs::write(v.join("a_cls/one.JPEG"), jpeg_bytes(33, 17)).unwrap();
    fs::write(v.join("b_cls/corrupt.JPEG"), b"this is not a jpeg file at all").unwrap();
    fs::write(v.join("b_cls/truncated.JPEG"), &jpeg_bytes(64, 64)[..60]).unwrap();
    image::RgbImage::from_pixel(6, 6, Rgb([250, 0, 5]))
        .save_with_format(v.join("b_cls/ok.png"), ImageFormat::Png)
        .unwrap();
}

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter().zip(b).all(|(&x, y)| (x as i32 - y as i32).abs() <= tol)
}

#[test]
fn folder_labels_and_every_colour_mode_come_out_rgb() {
    let tmp = TempDir::new("folder");
    write_tree(tmp.path());
    let data = ImageFolder::open_imagenet(tmp.path()).unwrap();
    let train = &data.train;
    assert_eq!(train.class_names(), ["a_cls", "b_cls", "c_cls"].map(String::from));
    assert_eq!(train.len(), 6);
    assert_eq!(train.class_counts(), vec![4, 2, 0]);
    let names: Vec<&str> = (0..6).map(|i| train.path(i).file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["cmyk.JPEG", "la16.png", "rgb.jpg", "zz_png.JPEG", "grey.JPEG", "rgba.png"]);
    assert_eq!((0..6).map(|i| train.label(i)).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1]);

    let get = |i: usize| {
        let item = train.get(i).unwrap();
        assert_eq!(item.label, train.label(i));
        let img = item.image.into_owned();
        assert_eq!(img.pixels.len(), img.width as usize * img.height as usize * 3);
        img
    };
    let cmyk = get(0);
    assert_eq!((cmyk.width, cmyk.height), (16, 12));
    assert!(close(cmyk.pixel(8, 6), [255, 0, 0], 6), "CMYK red decoded as {:?}", cmyk.pixel(8, 6));
    let la16 = get(1);
    assert_eq!((la16.width, la16.height), (9, 7));
    assert_eq!(la16.pixel(4, 4), [255, 255, 255]);
    let rgb = get(2);
    assert_eq!((rgb.width, rgb.height), (64, 48));
    assert!(close(rgb.pixel(10, 20), [30, 60, 90], 8), "{:?}", rgb.pixel(10, 20));
    assert_eq!(get(3).pixel(2, 2), [1, 2, 3]);
    let grey = get(4);
    assert_eq!((grey.width, grey.height), (40, 30));
    assert!(close(grey.pixel(3, 3), [128, 128, 128], 2), "{:?}", grey.pixel(3, 3));
    // Alpha is dropped, not composited.
    assert_eq!(get(5).pixel(0, 0), [10, 200, 30]);

    // Validation uses the training labels even with a class missing.
    assert_eq!(data.test.class_names(), train.class_names());
    assert_eq!((0..4).map(|i| data.test.label(i)).collect::<Vec<_>>(), [0, 1, 1, 1]);
}

#[test]
fn corrupt_files_fail_alone_and_the_batcher_skips_and_counts_them() {
    let tmp = TempDir::new("folder-corrupt");
    write_tree(tmp.path());
    let val = ImageFolder::open_imagenet(tmp.path()).unwrap().test;
    assert_eq!(val.len(), 4);
    let err = val.get(1).expect_err("a corrupt file is an error");
    assert!(matches!(err, DataError::Decode { .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("{}: cannot decode image", val.path(1).display())), "{err}");
    assert!(val.get(3).err().unwrap().to_string().contains("truncated.JPEG"));

    let cfg = BatchConfig { batch_size: 3, shuffle: true, drop_last: false, prefetch: 1, seed: 5 };
    let batcher = Batcher::new(val, ImageNetTransform::eval(24), cfg, Device::Cpu).unwrap();
    for epoch in 0..2 {
        let mut run = batcher.epoch(epoch);
        let mut seen = Vec::new();
        let mut skipped = 0;
        for batch in run.by_ref() {
            let batch = batch.unwrap();
            assert_eq!(batch.images.dims(), &[batch.indices.len(), 3, 24, 24]);
            skipped += batch.skipped;
            seen.extend(batch.indices);
        }
        seen.sort_unstable();
        assert_eq!(seen, [0, 2]);
        let summary = run.summary().expect("complete epoch").clone();
        assert_eq!((summary.epoch, summary.items, summary.skipped, skipped), (epoch, 2, 2, 2));
        let mut bad: Vec<usize> = summary.errors.iter().map(|e| e.index).collect();
        bad.sort_unstable();
        assert_eq!(bad, [1, 3]);
        let text = summary.to_string();
        assert!(text.starts_with(&format!("epoch {epoch}: 2 items in ")) && text.contains(", 2 skipped"), "{text}");
        assert!(text.contains("corrupt.JPEG: cannot decode image") && text.contains("truncated.JPEG"), "{text}");
    }
}

#[test]
fn layout_errors_name_the_folder() {
    let tmp = TempDir::new("folder-layout");
    let err = ImageFolder::open_imagenet(tmp.path()).unwrap_err();
    assert!(matches!(&err, DataError::Missing { path, .. } if path.ends_with("train")), "{err}");

    fs::create_dir_all(tmp.path().join("train")).unwrap();
    let err = ImageFolder::open_imagenet(tmp.path()).unwrap_err();
    assert!(err.to_string().ends_with("train: no class folders (expected <class>/*.JPEG)"), "{err}");

    fs::create_dir_all(tmp.path().join("train/cat")).unwrap();
    fs::write(tmp.path().join("train/cat/readme.txt"), "x").unwrap();
    let err = ImageFolder::open_imagenet(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("no image files"), "{err}");

    fs::write(tmp.path().join("train/cat/1.JPEG"), jpeg_bytes(4, 4)).unwrap();
    fs::create_dir_all(tmp.path().join("val/dog")).unwrap();
    let err = ImageFolder::open_imagenet(tmp.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: class folder is not among the training classes", tmp.path().join("val/dog").display())
    );
    let err = decode_image(tmp.path().join("train/cat/none.JPEG")).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }) && err.to_string().contains("none.JPEG"), "{err}");
}
