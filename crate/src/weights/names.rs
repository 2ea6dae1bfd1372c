//! Names: from the names a file gives its tensors to the names the models ask for (diffusers').
//!
//! - **diffusers folders** use the models' names, except that text encoders saved by
//!   transformers 5.x `CLIPTextModel.save_pretrained` drop the `text_model.` prefix
//!   (`embeddings.token_embedding.weight`); both are read ([`diffusers`]).
//! - **single-file checkpoints** (Stability's SGM layout, as `sd_xl_base_1.0.safetensors` and
//!   `sd_xl_refiner_1.0.safetensors`): `model.diffusion_model.*` (the UNet),
//!   `first_stage_model.*` (the VAE) and `conditioner.embedders.*` (the text encoders). The mapping
//!   is diffusers' (loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
//!   convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), run
//!   once over the header into an index ([`SingleFile`]). Where SGM's bytes differ from diffusers'
//!   the entry says how: OpenCLIP's fused `in_proj` rows are narrower byte ranges, the VAE's 1x1-conv
//!   attention weights are the same bytes as a Linear's, and OpenCLIP's `text_projection` is the
//!   transpose of diffusers' `text_projection.weight`.
//! - **GGUF files as stable-diffusion.cpp writes them** (`sd -M convert`) keep the UNet's and VAE's
//!   SGM names but rename the text encoders to transformers' names under `cond_stage_model.`
//!   (CLIP-L at `cond_stage_model.transformer.`, the base's bigG at `cond_stage_model.1.transformer.`,
//!   the refiner's at `cond_stage_model.transformer.`), keeping OpenCLIP's fused `self_attn.in_proj`
//!   and its `text_model.text_projection` orientation; both namings are read.
//!
//! Files of other architectures are told apart by their names and shapes and refused, naming
//! what they look like ([`identify`]).

use std::collections::HashMap;

use serde::Deserialize;

use super::gguf::{GgmlType, GgufTensor};
use super::safetensors::{self, Dtype};
use crate::error::{Error, Result};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";

/// How a file stores one tensor's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// One value per element (safetensors, and GGUF's F32/F16/BF16: see [`Entry::gguf`]).
    Float(Dtype),
    /// GGUF blocks; every row is whole blocks.
    Blocks(GgmlType),
}

/// Where one tensor's bytes lie: which file of its source, how they are stored, diffusers'
/// shape and the byte range.
#[derive(Debug, Clone, PartialEq)]
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
    /// A tensor of safetensors file `file`.
    pub fn safetensors(file: usize, t: safetensors::TensorInfo) -> Entry {
        Entry { file, stored: Stored::Float(t.dtype), shape: t.shape, start: t.start, end: t.end, transposed: false }
    }

    /// A tensor of GGUF file `file`, under its name: F32 / F16 / BF16 as float values, other
    /// types as blocks.
    pub fn gguf(file: usize, t: GgufTensor) -> (String, Entry) {
        let stored = match t.ggml_type {
            GgmlType::F32 => Stored::Float(Dtype::F32),
            GgmlType::F16 => Stored::Float(Dtype::F16),
            GgmlType::BF16 => Stored::Float(Dtype::BF16),
            blocks => Stored::Blocks(blocks),
        };
        (t.name, Entry { file, stored, shape: t.shape, start: t.start, end: t.end, transposed: false })
    }
}

/// The names of a diffusers folder component's tensors as the models ask for them (see
/// [`text_model`]).
pub fn diffusers(component: &str, tensors: Vec<(String, Entry)>) -> HashMap<String, Entry> {
    let text = component.starts_with("text_encoder");
    tensors.into_iter().map(|(name, entry)| (if text { text_model(name) } else { name }, entry)).collect()
}

/// A text encoder tensor's name with the `text_model.` prefix that transformers 5.x
/// `CLIPTextModel.save_pretrained` leaves out (`embeddings.token_embedding.weight`).
fn text_model(name: String) -> String {
    const TEXT_MODEL: [&str; 3] = ["embeddings.", "encoder.", "final_layer_norm."];
    match TEXT_MODEL.iter().any(|p| name.starts_with(p)) {
        true => format!("text_model.{name}"),
        false => name,
    }
}

