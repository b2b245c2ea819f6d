use std::fs;
use std::path::{Path, PathBuf};

use super::{pattern_image, TempDir};
use crate::*;

/// The planar bytes of a CIFAR image with a distinct value per channel and position.
fn planes(salt: usize) -> Vec<u8> {
    (0..3).flat_map(|c| (0..1024).map(move |p| ((p * 3 + c * 85 + salt * 7) % 256) as u8)).collect()
}

/// Writes a CIFAR-10 batch file with `n` records, labels `(first + i) % 10`.
fn write_batch(path: &Path, first: usize, n: usize) {
    let mut bytes = Vec::new();
    for i in first..first + n {
        bytes.push((i % 10) as u8);
        bytes.extend(planes(i));
    }
    fs::write(path, bytes).unwrap();
}

/// A CIFAR-10 folder with `per_file` records in each training batch and 4 test records.
fn write_cifar10_dir(dir: &Path, per_file: usize) {
    for (k, name) in CIFAR10_TRAIN_FILES.iter().enumerate() {
        write_batch(&dir.join(name), k * per_file, per_file);
    }
    write_batch(&dir.join(CIFAR10_TEST_FILE), 1000, 4);
}

fn file_of(err: &DataError) -> PathBuf {
    match err {
        DataError::Missing { path, .. }
        | DataError::RecordSize { path, .. }
        | DataError::RecordCount { path, .. }
        | DataError::Empty { path, .. }
        | DataError::Label { path, .. }
        | DataError::Layout { path, .. } => path.clone(),
        other => panic!("error names no file: {other}"),
    }
}

#[test]
fn cifar10_reads_planes_into_interleaved_pixels() {
    let tmp = TempDir::new("c10");
    write_cifar10_dir(tmp.path(), 3);
    let data = read_cifar10(tmp.path()).unwrap();
    assert_eq!(data.train.len(), 15);
    assert_eq!(data.test.len(), 4);
    assert_eq!(data.train.class_names(), CIFAR10_CLASSES.map(String::from));
    // Files are read in order 1..5: item 7 is record 1 of data_batch_3.bin.
    assert_eq!(data.train.labels()[7], 7);
    assert_eq!(data.test.labels(), &[0, 1, 2, 3]);
    let img = data.train.image(7);
    assert_eq!((img.width, img.height), (32, 32));
    let p = planes(7);
    for (x, y) in [(0, 0), (31, 0), (5, 17), (31, 31)] {
        let i = y * 32 + x;
        assert_eq!(img.pixel(x as u32, y as u32), [p[i], p[1024 + i], p[2048 + i]], "pixel ({x}, {y})");
    }
}

#[test]
fn cifar10_finds_the_tarball_folder_and_reads_the_meta_names() {
    let tmp = TempDir::new("c10-sub");
    let sub = tmp.path().join("cifar-10-batches-bin");
    fs::create_dir(&sub).unwrap();
    write_cifar10_dir(&sub, 2);
    let names: Vec<String> = (0..10).map(|i| format!("thing{i}")).collect();
    fs::write(sub.join("batches.meta.txt"), names.join("\n") + "\n\n").unwrap();
    let data = read_cifar10(tmp.path()).unwrap();
    assert_eq!(data.train.len(), 10);
    assert_eq!(data.train.class_names(), names.as_slice());
}

