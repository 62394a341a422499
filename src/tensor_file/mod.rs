//! Reading tensor files without loading them: `.safetensors` (memory-mapped) and PyTorch `.ckpt`/`.pt`/`.bin`
//! zip pickles (read by candle's pickle reader, which interprets the pickle as data and executes no code).
//!
//! Opening a file reads only its header, so a 4 GB checkpoint can be inspected instantly and its tensors
//! loaded one at a time, each straight from the mapped file. Errors name the file and say what is wrong
//! with it in one sentence. GGUF files (llama.cpp's format) are written and their headers read in [`gguf`].
//! This module knows nothing about models or adapters.

pub mod gguf;
mod pickle;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

/// What can go wrong opening or reading a tensor file.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid safetensors file: {reason}", path.display())]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{} is not a valid GGUF file: {reason}", path.display())]
    BadGguf { path: PathBuf, reason: String },
    #[error("{} could not be read as a PyTorch checkpoint: {reason}", path.display())]
    BadPickle { path: PathBuf, reason: String },
    #[error("{} is not a tensor file (expected .safetensors, .ckpt, .pt or .bin)", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("{}: tensor `{name}` could not be loaded: {reason}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// The declared element type and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
}

/// An element type as stored on disk; candle cannot hold all of them (e.g. bool, f8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    Supported(DType),
    Other(&'static str),
}

impl std::fmt::Display for StoredDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredDType::Supported(d) => write!(f, "{}", d.as_str()),
            StoredDType::Other(name) => f.write_str(name),
        }
    }
}

enum Storage {
    Safetensors {
        mmap: Mmap,
        data_start: usize,
        offsets: HashMap<String, (usize, usize)>,
    },
    Pickle(BTreeMap<String, pickle::PickledTensor>),
}

/// One opened tensor file: its tensor names, their dtypes and shapes, its metadata, and lazy loading.
pub struct TensorFile {
    path: PathBuf,
    infos: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
    storage: Storage,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl TensorFile {
    /// Opens a `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file and reads its header.
    pub fn open(path: &Path) -> Result<Self, TensorFileError> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match extension.as_str() {
            "safetensors" => Self::open_safetensors(path),
            "ckpt" | "pt" | "pth" | "bin" => Self::open_pickle(path),
            _ => {
                // Sniff: safetensors starts with an 8-byte header length then '{'; a zip with "PK".
                let head = read_head(path)?;
                if head.len() >= 9 && head[8] == b'{' {
                    Self::open_safetensors(path)
                } else if head.starts_with(b"PK") {
                    Self::open_pickle(path)
                } else {
                    Err(TensorFileError::UnknownFormat {
                        path: path.to_path_buf(),
                    })
                }
            }
        }
    }

    fn open_safetensors(path: &Path) -> Result<Self, TensorFileError> {
        let io = |source| TensorFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath by another program yields wrong values
        // in the tensors read from it, which is the documented caveat of every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bad = |reason: String| TensorFileError::BadSafetensors {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, header) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| bad(describe_safetensors_error(&e, &mmap)))?;
        let mut infos = BTreeMap::new();
        let mut offsets = HashMap::new();
        for (name, info) in header.tensors() {
            check_shape(&name, &info.shape).map_err(bad)?;
            let dtype = match safetensors_dtype(info.dtype) {
                Some(d) => StoredDType::Supported(d),
                None => StoredDType::Other(dtype_name(info.dtype)),
            };
            infos.insert(
                name.clone(),
                TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                },
            );
            offsets.insert(name, info.data_offsets);
        }
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            infos,
            metadata,
            storage: Storage::Safetensors {
                mmap,
                data_start: 8 + header_len,
                offsets,
            },
        })
    }

    fn open_pickle(path: &Path) -> Result<Self, TensorFileError> {
        let bad = |reason: String| TensorFileError::BadPickle {
            path: path.to_path_buf(),
            reason,
        };
        let head = read_head(path)?;
        if !head.starts_with(b"PK") {
            return Err(bad(
                "it is not a zip-format torch.save file (legacy pickles are not read; re-save it with a current \
                 PyTorch or convert it to .safetensors)"
                    .to_string(),
            ));
        }
        let records = pickle::read_index(path).map_err(bad)?;
        for (name, record) in &records {
            check_shape(name, &record.shape).map_err(bad)?;
        }
        let infos = records
            .iter()
            .map(|(name, record)| {
                let dtype = match &record.dtype {
                    Ok(d) => StoredDType::Supported(*d),
                    Err(_) => StoredDType::Other("unknown"),
                };
                (
                    name.clone(),
                    TensorInfo {
                        dtype,
                        shape: record.shape.clone(),
                    },
                )
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            infos,
            metadata: BTreeMap::new(),
            storage: Storage::Pickle(records),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names with their stored dtype and shape, sorted by name.
    pub fn infos(&self) -> &BTreeMap<String, TensorInfo> {
        &self.infos
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.infos.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    /// The safetensors `__metadata__` strings (empty for pickles).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn is_safetensors(&self) -> bool {
        matches!(self.storage, Storage::Safetensors { .. })
    }

    /// Loads one tensor as stored (its own dtype) onto `device`.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, TensorFileError> {
        let fail = |reason: String| TensorFileError::Tensor {
            path: self.path.clone(),
            name: name.to_string(),
            reason,
        };
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| fail("no such tensor".to_string()))?;
        let dtype = match info.dtype {
            StoredDType::Supported(d) => d,
            StoredDType::Other(other) => {
                return Err(fail(format!("its element type ({other}) is not supported")));
            }
        };
        match &self.storage {
            Storage::Safetensors {
                mmap,
                data_start,
                offsets,
            } => {
                let (start, end) = offsets[name];
                let range = data_start + start..data_start + end;
                let tensor =
                    Tensor::from_raw_buffer(&mmap[range.clone()], dtype, &info.shape, device)
                        .map_err(|e| fail(plain_error(&e)))?;
                release_pages(mmap, range);
                Ok(tensor)
            }
            Storage::Pickle(records) => {
                pickle::load(&self.path, &records[name], device).map_err(fail)
            }
        }
    }
}