/// How a text encoder's tensors are named below its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// transformers' CLIPTextModel names: diffusers' own.
    Transformers,
    /// OpenCLIP's text tower (SGM's FrozenOpenCLIPEmbedder2).
    OpenClip,
    /// transformers' names with OpenCLIP's fused `self_attn.in_proj` and `text_model.text_projection`
    /// (stable-diffusion.cpp).
    SdCpp,
}

/// Where one text encoder lies in a checkpoint.
struct TextEncoder {
    prefix: &'static str,
    dir: &'static str,
    naming: Naming,
}

/// The text-encoder layouts a checkpoint may have: which kind it is, its encoders, and a prefix
/// that must be absent (a refiner's only encoder sits where the base's first one does).
const TEXT_LAYOUTS: [(Kind, &[TextEncoder], Option<&str>); 4] = [
    (
        Kind::Base,
        &[
            TextEncoder { prefix: "conditioner.embedders.0.transformer.", dir: "text_encoder", naming: Naming::Transformers },
            TextEncoder { prefix: "conditioner.embedders.1.model.", dir: "text_encoder_2", naming: Naming::OpenClip },
        ],
        None,
    ),
    (Kind::Refiner, &[TextEncoder { prefix: "conditioner.embedders.0.model.", dir: "text_encoder_2", naming: Naming::OpenClip }], Some("conditioner.embedders.1.")),
    (
        Kind::Base,
        &[
            TextEncoder { prefix: "cond_stage_model.transformer.", dir: "text_encoder", naming: Naming::Transformers },
            TextEncoder { prefix: "cond_stage_model.1.transformer.", dir: "text_encoder_2", naming: Naming::SdCpp },
        ],
        None,
    ),
    (Kind::Refiner, &[TextEncoder { prefix: "cond_stage_model.transformer.", dir: "text_encoder_2", naming: Naming::SdCpp }], Some("cond_stage_model.1.")),
];

/// Which SDXL model a checkpoint holds, told apart by its text encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// CLIP ViT-L and OpenCLIP bigG: diffusers' text_encoder and text_encoder_2.
    Base,
    /// OpenCLIP bigG only: text_encoder_2.
    Refiner,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Base => "an SDXL base (CLIP ViT-L and OpenCLIP bigG text encoders)",
            Kind::Refiner => "an SDXL refiner (OpenCLIP bigG text encoder only)",
        }
    }
}

/// What the mapping needs from the diffusers configs: the UNet's resnets per level (its
/// `layers_per_block`, which places SGM's flat input/output block indices), whether its
/// transformers project with Linear layers, and the VAE's number of levels (SGM numbers the
/// decoder's levels in reverse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub unet_layers: Vec<usize>,
    pub linear_projection: bool,
    pub vae_levels: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LayersPerBlock {
    Each(Vec<usize>),
    All(usize),
}

#[derive(Deserialize)]
struct UnetLevels {
    block_out_channels: Vec<usize>,
    layers_per_block: LayersPerBlock,
    #[serde(default)]
    use_linear_projection: bool,
}

#[derive(Deserialize)]
struct VaeLevels {
    block_out_channels: Vec<usize>,
}

impl Layout {
    /// From the texts of `unet/config.json` and `vae/config.json`; `location` names them in errors.
    pub fn from_configs(unet: &[u8], vae: &[u8], location: &str) -> Result<Layout> {
        let bad = |message: String| Error::Config { path: location.to_string(), message };
        let unet: UnetLevels = serde_json::from_slice(unet).map_err(|e| bad(format!("unet/config.json: {e}")))?;
        let vae: VaeLevels = serde_json::from_slice(vae).map_err(|e| bad(format!("vae/config.json: {e}")))?;
        let n = unet.block_out_channels.len();
        let unet_layers = match unet.layers_per_block {
            LayersPerBlock::All(l) => vec![l; n],
            LayersPerBlock::Each(l) if l.len() == n => l,
            LayersPerBlock::Each(l) => return Err(bad(format!("unet/config.json: layers_per_block has {} entries for {n} levels", l.len()))),
        };
        Ok(Layout { unet_layers, linear_projection: unet.use_linear_projection, vae_levels: vae.block_out_channels.len() })
    }

