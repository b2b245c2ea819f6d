//! Starting a training from existing weights (fine-tuning): [`init_from`] sets a fresh
//! network's variables from a run directory of ours or from a safetensors file (e.g. timm's
//! `nasnetalarge` state dict), keeping the fresh classifier and aux head where their shapes
//! differ (another class count) or the source lacks them.
//!
//! # The rule
//!
//! * Every variable whose name is in the source with the same shape is set from it
//!   (converted to the variable's dtype and device).
//! * The classifier (`last_linear.*`) and the aux head (`aux_head.*`) may be missing from
//!   the source ([`InitReport::kept_initial`]) or have another shape
//!   ([`InitReport::replaced`]): they keep their fresh initialisation.
//! * Any other variable that is missing or of another shape is an error naming every such
//!   tensor, and then no variable is changed.
//! * Source tensors without a variable (timm's `num_batches_tracked`, an aux head the network
//!   does not have) are listed in [`InitReport::unused`]. The optimiser buffers of our
//!   checkpoints (`optim/…`) are ignored and not listed.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::checkpoint::{candle_message, checkpoint_error, read_checkpoint_tensors, STATE_FILE};
use crate::TrainError;

/// The name prefixes of the variables that may keep their fresh initialisation: the
/// classifier and the aux head, whose shapes depend on the class count.
pub const REPLACEABLE_PREFIXES: [&str; 2] = ["last_linear.", "aux_head."];

/// What [`init_from`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InitReport {
    /// Variables set from the source.
    pub loaded: usize,
    /// Classifier and aux-head variables whose source tensor has another shape; they keep
    /// their fresh initialisation. Sorted names.
    pub replaced: Vec<String>,
    /// Classifier and aux-head variables the source lacks; they keep their fresh
    /// initialisation. Sorted names.
    pub kept_initial: Vec<String>,
    /// Source tensors with no variable of that name (optimiser buffers excepted). Sorted names.
    pub unused: Vec<String>,
}

