//! [`FileTensors`]: tensors in safetensors and GGUF files, under the models' names (after
//! [`super::names`]). A diffusers folder component (one file, or the shards of an index) and each
//! component of a single-file checkpoint are one each.

use std::ops::Range;

use super::gguf::{self, GgufTensor, Repacked};
use super::names::{self, Entry, Stored};
use super::safetensors::{self, Dtype};
use super::{checked, confined, read_json, tensor_error, Encoding, Fetch, HostTensor, SharedSource, Source, TensorIndex, TensorInfo, TensorSource};
use crate::error::{Error, Result};

/// Pickle checkpoints' extensions (refused: loading a pickle runs code, and its tensors cannot be
/// read in place).
const PICKLES: [&str; 4] = [".bin", ".ckpt", ".pt", ".pth"];

/// Whether a file name is a pickle checkpoint's.
pub fn is_pickle(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    PICKLES.iter().any(|e| lower.ends_with(e))
}

pub struct FileTensors<'a> {
    source: SharedSource<'a>,
    files: Vec<String>,
    tensors: TensorIndex<Entry>,
}

/// What a model reads of an entry: its values as a float dtype or as kernel blocks.
fn encoding(entry: &Entry) -> Encoding {
    match entry.stored {
        Stored::Float(dtype) => Encoding::Float(dtype),
        Stored::Blocks(_) if entry.transposed => Encoding::Float(Dtype::F32),
        Stored::Blocks(t) => match gguf::repack_format(t, entry.shape.len()) {
            Some(format) => Encoding::Quant(format),
            None => Encoding::Float(Dtype::F32), // Q5_1, 1-D blocks: dequantized
        },
    }
}

impl<'a> FileTensors<'a> {
    /// Tensors of `files` in `source` named as `entries` say (each entry's `file` indexes `files`).
    pub fn new(source: SharedSource<'a>, files: Vec<String>, entries: impl IntoIterator<Item = (String, Entry)>) -> FileTensors<'a> {
        let tensors = entries.into_iter().map(|(name, entry)| (name, (TensorInfo { shape: entry.shape.clone(), encoding: encoding(&entry), bytes: entry.end - entry.start }, entry))).collect();
        FileTensors { source, files, tensors }
    }

    /// The component folder `dir` of a diffusers-layout model: `{model,diffusion_pytorch_model}
    /// [.fp16].safetensors` or a sharded index (whose shards must lie in `dir`). The fp16 variant
    /// is preferred when `prefer_fp16` (half the bytes to read). A folder holding only pickle
    /// checkpoints is refused.
    pub async fn folder(source: SharedSource<'a>, dir: &str, prefer_fp16: bool) -> Result<FileTensors<'a>> {
        let files = weight_files(&source, dir, prefer_fp16).await?;
        let plain = FileTensors::open(source, files).await?;
        let entries = plain.tensors.into_entries().collect();
        Ok(FileTensors::new(plain.source, plain.files, names::diffusers(dir, entries)))
    }

    /// The tensors of plain safetensors `files` in `source`, under their own names.
    pub async fn open(source: impl Source + 'a, files: Vec<String>) -> Result<FileTensors<'a>> {
        let source = SharedSource::new(source);
        let mut entries = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let header = safetensors::read_header(&source, file).await?;
            entries.extend(header.tensors.into_iter().map(|(name, t)| (name, Entry::safetensors(i, t))));
        }
        Ok(FileTensors::new(source, files, entries))
    }

    /// A tensor read to the CPU as f32, checking its shape.
    pub async fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        super::host_f32(self, name, shape).await
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.info(name).map(|i| i.shape.as_slice()).ok_or_else(|| tensor_error(self, name, "missing".into()))
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        checked(self, name, shape)?;
        Ok(&self.tensors[name])
    }

    async fn read_entry(&self, name: &str, entry: &Entry, rows: Range<usize>) -> Result<HostTensor> {
        let bad = |message: String| tensor_error(self, name, message);
        let total = entry.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total || (entry.shape.len() < 2 && rows != (0..total)) {
            return Err(bad(format!("rows {rows:?} of shape {:?}", entry.shape)));
        }
        let file = &self.files[entry.file];
        if entry.transposed {
            return self.read_transposed(name, entry, rows).await;
        }
        // A tensor of fewer than 2 dims is read whole: its values may share blocks (a [32] Q8_0
        // bias is one 34-byte block, not 32 rows of a byte).
        let (start, end) = match entry.shape.len() {
            0 | 1 => (entry.start, entry.end),
            _ => {
                let row_bytes = (entry.end - entry.start) / total.max(1) as u64;
                (entry.start + rows.start as u64 * row_bytes, entry.start + rows.end as u64 * row_bytes)
            }
        };
        let bytes = self.source.read_range(file, start, end).await?;
        match entry.stored {
            Stored::Float(dtype) => Ok(HostTensor::Float { dtype, bytes }),
            Stored::Blocks(ggml_type) => {
                let mut shape = entry.shape.clone();
                if shape.len() >= 2 {
                    shape[0] = rows.len();
                }
                let tensor = GgufTensor { name: name.to_string(), ggml_type, shape, start, end };
                Ok(match gguf::repack(&tensor, &bytes).map_err(|e| bad(e.to_string()))? {
                    Repacked::Quantized(q) => HostTensor::Quant(q),
                    Repacked::Dense(values) => HostTensor::Float { dtype: Dtype::F32, bytes: bytemuck::cast_slice(&values).to_vec() },
                })
            }
        }
    }

    /// A transposed 2-D entry: read whole (it is small: a text projection), transposed on the CPU.
    async fn read_transposed(&self, name: &str, entry: &Entry, rows: Range<usize>) -> Result<HostTensor> {
        let &[out_rows, cols] = &entry.shape[..] else {
            return Err(tensor_error(self, name, format!("only 2-D tensors are stored transposed, not {:?}", entry.shape)));
        };
        let bytes = self.source.read_range(&self.files[entry.file], entry.start, entry.end).await?;
        let values = match entry.stored {
            Stored::Float(dtype) => safetensors::to_f32(dtype, &bytes),
            Stored::Blocks(ggml_type) => gguf::dequantize(ggml_type, &bytes),
        };
        if values.len() != out_rows * cols {
            return Err(tensor_error(self, name, format!("{} values for {:?}", values.len(), entry.shape)));
        }
        let transposed: Vec<f32> = rows.flat_map(|r| (0..cols).map(move |c| (r, c))).map(|(r, c)| values[c * out_rows + r]).collect();
        Ok(HostTensor::Float { dtype: Dtype::F32, bytes: bytemuck::cast_slice(&transposed).to_vec() })
    }
}

impl TensorSource for FileTensors<'_> {
    fn location(&self) -> String {
        self.files.iter().map(|f| self.source.describe(f)).collect::<Vec<_>>().join(", ")
    }
    fn names(&self) -> Vec<&str> {
        self.tensors.names()
    }
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.info(name)
    }
    fn read<'s>(&'s self, name: &'s str, shape: &'s [usize], rows: Range<usize>) -> Fetch<'s, HostTensor> {
        Box::pin(async move { self.read_entry(name, self.entry(name, shape)?, rows).await })
    }
}

