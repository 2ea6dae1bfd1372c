//! GGUF, ggml's model file (what stable-diffusion.cpp and llama.cpp write), versions 2 and 3:
//!
//! ```text
//! "GGUF" | u32 version | u64 tensor count | u64 metadata count
//! metadata: string key, u32 value type, value        (strings: u64 length + UTF-8 bytes)
//! tensor infos: string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset
//! padding to `general.alignment` (default 32) | data: each tensor at data start + offset
//! ```
//!
//! Everything is little-endian. ggml lists dims innermost first (ne[0] is the contiguous one);
//! [`GgufTensor::shape`] is torch's order, the reverse. The header is parsed from a prefix of the
//! file that grows until the tensor table fits ([`read_header`]), so a tensor's bytes are read
//! only when it is loaded.
//!
//! Supported tensor types ([`GgmlType`]): F32, F16, BF16, the 32-value block formats Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1 (ggml-common.h; a block covers 32 consecutive values of a row), and the
//! K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-value blocks, see [`crate::quant::kquants`]):
//!
//! | type | block bytes                                 | value j                         |
//! |------|---------------------------------------------|---------------------------------|
//! | Q8_0 | f16 d, i8 qs[32]                            | d·qs[j]                         |
//! | Q4_0 | f16 d, u8 qs[16]                            | d·(q − 8)                       |
//! | Q4_1 | f16 d, f16 m, u8 qs[16]                     | d·q + m                         |
//! | Q5_0 | f16 d, u32 qh, u8 qs[16]                    | d·(q − 16)                      |
//! | Q5_1 | f16 d, f16 m, u32 qh, u8 qs[16]             | d·q + m                         |
//!
//! where the 4-bit code of value j < 16 is the low nibble of qs[j] and of value j ≥ 16 the high
//! nibble of qs[j − 16]; Q5's fifth bit of value j is bit j of qh. Other types (IQ*, TQ*, MXFP4,
//! integers, ...) are refused when the header is read, naming the tensor and the type.
//!
//! [`repack`] turns a tensor into what the kernels read without requantizing (crate::quant):
//! Q8_0, Q4_0 and Q4_1 are our formats of the same names (only the code order differs); Q5_0's
//! d·(q − 16) is our Q8_0 with codes q − 16 ∈ [−16, 15] and the same d, exactly. Q5_1's
//! d·q + m has no exact quantized equivalent (32 levels with an offset: Q8_0 is symmetric, Q4_1 has
//! 16 levels), so it is dequantized to f32 and served dense, like F32/F16/BF16. The K-quants are
//! read by the kernels as stored (Q3_K's and Q6_K's blocks padded by two bytes to whole words).
//!
//! [`GgufWriter`] writes files with ggml's reference quantizers (`quantize_row_*_ref`) for the
//! 32-value formats and [`crate::quant::kquants::quantize_block`] for the K-quants, for tests.

use std::collections::{BTreeMap, HashSet};

use half::{bf16, f16};

use super::Source;
use crate::error::{Error, Result};
use crate::quant::{kquants, push_codes, QuantFormat, QuantizedTensor, BLOCK};