    /// diffusers' (down level, resnet) of SGM's `input_blocks.{i}` (i >= 1); resnet ==
    /// layers_per_block is the level's downsampler.
    fn input_block(&self, i: usize) -> Option<(usize, usize)> {
        let mut first = 1usize;
        for (level, &layers) in self.unet_layers.iter().enumerate() {
            let downsampler = usize::from(level + 1 < self.unet_layers.len());
            let next = first.checked_add(layers)?.checked_add(downsampler)?;
            if i < next {
                return i.checked_sub(first).map(|layer| (level, layer));
            }
            first = next;
        }
        None
    }

    /// diffusers' (up level, resnet) of SGM's `output_blocks.{i}`: up level l has one resnet more
    /// than down level n-1-l.
    fn output_block(&self, i: usize) -> Option<(usize, usize)> {
        let mut first = 0usize;
        for (level, &layers) in self.unet_layers.iter().rev().enumerate() {
            let next = first.checked_add(layers)?.checked_add(1)?;
            if i < next {
                return Some((level, i - first));
            }
            first = next;
        }
        None
    }
}

/// What [`identify`] found in a file: the model's kind and the text-encoder layout that told it.
#[derive(Clone, Copy)]
pub struct Identified {
    pub kind: Kind,
    encoders: &'static [TextEncoder],
}

/// The SDXL model a single file holds, or a typed error naming what it looks like instead.
/// `tensors` are the file's (name, shape) pairs; `location` names the file.
pub fn identify<'n>(location: &str, tensors: impl Iterator<Item = (&'n str, &'n [usize])> + Clone) -> Result<Identified> {
    let has = |prefix: &str| tensors.clone().any(|(name, _)| name.starts_with(prefix));
    let wrong = |looks: String| Error::WrongModel { path: location.to_string(), message: format!("not an SDXL model: {looks}") };
    // SDXL's UNet has the micro-conditioning embedding (label_emb); that also tells an SD 1.x
    // file apart from a refiner in stable-diffusion.cpp's naming (both at cond_stage_model.transformer).
    if let Some(&(kind, encoders, _)) = TEXT_LAYOUTS.iter().find(|(_, encoders, absent)| encoders.iter().all(|e| has(e.prefix)) && !absent.is_some_and(has)) {
        if has(&format!("{UNET}label_emb.")) {
            return Ok(Identified { kind, encoders });
        }
    }
    if has("double_blocks.") || has(&format!("{UNET}double_blocks.")) {
        return Err(wrong("it looks like FLUX (double_blocks / single_blocks transformer)".into()));
    }
    if has(&format!("{UNET}joint_blocks.")) || has("text_encoders.") {
        return Err(wrong("it looks like Stable Diffusion 3 (MMDiT joint_blocks)".into()));
    }
    if has("cond_stage_model.model.transformer.") {
        return Err(wrong("it looks like Stable Diffusion 2.x (one OpenCLIP ViT-H text encoder at cond_stage_model.model)".into()));
    }
    if has("cond_stage_model.transformer.") && has(UNET) && !has(&format!("{UNET}label_emb.")) {
        return Err(wrong("it looks like Stable Diffusion 1.x (one CLIP ViT-L text encoder at cond_stage_model.transformer, no SDXL micro-conditioning)".into()));
    }
    let unet_only = has("input_blocks.") || has("down_blocks.") || (has(UNET) && !has(VAE));
    if unet_only && !has("conditioner.") && !has("cond_stage_model.") {
        return Err(wrong("it holds a UNet alone; a single-file SDXL model also holds its text encoders and VAE (conditioner.*, first_stage_model.*)".into()));
    }
    if has("decoder.conv_in.") && has("encoder.conv_in.") && !has("conditioner.") && !has("cond_stage_model.") {
        return Err(wrong("it holds a VAE alone (as sdxl_vae.safetensors does); a single-file SDXL model also holds its UNet and text encoders".into()));
    }
    let count = tensors.clone().count();
    let sample: Vec<&str> = tensors.take(3).map(|(n, _)| n).collect();
    Err(wrong(format!(
        "neither an SDXL base (CLIP ViT-L at conditioner.embedders.0.transformer.*, OpenCLIP bigG at conditioner.embedders.1.model.*) \
         nor a refiner (OpenCLIP bigG at conditioner.embedders.0.model.*), nor stable-diffusion.cpp's naming of one \
         (cond_stage_model.*); its {count} tensors are named like {sample:?}"
    )))
}

