//! Saving and restoring a strategy, atomically.
//!
//! A saved strategy is a directory holding:
//! - `strategy.json`, the commit point: format tag and version, the strategy's whole
//!   state except tensors, and the name and FNV-1a hash of its weights file;
//! - for the controller strategies, `strategy-weights-<nonce>.safetensors`: the LSTM
//!   weights and the Adam moments.
//!
//! A save writes the weights under a name no earlier save used, then writes the JSON to
//! a temporary file and renames it over `strategy.json`, and only then deletes the
//! weights files the new JSON does not name. A kill at any moment therefore leaves
//! `strategy.json` naming a complete weights file: the old state or the new one, never a
//! mix. Files are fsynced before each rename, and the directory after it
//! (`nas_space::files`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use nas_space::{files, fnv1a, Combine, Op, SearchSpace};
use serde::{Deserialize, Serialize};

use crate::evolution::EvolutionState;
use crate::ppo::PolicyState;
use crate::random::RandomState;
use crate::ControllerError;

/// The commit-point file of a saved strategy.
pub const STATE_FILE: &str = "strategy.json";

/// The `format` tag of [`STATE_FILE`].
pub const STATE_FORMAT: &str = "nas-controller/strategy";

/// The state format version this build writes and reads.
pub const STATE_VERSION: u64 = 1;

const WEIGHTS_PREFIX: &str = "strategy-weights-";
const WEIGHTS_SUFFIX: &str = ".safetensors";

/// A search space in a form serde can write (`SearchSpace` itself has no serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SpaceDef {
    pub(crate) num_blocks: usize,
    pub(crate) ops: Vec<Op>,
    pub(crate) combines: Vec<Combine>,
}

impl From<&SearchSpace> for SpaceDef {
    fn from(space: &SearchSpace) -> SpaceDef {
        SpaceDef { num_blocks: space.num_blocks, ops: space.ops.clone(), combines: space.combines.clone() }
    }
}

impl From<&SpaceDef> for SearchSpace {
    fn from(def: &SpaceDef) -> SearchSpace {
        SearchSpace { num_blocks: def.num_blocks, ops: def.ops.clone(), combines: def.combines.clone() }
    }
}

/// The state of any strategy, tagged by kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum SavedState {
    /// PPO or REINFORCE controller.
    Policy(Box<PolicyState>),
    /// Random search.
    Random(RandomState),
    /// Regularized evolution.
    Evolution(EvolutionState),
}

/// The weights file a state belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WeightsRef {
    file: String,
    fnv1a: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u64,
    weights: Option<WeightsRef>,
    state: SavedState,
}

/// A name no earlier save of this process (or, by the clock, of another) used.
fn fresh_weights_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{WEIGHTS_PREFIX}{nanos:x}-{:x}-{count}{WEIGHTS_SUFFIX}", std::process::id())
}

/// Writes `state` (and `tensors`, if any) into `dir` atomically; see the module docs.
pub(crate) fn save(
    dir: &Path,
    state: SavedState,
    tensors: Option<HashMap<String, Tensor>>,
) -> Result<(), ControllerError> {
    fs::create_dir_all(dir).map_err(|e| ControllerError::io(dir, e))?;
    let weights = match tensors {
        Some(tensors) => {
            let file = fresh_weights_name();
            let path = dir.join(&file);
            let tmp = files::temporary(&path);
            candle_core::safetensors::save(&tensors, &tmp)?;
            let bytes = fs::read(&tmp).map_err(|e| ControllerError::io(&tmp, e))?;
            files::commit(&tmp, &path)?;
            Some(WeightsRef { file, fnv1a: format!("{:016x}", fnv1a(&bytes)) })
        }
        None => None,
    };
    let keep = weights.as_ref().map(|w| w.file.clone());
    let file = StateFile { format: STATE_FORMAT.into(), version: STATE_VERSION, weights, state };
    let mut json = serde_json::to_string_pretty(&file).expect("a strategy state always serializes");
    json.push('\n');
    files::write_atomic(&dir.join(STATE_FILE), json)?;
    // Committed; now drop the weights files of earlier saves (best effort).
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(WEIGHTS_PREFIX) && Some(&name) != keep.as_ref() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// The state file of `dir`.
pub(crate) fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Reads what [`save`] wrote: the state and, for the controller strategies, its tensors
/// (on the CPU).
pub(crate) fn load(dir: &Path) -> Result<(SavedState, Option<HashMap<String, Tensor>>), ControllerError> {
    let path = state_path(dir);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ControllerError::MissingState { dir: dir.to_path_buf(), path });
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(ControllerError::corrupt(&path, "the file is not UTF-8"));
        }
        Err(e) => return Err(ControllerError::io(&path, e)),
    };
    // Check the format and version before the shape, so that a newer file gets a clear error.
    let header: serde_json::Value = serde_json::from_str(&text).map_err(|e| ControllerError::corrupt(&path, e))?;
    if header.get("format").and_then(|f| f.as_str()) != Some(STATE_FORMAT) {
        return Err(ControllerError::corrupt(&path, format!("the `format` field is not \"{STATE_FORMAT}\"")));
    }
    match header.get("version").and_then(|v| v.as_u64()) {
        Some(STATE_VERSION) => {}
        Some(found) => {
            return Err(files::FileError::Version { path, found, supported: &[STATE_VERSION] }.into());
        }
        None => return Err(ControllerError::corrupt(&path, "the `version` field is missing")),
    }
    let file: StateFile = serde_json::from_str(&text).map_err(|e| ControllerError::corrupt(&path, e))?;
    let tensors = match &file.weights {
        Some(w) => {
            if w.file.contains(['/', '\\']) || !w.file.starts_with(WEIGHTS_PREFIX) {
                return Err(ControllerError::corrupt(&path, format!("bad weights file name `{}`", w.file)));
            }
            let wpath = dir.join(&w.file);
            let bytes = match fs::read(&wpath) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ControllerError::corrupt(
                        &path,
                        format!("it names the weights file {}, which does not exist", wpath.display()),
                    ));
                }
                Err(e) => return Err(ControllerError::io(&wpath, e)),
            };
            let found = format!("{:016x}", fnv1a(&bytes));
            if found != w.fnv1a {
                return Err(ControllerError::corrupt(
                    &wpath,
                    format!("FNV-1a hash {found} does not match {} recorded in {}", w.fnv1a, path.display()),
                ));
            }
            let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| ControllerError::corrupt(&wpath, e))?;
            Some(tensors)
        }
        None => None,
    };
    Ok((file.state, tensors))
}