pub const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when the file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Headers (metadata and tensor table) larger than this are refused (a vocabulary-laden LLM header
/// is ~10 MB; an SDXL one ~0.3 MB).
const MAX_HEADER_BYTES: u64 = 64 << 20;
/// The first read of [`read_header`]; it doubles until the header fits.
const FIRST_READ: u64 = 256 << 10;
/// Nesting limit of metadata arrays (a corrupt file must not recurse without bound).
const MAX_ARRAY_DEPTH: usize = 4;
/// Metadata values (array items included) a header may hold: each takes 32 bytes parsed, so a
/// 32 MiB array of bytes would take 1 GiB. An LLM's vocabulary arrays hold under a million; an
/// SDXL file's metadata a few dozen values.
pub const MAX_METADATA_VALUES: u64 = 1 << 20;

/// The ggml tensor types this engine loads.
#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// ggml's type names by id (ggml.h `enum ggml_type`), for errors about the types we do not load.
const GGML_TYPE_NAMES: [&str; 42] = [
    "F32", "F16", "Q4_0", "Q4_1", "Q4_2 (removed)", "Q4_3 (removed)", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
    "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32",
    "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4 (removed)", "Q4_0_4_8 (removed)", "Q4_0_8_8 (removed)", "TQ1_0", "TQ2_0",
    "IQ4_NL_4_4 (removed)", "IQ4_NL_4_8 (removed)", "IQ4_NL_8_8 (removed)", "MXFP4", "NVFP4", "Q1_0",
];

/// ggml's name of type `id` (e.g. "Q4_K"), or "unknown type N".
pub fn ggml_type_name(id: u32) -> String {
    GGML_TYPE_NAMES.get(id as usize).map_or_else(|| format!("unknown type {id}"), |n| n.to_string())
}

impl GgmlType {
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// ggml's number for the type (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The kernels' format of a K-quant (read as stored).
    fn k_format(self) -> Option<QuantFormat> {
        Some(match self {
            GgmlType::Q2_K => QuantFormat::Q2_K,
            GgmlType::Q3_K => QuantFormat::Q3_K,
            GgmlType::Q4_K => QuantFormat::Q4_K,
            GgmlType::Q5_K => QuantFormat::Q5_K,
            GgmlType::Q6_K => QuantFormat::Q6_K,
            _ => return None,
        })
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name ("Q8_0").
    pub fn name(self) -> &'static str {
        GGML_TYPE_NAMES[self.id() as usize]
    }

    /// Values per block: 1 for the float types, 32 for the quantized ones, 256 for the K-quants.
    pub fn block_values(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            t if t.k_format().is_some() => kquants::SUPER,
            _ => BLOCK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            k => kquants::ggml_bytes(k.k_format().expect("the rest are K-quants")),
        }
    }
}

impl std::str::FromStr for GgmlType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::InvalidParameter(format!("ggml type '{s}': expected one of {}", supported_names())))
    }
}

fn supported_names() -> String {
    GgmlType::ALL.map(GgmlType::name).join(", ")
}

/// A metadata value (GGUF value types 0..=12).
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// All items of one type (an empty array is written as one of u8).
    Array(Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    /// The GGUF value type number.
    pub fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => 0,
            MetadataValue::I8(_) => 1,
            MetadataValue::U16(_) => 2,
            MetadataValue::I16(_) => 3,
            MetadataValue::U32(_) => 4,
            MetadataValue::I32(_) => 5,
            MetadataValue::F32(_) => 6,
            MetadataValue::Bool(_) => 7,
            MetadataValue::String(_) => 8,
            MetadataValue::Array(_) => 9,
            MetadataValue::U64(_) => 10,
            MetadataValue::I64(_) => 11,
            MetadataValue::F64(_) => 12,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    pub ggml_type: GgmlType,
    /// torch order (outermost first): ggml's ne reversed.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl GgufTensor {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor as a matrix [rows, cols]: rows = the outermost dim, cols = the rest (a 1-D
    /// tensor is one row). Blocks never straddle rows: ne[0] is a multiple of the block.
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self.shape.split_first() {
            Some((&rows, rest)) if !rest.is_empty() => (rows, rest.iter().product()),
            _ => (1, self.elements()),
        }
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, MetadataValue>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

impl GgufHeader {
    /// `general.architecture` (e.g. "llama"; stable-diffusion.cpp may write none).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture").and_then(MetadataValue::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Whether a file starts like a GGUF file.
pub fn is_gguf(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC)
}

/// Reads and parses the header of `path`, reading a prefix of the file that grows until the
/// tensor table fits.
pub async fn read_header(source: &impl Source, path: &str) -> Result<GgufHeader> {
    let file_len = source.len(path).await?;
    let mut bytes = source.read_range(path, 0, FIRST_READ.min(file_len)).await?;
    loop {
        match parse_header(&source.describe(path), &bytes, file_len)? {
            Parsed::Header(header) => return Ok(header),
            Parsed::NeedBytes(needed) => {
                if needed > MAX_HEADER_BYTES {
                    let message = format!("header is larger than the {MAX_HEADER_BYTES}-byte limit (corrupt file?)");
                    return Err(Error::Gguf { path: source.describe(path), message });
                }
                let have = bytes.len() as u64;
                let want = needed.max(2 * have).min(file_len).min(MAX_HEADER_BYTES);
                bytes.extend(source.read_range(path, have, want).await?);
            }
        }
    }
}

/// What [`parse_header`] made of a file prefix.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Header(GgufHeader),
    /// The prefix ends inside the header: at least this many bytes of the file are needed.
    NeedBytes(u64),
}

