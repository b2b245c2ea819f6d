//! Files the workspace writes and reads back: one atomic write, and (feature `serde`) one
//! versioned JSON form for every file format.
//!
//! [`write_atomic`] writes to a temporary file beside the target (`<name>.tmp`), fsyncs it,
//! renames it over the target and fsyncs the directory (on Unix, where a directory can be
//! opened), so a reader finds the old contents or the new ones, never a mix, even after a
//! crash. One writer per path at a time.
//!
//! A [`JsonFile`] type is written by [`write_json`] as a JSON object whose first field is
//! `version`, and read back by [`read_json`], which refuses a version the type does not read
//! before looking at anything else, naming the file, the version found and the versions
//! read. A file without a `version` field reads as version 1: the formats gained the field
//! without another change, so files written before it still read.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a file could not be written or read. Every message names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FileError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },

    /// The contents are not the file's format.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line and column where the parser gives them.
        message: String,
    },

    /// A format version this build does not read (a file of a newer build, say).
    #[error("{path}: format version {found} is not supported (this build reads version {})", list(supported))]
    Version {
        /// The file.
        path: PathBuf,
        /// The version the file says it is.
        found: u64,
        /// The versions this build reads.
        supported: &'static [u64],
    },
}

impl FileError {
    /// The error as found on line `line` of a JSON-lines file.
    pub fn at_line(self, line: usize) -> FileError {
        match self {
            FileError::Format { path, message } => {
                FileError::Format { path, message: format!("line {line}: {message}") }
            }
            other => other,
        }
    }
}

fn list(versions: &[u64]) -> String {
    versions.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io { path: path.to_path_buf(), source }
}

