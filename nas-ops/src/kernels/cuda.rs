//! Launching the CUDA twins of the custom ops (`kernels/nas_ops.cu`, compiled to PTX by
//! `build.rs` under the `cuda` feature). Each op's `cuda_fwd` calls one function here; the
//! geometry structs are laid out exactly as the kernels' `DwGeom` and `PoolGeom`.

use candle_core::backend::BackendStorage;
pub(crate) use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nas_ops.ptx"));
const MODULE: &str = "nas_ops";
/// Threads per block; the kernels' reductions assume it (`NAS_BLOCK`).
const BLOCK: u32 = 256;

/// The float types the kernels exist for.
pub(crate) trait Elem: CudaDType + DeviceRepr + WithDType + ValidAsZeroBits {
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Elem for f64 {
    const SUFFIX: &'static str = "f64";
}

/// `DwGeom` of the kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DwGeom {
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub kh: i32,
    pub kw: i32,
    pub ho: i32,
    pub wo: i32,
    pub stride: i32,
    pub dilation: i32,
    pub pad_top: i32,
    pub pad_left: i32,
}

// SAFETY: plain `repr(C)` integers, the layout of the kernels' struct.
unsafe impl DeviceRepr for DwGeom {}

/// `PoolGeom` of the kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolGeom {
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub ho: i32,
    pub wo: i32,
    pub kernel: i32,
    pub stride: i32,
    pub pad_top: i32,
    pub pad_left: i32,
}

// SAFETY: plain `repr(C)` integers, the layout of the kernels' struct.
unsafe impl DeviceRepr for PoolGeom {}

/// A size as the kernels' `int`, refused when it does not fit.
pub(crate) fn int(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).or_else(|_| bail!("{op}: {what} = {v} is too large for the CUDA kernels"))
}

/// One thread per element, capped at a grid the kernels' grid-stride loops cover.
fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block per reduced value.
fn per_value(values: usize) -> LaunchConfig {
    let blocks = values.clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The contiguous elements of an input.
pub(crate) fn view<'a, T: Elem>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{op}: inputs must be contiguous, got shape {:?} stride {:?}", l.dims(), l.stride()),
    }
}

/// The kernel `NAME_f32` or `NAME_f64` of the module (loaded once per device). A macro:
/// candle does not export the type of the function handle.
macro_rules! function {
    ($dev:expr, $name:expr, $suffix:expr) => {
        $dev.get_or_load_custom_func(&format!("{}_{}", $name, $suffix), MODULE, PTX)?
    };
}

/// Runs `$body` with the type alias `$T` set to `f32` or `f64`, as `$dtype` says (the one
/// dtype of an op's inputs, from [`same_dtype`]).
macro_rules! by_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            _ => {
                type $T = f64;
                $body
            }
        }
    };
}
pub(crate) use by_dtype;

/// The dtype every input of an op shares, or an error naming them.
pub(crate) fn same_dtype(op: &str, storages: &[&CudaStorage]) -> Result<DType> {
    let d = storages[0].dtype();
    if storages.iter().any(|s| s.dtype() != d) || !matches!(d, DType::F32 | DType::F64) {
        let all: Vec<DType> = storages.iter().map(|s| s.dtype()).collect();
        bail!("{op}: expected inputs all f32 or all f64, got {all:?}")
    }
    Ok(d)
}

/// Depthwise forward: `y = depthwise(relu?(x), w)`.
pub(crate) fn dw_fwd<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    w: &CudaView<T>,
    g: DwGeom,
    relu_in: bool,
) -> Result<CudaSlice<T>> {
    let total = (g.n * g.c) as usize * (g.ho * g.wo) as usize;
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, "dw_fwd", T::SUFFIX);
    let relu = i32::from(relu_in);
    let mut b = f.builder();
    b.arg(x).arg(w).arg(&y).arg(&g).arg(&relu);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(y)
}

/// Depthwise input gradient from `dy` and `w`.
pub(crate) fn dw_bwd_input<T: Elem>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    w: &CudaView<T>,
    g: DwGeom,
) -> Result<CudaSlice<T>> {
    let total = (g.n * g.c) as usize * (g.h * g.w) as usize;
    // SAFETY: every element is written by the kernel.
    let dx = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, "dw_bwd_input", T::SUFFIX);
    let mut b = f.builder();
    b.arg(dy).arg(w).arg(&dx).arg(&g);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(dx)
}

/// Depthwise weight gradient from `x` (read through ReLU with `relu_in`) and `dy`.
pub(crate) fn dw_bwd_weight<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    dy: &CudaView<T>,
    g: DwGeom,
    relu_in: bool,
) -> Result<CudaSlice<T>> {
    let taps = (g.c * g.kh * g.kw) as usize;
    // SAFETY: every element is written by the kernel.
    let dw = unsafe { dev.alloc::<T>(taps)? };
    let f = function!(dev, "dw_bwd_weight", T::SUFFIX);
    let relu = i32::from(relu_in);
    let mut b = f.builder();
    b.arg(x).arg(dy).arg(&dw).arg(&g).arg(&relu);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(per_value(taps)) }.w()?;
    Ok(dw)
}

/// Max or average pooling forward (`kind` is `max` or `avg`).
pub(crate) fn pool_fwd<T: Elem>(dev: &CudaDevice, kind: &str, x: &CudaView<T>, g: PoolGeom) -> Result<CudaSlice<T>> {
    let total = (g.n * g.c) as usize * (g.ho * g.wo) as usize;
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, &format!("{kind}_pool_fwd"), T::SUFFIX);
    let mut b = f.builder();
    b.arg(x).arg(&y).arg(&g);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(y)
}