/// Parses a GGUF header from `prefix`, the first bytes of a `file_len`-byte file, validating every
/// tensor (supported type, whole blocks per row, byte range inside the file). `path` names the
/// file in errors.
pub fn parse_header(path: &str, prefix: &[u8], file_len: u64) -> Result<Parsed> {
    let mut r = Reader { path, bytes: prefix, pos: 0, file_len, values_left: MAX_METADATA_VALUES };
    match r.header() {
        Ok(header) => Ok(Parsed::Header(header)),
        Err(Stop::Need(n)) => Ok(Parsed::NeedBytes(n)),
        Err(Stop::Fail(e)) => Err(e),
    }
}

enum Stop {
    /// The prefix ends before byte `.0` of the file, which the header needs.
    Need(u64),
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Fail(e)
    }
}

type Step<T> = std::result::Result<T, Stop>;

struct Reader<'a> {
    path: &'a str,
    bytes: &'a [u8],
    pos: u64,
    file_len: u64,
    /// Metadata values the header may still hold ([`MAX_METADATA_VALUES`]).
    values_left: u64,
}

impl Reader<'_> {
    fn corrupt(&self, message: String) -> Stop {
        Stop::Fail(Error::Gguf { path: self.path.to_string(), message })
    }

    fn take(&mut self, n: u64, what: &str) -> Step<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.file_len);
        let Some(end) = end else {
            return Err(self.corrupt(format!("{what} ({n} bytes at offset {}) runs past the end of the {}-byte file (truncated?)", self.pos, self.file_len)));
        };
        if end > self.bytes.len() as u64 {
            return Err(Stop::Need(end));
        }
        let out = &self.bytes[self.pos as usize..end as usize];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Step<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Step<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Step<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Step<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?.to_vec();
        String::from_utf8(bytes).map_err(|_| self.corrupt(format!("{what} is not UTF-8")))
    }

    /// A count of items of at least `min_bytes` each, checked against the bytes the file has left
    /// (so a corrupt count fails here rather than allocating).
    fn count(&mut self, min_bytes: u64, what: &str) -> Step<u64> {
        let n = self.u64(what)?;
        let left = self.file_len - self.pos;
        if n.checked_mul(min_bytes).is_none_or(|b| b > left) {
            return Err(self.corrupt(format!("{what} {n} cannot fit in the {left} bytes left in the {}-byte file (truncated or corrupt)", self.file_len)));
        }
        Ok(n)
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Step<MetadataValue> {
        use MetadataValue as V;
        self.values_left = self.values_left.checked_sub(1).ok_or_else(|| self.corrupt(format!("metadata '{key}': the header holds more than {MAX_METADATA_VALUES} values")))?;
        Ok(match type_id {
            0 => V::U8(u8::from_le_bytes(self.array(key)?)),
            1 => V::I8(i8::from_le_bytes(self.array(key)?)),
            2 => V::U16(u16::from_le_bytes(self.array(key)?)),
            3 => V::I16(i16::from_le_bytes(self.array(key)?)),
            4 => V::U32(u32::from_le_bytes(self.array(key)?)),
            5 => V::I32(i32::from_le_bytes(self.array(key)?)),
            6 => V::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)? {
                [0] => V::Bool(false),
                [1] => V::Bool(true),
                [b] => return Err(self.corrupt(format!("metadata '{key}': bool byte {b}"))),
            },
            8 => V::String(self.string(key)?),
            9 if depth < MAX_ARRAY_DEPTH => {
                let item_type = self.u32(key)?;
                let n = self.count(1, &format!("metadata '{key}': array length"))?;
                // Grown as items are read, not sized by the count: a count is only bounded by the
                // file's length, not by the bytes at hand.
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                V::Array(items)
            }
            9 => return Err(self.corrupt(format!("metadata '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"))),
            10 => V::U64(u64::from_le_bytes(self.array(key)?)),
            11 => V::I64(i64::from_le_bytes(self.array(key)?)),
            12 => V::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.corrupt(format!("metadata '{key}': unknown value type {t}"))),
        })
    }

    fn header(&mut self) -> Step<GgufHeader> {
        let magic = self.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(self.corrupt(format!("starts with {magic:02x?}, not the GGUF magic \"GGUF\" (not a GGUF file)")));
        }
        let version = self.u32("version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(self.corrupt("big-endian GGUF files are not supported".into()));
        }
        if !(2..=3).contains(&version) {
            return Err(self.corrupt(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let n_tensors = self.count(24, "tensor count")?; // name length, n_dims, type, offset
        let n_metadata = self.count(13, "metadata count")?; // key length, type, one byte
        let mut metadata = BTreeMap::new();
        for _ in 0..n_metadata {
            let key = self.string("metadata key")?;
            let type_id = self.u32(&key)?;
            let value = self.value(type_id, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.corrupt(format!("metadata key '{key}' appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| self.corrupt(format!("general.alignment {v:?} is not a power of two")))?,
        };
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = self.string("tensor name")?;
            let n_dims = self.u32(&name)?;
            if n_dims > 4 {
                return Err(self.corrupt(format!("tensor '{name}': {n_dims} dims (ggml allows at most 4)")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(self.u64(&name)?);
            }
            let type_id = self.u32(&name)?;
            let offset = self.u64(&name)?;
            infos.push((name, ne, type_id, offset));
        }
        let data_start = self.pos.next_multiple_of(alignment);
        let mut tensors: Vec<GgufTensor> = Vec::with_capacity(infos.len());
        let mut names = HashSet::with_capacity(infos.len());
        for (name, ne, type_id, offset) in infos {
            if !names.insert(name.clone()) {
                return Err(self.corrupt(format!("tensor '{name}' appears twice")));
            }
            tensors.push(self.tensor(name, ne, type_id, offset, data_start, alignment)?);
        }
        Ok(GgufHeader { version, metadata, tensors, alignment, data_start })
    }

    /// Validates one tensor info: type, shape, byte range.
    fn tensor(&self, name: String, ne: Vec<u64>, type_id: u32, offset: u64, data_start: u64, alignment: u64) -> Step<GgufTensor> {
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            let message = format!("ggml type {} ({type_id}) is not supported; supported: {} (re-convert the model to one of those)", ggml_type_name(type_id), supported_names());
            return Err(Stop::Fail(Error::Tensor { path: self.path.to_string(), tensor: name, message }));
        };
        let torch_order: Vec<u64> = ne.iter().rev().copied().collect();
        let fits = |n: u64| usize::try_from(n).is_ok();
        let elements = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|_| fits(d))).filter(|&n| fits(n));
        // Products of any of the dims fit too, zero dims included.
        let elements = elements.filter(|_| ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1))).is_some_and(fits));
        let bytes = elements.and_then(|n| (n / ggml_type.block_values() as u64).checked_mul(ggml_type.block_bytes() as u64));
        let start = data_start.checked_add(offset);
        let end = start.zip(bytes).and_then(|(s, b)| s.checked_add(b));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(self.corrupt(format!("tensor '{name}': {} {torch_order:?} at offset {offset} is too large", ggml_type.name())));
        };
        // Every dim and their product fit usize.
        let shape: Vec<usize> = torch_order.iter().map(|&d| d as usize).collect();
        let inner = ne.first().copied().unwrap_or(1);
        if !inner.is_multiple_of(ggml_type.block_values() as u64) {
            let block = ggml_type.block_values();
            return Err(self.corrupt(format!("tensor '{name}': {} {shape:?} has rows of {inner} values, not whole {block}-value blocks", ggml_type.name())));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(self.corrupt(format!("tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}")));
        }
        if end > self.file_len {
            return Err(self.corrupt(format!("tensor '{name}': bytes {start}..{end} lie beyond the end of the {}-byte file (truncated?)", self.file_len)));
        }
        Ok(GgufTensor { name, ggml_type, shape, start, end })
    }
}

