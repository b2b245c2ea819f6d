//! Shared test helpers for kernels: seeded random tensors (candle's CPU device cannot be
//! seeded), closeness checks, and gradients against central finite differences.

use candle_core::{DType, Device, Result, Tensor, Var};

/// A small deterministic generator (SplitMix64) for test data.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
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
