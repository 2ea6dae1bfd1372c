//! Model packs: one SDXL model (base or refiner) as self-contained records of at most
//! [`SHARD_BYTES`] — what the browser stores (one IndexedDB record per shard) and what the GPU
//! upload reads shard by shard.
//!
//! A pack is a folder (or any [`Source`]) holding `manifest.json` and `shards/00000.bin`,
//! `shards/00001.bin`, ... Every shard but the last is exactly `shard_bytes` long. The shards hold,
//! back to back, the small files a model needs (model_index.json, each component's config.json,
//! scheduler/scheduler_config.json, the tokenizers' vocab.json, merges.txt, tokenizer_config.json
//! and special_tokens_map.json) and then every tensor of text_encoder, text_encoder_2, unet and vae,
//! each stored as it will be uploaded: dense f16 (f32 only where a value exceeds f16's range), or
//! the planes of a [`QuantizedTensor`] (`data`: u32 words, `scales`: f16, `mins`: f16 for q4; the
//! layout of [`crate::quant`]). Every plane (and file) starts 4-byte aligned and is a list of
//! segments `{shard, offset, length}`: a plane larger than what is left of a shard continues at
//! offset 0 of the next one. All numbers are little-endian.
//!
//! ```json
//! {
//!   "format": "sdxl-pack",
//!   "version": 1,
//!   "model": "sdxl-base",
//!   "quant": "q8",
//!   "shard_bytes": 67108864,
//!   "shards": [{ "path": "shards/00000.bin", "bytes": 67108864, "sha256": "9f86d0…" }, …],
//!   "files": [{ "path": "unet/config.json", "bytes": 1784, "sha256": "…",
//!               "segments": [{ "shard": 0, "offset": 1360, "length": 1784 }] }, …],
//!   "tensors": [
//!     { "name": "unet/conv_in.weight", "storage": "f16", "shape": [320, 4, 3, 3],
//!       "data": [{ "shard": 0, "offset": 2891776, "length": 23040 }] },
//!     { "name": "unet/down_blocks.1.attentions.0.proj_in.weight", "storage": "q8", "shape": [640, 640],
//!       "rows": 640, "cols": 640,
//!       "data": [{ "shard": 3, "offset": 67010560, "length": 98304 }, { "shard": 4, "offset": 0, "length": 311296 }],
//!       "scales": [{ "shard": 4, "offset": 311296, "length": 25600 }] },
//!     …
//!   ]
//! }
//! ```
//!
//! Loading: [`PackSource`] wraps the source holding the pack (a [`crate::weights::DirSource`], a
//! [`MemorySource`], IndexedDB later), serves the small files by their original paths (so
//! `ModelIndex`, configs and tokenizers load unchanged; each file's sha256 is checked as it is
//! read) and reports itself through [`Source::pack`], which [`Weights::open`] checks: on a pack it
//! reads the component's entries instead of safetensors files. Quantized entries upload as
//! [`Weight::Quant`] without re-quantizing, dense ones as [`Weight::Dense`]; a quantized entry asked
//! for dense ([`Weights::tensor`], [`Weights::host`]) is dequantized. Only the segments of the
//! tensor being loaded are read. Shards' sha256 are for the store to check: [`verify`].
//!
//! Converting: [`convert`] (any [`Source`] to any [`PackSink`]) and, natively, [`convert_dir`]
//! (`sdxl convert`).

use std::collections::HashMap;

use half::f16;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::quant::{dequantize, quantize, QuantFormat, QuantPolicy, QuantPreset, QuantTensor, QuantizedTensor, Weight, BLOCK};
use crate::weights::safetensors::{self, Dtype};
use crate::weights::{MemorySource, Source, Weights};

/// Largest shard: one browser storage record.
pub const SHARD_BYTES: u64 = 64 << 20;
/// The manifest's `format`.
pub const FORMAT: &str = "sdxl-pack";
/// The manifest version this build reads and writes.
pub const VERSION: u32 = 1;
/// The manifest's path in a pack.
pub const MANIFEST: &str = "manifest.json";
/// Alignment of every plane and file in a shard.
const ALIGN: usize = 4;
/// Bytes read at a time by [`verify`].
const VERIFY_CHUNK: u64 = 4 << 20;

/// Components whose tensors a pack holds, in pack order.
const WEIGHT_COMPONENTS: [&str; 4] = ["text_encoder", "text_encoder_2", "unet", "vae"];
/// Components of model_index.json the engine reads (the others are refused or skipped, see [`convert`]).
const KNOWN_COMPONENTS: [&str; 7] = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"];
/// Components every SDXL model (base or refiner) has.
const REQUIRED_COMPONENTS: [&str; 5] = ["unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2"];

// ------------------------------------------------------------------------------------------------
// Manifest
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelKind {
    #[serde(rename = "sdxl-base")]
    Base,
    /// model_index.json's `requires_aesthetics_score`.
    #[serde(rename = "sdxl-refiner")]
    Refiner,
}

