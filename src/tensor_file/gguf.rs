//! GGUF files, the format of llama.cpp and Ollama: writing one with f32/f16 tensors, and reading one's
//! header (version, key/values, tensor infos) without its tensors.
//!
//! Written with candle's GGUF writer, which lays a file out as version 2 did; version 3 changed nothing in
//! that layout (it only allowed big-endian files), so the version field is set to 3 and the file is a
//! little-endian GGUF v3 file. Knows nothing about what the keys or tensors mean.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

pub use candle_core::quantized::gguf_file::Value as GgufValue;

use super::TensorFileError;
use crate::atomic_file::write_atomically;

/// The GGUF version written.
pub const GGUF_VERSION: u32 = 3;

/// The start of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// A stored tensor's shape (outermost dimension first, as candle and PyTorch order them; GGUF stores the
/// reverse) and element type.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

/// What a GGUF file's header says.
#[derive(Debug)]
pub struct GgufHeader {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: BTreeMap<String, GgufTensorInfo>,
}

impl GgufHeader {
    /// A string value, if the key holds one.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// A float value, if the key holds a number.
    pub fn float(&self, key: &str) -> Option<f64> {
        let value = self.metadata.get(key)?;
        value
            .to_f32()
            .map(f64::from)
            .or_else(|_| value.to_f64())
            .ok()
    }
}

/// Writes a GGUF file (atomically): the key/values in their order, then the tensors (f32 or f16, on any
/// device) in theirs.
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, GgufValue)],
    tensors: &[(String, Tensor)],
) -> Result<(), TensorFileError> {
    let fail = |name: &str, reason: String| TensorFileError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    let io = |source| TensorFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stored = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let dtype = match tensor.dtype() {
            DType::F32 => GgmlDType::F32,
            DType::F16 => GgmlDType::F16,
            other => {
                return Err(fail(
                    name,
                    format!("it is {other:?}; GGUF is written in f32 or f16"),
                ));
            }
        };
        let quantized = own_storage(tensor)
            .and_then(|t| QTensor::quantize(&t, dtype))
            .map_err(|e| fail(name, e.to_string()))?;
        stored.push((name.as_str(), quantized));
    }
    let entries: Vec<(&str, &GgufValue)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let infos: Vec<(&str, &QTensor)> = stored.iter().map(|(n, t)| (*n, t)).collect();
    let mut bytes = Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &entries, &infos).map_err(|e| io(std::io::Error::other(e)))?;
    let mut bytes = bytes.into_inner();
    bytes[4..8].copy_from_slice(&GGUF_VERSION.to_le_bytes());
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes)).map_err(io)
}

/// `tensor` on the CPU in a storage of its own: candle's quantizer reads the whole storage, so a view (a
/// narrowed tensor, with an offset) would be written with its neighbours' values.
fn own_storage(tensor: &Tensor) -> candle_core::Result<Tensor> {
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Tensor::from_vec(values, tensor.shape(), &Device::Cpu)?.to_dtype(tensor.dtype())
}

/// Reads the header of the GGUF file `path`.
pub fn read_gguf_header(path: &Path) -> Result<GgufHeader, TensorFileError> {
    let io = |source| TensorFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut start = [0u8; 8];
    file.read_exact(&mut start).map_err(io)?;
    if &start[..4] != GGUF_MAGIC {
        return Err(TensorFileError::BadGguf {
            path: path.to_path_buf(),
            reason: "it does not start with `GGUF`".to_string(),
        });
    }
    let version = u32::from_le_bytes([start[4], start[5], start[6], start[7]]);
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| TensorFileError::BadGguf {
        path: path.to_path_buf(),
        reason: format!("its header cannot be read ({e})"),
    })?;
    let tensors = content
        .tensor_infos
        .into_iter()
        .map(|(name, info)| {
            let shape = info.shape.dims().to_vec();
            (
                name,
                GgufTensorInfo {
                    shape,
                    dtype: info.ggml_dtype,
                },
            )
        })
        .collect();
    Ok(GgufHeader {
        path: path.to_path_buf(),
        version,
        metadata: content.metadata.into_iter().collect(),
        tensors,
    })
}