/// Drops the mapped pages of a tensor that has been copied out, so a checkpoint's bytes are not counted in
/// the process's memory on top of the model built from them.
fn release_pages(mmap: &Mmap, range: std::ops::Range<usize>) {
    #[cfg(unix)]
    // SAFETY: the mapping is read-only and file-backed, and no borrow of this range outlives the copy above;
    // dropped pages are read back from the file if the range is ever touched again.
    unsafe {
        let _ = mmap.unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            range.start,
            range.len(),
        );
    }
    #[cfg(not(unix))]
    let _ = (mmap, range);
}

/// Refuses a shape whose dimensions, zeros counted as ones, multiply past `usize`: such a tensor holds no
/// data when one dimension is 0 (so the file's size checks pass), but candle's stride arithmetic on it
/// overflows.
fn check_shape(name: &str, shape: &[usize]) -> Result<(), String> {
    match shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(1)))
    {
        Some(_) => Ok(()),
        None => Err(format!(
            "tensor `{name}` has the impossible shape {shape:?} (its dimensions multiply past any size)"
        )),
    }
}

fn read_head(path: &Path) -> Result<Vec<u8>, TensorFileError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|source| TensorFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(head)
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set.
pub fn plain_error(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => plain_error(inner),
        other => other.to_string(),
    }
}

/// Why `bytes`, the whole file, is not a safetensors file, in words.
fn describe_safetensors_error(e: &safetensors::SafeTensorError, bytes: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let file_len = bytes.len();
    match e {
        E::HeaderTooSmall => format!("the file is only {file_len} bytes long, too short for a safetensors header"),
        E::HeaderTooLarge | E::InvalidHeaderLength => match header_ends_past(bytes) {
            Some(header_len) if header_len <= MAX_PLAUSIBLE_HEADER_BYTES => format!(
                "the file is truncated (it ends after {file_len} bytes, inside its {header_len}-byte header)"
            ),
            _ => "its first 8 bytes do not give a plausible header length (is it really a safetensors file?)"
                .to_string(),
        },
        E::MetadataIncompleteBuffer => {
            "its header lists more tensor data than the file holds (the file is truncated or incomplete)".to_string()
        }
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) => {
            "its header is not valid JSON (the file is corrupt or not a safetensors file)".to_string()
        }
        other => other.to_string(),
    }
}

/// The largest header the safetensors format allows (100 MB).
const MAX_PLAUSIBLE_HEADER_BYTES: u64 = 100_000_000;

/// The header length the first 8 bytes of `bytes` give, when the header it announces runs past the end of
/// `bytes` (a file cut short inside its header).
fn header_ends_past(bytes: &[u8]) -> Option<u64> {
    let length = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    (length.checked_add(8)? > bytes.len() as u64).then_some(length)
}

fn safetensors_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

fn dtype_name(d: safetensors::Dtype) -> &'static str {
    use safetensors::Dtype as S;
    match d {
        S::BOOL => "bool",
        S::I8 => "i8",
        S::U16 => "u16",
        S::U64 => "u64",
        S::F8_E4M3 => "f8_e4m3",
        S::F8_E5M2 => "f8_e5m2",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::TensorFile;

    #[test]
    fn a_zero_element_tensor_with_huge_dimensions_is_an_error_not_a_panic() {
        // 0 x 2^40 x 2^40 floats hold no data, so safetensors' own checks pass, but candle's stride
        // arithmetic overflowed when the tensor was loaded.
        let header = br#"{"t":{"dtype":"F32","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero.safetensors");
        let bytes = [(header.len() as u64).to_le_bytes().as_slice(), header].concat();
        std::fs::write(&path, bytes).unwrap();
        let message = TensorFile::open(&path)
            .expect_err("the file must not open")
            .to_string();
        assert!(
            message.contains("zero.safetensors") && message.contains("impossible shape"),
            "{message}"
        );
    }
}