#[allow(non_camel_case_types)] // ggml's names, as the quantized formats
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    F16,
    F32,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Storage {
    pub(crate) fn quant_format(self) -> Option<QuantFormat> {
        match self {
            Storage::Q8_0 => Some(QuantFormat::Q8_0),
            Storage::Q4_0 => Some(QuantFormat::Q4_0),
            Storage::Q4_1 => Some(QuantFormat::Q4_1),
            Storage::F16 | Storage::F32 => None,
        }
    }

    fn quantized(format: QuantFormat) -> Storage {
        match format {
            QuantFormat::Q8_0 => Storage::Q8_0,
            QuantFormat::Q4_0 => Storage::Q4_0,
            QuantFormat::Q4_1 => Storage::Q4_1,
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

/// A small file of the source folder, stored in the shards.
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
    /// The tensor's logical shape (as in the source safetensors).
    pub shape: Vec<usize>,
    /// Quantized entries: the matrix the planes describe (rows = shape[0], cols = the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<usize>,
    /// Dense values (f16 / f32), or the quantized codes (u32 words).
    pub data: Vec<Segment>,
    /// Quantized entries: f16 block scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<Vec<Segment>>,
    /// Q4 entries: f16 block mins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mins: Option<Vec<Segment>>,
}

impl PackTensor {
    /// Bytes of all planes.
    pub fn bytes(&self) -> u64 {
        let sum = |s: &[Segment]| s.iter().map(|s| s.length).sum::<u64>();
        sum(&self.data) + self.scales.as_deref().map_or(0, sum) + self.mins.as_deref().map_or(0, sum)
    }

    fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

pub(crate) mod preset_name {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::quant::QuantPreset;

    pub fn name(p: QuantPreset) -> &'static str {
        match p {
            QuantPreset::F16 => "f16",
            QuantPreset::Q8 => "q8",
            QuantPreset::Q4 => "q4",
        }
    }
    pub fn serialize<S: Serializer>(p: &QuantPreset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name(*p))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<QuantPreset, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "f16" => Ok(QuantPreset::F16),
            "q8" => Ok(QuantPreset::Q8),
            "q4" => Ok(QuantPreset::Q4),
            _ => Err(D::Error::custom(format!("unknown quant preset '{s}' (expected f16, q8 or q4)"))),
        }
    }
}