/// A single-file checkpoint's tensors by diffusers' component folder and name.
#[derive(Debug, Clone)]
pub struct SingleFile {
    pub kind: Kind,
    pub components: HashMap<&'static str, HashMap<String, Entry>>,
}

impl SingleFile {
    /// Maps every SDXL tensor of a file (SGM or stable-diffusion.cpp names) to its diffusers
    /// component and name; `location` names the file in errors. State diffusers drops too (EMA
    /// copies, denoiser sigmas, logit_scale) is left out.
    /// `identified` is what [`identify`] found in the same tensors.
    pub fn index(location: &str, identified: Identified, tensors: Vec<(String, Entry)>, layout: &Layout) -> Result<SingleFile> {
        let Identified { kind, encoders } = identified;
        for prefix in [UNET, VAE] {
            if !tensors.iter().any(|(name, _)| name.starts_with(prefix)) {
                let message = format!("missing: the file looks like {} but has no {prefix}* tensors", kind.describe());
                return Err(Error::Tensor { path: location.to_string(), tensor: format!("{prefix}*"), message });
            }
        }
        let mut components: HashMap<&'static str, HashMap<String, Entry>> = HashMap::new();
        for (name, entry) in tensors {
            let bad = |message: String| Error::Tensor { path: location.to_string(), tensor: name.clone(), message };
            let encoder = encoders.iter().find_map(|e| name.strip_prefix(e.prefix).map(|rest| (e, rest)));
            let mapped = if let Some(rest) = name.strip_prefix(UNET) {
                let projection = layout.linear_projection && (rest.ends_with(".proj_in.weight") || rest.ends_with(".proj_out.weight"));
                let entry = if projection { linear(entry) } else { entry };
                unet_name(rest, layout).map_err(bad)?.map(|n| vec![("unet", n, entry)])
            } else if let Some(rest) = name.strip_prefix(VAE) {
                vae_entry(rest, entry, layout).map_err(bad)?.map(|(n, e)| vec![("vae", n, e)])
            } else if let Some((encoder, rest)) = encoder {
                let entries = match encoder.naming {
                    Naming::Transformers => Some(vec![(text_model(rest.to_string()), entry)]),
                    Naming::OpenClip => open_clip_entries(rest, entry).map_err(bad)?,
                    Naming::SdCpp => sd_cpp_clip_entries(rest, entry).map_err(bad)?,
                };
                entries.map(|v| v.into_iter().map(|(n, e)| (encoder.dir, n, e)).collect())
            } else {
                None
            };
            for (component, name, entry) in mapped.into_iter().flatten() {
                components.entry(component).or_default().insert(name, entry);
            }
        }
        Ok(SingleFile { kind, components })
    }
}

/// ResnetBlock2D's submodules: SGM name, diffusers name.
const RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

fn resnet(rest: &str) -> String {
    RESNET
        .iter()
        .find_map(|(sgm, diffusers)| rest.strip_prefix(sgm).map(|p| format!("{diffusers}{p}")))
        .unwrap_or_else(|| rest.to_string())
}

/// Splits `a.b.rest` into ("a", "b", "rest").
fn split2(name: &str) -> Option<(&str, &str, &str)> {
    let (a, rest) = name.split_once('.')?;
    let (b, rest) = rest.split_once('.')?;
    Some((a, b, rest))
}

fn index(s: &str) -> std::result::Result<usize, String> {
    s.parse().map_err(|_| format!("'{s}' is not a block index"))
}

