//! safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
//! The header is parsed and validated on its own so that tensors can be streamed one at a time.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use strum::{EnumString, IntoStaticStr};

use super::Source;
use crate::error::{Error, Result};

/// Headers larger than this are refused as corrupt (the real SDXL UNet header is ~200 KB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// safetensors' dtypes. The float ones are model weights; integers are buffers (position ids).
#[allow(non_camel_case_types)] // safetensors' names, which strum parses and gives back
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumString, IntoStaticStr)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    /// float8 e4m3 "fn" (torch.float8_e4m3fn): no infinities, max 448.
    F8_E4M3,
    /// float8 e5m2 (torch.float8_e5m2): the high byte of an f16.
    F8_E5M2,
    I64,
    I32,
    I16,
    I8,
    U8,
    BOOL,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::I8 | Dtype::U8 | Dtype::BOOL => 1,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }

    /// Whether the values are floating point (what model weights are).
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8_E4M3 | Dtype::F8_E5M2)
    }

    /// The name safetensors headers use.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorInfo>,
    /// `__metadata__`'s string entries.
    pub metadata: BTreeMap<String, String>,
    /// Where the data section (after the header) starts.
    pub data_start: u64,
}

/// Bytes of the file prefix holding the header length.
pub const PREFIX: u64 = 8;

/// Header length from the first 8 bytes, checked against the file size.
pub fn header_len(path: &str, prefix: &[u8], file_len: u64) -> Result<u64> {
    let err = |message: String| Error::Safetensors { path: path.to_string(), message };
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| err(format!("file is {file_len} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER_BYTES {
        return Err(err(format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")));
    }
    if PREFIX + n > file_len {
        return Err(err(format!("header length {n} does not fit in a {file_len}-byte file (truncated or not safetensors)")));
    }
    Ok(n)
}

/// Parses and validates the JSON header; `file_len` bounds every tensor's byte range.
pub fn parse_header(path: &str, json: &[u8], file_len: u64) -> Result<Header> {
    let err = |message: String| Error::Safetensors { path: path.to_string(), message };
    // Streamed into the entries' fields (no JSON tree): what a header may allocate stays a small
    // multiple of its length, and shapes are refused past MAX_DIMS while they are read.
    let raw: RawHeader = serde_json::from_slice(json).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => err(e.to_string()),
        _ => err(format!("header is not valid JSON: {e}")),
    })?;
    let data_start = PREFIX + json.len() as u64;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or_else(|| err(format!("a {}-byte header does not fit in a {file_len}-byte file", json.len())))?;
    let mut tensors = BTreeMap::new();
    for (name, RawTensor { dtype, shape, offsets: [begin, end] }) in raw.tensors {
        // A malformed entry is corruption, not a wrong model: report it as such, naming the tensor.
        let terr = |message: String| Error::Safetensors { path: path.to_string(), message: format!("tensor '{name}': {message}") };
        if begin > end || end > data_len {
            return Err(terr(format!("bytes {begin}..{end} lie outside the {data_len}-byte data section (truncated file?)")));
        }
        let expected = shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        if expected != Some(end - begin) {
            let needs = expected.map_or_else(|| "more than 2^64".into(), |n| n.to_string());
            return Err(terr(format!("{} {:?} needs {needs} bytes but the file gives {}", dtype.name(), shape, end - begin)));
        }
        // The bytes are in the file, but the product of any of the dims must also fit usize
        // (wasm32: 32 bits), zero dims included (a [0, 2^40, 2^40] tensor has no bytes).
        let values = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul((d as u64).max(1)));
        if values.is_none_or(|n| usize::try_from(n).is_err()) {
            return Err(terr(format!("{} {:?} has more values than this platform addresses", dtype.name(), shape)));
        }
        match tensors.entry(name) {
            Entry::Vacant(v) => {
                v.insert(TensorInfo { dtype, shape, start: data_start + begin, end: data_start + end });
            }
            // A JSON map would keep the last one silently.
            Entry::Occupied(o) => return Err(err(format!("tensor '{}' appears twice", o.key()))),
        }
    }
    Ok(Header { tensors, metadata: raw.metadata, data_start })
}

/// Dimensions a tensor may have (torch tensors of models have at most 5; a header listing 16M
/// dims took 608 MiB to parse before this bound).
pub const MAX_DIMS: usize = 8;

/// A header as read: entries checked for form, not yet against the file.
struct RawHeader {
    tensors: Vec<(String, RawTensor)>,
    metadata: BTreeMap<String, String>,
}

struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    offsets: [u64; 2],
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(HeaderVisitor)
    }
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
        let mut header = RawHeader { tensors: Vec::new(), metadata: BTreeMap::new() };
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                // Its string entries; other values are skipped (borrowed from the header, not copied).
                let entries: Option<BTreeMap<String, &'de RawValue>> = map.next_value()?;
                let text = |raw: &RawValue| serde_json::from_str::<String>(raw.get()).ok();
                header.metadata.extend(entries.into_iter().flatten().filter_map(|(k, v)| Some((k, text(v)?))));
                continue;
            }
            let tensor = map.next_value_seed(EntryVisitor { name: &name })?;
            header.tensors.push((name, tensor));
        }
        Ok(header)
    }
}

/// One tensor's entry, read field by field; errors name the tensor.
struct EntryVisitor<'n> {
    name: &'n str,
}