/// Replaces `path` with `contents` atomically (see the module docs). On an error the target
/// is untouched and the temporary file is removed.
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), FileError> {
    let tmp = temporary(path);
    let written = File::create(&tmp)
        .and_then(|mut file| file.write_all(contents.as_ref()).and_then(|()| file.sync_all()))
        .map_err(io_error(&tmp));
    if let Err(err) = written.and_then(|()| commit(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    Ok(())
}

/// The temporary file [`write_atomic`] writes before renaming it to `path`: `<name>.tmp`
/// in the same directory.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Moves a complete file `tmp` (written by the caller, such as a library that writes to a
/// path) to `path`: fsyncs it, renames it over `path` and fsyncs the directory.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), FileError> {
    // Write access, because Windows cannot flush a read-only handle.
    OpenOptions::new().write(true).open(tmp).and_then(|file| file.sync_all()).map_err(io_error(tmp))?;
    fs::rename(tmp, path).map_err(io_error(path))?;
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Makes the renames inside `dir` durable. Only Unix can open a directory to fsync it;
/// elsewhere this does nothing.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    #[cfg(unix)]
    File::open(dir).and_then(|file| file.sync_all()).map_err(io_error(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(feature = "serde")]
pub use self::json::{json_line, parse_json, read_json, to_json_pretty, write_json, JsonFile};

#[cfg(feature = "serde")]
mod json {
    use std::path::Path;

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use super::{io_error, write_atomic, FileError};

    /// A file format: a serde type written as a JSON object with a `version` field first
    /// (the whole file, or each line of a JSON-lines log). The type itself has no `version`
    /// field; [`write_json`] and [`json_line`] add it, [`read_json`] and [`parse_json`]
    /// check it.
    pub trait JsonFile: Serialize + DeserializeOwned {
        /// The version this build writes.
        const VERSION: u64;
        /// The versions this build reads (a file without a `version` field is version 1).
        /// It must hold [`JsonFile::VERSION`].
        const READS: &'static [u64] = &[1];
    }

    #[derive(Serialize)]
    struct Versioned<'a, T> {
        version: u64,
        #[serde(flatten)]
        value: &'a T,
    }

    fn versioned<T: JsonFile>(value: &T) -> Versioned<'_, T> {
        debug_assert!(T::READS.contains(&T::VERSION), "a format reads the version it writes");
        Versioned { version: T::VERSION, value }
    }

    /// Writes `value` to `path` as pretty JSON with its version, atomically.
    pub fn write_json<T: JsonFile>(path: &Path, value: &T) -> Result<(), FileError> {
        let mut text = to_json_pretty(value);
        text.push('\n');
        write_atomic(path, text)
    }

    /// `value` with its version as pretty JSON, as [`write_json`] writes it.
    pub fn to_json_pretty<T: JsonFile>(value: &T) -> String {
        serde_json::to_string_pretty(&versioned(value)).expect("a record of plain fields serialises")
    }

    /// `value` with its version as one line of a JSON-lines log, newline included.
    pub fn json_line<T: JsonFile>(value: &T) -> String {
        let mut line = serde_json::to_string(&versioned(value)).expect("a record of plain fields serialises");
        line.push('\n');
        line
    }

    /// Reads a file [`write_json`] wrote (or one of an older version this build reads).
    pub fn read_json<T: JsonFile>(path: &Path) -> Result<T, FileError> {
        parse_json(path, &std::fs::read_to_string(path).map_err(io_error(path))?)
    }

    /// Parses `text`, the contents of `path` or one line of it, as [`read_json`] does.
    pub fn parse_json<T: JsonFile>(path: &Path, text: &str) -> Result<T, FileError> {
        let format = |message: String| FileError::Format { path: path.to_path_buf(), message };
        // The version first: a newer file may have fields this build rejects.
        let peek: serde_json::Value = serde_json::from_str(text).map_err(|err| format(err.to_string()))?;
        if !peek.is_object() {
            return Err(format(format!("expected a JSON object, found {}", kind(&peek))));
        }
        let found = match peek.get("version") {
            None => 1,
            Some(value) => {
                value.as_u64().ok_or_else(|| format(format!("the `version` field is {value}, not a version number")))?
            }
        };
        if !T::READS.contains(&found) {
            return Err(FileError::Version { path: path.to_path_buf(), found, supported: T::READS });
        }
        serde_json::from_str(text).map_err(|err| format(err.to_string()))
    }

    fn kind(value: &serde_json::Value) -> &'static str {
        match value {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("nas-space-files-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary() {
        let tmp = TempDir::new("replace");
        let path = tmp.0.join("state.json");
        write_atomic(&path, "first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "second");
        assert_eq!(names(&tmp.0), ["state.json"]);
        assert_eq!(temporary(&path), tmp.0.join("state.json.tmp"));
    }

    /// A reader never sees a half-written file: it finds the old contents or the new ones.
    #[test]
    fn a_reader_sees_the_old_or_the_new_contents_never_a_mix() {
        let tmp = TempDir::new("readers");
        let path = tmp.0.join("top.json");
        let len = 1 << 18;
        let (a, b) = (vec![b'a'; len], vec![b'b'; len]);
        write_atomic(&path, &a).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                    let seen = fs::read(&path).unwrap();
                    assert!(seen == a || seen == b, "a read of {} bytes saw a mix", seen.len());
                    reads += 1;
                }
            });
            for k in 0..20 {
                write_atomic(&path, if k % 2 == 0 { &b } else { &a }).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap();
        });
        assert_eq!(fs::read(&path).unwrap(), a);
    }

    /// A write that fails leaves the target as it was and no temporary file; the error
    /// names the file at fault.
    #[test]
    fn a_failed_write_leaves_the_target_and_names_the_path() {
        let tmp = TempDir::new("failed");
        // The rename fails: the target is a directory that is not empty.
        let blocked = tmp.0.join("best.json");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        let err = write_atomic(&blocked, "new contents").unwrap_err();
        assert!(matches!(&err, FileError::Io { path, .. } if *path == blocked), "{err}");
        assert!(err.to_string().contains("best.json"), "{err}");
        assert!(blocked.join("inside").is_dir());
        assert_eq!(names(&tmp.0), ["best.json"], "the temporary file is removed");
        // The temporary file cannot be created: the old contents stay.
        let path = tmp.0.join("run.json");
        write_atomic(&path, "old contents").unwrap();
        fs::create_dir_all(temporary(&path).join("inside")).unwrap();
        let err = write_atomic(&path, "new contents").unwrap_err().to_string();
        assert!(err.contains("run.json.tmp"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "old contents");
        // A directory that does not exist.
        let missing = tmp.0.join("no-such-dir").join("top.json");
        let err = write_atomic(&missing, "x").unwrap_err().to_string();
        assert!(err.contains("no-such-dir") && err.contains("top.json.tmp"), "{err}");
    }

    #[cfg(feature = "serde")]
    mod json {
        use serde::{Deserialize, Serialize};

        use super::*;

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Note {
            text: String,
            count: u64,
        }

        impl JsonFile for Note {
            const VERSION: u64 = 2;
            const READS: &'static [u64] = &[1, 2];
        }

        #[test]
        fn a_json_file_round_trips_with_its_version_first() {
            let tmp = TempDir::new("json");
            let path = tmp.0.join("note.json");
            let note = Note { text: "hello".into(), count: 3 };
            write_json(&path, &note).unwrap();
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("{\n  \"version\": 2,\n  \"text\": \"hello\""), "{text}");
            assert_eq!(read_json::<Note>(&path).unwrap(), note);
        }

        /// A file without a version is version 1; a version not read is refused with the
        /// file, the version and the versions read; so is a version that is not a number.
        #[test]
        fn versions_are_checked_before_the_fields() {
            let tmp = TempDir::new("versions");
            let path = tmp.0.join("note.json");
            fs::write(&path, r#"{"text": "old", "count": 1}"#).unwrap();
            assert_eq!(read_json::<Note>(&path).unwrap(), Note { text: "old".into(), count: 1 });
            fs::write(&path, r#"{"version": 3, "a_field_of_version_3": []}"#).unwrap();
            let err = read_json::<Note>(&path).unwrap_err();
            assert!(matches!(err, FileError::Version { found: 3, .. }), "{err}");
            let message = err.to_string();
            assert!(
                message.contains("note.json: format version 3 is not supported (this build reads version 1, 2)"),
                "{message}"
            );
            fs::write(&path, r#"{"version": "two", "text": "x", "count": 1}"#).unwrap();
            let err = read_json::<Note>(&path).unwrap_err().to_string();
            assert!(err.contains("note.json") && err.contains("\"two\""), "{err}");
            fs::write(&path, r#"{"version": 2, "text": "x"}"#).unwrap();
            let err = read_json::<Note>(&path).unwrap_err().to_string();
            assert!(err.contains("note.json") && err.contains("missing field `count`"), "{err}");
            fs::write(&path, r#"["a", "list"]"#).unwrap();
            let err = read_json::<Note>(&path).unwrap_err().to_string();
            assert!(err.contains("note.json: expected a JSON object, found an array"), "{err}");
            let err = read_json::<Note>(&tmp.0.join("absent.json")).unwrap_err().to_string();
            assert!(err.contains("absent.json"), "{err}");
        }

        #[test]
        fn a_json_line_is_one_versioned_line() {
            let note = Note { text: "a\nb".into(), count: 4 };
            let line = json_line(&note);
            assert_eq!(line, "{\"version\":2,\"text\":\"a\\nb\",\"count\":4}\n");
            let path = Path::new("log.jsonl");
            assert_eq!(parse_json::<Note>(path, &line).unwrap(), note);
            let err = parse_json::<Note>(path, r#"{"version":9}"#).unwrap_err().to_string();
            assert!(err.contains("log.jsonl: format version 9"), "{err}");
        }
    }
}