/// diffusers' UNet2DConditionModel name of `model.diffusion_model.{rest}` (None: not a UNet weight).
fn unet_name(rest: &str, layout: &Layout) -> std::result::Result<Option<String>, String> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(name) = FIXED.iter().find_map(|(sgm, diffusers)| rest.strip_prefix(sgm).map(|p| format!("{diffusers}{p}"))) {
        return Ok(Some(name));
    }
    if let Some((slot, param)) = rest.strip_prefix("middle_block.").and_then(|r| r.split_once('.')) {
        return Ok(match slot {
            "0" | "2" => Some(format!("mid_block.resnets.{}.{}", index(slot)? / 2, resnet(param))),
            "1" => Some(format!("mid_block.attentions.0.{param}")),
            _ => None,
        });
    }
    let Some((block, i, rest)) = split2(rest) else { return Ok(None) };
    let Some((slot, param)) = rest.split_once('.') else { return Ok(None) };
    let levels = || format!("unet/config.json's layers_per_block {:?}", layout.unet_layers);
    Ok(Some(match block {
        "input_blocks" => {
            let (level, layer) = layout.input_block(index(i)?).ok_or_else(|| format!("input_blocks.{i} lies beyond the blocks of {}", levels()))?;
            match (slot, param.strip_prefix("op.")) {
                ("0", Some(param)) => format!("down_blocks.{level}.downsamplers.0.conv.{param}"),
                ("0", None) => format!("down_blocks.{level}.resnets.{layer}.{}", resnet(param)),
                ("1", _) => format!("down_blocks.{level}.attentions.{layer}.{param}"),
                _ => return Ok(None),
            }
        }
        "output_blocks" => {
            let (level, layer) = layout.output_block(index(i)?).ok_or_else(|| format!("output_blocks.{i} lies beyond the blocks of {}", levels()))?;
            match (slot, param.strip_prefix("conv.")) {
                ("0", _) => format!("up_blocks.{level}.resnets.{layer}.{}", resnet(param)),
                ("1" | "2", Some(param)) => format!("up_blocks.{level}.upsamplers.0.conv.{param}"),
                ("1", None) => format!("up_blocks.{level}.attentions.{layer}.{param}"),
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    }))
}

/// diffusers' name of a UNet module as kohya's SDXL LoRAs name it: SGM's with `_` for `.`
/// (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`); the answer also has `_` for `.`.
/// None: `key` is not in SGM's naming.
pub fn sgm_unet_module(key: &str, layout: &Layout) -> std::result::Result<Option<String>, String> {
    const FIXED: [(&str, &str); 5] = [("time_embed_0", "time_embed.0"), ("time_embed_2", "time_embed.2"), ("label_emb_0_0", "label_emb.0.0"), ("label_emb_0_2", "label_emb.0.2"), ("out_2", "out.2")];
    let sgm = if let Some(rest) = key.strip_prefix("input_blocks_") {
        format!("input_blocks.{}", sgm_block(rest, 2))
    } else if let Some(rest) = key.strip_prefix("output_blocks_") {
        format!("output_blocks.{}", sgm_block(rest, 2))
    } else if let Some(rest) = key.strip_prefix("middle_block_") {
        format!("middle_block.{}", sgm_block(rest, 1))
    } else if let Some((_, sgm)) = FIXED.iter().find(|(k, _)| *k == key) {
        sgm.to_string()
    } else {
        return Ok(None);
    };
    Ok(unet_name(&format!("{sgm}.weight"), layout)?.map(|n| n.trim_end_matches(".weight").replace('.', "_")))
}

/// `{i}_{slot}_{module}` (`indices` leading numbers) as `{i}.{slot}.{module}`, a resnet's SGM
/// submodule (`in_layers_2`) with its dots back (`in_layers.2`).
fn sgm_block(rest: &str, indices: usize) -> String {
    let mut parts = rest.splitn(indices + 1, '_');
    let mut dotted: Vec<String> = parts.by_ref().take(indices).map(str::to_string).collect();
    let module = parts.next().unwrap_or("");
    let resnet = RESNET.iter().map(|(sgm, _)| sgm.trim_end_matches('.')).find(|sgm| module == sgm.replace('.', "_"));
    if !module.is_empty() {
        dotted.push(resnet.unwrap_or(module).to_string());
    }
    dotted.join(".")
}

/// diffusers' AutoencoderKL entry of `first_stage_model.{rest}` (None: not a VAE weight).
fn vae_entry(rest: &str, entry: Entry, layout: &Layout) -> std::result::Result<Option<(String, Entry)>, String> {
    const ATTENTION: [(&str, &str); 5] = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];
    let resnet = |rest: &str| rest.replace("nin_shortcut.", "conv_shortcut.");
    let Some((side @ ("encoder" | "decoder"), rest)) = rest.split_once('.') else {
        return Ok(Some((rest.to_string(), entry))); // quant_conv, post_quant_conv
    };
    let name = if let Some(param) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{param}")
    } else if let Some((kind @ ("down" | "up"), level, rest)) = split2(rest) {
        let level = index(level)?;
        // SGM numbers the decoder's levels from the lowest resolution up, diffusers from the top.
        let level = match kind {
            "down" => level,
            _ => level
                .checked_add(1)
                .and_then(|l| layout.vae_levels.checked_sub(l))
                .ok_or_else(|| format!("up.{level} lies beyond the {} levels of vae/config.json", layout.vae_levels))?,
        };
        match rest.split_once('.') {
            Some(("block", rest)) => format!("{kind}_blocks.{level}.resnets.{}", resnet(rest)),
            Some(("downsample" | "upsample", rest)) => format!("{kind}_blocks.{level}.{kind}samplers.0.{rest}"),
            _ => return Ok(None),
        }
    } else if let Some((block, rest)) = rest.strip_prefix("mid.").and_then(|r| r.split_once('.')) {
        match block.strip_prefix("block_").map(index) {
            Some(k) => {
                let k = k?.checked_sub(1).ok_or_else(|| format!("mid.{block}: SGM numbers the mid resnets from 1"))?;
                format!("mid_block.resnets.{k}.{}", resnet(rest))
            }
            None if block == "attn_1" => {
                let Some(name) = ATTENTION.iter().find_map(|(sgm, diffusers)| rest.strip_prefix(sgm).map(|p| format!("{diffusers}{p}"))) else {
                    return Ok(None);
                };
                return Ok(Some((format!("{side}.mid_block.attentions.0.{name}"), linear(entry))));
            }
            None => return Ok(None),
        }
    } else {
        rest.to_string() // conv_in, conv_out
    };
    Ok(Some((format!("{side}.{name}"), entry)))
}