impl fmt::Display for InitReport {
    /// One line, e.g. `loaded 812 tensors; replaced (other shape in the source):
    /// last_linear.bias, last_linear.weight; 1 source tensor unused: cell_0.x.num_batches_tracked`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loaded {} tensor{}", self.loaded, plural(self.loaded))?;
        if !self.replaced.is_empty() {
            write!(f, "; replaced (other shape in the source): {}", abridged(&self.replaced))?;
        }
        if !self.kept_initial.is_empty() {
            write!(f, "; kept initial (not in the source): {}", abridged(&self.kept_initial))?;
        }
        if !self.unused.is_empty() {
            let n = self.unused.len();
            write!(f, "; {n} source tensor{} unused: {}", plural(n), abridged(&self.unused))?;
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// All names when there are few, else the first three and the count.
fn abridged(names: &[String]) -> String {
    const SHOWN: usize = 3;
    if names.len() <= SHOWN + 1 {
        names.join(", ")
    } else {
        format!("{}, … ({} in all)", names[..SHOWN].join(", "), names.len())
    }
}

/// Whether `name` is a classifier or aux-head variable (see [`REPLACEABLE_PREFIXES`]).
pub fn is_replaceable(name: &str) -> bool {
    REPLACEABLE_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// Sets the variables of `varmap` from `source` by the rule of the module docs and says what
/// it did.
///
/// `source` is a checkpoint directory of ours (holding `checkpoint.json`; the weight file it
/// names is read and its `optim/…` tensors are ignored), that directory's `checkpoint.json`,
/// or a `.safetensors` file. Errors name the path: a source that does not exist or cannot be
/// read ([`TrainError::Io`], [`TrainError::Json`], [`TrainError::Checkpoint`]), and weights
/// that do not fit the network beyond the classifier and aux head ([`TrainError::Checkpoint`]
/// naming every such tensor with its shape in the network and in the source); on an error no
/// variable is changed.
pub fn init_from(varmap: &VarMap, source: &Path) -> Result<InitReport, TrainError> {
    let (weights_path, tensors) = read_source(source)?;
    let data = varmap.data().lock().expect("varmap lock");

    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut to_set = Vec::new();
    let mut replaced = Vec::new();
    let mut kept_initial = Vec::new();
    let mut misfits = Vec::new();
    for name in names {
        let var = &data[name];
        match tensors.get(name) {
            Some(xs) if xs.dims() == var.dims() => to_set.push((var, xs)),
            Some(_) if is_replaceable(name) => replaced.push(name.clone()),
            None if is_replaceable(name) => kept_initial.push(name.clone()),
            Some(xs) => misfits.push(format!("{name}: network {:?}, source {:?}", var.dims(), xs.dims())),
            None => misfits.push(format!("{name}: network {:?}, missing from the source", var.dims())),
        }
    }
    if !misfits.is_empty() {
        return Err(TrainError::Checkpoint {
            path: weights_path,
            message: format!(
                "does not fit the network beyond the classifier and aux head ({} tensor{}): {}",
                misfits.len(),
                plural(misfits.len()),
                misfits.join("; ")
            ),
        });
    }
    let mut unused: Vec<String> = tensors.keys().filter(|name| !data.contains_key(*name)).cloned().collect();
    unused.sort();

    // Convert everything before setting anything, so that a failed conversion changes nothing.
    let converted = to_set
        .iter()
        .map(|(var, xs)| Ok((*var, xs.to_dtype(var.dtype())?.to_device(var.device())?)))
        .collect::<Result<Vec<_>, candle_core::Error>>()
        .map_err(|err| checkpoint_error(&weights_path, format!("while converting the weights: {err}")))?;
    for (var, xs) in &converted {
        var.set(xs)?;
    }
    Ok(InitReport { loaded: converted.len(), replaced, kept_initial, unused })
}

/// The weights of `source` (optimiser buffers dropped) and the file they came from.
fn read_source(source: &Path) -> Result<(PathBuf, HashMap<String, Tensor>), TrainError> {
    let metadata = match fs::metadata(source) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(checkpoint_error(
                source,
                format!("does not exist (expected a run directory holding {STATE_FILE}, or a .safetensors file)"),
            ))
        }
        Err(err) => return Err(TrainError::Io { path: source.to_path_buf(), source: err }),
    };
    let dir = if metadata.is_dir() {
        Some(source)
    } else if source.file_name().is_some_and(|name| name == STATE_FILE) {
        Some(source.parent().unwrap_or(Path::new(".")))
    } else {
        None
    };
    if let Some(dir) = dir {
        let read = read_checkpoint_tensors(dir, &Device::Cpu)?;
        return Ok((read.weights_path, read.weights));
    }
    let tensors = candle_core::safetensors::load(source, &Device::Cpu).map_err(|err| {
        checkpoint_error(source, format!("not a readable safetensors file: {}", candle_message(&err)))
    })?;
    Ok((source.to_path_buf(), tensors))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use nas_ops::NasNet;
    use nas_space::{CellSpec, NetworkConfig};

    use super::*;
    use crate::optim::{OptimSettings, OptimizerConfig};
    use crate::schedule::LrSchedule;
    use crate::trainer::{TrainConfig, Trainer};

    /// A path under the system temp dir (process id and a counter in the name), removed on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(tag: &str) -> TempPath {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            TempPath(std::env::temp_dir().join(format!("nas-train-init-{tag}-{}-{n}", std::process::id())))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
            let _ = fs::remove_file(&self.0);
        }
    }

    fn tiny(num_classes: usize) -> NetworkConfig {
        let mut config = NetworkConfig::cifar();
        config.n = 1;
        config.num_conv_filters = 4;
        config.image_size = 32;
        config.num_classes = num_classes;
        config
    }

    fn build(config: &NetworkConfig, seed: u64) -> (VarMap, NasNet) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = NasNet::new(&CellSpec::nasnet_a(), config, seed, vb).unwrap();
        nas_ops::init::init_weights(&varmap, seed).unwrap();
        (varmap, net)
    }

    fn values(varmap: &VarMap) -> HashMap<String, Vec<u32>> {
        let data = varmap.data().lock().unwrap();
        data.iter()
            .map(|(name, var)| {
                let v: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
                (name.clone(), v.into_iter().map(f32::to_bits).collect())
            })
            .collect()
    }

    fn tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
        let data = varmap.data().lock().unwrap();
        data.iter().map(|(name, var)| (name.clone(), var.as_tensor().copy().unwrap())).collect()
    }

    /// A trained-looking source: a trainer (optimiser buffers and weight average included in
    /// its checkpoint) whose BN statistics moved, saved into a fresh directory.
    fn source_run(config: &NetworkConfig) -> (TempPath, HashMap<String, Vec<u32>>) {
        let train = TrainConfig {
            total_steps: 4,
            schedule: LrSchedule::Cosine { lr: 0.05, total_steps: 4, min_lr: 0.0 },
            optim: OptimSettings {
                optimizer: OptimizerConfig::Sgd { momentum: 0.9, nesterov: true },
                weight_decay: 1e-4,
                clip_global_norm: Some(5.0),
            },
            label_smoothing: 0.1,
            aux_weight: 0.4,
            seed: 11,
            ema_decay: Some(0.9),
        };
        let spec = CellSpec::nasnet_a();
        let trainer = Trainer::new(&spec, config, train).unwrap();
        let xs = crate::bench::uniform_tensor((2, 3, 32, 32), 1, &Device::Cpu).unwrap();
        trainer.net().forward_t(&xs, true).unwrap();
        let dir = TempPath::new("run");
        trainer.save_checkpoint(&dir.0, &spec, config, 0, 0, serde_json::Value::Null).unwrap();
        (dir, values(trainer.varmap()))
    }

    #[test]
    fn same_classes_loads_every_variable_from_a_run_directory() {
        let config = tiny(10);
        let (dir, source) = source_run(&config);
        assert!(source.iter().any(|(name, v)| name.ends_with("running_mean") && v.iter().any(|&x| x != 0)));
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.0.join(STATE_FILE)).unwrap()).unwrap();
        assert!(json["weights"]["tensors"].as_u64().unwrap() > source.len() as u64, "the run has optimiser buffers");
        let (varmap, _net) = build(&config, 1);
        assert_ne!(values(&varmap), source);
        let report = init_from(&varmap, &dir.0).unwrap();
        assert_eq!(values(&varmap), source);
        assert_eq!(
            report,
            InitReport { loaded: source.len(), replaced: vec![], kept_initial: vec![], unused: vec![] },
            "optimiser buffers are neither loaded nor listed"
        );
        assert_eq!(report.to_string(), format!("loaded {} tensors", source.len()));
        // The same through the path of its checkpoint.json.
        let (again, _net) = build(&config, 2);
        init_from(&again, &dir.0.join(STATE_FILE)).unwrap();
        assert_eq!(values(&again), source);
    }

    #[test]
    fn another_class_count_replaces_the_classifier_and_keeps_the_rest() {
        let (dir, source) = source_run(&tiny(10));
        let config = tiny(5);
        let (varmap, net) = build(&config, 1);
        let fresh = values(&varmap);
        let report = init_from(&varmap, &dir.0).unwrap();
        let heads = ["aux_head.fc.bias", "aux_head.fc.weight", "last_linear.bias", "last_linear.weight"];
        assert_eq!(report.replaced, heads);
        assert!(report.kept_initial.is_empty() && report.unused.is_empty(), "{report:?}");
        assert_eq!(report.loaded, source.len() - heads.len());
        let text = report.to_string();
        assert!(text.contains("replaced") && text.contains("last_linear.weight"), "{text}");
        let now = values(&varmap);
        assert_eq!(now.len(), source.len());
        for (name, v) in &now {
            if heads.contains(&name.as_str()) {
                assert_eq!(v, &fresh[name], "{name} keeps its fresh value");
            } else {
                assert_eq!(v, &source[name], "{name} comes from the source");
            }
        }
        let xs = crate::bench::uniform_tensor((2, 3, 32, 32), 1, &Device::Cpu).unwrap();
        let out = net.forward_t(&xs, false).unwrap();
        assert_eq!(out.logits.dims(), [2, 5]);
        let logits: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "{logits:?}");
    }

    #[test]
    fn a_safetensors_file_lists_the_tensors_it_has_no_variable_for() {
        let with_aux = tiny(10);
        let (src, _net) = build(&with_aux, 3);
        let mut saved = tensors(&src);
        saved.insert("cell_0.x.num_batches_tracked".into(), Tensor::new(&[7i64], &Device::Cpu).unwrap());
        let file = TempPath::new("timm.safetensors");
        candle_core::safetensors::save(&saved, &file.0).unwrap();

        // A network without an aux head: the source's aux head is unused too.
        let mut config = with_aux;
        config.use_aux_head = false;
        let (varmap, _net) = build(&config, 4);
        let report = init_from(&varmap, &file.0).unwrap();
        assert!(report.unused.contains(&"cell_0.x.num_batches_tracked".to_string()), "{report:?}");
        assert!(report.unused.iter().all(|n| n.starts_with("aux_head.") || n.ends_with("num_batches_tracked")));
        assert_eq!(report.loaded, varmap.data().lock().unwrap().len());
        assert_eq!(report.loaded + report.unused.len(), saved.len());
        let want = values(&src);
        for (name, v) in values(&varmap) {
            assert_eq!(v, want[&name], "{name}");
        }

        // A source without the classifier: it keeps its fresh value.
        saved.retain(|name, _| !name.starts_with("last_linear."));
        candle_core::safetensors::save(&saved, &file.0).unwrap();
        let (varmap, _net) = build(&config, 5);
        let fresh = values(&varmap);
        let report = init_from(&varmap, &file.0).unwrap();
        assert_eq!(report.kept_initial, ["last_linear.bias", "last_linear.weight"]);
        assert_eq!(values(&varmap)["last_linear.weight"], fresh["last_linear.weight"]);
        assert!(report.to_string().contains("kept initial"), "{report}");
    }

    #[test]
    fn a_misfit_outside_the_heads_is_refused_naming_it_and_changing_nothing() {
        let config = tiny(10);
        let (src, _net) = build(&config, 3);
        let mut saved = tensors(&src);
        let conv = "conv0.conv.weight";
        let dims = saved[conv].dims().to_vec();
        let mut wrong = dims.clone();
        wrong[0] += 1;
        saved.insert(conv.into(), Tensor::zeros(wrong.as_slice(), DType::F32, &Device::Cpu).unwrap());
        saved.remove("conv0.bn.weight");
        let file = TempPath::new("misfit.safetensors");
        candle_core::safetensors::save(&saved, &file.0).unwrap();

        let (varmap, _net) = build(&config, 4);
        let before = values(&varmap);
        let err = init_from(&varmap, &file.0).unwrap_err();
        assert!(matches!(err, TrainError::Checkpoint { .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains(&file.0.display().to_string()), "{err}");
        assert!(err.contains(&format!("{conv}: network {dims:?}, source {wrong:?}")), "{err}");
        assert!(err.contains("conv0.bn.weight") && err.contains("missing"), "{err}");
        assert!(err.contains("2 tensors"), "{err}");
        assert_eq!(values(&varmap), before, "a refused source changes nothing");
    }

    #[test]
    fn unreadable_sources_are_named() {
        let (varmap, _net) = build(&tiny(10), 1);
        let before = values(&varmap);
        let missing = TempPath::new("no-such-source");
        let err = init_from(&varmap, &missing.0).unwrap_err().to_string();
        assert!(err.contains(&missing.0.display().to_string()) && err.contains("does not exist"), "{err}");

        // A directory without a checkpoint.
        let empty = TempPath::new("empty-dir");
        fs::create_dir_all(&empty.0).unwrap();
        let err = init_from(&varmap, &empty.0).unwrap_err().to_string();
        assert!(err.contains(&empty.0.join(STATE_FILE).display().to_string()), "{err}");

        // A checkpoint.json that is not JSON.
        fs::write(empty.0.join(STATE_FILE), "{ \"format\": ").unwrap();
        let err = init_from(&varmap, &empty.0).unwrap_err();
        assert!(matches!(err, TrainError::Json { .. }), "{err:?}");

        // A file that is not safetensors.
        let junk = TempPath::new("junk.safetensors");
        fs::write(&junk.0, b"not safetensors").unwrap();
        let err = init_from(&varmap, &junk.0).unwrap_err().to_string();
        assert!(err.contains(&junk.0.display().to_string()) && err.contains("not a readable safetensors"), "{err}");
        assert_eq!(values(&varmap), before);
    }
}
