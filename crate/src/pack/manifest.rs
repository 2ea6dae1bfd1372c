//! `manifest.json`: what a pack holds and where, validated before anything is read by it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::quant::{QuantFormat, QuantPreset};
use crate::weights::Source;

/// Largest shard: one browser storage record.
pub const SHARD_BYTES: u64 = 64 << 20;
/// The manifest's `format`.
pub const FORMAT: &str = "sdxl-pack";
/// The manifest version this build reads and writes.
pub const VERSION: u32 = 1;
/// The manifest's path in a pack.
pub const MANIFEST: &str = "manifest.json";
/// Alignment of every plane and file in a shard.
pub(crate) const ALIGN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, tsify::Tsify)]
pub enum ModelKind {
    #[serde(rename = "sdxl-base")]
    Base,
    /// model_index.json's `requires_aesthetics_score`.
    #[serde(rename = "sdxl-refiner")]
    Refiner,
}

/// How an entry's planes encode its values: dense f16 / f32, or blocks the kernels read.
#[allow(non_camel_case_types)] // ggml's names, as the quantized formats
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    F16,
    F32,
    Q8_0,
    Q4_0,
    Q4_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl Storage {
    pub(crate) fn quant_format(self) -> Option<QuantFormat> {
        QuantFormat::ALL.into_iter().find(|f| Storage::quantized(*f) == self)
    }

    pub(crate) fn quantized(format: QuantFormat) -> Storage {
        match format {
            QuantFormat::Q8_0 => Storage::Q8_0,
            QuantFormat::Q4_0 => Storage::Q4_0,
            QuantFormat::Q4_1 => Storage::Q4_1,
            QuantFormat::Q2_K => Storage::Q2_K,
            QuantFormat::Q3_K => Storage::Q3_K,
            QuantFormat::Q4_K => Storage::Q4_K,
            QuantFormat::Q5_K => Storage::Q5_K,
            QuantFormat::Q6_K => Storage::Q6_K,
        }
    }
}

/// A byte range of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub shard: u32,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// `shards/NNNNN.bin`, NNNNN its index.
    pub path: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// A small file of the source model, stored in the shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackTensor {
    /// Component-qualified: `unet/conv_in.weight`.
    pub name: String,
    pub storage: Storage,
    /// The tensor's logical shape (diffusers').
    pub shape: Vec<usize>,
    /// Quantized entries: the matrix the planes describe (rows = shape[0], cols = the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<usize>,
    /// Dense values (f16 / f32), or the quantized codes (u32 words; K-quants: whole blocks).
    pub data: Vec<Segment>,
    /// Q8_0 / Q4_0 / Q4_1 entries: f16 block scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<Vec<Segment>>,
    /// Q4_1 entries: f16 block mins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mins: Option<Vec<Segment>>,
}

impl PackTensor {
    /// Bytes of all planes.
    pub fn bytes(&self) -> u64 {
        let sum = |s: &[Segment]| s.iter().map(|s| s.length).sum::<u64>();
        sum(&self.data) + self.scales.as_deref().map_or(0, sum) + self.mins.as_deref().map_or(0, sum)
    }

    /// Elements of the shape, where that fits usize (wasm32 included).
    fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

mod preset_name {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::quant::QuantPreset;