/// A 1x1 convolution's weight [c_out, c_in, 1, 1] is the bytes of diffusers' Linear [c_out, c_in]
/// (the VAE's mid attention in SGM; stable-diffusion.cpp also stores the UNet's proj_in/out so).
fn linear(mut entry: Entry) -> Entry {
    if let [rows, cols, 1, 1] = entry.shape[..] {
        entry.shape = vec![rows, cols];
    }
    entry
}

/// OpenCLIP's `text_projection` [hidden, projection] as diffusers' `text_projection.weight`
/// [projection, hidden]: the transpose.
fn text_projection(mut entry: Entry) -> std::result::Result<Option<Vec<(String, Entry)>>, String> {
    let &[hidden, projection] = &entry.shape[..] else {
        return Err(format!("shape {:?} is not a [hidden, projection] matrix", entry.shape));
    };
    entry.shape = vec![projection, hidden];
    entry.transposed = true;
    Ok(Some(vec![("text_projection.weight".into(), entry)]))
}

/// The q, k and v entries of a fused in_proj weight or bias `{prefix}.{q,k,v}_proj.{param}`: three
/// consecutive row blocks.
fn split_qkv(prefix: &str, param: &str, entry: Entry) -> std::result::Result<Option<Vec<(String, Entry)>>, String> {
    let rows = entry.shape.first().copied().unwrap_or(0);
    if rows == 0 || rows % 3 != 0 {
        return Err(format!("shape {:?}: the fused q/k/v rows do not split in three", entry.shape));
    }
    let part = (entry.end - entry.start) / 3;
    let entries = ["q", "k", "v"].iter().enumerate().map(|(i, p)| {
        let mut e = entry.clone();
        e.shape[0] = rows / 3;
        e.start = entry.start + i as u64 * part;
        e.end = e.start + part;
        (format!("{prefix}.{p}_proj.{param}"), e)
    });
    Ok(Some(entries.collect()))
}