impl<'de> DeserializeSeed<'de> for EntryVisitor<'_> {
    type Value = RawTensor;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<RawTensor, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntryVisitor<'_> {
    type Value = RawTensor;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "tensor '{}': an object with dtype, shape and data_offsets", self.name)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawTensor, A::Error> {
        let bad = |message: String| A::Error::custom(format!("tensor '{}': {message}", self.name));
        let (mut dtype, mut shape, mut offsets) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "dtype" => {
                    let name: String = map.next_value().map_err(|e| bad(format!("no dtype ({e})")))?;
                    dtype = Some(name.parse().map_err(|_| bad(format!("unsupported dtype {name}")))?);
                }
                "shape" => shape = Some(map.next_value::<Sizes<MAX_DIMS>>().map_err(|e| bad(format!("shape is not a list of at most {MAX_DIMS} sizes ({e})")))?.0),
                "data_offsets" => {
                    let sizes = map.next_value::<Sizes<2>>().map_err(|e| bad(format!("data_offsets is not a pair of offsets ({e})")))?.0;
                    let &[begin, end] = sizes.as_slice() else { return Err(bad("data_offsets is not a pair of offsets".into())) };
                    offsets = Some([begin, end]);
                }
                _ => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        let dtype = dtype.ok_or_else(|| bad("no dtype".into()))?;
        let shape = shape.ok_or_else(|| bad("shape is not a list of sizes".into()))?;
        let offsets = offsets.ok_or_else(|| bad("data_offsets is not a pair of offsets".into()))?;
        let shape = shape.into_iter().map(|d| usize::try_from(d).map_err(|_| bad(format!("dim {d} is more than this platform addresses")))).collect::<std::result::Result<_, _>>()?;
        Ok(RawTensor { dtype, shape, offsets })
    }
}

/// A JSON list of at most `N` unsigned integers, refused at the first one past `N`.
struct Sizes<const N: usize>(Vec<u64>);

impl<'de, const N: usize> Deserialize<'de> for Sizes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct List<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for List<N> {
            type Value = Sizes<N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} unsigned integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Sizes<N>, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element::<u64>()? {
                    if out.len() == N {
                        return Err(A::Error::custom(format!("more than {N} entries")));
                    }
                    out.push(n);
                }
                Ok(Sizes(out))
            }
        }
        d.deserialize_seq(List::<N>)
    }
}


/// Reads and validates the header of the safetensors file `path`.
pub async fn read_header(source: &impl Source, path: &str) -> Result<Header> {
    let file_len = source.len(path).await?;
    let prefix = source.read_range(path, 0, PREFIX.min(file_len)).await?;
    let n = header_len(&source.describe(path), &prefix, file_len)?;
    let json = source.read_range(path, PREFIX, PREFIX + n).await?;
    parse_header(&source.describe(path), &json, file_len)
}

/// Decodes raw little-endian tensor bytes to f32 (F64 rounds; integers convert).
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let n = |b: &[u8]| -> [u8; 8] { std::array::from_fn(|i| b.get(i).copied().unwrap_or(0)) };
    let chunks = bytes.chunks_exact(dtype.size());
    match dtype {
        Dtype::F64 => chunks.map(|b| f64::from_le_bytes(n(b)) as f32).collect(),
        Dtype::F32 => chunks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => chunks.map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => chunks.map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F8_E4M3 => chunks.map(|b| f8_e4m3(b[0])).collect(),
        Dtype::F8_E5M2 => chunks.map(|b| half::f16::from_bits((b[0] as u16) << 8).to_f32()).collect(),
        Dtype::I64 => chunks.map(|b| i64::from_le_bytes(n(b)) as f32).collect(),
        Dtype::I32 => chunks.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32).collect(),
        Dtype::I16 => chunks.map(|b| i16::from_le_bytes([b[0], b[1]]) as f32).collect(),
        Dtype::I8 => chunks.map(|b| b[0] as i8 as f32).collect(),
        Dtype::U8 | Dtype::BOOL => chunks.map(|b| b[0] as f32).collect(),
    }
}

/// torch.float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN and
/// there are no infinities.
fn f8_e4m3(b: u8) -> f32 {
    let (exponent, mantissa) = ((b >> 3) & 15, (b & 7) as f32);
    let magnitude = match exponent {
        15 if b & 7 == 7 => f32::NAN,
        0 => mantissa / 8.0 * 2f32.powi(-6),
        e => (1.0 + mantissa / 8.0) * 2f32.powi(e as i32 - 7),
    };
    if b & 0x80 != 0 { -magnitude } else { magnitude }
}

/// Serialises f32 tensors (name, shape, data) into a safetensors file image.
pub fn serialize_f32(tensors: &[(&str, Vec<usize>, &[f32])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let end = offset + data.len() * 4;
        header.insert(name.to_string(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).expect("a JSON map always serialises");
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, data) in tensors {
        out.extend_from_slice(bytemuck::cast_slice(data));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn metadata_keeps_its_strings_and_drops_other_values() {
        let json = br#"{"__metadata__": {"format": "pt", "escaped": "a\"b", "n": 3, "x": null, "nested": {"a": [1, {"b": "c"}]}}}"#;
        let header = super::parse_header("h", json, 8 + json.len() as u64).unwrap();
        let kept: Vec<(&str, &str)> = header.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(kept, [("escaped", "a\"b"), ("format", "pt")]);
    }
}
