//! PyTorch zip checkpoints (`torch.save`): the pickle is interpreted as data by candle's pickle machine (no
//! code runs), tensor records are collected from the state dict, and each tensor's bytes are read from its
//! zip entry on demand.

use std::collections::{BTreeMap, HashMap};
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
    let mut pickle = Vec::new();
    zip.by_name(&pickle_name)
        .and_then(|mut entry| Ok(entry.read_to_end(&mut pickle)?))
        .map_err(|e| format!("its data.pkl cannot be read ({e})"))?;
    check_pickle(&pickle)?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut pickle.as_slice())
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

/// Deepest nesting of objects accepted in a pickle; `torch.save` state dicts nest fewer than ten deep.
const MAX_PICKLE_DEPTH: u32 = 256;

/// One object on the stack of [`check_pickle`]'s dry run: how many objects it holds (itself included; a
/// string counts one per 32 bytes more) and how deeply they nest.
#[derive(Clone, Copy)]
struct Shadow {
    weight: u64,
    depth: u32,
    /// Whether it is a MARK, which the tuple, dict and list opcodes pop back to.
    mark: bool,
}

impl Shadow {
    fn leaf(bytes: usize) -> Self {
        Self {
            weight: 1 + bytes as u64 / 32,
            depth: 1,
            mark: false,
        }
    }

    fn holding(children: &[Shadow]) -> Self {
        Self {
            weight: 1 + children.iter().map(|c| c.weight).sum::<u64>(),
            depth: 1 + children.iter().map(|c| c.depth).max().unwrap_or(0),
            mark: false,
        }
    }
}

