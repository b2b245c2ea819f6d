//! The benchmark: times one training step ([`Trainer::train_step`] with plain SGD: forward,
//! backward, update) and one inference pass ([`Trainer::predict`]) of a standard network.
//!
//! - `small` (default batch 64): ImageNet skeleton, NASNet-A, N = 2, P = 384 (F = 16),
//!   stem 32 filters, 32×32 input, 10 classes, no aux head, no dropout, no drop path:
//!   Keras 3's `NASNet(input_shape=(32,32,3), penultimate_filters=384, num_blocks=2,
//!   stem_block_filters=32, skip_reduction=False, filter_multiplier=2, classes=10)`.
//! - `mobile` (default batch 32): NASNet-A Mobile at 224, 1000 classes, no aux head, no
//!   dropout (Keras's `NASNetMobile(weights=None)`).
//! - any other network, such as `large:6@1056` (timm's `nasnetalarge(num_features=1056)`).
//!
//! The result is a [`BenchReport`], a versioned JSON object that scripts read
//! (`nas_space::files::JsonFile`).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use nas_data::Batch;
use nas_space::cost::network_cost;
use nas_space::files::{self, JsonFile};
use nas_space::{CellSpec, NetworkConfig, SpaceRng};
use serde::{Deserialize, Serialize};

use crate::optim::{OptimSettings, OptimizerConfig};
use crate::schedule::LrSchedule;
use crate::trainer::{TrainConfig, Trainer};
use crate::TrainError;

/// What to time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// `small`, `mobile`, or any network such as `large:6@1056` (see [`network`]).
    pub net: String,
    /// Images per step (default: 64 for `small`, 32 otherwise).
    pub batch: Option<usize>,
    /// Timed steps, after one warm-up step.
    pub steps: usize,
    /// Filters of the ImageNet stem conv (timm's `stem_size`; the networks' default is 32).
    pub stem_size: Option<usize>,
    /// Input side (default: the network's).
    pub image_size: Option<usize>,
}

impl Default for BenchOptions {
    /// `small` at its batch, 5 timed steps.
    fn default() -> BenchOptions {
        BenchOptions { net: "small".into(), batch: None, steps: 5, stem_size: None, image_size: None }
    }
}

/// What the benchmark measured. Written as JSON by `nas bench --json`; the field names are
/// stable within a version (`JsonFile::VERSION`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The network's name as given.
    pub net: String,
    /// Images per step.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Input side.
    pub image_size: usize,
    /// Parameters, BN statistics included.
    pub params_total: u64,
    /// Mult-adds of one image's inference.
    pub mult_adds_per_image: u64,
    /// Seconds per training step.
    pub train_step_s: f64,
    /// Training images per second.
    pub train_images_per_s: f64,
    /// Seconds per inference pass.
    pub infer_pass_s: f64,
    /// Inference images per second.
    pub infer_images_per_s: f64,
    /// Peak resident set size of the process in MiB (Linux `VmHWM`; `null` elsewhere).
    pub peak_rss_mib: Option<f64>,
    /// Cores available to the process.
    pub threads: usize,
    /// The device, as candle names it (`Cpu`, `Cuda(..)`).
    pub device: String,
}

impl JsonFile for BenchReport {
    const VERSION: u64 = 1;
}

impl BenchReport {
    /// The report as pretty-printed JSON, with its `version`.
    pub fn to_json(&self) -> String {
        files::to_json_pretty(self)
    }

    /// Reads a report written by [`BenchReport::to_json`]. A report of another version is
    /// refused before its fields are read; errors name the file.
    pub fn read(path: &Path) -> Result<BenchReport, TrainError> {
        Ok(files::read_json(path)?)
    }
}

/// The network of a benchmark name: `small`, `mobile`, or any `N@P` network (`large:6@1056`);
/// no aux head, no dropout, no drop path.
pub fn network(net: &str) -> Result<NetworkConfig, TrainError> {
    let spec = CellSpec::nasnet_a();
    let err = |message: String| TrainError::Config { field: "net", message };
    let mut config = match net {
        "small" => {
            let mut c = NetworkConfig::parse_net("mobile:2@384", &spec).map_err(|e| err(e.to_string()))?;
            c.image_size = 32;
            c.num_classes = 10;
            c
        }
        "mobile" => NetworkConfig::mobile(),
        other => NetworkConfig::parse_net(other, &spec)
            .map_err(|e| err(format!("`{other}`: expected small, mobile or a network like large:6@1056 ({e})")))?,
    };
    config.use_aux_head = false;
    config.dense_dropout_keep_prob = 1.0;
    config.drop_path_keep_prob = 1.0;
    Ok(config)
}

/// Runs the benchmark on `device`, on rayon's pool (see [`crate::on_pool`]).
pub fn run(options: &BenchOptions, device: &Device) -> Result<BenchReport, TrainError> {
    crate::on_pool(|| run_here(options, device))
}

