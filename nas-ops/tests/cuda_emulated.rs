//! The CUDA kernels (`kernels/nas_ops.cu`) checked without a GPU: compiled as host C++ with
//! g++ through `tests/cuda_emulation/emulate.h` (every thread of a block a real thread, so
//! `__syncthreads` and shared memory behave as on a GPU; blocks one after another), run on
//! random inputs, and compared with the CPU ops (forward, and gradients through candle's
//! backprop). This checks the kernels' index arithmetic, padding, strides, tie rules and
//! reductions; it does not check what only a GPU shows (launch limits, memory
//! coalescing, speed): the `cuda` feature's own tests do, on a GPU.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor, Var};
use nas_ops::drop_path::drop_path_add;
use nas_ops::kernels::batch_norm::{batch_norm_train, BatchNormOptions};
use nas_ops::kernels::depthwise::depthwise_conv2d;
use nas_ops::kernels::pool::{pool2d, PoolOptions};
use nas_ops::kernels::{ConvOptions, Padding2d};

/// The harness, built once per test run.
fn harness() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = std::env::temp_dir().join(format!("nas-cuda-emulation-{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror"])
            .arg(dir.join("tests/cuda_emulation/harness.cpp"))
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| {
                panic!("this test compiles the CUDA kernels as C++ with `{cxx}`, which failed to run: {e}")
            });
        assert!(status.success(), "{cxx} could not compile the emulated kernels ({status})");
        out
    })
}

/// Runs `kernel` with integer parameters and f64 arrays; returns its output arrays.
fn run(kernel: &str, params: &[i64], arrays: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut input = params.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
    input.push('\n');
    for a in arrays {
        input.push_str(&a.len().to_string());
        for v in a {
            input.push(' ');
            input.push_str(&format!("{v:e}"));
        }
        input.push('\n');
    }
    let mut child = Command::new(harness())
        .arg(kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the harness runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "harness {kernel} failed: {}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut it = line.split_whitespace();
            let n: usize = it.next().unwrap().parse().unwrap();
            let v: Vec<f64> = it.map(|x| x.parse().unwrap()).collect();
            assert_eq!(v.len(), n);
            v
        })
        .collect()
}

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn tensor(&mut self, dims: &[usize]) -> Tensor {
        let n = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.uniform()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_near(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-9 * scale, "{what}: element {i}: kernel {g} vs CPU {w}");
    }
}

/// Gradients of `sum(f(inputs) * dy)` with respect to every input.
fn grads(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], dy: &Tensor) -> Vec<Vec<f64>> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let g = (f(&ts).unwrap() * dy).unwrap().sum_all().unwrap().backward().unwrap();
    ts.iter().map(|t| flat(g.get(t).unwrap())).collect()
}

#[test]
fn emulated_depthwise_kernels_match_the_cpu() {
    let mut rng = Rng(1);
    for (n, c, h, w, k, stride, dilation) in [
        (2, 3, 7, 6, 3, 1, 1),
        (1, 2, 9, 8, 5, 2, 1),
        (2, 2, 8, 9, 3, 1, 2),
        (1, 3, 11, 5, 7, 2, 1),
        (3, 1, 4, 4, 3, 2, 2),
    ] {
        let pad = Padding2d::same(h, w, k, k, stride, dilation);
        let ho = Padding2d::out_size(h, pad.top, pad.bottom, k, stride, dilation);
        let wo = Padding2d::out_size(w, pad.left, pad.right, k, stride, dilation);
        let (x, wt, dy) = (rng.tensor(&[n, c, h, w]), rng.tensor(&[c, 1, k, k]), rng.tensor(&[n, c, ho, wo]));
        let what = format!("depthwise {n}x{c}x{h}x{w} k{k} s{stride} d{dilation}");
        for relu in [0, 1] {
            let geom = [n, c, h, w, k, k, ho, wo, stride, dilation, pad.top, pad.left].map(|v| v as i64).to_vec();
            let params = [geom.clone(), vec![relu]].concat();
            let opts = ConvOptions { stride, dilation, padding: pad, relu_input: relu == 1 };
            let f = |t: &[Tensor]| depthwise_conv2d(&t[0], &t[1], opts);
            let y = f(&[x.clone(), wt.clone()]).unwrap();
            let got = run("dw_fwd", &params, &[flat(&x), flat(&wt)]);
            assert_near(&got[0], &flat(&y), &format!("{what} relu {relu}: forward"));
            let g = grads(&f, &[x.clone(), wt.clone()], &dy);
            let got = run("dw_bwd_weight", &params, &[flat(&x), flat(&dy)]);
            assert_near(&got[0], &g[1], &format!("{what} relu {relu}: weight gradient"));
            if relu == 0 {
                let got = run("dw_bwd_input", &params, &[flat(&dy), flat(&wt)]);
                assert_near(&got[0], &g[0], &format!("{what}: input gradient"));
            }
        }
    }
}

