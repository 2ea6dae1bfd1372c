//! Model files: where bytes come from (`Source`), safetensors and GGUF headers, config.json, and loading
//! one component's tensors to the GPU one tensor at a time (never a whole file in memory).

pub mod checkpoint;
pub mod gguf;
pub mod random;
pub mod safetensors;

use std::collections::HashMap;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::pack::{Pack, PackComponent};
use crate::quant::{quantize, QuantPolicy, QuantTensor, Weight};
use checkpoint::Checkpoint;
use gguf::{GgmlType, GgufTensor, Repacked};
use safetensors::{Dtype, Header, TensorInfo};

/// Read access to a model folder (diffusers layout) by relative path.
#[allow(async_fn_in_trait)]
pub trait Source {
    /// Human-readable location of `path`, for errors.
    fn describe(&self, path: &str) -> String;
    async fn exists(&self, path: &str) -> bool;
    async fn len(&self, path: &str) -> Result<u64>;
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>>;
    async fn read(&self, path: &str) -> Result<Vec<u8>> {
        let n = self.len(path).await?;
        self.read_range(path, 0, n).await
    }
    /// The model pack this source serves ([`crate::pack::PackSource`]), if any: then
    /// [`Weights::open`] reads the pack's entries instead of safetensors files.
    fn pack(&self) -> Option<&Pack> {
        None
    }
    /// The seed when this source synthesises random weights ([`random::RandomSource`]): then
    /// [`Weights::open`] answers every tensor with random values on the GPU.
    fn random_weights(&self) -> Option<u32> {
        None
    }
    /// The single-file checkpoint this source serves ([`checkpoint::CheckpointSource`]), if any:
    /// then [`Weights::open`] reads the component's tensors from that one file.
    fn checkpoint(&self) -> Option<&Checkpoint> {
        None
    }
}