/// Dry-runs candle's pickle machine (`candle_core::pickle::Stack`, same opcodes, same stack rules) on sizes
/// only, and refuses what would make the real run panic, overflow the thread's stack or exhaust memory:
/// integers wider than 8 bytes (candle shifts past 64 bits), objects nested deeper than
/// [`MAX_PICKLE_DEPTH`] (they are dropped and printed recursively), memo references that copy the same
/// objects over and over (each BINGET clones, so a few hundred bytes can expand to 2^40 objects), and
/// strings longer than the rest of the pickle (candle allocates the declared length before reading).
///
/// Where candle itself would stop with an error (unknown opcode, empty stack, end of data), the dry run
/// stops and leaves the error to candle.
fn check_pickle(pickle: &[u8]) -> Result<(), String> {
    let budget = (1 << 20) + 4 * pickle.len() as u64;
    let too_deep = || format!("its pickle nests objects more than {MAX_PICKLE_DEPTH} levels deep");
    let too_big = || {
        "its pickle expands to far more objects than it stores (memoised objects are copied over and over)"
            .to_string()
    };
    let mut stack: Vec<Shadow> = Vec::new();
    let mut memo: HashMap<u32, Shadow> = HashMap::new();
    let mut made = 0u64;
    let mut rest = pickle;
    // Takes an `n`-byte (at most 8) little-endian argument off the front of `rest`.
    fn take(n: usize, rest: &mut &[u8]) -> Option<u64> {
        let (head, tail) = rest.split_at_checked(n)?;
        *rest = tail;
        Some(
            head.iter()
                .rev()
                .fold(0u64, |v, &b| (v << 8) | u64::from(b)),
        )
    }
    loop {
        let Some((&op, tail)) = rest.split_first() else {
            return Ok(());
        };
        rest = tail;
        let pushed = match op {
            b'.' => return Ok(()),
            0x80 => take(1, &mut rest).map(|_| None),
            b'c' => {
                let mut length = 0;
                for _ in 0..2 {
                    let line = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |i| i + 1);
                    length += line;
                    rest = &rest[line..];
                }
                Some(Some(Shadow::leaf(length)))
            }
            b'K' | b'M' | b'J' | b'G' => {
                let width = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                take(width, &mut rest).map(|_| Some(Shadow::leaf(0)))
            }
            0x8a => match take(1, &mut rest) {
                Some(width) if width > 8 => {
                    return Err(format!(
                        "its pickle holds a {width}-byte integer, wider than any tensor size or offset"
                    ));
                }
                Some(width) => take(width as usize, &mut rest).map(|_| Some(Shadow::leaf(0))),
                None => None,
            },
            b'X' => match take(4, &mut rest) {
                Some(length) if length > rest.len() as u64 => {
                    return Err("its pickle is truncated (a string runs past its end)".to_string());
                }
                Some(length) => {
                    rest = &rest[length as usize..];
                    Some(Some(Shadow::leaf(length as usize)))
                }
                None => None,
            },
            b')' | b'N' | b'}' | b'd' | b']' | 0x88 | 0x89 => Some(Some(Shadow::leaf(0))),
            b'(' => Some(Some(Shadow {
                mark: true,
                ..Shadow::leaf(0)
            })),
            // BINPERSID wraps the top object; TUPLE1..3, REDUCE, BUILD and NEWOBJ replace the top 1..3.
            b'Q' | 0x85 | 0x86 | 0x87 | b'R' | b'b' | 0x81 => {
                let count = match op {
                    b'Q' | 0x85 => 1,
                    0x87 => 3,
                    _ => 2,
                };
                let Some(start) = stack.len().checked_sub(count) else {
                    return Ok(());
                };
                let children = stack.split_off(start);
                Some(Some(Shadow::holding(&children)))
            }
            // TUPLE: the objects above the last MARK become one.
            b't' => {
                let Some(mark) = stack.iter().rposition(|s| s.mark) else {
                    return Ok(());
                };
                let children = stack.split_off(mark + 1);
                stack.pop();
                Some(Some(Shadow::holding(&children)))
            }
            // APPEND, SETITEM: the top one or two objects move into the container below them; APPENDS,
            // SETITEMS: the objects above the last MARK do.
            b'a' | b's' | b'e' | b'u' => {
                let children = if matches!(op, b'a' | b's') {
                    let count = if op == b'a' { 1 } else { 2 };
                    let Some(start) = stack.len().checked_sub(count) else {
                        return Ok(());
                    };
                    stack.split_off(start)
                } else {
                    let Some(mark) = stack.iter().rposition(|s| s.mark) else {
                        return Ok(());
                    };
                    let children = stack.split_off(mark + 1);
                    stack.pop();
                    children
                };
                let Some(container) = stack.pop() else {
                    return Ok(());
                };
                let mut all = children;
                all.push(Shadow {
                    weight: container.weight - 1,
                    depth: container.depth - 1,
                    mark: false,
                });
                Some(Some(Shadow::holding(&all)))
            }
            b'h' | b'j' => {
                let Some(id) = take(if op == b'h' { 1 } else { 4 }, &mut rest) else {
                    return Ok(());
                };
                let Some(&copy) = memo.get(&(id as u32)) else {
                    return Ok(());
                };
                made += copy.weight;
                Some(Some(copy))
            }
            b'q' | b'r' => {
                let Some(id) = take(if op == b'q' { 1 } else { 4 }, &mut rest) else {
                    return Ok(());
                };
                let Some(&top) = stack.last() else {
                    return Ok(());
                };
                made += top.weight;
                memo.insert(id as u32, top);
                Some(None)
            }
            _ => return Ok(()),
        };
        let Some(pushed) = pushed else {
            return Ok(());
        };
        if let Some(shadow) = pushed {
            if shadow.depth > MAX_PICKLE_DEPTH {
                return Err(too_deep());
            }
            made += 1;
            stack.push(shadow);
        }
        if made > budget {
            return Err(too_big());
        }
    }
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
        .map_err(|other| format!("its element type ({other}) is not supported"))?;
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
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| e.to_string())?;
    let mut entry = zip
        .by_name(&record.entry)
        .map_err(|e| format!("its data entry is missing ({e})"))?;
    let truncated = || "its data is shorter than its shape (the file is truncated)".to_string();
    let element = dtype.size_in_bytes();
    // `TensorFile::open` checked that the dimensions multiply within `usize`; offset and byte counts come
    // straight from the pickle and may not.
    let count: usize = record.shape.iter().product();
    let skip = record
        .offset
        .checked_mul(element)
        .ok_or_else(|| format!("its storage offset {} lies beyond any data", record.offset))?;
    let length = count.checked_mul(element).ok_or_else(truncated)?;
    std::io::copy(&mut entry.by_ref().take(skip as u64), &mut std::io::sink())
        .map_err(|e| e.to_string())?;
    // Reserve no more than the file holds: the shape is the pickle's claim, not a promise of data.
    let mut bytes = Vec::with_capacity(length.min(usize::try_from(file_len).unwrap_or(usize::MAX)));
    entry
        .take(length as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("its data cannot be read ({e})"))?;
    if bytes.len() != length {
        return Err(truncated());
    }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::tensor_file::TensorFile;

    /// A zip-format `torch.save` file whose pickle is `pickle`, with 8 bytes of storage `0`.
    fn torch_zip(path: &Path, pickle: &[u8]) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        std::io::Write::write_all(&mut zip, pickle).unwrap();
        zip.start_file("archive/data/0", stored).unwrap();
        std::io::Write::write_all(&mut zip, &[0; 8]).unwrap();
        zip.finish().unwrap();
    }

    /// The error opening a checkpoint whose pickle is `pickle`.
    fn open_error(name: &str, pickle: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        torch_zip(&path, pickle);
        let message = TensorFile::open(&path)
            .expect_err("the checkpoint must not open")
            .to_string();
        assert!(message.contains(name), "{message}");
        message
    }

    /// The error loading tensor `t` of a checkpoint whose pickle is `pickle`.
    fn load_error(name: &str, pickle: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        torch_zip(&path, pickle);
        let file = TensorFile::open(&path).unwrap();
        let message = file
            .load("t", &candle_core::Device::Cpu)
            .expect_err("the tensor must not load")
            .to_string();
        assert!(message.contains(name), "{message}");
        message
    }

    /// A pickle argument: an 8-byte int (LONG1).
    fn long(value: u64) -> Vec<u8> {
        [b"\x8a\x08".as_slice(), &value.to_le_bytes()].concat()
    }

    /// A pickle argument: a tuple of 4-byte ints (BININT), as shapes and strides are stored.
    fn ints(values: &[i32]) -> Vec<u8> {
        let mut op = b"(".to_vec();
        for v in values {
            op.push(b'J');
            op.extend(v.to_le_bytes());
        }
        op.push(b't');
        op
    }

    /// `{"t": torch._utils._rebuild_tensor_v2(<float storage "0">, offset, shape, stride, False,
    /// OrderedDict())}` as `torch.save` writes it.
    fn tensor_pickle(offset: u64, shape: &[i32], stride: &[i32]) -> Vec<u8> {
        [
            b"\x80\x02}X\x01\x00\x00\x00tctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
                .as_slice(),
            b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ",
            &long(offset),
            &ints(shape),
            &ints(stride),
            b"\x89ccollections\nOrderedDict\n)RtRs.",
        ]
        .concat()
    }

    #[test]
    fn a_well_formed_tensor_record_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("good.ckpt");
        torch_zip(&path, &tensor_pickle(0, &[2], &[1]));
        let file = TensorFile::open(&path).unwrap();
        let tensor = file.load("t", &candle_core::Device::Cpu).unwrap();
        assert_eq!(tensor.dims(), [2]);
    }

    #[test]
    fn a_huge_storage_offset_is_an_error_not_an_overflow() {
        let message = load_error("offset.ckpt", &tensor_pickle(1 << 62, &[2], &[1]));
        assert!(message.contains("storage offset"), "{message}");
    }

    #[test]
    fn a_shape_larger_than_the_data_is_an_error_not_a_huge_allocation() {
        // 2^40 floats (4 TiB) claimed over 8 bytes of data: allocating the claim aborted the process.
        let message = load_error(
            "huge.ckpt",
            &tensor_pickle(0, &[1 << 20, 1 << 20], &[1 << 20, 1]),
        );
        assert!(message.contains("shorter than its shape"), "{message}");
    }

    #[test]
    fn a_shape_whose_dimensions_overflow_is_refused_on_open() {
        // 0 x (2^31-1)^3: no data, but the dimensions multiply past 2^64 in candle's stride arithmetic.
        let shape = [0, i32::MAX, i32::MAX, i32::MAX];
        let message = open_error("overflow.ckpt", &tensor_pickle(0, &shape, &[1, 1, 1, 1]));
        assert!(message.contains("impossible shape"), "{message}");
    }

    #[test]
    fn a_pickle_integer_wider_than_8_bytes_is_an_error_not_a_panic() {
        // Found by the tensor_file fuzz target: LONG1 with a 113-byte integer made candle's pickle reader
        // shift past 64 bits and panic.
        let mut pickle = b"\x80\x02}\x8a\x71".to_vec();
        pickle.extend([0x01; 0x71]);
        pickle.push(b'.');
        let message = open_error("wide_int.ckpt", &pickle);
        assert!(message.contains("113-byte integer"), "{message}");
    }

    #[test]
    fn a_deeply_nested_pickle_is_an_error_not_a_stack_overflow() {
        // 100 000 nested 1-tuples: dropping them recursively overflowed the stack.
        let pickle = [b"\x80\x02N".as_slice(), &[0x85; 100_000], b"."].concat();
        let message = open_error("deep.ckpt", &pickle);
        assert!(message.contains("more than 256 levels deep"), "{message}");
    }

    #[test]
    fn memo_copies_that_double_every_few_bytes_are_an_error() {
        // [] then 22 times (memo[0], memo[0]) -> memo[0]: 4 million objects from 134 bytes; 40 times in
        // 254 bytes would be 2^40 and never finish.
        let pickle = [
            b"\x80\x02]q\x00".as_slice(),
            &b"h\x00h\x00\x86q\x00".repeat(22),
            b".",
        ]
        .concat();
        let message = open_error("doubling.ckpt", &pickle);
        assert!(message.contains("copied over and over"), "{message}");
    }

    #[test]
    fn a_string_longer_than_the_pickle_is_an_error() {
        let message = open_error("long_string.ckpt", b"\x80\x02X\xff\xff\xff\xff.");
        assert!(message.contains("truncated"), "{message}");
    }
}
