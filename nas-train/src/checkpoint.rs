//! Checkpoints of a training run: the weights as safetensors plus a JSON state, written
//! atomically so that `--resume` continues where a killed run stopped.
//!
//! # On disk
//!
//! A directory (normally the run directory) holds one checkpoint; saving again replaces it.
//!
//! ```text
//! <dir>/checkpoint.json                     the commit point: format, version, which weight
//!                                           file, its length and tensor count, CheckpointState
//! <dir>/checkpoint-<step>.safetensors       every VarMap variable by name (BN running
//!                                           statistics included), and the optimiser buffers
//!                                           as `optim/<key>`
//! ```
//!
//! ```json
//! {
//!   "format": "nas-train/checkpoint",
//!   "version": 1,
//!   "weights": { "file": "checkpoint-1200.safetensors", "bytes": 1234567, "tensors": 812 },
//!   "step": 1200,
//!   "epoch": 3,
//!   "cell_spec": { "format": "nas-space/cellspec", "version": 1, "normal": {}, "reduction": {} },
//!   "network": { "stem": "cifar", "n": 6 },
//!   "train_config": {},
//!   "drop_path_rng": [1, 2, 3, 4],
//!   "data_seed": 0,
//!   "metrics": {}
//! }
//! ```
//!
//! # The save protocol
//!
//! [`save_checkpoint`] never writes a file under a name a reader trusts:
//!
//! 1. The weights go to `checkpoint-<step>.safetensors.tmp`, are fsynced, and are renamed to
//!    a weight file name that is not present in the directory: `checkpoint-<step>.safetensors`,
//!    or `checkpoint-<step>-<k>.safetensors` (k = 1, 2, …) when saving twice at one step.
//!    So the weight file the current `checkpoint.json` names is never touched. The directory
//!    is fsynced (Unix).
//! 2. The JSON, which records the new weight file's name, byte length and tensor count, goes
//!    to `checkpoint.json.tmp` and is fsynced.
//! 3. `checkpoint.json.tmp` is renamed over `checkpoint.json`: this is the commit point.
//!    The directory is fsynced again (steps 2 and 3 are `nas_space::files::write_atomic`).
//! 4. Every other weight file of this naming scheme and every leftover `.tmp` of ours is
//!    removed (best effort: what is left is harmless and goes at the next save).
//!
//! A crash before step 3 leaves the previous `checkpoint.json` naming the previous weight
//! file, intact; a crash after it leaves the new checkpoint complete. Orphans (an
//! uncommitted weight file, a `.tmp`) are never read. A torn pair can still come from
//! outside the protocol (a partial copy, a file system that reorders metadata, an edit),
//! and [`load_checkpoint`] refuses it: the weight file must exist with the recorded length
//! and tensor count. There are no content hashes.
//! One process saves to a directory at a time; files of other names are left alone.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use nas_space::files::{self, FileError};
use nas_space::{CellSpec, NetworkConfig};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// The `format` tag of `checkpoint.json`.
pub const FORMAT: &str = "nas-train/checkpoint";

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;

/// The name of the commit file inside a checkpoint directory.
pub const STATE_FILE: &str = "checkpoint.json";

/// The prefix of optimiser buffers in the weight file (`optim/<key>`); no network
/// variable may start with it.
pub const OPTIMIZER_PREFIX: &str = "optim/";

const WEIGHTS_PREFIX: &str = "checkpoint-";
const WEIGHTS_SUFFIX: &str = ".safetensors";
const TMP_SUFFIX: &str = ".tmp";

