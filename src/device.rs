//! Choosing the compute device at run time: `cpu`, `cuda:N`, `metal`, or the best one available.

use candle_core::{DType, Device};

pub use crate::config::DeviceChoice;

/// Opens the device; an unavailable explicit choice is an error that says why.
pub fn open_device(choice: DeviceChoice) -> Result<Device, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(
                    "this build has no CUDA support (build with `--features cuda`)".to_string(),
                );
            }
            Device::new_cuda(ordinal)
                .map_err(|e| format!("CUDA device {ordinal} is not usable: {e}"))
        }
        DeviceChoice::Metal => {
            if !candle_core::utils::metal_is_available() {
                return Err(
                    "this build has no Metal support (build with `--features metal`)".to_string(),
                );
            }
            Device::new_metal(0).map_err(|e| format!("the Metal device is not usable: {e}"))
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available()
                && let Ok(device) = Device::new_cuda(0)
            {
                return Ok(device);
            }
            if candle_core::utils::metal_is_available()
                && let Ok(device) = Device::new_metal(0)
            {
                return Ok(device);
            }
            Ok(Device::Cpu)
        }
    }
}

/// The compute dtype for inference on a device: f32 on the CPU (reduced precision is slower there),
/// bf16 on GPUs that support it, else f16.
pub fn inference_dtype(device: &Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) if device.supports_bf16() => DType::BF16,
        _ => DType::F16,
    }
}

/// Whether this processor has the bf16 products (AMX or AVX-512 BF16) that CPU runs with `mixed_precision = "bf16"` use.
pub fn cpu_has_bf16_products() -> bool {
    crate::kernels::bf16_products_available()
}

/// A short name for messages: `cpu`, `cuda:0`, `metal`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
