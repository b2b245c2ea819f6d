//! The same test bodies on every device the build has: each custom op (forward and the
//! gradients of every input) against the plain CPU path it replaces.
//!
//! On the CPU the fused ops (ReLU read inside the depthwise conv, ReLU inside the batch norm,
//! drop path inside the add, an eval batch norm inside the 1×1 conv) and the 1×1 conv op are checked against the unfused or plain
//! tensor composition; the other ops are the CPU reference themselves. Under the `cuda`
//! feature every op also runs on GPU 0 and is checked against the CPU path (the custom CPU
//! kernel, itself tested against the plain-tensor references in each kernel's file); those
//! tests need a GPU and fail, naming it, without one.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::batch_norm::{batch_norm_eval, batch_norm_train, BatchNormOptions};
use super::conv1x1::{conv1x1, conv1x1_reference, Affine, Conv1x1Options};
use super::depthwise::depthwise_conv2d;
use super::pool::{pool2d, PoolOptions};
use super::testutil::{assert_close, TestRng};
use super::{ConvOptions, Padding2d};
use crate::drop_path::{drop_path_add, scale_examples};

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Forward output and the gradients of `sum(f(inputs) * probe)` on `device`, copied back to
/// the CPU.
fn run_on(device: &Device, f: Op, inputs: &[Tensor], probe: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let loss = (&out * probe.to_device(device).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grads = ts
        .iter()
        .map(|t| grads.get(t).cloned().unwrap_or_else(|| t.zeros_like().unwrap()).to_device(&Device::Cpu).unwrap())
        .collect();
    (out.to_device(&Device::Cpu).unwrap(), grads)
}

/// Runs `op` on `device` and `reference` on the CPU with the same inputs, and compares the
/// outputs and every input's gradient.
fn check(device: &Device, what: &str, op: Op, reference: Op, inputs: &[Tensor], tol: f64) {
    let out = reference(inputs).unwrap();
    let probe = TestRng::new(99).tensor(out.dims(), out.dtype()).unwrap();
    let (want, want_grads) = run_on(&Device::Cpu, reference, inputs, &probe);
    let (got, got_grads) = run_on(device, op, inputs, &probe);
    let on = format!("{what} on {device:?}");
    assert_close(&got, &want, tol, &format!("{on}: forward"));
    for (i, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
        assert_close(g, w, tol, &format!("{on}: gradient of input {i}"));
    }
}

/// The devices of this build: the CPU, and GPU 0 under the `cuda` feature.
fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut out = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    out.push(Device::new_cuda(0).expect("the `cuda` feature's tests run on GPU 0, which could not be opened"));
    out
}

/// On the CPU, the fused op against the unfused composition; elsewhere, the op against the
/// CPU's op.
fn check_fused(device: &Device, what: &str, fused: Op, unfused: Op, inputs: &[Tensor], tol: f64) {
    if device.is_cpu() {
        check(device, what, fused, unfused, inputs, tol);
    } else {
        check(device, what, fused, fused, inputs, tol);
    }
}

/// Off the CPU, `op` against the same op on the CPU. On the CPU that would compare the op
/// with itself: the CPU kernels are checked against plain-tensor references and finite
/// differences in their own files, so there is nothing to do.
fn check_against_cpu(device: &Device, what: &str, op: Op, inputs: &[Tensor], tol: f64) {
    if !device.is_cpu() {
        check(device, what, op, op, inputs, tol);
    }
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-10
    } else {
        2e-4
    }
}

#[test]
fn depthwise_convs_on_every_device() {
    let mut rng = TestRng::new(7);
    for device in devices() {
        for (k, stride, dilation, h, w) in [(3, 1, 1, 7, 6), (5, 2, 1, 9, 8), (3, 1, 2, 8, 9), (7, 2, 1, 11, 5)] {
            for dtype in [DType::F32, DType::F64] {
                let (n, c) = (2, 3);
                let xs = rng.tensor(&[n, c, h, w], dtype).unwrap();
                let weight = rng.tensor(&[c, 1, k, k], dtype).unwrap();
                let opts = ConvOptions::same((h, w), (k, k), stride, dilation);
                let what = format!("depthwise k{k} s{stride} d{dilation} {h}x{w} {dtype:?}");
                let plain = |t: &[Tensor]| depthwise_conv2d(&t[0], &t[1], opts);
                let fused = |t: &[Tensor]| depthwise_conv2d(&t[0], &t[1], opts.relu_input(true));
                let unfused = |t: &[Tensor]| depthwise_conv2d(&t[0].relu()?, &t[1], opts);
                let inputs = [xs, weight];
                check_against_cpu(&device, &what, &plain, &inputs, tolerance(dtype));
                check_fused(&device, &format!("{what} relu"), &fused, &unfused, &inputs, tolerance(dtype));
            }
        }
    }
}

