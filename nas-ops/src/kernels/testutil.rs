//! Shared test helpers for kernels: seeded random tensors (candle's CPU device cannot be
//! seeded), closeness checks, and gradients against central finite differences.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Seeded test data from the workspace's one generator (`nas_space::SpaceRng`).
pub struct TestRng(nas_space::SpaceRng);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(nas_space::SpaceRng::new(seed))
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        2.0 * self.0.unit_f64() - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }

    /// A tensor of uniform [-1, 1) values with the given shape and dtype.
    pub fn tensor(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.uniform()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
    }
}

/// The height and width of an `(n, c, h, w)` tensor.
pub fn hw(t: &Tensor) -> (usize, usize) {
    let (_, _, h, w) = t.dims4().expect("an (n, c, h, w) tensor");
    (h, w)
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?;
    d.to_scalar::<f64>()
}

/// Asserts `|a - b| <= tol * (1 + max|b|)` elementwise-max.
/// Also asserts that `a` has NaN exactly where `b` has (an output element a kernel never
/// wrote is NaN in debug builds, see `kernels::Output`).
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let nan_at = |t: &Tensor| -> Vec<bool> {
        let v: Vec<f64> = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.is_nan()).collect()
    };
    let (nan_a, nan_b) = (nan_at(a), nan_at(b));
    if let Some(i) = nan_a.iter().zip(&nan_b).position(|(x, y)| x != y) {
        panic!("{what}: element {i} is NaN in one tensor only ({} vs {})", nan_a[i], nan_b[i]);
    }
    let diff = max_abs_diff(a, b).unwrap();
    let scale = b.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = scale.to_scalar::<f64>().unwrap();
    assert!(diff <= tol * (1.0 + scale), "{what}: max abs diff {diff:e} (scale {scale:e}, tol {tol:e})");
}

/// Analytic gradients of `sum(f(inputs) * probe)` with respect to every input, through
/// candle's backprop. `probe` is a fixed random tensor, so every output element counts.
pub fn analytic_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    probe: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = (f(&ts)? * probe)?.sum_all()?;
    let grads = loss.backward()?;
    ts.iter().map(|t| Ok(grads.get(t).cloned().unwrap_or(t.zeros_like()?))).collect()
}

/// Checks the gradients of `f` (taking f64 inputs) against central finite differences of
/// `sum(f(inputs) * probe)`, element by element (for small tensors).
pub fn check_finite_differences(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], eps: f64, tol: f64) {
    let out = f(inputs).unwrap();
    let mut rng = TestRng::new(1234);
    let probe = rng.tensor(out.dims(), DType::F64).unwrap();
    let grads = analytic_grads(f, inputs, &probe).unwrap();
    let loss =
        |xs: &[Tensor]| -> f64 { (f(xs).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
    for (i, input) in inputs.iter().enumerate() {
        let base: Vec<f64> = input.flatten_all().unwrap().to_vec1().unwrap();
        let analytic: Vec<f64> = grads[i].flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, input.dims(), &Device::Cpu).unwrap();
                loss(&xs)
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[j]).abs();
            assert!(
                err <= tol * (1.0 + numeric.abs()),
                "input {i}, element {j}: analytic {} vs numeric {numeric} (err {err:e})",
                analytic[j]
            );
        }
    }
}

/// A separable half `(c_in, c_out, kernel, stride, dilation)` with ReLUs `(input, output)`:
/// random weights, γ around 1.5 and random moving statistics (variances in [0.5, 1)).
pub fn separable_half(
    rng: &mut TestRng,
    (c_in, c_out, k, stride, dilation): (usize, usize, usize, usize, usize),
    relu: (bool, bool),
    dtype: DType,
) -> super::separable::SeparableHalf {
    let mut vector =
        |scale: f64, offset: f64| ((rng.tensor(&[c_out], dtype).unwrap() * scale).unwrap() + offset).unwrap();
    let bn = super::batch_norm::BatchNormParams {
        gamma: vector(1.0, 1.5),
        beta: vector(1.0, 0.0),
        running_mean: vector(0.3, 0.0),
        running_var: vector(0.25, 0.75),
        eps: 1e-3,
    };
    super::separable::SeparableHalf {
        depthwise: rng.tensor(&[c_in, 1, k, k], dtype).unwrap(),
        stride,
        dilation,
        pointwise: rng.tensor(&[c_out, c_in, 1, 1], dtype).unwrap(),
        bn,
        relu_input: relu.0,
        relu_output: relu.1,
    }
}
