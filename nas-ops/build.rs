//! Under the `cuda` feature, compiles `kernels/nas_ops.cu` to PTX with nvcc (into OUT_DIR,
//! embedded by `src/kernels/cuda.rs`). Without the feature it does nothing, so the default
//! build never needs the CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/nas_ops.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("nas_ops.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    // PTX is compiled further by the driver for the GPU it runs on, so the oldest
    // architecture CUDA 13 supports is the default; CUDA_COMPUTE_CAP (as candle reads it)
    // picks another.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/nas_ops.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|err| {
            panic!(
                "the `cuda` feature compiles nas-ops/kernels/nas_ops.cu with nvcc, and `{nvcc}` could not \
                 be run ({err}); install the CUDA toolkit (README: CUDA) or set NVCC"
            )
        });
    assert!(status.success(), "nvcc failed on nas-ops/kernels/nas_ops.cu ({status})");
}
