//! Weights: from files in any format to the tensors a model asks for, one tensor at a time
//! (never a whole file in memory).
//!
//! ```text
//!  Source (files by path)        DirSource, MemorySource, HttpSource, StoreSource, a browser File
//!    │
//!  formats (headers)             safetensors, gguf               ── parse, validate, byte ranges
//!    │
//!  names (layouts)               diffusers folders (with or without text_model.), SGM single
//!    │                           files, stable-diffusion.cpp GGUF  ── file names → model names
//!  TensorSource (one per format) FileTensors (safetensors / GGUF files), crate::pack's PackTensors,
//!    │                           RandomTensors          ── info(name), read(name, shape, rows)
//!  ModelSource                   a model's small files (configs, tokenizers) + each component's tensors
//!    │
//!  Vars (the models' builder)    vb.pp("down_blocks.0").matrix("to_q", shape): stored as read, or
//!                                quantized as the QuantPolicy says (its one place), on the GPU
//! ```
//!
//! A weight the models ask for through [`Vars::matrix`] is built in exactly one place with its
//! model name, so a weight can later be "stored weight + low-rank deltas" (LoRA) without touching
//! any format.

pub mod files;
pub mod gguf;
pub mod infer;
pub mod lora;
pub mod model;
pub mod names;
pub mod random;
pub mod safetensors;
mod source;
mod vars;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

pub use files::FileTensors;
pub use model::ModelSource;
pub use source::{confined, read_json, DynSource, MemorySource, SharedSource, Source};
#[cfg(not(target_arch = "wasm32"))]
pub use source::DirSource;
pub use vars::Vars;

use crate::error::{Error, Result};
use crate::quant::{quantize, QuantFormat, QuantizedTensor};
use safetensors::Dtype;

/// A boxed future: what object-safe readers return.
pub type Fetch<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// How a tensor's values reach the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// One value per element in this dtype.
    Float(Dtype),
    /// Blocks the kernels read as stored.
    Quant(QuantFormat),
}

/// One tensor as a [`TensorSource`] serves it: diffusers' shape, how its values come, and the
/// bytes its source stores it in (what reading it costs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    pub bytes: u64,
}

/// Rows of a tensor read to the CPU.
#[derive(Debug, Clone)]
pub enum HostTensor {
    /// Little-endian values of `dtype`, row-major in diffusers' layout.
    Float { dtype: Dtype, bytes: Vec<u8> },
    /// Blocks in the kernels' layout (rows never share a block).
    Quant(QuantizedTensor),
    /// Random weights: generated where they are used, from this seed (see [`random`]).
    Random(u32),
}

/// Tensors by name (sorted), each with its info and where its format stores it (`E`): what
/// the file and pack sources answer `names` and `info` from.
pub struct TensorIndex<E>(BTreeMap<String, (TensorInfo, E)>);

impl<E> FromIterator<(String, (TensorInfo, E))> for TensorIndex<E> {
    fn from_iter<I: IntoIterator<Item = (String, (TensorInfo, E))>>(entries: I) -> Self {
        TensorIndex(entries.into_iter().collect())
    }
}

impl<E> TensorIndex<E> {
    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.0.get(name).map(|(info, _)| info)
    }

    /// Each tensor's name and where it is stored.
    pub fn into_entries(self) -> impl Iterator<Item = (String, E)> {
        self.0.into_iter().map(|(name, (_, entry))| (name, entry))
    }
}

/// Where a tensor is stored; the name must be listed (see [`checked`]).
impl<E> std::ops::Index<&str> for TensorIndex<E> {
    type Output = E;
    fn index(&self, name: &str) -> &E {
        &self.0[name].1
    }
}

/// The tensors of one model component (`unet`, `text_encoder`, ...) under diffusers' names: one
/// implementation per format. Object-safe, so models and conversions take any format.
pub trait TensorSource {
    /// Where the tensors come from (a file, a folder, a pack), for errors.
    fn location(&self) -> String;
    /// Every tensor's name, sorted (random weights list none: they answer any name).
    fn names(&self) -> Vec<&str>;
    fn info(&self, name: &str) -> Option<&TensorInfo>;
    /// Rows `rows` (along the first dimension) of tensor `name`, after checking that its shape
    /// is `shape` (what the model's config implies); [`checked`] gives the errors.
    fn read<'a>(&'a self, name: &'a str, shape: &'a [usize], rows: Range<usize>) -> Fetch<'a, HostTensor>;
}

/// The info of tensor `name`, checked against the shape the config implies: the error names the
/// tensor, the source and both shapes.
pub fn checked<'a>(source: &'a (impl TensorSource + ?Sized), name: &str, shape: &[usize]) -> Result<&'a TensorInfo> {
    let info = source.info(name).ok_or_else(|| tensor_error(source, name, "missing (is this the right model?)".into()))?;
    if info.shape != shape {
        return Err(tensor_error(source, name, format!("shape {:?}, the config implies {shape:?}", info.shape)));
    }
    Ok(info)
}

pub fn tensor_error(source: &(impl TensorSource + ?Sized), name: &str, message: String) -> Error {
    Error::Tensor { path: source.location(), tensor: name.to_string(), message }
}

/// A whole tensor's rows, as [`TensorSource::read`] takes them.
pub fn all_rows(shape: &[usize]) -> Range<usize> {
    0..shape.first().copied().unwrap_or(1)
}

/// Reads a whole tensor to the CPU as f32 (blocks dequantized).
pub async fn host_f32(source: &(impl TensorSource + ?Sized), name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    Ok(match source.read(name, shape, all_rows(shape)).await? {
        HostTensor::Float { dtype, bytes } => safetensors::to_f32(dtype, &bytes),
        HostTensor::Quant(q) => crate::quant::dequantize(&q),
        HostTensor::Random(seed) => random::host(seed, name, shape),
    })
}

/// Quantizes a [rows, cols] matrix of little-endian `dtype` values a few rows at a time, so that
/// a tensor is never held as f32 whole (blocks never straddle rows: the pieces concatenate).
pub fn quantize_host(dtype: Dtype, bytes: &[u8], rows: usize, cols: usize, format: QuantFormat) -> Result<QuantizedTensor> {
    let per_chunk = (crate::gpu::HOST_CHUNK / cols.max(1)).max(1);
    let row_bytes = cols * dtype.size();
    if bytes.len() != rows * row_bytes {
        return Err(Error::InvalidParameter(format!("{} bytes are not [{rows}, {cols}] {} values", bytes.len(), dtype.name())));
    }
    let mut out = QuantizedTensor { format, rows, cols, data: Vec::new(), scales: Vec::new(), mins: Vec::new() };
    for (i, chunk) in bytes.chunks(per_chunk * row_bytes.max(1)).enumerate() {
        let n = chunk.len() / row_bytes.max(1);
        let q = quantize(&safetensors::to_f32(dtype, chunk), n, cols, format).map_err(|e| match e {
            Error::InvalidParameter(m) => Error::InvalidParameter(format!("{m} (rows from {})", i * per_chunk)),
            e => e,
        })?;
        out.data.extend(q.data);
        out.scales.extend(q.scales);
        out.mins.extend(q.mins);
    }
    Ok(out)
}
