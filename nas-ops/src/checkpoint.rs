//! Loading named weights (timm's NASNet-A state-dict keys, or our own checkpoints) into a
//! network's `VarMap`, with an error that names every missing, extra or wrongly shaped tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarMap;

/// What a successful load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables set from the checkpoint.
    pub loaded: usize,
    /// Checkpoint entries deliberately skipped (PyTorch's `num_batches_tracked`).
    pub skipped: Vec<String>,
}

/// Sets every variable of `varmap` from `tensors` (converted to each variable's dtype).
/// Fails, changing nothing, unless every variable has a tensor of its shape and every
/// tensor has a variable; the error lists all three kinds of mismatch.
pub fn load_weights(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<LoadReport> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, var) in data.iter() {
        match tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.dims() != var.dims() => {
                mismatched.push(format!("{name}: checkpoint {:?}, network {:?}", t.dims(), var.dims()))
            }
            Some(_) => {}
        }
    }
    let mut skipped = Vec::new();
    let mut extra = Vec::new();
    for name in tensors.keys() {
        if data.contains_key(name) {
            continue;
        }
        if name.ends_with("num_batches_tracked") {
            skipped.push(name.clone());
        } else {
            extra.push(name.clone());
        }
    }
    if !(missing.is_empty() && mismatched.is_empty() && extra.is_empty()) {
        missing.sort();
        mismatched.sort();
        extra.sort();
        let mut msg = String::from("checkpoint does not fit the network:");
        for (what, list) in [("missing", &missing), ("wrong shape", &mismatched), ("extra", &extra)] {
            if !list.is_empty() {
                msg.push_str(&format!("\n  {} {what}: {}", list.len(), list.join(", ")));
            }
        }
        candle_core::bail!("{msg}");
    }
    for (name, var) in data.iter() {
        var.set(&tensors[name].to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    skipped.sort();
    Ok(LoadReport { loaded: data.len(), skipped })
}

/// Reads a safetensors file and [`load_weights`] from it.
pub fn load_safetensors(varmap: &VarMap, path: &Path) -> Result<LoadReport> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|err| candle_core::Error::Msg(format!("while reading {}: {err}", path.display())))?;
    load_weights(varmap, &tensors)
}
