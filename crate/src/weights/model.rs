//! [`ModelSource`]: one model (base or refiner) as the pipeline reads it, whatever it was stored
//! as: its small files (model_index.json, each component's config.json, scheduler/, tokenizers)
//! by path, and each weight component's tensors.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde::de::DeserializeOwned;

use super::files::{is_pickle, pickle_refused, FileTensors};
use super::gguf;
use super::infer;
use super::names::{identify, Entry, Kind, Layout, SingleFile};
use super::random::RandomTensors;
use super::safetensors;
use super::{read_json, MemorySource, SharedSource, Source, TensorSource};
use crate::error::{Error, Result};

enum Components<'a> {
    /// A diffusers folder: each component's safetensors files, opened when asked for.
    Folder { source: SharedSource<'a>, prefer_fp16: bool },
    /// Indexed up front (single files, packs).
    Indexed(BTreeMap<String, Rc<dyn TensorSource + 'a>>),
    Random(u32),
}

pub struct ModelSource<'a> {
    /// model_index.json, the components' config.json, scheduler/ and the tokenizers' files.
    pub files: SharedSource<'a>,
    components: Components<'a>,
    /// What the model was stored as, for messages ("diffusers folder", "single-file checkpoint", ...).
    pub format: String,
}

/// What a single file turns out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Safetensors,
    Gguf,
}

impl FileFormat {
    /// A file's format from its first bytes (and name, for pickles, which have no single magic);
    /// pickles and unknown files are refused.
    pub fn detect(location: &str, prefix: &[u8]) -> Result<FileFormat> {
        if gguf::is_gguf(prefix) {
            return Ok(FileFormat::Gguf);
        }
        let zip_or_pickle = prefix.starts_with(b"PK\x03\x04") || prefix.first() == Some(&0x80);
        if zip_or_pickle || is_pickle(location) {
            return Err(pickle_refused(location));
        }
        // safetensors: a little-endian header length, then a JSON object.
        if prefix.len() >= 9 && prefix[8] == b'{' {
            return Ok(FileFormat::Safetensors);
        }
        Err(Error::Unsupported { path: location.to_string(), message: "neither a safetensors nor a GGUF file".into() })
    }
}

impl<'a> ModelSource<'a> {
    /// A diffusers-layout folder; on f16 devices the `.fp16` weights are preferred.
    pub fn folder(source: impl Source + 'a, prefer_fp16: bool) -> ModelSource<'a> {
        let source = SharedSource::new(source);
        ModelSource { files: source.clone(), components: Components::Folder { source, prefer_fp16 }, format: "diffusers folder".into() }
    }

    /// Tensors indexed up front, with the small files of `files` (packs).
    pub fn indexed(files: SharedSource<'a>, components: BTreeMap<String, Rc<dyn TensorSource + 'a>>, format: String) -> ModelSource<'a> {
        ModelSource { files, components: Components::Indexed(components), format }
    }