/// The name of a preset as the CLI and the manifest write it.
pub fn preset_name(p: QuantPreset) -> &'static str {
    preset_name::name(p)
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    pub model: ModelKind,
    /// The preset the converter applied (text encoders and UNet; the VAE is always dense).
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A validated manifest with its look-up tables: what [`Source::pack`] returns.
#[derive(Debug)]
pub struct Pack {
    manifest: Manifest,
    /// describe(manifest.json) of the source holding the pack, for errors.
    location: String,
    files: HashMap<String, usize>,
    /// component → (name within the component → index in manifest.tensors).
    components: HashMap<String, HashMap<String, usize>>,
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
        let check_segments = |what: &str, segments: &[Segment], expected: u64| -> Result<()> {
            let mut total = 0u64;
            for s in segments {
                let shard = manifest.shards.get(s.shard as usize).ok_or_else(|| bad(format!("{what}: segment in shard {} of {}", s.shard, manifest.shards.len())))?;
                if s.offset % ALIGN as u64 != 0 || s.length == 0 || s.offset.checked_add(s.length).is_none_or(|e| e > shard.bytes) {
                    return Err(bad(format!("{what}: segment {s:?} is empty, unaligned or outside {} ({} bytes)", shard.path, shard.bytes)));
                }
                total += s.length;
            }
            if total != expected {
                return Err(bad(format!("{what}: segments hold {total} bytes, expected {expected}")));
            }
            Ok(())
        };
        let mut files = HashMap::new();
        for (i, f) in manifest.files.iter().enumerate() {
            if f.path.is_empty() || f.path.starts_with('/') || f.path.split('/').any(|p| p == ".." || p.is_empty()) || f.path == MANIFEST || f.path.starts_with("shards/") {
                return Err(bad(format!("file path '{}' is not allowed in a pack", f.path)));
            }
            check_segments(&f.path, &f.segments, f.bytes)?;
            if files.insert(f.path.clone(), i).is_some() {
                return Err(bad(format!("file '{}' is listed twice", f.path)));
            }
        }
        let mut components: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (i, t) in manifest.tensors.iter().enumerate() {
            let (component, name) = t.name.split_once('/').filter(|(c, n)| !c.is_empty() && !n.is_empty()).ok_or_else(|| bad(format!("tensor name '{}' is not component/name", t.name)))?;
            let numel = t.numel();
            match t.storage.quant_format() {
                None => {
                    if t.rows.is_some() || t.cols.is_some() || t.scales.is_some() || t.mins.is_some() {
                        return Err(bad(format!("{}: a dense entry has rows/cols/scales/mins", t.name)));
                    }
                    let size = if t.storage == Storage::F16 { 2 } else { 4 };
                    check_segments(&t.name, &t.data, numel * size)?;
                }
                Some(format) => {
                    let (rows, cols) = (t.rows.unwrap_or(0), t.cols.unwrap_or(0));
                    if t.shape.len() < 2 || Some(rows) != t.shape.first().copied() || (rows * cols) as u64 != numel {
                        return Err(bad(format!("{}: {:?} [{rows}, {cols}] does not match shape {:?}", t.name, t.storage, t.shape)));
                    }
                    let blocks = (rows * cols.div_ceil(BLOCK)) as u64;
                    check_segments(&format!("{} data", t.name), &t.data, blocks * format.words_per_block() as u64 * 4)?;
                    let scales = t.scales.as_deref().ok_or_else(|| bad(format!("{}: no scales", t.name)))?;
                    check_segments(&format!("{} scales", t.name), scales, blocks * 2)?;
                    match (format, t.mins.as_deref()) {
                        (QuantFormat::Q4_1, Some(mins)) => check_segments(&format!("{} mins", t.name), mins, blocks * 2)?,
                        (QuantFormat::Q8_0 | QuantFormat::Q4_0, None) => {}
                        _ => return Err(bad(format!("{}: mins must be given for q4_1 and only for q4_1", t.name))),
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

    /// The tensors of component `dir` (`unet`, `text_encoder`, ...).
    pub(crate) fn component<'a>(&'a self, dir: &str) -> Result<PackComponent<'a>> {
        let (dir, tensors) = self.components.get_key_value(dir).ok_or_else(|| Error::Io {
            path: self.location.clone(),
            message: format!("the pack has no tensors for component '{dir}'"),
        })?;
        Ok(PackComponent { pack: self, dir, tensors })
    }

    fn file(&self, path: &str) -> Option<&PackFile> {
        self.files.get(path).map(|&i| &self.manifest.files[i])
    }

    /// Reads bytes `start..end` of a plane made of `segments` (only the segments it overlaps).
    async fn read_plane(&self, source: &impl Source, segments: &[Segment], start: u64, end: u64) -> Result<Vec<u8>> {
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

    async fn read_whole(&self, source: &impl Source, segments: &[Segment]) -> Result<Vec<u8>> {
        let total = segments.iter().map(|s| s.length).sum();
        self.read_plane(source, segments, 0, total).await
    }
}

// ------------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------------

/// A pack seen as a model folder: the small files by their original paths, the tensors through
/// [`Weights`]. `manifest.json` and `shards/*` are passed through to the inner source.
pub struct PackSource<S: Source> {
    inner: S,
    pack: Pack,
}

impl<S: Source> PackSource<S> {
    /// Reads and validates the manifest of the pack that `inner` holds.
    pub async fn open(inner: S) -> Result<PackSource<S>> {
        let pack = Pack::load(&inner).await?;
        Ok(PackSource { inner, pack })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.pack.manifest
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn passthrough(path: &str) -> bool {
        path == MANIFEST || path.starts_with("shards/")
    }
}

impl<S: Source> Source for PackSource<S> {
    fn describe(&self, path: &str) -> String {
        if Self::passthrough(path) {
            self.inner.describe(path)
        } else {
            format!("{path} (in the pack {})", self.inner.describe(""))
        }
    }
    async fn exists(&self, path: &str) -> bool {
        if Self::passthrough(path) {
            self.inner.exists(path).await
        } else {
            self.pack.file(path).is_some()
        }
    }
    async fn len(&self, path: &str) -> Result<u64> {
        if Self::passthrough(path) {
            return self.inner.len(path).await;
        }
        self.pack.file(path).map(|f| f.bytes).ok_or_else(|| Error::Io { path: self.describe(path), message: "no such file in the pack".into() })
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        if Self::passthrough(path) {
            return self.inner.read_range(path, start, end).await;
        }
        let file = self.pack.file(path).ok_or_else(|| Error::Io { path: self.describe(path), message: "no such file in the pack".into() })?;
        if start > end || end > file.bytes {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} out of range of {}", file.bytes) });
        }
        // Small files: read whole, so that the checksum can be verified.
        let bytes = self.pack.read_whole(&self.inner, &file.segments).await?;
        let sum = sha256_hex(&bytes);
        if sum != file.sha256 {
            return Err(Error::Io {
                path: self.describe(path),
                message: format!("sha256 {sum} does not match the manifest's {} (corrupt pack)", file.sha256),
            });
        }
        Ok(bytes[start as usize..end as usize].to_vec())
    }
    fn pack(&self) -> Option<&Pack> {
        Some(&self.pack)
    }
}

/// One component's entries, as [`Weights`] reads them from a pack.
#[derive(Clone, Copy)]
pub(crate) struct PackComponent<'a> {
    pack: &'a Pack,
    dir: &'a str,
    tensors: &'a HashMap<String, usize>,
}

impl<'a> PackComponent<'a> {
    pub fn names(&self) -> Vec<&'a str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn error(&self, name: &str, message: String) -> Error {
        Error::Tensor { path: self.pack.location.clone(), tensor: format!("{}/{name}", self.dir), message }
    }

    fn entry(&self, name: &str) -> Result<&'a PackTensor> {
        self.tensors
            .get(name)
            .map(|&i| &self.pack.manifest.tensors[i])
            .ok_or_else(|| self.error(name, "missing (is this the right model pack?)".into()))
    }