/// A tensor as the engine serves it.
#[derive(Debug, Clone, PartialEq)]
pub enum Repacked {
    /// Q8_0, Q4_0, Q4_1, Q5_0 (as Q8_0) and the K-quants: blocks in the kernels' layout, values
    /// unchanged.
    Quantized(QuantizedTensor),
    /// F32, F16, BF16 and Q5_1: the values, row-major in torch order.
    Dense(Vec<f32>),
}

fn check_len(tensor: &GgufTensor, bytes: &[u8]) -> Result<()> {
    let want = tensor.end - tensor.start;
    if bytes.len() as u64 != want {
        return Err(Error::InvalidParameter(format!(
            "GGUF tensor '{}' ({} {:?}): got {} bytes, expected {want}",
            tensor.name,
            tensor.ggml_type.name(),
            tensor.shape,
            bytes.len()
        )));
    }
    Ok(())
}

/// The kernels' format a tensor of `ggml_type` and `dims` dimensions repacks into exactly (None:
/// served dense). 1-D tensors (biases, norms) are never a matrix the kernels read: dense.
pub fn repack_format(ggml_type: GgmlType, dims: usize) -> Option<QuantFormat> {
    if dims < 2 {
        return None;
    }
    match ggml_type {
        GgmlType::Q8_0 | GgmlType::Q5_0 => Some(QuantFormat::Q8_0),
        GgmlType::Q4_0 => Some(QuantFormat::Q4_0),
        GgmlType::Q4_1 => Some(QuantFormat::Q4_1),
        t => t.k_format(),
    }
}