#[test]
fn pools_on_every_device() {
    let mut rng = TestRng::new(8);
    for device in devices() {
        for (k, stride, h, w) in [(3, 1, 7, 6), (3, 2, 8, 9), (3, 2, 9, 9), (1, 2, 6, 7), (5, 3, 11, 10)] {
            for dtype in [DType::F32, DType::F64] {
                let xs = rng.tensor(&[2, 3, h, w], dtype).unwrap();
                let pad = Padding2d::same(h, w, k, k, stride, 1);
                let max = |t: &[Tensor]| pool2d(&t[0], PoolOptions::max(k, stride, pad));
                let avg = |t: &[Tensor]| pool2d(&t[0], PoolOptions::avg(k, stride, pad));
                let what = format!("k{k} s{stride} {h}x{w} {dtype:?}");
                let inputs = [xs];
                check_against_cpu(&device, &format!("max pool {what}"), &max, &inputs, tolerance(dtype));
                check_against_cpu(&device, &format!("avg pool {what}"), &avg, &inputs, tolerance(dtype));
            }
        }
    }
}

#[test]
fn batch_norms_on_every_device() {
    let mut rng = TestRng::new(9);
    for device in devices() {
        for (n, c, h, w) in [(2, 3, 5, 4), (4, 5, 3, 3), (1, 2, 7, 1)] {
            for dtype in [DType::F32, DType::F64] {
                let xs = (rng.tensor(&[n, c, h, w], dtype).unwrap() * 3.0).unwrap();
                let gamma = rng.tensor(&[c], dtype).unwrap();
                let beta = rng.tensor(&[c], dtype).unwrap();
                let what = format!("batch norm {n}x{c}x{h}x{w} {dtype:?}");
                let bn = BatchNormOptions::new(1e-3);
                let plain = |t: &[Tensor]| Ok(batch_norm_train(&t[0], &t[1], &t[2], bn)?.ys);
                let fused = |t: &[Tensor]| Ok(batch_norm_train(&t[0], &t[1], &t[2], bn.relu_output(true))?.ys);
                let unfused = |t: &[Tensor]| batch_norm_train(&t[0], &t[1], &t[2], bn)?.ys.relu();
                let inputs = [xs, gamma, beta];
                check_against_cpu(&device, &what, &plain, &inputs, tolerance(dtype));
                check_fused(&device, &format!("{what} relu"), &fused, &unfused, &inputs, tolerance(dtype));
                // Eval mode, with moving statistics: the one-pass op against broadcast ops.
                let (mean, var) = (
                    rng.tensor(&[c], dtype).unwrap(),
                    (rng.tensor(&[c], dtype).unwrap().abs().unwrap() + 0.5).unwrap(),
                );
                let eval = |t: &[Tensor]| batch_norm_eval(&t[0], [&t[1], &t[2], &mean, &var], bn);
                let eval_relu =
                    |t: &[Tensor]| batch_norm_eval(&t[0], [&t[1], &t[2], &mean, &var], bn.relu_output(true));
                let broadcast = |t: &[Tensor]| {
                    let scale = (&t[1] / (&var + 1e-3)?.sqrt()?)?;
                    let shift = (&t[2] - (&mean * &scale)?)?;
                    t[0].broadcast_mul(&scale.reshape((1, c, 1, 1))?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)
                };
                let broadcast_relu = |t: &[Tensor]| broadcast(t)?.relu();
                check_fused(&device, &format!("{what} eval"), &eval, &broadcast, &inputs, tolerance(dtype));
                check_fused(
                    &device,
                    &format!("{what} eval relu"),
                    &eval_relu,
                    &broadcast_relu,
                    &inputs,
                    tolerance(dtype),
                );
            }
        }
    }
}

