//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, writing, splitting or batching data.
///
/// Errors about a file always name the file (its full path) and, for size problems,
/// what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder the reader needs is absent.
    #[error("{}: not found (expected {what})", path.display())]
    Missing { path: PathBuf, what: String },

    /// Reading or writing a file failed for another reason.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A CIFAR file is empty or not a whole number of records.
    #[error("{}: {} is not a whole number of {}-byte records", path.display(), bytes(*len), thousands(*record as u64))]
    RecordSize { path: PathBuf, len: u64, record: usize },

    /// A CIFAR file holds no record at all.
    #[error("{}: empty file, expected {}-byte records", path.display(), thousands(*record as u64))]
    Empty { path: PathBuf, record: usize },

    /// A CIFAR file holds a different number of records than its format prescribes.
    #[error("{}: {} records, expected {}", path.display(), thousands(*found as u64), thousands(*expected as u64))]
    RecordCount { path: PathBuf, found: usize, expected: usize },

    /// A CIFAR record carries a label outside the class range.
    #[error("{}: record {record} has {kind} label {label}, expected below {classes}", path.display())]
    Label { path: PathBuf, record: usize, kind: &'static str, label: u32, classes: usize },

    /// An image file could not be decoded.
    #[error("{}: cannot decode image: {source}", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// An image file could not be encoded or written.
    #[error("{}: cannot encode image: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// A folder or a recorded file does not have the layout a reader expects.
    #[error("{}: {reason}", path.display())]
    Layout { path: PathBuf, reason: String },

    /// A pixel buffer does not match the image size it claims.
    #[error("pixel buffer of {len} bytes does not match a {width}x{height} RGB image ({} bytes)", *width as usize * *height as usize * 3)]
    ImageSize { width: u32, height: u32, len: usize },

    /// Images, labels and class names of a data set do not agree.
    #[error("invalid data set: {0}")]
    Dataset(String),

    /// A split cannot be made or does not fit the data set it is applied to.
    #[error("invalid split: {0}")]
    Split(String),

    /// A setting is out of range (batch size zero, crop larger than the image, ...).
    #[error("invalid setting: {0}")]
    Config(String),

    /// A JSON file (a recorded split) could not be read or written.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A file could not be written atomically.
    #[error(transparent)]
    File(#[from] nas_space::files::FileError),

    /// Making a tensor failed (only the batcher makes tensors).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> DataError {
        DataError::Io { path: path.into(), source }
    }
}

/// `30,000,000 bytes`, `1 byte`.
fn bytes(n: u64) -> String {
    if n == 1 {
        "1 byte".to_string()
    } else {
        format!("{} bytes", thousands(n))
    }
}

/// Formats an integer with comma thousands separators: `30730000` -> `30,730,000`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
