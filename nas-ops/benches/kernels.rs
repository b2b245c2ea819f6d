//! Criterion benchmarks of the custom CPU kernels against candle's own path, on NASNet-sized
//! shapes, forward (`fwd`) and forward plus backward (`fwd_bwd`).
//!
//! Every group is named `op/pass/shape` and holds a `custom` function (the nas-ops kernel) and a
//! `candle` function (the same contract from plain candle ops: the `_reference` functions,
//! or `Tensor::conv2d` for 1x1 convolutions), so the report reads as a side-by-side comparison.
//! Some groups add a third function for the nearest path that candle itself offers:
//! `candle_native` (candle's VALID-only pooling after explicit zero padding, forward only, since
//! candle has no pooling backward unless kernel == stride; zeros are not TF's ignored padding, so
//! it only shows the cost) and `candle_nn` (`candle_nn::BatchNorm` in training mode, which also
//! updates its running statistics).
//!
//! The forward plus backward harness is the same on every side: the inputs are `Var`s made once,
//! and each iteration runs the forward, a `sum_all()` loss and `backward()`.
//! Inputs come from SplitMix64 because candle's CPU device cannot be seeded.
//!
//! Run with `cargo bench -p nas-ops --bench kernels` (a few minutes on 2 cores); pass a filter
//! such as `-- depthwise/fwd` to run a subset.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, ModuleT, VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};
use nas_ops::kernels::batch_norm::{batch_norm_train, batch_norm_train_reference, BatchNormOptions};
use nas_ops::kernels::conv1x1::{conv1x1, Conv1x1Options};
use nas_ops::kernels::depthwise::{depthwise_conv2d, depthwise_conv2d_reference};
use nas_ops::kernels::pool::{pool2d, pool2d_reference, PoolKind, PoolOptions};
use nas_ops::kernels::{ConvOptions, Padding2d};

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// TF-Slim's NASNet batch norm epsilon.
const BN_EPS: f64 = 1e-3;

/// SplitMix64, enough to fill benchmark inputs deterministically.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// An f32 CPU tensor of `shape` filled from SplitMix64 seeded with `seed`.
fn filled(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = SplitMix64(seed);
    let data: Vec<f32> = (0..shape.iter().product()).map(|_| rng.uniform()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("benchmark input")
}

fn var(xs: &Tensor) -> Var {
    Var::from_tensor(xs).expect("benchmark var")
}

/// `32x64x32x32`.
fn shape_name(shape: [usize; 4]) -> String {
    shape.map(|d| d.to_string()).join("x")
}

/// A group with the settings every case here uses: few samples, each a fixed number of
/// iterations (flat sampling, since one iteration of the slower paths takes tens of ms or more).
fn group<'a>(c: &'a mut Criterion, name: &str) -> Group<'a> {
    let mut group = c.benchmark_group(name);
    group.sampling_mode(SamplingMode::Flat);
    group
}

/// Times `f` alone.
fn bench_fwd(group: &mut Group<'_>, id: &str, f: impl Fn() -> Result<Tensor>) {
    group.bench_function(id, |b| b.iter(|| black_box(f().expect("forward"))));
}

/// Times `f`, a `sum_all()` loss and `backward()`.
fn bench_fwd_bwd(group: &mut Group<'_>, id: &str, f: impl Fn() -> Result<Tensor>) {
    group.bench_function(id, |b| {
        b.iter(|| {
            let ys = f().expect("forward");
            black_box(ys.sum_all().and_then(|loss| loss.backward()).expect("backward"))
        })
    });
}

fn depthwise(c: &mut Criterion) {
    for (seed, (shape, k, stride)) in
        [([32, 64, 32, 32], 3, 1), ([32, 44, 56, 56], 5, 2), ([32, 88, 28, 28], 7, 1)].into_iter().enumerate()
    {
        let [_, ch, h, w] = shape;
        let xs = filled(&shape, 2 * seed as u64);
        let weight = filled(&[ch, 1, k, k], 2 * seed as u64 + 1);
        let opts = ConvOptions::same((h, w), (k, k), stride, 1);
        let case = format!("{}_k{k}s{stride}", shape_name(shape));

        let mut g = group(c, &format!("depthwise/fwd/{case}"));
        bench_fwd(&mut g, "custom", || depthwise_conv2d(&xs, &weight, opts));
        bench_fwd(&mut g, "candle", || depthwise_conv2d_reference(&xs, &weight, opts));
        g.finish();

        let (xs, weight) = (var(&xs), var(&weight));
        let mut g = group(c, &format!("depthwise/fwd_bwd/{case}"));
        bench_fwd_bwd(&mut g, "custom", || depthwise_conv2d(&xs, &weight, opts));
        bench_fwd_bwd(&mut g, "candle", || depthwise_conv2d_reference(&xs, &weight, opts));
        g.finish();
    }
}

