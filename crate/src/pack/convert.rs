//! Writing packs: [`plan`] reads what a model (any [`ModelSource`]: a diffusers folder, a single
//! file, another format) holds and refuses what cannot be converted before anything is written;
//! [`convert`] streams it tensor by tensor into shards of a [`PackSink`], resumable from a
//! [`ConvertState`]; natively, [`convert_path`] is `sdxl convert`.

use std::collections::HashMap;
use std::rc::Rc;

use half::f16;
use serde::{Deserialize, Serialize};

use super::manifest::{sha256_hex, shard_path, Manifest, ModelKind, Pack, PackFile, PackTensor, Segment, Shard, Storage, ALIGN, FORMAT, MANIFEST, SHARD_BYTES, VERSION};
use crate::error::{mib, Error, Result};
use crate::gpu::HOST_CHUNK;
use crate::quant::{QuantFormat, QuantPolicy, QuantPreset, QuantizedTensor};
use crate::weights::safetensors::{self, Dtype};
use crate::weights::{all_rows, quantize_host, Encoding, HostTensor, MemorySource, ModelSource, Source, TensorInfo, TensorSource};

/// Components whose tensors a pack holds, in pack order.
const WEIGHT_COMPONENTS: [&str; 4] = ["text_encoder", "text_encoder_2", "unet", "vae"];
/// Components of model_index.json the engine reads (the others are refused or skipped, see [`plan`]).
const KNOWN_COMPONENTS: [&str; 7] = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"];
/// Components every SDXL model (base or refiner) has.
const REQUIRED_COMPONENTS: [&str; 5] = ["unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2"];

/// What converting a model reads and writes: the small files it copies and each weight
/// component's tensors. Everything [`convert`] can refuse is refused by [`plan`], before anything
/// is read past the headers.
pub struct Plan<'m, 'a> {
    pub model: &'m ModelSource<'a>,
    pub kind: ModelKind,
    pub preset: QuantPreset,
    /// Configs and tokenizer files, in pack order.
    pub small: Vec<String>,
    pub weights: Vec<(&'static str, Rc<dyn TensorSource + 'a>)>,
}

impl Plan<'_, '_> {
    /// Bytes the conversion reads: the small files and every tensor as its source stores it (twice
    /// where [`read_twice`] says so).
    pub async fn read_bytes(&self) -> Result<u64> {
        let policy = self.preset.policy();
        let tensor_bytes = |c: &str, name: &str, info: &TensorInfo| {
            let times = if read_twice(info, policy.format_for(c, name, &info.shape)) { 2 } else { 1 };
            times * info.bytes
        };
        Ok(self.small_bytes().await? + self.tensors().map(|(c, name, info)| tensor_bytes(c, name, info)).sum::<u64>())
    }

    /// Bytes of the pack: the small files plus every tensor as [`planned_bytes`] stores it (f32
    /// fallbacks for values beyond f16's range, which only the data shows, not counted).
    pub async fn pack_bytes(&self) -> Result<u64> {
        let policy = self.preset.policy();
        let stored = self.tensors().filter(|(_, _, info)| is_stored(info.encoding));
        let tensor_bytes: u64 = stored.map(|(c, name, info)| planned_bytes(&policy, c, [(name, info.shape.as_slice(), info.encoding)])).sum();
        Ok(self.small_bytes().await? + tensor_bytes)
    }

    async fn small_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for path in &self.small {
            total += self.model.files.len(path).await?;
        }
        Ok(total)
    }

    /// Every tensor with its component and info.
    fn tensors(&self) -> impl Iterator<Item = (&str, &str, &TensorInfo)> {
        self.weights.iter().flat_map(|(c, w)| w.names().into_iter().filter_map(move |n| Some((*c, n, w.info(n)?))))
    }
}