/// Everything but the tensors that a resumed run needs, as the caller gives it to
/// [`save_checkpoint`] and gets it back from [`load_checkpoint`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps taken.
    pub step: u64,
    /// Epochs completed (or the epoch the step falls in, as the training loop counts).
    pub epoch: u64,
    /// The cells of the network.
    pub cell_spec: CellSpec,
    /// The skeleton of the network.
    pub network: NetworkConfig,
    /// The training configuration, opaque to this module.
    #[serde(default)]
    pub train_config: serde_json::Value,
    /// `DropPathSchedule::rng_state()` at the time of saving.
    pub drop_path_rng: [u64; 4],
    /// The seed of the data order.
    pub data_seed: u64,
    /// The latest metrics, opaque to this module.
    #[serde(default)]
    pub metrics: serde_json::Value,
}

/// What [`load_checkpoint`] returns besides the weights it set.
#[derive(Debug, Clone)]
pub struct LoadedCheckpoint {
    /// The saved state.
    pub state: CheckpointState,
    /// The optimiser buffers by the keys they were saved under (prefix stripped), on the
    /// device of the network's variables.
    pub optimizer: HashMap<String, Tensor>,
}

/// The weight file a `checkpoint.json` commits to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsRecord {
    /// A file name inside the checkpoint directory.
    file: String,
    /// Its length in bytes.
    bytes: u64,
    /// The number of tensors it holds (variables and optimiser buffers).
    tensors: usize,
}

#[derive(Serialize)]
struct StateFileOut<'a> {
    format: &'static str,
    version: u64,
    weights: &'a WeightsRecord,
    #[serde(flatten)]
    state: &'a CheckpointState,
}

#[derive(Deserialize)]
struct StateFileIn {
    #[allow(dead_code)]
    format: String,
    #[allow(dead_code)]
    version: u64,
    weights: WeightsRecord,
    #[serde(flatten)]
    state: CheckpointState,
}

/// Only the tag and the version, read first so that another format or a newer version
/// is named as such rather than as a missing or unknown field.
#[derive(Deserialize)]
struct Header {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

/// Writes a checkpoint of `varmap`, `optimizer_state` and `state` into `dir` (created if
/// needed), replacing the one there, by the protocol of the module docs.
/// Optimiser buffers are stored as `optim/<key>` and come back under `key`.
/// Errors name the file that could not be written; on an error the previous checkpoint
/// is still the one a reader sees.
pub fn save_checkpoint(
    dir: impl AsRef<Path>,
    varmap: &VarMap,
    optimizer_state: &[(String, Tensor)],
    state: &CheckpointState,
) -> Result<(), TrainError> {
    let dir = dir.as_ref();
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        if name.starts_with(OPTIMIZER_PREFIX) {
            return Err(checkpoint_error(
                dir,
                format!(
                    "network variable `{name}` uses the prefix `{OPTIMIZER_PREFIX}` reserved for optimiser buffers"
                ),
            ));
        }
        tensors.insert(name.clone(), var.as_tensor().clone());
    }
    for (key, xs) in optimizer_state {
        if tensors.insert(format!("{OPTIMIZER_PREFIX}{key}"), xs.clone()).is_some() {
            return Err(checkpoint_error(dir, format!("optimiser buffer `{key}` is given twice")));
        }
    }

    let file = fresh_weights_name(dir, state.step);
    let weights_path = dir.join(&file);
    let weights_tmp = files::temporary(&weights_path);
    let json_path = dir.join(STATE_FILE);

    let uncommitted = || -> Result<(), TrainError> {
        candle_core::safetensors::save(&tensors, &weights_tmp).map_err(|err| {
            checkpoint_error(&weights_tmp, format!("while writing the weights: {}", candle_message(&err)))
        })?;
        let bytes = fs::metadata(&weights_tmp).map_err(io_error(&weights_tmp))?.len();
        files::commit(&weights_tmp, &weights_path)?;

        let record = WeightsRecord { file: file.clone(), bytes, tensors: tensors.len() };
        let out = StateFileOut { format: FORMAT, version: FORMAT_VERSION, weights: &record, state };
        let mut json = serde_json::to_string_pretty(&out)
            .map_err(|err| TrainError::Json { path: json_path.clone(), message: err.to_string() })?;
        json.push('\n');
        // The commit point.
        Ok(files::write_atomic(&json_path, json)?)
    };
    if let Err(err) = uncommitted() {
        for path in [&weights_tmp, &weights_path] {
            let _ = fs::remove_file(path);
        }
        return Err(err);
    }
    remove_stale(dir, &file);
    Ok(())
}