fn pooling(c: &mut Criterion) {
    let kinds = [("max_pool", PoolKind::Max), ("avg_pool", PoolKind::Avg)];
    for (seed, (shape, k, stride)) in [([32, 64, 32, 32], 3, 1), ([32, 44, 56, 56], 3, 2)].into_iter().enumerate() {
        let [_, _, h, w] = shape;
        let xs = filled(&shape, 10 + seed as u64);
        let pad = Padding2d::same(h, w, k, k, stride, 1);
        let case = format!("{}_k{k}s{stride}", shape_name(shape));
        for (name, kind) in kinds {
            let opts = PoolOptions { kind, kernel: k, stride, padding: pad };
            let mut g = group(c, &format!("{name}/fwd/{case}"));
            bench_fwd(&mut g, "custom", || pool2d(&xs, opts));
            bench_fwd(&mut g, "candle", || pool2d_reference(&xs, opts));
            bench_fwd(&mut g, "candle_native", || {
                let padded = xs.pad_with_zeros(2, pad.top, pad.bottom)?.pad_with_zeros(3, pad.left, pad.right)?;
                if kind == PoolKind::Max {
                    padded.max_pool2d_with_stride(k, stride)
                } else {
                    padded.avg_pool2d_with_stride(k, stride)
                }
            });
            g.finish();

            let xs = var(&xs);
            let mut g = group(c, &format!("{name}/fwd_bwd/{case}"));
            bench_fwd_bwd(&mut g, "custom", || pool2d(&xs, opts));
            bench_fwd_bwd(&mut g, "candle", || pool2d_reference(&xs, opts));
            g.finish();
        }
    }
}

fn batch_norm(c: &mut Criterion) {
    for (seed, shape) in [[32, 64, 32, 32], [32, 176, 28, 28]].into_iter().enumerate() {
        let ch = shape[1];
        let xs = filled(&shape, 20 + seed as u64);
        // One set of Var-backed parameters for all three sides, from candle-nn's own builder.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
        let bn = candle_nn::batch_norm(ch, BatchNormConfig::from(BN_EPS), vb.pp("bn")).expect("candle-nn batch norm");
        let (gamma, beta) = bn.weight_and_bias().map(|(g, b)| (g.clone(), b.clone())).expect("affine batch norm");
        let case = shape_name(shape);

        let mut g = group(c, &format!("batch_norm/fwd/{case}"));
        bench_fwd(&mut g, "custom", || Ok(batch_norm_train(&xs, &gamma, &beta, BatchNormOptions::new(BN_EPS))?.ys));
        bench_fwd(&mut g, "candle", || {
            Ok(batch_norm_train_reference(&xs, &gamma, &beta, BatchNormOptions::new(BN_EPS))?.ys)
        });
        bench_fwd(&mut g, "candle_nn", || bn.forward_t(&xs, true));
        g.finish();

        let xs = var(&xs);
        let mut g = group(c, &format!("batch_norm/fwd_bwd/{case}"));
        bench_fwd_bwd(&mut g, "custom", || Ok(batch_norm_train(&xs, &gamma, &beta, BatchNormOptions::new(BN_EPS))?.ys));
        bench_fwd_bwd(&mut g, "candle", || {
            Ok(batch_norm_train_reference(&xs, &gamma, &beta, BatchNormOptions::new(BN_EPS))?.ys)
        });
        bench_fwd_bwd(&mut g, "candle_nn", || bn.forward_t(&xs, true));
        g.finish();
    }
}

fn pointwise(c: &mut Criterion) {
    for (seed, (shape, c_out)) in [([32, 176, 28, 28], 176), ([32, 64, 32, 32], 128)].into_iter().enumerate() {
        let xs = filled(&shape, 30 + 2 * seed as u64);
        let weight = filled(&[c_out, shape[1], 1, 1], 31 + 2 * seed as u64);
        let case = format!("{}_to{c_out}", shape_name(shape));

        let mut g = group(c, &format!("conv1x1/fwd/{case}"));
        bench_fwd(&mut g, "custom", || conv1x1(&xs, &weight, Conv1x1Options::default()));
        bench_fwd(&mut g, "candle", || xs.conv2d(&weight, 0, 1, 1, 1));
        g.finish();

        let (xs, weight) = (var(&xs), var(&weight));
        let mut g = group(c, &format!("conv1x1/fwd_bwd/{case}"));
        bench_fwd_bwd(&mut g, "custom", || conv1x1(&xs, &weight, Conv1x1Options::default()));
        bench_fwd_bwd(&mut g, "candle", || xs.conv2d(&weight, 0, 1, 1, 1));
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = depthwise, pooling, batch_norm, pointwise
}
criterion_main!(benches);
