//! GGUF reader (version 2 and 3) and the block dequantizers ostquant imports from.
//!
//! Every read is bounds-checked: a truncated file or a header that lies about counts, sizes or
//! offsets gives an [`Error::Format`] naming the file, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements in one Q4_0 / Q4_1 / Q8_0 block.
pub const QK: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types that ostquant can dequantize; everything else is reported by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
    Other(u32),
}

impl TensorType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => TensorType::F32,
            1 => TensorType::F16,
            2 => TensorType::Q4_0,
            3 => TensorType::Q4_1,
            8 => TensorType::Q8_0,
            30 => TensorType::BF16,
            other => TensorType::Other(other),
        }
    }

    pub fn name(self) -> String {
        let name = match self {
            TensorType::F32 => "F32",
            TensorType::F16 => "F16",
            TensorType::Q4_0 => "Q4_0",
            TensorType::Q4_1 => "Q4_1",
            TensorType::Q8_0 => "Q8_0",
            TensorType::BF16 => "BF16",
            TensorType::Other(id) => match id {
                6 => "Q5_0",
                7 => "Q5_1",
                9 => "Q8_1",
                10 => "Q2_K",
                11 => "Q3_K",
                12 => "Q4_K",
                13 => "Q5_K",
                14 => "Q6_K",
                15 => "Q8_K",
                16..=23 | 29 => "IQ",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                _ => return format!("#{id}"),
            },
        };
        name.to_string()
    }

    /// (elements per block, bytes per block) for the supported types.
    fn block(self) -> Option<(usize, usize)> {
        match self {
            TensorType::F32 => Some((1, 4)),
            TensorType::F16 | TensorType::BF16 => Some((1, 2)),
            TensorType::Q4_0 => Some((QK, 18)),
            TensorType::Q4_1 => Some((QK, 20)),
            TensorType::Q8_0 => Some((QK, 34)),
            TensorType::Other(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Shape in row-major (PyTorch) order: the reverse of ggml's.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file whose tensor data stays memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
    bytes: memmap2::Mmap,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and ostquant never writes the file it imports from.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse_header(path, &bytes)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            data_start: header.data_start,
            bytes,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantize one tensor to f32, in row-major order of [`TensorInfo::shape`].
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let raw = tensor_bytes(&self.path, &self.bytes, self.data_start, info)?;
        dequantize(info.ty, raw, info.n_elements() as usize).ok_or_else(|| {
            Error::unsupported(
                &self.path,
                format!(
                    "unsupported tensor type {} in tensor {}",
                    info.ty.name(),
                    info.name
                ),
            )
        })
    }
}

pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section.
    pub data_start: u64,
}

/// Parse the header, metadata and tensor table of a GGUF file held in `bytes`, and check that
/// every tensor's data lies inside the file.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut r = Reader {
        path,
        bytes,
        pos: 0,
    };
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Err(Error::format(path, "not a GGUF file (bad magic)"));
    }
    r.pos = 4;
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Error::unsupported(
            path,
            format!("GGUF version {version} (only 2 and 3 are supported)"),
        ));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // Each entry takes at least a few bytes: counts beyond that are a corrupt header.
    r.check_count(n_kv, 12, "metadata entries")?;
    r.check_count(n_tensors, 24, "tensors")?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0)?;
        metadata.insert(key, value);
    }

    // Sized as read, not from the header's counts: a corrupt count must fail on the data.
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims == 0 || n_dims > 4 {
            return Err(Error::format(
                path,
                format!("tensor {name}: {n_dims} dimensions (GGUF allows 1 to 4)"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let ty = TensorType::from_id(r.u32()?);
        let offset = r.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
        });
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(Error::format(
                    path,
                    "general.alignment is not a power of two",
                ));
            }
        },
    };
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    for t in &tensors {
        tensor_range(path, bytes.len(), data_start, t)?;
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start,
    })
}