    pub fn shape(&self, name: &str) -> Result<&'a [usize]> {
        Ok(&self.entry(name)?.shape)
    }

    /// The dtype dense entries decode from; quantized entries have none.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        match self.entry(name)?.storage {
            Storage::F16 => Ok(Dtype::F16),
            Storage::F32 => Ok(Dtype::F32),
            s => Err(self.error(name, format!("stored {s:?} (quantized), not in one dtype"))),
        }
    }

    fn checked(&self, name: &str, shape: &[usize]) -> Result<&'a PackTensor> {
        let t = self.entry(name)?;
        if t.shape != shape {
            return Err(self.error(name, format!("shape {:?}, the config implies {shape:?}", t.shape)));
        }
        Ok(t)
    }

    async fn quantized(&self, source: &impl Source, t: &PackTensor, format: QuantFormat) -> Result<QuantizedTensor> {
        let data = self.pack.read_whole(source, &t.data).await?;
        let scales = self.pack.read_whole(source, t.scales.as_deref().unwrap_or_default()).await?;
        let mins = self.pack.read_whole(source, t.mins.as_deref().unwrap_or_default()).await?;
        let halves = |b: Vec<u8>| b.chunks_exact(2).map(|h| f16::from_le_bytes([h[0], h[1]])).collect::<Vec<_>>();
        Ok(QuantizedTensor {
            format,
            rows: t.rows.unwrap_or(0),
            cols: t.cols.unwrap_or(0),
            data: data.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect(),
            scales: halves(scales),
            mins: halves(mins),
        })
    }

    /// The entry as (dtype, little-endian bytes); quantized entries are dequantized to F32.
    async fn dense(&self, source: &impl Source, t: &PackTensor) -> Result<(Dtype, Vec<u8>)> {
        match t.storage.quant_format() {
            None => Ok((if t.storage == Storage::F16 { Dtype::F16 } else { Dtype::F32 }, self.pack.read_whole(source, &t.data).await?)),
            Some(format) => {
                let q = self.quantized(source, t, format).await?;
                Ok((Dtype::F32, bytemuck::cast_slice(&dequantize(&q)).to_vec()))
            }
        }
    }

    pub async fn host(&self, source: &impl Source, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.checked(name, shape)?;
        let (dtype, bytes) = self.dense(source, t).await?;
        Ok(safetensors::to_f32(dtype, &bytes))
    }

    /// A dense entry uploaded as float type `to`.
    pub async fn tensor(&self, source: &impl Source, gpu: &Gpu, name: &str, shape: &[usize], to: DType) -> Result<Tensor> {
        let t = self.checked(name, shape)?;
        let (dtype, bytes) = self.dense(source, t).await?;
        upload_dense(gpu, dtype, &bytes, shape, to, name).map_err(|e| self.error(name, e.to_string()))
    }

    pub async fn tensor_rows(&self, source: &impl Source, gpu: &Gpu, name: &str, shape: [usize; 2], to: DType) -> Result<Vec<Tensor>> {
        let t = self.checked(name, &shape)?;
        let [rows, dim] = shape;
        let per_chunk = (gpu.max_binding_bytes() / ((dim * to.size()) as u64).max(1)).max(1) as usize;
        let mut chunks = Vec::new();
        if t.storage.quant_format().is_some() {
            let values = self.host(source, name, &shape).await?;
            for r0 in (0..rows).step_by(per_chunk) {
                let n = per_chunk.min(rows - r0);
                let chunk = gpu.upload_as(&values[r0 * dim..(r0 + n) * dim], &[n, dim], to, name).map_err(|e| self.error(name, e.to_string()))?;
                chunks.push(chunk);
            }
            return Ok(chunks);
        }
        let (dtype, size) = if t.storage == Storage::F16 { (Dtype::F16, 2) } else { (Dtype::F32, 4) };
        let src_row = (dim * size) as u64;
        for r0 in (0..rows).step_by(per_chunk) {
            let n = per_chunk.min(rows - r0);
            let start = r0 as u64 * src_row;
            let bytes = self.pack.read_plane(source, &t.data, start, start + n as u64 * src_row).await?;
            chunks.push(upload_dense(gpu, dtype, &bytes, &[n, dim], to, name).map_err(|e| self.error(name, e.to_string()))?);
        }
        Ok(chunks)
    }

    /// Quantized entries upload as stored ([`Weight::Quant`]); dense ones as [`Weight::Dense`] in
    /// float type `to`.
    pub async fn matrix(&self, source: &impl Source, gpu: &Gpu, name: &str, shape: &[usize], to: DType) -> Result<Weight> {
        let t = self.checked(name, shape)?;
        match t.storage.quant_format() {
            None => Ok(Weight::Dense(self.tensor(source, gpu, name, shape, to).await?)),
            Some(format) => {
                let q = self.quantized(source, t, format).await?;
                let uploaded = QuantTensor::upload(gpu, &q, &format!("{}/{name}", self.dir)).map_err(|e| self.error(name, e.to_string()))?;
                Ok(Weight::Quant(uploaded))
            }
        }
    }
}

/// Uploads dense little-endian f16 / f32 bytes as float type `to`.
fn upload_dense(gpu: &Gpu, dtype: Dtype, bytes: &[u8], shape: &[usize], to: DType, name: &str) -> Result<Tensor> {
    match dtype {
        Dtype::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(halves) => gpu.upload_f16(halves, shape, to, name),
            Err(_) => {
                let halves: Vec<f16> = bytes.chunks_exact(2).map(|h| f16::from_le_bytes([h[0], h[1]])).collect();
                gpu.upload_f16(&halves, shape, to, name)
            }
        },
        _ => gpu.upload_as(&safetensors::to_f32(dtype, bytes), shape, to, name),
    }
}

