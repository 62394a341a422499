//! PyTorch zip checkpoints (`torch.save`): the pickle is interpreted as data by candle's pickle machine (no
//! code runs), tensor records are collected from the state dict, and each tensor's bytes are read from its
//! zip entry on demand.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Layout, Shape, Tensor};

/// Where one tensor's data is and how it is laid out.
#[derive(Debug, Clone)]
pub struct PickledTensor {
    pub dtype: Result<DType, String>,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    /// Element offset into the storage.
    offset: usize,
    /// Zip entry holding the storage.
    entry: String,
}

/// Reads the tensor records of the state dict in `path` (the `state_dict` entry when there is one).
pub fn read_index(path: &Path) -> Result<BTreeMap<String, PickledTensor>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format!("it is not a zip archive ({e})"))?;
    let pickle_name = zip
        .file_names()
        .filter_map(|name| name.ok())
        .find(|name| name.ends_with("data.pkl"))
        .map(|name| name.into_owned())
        .ok_or("the archive has no data.pkl")?;
    let folder = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut reader = BufReader::new(zip.by_name(&pickle_name).map_err(|e| e.to_string())?);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| format!("its pickle could not be read ({})", super::plain_error(&e)))?;
    let root = stack
        .finalize()
        .map_err(|e| format!("its pickle could not be read ({})", super::plain_error(&e)))?;
    let entries = match root {
        Object::Dict(entries) => entries,
        _ => return Err("its top-level object is not a dictionary".to_string()),
    };
    let state_dict = entries.iter().find_map(|(key, value)| match (key, value) {
        (Object::Unicode(k), Object::Dict(d)) if k == "state_dict" => Some(d.clone()),
        _ => None,
    });
    let mut tensors = BTreeMap::new();
    for (key, value) in state_dict.unwrap_or(entries) {
        let Object::Unicode(name) = key else { continue };
        if let Some(record) = tensor_record(value, &folder) {
            tensors.insert(name, record);
        }
    }
    Ok(tensors)
}

/// Recognises `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly wrapped in
/// `_rebuild_parameter`; anything else (ints, strings, optimizer state) is not a tensor.
fn tensor_record(value: Object, folder: &str) -> Option<PickledTensor> {
    let (callable, args) = value.reduce().ok()?;
    let (callable, args) = match callable {
        Object::Class {
            ref module_name,
            ref class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_parameter" => {
            args.tuple().ok()?.into_iter().next()?.reduce().ok()?
        }
        other => (other, args),
    };
    match callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return None,
    }
    let mut args = args.tuple().ok()?.into_iter();
    let storage = args.next()?.persistent_load().ok()?.tuple().ok()?;
    let offset = usize::try_from(args.next()?.int_or_long().ok()?).ok()?;
    let shape: Vec<usize> = args.next()?.try_into().ok()?;
    let stride: Vec<usize> = args.next()?.try_into().ok()?;
    // storage = ("storage", StorageClass, key, location, size)
    let mut storage = storage.into_iter().skip(1);
    let (_, storage_class) = storage.next()?.class().ok()?;
    let key = storage.next()?.unicode().ok()?;
    let dtype = match storage_class.as_str() {
        "FloatStorage" => Ok(DType::F32),
        "DoubleStorage" => Ok(DType::F64),
        "HalfStorage" => Ok(DType::F16),
        "BFloat16Storage" => Ok(DType::BF16),
        "ByteStorage" => Ok(DType::U8),
        "IntStorage" => Ok(DType::I32),
        "ShortStorage" => Ok(DType::I16),
        "LongStorage" => Ok(DType::I64),
        other => Err(other.trim_end_matches("Storage").to_string()),
    };
    Some(PickledTensor {
        dtype,
        shape,
        stride,
        offset,
        entry: format!("{folder}data/{key}"),
    })
}

/// Reads one tensor's data from its zip entry.
pub fn load(path: &Path, record: &PickledTensor, device: &Device) -> Result<Tensor, String> {
    let dtype = record
        .dtype
        .clone()
        .map_err(|other| format!("its element type {other} is not supported"))?;
    let layout = Layout::new(
        Shape::from(record.shape.clone()),
        record.stride.clone(),
        record.offset,
    );
    let fortran = layout.is_fortran_contiguous() && !layout.is_contiguous();
    if !layout.is_contiguous() && !fortran {
        return Err(
            "its data is stored with gaps (non-contiguous), which is not supported".to_string(),
        );
    }
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| e.to_string())?;
    let mut entry = zip
        .by_name(&record.entry)
        .map_err(|e| format!("its data entry is missing ({e})"))?;
    let element = dtype.size_in_bytes();
    let count: usize = record.shape.iter().product();
    std::io::copy(
        &mut entry.by_ref().take((record.offset * element) as u64),
        &mut std::io::sink(),
    )
    .map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; count * element];
    entry
        .read_exact(&mut bytes)
        .map_err(|_| "its data is shorter than its shape (the file is truncated)".to_string())?;
    if fortran {
        let reversed: Vec<usize> = record.shape.iter().rev().copied().collect();
        let order: Vec<usize> = (0..record.shape.len()).rev().collect();
        let tensor = Tensor::from_raw_buffer(&bytes, dtype, &reversed, device)
            .map_err(|e| super::plain_error(&e))?;
        return tensor
            .permute(order)
            .and_then(|t| t.contiguous())
            .map_err(|e| super::plain_error(&e));
    }
    Tensor::from_raw_buffer(&bytes, dtype, &record.shape, device)
        .map_err(|e| super::plain_error(&e))
}