/// Max pooling backward from `x` and `dy`.
pub(crate) fn max_pool_bwd<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    dy: &CudaView<T>,
    g: PoolGeom,
) -> Result<CudaSlice<T>> {
    let total = (g.n * g.c) as usize * (g.h * g.w) as usize;
    // SAFETY: every element is written by the kernel.
    let dx = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, "max_pool_bwd", T::SUFFIX);
    let mut b = f.builder();
    b.arg(x).arg(dy).arg(&dx).arg(&g);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(dx)
}

/// Average pooling backward from `dy`.
pub(crate) fn avg_pool_bwd<T: Elem>(dev: &CudaDevice, dy: &CudaView<T>, g: PoolGeom) -> Result<CudaSlice<T>> {
    let total = (g.n * g.c) as usize * (g.h * g.w) as usize;
    // SAFETY: every element is written by the kernel.
    let dx = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, "avg_pool_bwd", T::SUFFIX);
    let mut b = f.builder();
    b.arg(dy).arg(&dx).arg(&g);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(dx)
}

/// Batch-norm statistics: `(2, C)` f64, means then biased variances.
pub(crate) fn bn_stats<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    (n, c, hw): (usize, usize, usize),
) -> Result<CudaSlice<f64>> {
    // SAFETY: every element is written by the kernel.
    let stats = unsafe { dev.alloc::<f64>(2 * c)? };
    let f = function!(dev, "bn_stats", T::SUFFIX);
    let (n, ci, hw) = (int("batch-norm-stats", "batch", n)?, int("batch-norm-stats", "channels", c)?, hw as i64);
    let mut b = f.builder();
    b.arg(x).arg(&stats).arg(&n).arg(&ci).arg(&hw);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(per_value(c)) }.w()?;
    Ok(stats)
}

/// Batch-norm forward from host statistics, with an optional fused ReLU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_fwd<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    gamma: &CudaView<T>,
    beta: &CudaView<T>,
    mean: &[f64],
    invstd: &[f64],
    (n, c, hw): (usize, usize, usize),
    relu: bool,
) -> Result<CudaSlice<T>> {
    let total = n * c * hw;
    let mean = dev.clone_htod(mean)?;
    let invstd = dev.clone_htod(invstd)?;
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, "bn_fwd", T::SUFFIX);
    let (n, ci, hw, relu) =
        (int("batch-norm-train", "batch", n)?, int("batch-norm-train", "channels", c)?, hw as i64, i32::from(relu));
    let mut b = f.builder();
    b.arg(x).arg(gamma).arg(beta).arg(&mean).arg(&invstd).arg(&y).arg(&n).arg(&ci).arg(&hw).arg(&relu);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(y)
}

/// Batch-norm backward: one packed buffer `[dx, dgamma, dbeta]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_bwd<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    gamma: &CudaView<T>,
    dy: &CudaView<T>,
    mean: &[f64],
    invstd: &[f64],
    (n, c, hw): (usize, usize, usize),
) -> Result<CudaSlice<T>> {
    let total = n * c * hw;
    let mean = dev.clone_htod(mean)?;
    let invstd = dev.clone_htod(invstd)?;
    let sums = dev.alloc_zeros::<f64>(2 * c)?;
    let (ni, ci, hwi) =
        (int("batch-norm-train-bwd", "batch", n)?, int("batch-norm-train-bwd", "channels", c)?, hw as i64);
    let f = function!(dev, "bn_bwd_sums", T::SUFFIX);
    let mut b = f.builder();
    b.arg(x).arg(dy).arg(&mean).arg(&invstd).arg(&sums).arg(&ni).arg(&ci).arg(&hwi);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(per_value(c)) }.w()?;
    // SAFETY: every element is written by the kernel.
    let packed = unsafe { dev.alloc::<T>(total + 2 * c)? };
    let f = function!(dev, "bn_bwd_dx", T::SUFFIX);
    let mut b = f.builder();
    b.arg(x).arg(gamma).arg(dy).arg(&mean).arg(&invstd).arg(&sums).arg(&packed).arg(&ni).arg(&ci).arg(&hwi);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { b.launch(elementwise(total + 2 * c)) }.w()?;
    Ok(packed)
}

/// `y = a * sa[n] + b * sb[n]` with per-example scales (`None`: 1).
pub(crate) fn scaled_add<T: Elem>(
    dev: &CudaDevice,
    a: &CudaView<T>,
    sa: Option<&[T]>,
    b: &CudaView<T>,
    sb: Option<&[T]>,
    per_example: usize,
    total: usize,
) -> Result<CudaSlice<T>> {
    let sa = sa.map(|s| dev.clone_htod(s)).transpose()?;
    let sb = sb.map(|s| dev.clone_htod(s)).transpose()?;
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(total)? };
    let f = function!(dev, "scaled_add", T::SUFFIX);
    let null = 0u64;
    let (per, tot) = (per_example as i64, total as i64);
    let mut builder = f.builder();
    builder.arg(a);
    match &sa {
        Some(s) => builder.arg(s),
        None => builder.arg(&null),
    };
    builder.arg(b);
    match &sb {
        Some(s) => builder.arg(s),
        None => builder.arg(&null),
    };
    builder.arg(&y).arg(&per).arg(&tot);
    // SAFETY: the arguments match the kernel's signature (a null scale is a 0 pointer).
    unsafe { builder.launch(elementwise(total)) }.w()?;
    Ok(y)
}

/// Wraps a kernel's output as candle storage.
pub(crate) fn wrap<T: Elem>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}