/// Turns a tensor's bytes (`tensor.start..tensor.end` of its file) into what the kernels read,
/// without requantizing (see the module docs).
pub fn repack(tensor: &GgufTensor, bytes: &[u8]) -> Result<Repacked> {
    check_len(tensor, bytes)?;
    let (rows, cols) = tensor.matrix_dims();
    let Some(format) = repack_format(tensor.ggml_type, tensor.shape.len()) else {
        return Ok(Repacked::Dense(dequantize(tensor.ggml_type, bytes))); // F32, F16, BF16, Q5_1, 1-D
    };
    if format.is_k() {
        // As stored, each block padded to whole words (written in place: no second copy).
        let block_bytes = tensor.ggml_type.block_bytes();
        let mut data = vec![0u32; bytes.len() / block_bytes * format.words_per_block()];
        let padded: &mut [u8] = bytemuck::cast_slice_mut(&mut data);
        for (to, block) in padded.chunks_exact_mut(format.words_per_block() * 4).zip(bytes.chunks_exact(block_bytes)) {
            to[..block_bytes].copy_from_slice(block);
        }
        let q = QuantizedTensor { format, rows, cols, data, scales: Vec::new(), mins: Vec::new() };
        return Ok(Repacked::Quantized(q));
    }
    let blocks = rows * cols / BLOCK;
    let mut q = QuantizedTensor {
        format,
        rows,
        cols,
        data: Vec::with_capacity(blocks * format.words_per_block()),
        scales: Vec::with_capacity(blocks),
        mins: Vec::with_capacity(if format == QuantFormat::Q4_1 { blocks } else { 0 }),
    };
    for block in bytes.chunks_exact(tensor.ggml_type.block_bytes()) {
        let b = Block::read(tensor.ggml_type, block);
        q.scales.push(b.d);
        if format == QuantFormat::Q4_1 {
            q.mins.push(b.m);
        }
        // Q5_0's q − 16 in two's complement is a Q8_0 code.
        let codes = match tensor.ggml_type {
            GgmlType::Q5_0 => b.q.map(|c| c.wrapping_sub(16)),
            _ => b.q,
        };
        push_codes(&mut q.data, format, &codes);
    }
    Ok(Repacked::Quantized(q))
}

