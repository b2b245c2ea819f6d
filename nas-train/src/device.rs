//! Where tensors live: `cpu`, or a CUDA GPU in a build with the `cuda` feature.

use candle_core::Device;

use crate::TrainError;

/// The device a `--device` value names: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA device in
/// a build without the `cuda` feature, or one that does not open, is an error naming it.
pub fn parse_device(name: &str) -> Result<Device, TrainError> {
    let err = |message: String| TrainError::Config { field: "device", message };
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(err(format!("`{other}`: expected cpu, cuda or cuda:N"))),
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(err(format!(
            "`{name}`: this build has no CUDA support; build with `--features cuda` (README: CUDA)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| err(format!("`{name}` could not be opened: {e}")))
}

/// The `--device` name of `device` (`cpu`, `cuda:N`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(device_name(&Device::Cpu), "cpu");
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