/// diffusers' CLIPTextModelWithProjection entries of OpenCLIP's `{prefix}{rest}`.
fn open_clip_entries(rest: &str, entry: Entry) -> std::result::Result<Option<Vec<(String, Entry)>>, String> {
    const LAYER: [(&str, &str); 5] =
        [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")];
    let one = |name: &str, entry| Ok(Some(vec![(name.to_string(), entry)]));
    match rest {
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight", entry),
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight", entry),
        "ln_final.weight" => return one("text_model.final_layer_norm.weight", entry),
        "ln_final.bias" => return one("text_model.final_layer_norm.bias", entry),
        "text_projection" => return text_projection(entry),
        _ => {}
    }
    let Some((layer, rest)) = rest.strip_prefix("transformer.resblocks.").and_then(|r| r.split_once('.')) else {
        return Ok(None); // logit_scale, attn_mask
    };
    let prefix = format!("text_model.encoder.layers.{}", index(layer)?);
    match rest {
        "attn.in_proj_weight" => split_qkv(&format!("{prefix}.self_attn"), "weight", entry),
        "attn.in_proj_bias" => split_qkv(&format!("{prefix}.self_attn"), "bias", entry),
        _ => match LAYER.iter().find_map(|(sgm, diffusers)| rest.strip_prefix(sgm).map(|p| format!("{diffusers}{p}"))) {
            Some(name) => one(&format!("{prefix}.{name}"), entry),
            None => Ok(None),
        },
    }
}

/// diffusers' entries of stable-diffusion.cpp's `cond_stage_model.*transformer.{rest}`.
fn sd_cpp_clip_entries(rest: &str, entry: Entry) -> std::result::Result<Option<Vec<(String, Entry)>>, String> {
    if rest == "text_model.text_projection" {
        return text_projection(entry);
    }
    for param in ["weight", "bias"] {
        if let Some(prefix) = rest.strip_suffix(&format!(".in_proj.{param}")) {
            return split_qkv(prefix, param, entry);
        }
    }
    Ok(Some(vec![(rest.to_string(), entry)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_indices_follow_layers_per_block() {
        // SDXL: three levels of two resnets; the last level has no downsampler.
        let sdxl = Layout { unet_layers: vec![2, 2, 2], linear_projection: true, vae_levels: 4 };
        let inputs: Vec<_> = (1..9).map(|i| sdxl.input_block(i)).collect();
        let want = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)].map(Some);
        assert_eq!(inputs, want);
        assert_eq!(sdxl.input_block(9), None);
        let outputs: Vec<_> = (0..10).map(|i| sdxl.output_block(i)).collect();
        let want = [Some((0, 0)), Some((0, 1)), Some((0, 2)), Some((1, 0)), Some((1, 1)), Some((1, 2)), Some((2, 0)), Some((2, 1)), Some((2, 2)), None];
        assert_eq!(outputs, want);
        // Per-level counts: up level 0 mirrors the last down level.
        let uneven = Layout { unet_layers: vec![1, 3], linear_projection: true, vae_levels: 4 };
        assert_eq!((1..6).map(|i| uneven.input_block(i)).collect::<Vec<_>>(), [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)].map(Some));
        assert_eq!((0..6).map(|i| uneven.output_block(i)).collect::<Vec<_>>(), [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)].map(Some));
    }

    #[test]
    fn unet_names_match_diffusers() {
        let sdxl = Layout { unet_layers: vec![2, 2, 2], linear_projection: true, vae_levels: 4 };
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
            ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"),
            ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
            ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
            ("output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.1.norm.bias", "up_blocks.1.attentions.2.norm.bias"),
            ("output_blocks.2.1.conv.bias", "up_blocks.0.upsamplers.0.conv.bias"), // a level without attention
            ("output_blocks.8.0.out_layers.3.weight", "up_blocks.2.resnets.2.conv2.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (sgm, diffusers) in cases {
            assert_eq!(unet_name(sgm, &sdxl).unwrap().as_deref(), Some(diffusers), "{sgm}");
        }
        assert!(unet_name("input_blocks.9.0.in_layers.0.weight", &sdxl).unwrap_err().contains("input_blocks.9"));
    }
}