fn run_here(options: &BenchOptions, device: &Device) -> Result<BenchReport, TrainError> {
    let mut config = network(&options.net)?;
    if let Some(s) = options.stem_size {
        config.stem_multiplier = s as f64 / 32.0;
    }
    if let Some(i) = options.image_size {
        config.image_size = i;
    }
    let batch = options.batch.unwrap_or(if options.net == "small" { 64 } else { 32 });
    if batch == 0 || options.steps == 0 {
        return Err(TrainError::Config {
            field: "batch",
            message: "the batch and the steps must be at least 1".into(),
        });
    }
    let steps = options.steps;
    let spec = CellSpec::nasnet_a();
    let cost = network_cost(&spec, &config).map_err(|e| TrainError::Config { field: "net", message: e.to_string() })?;
    // Plain SGD at a constant rate: no momentum, weight decay, clipping, label smoothing or
    // weight average.
    let train = TrainConfig {
        total_steps: steps as u64 + 1,
        schedule: LrSchedule::Constant { lr: 0.01 },
        optim: OptimSettings {
            optimizer: OptimizerConfig::Sgd { momentum: 0.0, nesterov: false },
            weight_decay: 0.0,
            clip_global_norm: None,
        },
        label_smoothing: 0.0,
        aux_weight: 0.0,
        seed: 0,
        ema_decay: None,
    };
    let mut trainer = Trainer::new_on(&spec, &config, train, device)?;
    let s = config.image_size;
    let images = uniform_tensor((batch, 3, s, s), 1, device)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i * 7 % config.num_classes as u32).collect();
    let labels = Tensor::from_vec(labels, batch, device)?;
    let batch_of_images = Batch { images: images.clone(), labels, indices: (0..batch).collect(), skipped: 0 };

    trainer.train_step(&batch_of_images)?; // warm-up: first-touch allocations, thread pools, kernel loading
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        trainer.train_step(&batch_of_images)?;
    }
    device.synchronize()?;
    let train_s = start.elapsed().as_secs_f64() / steps as f64;

    // Inference as `nas infer` and evaluation run it: without gradients.
    trainer.predict(&images)?;
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        trainer.predict(&images)?;
    }
    device.synchronize()?;
    let infer_s = start.elapsed().as_secs_f64() / steps as f64;

    Ok(BenchReport {
        net: options.net.clone(),
        batch,
        steps,
        image_size: s,
        params_total: cost.network.params_total(),
        mult_adds_per_image: cost.network.mult_adds,
        train_step_s: train_s,
        train_images_per_s: batch as f64 / train_s,
        infer_pass_s: infer_s,
        infer_images_per_s: batch as f64 / infer_s,
        peak_rss_mib: peak_rss_mib(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        device: format!("{device:?}"),
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB; `None` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A tensor of `shape` filled with values uniform in [−1, 1) from a [`SpaceRng`] seeded with
/// `seed`: the same on every run and platform.
pub(crate) fn uniform_tensor(
    shape: impl Into<candle_core::Shape>,
    seed: u64,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let shape = shape.into();
    let mut rng = SpaceRng::new(seed);
    let values: Vec<f32> = (0..shape.elem_count()).map(|_| (2.0 * rng.unit_f64() - 1.0) as f32).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny benchmark: its report names what it ran, its rates agree with its times, and the
    /// report reads back; another version is refused, naming the file and the field.
    #[test]
    fn a_tiny_bench_reports_and_reads_back() {
        let options = BenchOptions { net: "cifar:1@24".into(), batch: Some(2), steps: 1, ..BenchOptions::default() };
        let report = run(&options, &Device::Cpu).unwrap();
        assert_eq!((report.batch, report.steps, report.image_size), (2, 1, 32));
        let cost = network_cost(&CellSpec::nasnet_a(), &network("cifar:1@24").unwrap()).unwrap();
        assert_eq!(report.params_total, cost.network.params_total());
        assert!(report.train_step_s > 0.0 && report.infer_pass_s > 0.0, "{report:?}");
        assert!((report.train_images_per_s * report.train_step_s - 2.0).abs() < 1e-9);
        assert_eq!(report.device, "Cpu");

        let dir = std::env::temp_dir().join(format!("nas-train-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.json");
        std::fs::write(&path, report.to_json()).unwrap();
        assert_eq!(BenchReport::read(&path).unwrap(), report);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        for field in ["train_images_per_s", "infer_images_per_s", "peak_rss_mib", "params_total", "version"] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
        std::fs::write(&path, report.to_json().replace("\"version\": 1", "\"version\": 2")).unwrap();
        let err = BenchReport::read(&path).unwrap_err().to_string();
        assert!(err.contains("bench.json") && err.contains("version 2 is not supported"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_networks_and_sizes_are_named() {
        let err = network("huge").unwrap_err().to_string();
        assert!(err.contains("`huge`: expected small, mobile"), "{err}");
        let small = network("small").unwrap();
        assert_eq!((small.image_size, small.num_classes, small.use_aux_head), (32, 10, false));
        let options = BenchOptions { steps: 0, ..BenchOptions::default() };
        let err = run(&options, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn uniform_tensors_are_seeded() {
        let a = uniform_tensor((2, 3), 4, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = uniform_tensor((2, 3), 4, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = uniform_tensor((2, 3), 5, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)), "{a:?}");
    }
}