/// Checks every shard of the pack that `source` holds against the manifest's length and sha256,
/// reading [`VERIFY_CHUNK`] bytes at a time. The error names the first bad shard.
pub async fn verify(source: &impl Source) -> Result<()> {
    let pack = Pack::load(source).await?;
    for shard in &pack.manifest.shards {
        let mut hasher = Sha256::new();
        let mut pos = 0;
        while pos < shard.bytes {
            let end = (pos + VERIFY_CHUNK).min(shard.bytes);
            hasher.update(source.read_range(&shard.path, pos, end).await?);
            pos = end;
        }
        let sum = hex(&hasher.finalize());
        if sum != shard.sha256 {
            return Err(Error::Io {
                path: source.describe(&shard.path),
                message: format!("sha256 {sum} does not match the manifest's {} (corrupt shard)", shard.sha256),
            });
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Converting
// ------------------------------------------------------------------------------------------------

/// Where a converter writes a pack: shards in order, then `manifest.json` last (a pack without a
/// manifest is incomplete). After each shard, [`PackSink::checkpoint`] gets what a later
/// [`convert`] needs to resume without reading again what those shards hold.
#[allow(async_fn_in_trait)]
pub trait PackSink {
    async fn write(&mut self, path: &str, bytes: &[u8]) -> Result<()>;
    async fn checkpoint(&mut self, _state: &Checkpoint) -> Result<()> {
        Ok(())
    }
}

impl PackSink for MemorySource {
    async fn write(&mut self, path: &str, bytes: &[u8]) -> Result<()> {
        self.insert(path, bytes.to_vec());
        Ok(())
    }
}

/// A conversion's progress after a shard was written: the shards so far and the entries that lie
/// wholly in them (always a prefix of the pack's files, then tensors, in order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub shards: Vec<Shard>,
    pub files: Vec<PackFile>,
    pub tensors: Vec<PackTensor>,
    /// Stream position where the first entry not listed begins (it may start in a written shard).
    pub next_offset: u64,
}

/// Cuts a byte stream into shards of exactly `shard_bytes` (the last one shorter), aligning every
/// entry to 4 bytes. A segment's shard and offset follow from its stream position alone, so a
/// resumed conversion replays the entry it was in the middle of and keeps only the bytes past
/// `keep_from` (the end of the shards already written).
struct ShardWriter<'k, K: PackSink> {
    sink: &'k mut K,
    shard_bytes: u64,
    /// Stream position of the next byte.
    pos: u64,
    keep_from: u64,
    /// Bytes of the shard being filled, from `keep_from` or its start on.
    current: Vec<u8>,
    done: Checkpoint,
    /// Where the entry being written began.
    entry_start: u64,
    on_shard: &'k mut dyn FnMut(&str),
}

impl<K: PackSink> ShardWriter<'_, K> {
    async fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let path = shard_path(self.done.shards.len());
        self.sink.write(&path, &self.current).await?;
        self.done.shards.push(Shard { path, bytes: self.current.len() as u64, sha256: sha256_hex(&self.current) });
        self.current.clear();
        self.done.next_offset = self.entry_start;
        self.sink.checkpoint(&self.done).await?;
        let total: u64 = self.done.shards.iter().map(|s| s.bytes).sum();
        (self.on_shard)(&format!("  {} ({:.1} MiB written)", self.done.shards.last().unwrap().path, total as f64 / 1048576.0));
        Ok(())
    }

    /// Appends `bytes` at `pos`; returns their segments.
    async fn append(&mut self, bytes: &[u8]) -> Result<Vec<Segment>> {
        let mut segments = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let offset = self.pos % self.shard_bytes;
            let n = ((self.shard_bytes - offset) as usize).min(rest.len());
            segments.push(Segment { shard: (self.pos / self.shard_bytes) as u32, offset, length: n as u64 });
            let end = self.pos + n as u64;
            if end > self.keep_from {
                let skip = self.keep_from.saturating_sub(self.pos) as usize;
                self.current.extend_from_slice(&rest[skip..n]);
            }
            self.pos = end;
            rest = &rest[n..];
            if self.pos.is_multiple_of(self.shard_bytes) {
                self.flush().await?;
            }
        }
        Ok(segments)
    }

    /// Writes one plane of an entry at the next aligned position.
    async fn write(&mut self, bytes: &[u8]) -> Result<Vec<Segment>> {
        let padding = self.pos.next_multiple_of(ALIGN as u64) - self.pos;
        self.append(&[0; ALIGN][..padding as usize]).await?;
        self.append(bytes).await
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / 1048576.0)
}

/// The small files a component needs: (path, required).
fn component_files(component: &str) -> Vec<(String, bool)> {
    match component {
        "scheduler" => vec![("scheduler/scheduler_config.json".into(), true)],
        "tokenizer" | "tokenizer_2" => [("vocab.json", true), ("merges.txt", true), ("tokenizer_config.json", false), ("special_tokens_map.json", false)]
            .iter()
            .map(|(f, r)| (format!("{component}/{f}"), *r))
            .collect(),
        _ => vec![(format!("{component}/config.json"), true)],
    }
}