#[test]
fn cifar10_missing_file_is_named() {
    let tmp = TempDir::new("c10-missing");
    write_cifar10_dir(tmp.path(), 2);
    fs::remove_file(tmp.path().join("data_batch_3.bin")).unwrap();
    let err = read_cifar10(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert_eq!(file_of(&err), tmp.path().join("data_batch_3.bin"));
    let msg = err.to_string();
    assert!(msg.contains("data_batch_3.bin: not found") && msg.contains("CIFAR-10"), "{msg}");
}

#[test]
fn cifar10_truncated_file_names_file_and_sizes() {
    let tmp = TempDir::new("c10-trunc");
    write_cifar10_dir(tmp.path(), 2);
    let path = tmp.path().join("data_batch_2.bin");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = read_cifar10(tmp.path()).unwrap_err();
    assert_eq!(file_of(&err), path);
    assert_eq!(err.to_string(), format!("{}: 6,046 bytes is not a whole number of 3,073-byte records", path.display()));
}

#[test]
fn record_size_message_matches_the_documented_form() {
    let err = DataError::RecordSize { path: "data_batch_3.bin".into(), len: 30_000_000, record: 3073 };
    assert_eq!(err.to_string(), "data_batch_3.bin: 30,000,000 bytes is not a whole number of 3,073-byte records");
}

#[test]
fn cifar10_batch_cut_at_a_record_boundary_is_caught() {
    let tmp = TempDir::new("c10-short");
    write_cifar10_dir(tmp.path(), 4);
    // Two whole records short: a plain size check would accept it.
    write_batch(&tmp.path().join("data_batch_4.bin"), 0, 2);
    let err = read_cifar10(tmp.path()).unwrap_err();
    assert_eq!(file_of(&err), tmp.path().join("data_batch_4.bin"));
    assert!(err.to_string().ends_with("data_batch_4.bin: 2 records, expected 4"), "{err}");
}

#[test]
fn cifar10_empty_file_and_bad_label_are_named() {
    let tmp = TempDir::new("c10-empty");
    write_cifar10_dir(tmp.path(), 2);
    fs::write(tmp.path().join(CIFAR10_TEST_FILE), b"").unwrap();
    let err = read_cifar10(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("test_batch.bin: empty file"), "{err}");

    let path = tmp.path().join(CIFAR10_TEST_FILE);
    let mut bytes = Vec::new();
    for label in [3u8, 10u8] {
        bytes.push(label);
        bytes.extend(planes(0));
    }
    fs::write(&path, bytes).unwrap();
    let err = read_cifar10(tmp.path()).unwrap_err();
    assert_eq!(err.to_string(), format!("{}: record 1 has class label 10, expected below 10", path.display()));
}

#[test]
fn cifar10_meta_with_wrong_name_count_is_an_error() {
    let tmp = TempDir::new("c10-meta");
    write_cifar10_dir(tmp.path(), 1);
    fs::write(tmp.path().join("batches.meta.txt"), "a\nb\nc\n").unwrap();
    let err = read_cifar10(tmp.path()).unwrap_err();
    assert!(err.to_string().ends_with("batches.meta.txt: 3 class names, expected 10"), "{err}");
}

/// Writes a CIFAR-100 file whose record `i` has coarse label `i % 20` and fine label `(i * 7) % 100`.
fn write_cifar100_file(path: &Path, n: usize) {
    let mut bytes = Vec::new();
    for i in 0..n {
        bytes.push((i % 20) as u8);
        bytes.push(((i * 7) % 100) as u8);
        bytes.extend(planes(i));
    }
    fs::write(path, bytes).unwrap();
}

#[test]
fn cifar100_fine_and_coarse_labels() {
    let tmp = TempDir::new("c100");
    let sub = tmp.path().join("cifar-100-binary");
    fs::create_dir(&sub).unwrap();
    write_cifar100_file(&sub.join("train.bin"), 30);
    write_cifar100_file(&sub.join("test.bin"), 5);
    let fine = read_cifar100(tmp.path(), Cifar100Labels::Fine).unwrap();
    let coarse = read_cifar100(tmp.path(), Cifar100Labels::Coarse).unwrap();
    assert_eq!(fine.train.len(), 30);
    assert_eq!(fine.test.len(), 5);
    assert_eq!(fine.train.labels(), (0..30).map(|i| (i * 7 % 100) as u32).collect::<Vec<_>>());
    assert_eq!(coarse.train.labels(), (0..30).map(|i| (i % 20) as u32).collect::<Vec<_>>());
    assert_eq!(fine.train.num_classes(), 100);
    assert_eq!(coarse.train.num_classes(), 20);
    assert_eq!(fine.train.class_names()[42], "fine_42");
    assert_eq!(coarse.train.class_names()[3], "coarse_03");
    // The pixels start after both label bytes.
    let p = planes(29);
    assert_eq!(fine.train.image(29).pixel(1, 0), [p[1], p[1025], p[2049]]);
    assert_eq!(fine.train.images(), coarse.train.images());

    let names: Vec<String> = (0..20).map(|i| format!("super{i}")).collect();
    fs::write(sub.join("coarse_label_names.txt"), names.join("\n")).unwrap();
    let named = read_cifar100(&sub, Cifar100Labels::Coarse).unwrap();
    assert_eq!(named.train.class_names(), names.as_slice());
}

#[test]
fn cifar100_errors_name_the_file_and_the_label_kind() {
    let tmp = TempDir::new("c100-bad");
    write_cifar100_file(&tmp.path().join("train.bin"), 3);
    let err = read_cifar100(tmp.path(), Cifar100Labels::Fine).unwrap_err();
    assert_eq!(file_of(&err), tmp.path().join("test.bin"));

    // A CIFAR-10 batch in place of a CIFAR-100 file: 10 records of 3,073 bytes.
    write_batch(&tmp.path().join("test.bin"), 0, 10);
    let err = read_cifar100(tmp.path(), Cifar100Labels::Fine).unwrap_err();
    assert!(err.to_string().ends_with("test.bin: 30,730 bytes is not a whole number of 3,074-byte records"), "{err}");

    let mut bytes = vec![0u8, 100u8];
    bytes.extend(planes(0));
    fs::write(tmp.path().join("test.bin"), &bytes).unwrap();
    let err = read_cifar100(tmp.path(), Cifar100Labels::Coarse).unwrap_err();
    assert!(err.to_string().ends_with("test.bin: record 0 has fine label 100, expected below 100"), "{err}");
    bytes[0] = 20;
    bytes[1] = 5;
    fs::write(tmp.path().join("test.bin"), &bytes).unwrap();
    let err = read_cifar100(tmp.path(), Cifar100Labels::Fine).unwrap_err();
    assert!(err.to_string().ends_with("test.bin: record 0 has coarse label 20, expected below 20"), "{err}");
}

#[test]
fn writer_round_trips_through_the_reader() {
    let data = SyntheticConfig::new(3).train_test(23, 7);
    let tmp = TempDir::new("c10-write");
    write_cifar10_binary(tmp.path(), &data.train, &data.test).unwrap();
    // 23 items: 5, 5, 5, 4, 4 records.
    let sizes: Vec<u64> =
        CIFAR10_TRAIN_FILES.iter().map(|f| fs::metadata(tmp.path().join(f)).unwrap().len() / 3073).collect();
    assert_eq!(sizes, [5, 5, 5, 4, 4]);
    let back = read_cifar10(tmp.path()).unwrap();
    assert_eq!(back.train, data.train);
    assert_eq!(back.test, data.test);
    assert_eq!(back.train.class_names(), SYNTHETIC_CLASSES.map(String::from));
    let (images, labels) = read_cifar10_file(tmp.path().join("data_batch_2.bin")).unwrap();
    assert_eq!(images.as_slice(), &data.train.images()[5..10]);
    assert_eq!(labels.as_slice(), &data.train.labels()[5..10]);
}

#[test]
fn writer_pads_names_and_rejects_what_cifar_cannot_hold() {
    let tmp = TempDir::new("c10-write-bad");
    let three = |size: u32, n: usize| {
        let images = (0..n).map(|i| pattern_image(size, size, i as u32)).collect();
        InMemory::new(images, (0..n).map(|i| (i % 3) as u32).collect(), vec!["a".into(), "b".into(), "c".into()])
            .unwrap()
    };
    write_cifar10_binary(tmp.path(), &three(32, 5), &three(32, 1)).unwrap();
    let back = read_cifar10(tmp.path()).unwrap();
    assert_eq!(back.train.class_names()[..4], ["a", "b", "c", "unused_3"].map(String::from));
    assert_eq!(back.train.image(4), &pattern_image(32, 32, 4));

    let err = write_cifar10_binary(tmp.path(), &three(16, 5), &three(32, 1)).unwrap_err();
    assert_eq!(err.to_string(), "invalid setting: the training set has a 16x16 image, CIFAR-10 holds 32x32");
    let err = write_cifar10_binary(tmp.path(), &three(32, 4), &three(32, 1)).unwrap_err();
    assert!(err.to_string().contains("at least 5 training and 1 test item, got 4 and 1"), "{err}");
    let many =
        InMemory::new(vec![pattern_image(32, 32, 0)], vec![11], (0..12).map(|i| i.to_string()).collect()).unwrap();
    let err = write_cifar10_binary(tmp.path(), &three(32, 5), &many).unwrap_err();
    assert!(err.to_string().contains("the test set has 12 classes"), "{err}");
}