/// A model folder on disk.
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSource {
    root: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> DirSource {
        DirSource { root: root.into() }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Source for DirSource {
    fn describe(&self, path: &str) -> String {
        self.root.join(path).display().to_string()
    }
    async fn exists(&self, path: &str) -> bool {
        self.root.join(path).is_file()
    }
    async fn len(&self, path: &str) -> Result<u64> {
        std::fs::metadata(self.root.join(path))
            .map(|m| m.len())
            .map_err(|e| Error::Io { path: self.describe(path), message: e.to_string() })
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |e: std::io::Error| Error::Io { path: self.describe(path), message: e.to_string() };
        let mut f = std::fs::File::open(self.root.join(path)).map_err(io)?;
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = vec![0; (end - start) as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

/// Files held in memory (tests, and pages that already hold the bytes).
#[derive(Default)]
pub struct MemorySource {
    files: HashMap<String, Vec<u8>>,
}

impl MemorySource {
    pub fn insert(&mut self, path: &str, bytes: Vec<u8>) {
        self.files.insert(path.to_string(), bytes);
    }
    fn get(&self, path: &str) -> Result<&Vec<u8>> {
        self.files.get(path).ok_or_else(|| Error::Io { path: self.describe(path), message: "no such file".into() })
    }
}

impl Source for MemorySource {
    fn describe(&self, path: &str) -> String {
        format!("memory:{path}")
    }
    async fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }
    async fn len(&self, path: &str) -> Result<u64> {
        Ok(self.get(path)?.len() as u64)
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        self.get(path)?
            .get(start as usize..end as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} out of range") })
    }
}

/// Reads and parses a JSON file.
pub async fn read_json<T: DeserializeOwned>(source: &impl Source, path: &str) -> Result<T> {
    let bytes = source.read(path).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Config { path: source.describe(path), message: format!("invalid JSON: {e}") })
}

/// How a tensor's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// One value per element (safetensors, and GGUF's F32/F16/BF16).
    Float(Dtype),
    /// GGUF's 32-value blocks; every row is whole blocks.
    Blocks(GgmlType),
}

/// Where one tensor's bytes lie: a file of [`Weights`], how they are stored, diffusers' shape and
/// the byte range.
#[derive(Debug, Clone)]
pub struct Entry {
    pub file: usize,
    pub stored: Stored,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
    /// The bytes hold the transpose of the 2-D `shape` (OpenCLIP's text projection).
    pub transposed: bool,
}

impl Entry {
    pub fn safetensors(file: usize, info: TensorInfo) -> Entry {
        Entry { file, stored: Stored::Float(info.dtype), shape: info.shape, start: info.start, end: info.end, transposed: false }
    }

    pub fn gguf(file: usize, tensor: GgufTensor) -> Entry {
        let stored = match tensor.ggml_type {
            GgmlType::F32 => Stored::Float(Dtype::F32),
            GgmlType::F16 => Stored::Float(Dtype::F16),
            GgmlType::BF16 => Stored::Float(Dtype::BF16),
            blocks => Stored::Blocks(blocks),
        };
        Entry { file, stored, shape: tensor.shape, start: tensor.start, end: tensor.end, transposed: false }
    }

    /// The dtype [`Weights`] reads the values in: blocks are dequantized to F32.
    fn dtype(&self) -> Dtype {
        match self.stored {
            Stored::Float(dtype) => dtype,
            Stored::Blocks(_) => Dtype::F32,
        }
    }

    /// Bytes of one row of the stored (for a transposed entry: the transposed) matrix.
    fn stored_row_bytes(&self) -> usize {
        let values = match self.transposed {
            true => self.shape[0],
            false => self.shape.iter().skip(1).product(),
        };
        match self.stored {
            Stored::Float(dtype) => values * dtype.size(),
            Stored::Blocks(t) => values / t.block_values() * t.block_bytes(),
        }
    }
}

/// The tensors of one model component (`text_encoder/`, `unet/`, ...), possibly sharded.
pub struct Weights<'a, S: Source> {
    source: &'a S,
    /// The component's folder (`unet`), which qualifies tensor names for the quantization policy.
    dir: String,
    files: Vec<String>,
    tensors: HashMap<String, Entry>,
    /// Which weight matrices `matrix` quantizes as they load.
    quant: QuantPolicy,
    /// Set when the source is a model pack: this component's entries, stored as the pack says
    /// (`quant` is then not used); `files` and `tensors` stay empty.
    pack: Option<PackComponent<'a>>,
    /// Set when the source synthesises random weights: their seed (`files` and `tensors` empty).
    random: Option<u32>,
    /// The float type dense tensors upload as; None: the GPU's working type.
    upload_dtype: Option<DType>,
}

impl<'a, S: Source> Weights<'a, S> {
    /// Opens `dir/{model,diffusion_pytorch_model}[.fp16].safetensors` or a sharded index. The fp16
    /// variant is preferred when the GPU computes in f16 (half the bytes to read).
    pub async fn open(source: &'a S, dir: &str, prefer_fp16: bool) -> Result<Weights<'a, S>> {
        if let Some(pack) = source.pack() {
            let pack = Some(pack.component(dir)?);
            return Ok(Weights { source, dir: dir.to_string(), files: Vec::new(), tensors: HashMap::new(), quant: QuantPolicy::default(), pack, random: None, upload_dtype: None });
        }
        if let Some(seed) = source.random_weights() {
            let random = Some(seed);
            return Ok(Weights { source, dir: dir.to_string(), files: Vec::new(), tensors: HashMap::new(), quant: QuantPolicy::default(), pack: None, random, upload_dtype: None });
        }
        if let Some(checkpoint) = source.checkpoint() {
            let tensors = checkpoint.component(&source.describe(&checkpoint.path), dir)?.clone();
            let files = vec![checkpoint.path.clone()];
            return Ok(Weights { source, dir: dir.to_string(), files, tensors, quant: QuantPolicy::default(), pack: None, random: None, upload_dtype: None });
        }
        let variants: &[&str] = if prefer_fp16 { &[".fp16", ""] } else { &["", ".fp16"] };
        for stem in ["model", "diffusion_pytorch_model"] {
            for variant in variants {
                let single = format!("{dir}/{stem}{variant}.safetensors");
                if source.exists(&single).await {
                    return Weights::from_files(source, vec![single]).await;
                }
                let index = format!("{dir}/{stem}.safetensors.index{variant}.json");
                let index_alt = format!("{dir}/{stem}{variant}.safetensors.index.json");
                for index in [index, index_alt] {
                    if source.exists(&index).await {
                        let json: serde_json::Value = read_json(source, &index).await?;
                        let mut shards: Vec<String> = json
                            .get("weight_map")
                            .and_then(|m| m.as_object())
                            .ok_or_else(|| Error::Config { path: source.describe(&index), message: "no weight_map".into() })?
                            .values()
                            .filter_map(|v| v.as_str().map(|s| format!("{dir}/{s}")))
                            .collect();
                        shards.sort();
                        shards.dedup();
                        return Weights::from_files(source, shards).await;
                    }
                }
            }
        }
        Err(Error::Io { path: source.describe(dir), message: "no model.safetensors or diffusion_pytorch_model.safetensors".into() })
    }

    pub async fn from_files(source: &'a S, files: Vec<String>) -> Result<Weights<'a, S>> {
        let mut tensors = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let header = read_header(source, file).await?;
            tensors.extend(header.tensors.into_iter().map(|(name, info)| (name, Entry::safetensors(i, info))));
        }
        let dir = files.first().and_then(|f| f.rsplit_once('/')).map_or("", |(dir, _)| dir).to_string();
        Ok(Weights { source, dir, files, tensors, quant: QuantPolicy::default(), pack: None, random: None, upload_dtype: None })
    }

    /// Quantize weight matrices loaded through [`Weights::matrix`] as `policy` says.
    pub fn with_quant(mut self, policy: &QuantPolicy) -> Self {
        self.quant = policy.clone();
        self
    }

    /// Upload dense tensors as `dtype` (a component computing in another float type than the
    /// GPU's working one: an upcast VAE).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.upload_dtype = Some(dtype);
        self
    }

    fn upload_dtype(&self, gpu: &Gpu) -> DType {
        self.upload_dtype.unwrap_or(gpu.dtype)
    }

    /// A Linear or Conv2d weight ([out, in, ...]): quantized on the CPU as it streams in when the
    /// preset says so (one tensor in memory at a time), else dense.
    pub async fn matrix(&self, gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Weight> {
        if let Some(pack) = &self.pack {
            return pack.matrix(self.source, gpu, name, shape, self.upload_dtype(gpu)).await;
        }
        let rows = shape.first().copied().unwrap_or(0);
        let cols = shape.iter().skip(1).product::<usize>();
        let format = self.quant.format_for(&format!("{}/{name}", self.dir), cols);
        if let Some(seed) = self.random {
            return random::matrix(gpu, seed, name, shape, format, self.upload_dtype(gpu));
        }
        let entry = self.checked(name, shape)?;
        if let (Stored::Blocks(ggml_type), false) = (entry.stored, entry.transposed) {
            // GGUF blocks are served as stored, whatever the policy says.
            let bytes = self.source.read_range(&self.files[entry.file], entry.start, entry.end).await?;
            let tensor = GgufTensor { name: name.to_string(), ggml_type, shape: shape.to_vec(), start: entry.start, end: entry.end };
            let bad = |e: Error| self.shape_error(entry.file, name, e.to_string());
            return match gguf::repack(&tensor, &bytes).map_err(bad)? {
                Repacked::Quantized(q) => Ok(Weight::Quant(QuantTensor::upload(gpu, &q, name)?)),
                Repacked::Dense(values) => Ok(Weight::Dense(gpu.upload_as(&values, shape, self.upload_dtype(gpu), name).map_err(bad)?)),
            };
        }
        match format {
            Some(format) => {
                let values = self.host(name, shape).await?;
                let q = quantize(&values, rows, cols, format).map_err(|e| self.shape_error(entry.file, name, e.to_string()))?;
                Ok(Weight::Quant(QuantTensor::upload(gpu, &q, name)?))
            }
            None => Ok(Weight::Dense(self.tensor(gpu, name, shape).await?)),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        if let Some(pack) = &self.pack {
            return pack.contains(name);
        }
        if self.random.is_some() {
            return false;
        }
        self.tensors.contains_key(name)
    }

    /// The safetensors files the tensors come from (none for a pack).
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(String::as_str)
    }

    /// Names of all stored tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        if let Some(pack) = &self.pack {
            return pack.names();
        }
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        if let Some(pack) = &self.pack {
            return pack.shape(name);
        }
        Ok(&self.info(name)?.shape)
    }

    /// Stored dtype of a tensor (a quantized pack or GGUF entry has none: an error).
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        if let Some(pack) = &self.pack {
            return pack.dtype(name);
        }
        let entry = self.info(name)?;
        match entry.stored {
            Stored::Float(dtype) => Ok(dtype),
            Stored::Blocks(t) => Err(self.shape_error(entry.file, name, format!("stored as ggml {} blocks, not a float dtype", t.name()))),
        }
    }

    fn info(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            path: self.files.iter().map(|f| self.source.describe(f)).collect::<Vec<_>>().join(", "),
            tensor: name.to_string(),
            message: "missing (is this the right model folder?)".into(),
        })
    }

    fn shape_error(&self, file: usize, name: &str, message: String) -> Error {
        Error::Tensor { path: self.source.describe(&self.files[file]), tensor: name.to_string(), message }
    }

    /// Reads a tensor to the CPU as f32, checking its shape.
    pub async fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(pack) = &self.pack {
            return pack.host(self.source, name, shape).await;
        }
        if let Some(seed) = self.random {
            return Ok(random::host(seed, name, shape));
        }
        let (entry, bytes) = self.read(name, shape).await?;
        Ok(safetensors::to_f32(entry.dtype(), &bytes))
    }

    /// A tensor's entry, checked against the shape the config implies.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let entry = self.info(name)?;
        if entry.shape != shape {
            return Err(self.shape_error(entry.file, name, format!("shape {:?}, the config implies {shape:?}", entry.shape)));
        }
        Ok(entry)
    }

    /// A tensor's bytes in diffusers' layout, checking its shape.
    async fn read(&self, name: &str, shape: &[usize]) -> Result<(&Entry, Vec<u8>)> {
        let entry = self.checked(name, shape)?;
        let rows = shape.first().copied().unwrap_or(1);
        Ok((entry, self.read_rows(entry, 0, rows).await?))
    }

    /// Rows `r0..r1` (along the first dimension) of an entry in diffusers' layout, as values of
    /// `entry.dtype()`; a transposed entry is read whole.
    async fn read_rows(&self, entry: &Entry, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let stored_rows = if entry.transposed { 0..entry.shape[1] } else { r0..r1 };
        let row_bytes = entry.stored_row_bytes() as u64;
        let (start, end) = (entry.start + stored_rows.start as u64 * row_bytes, entry.start + stored_rows.end as u64 * row_bytes);
        let mut bytes = self.source.read_range(&self.files[entry.file], start, end).await?;
        if let Stored::Blocks(ggml_type) = entry.stored {
            bytes = gguf::dequantize(ggml_type, &bytes).into_iter().flat_map(f32::to_le_bytes).collect();
        }
        if !entry.transposed {
            return Ok(bytes);
        }
        let &[rows, cols] = &entry.shape[..] else { unreachable!("only 2-D entries are transposed") };
        let size = entry.dtype().size();
        let mut out = vec![0; bytes.len()];
        for (r, c) in (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))) {
            out[(r * cols + c) * size..][..size].copy_from_slice(&bytes[(c * rows + r) * size..][..size]);
        }
        Ok(out[r0 * cols * size..r1 * cols * size].to_vec())
    }

    /// Uploads a float tensor in the component's float type (the GPU's working one unless
    /// [`Weights::with_dtype`] says otherwise), checking its shape against the config.
    pub async fn tensor(&self, gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = self.upload_dtype(gpu);
        if let Some(pack) = &self.pack {
            return pack.tensor(self.source, gpu, name, shape, dtype).await;
        }
        if let Some(seed) = self.random {
            return random::tensor(gpu, seed, name, shape, dtype);
        }
        let (entry, bytes) = self.read(name, shape).await?;
        let uploaded = match entry.dtype() {
            Dtype::F16 if dtype == DType::F16 => gpu.upload_f16(bytemuck::cast_slice(&aligned(bytes)), shape, dtype, name),
            stored @ (Dtype::F16 | Dtype::BF16 | Dtype::F32) => gpu.upload_as(&safetensors::to_f32(stored, &bytes), shape, dtype, name),
            stored => return Err(self.shape_error(entry.file, name, format!("{stored:?} is not a float dtype"))),
        };
        uploaded.map_err(|e| self.shape_error(entry.file, name, e.to_string()))
    }

    /// Uploads a 2-D table [rows, dim] as row chunks that each fit one GPU binding.
    pub async fn tensor_rows(&self, gpu: &Gpu, name: &str, shape: [usize; 2]) -> Result<Vec<Tensor>> {
        let dtype = self.upload_dtype(gpu);
        if let Some(pack) = &self.pack {
            return pack.tensor_rows(self.source, gpu, name, shape, dtype).await;
        }
        let [rows, dim] = shape;
        let row_bytes = (dim * dtype.size()) as u64;
        let per_chunk = (gpu.max_binding_bytes() / row_bytes.max(1)).max(1) as usize;
        if let Some(seed) = self.random {
            let chunk = |r0: usize| random::tensor(gpu, seed, &format!("{name}.{r0}"), &[per_chunk.min(rows - r0), dim], dtype);
            return (0..rows).step_by(per_chunk).map(chunk).collect();
        }
        let entry = self.checked(name, &shape)?;
        let mut chunks = Vec::new();
        for r0 in (0..rows).step_by(per_chunk) {
            let n = per_chunk.min(rows - r0);
            let bytes = self.read_rows(entry, r0, r0 + n).await?;
            let chunk = gpu
                .upload_as(&safetensors::to_f32(entry.dtype(), &bytes), &[n, dim], dtype, name)
                .map_err(|e| self.shape_error(entry.file, name, e.to_string()))?;
            chunks.push(chunk);
        }
        Ok(chunks)
    }
}

/// Copies bytes into u16-aligned storage (a Vec<u8> has no alignment guarantee for casts).
fn aligned(bytes: Vec<u8>) -> Vec<u16> {
    bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
}

pub(crate) async fn read_header(source: &impl Source, path: &str) -> Result<Header> {
    let file_len = source.len(path).await?;
    let prefix = source.read_range(path, 0, safetensors::PREFIX.min(file_len)).await?;
    let n = safetensors::header_len(&source.describe(path), &prefix, file_len)?;
    let json = source.read_range(path, safetensors::PREFIX, safetensors::PREFIX + n).await?;
    safetensors::parse_header(&source.describe(path), &json, file_len)
}