/// Plans the conversion of `model` (see [`Plan`]).
///
/// Refuses: a model without model_index.json, a pipeline class other than StableDiffusionXL*, a
/// declared component whose files (config / tokenizer files / weights) are missing, a missing
/// SDXL component, and integer tensors (other than the unused `position_ids` buffers, which are
/// skipped).
pub async fn plan<'m, 'a>(model: &'m ModelSource<'a>, preset: QuantPreset) -> Result<Plan<'m, 'a>> {
    let files = &model.files;
    let index_path = "model_index.json";
    if !files.exists(index_path).await {
        return Err(Error::Config {
            path: files.describe(index_path),
            message: "missing: not a diffusers model folder (expected model_index.json, unet/, vae/, ...)".into(),
        });
    }
    let index: serde_json::Value = crate::weights::read_json(files, index_path).await?;
    let bad = |message: String| Error::Config { path: files.describe(index_path), message };
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
    let kind = if map.get("requires_aesthetics_score").and_then(|v| v.as_bool()).unwrap_or(false) { ModelKind::Refiner } else { ModelKind::Base };
    let components: Vec<&str> = KNOWN_COMPONENTS.iter().copied().filter(|c| declared(c)).collect();

    let mut wanted = vec![(index_path.to_string(), true)];
    for c in &components {
        wanted.extend(component_files(c));
    }
    let mut small = Vec::new();
    for (path, required) in wanted {
        if files.exists(&path).await {
            small.push(path);
        } else if required {
            let component = path.split('/').next().unwrap_or_default();
            return Err(Error::Io { path: files.describe(&path), message: format!("missing: model_index.json declares '{component}' but its folder lacks this file") });
        }
    }
    let mut weights = Vec::new();
    for c in WEIGHT_COMPONENTS.iter().copied().filter(|c| components.contains(c)) {
        let w = model.tensors(c).await?;
        for name in w.names() {
            let info = w.info(name).expect("listed");
            if !is_stored(info.encoding) && !name.ends_with("position_ids") {
                let dtype = match info.encoding {
                    Encoding::Float(dtype) => dtype.name(),
                    Encoding::Quant(format) => format.name(),
                };
                return Err(Error::Tensor { path: w.location(), tensor: name.to_string(), message: format!("dtype {dtype} is not supported (weights are float or quantized)") });
            }
        }
        weights.push((c, w));
    }
    Ok(Plan { model, kind, preset, small, weights })
}

/// Whether a pack stores tensors of this encoding (integer buffers are skipped).
fn is_stored(encoding: Encoding) -> bool {
    match encoding {
        Encoding::Float(dtype) => dtype.is_float(),
        Encoding::Quant(_) => true,
    }
}

