//! `nas bench`: times one training step (forward, backward, plain SGD update) and one
//! inference pass of a standard network, as the `nas-ops` issue defines them.
//!
//! - `small` (default batch 64): ImageNet skeleton, NASNet-A, N = 2, P = 384 (F = 16),
//!   stem 32 filters, 32×32 input, 10 classes, no aux head, no dropout, no drop path:
//!   Keras 3's `NASNet(input_shape=(32,32,3), penultimate_filters=384, num_blocks=2,
//!   stem_block_filters=32, skip_reduction=False, filter_multiplier=2, classes=10)`.
//! - `mobile` (default batch 32): NASNet-A Mobile at 224, 1000 classes, no aux head, no
//!   dropout (Keras's `NASNetMobile(weights=None)`).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use nas_ops::init::init_weights;
use nas_ops::NasNet;
use nas_space::cost::network_cost;
use nas_space::{CellSpec, NetworkConfig, SpaceRng};
use nas_train::optim::ParamGroups;
use serde_json::json;

/// The network of a `--net` name: `small`, `mobile`, or any `N@P` network (`large:6@1056`).
pub fn config(net: &str) -> Result<NetworkConfig> {
    let spec = CellSpec::nasnet_a();
    let mut config = match net {
        "small" => {
            let mut c = NetworkConfig::parse_net("mobile:2@384", &spec)?;
            c.image_size = 32;
            c.num_classes = 10;
            c
        }
        "mobile" => NetworkConfig::mobile(),
        // Any other network: `large:6@1056` is timm's `nasnetalarge(num_features=1056)`.
        other => NetworkConfig::parse_net(other, &spec).map_err(|e| {
            anyhow::anyhow!("--net {other}: expected small, mobile or a network like large:6@1056 ({e})")
        })?,
    };
    config.use_aux_head = false;
    config.dense_dropout_keep_prob = 1.0;
    config.drop_path_keep_prob = 1.0;
    Ok(config)
}

/// The device of a `--device` name: `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    Ok(nas_train::device::parse_device(name)?)
}

/// Runs the benchmark on `device` and returns its JSON object. `stem` sets the ImageNet
/// stem's filters (timm's `stem_size`) and `image` the input size.
pub fn run(
    net: &str,
    batch: Option<usize>,
    steps: usize,
    device: &Device,
    stem: Option<usize>,
    image: Option<usize>,
) -> Result<serde_json::Value> {
    let mut config = config(net)?;
    if let Some(s) = stem {
        config.stem_multiplier = s as f64 / 32.0;
    }
    if let Some(i) = image {
        config.image_size = i;
    }
    let batch = batch.unwrap_or(if net == "small" { 64 } else { 32 });
    if batch == 0 || steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let spec = CellSpec::nasnet_a();
    let cost = network_cost(&spec, &config)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = NasNet::new(&spec, &config, 0, vb)?;
    init_weights(&varmap, 0)?;
    // BN moving statistics are VarMap entries too; they are never trained.
    let trainable: Vec<Var> = ParamGroups::from_varmap(&varmap).trainable().into_iter().map(|(_, v)| v).collect();
    let mut sgd = SGD::new(trainable, 0.01)?;
    let s = config.image_size;
    let xs = filler(batch * 3 * s * s, 1);
    let xs = Tensor::from_vec(xs, (batch, 3, s, s), device)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i * 7 % config.num_classes as u32).collect();
    let labels = Tensor::from_vec(labels, batch, device)?;

    let train_step = |sgd: &mut SGD| -> Result<()> {
        let logits = model.forward_t(&xs, true)?.logits;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        sgd.backward_step(&loss)?;
        Ok(())
    };
    train_step(&mut sgd)?; // warm-up: first-touch allocations, thread pools, kernel loading
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        train_step(&mut sgd)?;
    }
    device.synchronize()?;
    let train_s = start.elapsed().as_secs_f64() / steps as f64;

    // Inference as `nas infer` and evaluation run it: without gradients.
    let infer = || nas_ops::no_grad(|| model.forward_t(&xs, false));
    infer()?;
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        infer()?;
    }
    device.synchronize()?;
    let infer_s = start.elapsed().as_secs_f64() / steps as f64;

    Ok(json!({
        "net": net,
        "batch": batch,
        "steps": steps,
        "image_size": s,
        "params_total": cost.network.params_total(),
        "mult_adds_per_image": cost.network.mult_adds,
        "train_step_s": train_s,
        "train_images_per_s": batch as f64 / train_s,
        "infer_pass_s": infer_s,
        "infer_images_per_s": batch as f64 / infer_s,
        "peak_rss_mib": peak_rss_mib(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "device": format!("{device:?}"),
    }))
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB; `null` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Deterministic values in [−1, 1).
fn filler(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SpaceRng::new(seed);
    (0..n).map(|_| (2.0 * rng.unit_f64() - 1.0) as f32).collect()
}