    /// Random weights for the configs in `configs` (benchmarks).
    pub fn random(configs: MemorySource, seed: u32) -> ModelSource<'a> {
        ModelSource { files: SharedSource::new(configs), components: Components::Random(seed), format: "random weights".into() }
    }

    /// A single-file checkpoint `path` in `file`: safetensors or GGUF in SGM or stable-diffusion.cpp
    /// naming. `config`, a diffusers-layout folder (its weights are not read), gives the configs,
    /// scheduler and tokenizers; without it they are inferred from the tensors ([`infer`]).
    pub async fn single_file(file: impl Source + 'a, path: &str, config: Option<SharedSource<'a>>) -> Result<ModelSource<'a>> {
        let file = SharedSource::new(file);
        let location = file.describe(path);
        let len = file.len(path).await?;
        let prefix = file.read_range(path, 0, len.min(16)).await?;
        let format = FileFormat::detect(&location, &prefix)?;
        let raw: Vec<(String, Entry)> = match format {
            FileFormat::Gguf => gguf::read_header(&file, path).await?.tensors.into_iter().map(|t| Entry::gguf(0, t)).collect(),
            FileFormat::Safetensors => safetensors::read_header(&file, path).await?.tensors.into_iter().map(|(name, t)| (name, Entry::safetensors(0, t))).collect(),
        };
        let shapes: infer::Shapes = raw.iter().map(|(n, e)| (n.as_str(), e.shape.as_slice())).collect();
        let identified = identify(&location, raw.iter().map(|(n, e)| (n.as_str(), e.shape.as_slice())))?;
        let kind = identified.kind;
        // Without a config folder: SDXL 1.0's files, with the UNet's and VAE's configs inferred
        // now and the text encoders' once the index has mapped their tensors.
        let inferred = match config {
            Some(_) => None,
            None => {
                let mut files = infer::sdxl_files(kind);
                let pooled = infer::pooled_width(&shapes).ok_or_else(|| Error::Tensor {
                    path: location.clone(),
                    tensor: "text_projection".into(),
                    message: "missing: the pooled text projection sets the UNet's conditioning widths".into(),
                })?;
                files.insert("unet/config.json", json_bytes(&infer::unet_config(&location, kind, &shapes, pooled)?));
                files.insert("vae/config.json", json_bytes(&infer::vae_config(&location, kind, &shapes)?));
                Some(files)
            }
        };
        let files = match (config, &inferred) {
            (Some(config), _) => config,
            (None, inferred) => SharedSource::new(inferred.clone().unwrap_or_default()),
        };
        let config_kind = if files.exists("text_encoder/config.json").await { Kind::Base } else { Kind::Refiner };
        if config_kind != kind {
            let message = format!("the checkpoint {location} is {}, but this config folder is for {}", kind.describe(), config_kind.describe());
            return Err(Error::Config { path: files.describe("model_index.json"), message });
        }
        let layout = Layout::from_configs(&files.read("unet/config.json").await?, &files.read("vae/config.json").await?, &files.describe(""))?;
        let index = SingleFile::index(&location, identified, raw, &layout)?;
        if let Some(mut memory) = inferred {
            for (component, tensors) in index.components.iter().filter(|(c, _)| c.starts_with("text_encoder")) {
                memory.insert(&format!("{component}/config.json"), json_bytes(&infer::text_config(&location, kind, component, tensors)?));
            }
            return Ok(Self::from_index(SharedSource::new(memory), file, path, index, format, "configs inferred from the tensors"));
        }
        Ok(Self::from_index(files, file, path, index, format, "configs from the config folder"))
    }

    fn from_index(files: SharedSource<'a>, file: SharedSource<'a>, path: &str, index: SingleFile, format: FileFormat, configs: &str) -> ModelSource<'a> {
        let components = index
            .components
            .into_iter()
            .map(|(component, entries): (&str, HashMap<String, Entry>)| {
                let tensors: Rc<dyn TensorSource + 'a> = Rc::new(FileTensors::new(file.clone(), vec![path.to_string()], entries));
                (component.to_string(), tensors)
            })
            .collect();
        let format = format!("single-file {} checkpoint ({:?}, {configs})", if format == FileFormat::Gguf { "GGUF" } else { "safetensors" }, index.kind);
        ModelSource::indexed(files, components, format)
    }

    /// Component `dir`'s config (`{dir}/config.json`) and tensors.
    pub async fn component<C: DeserializeOwned>(&self, dir: &str) -> Result<(C, Rc<dyn TensorSource + 'a>)> {
        let config = read_json(&self.files, &format!("{dir}/config.json")).await?;
        Ok((config, self.tensors(dir).await?))
    }

    /// Maps a component's load errors so that a config it refuses names `{dir}/config.json` here.
    pub fn config_error(&self, dir: &str) -> impl Fn(Error) -> Error + '_ {
        let path = self.files.describe(&format!("{dir}/config.json"));
        move |e| match e {
            Error::Config { message, .. } => Error::Config { path: path.clone(), message },
            e => e,
        }
    }

    /// The tensors of component `dir` (`unet`, `text_encoder`, ...).
    pub async fn tensors(&self, dir: &str) -> Result<Rc<dyn TensorSource + 'a>> {
        match &self.components {
            Components::Folder { source, prefer_fp16 } => Ok(Rc::new(FileTensors::folder(source.clone(), dir, *prefer_fp16).await?)),
            Components::Indexed(map) => map.get(dir).cloned().ok_or_else(|| Error::Tensor {
                path: self.files.describe(""),
                tensor: format!("{dir}/*"),
                message: format!("missing: the {} has no {dir}", self.format),
            }),
            Components::Random(seed) => Ok(Rc::new(RandomTensors { seed: *seed, component: dir.to_string() })),
        }
    }
}

fn json_bytes(config: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec_pretty(config).expect("configs serialise")
}