/// Byte range of a tensor's data, checked against the file size. Types that ostquant cannot
/// decode are not sized (their block size is unknown to it); they fail later, by name.
fn tensor_range(
    path: &Path,
    file_len: usize,
    data_start: u64,
    t: &TensorInfo,
) -> Result<Option<(usize, usize)>> {
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::format(path, format!("tensor {}: element count overflows", t.name))
        })?;
    let Some((block_elems, block_bytes)) = t.ty.block() else {
        return Ok(None);
    };
    if n % block_elems as u64 != 0 {
        return Err(Error::format(
            path,
            format!(
                "tensor {}: {} elements is not a multiple of the {} block size {}",
                t.name,
                n,
                t.ty.name(),
                block_elems
            ),
        ));
    }
    let size = (n / block_elems as u64).checked_mul(block_bytes as u64);
    let start = data_start.checked_add(t.offset);
    let end = size.zip(start).and_then(|(s, a)| a.checked_add(s));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len as u64 => {
            Ok(Some((start as usize, end as usize)))
        }
        _ => Err(Error::format(
            path,
            format!(
                "tensor {}: data at offset {} with {} elements of {} runs past the end of the file ({} bytes): truncated or corrupt",
                t.name,
                t.offset,
                n,
                t.ty.name(),
                file_len
            ),
        )),
    }
}

fn tensor_bytes<'a>(
    path: &Path,
    bytes: &'a [u8],
    data_start: u64,
    t: &TensorInfo,
) -> Result<&'a [u8]> {
    match tensor_range(path, bytes.len(), data_start, t)? {
        Some((a, b)) => Ok(&bytes[a..b]),
        None => Err(Error::unsupported(
            path,
            format!(
                "unsupported tensor type {} in tensor {}",
                t.ty.name(),
                t.name
            ),
        )),
    }
}

/// Dequantize `n` elements of type `ty` from `raw`; `None` for types ostquant does not decode.
pub fn dequantize(ty: TensorType, raw: &[u8], n: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(n);
    match ty {
        TensorType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        TensorType::F16 => out.extend(
            raw.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        TensorType::BF16 => out.extend(
            raw.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        TensorType::Q4_0 => raw
            .chunks_exact(18)
            .for_each(|b| out.extend(dequant_q4_0(b))),
        TensorType::Q4_1 => raw
            .chunks_exact(20)
            .for_each(|b| out.extend(dequant_q4_1(b))),
        TensorType::Q8_0 => raw
            .chunks_exact(34)
            .for_each(|b| out.extend(dequant_q8_0(b))),
        TensorType::Other(_) => return None,
    }
    debug_assert_eq!(out.len(), n);
    Some(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_0: f16 scale d, then 16 bytes; element j is the low nibble of byte j and element j+16
/// the high nibble, both offset by 8: x = (q - 8)·d.
pub fn dequant_q4_0(block: &[u8]) -> [f32; QK] {
    let d = f16_at(block, 0);
    let mut out = [0f32; QK];
    for (j, &q) in block[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
    out
}

/// Q4_1: f16 scale d and f16 minimum m, then 16 bytes in the Q4_0 nibble order: x = q·d + m.
pub fn dequant_q4_1(block: &[u8]) -> [f32; QK] {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let mut out = [0f32; QK];
    for (j, &q) in block[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
    out
}

/// Q8_0: f16 scale d, then 32 signed bytes: x = q·d.
pub fn dequant_q8_0(block: &[u8]) -> [f32; QK] {
    let d = f16_at(block, 0);
    let mut out = [0f32; QK];
    for (j, &q) in block[2..34].iter().enumerate() {
        out[j] = q as i8 as f32 * d;
    }
    out
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!(
                        "header truncated: wanted {n} bytes at offset {} of {}",
                        self.pos,
                        self.bytes.len()
                    ),
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn check_count(&self, n: u64, min_bytes: u64, what: &str) -> Result<()> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes) > left {
            return Err(Error::format(
                self.path,
                format!(
                    "header claims {n} {what}, more than the file can hold: truncated or corrupt"
                ),
            ));
        }
        Ok(())
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        self.check_count(n, 1, "string bytes")?;
        let at = self.pos;
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("string at offset {at} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        self.path,
                        "metadata arrays nested too deeply",
                    ));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                self.check_count(n, 1, "array elements")?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!(
                        "unknown metadata value type {other} at offset {}",
                        self.pos - 4
                    ),
                ));
            }
        })
    }
}