/// Reads and checks `<dir>/checkpoint.json` without touching any network, e.g. to learn
/// the `CellSpec` and `NetworkConfig` to build before [`load_checkpoint`].
pub fn read_checkpoint_state(dir: impl AsRef<Path>) -> Result<CheckpointState, TrainError> {
    Ok(read_state_file(dir.as_ref())?.state)
}

/// Whether `dir` holds a committed checkpoint (a `checkpoint.json`), which
/// [`load_checkpoint`] may still refuse.
pub fn has_checkpoint(dir: impl AsRef<Path>) -> bool {
    dir.as_ref().join(STATE_FILE).is_file()
}

/// Sets every variable of `varmap` from the checkpoint in `dir` and returns its state and
/// optimiser buffers. Refuses, changing no variable, a missing directory or
/// `checkpoint.json` ("nothing to resume"), another format or version, a weight file that
/// is missing or not of the recorded length and tensor count, and weights that do not fit
/// the network (the error lists every missing, extra and wrongly shaped tensor).
pub fn load_checkpoint(dir: impl AsRef<Path>, varmap: &VarMap) -> Result<LoadedCheckpoint, TrainError> {
    let device =
        varmap.data().lock().expect("varmap lock").values().next().map_or(Device::Cpu, |var| var.device().clone());
    let CheckpointTensors { weights_path, state, weights, optimizer } = read_checkpoint_tensors(dir, &device)?;
    nas_ops::checkpoint::load_weights(varmap, &weights)
        .map_err(|err| checkpoint_error(&weights_path, candle_message(&err)))?;
    Ok(LoadedCheckpoint { state, optimizer })
}

/// Every tensor of the checkpoint in `dir`, split into weights and optimiser buffers, checked
/// against what `checkpoint.json` records (a torn pair is refused), without a network.
#[derive(Debug)]
pub struct CheckpointTensors {
    /// The weight file read.
    pub weights_path: std::path::PathBuf,
    /// The saved state.
    pub state: CheckpointState,
    /// Variables by name (BN statistics included).
    pub weights: HashMap<String, Tensor>,
    /// Optimiser buffers by key (prefix stripped).
    pub optimizer: HashMap<String, Tensor>,
}

/// Reads the checkpoint in `dir` onto `device` (see [`CheckpointTensors`]).
pub fn read_checkpoint_tensors(dir: impl AsRef<Path>, device: &Device) -> Result<CheckpointTensors, TrainError> {
    let dir = dir.as_ref();
    let StateFileIn { weights: record, state, .. } = read_state_file(dir)?;
    if Path::new(&record.file).file_name().is_none_or(|name| name != record.file.as_str()) {
        return Err(checkpoint_error(
            &dir.join(STATE_FILE),
            format!("names the weight file `{}`, which is not a file name", record.file),
        ));
    }
    let weights_path = dir.join(&record.file);
    let bytes = match fs::read(&weights_path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(checkpoint_error(
                &weights_path,
                format!("the weight file that {STATE_FILE} names is missing (torn checkpoint)"),
            ))
        }
        Err(err) => return Err(TrainError::Io { path: weights_path, source: err }),
    };
    if bytes.len() as u64 != record.bytes {
        return Err(checkpoint_error(
            &weights_path,
            format!("is {} bytes but {STATE_FILE} records {} (torn checkpoint)", bytes.len(), record.bytes),
        ));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|err| {
        checkpoint_error(&weights_path, format!("not a readable safetensors file: {}", candle_message(&err)))
    })?;
    drop(bytes);
    if tensors.len() != record.tensors {
        return Err(checkpoint_error(
            &weights_path,
            format!("holds {} tensors but {STATE_FILE} records {} (torn checkpoint)", tensors.len(), record.tensors),
        ));
    }
    let mut weights = HashMap::new();
    let mut optimizer = HashMap::new();
    for (name, xs) in tensors {
        match name.strip_prefix(OPTIMIZER_PREFIX) {
            Some(key) => optimizer.insert(key.to_string(), xs),
            None => weights.insert(name, xs),
        };
    }
    Ok(CheckpointTensors { weights_path, state, weights, optimizer })
}

