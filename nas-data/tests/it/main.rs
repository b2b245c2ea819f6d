//! End to end through the public API: the built-in set written in both on-disk formats, read back by
//! the real readers, split, augmented and batched into tensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use nas_data::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("nas-data-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn cifar_files_to_search_batches() {
    let data = SyntheticConfig::new(31).train_test(200, 50);
    let tmp = TempDir::new("cifar");
    write_cifar10_binary(tmp.path(), &data.train, &data.test).unwrap();
    let read = read_cifar10(tmp.path()).unwrap();
    assert_eq!(read.train, data.train);
    assert_eq!(read.test, data.test);

    // The search's split, recorded and reloaded as a run would.
    let split = Split::fraction(read.train.len(), 0.1, 31).unwrap();
    split.save(tmp.path().join("split.json")).unwrap();
    let split = Split::load(tmp.path().join("split.json")).unwrap();
    let (train, valid) = split.apply(Arc::new(read.train)).unwrap();
    assert_eq!((train.len(), valid.len()), (180, 20));

    let batcher = Batcher::new(train, CifarTransform::search(), BatchConfig::train(32, 31), Device::Cpu).unwrap();
    let mut seen = Vec::new();
    let mut epoch = batcher.epoch(0);
    for batch in epoch.by_ref() {
        let batch = batch.unwrap();
        assert_eq!(batch.images.dims(), &[32, 3, 32, 32]);
        assert_eq!(batch.labels.dtype(), DType::U32);
        seen.extend(batch.indices);
    }
    assert_eq!(seen.len(), 160); // 180 items, last partial batch dropped
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 160);
    assert_eq!(epoch.summary().unwrap().skipped, 0);

    let eval = Batcher::new(valid, CifarTransform::search().for_eval(), BatchConfig::eval(8), Device::Cpu).unwrap();
    let summary = eval.epoch(0).finish().unwrap();
    assert_eq!((summary.items, summary.batches), (20, 3));
}

#[test]
fn imagenet_folder_to_transfer_batches() {
    let data = SyntheticConfig { size: 64, seed: 8 }.train_test(40, 20);
    let tmp = TempDir::new("imagenet");
    write_imagenet_folder(tmp.path(), &data.train, &data.test, 64).unwrap();
    let folder = ImageFolder::open_imagenet(tmp.path()).unwrap();
    assert_eq!(folder.train.num_classes(), 10);
    assert_eq!(folder.train.class_names()[3], "03_cross");

    let train =
        Batcher::new(folder.train, ImageNetTransform::train(56), BatchConfig::train(16, 1), Device::Cpu).unwrap();
    let batch = train.epoch(4).next().unwrap().unwrap();
    assert_eq!(batch.images.dims(), &[16, 3, 56, 56]);
    let values = batch.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));

    let eval = Batcher::new(folder.test, ImageNetTransform::eval(56), BatchConfig::eval(16), Device::Cpu).unwrap();
    let batches: Vec<Batch> = eval.epoch(0).map(Result::unwrap).collect();
    assert_eq!(batches.iter().map(|b| b.indices.len()).collect::<Vec<_>>(), [16, 4]);
    let labels = batches[0].labels.to_vec1::<u32>().unwrap();
    assert_eq!(labels[..4], [0, 0, 1, 1]); // two validation images per class, class folders in order
}