#[test]
fn emulated_pooling_kernels_match_the_cpu() {
    let mut rng = Rng(2);
    for (n, c, h, w, k, stride) in
        [(2, 3, 7, 6, 3, 1), (1, 2, 8, 9, 3, 2), (2, 1, 9, 9, 3, 2), (1, 2, 6, 7, 1, 2), (1, 1, 11, 10, 5, 3)]
    {
        let pad = Padding2d::same(h, w, k, k, stride, 1);
        let ho = Padding2d::out_size(h, pad.top, pad.bottom, k, stride, 1);
        let wo = Padding2d::out_size(w, pad.left, pad.right, k, stride, 1);
        // Rounded inputs make ties, which must go to the first element of the window.
        let x = (rng.tensor(&[n, c, h, w]) * 3.0).unwrap().round().unwrap();
        let dy = rng.tensor(&[n, c, ho, wo]);
        let params = [n, c, h, w, ho, wo, k, stride, pad.top, pad.left].map(|v| v as i64);
        let what = format!("pool {n}x{c}x{h}x{w} k{k} s{stride}");
        let max = |t: &[Tensor]| pool2d(&t[0], PoolOptions::max(k, stride, pad));
        let avg = |t: &[Tensor]| pool2d(&t[0], PoolOptions::avg(k, stride, pad));
        assert_near(
            &run("max_pool_fwd", &params, &[flat(&x)])[0],
            &flat(&max(std::slice::from_ref(&x)).unwrap()),
            &format!("max {what}"),
        );
        assert_near(
            &run("avg_pool_fwd", &params, &[flat(&x)])[0],
            &flat(&avg(std::slice::from_ref(&x)).unwrap()),
            &format!("avg {what}"),
        );
        let g = grads(&max, std::slice::from_ref(&x), &dy);
        assert_near(&run("max_pool_bwd", &params, &[flat(&x), flat(&dy)])[0], &g[0], &format!("max {what}: gradient"));
        let g = grads(&avg, std::slice::from_ref(&x), &dy);
        assert_near(&run("avg_pool_bwd", &params, &[flat(&dy)])[0], &g[0], &format!("avg {what}: gradient"));
    }
}

#[test]
fn emulated_batch_norm_kernels_match_the_cpu() {
    let mut rng = Rng(3);
    let eps = 1e-3;
    let bn = BatchNormOptions::new(eps);
    for (n, c, h, w) in [(2, 3, 5, 4), (4, 5, 3, 3), (1, 2, 7, 1), (3, 1, 17, 16)] {
        let x = ((rng.tensor(&[n, c, h, w]) * 3.0).unwrap() + 0.5).unwrap();
        let (gamma, beta, dy) = (rng.tensor(&[c]), rng.tensor(&[c]), rng.tensor(&[n, c, h, w]));
        let what = format!("batch norm {n}x{c}x{h}x{w}");
        let cpu = batch_norm_train(&x, &gamma, &beta, bn).unwrap();
        let stats = run("bn_stats", &[n as i64, c as i64, (h * w) as i64, 0], &[flat(&x)]);
        assert_near(&stats[0], &[flat(&cpu.mean), flat(&cpu.var)].concat(), &format!("{what}: statistics"));
        let mean = stats[0][..c].to_vec();
        let invstd: Vec<f64> = stats[0][c..].iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        for relu in [0, 1] {
            let f = |t: &[Tensor]| -> Result<Tensor> {
                Ok(batch_norm_train(&t[0], &t[1], &t[2], bn.relu_output(relu == 1))?.ys)
            };
            let params = [n as i64, c as i64, (h * w) as i64, relu];
            let y = f(&[x.clone(), gamma.clone(), beta.clone()]).unwrap();
            let got = run("bn_fwd", &params, &[flat(&x), flat(&gamma), flat(&beta), mean.clone(), invstd.clone()]);
            assert_near(&got[0], &flat(&y), &format!("{what} relu {relu}: forward"));
        }
        let f = |t: &[Tensor]| -> Result<Tensor> { Ok(batch_norm_train(&t[0], &t[1], &t[2], bn)?.ys) };
        let g = grads(&f, &[x.clone(), gamma.clone(), beta.clone()], &dy);
        let got = run(
            "bn_bwd",
            &[n as i64, c as i64, (h * w) as i64, 0],
            &[flat(&x), flat(&gamma), flat(&dy), mean.clone(), invstd.clone()],
        );
        assert_near(&got[0], &[g[0].clone(), g[1].clone(), g[2].clone()].concat(), &format!("{what}: gradients"));
    }
}

#[test]
fn emulated_drop_path_add_matches_the_cpu() {
    let mut rng = Rng(4);
    let (a, b) = (rng.tensor(&[4, 3, 9, 9]), rng.tensor(&[4, 3, 9, 9]));
    let (sa, sb) = (vec![0.0, 1.25, 1.25, 0.0], vec![1.25, 0.0, 1.25, 1.25]);
    for (left, right) in [(true, true), (true, false), (false, true)] {
        let (l, r) = (left.then_some(&sa[..]), right.then_some(&sb[..]));
        let want = drop_path_add(&a, l, &b, r).unwrap();
        let none = vec![0.0; 4];
        let got = run(
            "scaled_add",
            &[243, 972, i64::from(left), i64::from(right)],
            &[flat(&a), l.map_or(none.clone(), <[f64]>::to_vec), flat(&b), r.map_or(none, <[f64]>::to_vec)],
        );
        assert_near(&got[0], &flat(&want), &format!("drop-path add ({left}, {right})"));
    }
}