/// The safetensors files of component `dir`: one file or an index's shards.
async fn weight_files(source: &SharedSource<'_>, dir: &str, prefer_fp16: bool) -> Result<Vec<String>> {
    let variants: &[&str] = if prefer_fp16 { &[".fp16", ""] } else { &["", ".fp16"] };
    for stem in ["model", "diffusion_pytorch_model"] {
        for variant in variants {
            let single = format!("{dir}/{stem}{variant}.safetensors");
            if source.exists(&single).await {
                return Ok(vec![single]);
            }
            for index in [format!("{dir}/{stem}.safetensors.index{variant}.json"), format!("{dir}/{stem}{variant}.safetensors.index.json")] {
                if source.exists(&index).await {
                    return shards(source, dir, &index).await;
                }
            }
        }
    }
    for stem in ["pytorch_model", "diffusion_pytorch_model", "model"] {
        for pickle in PICKLES.into_iter().chain([".bin.index.json"]) {
            let path = format!("{dir}/{stem}{pickle}");
            if source.exists(&path).await {
                return Err(pickle_refused(&source.describe(&path)));
            }
        }
    }
    Err(Error::Io { path: source.describe(dir), message: "no model.safetensors or diffusion_pytorch_model.safetensors".into() })
}

/// The shards an index names, confined to `dir`.
async fn shards(source: &SharedSource<'_>, dir: &str, index: &str) -> Result<Vec<String>> {
    let bad = |message: String| Error::Config { path: source.describe(index), message };
    let json: serde_json::Value = read_json(source, index).await?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no weight_map".into()))?;
    let mut files = Vec::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| bad(format!("weight_map['{tensor}'] is not a file name")))?;
        let path = confined(dir, shard).ok_or_else(|| bad(format!("shard '{shard}' of '{tensor}' is not a file in {dir}/ (indexes may only name files beside them)")))?;
        files.push(path);
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(bad("weight_map names no shards".into()));
    }
    Ok(files)
}

/// The error for a pickle checkpoint (`.ckpt`, `.bin`, `.pt`, `.pth`).
pub fn pickle_refused(location: &str) -> Error {
    Error::Unsupported {
        path: location.to_string(),
        message: "a pickle checkpoint (.ckpt/.bin/.pt/.pth) cannot be read safely (loading a pickle runs code): \
                  use the model's .safetensors files (or convert it, e.g. with diffusers' save_pretrained(safe_serialization=True))"
            .into(),
    }
}