#[test]
fn drop_path_adds_on_every_device() {
    let mut rng = TestRng::new(10);
    for device in devices() {
        // The larger shape spans several of the CPU kernel's chunks when nothing is dropped.
        for (dtype, hw) in [(DType::F32, 5), (DType::F64, 5), (DType::F32, 70)] {
            let a = rng.tensor(&[4, 3, hw, hw], dtype).unwrap();
            let b = rng.tensor(&[4, 3, hw, hw], dtype).unwrap();
            let sa = [0.0, 1.25, 1.25, 0.0];
            let sb = [1.25, 0.0, 1.25, 1.25];
            let inputs = [a, b];
            let cases = [("both", true, true), ("left", true, false), ("right", false, true), ("none", false, false)];
            for (name, left, right) in cases {
                let (l, r) = (left.then_some(&sa[..]), right.then_some(&sb[..]));
                let fused = |t: &[Tensor]| drop_path_add(&t[0], l, &t[1], r);
                let unfused = |t: &[Tensor]| {
                    let x = l.map_or_else(|| Ok(t[0].clone()), |s| scale_examples(&t[0], s))?;
                    let y = r.map_or_else(|| Ok(t[1].clone()), |s| scale_examples(&t[1], s))?;
                    x + y
                };
                let what = format!("drop-path add ({name} dropped) {dtype:?}");
                check_fused(&device, &what, &fused, &unfused, &inputs, tolerance(dtype));
            }
        }
    }
}

#[test]
fn conv1x1_on_every_device() {
    let mut rng = TestRng::new(11);
    for device in devices() {
        // Batches below and above the thread count (gemm per sample, or threaded gemm).
        for (n, c, c_out, h, w) in [(1, 3, 5, 4, 3), (5, 7, 4, 3, 5), (9, 16, 24, 2, 2)] {
            for dtype in [DType::F32, DType::F64] {
                let xs = rng.tensor(&[n, c, h, w], dtype).unwrap();
                let weight = rng.tensor(&[c_out, c, 1, 1], dtype).unwrap();
                let plain = Conv1x1Options::default();
                let op = |t: &[Tensor]| conv1x1(&t[0], &t[1], plain);
                let reference = |t: &[Tensor]| conv1x1_reference(&t[0], &t[1], plain);
                let what = format!("conv1x1 {n}x{c}x{h}x{w} -> {c_out} {dtype:?}");
                let inputs = [xs, weight];
                check_fused(&device, &what, &op, &reference, &inputs, tolerance(dtype));
                let relu = Conv1x1Options { relu_input: true, affine: None };
                let fused = |t: &[Tensor]| conv1x1(&t[0], &t[1], relu);
                let unfused = |t: &[Tensor]| conv1x1_reference(&t[0].relu()?, &t[1], plain);
                check_fused(&device, &format!("{what} relu"), &fused, &unfused, &inputs, tolerance(dtype));
                // With a batch norm's eval affine folded in: every input's gradient, the
                // scale's and shift's included, with each combination of the two ReLUs.
                let scale = rng.tensor(&[c_out], dtype).unwrap();
                let shift = rng.tensor(&[c_out], dtype).unwrap();
                let inputs = [inputs[0].clone(), inputs[1].clone(), scale, shift];
                for (relu_in, relu_out) in [(false, false), (true, false), (false, true), (true, true)] {
                    fn opts(t: &[Tensor], relu_in: bool, relu_out: bool) -> Conv1x1Options<'_> {
                        let affine = Affine { scale: &t[2], shift: &t[3], relu_output: relu_out };
                        Conv1x1Options { relu_input: relu_in, affine: Some(affine) }
                    }
                    let fused = |t: &[Tensor]| conv1x1(&t[0], &t[1], opts(t, relu_in, relu_out));
                    let unfused = |t: &[Tensor]| conv1x1_reference(&t[0], &t[1], opts(t, relu_in, relu_out));
                    let what = format!("{what} affine relu_in={relu_in} relu_out={relu_out}");
                    check_fused(&device, &what, &fused, &unfused, &inputs, tolerance(dtype));
                }
            }
        }
    }
}