/// The f32 values of a tensor's bytes (whole blocks of `ggml_type`), computed as ggml's
/// `dequantize_row_*` do.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / ggml_type.block_bytes() * ggml_type.block_values());
    for block in bytes.chunks_exact(ggml_type.block_bytes()) {
        if let Some(format) = ggml_type.k_format() {
            out.extend(kquants::dequantize_block(format, block));
            continue;
        }
        match ggml_type {
            GgmlType::F32 => out.push(f32::from_le_bytes(block.try_into().expect("4-byte block"))),
            GgmlType::F16 => out.push(f16::from_le_bytes([block[0], block[1]]).to_f32()),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32()),
            _ => {
                let b = Block::read(ggml_type, block);
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                out.extend(b.q.iter().map(|&q| match ggml_type {
                    GgmlType::Q8_0 => q as i8 as f32 * d,
                    GgmlType::Q4_0 => (q as i32 - 8) as f32 * d,
                    GgmlType::Q5_0 => (q as i32 - 16) as f32 * d,
                    _ => q as f32 * d + m, // Q4_1, Q5_1
                }));
            }
        }
    }
    out
}

/// One 32-value block of a quantized type, codes in value order (Q8_0's as two's complement).
struct Block {
    d: f16,
    /// Zero for the symmetric types.
    m: f16,
    q: [u8; BLOCK],
}

impl Block {
    fn read(ggml_type: GgmlType, b: &[u8]) -> Block {
        let half_at = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
        let d = half_at(0);
        let (m, qh, qs) = match ggml_type {
            GgmlType::Q8_0 => (f16::ZERO, 0, &b[2..]),
            GgmlType::Q4_0 => (f16::ZERO, 0, &b[2..]),
            GgmlType::Q4_1 => (half_at(2), 0, &b[4..]),
            GgmlType::Q5_0 => (f16::ZERO, u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..]),
            GgmlType::Q5_1 => (half_at(2), u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..]),
            _ => unreachable!("{ggml_type:?} has no 32-value blocks"),
        };
        let q = if ggml_type == GgmlType::Q8_0 {
            qs.try_into().expect("32 codes")
        } else {
            std::array::from_fn(|j| {
                let nibble = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                nibble | (((qh >> j) & 1) as u8) << 4
            })
        };
        Block { d, m, q }
    }
}

/// A tensor's values quantized as ggml's reference quantizers (`quantize_row_*_ref`) do; float
/// types are converted (round to nearest even). Errors when the values are not whole blocks.
pub fn quantize(ggml_type: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let block = ggml_type.block_values();
    if !values.len().is_multiple_of(block) {
        return Err(Error::InvalidParameter(format!("{} values are not whole {}-value {} blocks", values.len(), block, ggml_type.name())));
    }
    let mut out = Vec::with_capacity(values.len() / block * ggml_type.block_bytes());
    for x in values.chunks_exact(block) {
        match ggml_type {
            GgmlType::F32 => out.extend(x[0].to_le_bytes()),
            GgmlType::F16 => out.extend(f16::from_f32(x[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend(bf16::from_f32(x[0]).to_le_bytes()),
            t => match t.k_format() {
                Some(format) => kquants::quantize_block(format, x, &mut out),
                None => quantize_block(ggml_type, x, &mut out),
            },
        }
    }
    Ok(out)
}

/// One block, as ggml-quants.c's reference quantizers compute it (same f32 operations and order).
fn quantize_block(ggml_type: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    let inverse = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
    // The value of largest magnitude, the first one on ties (Q4_0, Q5_0).
    let extreme = x.iter().fold(0f32, |max, &v| if v.abs() > max.abs() { v } else { max });
    let (min, max) = x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }));
    let (d, m, codes): (f32, Option<f32>, [u8; BLOCK]) = match ggml_type {
        GgmlType::Q8_0 => {
            let d = extreme.abs() / 127.0;
            let id = inverse(d);
            (d, None, std::array::from_fn(|j| (x[j] * id).round() as i8 as u8))
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let levels = if ggml_type == GgmlType::Q4_0 { 16 } else { 32 };
            let d = extreme / -(levels as f32 / 2.0);
            let id = inverse(d);
            let offset = levels as f32 / 2.0 + 0.5;
            (d, None, std::array::from_fn(|j| ((x[j] * id + offset) as i8).min(levels - 1) as u8))
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let levels = if ggml_type == GgmlType::Q4_1 { 16 } else { 32 };
            let d = (max - min) / (levels - 1) as f32;
            let id = inverse(d);
            // (x − min)·id ≤ levels − 1 up to rounding; ggml clamps Q4_1's codes (Q5_1's cannot exceed 31).
            (d, Some(min), std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as u8).min(levels as u8 - 1)))
        }
        _ => unreachable!("{ggml_type:?} has no 32-value blocks"),
    };
    out.extend(f16::from_f32(d).to_le_bytes());
    if let Some(m) = m {
        out.extend(f16::from_f32(m).to_le_bytes());
    }
    if ggml_type == GgmlType::Q8_0 {
        out.extend(codes);
        return;
    }
    if matches!(ggml_type, GgmlType::Q5_0 | GgmlType::Q5_1) {
        let qh = codes.iter().enumerate().fold(0u32, |qh, (j, &c)| qh | (((c >> 4) & 1) as u32) << j);
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (codes[j] & 15) | (codes[j + 16] & 15) << 4));
}

