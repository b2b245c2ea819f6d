//! ImageNet-style image folders, decoded on demand.
//!
//! Layout: `root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG`. Class names are the names of
//! the class folders, sorted (byte order), and a class's label is its position in that order; the
//! validation folder uses the training folder's labels. Files ending in `.jpeg`, `.jpg` or `.png`
//! (any case) are images; other files, hidden entries and deeper folders are ignored. The format is
//! guessed from the file's content, so a PNG named `.JPEG` decodes too.
//!
//! Nothing is decoded when a folder is opened: [`Dataset::get`] decodes one file, and the batcher
//! decodes a batch in parallel with rayon. A file that cannot be read or decoded is an error for that
//! item only; the batcher skips it and counts it in its epoch summary.
//! Every image comes out as 8-bit RGB whatever its size and colour mode: grey, grey with alpha,
//! RGBA and 16-bit PNGs are converted and CMYK/YCCK JPEGs are converted by the decoder; alpha is dropped.
//! EXIF orientation is ignored, as TensorFlow's `decode_jpeg` ignores it.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, Image, Item, TrainTest};

/// A folder of class folders of image files; decodes on demand.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    dir: PathBuf,
    files: Vec<PathBuf>,
    labels: Vec<u32>,
    class_names: Vec<String>,
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["jpeg", "jpg", "png"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// The names of the visible subfolders of `dir`, sorted.
fn class_folders(dir: &Path) -> Result<Vec<String>, DataError> {
    let entries = fs::read_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing {
            path: dir.to_path_buf(),
            what: "a folder of class folders (<class>/*.JPEG)".to_string(),
        },
        _ => DataError::io(dir, e),
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(String::from) else {
            return Err(DataError::Layout { path, reason: "class folder name is not UTF-8".to_string() });
        };
        if !is_hidden(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The image files directly in `dir`, sorted.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_str().is_some_and(is_hidden);
        if !hidden && is_image_file(&path) && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

impl ImageFolder {
    /// Scans `dir/<class>/*`: one class per subfolder, sorted names as labels.
    pub fn open(dir: impl AsRef<Path>) -> Result<ImageFolder, DataError> {
        let dir = dir.as_ref();
        let class_names = class_folders(dir)?;
        if class_names.is_empty() {
            return Err(DataError::Layout {
                path: dir.to_path_buf(),
                reason: "no class folders (expected <class>/*.JPEG)".to_string(),
            });
        }
        ImageFolder::scan(dir, &class_names, class_names.clone())
    }

    /// Scans `dir/<class>/*` with labels taken from `class_names` (the training folder's classes);
    /// a class folder not among them is an error, a missing one is allowed.
    pub fn open_with_classes(dir: impl AsRef<Path>, class_names: &[String]) -> Result<ImageFolder, DataError> {
        let dir = dir.as_ref();
        let present = class_folders(dir)?;
        if let Some(unknown) = present.iter().find(|c| !class_names.contains(c)) {
            return Err(DataError::Layout {
                path: dir.join(unknown),
                reason: "class folder is not among the training classes".to_string(),
            });
        }
        ImageFolder::scan(dir, &present, class_names.to_vec())
    }

    /// Opens `root/train` and `root/val` (the validation folder with the training folder's labels).
    pub fn open_imagenet(root: impl AsRef<Path>) -> Result<TrainTest<ImageFolder>, DataError> {
        let root = root.as_ref();
        let train = ImageFolder::open(root.join("train"))?;
        let test = ImageFolder::open_with_classes(root.join("val"), train.class_names())?;
        Ok(TrainTest { train, test })
    }

    fn scan(dir: &Path, present: &[String], class_names: Vec<String>) -> Result<ImageFolder, DataError> {
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for name in present {
            let label = class_names.iter().position(|c| c == name).expect("present classes are known") as u32;
            let found = image_files(&dir.join(name))?;
            labels.extend(std::iter::repeat_n(label, found.len()));
            files.extend(found);
        }
        if files.is_empty() {
            return Err(DataError::Layout {
                path: dir.to_path_buf(),
                reason: "no image files (.JPEG, .jpg, .png) in any class folder".to_string(),
            });
        }
        Ok(ImageFolder { dir: dir.to_path_buf(), files, labels, class_names })
    }

    /// The scanned folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of item `index`. Panics if out of range.
    pub fn path(&self, index: usize) -> &Path {
        &self.files[index]
    }

    /// How many items each class has, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// Decodes an image file of any supported format, size and colour mode to 8-bit RGB.
pub fn decode_image(path: impl AsRef<Path>) -> Result<Image, DataError> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = reader.with_guessed_format().map_err(|e| DataError::io(path, e))?;
    let img = reader.decode().map_err(|source| DataError::Decode { path: path.to_path_buf(), source })?;
    Ok(Image::from_dynamic(img))
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn label(&self, index: usize) -> u32 {
        self.labels[index]
    }
    fn get(&self, index: usize) -> Result<Item<'_>, DataError> {
        Ok(Item { image: Cow::Owned(decode_image(&self.files[index])?), label: self.labels[index] })
    }
}