/// Whether `name` (without its component) of `component` is stored quantized under `policy`, and how.
pub fn storage_format(policy: &QuantPolicy, component: &str, name: &str, shape: &[usize]) -> Option<QuantFormat> {
    // The VAE always stays dense; embedding tables (text_model.embeddings.*) are read by row.
    if component == "vae" || shape.len() < 2 || !name.ends_with(".weight") || name.contains("embeddings.") {
        return None;
    }
    policy.format_for(&format!("{component}/{name}"), shape[1..].iter().product())
}

/// Bytes a pack of `component` would hold for these (name, shape) tensors under `policy`: the
/// quantized planes, every other tensor as f16 (configs and tokenizer files not counted).
pub fn planned_bytes<'t>(policy: &QuantPolicy, component: &str, tensors: impl IntoIterator<Item = (&'t str, &'t [usize])>) -> u64 {
    tensors
        .into_iter()
        .map(|(name, shape)| match storage_format(policy, component, name, shape) {
            Some(format) => format.matrix_bytes(shape[0], shape[1..].iter().product()),
            None => shape.iter().product::<usize>() as u64 * 2,
        })
        .sum()
}

/// A tensor's planes as a pack stores them: quantized (`data`, `scales`, and `mins` for q4_1) when
/// `format` says so, else dense f16, or f32 where a value exceeds f16's range.
pub(crate) fn encode(values: &[f32], shape: &[usize], format: Option<QuantFormat>) -> Result<(Storage, Vec<Vec<u8>>)> {
    let Some(format) = format else {
        if values.iter().all(|&v| !v.is_finite() || f16::from_f32(v).is_finite()) {
            return Ok((Storage::F16, vec![values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()]));
        }
        return Ok((Storage::F32, vec![bytemuck::cast_slice(values).to_vec()]));
    };
    let q = quantize(values, shape[0], shape[1..].iter().product(), format)?;
    let mut planes = vec![bytemuck::cast_slice(&q.data).to_vec(), bytemuck::cast_slice(&q.scales).to_vec()];
    if format == QuantFormat::Q4_1 {
        planes.push(bytemuck::cast_slice(&q.mins).to_vec());
    }
    Ok((Storage::quantized(format), planes))
}

/// Whether a pack stores tensors of this dtype (integer buffers are skipped).
fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// A resumed conversion must meet the same entries in the same order.
fn check_resumed(stored: &str, now: &str) -> Result<()> {
    if stored == now {
        return Ok(());
    }
    Err(Error::InvalidParameter(format!("the model changed since the conversion began ('{stored}' became '{now}'); start it again")))
}

/// What converting the diffusers-layout model that `source` holds reads and writes: the small files
/// it copies and each weight component's safetensors files (the fp16 variant where the folder has
/// one: the same pack for half the download). Everything [`convert`] can refuse is refused here,
/// before anything is read past the headers.
pub struct Plan<'a, S: Source> {
    pub source: &'a S,
    pub model: ModelKind,
    pub preset: QuantPreset,
    /// Configs and tokenizer files, in pack order.
    pub small: Vec<String>,
    pub weights: Vec<(&'static str, Weights<'a, S>)>,
}

impl<S: Source> Plan<'_, S> {
    /// Every file the conversion reads, with its size: what a download fetches.
    pub async fn files(&self) -> Result<Vec<(String, u64)>> {
        let mut files = Vec::new();
        for path in self.small.iter().map(String::as_str).chain(self.weights.iter().flat_map(|(_, w)| w.files())) {
            files.push((path.to_string(), self.source.len(path).await?));
        }
        Ok(files)
    }

    /// Bytes of the pack: the small files plus every tensor as [`planned_bytes`] stores it (f32
    /// fallbacks for values beyond f16's range, which only the data shows, not counted).
    pub async fn pack_bytes(&self) -> Result<u64> {
        let policy = self.preset.policy();
        let mut total = 0;
        for path in &self.small {
            total += self.source.len(path).await?;
        }
        for (c, w) in &self.weights {
            let mut tensors = Vec::new();
            for name in w.names() {
                if is_float(w.dtype(name)?) {
                    tensors.push((name, w.shape(name)?));
                }
            }
            total += planned_bytes(&policy, c, tensors);
        }
        Ok(total)
    }
}

