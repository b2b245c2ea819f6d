//! CIFAR-10 and CIFAR-100 in their binary distribution format, read and written.
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`,
//! each a sequence of 3,073-byte records: one label byte, then 3,072 pixel bytes (1,024 red, 1,024 green,
//! 1,024 blue, each plane row-major 32×32); class names in `batches.meta.txt`, one a line.
//! CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, 3,074-byte records: coarse label byte,
//! fine label byte, then the same 3,072 pixel bytes; names in `coarse_label_names.txt` and
//! `fine_label_names.txt`.
//!
//! The readers accept the folder itself or its parent (the folder the tarball was unpacked in).
//! They check that every file is present, non-empty and a whole number of records, that the five
//! training batches hold equal counts (the writer's counts differ by at most one, the official files by
//! none), and that every label is in range; each error names the file.
//! A shorter official batch (e.g. a download cut at a record boundary) is thus reported too.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::{DataError, Dataset, Image, InMemory, TrainTest};

/// Side of a CIFAR image in pixels.
pub const CIFAR_SIDE: u32 = 32;

/// Pixel bytes of one CIFAR image (3 planes of 32×32).
pub const CIFAR_PIXEL_BYTES: usize = 3 * 32 * 32;

/// The CIFAR-10 class names, in label order, used when `batches.meta.txt` is absent.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The CIFAR-10 training files, in order.
pub const CIFAR10_TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];

/// The CIFAR-10 test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// Which of CIFAR-100's two labels becomes an item's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cifar100Labels {
    /// The 100 fine classes (the usual benchmark).
    Fine,
    /// The 20 coarse superclasses.
    Coarse,
}

/// The record layout of one CIFAR variant.
#[derive(Debug, Clone, Copy)]
struct Format {
    /// Label bytes before the pixels.
    label_bytes: usize,
    /// Which label byte is the item's label.
    label_at: usize,
    /// Number of classes of each label byte, and their names in messages.
    classes: &'static [(usize, &'static str)],
}

impl Format {
    fn record(&self) -> usize {
        self.label_bytes + CIFAR_PIXEL_BYTES
    }
}

const CIFAR10: Format = Format { label_bytes: 1, label_at: 0, classes: &[(10, "class")] };

fn cifar100(labels: Cifar100Labels) -> Format {
    Format {
        label_bytes: 2,
        label_at: match labels {
            Cifar100Labels::Coarse => 0,
            Cifar100Labels::Fine => 1,
        },
        classes: &[(20, "coarse"), (100, "fine")],
    }
}

/// Reads the CIFAR-10 binary distribution from `dir` (or from `dir/cifar-10-batches-bin`):
/// 50,000 training images from the five batches, in file order, and the 10,000 test images.
pub fn read_cifar10(dir: impl AsRef<Path>) -> Result<TrainTest<InMemory>, DataError> {
    let dir = locate(dir.as_ref(), "cifar-10-batches-bin", CIFAR10_TRAIN_FILES[0]);
    let what = "a CIFAR-10 binary batch, one of data_batch_1..5.bin and test_batch.bin";
    let mut train_images = Vec::new();
    let mut train_labels = Vec::new();
    let mut first_count = None;
    for name in CIFAR10_TRAIN_FILES {
        let path = dir.join(name);
        let (images, labels) = read_file(&path, CIFAR10, what)?;
        // The five batches hold equal counts; the writer lets them differ by one.
        let first = *first_count.get_or_insert(images.len());
        if images.len() > first || images.len() + 1 < first {
            return Err(DataError::RecordCount { path, found: images.len(), expected: first });
        }
        train_images.extend(images);
        train_labels.extend(labels);
    }
    let (test_images, test_labels) = read_file(&dir.join(CIFAR10_TEST_FILE), CIFAR10, what)?;
    let names = match read_names(&dir.join("batches.meta.txt"))? {
        Some(names) if names.len() == 10 => names,
        Some(names) => {
            return Err(DataError::Layout {
                path: dir.join("batches.meta.txt"),
                reason: format!("{} class names, expected 10", names.len()),
            })
        }
        None => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
    };
    Ok(TrainTest {
        train: InMemory::new(train_images, train_labels, names.clone())?,
        test: InMemory::new(test_images, test_labels, names)?,
    })
}

/// Reads the CIFAR-100 binary distribution from `dir` (or from `dir/cifar-100-binary`), with the
/// fine or the coarse label as each item's label.
pub fn read_cifar100(dir: impl AsRef<Path>, labels: Cifar100Labels) -> Result<TrainTest<InMemory>, DataError> {
    let dir = locate(dir.as_ref(), "cifar-100-binary", "train.bin");
    let format = cifar100(labels);
    let what = "a CIFAR-100 binary file, train.bin or test.bin";
    let (train_images, train_labels) = read_file(&dir.join("train.bin"), format, what)?;
    let (test_images, test_labels) = read_file(&dir.join("test.bin"), format, what)?;
    let (names_file, n, prefix) = match labels {
        Cifar100Labels::Fine => ("fine_label_names.txt", 100, "fine"),
        Cifar100Labels::Coarse => ("coarse_label_names.txt", 20, "coarse"),
    };
    let names = match read_names(&dir.join(names_file))? {
        Some(names) if names.len() == n => names,
        Some(names) => {
            return Err(DataError::Layout {
                path: dir.join(names_file),
                reason: format!("{} class names, expected {n}", names.len()),
            })
        }
        None => (0..n).map(|i| format!("{prefix}_{i:02}")).collect(),
    };
    Ok(TrainTest {
        train: InMemory::new(train_images, train_labels, names.clone())?,
        test: InMemory::new(test_images, test_labels, names)?,
    })
}

/// Reads one CIFAR-10 batch file (any number of records): its images and labels.
pub fn read_cifar10_file(path: impl AsRef<Path>) -> Result<(Vec<Image>, Vec<u32>), DataError> {
    read_file(path.as_ref(), CIFAR10, "a CIFAR-10 binary batch")
}

/// Uses `dir/sub` when `dir` lacks `probe` but `dir/sub` has it (the tarball's own folder).
fn locate(dir: &Path, sub: &str, probe: &str) -> PathBuf {
    if !dir.join(probe).exists() && dir.join(sub).join(probe).exists() {
        dir.join(sub)
    } else {
        dir.to_path_buf()
    }
}

fn read_file(path: &Path, format: Format, what: &str) -> Result<(Vec<Image>, Vec<u32>), DataError> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing { path: path.to_path_buf(), what: what.to_string() },
        _ => DataError::io(path, e),
    })?;
    let record = format.record();
    if bytes.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf(), record });
    }
    if bytes.len() % record != 0 {
        return Err(DataError::RecordSize { path: path.to_path_buf(), len: bytes.len() as u64, record });
    }
    let mut labels = Vec::with_capacity(bytes.len() / record);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        for (b, &(classes, kind)) in format.classes.iter().enumerate() {
            let label = rec[b] as u32;
            if label as usize >= classes {
                return Err(DataError::Label { path: path.to_path_buf(), record: i, kind, label, classes });
            }
        }
        labels.push(rec[format.label_at] as u32);
    }
    let images = bytes.par_chunks_exact(record).map(|rec| planar_to_image(&rec[format.label_bytes..])).collect();
    Ok((images, labels))
}

/// 3 planes of 32×32 (R, G, B) to an interleaved image.
fn planar_to_image(planes: &[u8]) -> Image {
    let n = (CIFAR_SIDE * CIFAR_SIDE) as usize;
    let (r, rest) = planes.split_at(n);
    let (g, b) = rest.split_at(n);
    let mut pixels = Vec::with_capacity(3 * n);
    for i in 0..n {
        pixels.extend_from_slice(&[r[i], g[i], b[i]]);
    }
    Image { width: CIFAR_SIDE, height: CIFAR_SIDE, pixels }
}

/// Non-empty trimmed lines of a names file, or `None` when the file is absent.
fn read_names(path: &Path) -> Result<Option<Vec<String>>, DataError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataError::io(path, e)),
    }
}

/// Writes `train` and `test` in the CIFAR-10 binary format into `dir` (created if needed):
/// `data_batch_1.bin` .. `data_batch_5.bin` (the training items in order, split into five files whose
/// counts differ by at most one, the larger first), `test_batch.bin`, and `batches.meta.txt` with the
/// class names (padded to ten lines with `unused_N`).
///
/// Images must be 32×32, labels below 10, with at least 5 training and 1 test item, so that
/// [`read_cifar10`] reads the files back.
pub fn write_cifar10_binary(dir: impl AsRef<Path>, train: &InMemory, test: &InMemory) -> Result<(), DataError> {
    let dir = dir.as_ref();
    for (set, name) in [(train, "training"), (test, "test")] {
        if set.num_classes() > 10 {
            return Err(DataError::Config(format!(
                "the {name} set has {} classes, CIFAR-10 holds 10",
                set.num_classes()
            )));
        }
        if let Some(img) = set.images().iter().find(|img| img.width != CIFAR_SIDE || img.height != CIFAR_SIDE) {
            return Err(DataError::Config(format!(
                "the {name} set has a {}x{} image, CIFAR-10 holds 32x32",
                img.width, img.height
            )));
        }
    }
    if train.len() < 5 || test.is_empty() {
        return Err(DataError::Config(format!(
            "CIFAR-10 files need at least 5 training and 1 test item, got {} and {}",
            train.len(),
            test.len()
        )));
    }
    fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let (base, extra) = (train.len() / 5, train.len() % 5);
    let mut start = 0;
    for (i, name) in CIFAR10_TRAIN_FILES.iter().enumerate() {
        let count = base + usize::from(i < extra);
        write_records(&dir.join(name), train, start..start + count)?;
        start += count;
    }
    write_records(&dir.join(CIFAR10_TEST_FILE), test, 0..test.len())?;
    let mut names: Vec<String> = train.class_names().to_vec();
    names.extend((names.len()..10).map(|i| format!("unused_{i}")));
    let meta = dir.join("batches.meta.txt");
    fs::write(&meta, names.join("\n") + "\n").map_err(|e| DataError::io(&meta, e))
}

fn write_records(path: &Path, set: &InMemory, range: std::ops::Range<usize>) -> Result<(), DataError> {
    let file = fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut out = BufWriter::new(file);
    let mut record = vec![0u8; CIFAR10.record()];
    let n = (CIFAR_SIDE * CIFAR_SIDE) as usize;
    for i in range {
        record[0] = set.labels()[i] as u8;
        for (p, px) in set.image(i).pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                record[1 + c * n + p] = px[c];
            }
        }
        out.write_all(&record).map_err(|e| DataError::io(path, e))?;
    }
    out.flush().map_err(|e| DataError::io(path, e))
}
