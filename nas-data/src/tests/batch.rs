use std::sync::Arc;

use candle_core::{DType, Device};

use crate::rng::stream;
use crate::*;

fn set(n: usize) -> Arc<InMemory> {
    Arc::new(SyntheticConfig::new(21).generate(Part::Train, n))
}

fn cfg(batch_size: usize, drop_last: bool, prefetch: usize) -> BatchConfig {
    BatchConfig { batch_size, shuffle: true, drop_last, prefetch, seed: 77 }
}

/// Indices, labels and image values of every batch of an epoch.
fn run<D: Dataset + 'static, T: Transform + 'static>(
    b: &Batcher<D, T>,
    epoch: u64,
) -> Vec<(Vec<usize>, Vec<u32>, Vec<f32>)> {
    b.epoch(epoch)
        .map(|batch| {
            let batch = batch.unwrap();
            let labels = batch.labels.to_vec1::<u32>().unwrap();
            let images = batch.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (batch.indices, labels, images)
        })
        .collect()
}

#[test]
fn shapes_dtypes_and_last_batch() {
    let data = set(45);
    let b = Batcher::new(data.clone(), CifarTransform::train(), cfg(16, false, 2), Device::Cpu).unwrap();
    assert_eq!(b.batches_per_epoch(), 3);
    let batches: Vec<Batch> = b.epoch(0).map(Result::unwrap).collect();
    let sizes: Vec<usize> = batches.iter().map(|b| b.indices.len()).collect();
    assert_eq!(sizes, [16, 16, 13]);
    for batch in &batches {
        let n = batch.indices.len();
        assert_eq!(batch.images.dims(), &[n, 3, 32, 32]);
        assert_eq!(batch.images.dtype(), DType::F32);
        assert_eq!(batch.labels.dims(), &[n]);
        assert_eq!(batch.labels.dtype(), DType::U32);
        assert_eq!(batch.skipped, 0);
        let labels = batch.labels.to_vec1::<u32>().unwrap();
        assert_eq!(labels, batch.indices.iter().map(|&i| data.labels()[i]).collect::<Vec<_>>());
    }
    let dropping = Batcher::new(data, CifarTransform::train(), cfg(16, true, 2), Device::Cpu).unwrap();
    assert_eq!(dropping.batches_per_epoch(), 2);
    let summary = dropping.epoch(0).finish().unwrap();
    assert_eq!((summary.batches, summary.items, summary.skipped), (2, 32, 0));
    assert_eq!(summary.to_string(), "epoch 0: 32 items in 2 batches, 0 skipped");
}

