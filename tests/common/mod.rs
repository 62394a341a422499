//! Helpers shared by the integration tests: fixture paths, reference tensors, and comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_studio::tensor_file::TensorFile;

/// A path under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The reference outputs of one tiny model (`sd1` or `sd2`).
pub struct Reference {
    file: TensorFile,
}

impl Reference {
    pub fn open(kind: &str) -> Self {
        Self {
            file: TensorFile::open(&fixture(&format!("{kind}_reference.safetensors"))).unwrap(),
        }
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        self.file
            .load(name, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn f32(&self, name: &str) -> Tensor {
        self.tensor(name).to_dtype(DType::F32).unwrap()
    }

    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.file
            .infos()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn metadata(&self, key: &str) -> String {
        self.file
            .metadata()
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no metadata {key}"))
    }
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    max_abs(&(a - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// Largest absolute value.
pub fn max_abs(a: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().abs().unwrap();
    a.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Asserts `actual` matches `expected` to within `tolerance` (max abs), printing both scales on failure.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let diff = max_abs_diff(actual, expected);
    eprintln!(
        "{what}: max abs diff {diff:.3e} (reference max abs {:.3e})",
        max_abs(expected)
    );
    assert!(
        diff <= tolerance,
        "{what}: max abs diff {diff:.3e} exceeds {tolerance:.1e} (reference max abs {:.3e})",
        max_abs(expected)
    );
}
