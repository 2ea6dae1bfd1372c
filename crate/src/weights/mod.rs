//! Model files: where bytes come from (`Source`), safetensors and GGUF headers, config.json, and loading
//! one component's tensors to the GPU one tensor at a time (never a whole file in memory).

pub mod gguf;
pub mod random;
pub mod safetensors;

use std::collections::HashMap;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::pack::{Pack, PackComponent};
use crate::quant::{quantize, QuantPolicy, QuantTensor, Weight};
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

/// The tensors of one model component (`text_encoder/`, `unet/`, ...), possibly sharded.
pub struct Weights<'a, S: Source> {
    source: &'a S,
    /// The component's folder (`unet`), which qualifies tensor names for the quantization policy.
    dir: String,
    files: Vec<String>,
    tensors: HashMap<String, (usize, TensorInfo)>,
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
            tensors.extend(header.tensors.into_iter().map(|(name, info)| (name, (i, info))));
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
        match format {
            Some(format) => {
                let values = self.host(name, shape).await?;
                let file = self.info(name)?.0;
                let q = quantize(&values, rows, cols, format).map_err(|e| self.shape_error(file, name, e.to_string()))?;
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
        Ok(&self.info(name)?.1.shape)
    }

    /// Stored dtype of a tensor (a quantized pack entry has none: an error).
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        if let Some(pack) = &self.pack {
            return pack.dtype(name);
        }
        Ok(self.info(name)?.1.dtype)
    }

    fn info(&self, name: &str) -> Result<&(usize, TensorInfo)> {
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
        let (file, info) = self.info(name)?;
        if info.shape != shape {
            return Err(self.shape_error(*file, name, format!("shape {:?}, the config implies {shape:?}", info.shape)));
        }
        let bytes = self.source.read_range(&self.files[*file], info.start, info.end).await?;
        Ok(safetensors::to_f32(info.dtype, &bytes))
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
        let (file, info) = self.info(name)?;
        if info.shape != shape {
            return Err(self.shape_error(*file, name, format!("shape {:?}, the config implies {shape:?}", info.shape)));
        }
        let bytes = self.source.read_range(&self.files[*file], info.start, info.end).await?;
        let uploaded = match info.dtype {
            Dtype::F16 if dtype == DType::F16 => gpu.upload_f16(bytemuck::cast_slice(&aligned(bytes)), shape, dtype, name),
            Dtype::F16 | Dtype::BF16 | Dtype::F32 => gpu.upload_as(&safetensors::to_f32(info.dtype, &bytes), shape, dtype, name),
            _ => return Err(self.shape_error(*file, name, format!("{:?} is not a float dtype", info.dtype))),
        };
        uploaded.map_err(|e| self.shape_error(*file, name, e.to_string()))
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
        let (file, info) = self.info(name)?;
        if info.shape != shape {
            return Err(self.shape_error(*file, name, format!("shape {:?}, the config implies {shape:?}", info.shape)));
        }
        let src_row = (dim * info.dtype.size()) as u64;
        let mut chunks = Vec::new();
        for r0 in (0..rows).step_by(per_chunk) {
            let n = per_chunk.min(rows - r0);
            let start = info.start + r0 as u64 * src_row;
            let bytes = self.source.read_range(&self.files[*file], start, start + n as u64 * src_row).await?;
            let chunk = gpu
                .upload_as(&safetensors::to_f32(info.dtype, &bytes), &[n, dim], dtype, name)
                .map_err(|e| self.shape_error(*file, name, e.to_string()))?;
            chunks.push(chunk);
        }
        Ok(chunks)
    }
}

/// Copies bytes into u16-aligned storage (a Vec<u8> has no alignment guarantee for casts).
fn aligned(bytes: Vec<u8>) -> Vec<u16> {
    bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
}

async fn read_header(source: &impl Source, path: &str) -> Result<Header> {
    let file_len = source.len(path).await?;
    let prefix = source.read_range(path, 0, safetensors::PREFIX.min(file_len)).await?;
    let n = safetensors::header_len(&source.describe(path), &prefix, file_len)?;
    let json = source.read_range(path, safetensors::PREFIX, safetensors::PREFIX + n).await?;
    safetensors::parse_header(&source.describe(path), &json, file_len)
}