    pub fn serialize<S: Serializer>(p: &QuantPreset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<QuantPreset, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    pub model: ModelKind,
    /// The preset the converter applied to float weights (text encoders and UNet; the VAE is
    /// always dense); weights the source stored quantized are kept as stored.
    #[serde(with = "preset_name")]
    pub quant: QuantPreset,
    /// The shard size limit the pack was written with (every shard but the last is this long).
    pub shard_bytes: u64,
    pub shards: Vec<Shard>,
    pub files: Vec<PackFile>,
    pub tensors: Vec<PackTensor>,
}

impl Manifest {
    /// Total bytes of all shards.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

/// The path of shard `i`.
pub fn shard_path(i: usize) -> String {
    format!("shards/{i:05}.bin")
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A validated manifest with its look-up tables.
#[derive(Debug)]
pub struct Pack {
    manifest: Manifest,
    /// describe(manifest.json) of the source holding the pack, for errors.
    pub(crate) location: String,
    files: HashMap<String, usize>,
    /// component → (name within the component → index in manifest.tensors).
    pub(crate) components: HashMap<String, HashMap<String, usize>>,
}

impl Pack {
    /// Reads and validates `manifest.json` of `source`, and checks that every shard has the
    /// length the manifest gives (a truncated or missing shard is reported here, by name).
    pub async fn load(source: &impl Source) -> Result<Pack> {
        let location = source.describe(MANIFEST);
        if !source.exists(MANIFEST).await {
            return Err(Error::Io { path: location, message: "not a model pack (no manifest.json)".into() });
        }
        let bytes = source.read(MANIFEST).await?;
        let pack = Pack::from_manifest_bytes(&bytes, location)?;
        for shard in &pack.manifest.shards {
            let len = source.len(&shard.path).await?;
            if len != shard.bytes {
                return Err(Error::Io {
                    path: source.describe(&shard.path),
                    message: format!("shard is {len} bytes, the manifest says {} (truncated or replaced?)", shard.bytes),
                });
            }
        }
        Ok(pack)
    }

    /// Parses and validates a manifest; `location` names it in errors.
    pub fn from_manifest_bytes(bytes: &[u8], location: String) -> Result<Pack> {
        let bad = |message: String| Error::Config { path: location.clone(), message };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let format = value.get("format").and_then(|v| v.as_str());
        if format != Some(FORMAT) {
            return Err(bad(format!("format {} is not \"{FORMAT}\" (not a model pack)", value.get("format").map_or("missing".into(), |v| v.to_string()))));
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == VERSION as u64 => {}
            other => {
                let got = other.map_or_else(|| value.get("version").map_or("missing".into(), |v| v.to_string()), |v| v.to_string());
                return Err(bad(format!("pack version {got} is not supported (this build reads version {VERSION}); convert the model again")));
            }
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| bad(format!("invalid manifest: {e}")))?;
        Pack::new(manifest, location)
    }

    /// Validates `manifest` (segments inside their shards and aligned, plane sizes matching each
    /// entry's storage and shape, unique names) and indexes it.
    pub fn new(manifest: Manifest, location: String) -> Result<Pack> {
        let bad = |message: String| Error::Config { path: location.clone(), message };
        if manifest.shard_bytes == 0 || manifest.shard_bytes > SHARD_BYTES {
            return Err(bad(format!("shard_bytes {} is not in 1..={SHARD_BYTES}", manifest.shard_bytes)));
        }
        for (i, s) in manifest.shards.iter().enumerate() {
            if s.path != shard_path(i) {
                return Err(bad(format!("shard {i} is named '{}', expected '{}'", s.path, shard_path(i))));
            }
            if s.bytes > manifest.shard_bytes {
                return Err(bad(format!("{} is {} bytes, more than shard_bytes {}", s.path, s.bytes, manifest.shard_bytes)));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
                return Err(bad(format!("{}: sha256 '{}' is not 64 lowercase hex digits", s.path, s.sha256)));
            }
        }
        let check_segments = |what: &str, segments: &[Segment], expected: Option<u64>| -> Result<()> {
            let mut total = 0u64;
            for s in segments {
                let shard = manifest.shards.get(s.shard as usize).ok_or_else(|| bad(format!("{what}: segment in shard {} of {}", s.shard, manifest.shards.len())))?;
                if s.offset % ALIGN as u64 != 0 || s.length == 0 || s.offset.checked_add(s.length).is_none_or(|e| e > shard.bytes) {
                    return Err(bad(format!("{what}: segment {s:?} is empty, unaligned or outside {} ({} bytes)", shard.path, shard.bytes)));
                }
                total = total.checked_add(s.length).ok_or_else(|| bad(format!("{what}: segment lengths overflow")))?;
            }
            if Some(total) != expected {
                return Err(bad(format!("{what}: segments hold {total} bytes, expected {}", expected.map_or("more than 2^64".into(), |e| e.to_string()))));
            }
            Ok(())
        };
        let mut files = HashMap::new();
        for (i, f) in manifest.files.iter().enumerate() {
            if f.path.is_empty() || f.path.starts_with('/') || f.path.split('/').any(|p| p == ".." || p.is_empty()) || f.path == MANIFEST || f.path.starts_with("shards/") {
                return Err(bad(format!("file path '{}' is not allowed in a pack", f.path)));
            }
            check_segments(&f.path, &f.segments, Some(f.bytes))?;
            if files.insert(f.path.clone(), i).is_some() {
                return Err(bad(format!("file '{}' is listed twice", f.path)));
            }
        }
        let mut components: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (i, t) in manifest.tensors.iter().enumerate() {
            let (component, name) = t.name.split_once('/').filter(|(c, n)| !c.is_empty() && !n.is_empty()).ok_or_else(|| bad(format!("tensor name '{}' is not component/name", t.name)))?;
            let numel = t.numel().ok_or_else(|| bad(format!("{}: shape {:?} has more elements than this platform addresses", t.name, t.shape)))?;
            match t.storage.quant_format() {
                None => {
                    if t.rows.is_some() || t.cols.is_some() || t.scales.is_some() || t.mins.is_some() {
                        return Err(bad(format!("{}: a dense entry has rows/cols/scales/mins", t.name)));
                    }
                    let size = if t.storage == Storage::F16 { 2 } else { 4 };
                    check_segments(&t.name, &t.data, (numel as u64).checked_mul(size))?;
                }
                Some(format) => {
                    let (rows, cols) = (t.rows.unwrap_or(0), t.cols.unwrap_or(0));
                    if t.shape.len() < 2 || Some(rows) != t.shape.first().copied() || rows.checked_mul(cols) != Some(numel) || !format.fits(cols) {
                        return Err(bad(format!("{}: {:?} [{rows}, {cols}] does not match shape {:?}", t.name, t.storage, t.shape)));
                    }
                    let blocks = (rows as u64).checked_mul(cols.div_ceil(format.block_values()) as u64);
                    check_segments(&format!("{} data", t.name), &t.data, blocks.and_then(|b| b.checked_mul(format.words_per_block() as u64 * 4)))?;
                    match (format, t.scales.as_deref(), t.mins.as_deref()) {
                        (QuantFormat::Q4_1, Some(scales), Some(mins)) => {
                            check_segments(&format!("{} scales", t.name), scales, blocks.map(|b| b * 2))?;
                            check_segments(&format!("{} mins", t.name), mins, blocks.map(|b| b * 2))?;
                        }
                        (QuantFormat::Q8_0 | QuantFormat::Q4_0, Some(scales), None) => check_segments(&format!("{} scales", t.name), scales, blocks.map(|b| b * 2))?,
                        (k, None, None) if k.is_k() => {}
                        _ => return Err(bad(format!("{}: {:?} needs scales (q8_0, q4_0, q4_1), mins (q4_1 only), neither (K-quants)", t.name, t.storage))),
                    }
                }
            }
            if components.entry(component.to_string()).or_default().insert(name.to_string(), i).is_some() {
                return Err(bad(format!("tensor '{}' is listed twice", t.name)));
            }
        }
        Ok(Pack { manifest, location, files, components })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub(crate) fn file(&self, path: &str) -> Option<&PackFile> {
        self.files.get(path).map(|&i| &self.manifest.files[i])
    }

    /// Reads bytes `start..end` of a plane made of `segments` (only the segments it overlaps).
    pub(crate) async fn read_plane(&self, source: &impl Source, segments: &[Segment], start: u64, end: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        for s in segments {
            let (a, b) = (pos, pos + s.length);
            pos = b;
            let (lo, hi) = (start.max(a), end.min(b));
            if lo < hi {
                let path = &self.manifest.shards[s.shard as usize].path;
                let bytes = source.read_range(path, s.offset + lo - a, s.offset + hi - a).await?;
                if bytes.len() as u64 != hi - lo {
                    return Err(Error::Io { path: source.describe(path), message: format!("read {} bytes, asked for {}", bytes.len(), hi - lo) });
                }
                if out.is_empty() && hi - lo == end - start {
                    out = bytes; // the whole range in one segment (most planes): no copy
                } else {
                    out.reserve_exact((end - start) as usize - out.len());
                    out.extend_from_slice(&bytes);
                }
            }
        }
        if out.len() as u64 != end - start {
            return Err(Error::Io { path: self.location.clone(), message: format!("bytes {start}..{end} lie outside a {pos}-byte plane") });
        }
        Ok(out)
    }

    pub(crate) async fn read_whole(&self, source: &impl Source, segments: &[Segment]) -> Result<Vec<u8>> {
        let total = segments.iter().map(|s| s.length).sum();
        self.read_plane(source, segments, 0, total).await
    }
}