#[test]
fn every_item_once_per_epoch_whatever_the_prefetch() {
    let data = set(103);
    let mut orders = Vec::new();
    for prefetch in [0, 1, 5] {
        let b = Batcher::new(data.clone(), CifarTransform::search(), cfg(10, false, prefetch), Device::Cpu).unwrap();
        let batches = run(&b, 3);
        let order: Vec<usize> = batches.iter().flat_map(|(i, _, _)| i.clone()).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
        orders.push(batches);
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
}

#[test]
fn order_and_augmentation_depend_only_on_seed_and_epoch() {
    let data = set(40);
    let make = |seed| {
        Batcher::new(
            data.clone(),
            CifarTransform::search().with_cutout(8),
            BatchConfig { seed, ..cfg(8, true, 2) },
            Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (make(1), make(1));
    let e0 = run(&a, 0);
    assert_eq!(e0, run(&b, 0));
    let e1 = run(&a, 1);
    assert_ne!(e0.iter().map(|x| &x.0).collect::<Vec<_>>(), e1.iter().map(|x| &x.0).collect::<Vec<_>>());
    assert_ne!(e0, run(&make(2), 0));
    assert_eq!(a.plan(1), e1.iter().map(|x| x.0.clone()).collect::<Vec<_>>());

    // Each item's values are the transform applied with the item's own (seed, epoch, index) stream.
    let t = CifarTransform::search().with_cutout(8);
    let (indices, _, images) = &e1[2];
    for (k, &i) in indices.iter().enumerate() {
        let mut rng = DataRng::derive(&[stream::AUGMENT, 1, 1, i as u64]);
        let expected = t.apply_to_vec(data.image(i), &mut rng);
        assert_eq!(&images[k * 3072..(k + 1) * 3072], expected.as_slice(), "item {i}");
    }

    let sequential = Batcher::new(data, CifarTransform::eval(), BatchConfig::eval(16), Device::Cpu).unwrap();
    assert_eq!(sequential.plan(9), vec![(0..16).collect::<Vec<_>>(), (16..32).collect(), (32..40).collect()]);
}

/// Fails on every index in `bad`.
struct Flaky {
    inner: Arc<InMemory>,
    bad: Vec<usize>,
}

impl Dataset for Flaky {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn label(&self, index: usize) -> u32 {
        self.inner.label(index)
    }
    fn get(&self, index: usize) -> Result<Item<'_>, DataError> {
        if self.bad.contains(&index) {
            return Err(DataError::Dataset(format!("item {index} is broken")));
        }
        self.inner.get(index)
    }
}

#[test]
fn failed_items_are_skipped_counted_and_compacted() {
    let data = set(30);
    // Batches in data-set order: 0..8 loses 1 and 5, 8..16 loses all, 16..24 loses 23.
    let mut bad = vec![1, 5, 23];
    bad.extend(8..16);
    let flaky = Flaky { inner: data.clone(), bad: bad.clone() };
    let config = BatchConfig { batch_size: 8, shuffle: false, drop_last: false, prefetch: 1, seed: 3 };
    let b = Batcher::new(flaky, CifarTransform::eval(), config, Device::Cpu).unwrap();
    let mut epoch = b.epoch(0);
    let batches: Vec<Batch> = epoch.by_ref().map(Result::unwrap).collect();
    let indices: Vec<Vec<usize>> = batches.iter().map(|b| b.indices.clone()).collect();
    assert_eq!(indices, vec![vec![0, 2, 3, 4, 6, 7], (16..23).collect(), (24..30).collect()]);
    assert_eq!(batches.iter().map(|b| b.skipped).collect::<Vec<_>>(), [2, 1, 0]);
    let summary = epoch.summary().unwrap();
    assert_eq!((summary.batches, summary.items, summary.skipped), (3, 19, 11));
    assert_eq!(summary.errors.len(), 11);
    assert_eq!(summary.errors[0], SkippedItem { index: 1, error: "invalid data set: item 1 is broken".into() });
    // Compaction moved the kept items' values to the front.
    let values = batches[0].images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected = CifarTransform::eval().apply_to_vec(data.image(6), &mut DataRng::new(0));
    assert_eq!(&values[4 * 3072..5 * 3072], expected.as_slice());
}

#[test]
fn dropping_an_epoch_early_stops_the_producer() {
    let b = Batcher::new(set(200), CifarTransform::train(), cfg(4, false, 1), Device::Cpu).unwrap();
    let mut epoch = b.epoch(0);
    assert!(epoch.next().unwrap().is_ok());
    drop(epoch); // joins the producer; a hang here fails the test by timeout
    let summary = b.epoch(1).finish().unwrap();
    assert_eq!(summary.items, 200);
}

#[test]
fn settings_are_checked() {
    let err = Batcher::new(set(5), CifarTransform::train(), cfg(0, false, 1), Device::Cpu).unwrap_err();
    assert_eq!(err.to_string(), "invalid setting: batch size must be positive");
    let empty = Batcher::new(
        InMemory::new(vec![], vec![], vec![]).unwrap(),
        CifarTransform::train(),
        cfg(4, false, 1),
        Device::Cpu,
    )
    .unwrap();
    let summary = empty.epoch(0).finish().unwrap();
    assert_eq!((summary.batches, summary.items), (0, 0));
}

#[test]
fn epoch_from_continues_an_epoch_with_the_same_batches() {
    let data = set(50);
    let b = Batcher::new(data, CifarTransform::search(), cfg(8, false, 2), Device::Cpu).unwrap();
    let whole = run(&b, 4);
    let tail: Vec<_> = b
        .epoch_from(4, 3)
        .map(|batch| {
            let batch = batch.unwrap();
            (
                batch.indices,
                batch.labels.to_vec1::<u32>().unwrap(),
                batch.images.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    assert_eq!(whole.len(), 7);
    assert_eq!(tail, whole[3..]);
    assert_eq!(b.epoch_from(4, 99).count(), 0);
}