/// Writes GGUF v3 files: metadata, then tensors in the types asked for (quantized by [`quantize`]).
/// A `general.alignment` metadata value sets the alignment (default 32).
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetadataValue)>,
    /// (name, torch shape, ggml type id, bytes)
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    pub fn metadata(&mut self, key: &str, value: MetadataValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// Adds a tensor of `shape` (torch order) from f32 values, stored as `ggml_type`. Errors when
    /// the values do not fill the shape or its rows (last dim) are not whole blocks.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ggml_type: GgmlType, values: &[f32]) -> Result<()> {
        let elements: usize = shape.iter().product();
        let row = shape.last().copied().unwrap_or(1);
        if values.len() != elements || !row.is_multiple_of(ggml_type.block_values()) {
            return Err(Error::InvalidParameter(format!(
                "GGUF tensor '{name}': {} values for {} {shape:?} (rows must be whole {}-value blocks)",
                values.len(),
                ggml_type.name(),
                ggml_type.block_values()
            )));
        }
        let bytes = quantize(ggml_type, values)?;
        self.raw_tensor(name, shape, ggml_type.id(), bytes);
        Ok(())
    }

    /// Adds a tensor's bytes as they are, under any type id (also ones this crate does not load).
    pub fn raw_tensor(&mut self, name: &str, shape: &[usize], type_id: u32, bytes: Vec<u8>) {
        self.tensors.push((name.to_string(), shape.to_vec(), type_id, bytes));
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self
            .metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT) as usize;
        let mut out = MAGIC.to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, shape, type_id, bytes) in &self.tensors {
            write_string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(type_id.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(alignment);
        }
        for (_, _, _, bytes) in &self.tensors {
            out.resize(out.len().next_multiple_of(alignment), 0);
            out.extend(bytes);
        }
        out
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &MetadataValue) {
    use MetadataValue as V;
    match value {
        V::U8(v) => out.extend(v.to_le_bytes()),
        V::I8(v) => out.extend(v.to_le_bytes()),
        V::U16(v) => out.extend(v.to_le_bytes()),
        V::I16(v) => out.extend(v.to_le_bytes()),
        V::U32(v) => out.extend(v.to_le_bytes()),
        V::I32(v) => out.extend(v.to_le_bytes()),
        V::F32(v) => out.extend(v.to_le_bytes()),
        V::Bool(v) => out.push(*v as u8),
        V::String(s) => write_string(out, s),
        V::Array(items) => {
            out.extend(items.first().map_or(0, MetadataValue::type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|item| write_value(out, item));
        }
        V::U64(v) => out.extend(v.to_le_bytes()),
        V::I64(v) => out.extend(v.to_le_bytes()),
        V::F64(v) => out.extend(v.to_le_bytes()),
    }
}