/// Where a converter writes a pack: shards in order, then `manifest.json` last (a pack without a
/// manifest is incomplete). After each shard, [`PackSink::save_state`] gets what a later
/// [`convert`] needs to resume without reading again what those shards hold.
#[allow(async_fn_in_trait)]
pub trait PackSink {
    async fn write(&mut self, path: &str, bytes: &[u8]) -> Result<()>;
    async fn save_state(&mut self, _state: &ConvertState) -> Result<()> {
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
pub struct ConvertState {
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
    done: ConvertState,
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
        self.done.shards.push(Shard { path: path.clone(), bytes: self.current.len() as u64, sha256: sha256_hex(&self.current) });
        self.current.clear();
        self.done.next_offset = self.entry_start;
        self.sink.save_state(&self.done).await?;
        let total: u64 = self.done.shards.iter().map(|s| s.bytes).sum();
        (self.on_shard)(&format!("  {path} ({:.1} MiB written)", total as f64 / 1048576.0));
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

/// Converts the model that `plan` reads into a pack written to `sink`: weights the source stores
/// quantized (GGUF blocks) as stored, the text encoders' and UNet's float weight matrices as the
/// preset's policy says (the VAE stays dense), every other tensor dense f16 (f32 if a value
/// exceeds f16's range). One tensor is held in memory at a time, plus the shard being filled.
/// With `resume` (the sink's last [`ConvertState`]), the entries it lists are not read again and
/// the shards it lists are not written again: the entry that was cut is read and re-encoded, and
/// only its rest is kept. `progress` gets one line per component and per shard written.
///
/// Refuses `shard_bytes` that is not a positive multiple of 4 up to [`SHARD_BYTES`].
pub async fn convert<K: PackSink>(plan: Plan<'_, '_>, shard_bytes: u64, resume: Option<ConvertState>, sink: &mut K, mut progress: impl FnMut(&str)) -> Result<Manifest> {
    if shard_bytes == 0 || !shard_bytes.is_multiple_of(ALIGN as u64) || shard_bytes > SHARD_BYTES {
        return Err(Error::InvalidParameter(format!("shard size {shard_bytes} must be a positive multiple of {ALIGN} up to {SHARD_BYTES}")));
    }
    // The shard buffer is allocated once at its final size: growing it by doubling next to the
    // tensors being converted fragments the wasm heap (import benchmark: 210 → 194 MiB peak).
    let capacity = plan.pack_bytes().await?.min(shard_bytes) as usize;
    let Plan { model, kind, preset, small, weights } = plan;
    let policy = preset.policy();
    let resume = resume.unwrap_or_default();
    let mut on_shard = |line: &str| progress(line);
    let keep_from = resume.shards.iter().map(|s| s.bytes).sum();
    if resume.shards.iter().any(|s| s.bytes != shard_bytes) {
        return Err(Error::InvalidParameter(format!("the saved conversion's shards are not {shard_bytes} bytes each; start the conversion again")));
    }
    let (pos, files_done, tensors_done) = (resume.next_offset, resume.files.len(), resume.tensors.len());
    let mut out = ShardWriter { sink, shard_bytes, pos, keep_from, current: Vec::with_capacity(capacity), done: resume, entry_start: pos, on_shard: &mut on_shard };
    let mut small_bytes = 0;
    for (i, path) in small.iter().enumerate() {
        if i < files_done {
            check_resumed(&out.done.files[i].path, path)?;
            continue;
        }
        out.entry_start = out.pos;
        let bytes = model.files.read(path).await?;
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
            let info = w.info(name).expect("listed");
            if !is_stored(info.encoding) {
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
            let shape = info.shape.clone();
            read += info.bytes;
            let format = policy.format_for(c, name, &shape);
            let segments = match (info.encoding, format) {
                (Encoding::Float(dtype), None) if shape.len() >= 2 => write_dense(&mut out, w.as_ref(), name, &shape, dtype).await?,
                _ => {
                    let host = w.read(name, &shape, all_rows(&shape)).await?;
                    let encoded = encode(host, &shape, format).map_err(|e| Error::Tensor { path: w.location(), tensor: name.to_string(), message: e.to_string() })?;
                    let mut segments = Vec::new();
                    for plane in encoded.planes() {
                        segments.push(out.write(plane).await?);
                    }
                    (encoded.storage(), segments)
                }
            };
            let (storage, mut segments) = (segments.0, segments.1.into_iter());
            let (rows, cols) = match storage.quant_format() {
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
    let manifest = Manifest { format: FORMAT.into(), version: VERSION, model: kind, quant: preset, shard_bytes, shards: done.shards, files: done.files, tensors: done.tensors };
    // The manifest this build writes must be one it reads.
    Pack::new(manifest.clone(), MANIFEST.into())?;
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
    out.sink.write(MANIFEST, &json).await?;
    Ok(manifest)
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

/// Bytes a pack of `component` would hold for these (name, shape, encoding) tensors under
/// `policy`: quantized sources as stored, float ones as the policy says or f16 (configs and
/// tokenizer files not counted).
pub fn planned_bytes<'t>(policy: &QuantPolicy, component: &str, tensors: impl IntoIterator<Item = (&'t str, &'t [usize], Encoding)>) -> u64 {
    tensors
        .into_iter()
        .map(|(name, shape, encoding)| match (encoding, policy.format_for(component, name, shape)) {
            (Encoding::Quant(format), _) | (_, Some(format)) => format.matrix_bytes(shape[0], shape[1..].iter().product()),
            _ => shape.iter().product::<usize>() as u64 * 2,
        })
        .sum()
}

/// A tensor as a pack stores it: dense bytes, or blocks.
pub(crate) enum Encoded {
    Dense(Storage, Vec<u8>),
    Quant(QuantizedTensor),
}

impl Encoded {
    pub(crate) fn storage(&self) -> Storage {
        match self {
            Encoded::Dense(storage, _) => *storage,
            Encoded::Quant(q) => Storage::quantized(q.format),
        }
    }

    /// The planes in pack order: dense bytes; or `data`, then `scales` (not for K-quants, whose
    /// blocks hold their scales) and `mins` (q4_1).
    pub(crate) fn planes(&self) -> Vec<&[u8]> {
        match self {
            Encoded::Dense(_, bytes) => vec![bytes],
            Encoded::Quant(q) => {
                let mut planes = vec![bytemuck::cast_slice(&q.data)];
                if !q.format.is_k() {
                    planes.push(bytemuck::cast_slice(&q.scales));
                }
                if q.format == QuantFormat::Q4_1 {
                    planes.push(bytemuck::cast_slice(&q.mins));
                }
                planes
            }
        }
    }
}

/// A tensor as a pack stores it: blocks as read; float values quantized when `format` says so,
/// else dense f16 (f16 sources as they are), or f32 where a value exceeds f16's range. Values
/// are decoded a few rows at a time: a tensor is never held whole as f32.
pub(crate) fn encode(host: HostTensor, shape: &[usize], format: Option<QuantFormat>) -> Result<Encoded> {
    match (host, format) {
        (HostTensor::Quant(q), _) => Ok(Encoded::Quant(q)),
        (HostTensor::Random(_), _) => Err(Error::InvalidParameter("random weights cannot be converted".into())),
        (HostTensor::Float { dtype, bytes }, Some(format)) => Ok(Encoded::Quant(quantize_host(dtype, &bytes, shape[0], shape[1..].iter().product(), format)?)),
        (HostTensor::Float { dtype: Dtype::F16, bytes }, None) => Ok(Encoded::Dense(Storage::F16, bytes)),
        (HostTensor::Float { dtype, bytes }, None) => {
            let storage = if fits_f16(dtype, &bytes) { Storage::F16 } else { Storage::F32 };
            Ok(Encoded::Dense(storage, dense_bytes(dtype, &bytes, storage)))
        }
    }
}

/// Whether every finite value of `bytes` (of float `dtype`) is finite in f16.
fn fits_f16(dtype: Dtype, bytes: &[u8]) -> bool {
    let fits = |v: &f32| !v.is_finite() || f16::from_f32(*v).is_finite();
    bytes.chunks(HOST_CHUNK * dtype.size()).all(|c| safetensors::to_f32(dtype, c).iter().all(fits))
}

/// `bytes` of float `dtype` as a dense storage's bytes (f16 or f32).
fn dense_bytes(dtype: Dtype, bytes: &[u8], storage: Storage) -> Vec<u8> {
    match (dtype, storage) {
        (Dtype::F16, Storage::F16) | (Dtype::F32, Storage::F32) => bytes.to_vec(),
        (_, Storage::F16) => bytes.chunks(HOST_CHUNK * dtype.size()).flat_map(|c| safetensors::to_f32(dtype, c).into_iter().flat_map(|v| f16::from_f32(v).to_le_bytes())).collect(),
        _ => bytes.chunks(HOST_CHUNK * dtype.size()).flat_map(|c| safetensors::to_f32(dtype, c).into_iter().flat_map(f32::to_le_bytes)).collect(),
    }
}

/// Rows of a dense [rows, ...] tensor that [`write_dense`] reads at a time.
fn rows_per_read(shape: &[usize]) -> usize {
    (HOST_CHUNK / shape[1..].iter().product::<usize>().max(1)).max(1)
}

/// Whether converting a tensor reads it twice: a dense one of another float type than f16 that
/// takes several reads is first read to check its range (see [`write_dense`]).
fn read_twice(info: &TensorInfo, format: Option<QuantFormat>) -> bool {
    match (info.encoding, format) {
        (Encoding::Float(dtype), None) => dtype != Dtype::F16 && info.shape.len() >= 2 && info.shape[0] > rows_per_read(&info.shape),
        _ => false,
    }
}

/// Writes a dense tensor as [`encode`] would (f16, or f32 where a value exceeds f16's range) a few
/// rows at a time, so that the heap never holds a large table (bigG's 126 MB token embedding)
/// whole. A source of another float type than f16 that takes several reads is read twice: first to
/// check the range (the f16 bytes of the first reads may already be in written shards).
async fn write_dense<K: PackSink>(out: &mut ShardWriter<'_, K>, w: &dyn TensorSource, name: &str, shape: &[usize], dtype: Dtype) -> Result<(Storage, Vec<Vec<Segment>>)> {
    let per_read = rows_per_read(shape);
    let reads = (0..shape[0]).step_by(per_read).map(|r| r..(r + per_read).min(shape[0]));
    // (A source may widen what it stores: a transposed f16 projection reads as f32.)
    let read = |rows| async move {
        match w.read(name, shape, rows).await? {
            HostTensor::Float { dtype, bytes } => Ok((dtype, bytes)),
            _ => Err(Error::Tensor { path: w.location(), tensor: name.to_string(), message: "random weights cannot be converted".into() }),
        }
    };
    let mut storage = Storage::F16;
    let mut first = None;
    if dtype != Dtype::F16 {
        for rows in reads.clone() {
            let (dtype, bytes) = read(rows).await?;
            let fits = fits_f16(dtype, &bytes);
            if shape[0] <= per_read {
                first = Some((dtype, bytes)); // one read: kept for the write
            }
            if !fits {
                storage = Storage::F32;
                break;
            }
        }
    }
    let mut segments: Vec<Segment> = out.write(&[]).await?;
    for rows in reads {
        let (dtype, bytes) = match first.take() {
            Some(read) => read,
            None => read(rows).await?,
        };
        for s in out.append(&dense_bytes(dtype, &bytes, storage)).await? {
            match segments.last_mut() {
                Some(last) if last.shard == s.shard && last.offset + last.length == s.offset => last.length += s.length,
                _ => segments.push(s),
            }
        }
    }
    Ok((storage, vec![segments]))
}

/// A resumed conversion must meet the same entries in the same order.
fn check_resumed(stored: &str, now: &str) -> Result<()> {
    if stored == now {
        return Ok(());
    }
    Err(Error::InvalidParameter(format!("the model changed since the conversion began ('{stored}' became '{now}'); start it again")))
}

/// Options of [`convert_path`].
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

/// `sdxl convert`: the diffusers folder or single-file checkpoint `from` (configs inferred, or
/// from the folder `config`) to a pack in the folder `out`.
///
/// `out` must be missing or empty; with `force`, a folder holding only a pack (manifest.json,
/// shards/) is replaced. On failure, what was written is removed again.
#[cfg(not(target_arch = "wasm32"))]
pub async fn convert_path(from: &std::path::Path, config: Option<&std::path::Path>, out: &std::path::Path, options: &ConvertOptions, mut progress: impl FnMut(&str)) -> Result<Manifest> {
    use crate::weights::{DirSource, SharedSource};
    let io = |path: &std::path::Path, e: std::io::Error| Error::Io { path: path.display().to_string(), message: e.to_string() };
    let model = if from.is_file() {
        let (folder, file) = (from.parent().unwrap_or(std::path::Path::new("")), from.file_name().unwrap_or_default().to_string_lossy());
        ModelSource::single_file(DirSource::new(folder), &file, config.map(|c| SharedSource::new(DirSource::new(c)))).await?
    } else if !from.is_dir() {
        return Err(Error::Io { path: from.display().to_string(), message: "no such file or folder (--from is a diffusers model folder or a single-file checkpoint)".into() });
    } else if from.join(MANIFEST).is_file() && !from.join("model_index.json").is_file() {
        return Err(Error::InvalidParameter(format!("{} is already a model pack; convert reads a diffusers folder or a single file", from.display())));
    } else if config.is_some() {
        return Err(Error::InvalidParameter(format!("--config applies to single-file checkpoints, and {} is a folder", from.display())));
    } else {
        ModelSource::folder(DirSource::new(from), true)
    };
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
    let mut sink = DirSink::new(out);
    let result = async {
        progress(&format!("{}: {}", from.display(), model.format));
        let plan = plan(&model, options.quant).await?;
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

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::weights::{Fetch, TensorInfo};
    use std::ops::Range;

    /// One 2-D tensor served a row range at a time, as files serve them.
    struct Table {
        info: TensorInfo,
        bytes: Vec<u8>,
    }

    impl TensorSource for Table {
        fn location(&self) -> String {
            "table".into()
        }
        fn names(&self) -> Vec<&str> {
            vec!["t"]
        }
        fn info(&self, _: &str) -> Option<&TensorInfo> {
            Some(&self.info)
        }
        fn read<'s>(&'s self, _: &'s str, shape: &'s [usize], rows: Range<usize>) -> Fetch<'s, HostTensor> {
            let Encoding::Float(dtype) = self.info.encoding else { unreachable!() };
            let row = shape[1] * dtype.size();
            Box::pin(async move { Ok(HostTensor::Float { dtype, bytes: self.bytes[rows.start * row..rows.end * row].to_vec() }) })
        }
    }

    /// `write_dense` (in several reads across shards, or in one) writes exactly what `encode` makes
    /// of the whole tensor, and picks f32 only where a value exceeds f16's range.
    #[test]
    fn dense_tensors_are_written_a_few_rows_at_a_time_as_encode_writes_them() {
        for shape in [[3200, 1400], [40, 100]] {
            let values: Vec<f32> = (0..shape[0] * shape[1]).map(|i| ((i * 7919) % 2003) as f32 / 97.0 - 10.0).collect();
            let mut huge = values.clone();
            huge[values.len() * 3 / 4] = 1e6;
            let cases = [(Dtype::F16, &values, Storage::F16), (Dtype::BF16, &values, Storage::F16), (Dtype::F32, &values, Storage::F16), (Dtype::F32, &huge, Storage::F32)];
            for (dtype, values, expected) in cases {
                let bytes: Vec<u8> = match dtype {
                    Dtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
                    Dtype::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                    _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                let several = bytes.len() > 2 * HOST_CHUNK * dtype.size();
                assert_eq!(several, shape[0] == 3200, "the large tensor takes several reads, the small one one");
                let table = Table { info: TensorInfo { shape: shape.to_vec(), encoding: Encoding::Float(dtype), bytes: bytes.len() as u64 }, bytes: bytes.clone() };
                let encoded = encode(HostTensor::Float { dtype, bytes }, &shape, None).unwrap();
                let (storage, planes) = (encoded.storage(), encoded.planes());
                assert_eq!(storage, expected, "{dtype:?} {shape:?}");

                let mut sink = MemorySource::default();
                let mut on_shard = |_: &str| {};
                let shard_bytes = 1 << 20;
                let mut out =
                    ShardWriter { sink: &mut sink, shard_bytes, pos: 0, keep_from: 0, current: Vec::new(), done: ConvertState::default(), entry_start: 0, on_shard: &mut on_shard };
                pollster::block_on(out.write(&[1; 6])).unwrap();
                let (written, segments) = pollster::block_on(write_dense(&mut out, &table, "t", &shape, dtype)).unwrap();
                pollster::block_on(out.flush()).unwrap();
                assert_eq!(written, storage);
                let segments = &segments[0];
                assert!(segments.windows(2).all(|s| s[1].shard == s[0].shard + 1 && s[1].offset == 0), "one segment per shard: {segments:?}");
                assert_eq!(segments[0].offset, 6u64.next_multiple_of(ALIGN as u64), "aligned after the 6 bytes before it");
                let mut read = Vec::new();
                for s in segments {
                    let shard = pollster::block_on(sink.read(&shard_path(s.shard as usize))).unwrap();
                    read.extend_from_slice(&shard[s.offset as usize..(s.offset + s.length) as usize]);
                }
                assert!(read == planes[0], "{dtype:?} {shape:?}: the pack's bytes differ from encode's");
            }
        }
    }
}