/// Plans the conversion of the model `source` holds (see [`Plan`]).
///
/// Refuses: a source without model_index.json, a pipeline class other than StableDiffusionXL*,
/// a declared component whose folder (config / tokenizer files / weights) is missing, a missing
/// SDXL component, integer tensors (other than the unused `position_ids` buffers, which are
/// skipped), and a source that is itself a pack.
pub async fn plan<S: Source>(source: &S, preset: QuantPreset, mut progress: impl FnMut(&str)) -> Result<Plan<'_, S>> {
    if source.pack().is_some() || (source.exists(MANIFEST).await && !source.exists("model_index.json").await) {
        return Err(Error::InvalidParameter(format!("{} is already a model pack; convert reads a diffusers model folder", source.describe(""))));
    }
    let index_path = "model_index.json";
    if !source.exists(index_path).await {
        return Err(Error::Config {
            path: source.describe(index_path),
            message: "missing: not a diffusers model folder (expected model_index.json, unet/, vae/, ...)".into(),
        });
    }
    let index: serde_json::Value = crate::weights::read_json(source, index_path).await?;
    let bad = |message: String| Error::Config { path: source.describe(index_path), message };
    let map = index.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let class = map.get("_class_name").and_then(|v| v.as_str()).unwrap_or("");
    if !class.starts_with("StableDiffusionXL") {
        return Err(bad(format!("pipeline class '{class}' is not a Stable Diffusion XL pipeline (StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline)")));
    }
    let declared = |c: &str| matches!(map.get(c), Some(serde_json::Value::Array(a)) if !a.is_empty() && a.iter().all(|v| !v.is_null()));
    for c in REQUIRED_COMPONENTS {
        if !declared(c) {
            return Err(bad(format!("the model has no {c} (every SDXL base and refiner has {})", REQUIRED_COMPONENTS.join(", "))));
        }
    }
    for (key, _) in map.iter().filter(|(k, _)| !k.starts_with('_') && !KNOWN_COMPONENTS.contains(&k.as_str())) {
        if declared(key) {
            progress(&format!("note: skipping component '{key}' (not used by this engine)"));
        }
    }
    let kind = if map.get("requires_aesthetics_score").and_then(|v| v.as_bool()).unwrap_or(false) { ModelKind::Refiner } else { ModelKind::Base };
    let components: Vec<&str> = KNOWN_COMPONENTS.iter().copied().filter(|c| declared(c)).collect();

    // Everything that can be refused is checked before anything is written.
    let mut files = vec![(index_path.to_string(), true)];
    for c in &components {
        files.extend(component_files(c));
    }
    let mut small = Vec::new();
    for (path, required) in files {
        if source.exists(&path).await {
            small.push(path);
        } else if required {
            let component = path.split('/').next().unwrap_or_default();
            return Err(Error::Io {
                path: source.describe(&path),
                message: format!("missing: model_index.json declares '{component}' but its folder lacks this file"),
            });
        }
    }
    let mut weights = Vec::new();
    for c in WEIGHT_COMPONENTS.iter().copied().filter(|c| components.contains(c)) {
        let w = Weights::open(source, c, true).await?;
        for name in w.names() {
            let dtype = w.dtype(name)?;
            if !is_float(dtype) && !name.ends_with("position_ids") {
                return Err(Error::Tensor {
                    path: source.describe(c),
                    tensor: name.to_string(),
                    message: format!("dtype {dtype:?} is not supported (weights must be F32, F16 or BF16)"),
                });
            }
        }
        weights.push((c, w));
    }
    Ok(Plan { source, model: kind, preset, small, weights })
}

/// Converts the model that `plan` reads ([`plan`]) into a pack written to `sink`, with
/// the text encoders' and UNet's weight matrices stored as its preset says (see [`storage_format`];
/// the VAE stays dense) and every other tensor dense f16 (f32 if a value exceeds f16's range).
/// One tensor is held in memory at a time, plus the shard being filled. With `resume` (the sink's
/// last [`Checkpoint`]), the entries it lists are not read again and the shards it lists are not
/// written again: the entry that was cut is read and re-encoded, and only its rest is kept.
/// `progress` gets one line per component and per shard written.
///
/// Refuses `shard_bytes` that is not a positive multiple of 4 up to [`SHARD_BYTES`].
pub async fn convert<S: Source, K: PackSink>(
    plan: Plan<'_, S>,
    shard_bytes: u64,
    resume: Option<Checkpoint>,
    sink: &mut K,
    mut progress: impl FnMut(&str),
) -> Result<Manifest> {
    if shard_bytes == 0 || !shard_bytes.is_multiple_of(ALIGN as u64) || shard_bytes > SHARD_BYTES {
        return Err(Error::InvalidParameter(format!("shard size {shard_bytes} must be a positive multiple of {ALIGN} up to {SHARD_BYTES}")));
    }
    let Plan { source, model: kind, preset, small, weights } = plan;
    let policy = preset.policy();
    let resume = resume.unwrap_or_default();
    let mut on_shard = |line: &str| progress(line);
    let keep_from = resume.shards.iter().map(|s| s.bytes).sum();
    if resume.shards.iter().any(|s| s.bytes != shard_bytes) {
        return Err(Error::InvalidParameter(format!("the checkpoint's shards are not {shard_bytes} bytes each; start the conversion again")));
    }
    let (pos, files_done, tensors_done) = (resume.next_offset, resume.files.len(), resume.tensors.len());
    let mut out = ShardWriter { sink, shard_bytes, pos, keep_from, current: Vec::new(), done: resume, entry_start: pos, on_shard: &mut on_shard };
    let mut small_bytes = 0;
    for (i, path) in small.iter().enumerate() {
        if i < files_done {
            check_resumed(&out.done.files[i].path, path)?;
            continue;
        }
        out.entry_start = out.pos;
        let bytes = source.read(path).await?;
        small_bytes += bytes.len() as u64;
        let segments = out.write(&bytes).await?;
        out.done.files.push(PackFile { path: path.clone(), bytes: bytes.len() as u64, sha256: sha256_hex(&bytes), segments });
    }
    (out.on_shard)(&format!("files: {} small files, {} read", small.len(), mib(small_bytes)));

    let mut index = 0;
    for (c, w) in &weights {
        let (mut read, mut written, mut counts) = (0u64, 0u64, HashMap::<Storage, usize>::new());
        let mut skipped = Vec::new();
        for name in w.names() {
            let dtype = w.dtype(name)?;
            if !is_float(dtype) {
                skipped.push(name);
                continue;
            }
            let full = format!("{c}/{name}");
            index += 1;
            if index <= tensors_done {
                check_resumed(&out.done.tensors[index - 1].name, &full)?;
                continue;
            }
            out.entry_start = out.pos;
            let shape = w.shape(name)?.to_vec();
            let values = w.host(name, &shape).await?;
            read += (values.len() * dtype.size()) as u64;
            let format = storage_format(&policy, c, name, &shape);
            let (storage, planes) = encode(&values, &shape, format).map_err(|e| Error::Tensor { path: source.describe(c), tensor: name.to_string(), message: e.to_string() })?;
            let mut segments = Vec::new();
            for plane in &planes {
                segments.push(out.write(plane).await?);
            }
            let mut segments = segments.into_iter();
            let (rows, cols) = match format {
                Some(_) => (Some(shape[0]), Some(shape[1..].iter().product())),
                None => (None, None),
            };
            let data = segments.next().unwrap_or_default();
            let entry = PackTensor { name: full, storage, shape, rows, cols, data, scales: segments.next(), mins: segments.next() };
            written += entry.bytes();
            *counts.entry(entry.storage).or_default() += 1;
            out.done.tensors.push(entry);
        }
        let mut kinds: Vec<_> = counts.iter().collect();
        kinds.sort();
        let kinds: Vec<String> = kinds.iter().map(|(s, n)| format!("{n} {}", format!("{s:?}").to_lowercase())).collect();
        let mut line = format!("{c}: {} tensors ({}), {} read, {} written", counts.values().sum::<usize>(), kinds.join(", "), mib(read), mib(written));
        if !skipped.is_empty() {
            line += &format!("; skipped unused integer buffers {}", skipped.join(", "));
        }
        (out.on_shard)(&line);
    }
    out.entry_start = out.pos;
    out.flush().await?;
    let done = std::mem::take(&mut out.done);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model: kind,
        quant: preset,
        shard_bytes,
        shards: done.shards,
        files: done.files,
        tensors: done.tensors,
    };
    // The manifest this build writes must be one it reads.
    Pack::new(manifest.clone(), MANIFEST.into())?;
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
    out.sink.write(MANIFEST, &json).await?;
    Ok(manifest)
}