fn read_state_file(dir: &Path) -> Result<StateFileIn, TrainError> {
    if !dir.is_dir() {
        let message = if dir.exists() { "is not a directory" } else { "does not exist" };
        return Err(checkpoint_error(dir, format!("{message}, nothing to resume")));
    }
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(checkpoint_error(&path, "no checkpoint here, nothing to resume".to_string()))
        }
        Err(err) => return Err(TrainError::Io { path, source: err }),
    };
    let json_error = |err: serde_json::Error| TrainError::Json { path: path.clone(), message: err.to_string() };
    let header: Header = serde_json::from_str(&text).map_err(json_error)?;
    match header.format {
        Some(serde_json::Value::String(format)) if format == FORMAT => {}
        Some(other) => {
            return Err(checkpoint_error(&path, format!("format is {other}, expected \"{FORMAT}\"")));
        }
        None => return Err(checkpoint_error(&path, format!("no `format` field, not a {FORMAT} file"))),
    }
    match header.version {
        Some(version) if version.as_u64() == Some(FORMAT_VERSION) => {}
        Some(other) => {
            return Err(match other.as_u64() {
                Some(found) => FileError::Version { path: path.clone(), found, supported: &[FORMAT_VERSION] }.into(),
                None => checkpoint_error(&path, format!("the `version` field is {other}, not a version number")),
            });
        }
        None => return Err(checkpoint_error(&path, "no `version` field".to_string())),
    }
    let file: StateFileIn = serde_json::from_str(&text).map_err(json_error)?;
    if !is_weights_name(&file.weights.file) {
        return Err(checkpoint_error(
            &path,
            format!("names the weight file `{}`, which is not a checkpoint weight file name", file.weights.file),
        ));
    }
    Ok(file)
}

/// `checkpoint-<step>.safetensors`, or `checkpoint-<step>-<k>.safetensors` with the first
/// k that is free, so that the committed weight file is never overwritten.
fn fresh_weights_name(dir: &Path, step: u64) -> String {
    std::iter::once(format!("{WEIGHTS_PREFIX}{step}{WEIGHTS_SUFFIX}"))
        .chain((1u64..).map(|k| format!("{WEIGHTS_PREFIX}{step}-{k}{WEIGHTS_SUFFIX}")))
        .find(|name| fs::symlink_metadata(dir.join(name)).is_err())
        .expect("an unbounded list of names has a free one")
}

/// Whether `name` is `checkpoint-<digits>[-<digits>].safetensors`.
fn is_weights_name(name: &str) -> bool {
    let Some(stem) = name.strip_prefix(WEIGHTS_PREFIX).and_then(|rest| rest.strip_suffix(WEIGHTS_SUFFIX)) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match stem.split_once('-') {
        Some((step, k)) => digits(step) && digits(k),
        None => digits(stem),
    }
}

/// Removes every weight file but `keep` and every temporary file of ours (best effort).
fn remove_stale(dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = match name.strip_suffix(TMP_SUFFIX) {
            Some(base) => base == STATE_FILE || is_weights_name(base),
            None => name != keep && is_weights_name(name),
        };
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn checkpoint_error(path: &Path, message: String) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), message }
}

/// A candle error's message without the backtrace `bail!` attaches under `RUST_BACKTRACE`.
pub(crate) fn candle_message(err: &candle_core::Error) -> String {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use nas_ops::NasNet;
    use nas_space::{CellSpec, NetworkConfig};

    use super::*;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let name = format!(
                "nas-train-checkpoint-{tag}-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tiny_cifar(filters: usize) -> NetworkConfig {
        let mut config = NetworkConfig::cifar();
        config.n = 1;
        config.num_conv_filters = filters;
        config
    }

    fn build(config: &NetworkConfig, seed: u64) -> (VarMap, NasNet) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = NasNet::new(&CellSpec::nasnet_a(), config, 0, vb).unwrap();
        nas_ops::init::init_weights(&varmap, seed).unwrap();
        (varmap, net)
    }

    fn state(config: &NetworkConfig, step: u64) -> CheckpointState {
        CheckpointState {
            step,
            epoch: step / 10,
            cell_spec: CellSpec::nasnet_a(),
            network: config.clone(),
            train_config: serde_json::json!({ "lr": 0.025, "batch_size": 32 }),
            drop_path_rng: [1, u64::MAX, 0x0123_4567_89ab_cdef, 42],
            data_seed: 7,
            metrics: serde_json::json!({ "loss": 1.25, "accuracy": 0.5 }),
        }
    }

    fn values(varmap: &VarMap) -> HashMap<String, Vec<f32>> {
        let data = varmap.data().lock().unwrap();
        data.iter().map(|(name, var)| (name.clone(), var.flatten_all().unwrap().to_vec1().unwrap())).collect()
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    fn weights_file(dir: &Path) -> PathBuf {
        let names: Vec<String> = dir_names(dir).into_iter().filter(|n| is_weights_name(n)).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        dir.join(&names[0])
    }

    fn err_string(result: Result<LoadedCheckpoint, TrainError>) -> String {
        result.expect_err("the load should fail").to_string()
    }

    #[test]
    fn round_trip_restores_every_variable_and_the_state() {
        let tmp = TempDir::new("round-trip");
        let config = tiny_cifar(8);
        let (varmap, net) = build(&config, 1);
        // Move the BN running statistics away from their initial values.
        let xs = crate::bench::uniform_tensor((2, 3, 32, 32), 1, &Device::Cpu).unwrap();
        net.forward_t(&xs, true).unwrap();
        let saved = values(&varmap);
        assert!(saved.iter().any(|(name, v)| name.ends_with("running_mean") && v.iter().any(|&x| x != 0.0)));
        let state = state(&config, 120);
        save_checkpoint(&tmp.0, &varmap, &[], &state).unwrap();
        assert_eq!(dir_names(&tmp.0), ["checkpoint-120.safetensors", "checkpoint.json"]);

        let (fresh, _net) = build(&config, 2);
        assert_ne!(values(&fresh), saved);
        let loaded = load_checkpoint(&tmp.0, &fresh).unwrap();
        let restored = values(&fresh);
        assert_eq!(restored.len(), saved.len());
        for (name, v) in &saved {
            assert_eq!(&restored[name], v, "{name}");
        }
        assert_eq!(loaded.state, state);
        assert!(loaded.optimizer.is_empty());
        assert_eq!(read_checkpoint_state(&tmp.0).unwrap(), state);
        assert!(has_checkpoint(&tmp.0));

        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(tmp.0.join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(json["format"], FORMAT);
        assert_eq!(json["version"], 1);
        assert_eq!(json["weights"]["file"], "checkpoint-120.safetensors");
        assert_eq!(json["weights"]["tensors"], saved.len());
        assert_eq!(json["weights"]["bytes"], fs::metadata(weights_file(&tmp.0)).unwrap().len());
    }

    #[test]
    fn optimizer_buffers_round_trip_under_their_own_keys() {
        let tmp = TempDir::new("optim");
        let config = tiny_cifar(8);
        let (varmap, _net) = build(&config, 1);
        let names: Vec<String> = varmap.data().lock().unwrap().keys().take(3).cloned().collect();
        let buffers: Vec<(String, Tensor)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let var = varmap.data().lock().unwrap()[name].as_tensor().clone();
                (format!("{name}/momentum"), ((var + 1.0).unwrap() * (i as f64 + 0.5)).unwrap())
            })
            .collect();
        save_checkpoint(&tmp.0, &varmap, &buffers, &state(&config, 3)).unwrap();
        let (fresh, _net) = build(&config, 2);
        let loaded = load_checkpoint(&tmp.0, &fresh).unwrap();
        assert_eq!(loaded.optimizer.len(), buffers.len());
        for (key, xs) in &buffers {
            let got = &loaded.optimizer[key];
            assert_eq!(got.dims(), xs.dims(), "{key}");
            let want: Vec<f32> = xs.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{key}");
        }
        assert_eq!(values(&fresh), values(&varmap));

        let duplicate = vec![buffers[0].clone(), buffers[0].clone()];
        let err = save_checkpoint(&tmp.0, &varmap, &duplicate, &state(&config, 4)).unwrap_err().to_string();
        assert!(err.contains("given twice"), "{err}");
        assert_eq!(read_checkpoint_state(&tmp.0).unwrap().step, 3);
    }

    #[test]
    fn torn_checkpoints_are_refused_naming_the_weight_file() {
        let tmp = TempDir::new("torn");
        let config = tiny_cifar(8);
        let (varmap, _net) = build(&config, 1);
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 50)).unwrap();
        let weights = weights_file(&tmp.0);
        let full = fs::read(&weights).unwrap();

        fs::write(&weights, &full[..full.len() / 2]).unwrap();
        let (fresh, _net) = build(&config, 2);
        let before = values(&fresh);
        let err = err_string(load_checkpoint(&tmp.0, &fresh));
        assert!(err.contains("checkpoint-50.safetensors") && err.contains("torn"), "{err}");
        assert!(err.contains(&format!("records {}", full.len())), "{err}");
        assert_eq!(values(&fresh), before, "a refused load changes nothing");

        // Same length, other tensor count: the header is rewritten with one tensor fewer.
        let mut tensors = candle_core::safetensors::load_buffer(&full, &Device::Cpu).unwrap();
        let name = tensors.keys().next().unwrap().clone();
        tensors.remove(&name);
        candle_core::safetensors::save(&tensors, &weights).unwrap();
        let err = err_string(load_checkpoint(&tmp.0, &fresh));
        assert!(err.contains("checkpoint-50.safetensors"), "{err}");

        fs::remove_file(&weights).unwrap();
        let err = err_string(load_checkpoint(&tmp.0, &fresh));
        assert!(err.contains("checkpoint-50.safetensors") && err.contains("missing"), "{err}");
        assert_eq!(values(&fresh), before);
    }

    #[test]
    fn another_version_or_format_is_refused() {
        let tmp = TempDir::new("version");
        let config = tiny_cifar(8);
        let (varmap, _net) = build(&config, 1);
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 5)).unwrap();
        let json_path = tmp.0.join(STATE_FILE);
        let original: serde_json::Value = serde_json::from_str(&fs::read_to_string(&json_path).unwrap()).unwrap();

        let mut json = original.clone();
        json["version"] = 2.into();
        json["a_field_of_version_2"] = true.into();
        fs::write(&json_path, json.to_string()).unwrap();
        let err = err_string(load_checkpoint(&tmp.0, &varmap));
        assert!(err.contains("checkpoint.json") && err.contains("version 2 is not supported"), "{err}");

        let mut json = original.clone();
        json["format"] = "nas-space/cellspec".into();
        fs::write(&json_path, json.to_string()).unwrap();
        let err = err_string(load_checkpoint(&tmp.0, &varmap));
        assert!(err.contains("format is \"nas-space/cellspec\""), "{err}");

        let mut json = original;
        json["weights"]["file"] = "../elsewhere.safetensors".into();
        fs::write(&json_path, json.to_string()).unwrap();
        let err = err_string(load_checkpoint(&tmp.0, &varmap));
        assert!(err.contains("not a checkpoint weight file name"), "{err}");

        fs::write(&json_path, "{ \"format\": ").unwrap();
        let err = err_string(load_checkpoint(&tmp.0, &varmap));
        assert!(err.contains("checkpoint.json"), "{err}");
    }

    #[test]
    fn nothing_to_resume_is_named() {
        let tmp = TempDir::new("empty");
        let config = tiny_cifar(8);
        let (varmap, _net) = build(&config, 1);
        assert!(!has_checkpoint(&tmp.0));
        let err = err_string(load_checkpoint(&tmp.0, &varmap));
        assert!(err.contains("checkpoint.json") && err.contains("nothing to resume"), "{err}");
        let missing = tmp.0.join("no-such-run");
        let err = err_string(load_checkpoint(&missing, &varmap));
        assert!(err.contains("no-such-run") && err.contains("does not exist, nothing to resume"), "{err}");
    }

    #[test]
    fn overwriting_keeps_only_the_newest_weights_and_no_temporary_files() {
        let tmp = TempDir::new("overwrite");
        let config = tiny_cifar(8);
        let (varmap, _net) = build(&config, 1);
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 10)).unwrap();
        // Leftovers of an interrupted save, and a file of the user's that must survive.
        fs::write(tmp.0.join("checkpoint-15.safetensors.tmp"), b"half").unwrap();
        fs::write(tmp.0.join("checkpoint-15.safetensors"), b"uncommitted").unwrap();
        fs::write(tmp.0.join("checkpoint.json.tmp"), b"{").unwrap();
        fs::write(tmp.0.join("weights-final.safetensors"), b"mine").unwrap();
        // The leftovers do not disturb a reader.
        assert_eq!(read_checkpoint_state(&tmp.0).unwrap().step, 10);

        nas_ops::init::init_weights(&varmap, 3).unwrap();
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 20)).unwrap();
        assert_eq!(dir_names(&tmp.0), ["checkpoint-20.safetensors", "checkpoint.json", "weights-final.safetensors"]);
        // Saving twice at one step never overwrites the committed weight file.
        nas_ops::init::init_weights(&varmap, 4).unwrap();
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 20)).unwrap();
        assert_eq!(dir_names(&tmp.0), ["checkpoint-20-1.safetensors", "checkpoint.json", "weights-final.safetensors"]);
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 20)).unwrap();
        assert_eq!(dir_names(&tmp.0), ["checkpoint-20.safetensors", "checkpoint.json", "weights-final.safetensors"]);

        let (fresh, _net) = build(&config, 2);
        let loaded = load_checkpoint(&tmp.0, &fresh).unwrap();
        assert_eq!(loaded.state.step, 20);
        assert_eq!(values(&fresh), values(&varmap));
    }

    #[test]
    fn a_network_of_another_width_is_named() {
        let tmp = TempDir::new("width");
        let config = tiny_cifar(8);
        let (varmap, _net) = build(&config, 1);
        save_checkpoint(&tmp.0, &varmap, &[], &state(&config, 1)).unwrap();
        let (wider, _net) = build(&tiny_cifar(12), 2);
        let before = values(&wider);
        let err = err_string(load_checkpoint(&tmp.0, &wider));
        assert!(err.contains("checkpoint-1.safetensors") && err.contains("does not fit the network"), "{err}");
        assert!(err.contains("wrong shape") && err.contains("conv0.conv.weight"), "{err}");
        assert!(!err.contains("backtrace"), "{err}");
        assert_eq!(values(&wider), before);
    }
}