/// Options of [`convert_dir`].
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions {
    pub quant: QuantPreset,
    /// Shard size limit: [`SHARD_BYTES`]; tests use small ones so that planes cross shards.
    pub shard_bytes: u64,
    /// Replace a pack already in the output folder.
    pub force: bool,
}

impl ConvertOptions {
    pub fn new(quant: QuantPreset) -> ConvertOptions {
        ConvertOptions { quant, shard_bytes: SHARD_BYTES, force: false }
    }
}

/// Writes a pack into a folder.
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSink {
    root: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSink {
    pub fn new(root: impl Into<std::path::PathBuf>) -> DirSink {
        DirSink { root: root.into() }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl PackSink for DirSink {
    async fn write(&mut self, path: &str, bytes: &[u8]) -> Result<()> {
        let target = self.root.join(path);
        let io = |e: std::io::Error| Error::Io { path: target.display().to_string(), message: e.to_string() };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&target, bytes).map_err(io)
    }
}

/// `sdxl convert`: the diffusers folder `from` to a pack in the folder `out`.
///
/// `out` must be missing or empty; with `force`, a folder holding only a pack (manifest.json,
/// shards/) is replaced. On failure, what was written is removed again.
#[cfg(not(target_arch = "wasm32"))]
pub async fn convert_dir(from: &std::path::Path, out: &std::path::Path, options: &ConvertOptions, mut progress: impl FnMut(&str)) -> Result<Manifest> {
    use crate::weights::DirSource;
    let io = |path: &std::path::Path, e: std::io::Error| Error::Io { path: path.display().to_string(), message: e.to_string() };
    if !from.is_dir() {
        return Err(Error::Io { path: from.display().to_string(), message: "not a folder (--from must be a diffusers model folder)".into() });
    }
    let existed = out.exists();
    if existed {
        if !out.is_dir() {
            return Err(Error::Io { path: out.display().to_string(), message: "exists and is not a folder".into() });
        }
        let entries: Vec<String> = std::fs::read_dir(out)
            .map_err(|e| io(out, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| io(out, e))?;
        if !entries.is_empty() {
            let only_pack = entries.iter().all(|e| e == MANIFEST || e == "shards");
            if !options.force {
                let hint = if only_pack { " (it holds a pack: --force replaces it)" } else { "" };
                return Err(Error::Io { path: out.display().to_string(), message: format!("output folder exists and is not empty{hint}") });
            }
            if !only_pack {
                return Err(Error::Io {
                    path: out.display().to_string(),
                    message: format!("output folder holds files other than a pack ({}); not replacing it, even with --force", entries.join(", ")),
                });
            }
        }
    }
    let clean = || {
        let _ = std::fs::remove_file(out.join(MANIFEST));
        let _ = std::fs::remove_dir_all(out.join("shards"));
    };
    clean();
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let source = DirSource::new(from);
    let mut sink = DirSink::new(out);
    let result = async {
        let plan = plan(&source, options.quant, &mut progress).await?;
        convert(plan, options.shard_bytes, None, &mut sink, progress).await
    }
    .await;
    if result.is_err() {
        clean();
        if !existed {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}
