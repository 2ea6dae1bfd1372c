//! Original single-file SDXL checkpoints (Stability's SGM layout, as `sd_xl_base_1.0.safetensors` and
//! `sd_xl_refiner_1.0.safetensors`): `model.diffusion_model.*` (the UNet), `first_stage_model.*`
//! (the VAE) and `conditioner.embedders.*` (the text encoders), seen as diffusers' components.
//!
//! The name mapping is diffusers' (loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
//! convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), run once
//! over the header into an index, so tensors stream from the one file as from a folder. Where SGM's
//! bytes differ from diffusers' the entry says how: OpenCLIP's fused `in_proj` rows are narrower
//! byte ranges, the VAE's 1x1-conv attention weights are the same bytes as a Linear's, and
//! OpenCLIP's `text_projection` is the transpose of diffusers' `text_projection.weight`.
//!
//! GGUF files as stable-diffusion.cpp writes them (`sd -M convert`) keep the UNet's and VAE's SGM
//! names but rename the text encoders to transformers' names under `cond_stage_model.` (CLIP-L at
//! `cond_stage_model.transformer.`, the base's bigG at `cond_stage_model.1.transformer.`, the
//! refiner's at `cond_stage_model.transformer.`), keeping OpenCLIP's fused `self_attn.in_proj` and
//! its `text_model.text_projection` orientation; both namings are read.

use std::collections::HashMap;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::weights::{gguf, read_header, read_json, Entry, Source};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";

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
    fn describe(self) -> &'static str {
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
    /// Reads `unet/config.json` and `vae/config.json` of a diffusers-layout folder.
    pub async fn load(config: &impl Source) -> Result<Layout> {
        let unet: UnetLevels = read_json(config, "unet/config.json").await?;
        let vae: VaeLevels = read_json(config, "vae/config.json").await?;
        let n = unet.block_out_channels.len();
        let unet_layers = match unet.layers_per_block {
            LayersPerBlock::All(l) => vec![l; n],
            LayersPerBlock::Each(l) if l.len() == n => l,
            LayersPerBlock::Each(l) => {
                let message = format!("layers_per_block has {} entries for {n} levels", l.len());
                return Err(Error::Config { path: config.describe("unet/config.json"), message });
            }
        };
        Ok(Layout { unet_layers, linear_projection: unet.use_linear_projection, vae_levels: vae.block_out_channels.len() })
    }

    /// diffusers' (down level, resnet) of SGM's `input_blocks.{i}` (i >= 1); resnet ==
    /// layers_per_block is the level's downsampler.
    fn input_block(&self, i: usize) -> Option<(usize, usize)> {
        let mut first = 1;
        for (level, &layers) in self.unet_layers.iter().enumerate() {
            let downsampler = usize::from(level + 1 < self.unet_layers.len());
            if i < first + layers + downsampler {
                return i.checked_sub(first).map(|layer| (level, layer));
            }
            first += layers + downsampler;
        }
        None
    }

    /// diffusers' (up level, resnet) of SGM's `output_blocks.{i}`: up level l has one resnet more
    /// than down level n-1-l.
    fn output_block(&self, i: usize) -> Option<(usize, usize)> {
        let mut first = 0;
        for (level, &layers) in self.unet_layers.iter().rev().enumerate() {
            if i < first + layers + 1 {
                return Some((level, i - first));
            }
            first += layers + 1;
        }
        None
    }
}

/// A single-file checkpoint indexed by diffusers' component folders and tensor names.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file, as its source names it.
    pub path: String,
    pub kind: Kind,
    components: HashMap<&'static str, HashMap<String, Entry>>,
}

impl Checkpoint {
    /// Reads the header of `path` in `source` (safetensors, or GGUF by its magic) and maps every
    /// SDXL tensor to its diffusers component and name.
    pub async fn open(source: &impl Source, path: &str, layout: &Layout) -> Result<Checkpoint> {
        let magic = source.read_range(path, 0, source.len(path).await?.min(4)).await?;
        let tensors: Vec<(String, Entry)> = if gguf::is_gguf(&magic) {
            gguf::read_header(source, path).await?.tensors.into_iter().map(|t| (t.name.clone(), Entry::gguf(0, t))).collect()
        } else {
            read_header(source, path).await?.tensors.into_iter().map(|(name, info)| (name, Entry::safetensors(0, info))).collect()
        };
        Checkpoint::index(source.describe(path), path, tensors, layout)
    }

    /// Builds the index from a file's tensors (SGM or stable-diffusion.cpp names); `location`
    /// names the file in errors.
    pub fn index(location: String, path: &str, tensors: Vec<(String, Entry)>, layout: &Layout) -> Result<Checkpoint> {
        let has = |prefix: &str| tensors.iter().any(|(name, _)| name.starts_with(prefix));
        let layout_found = TEXT_LAYOUTS
            .iter()
            .find(|(_, encoders, absent)| encoders.iter().all(|e| has(e.prefix)) && !absent.is_some_and(has));
        let Some(&(kind, encoders, _)) = layout_found else {
            let sample: Vec<&str> = tensors.iter().take(3).map(|(n, _)| n.as_str()).collect();
            let message = format!(
                "not an SDXL base (CLIP ViT-L at conditioner.embedders.0.transformer.*, OpenCLIP bigG at conditioner.embedders.1.model.*) \
                 or refiner (OpenCLIP bigG at conditioner.embedders.0.model.*) checkpoint, nor stable-diffusion.cpp's naming of one \
                 (cond_stage_model.*); its {} tensors are named like {sample:?}",
                tensors.len()
            );
            return Err(Error::Tensor { path: location, tensor: "conditioner.embedders.*".into(), message });
        };
        for prefix in [UNET, VAE] {
            if !has(prefix) {
                let message = format!("missing: the file looks like {} but has no {prefix}* tensors", kind.describe());
                return Err(Error::Tensor { path: location, tensor: format!("{prefix}*"), message });
            }
        }
        let mut components: HashMap<&'static str, HashMap<String, Entry>> = HashMap::new();
        for (name, entry) in tensors {
            let bad = |message: String| Error::Tensor { path: location.clone(), tensor: name.clone(), message };
            let encoder = encoders.iter().find_map(|e| name.strip_prefix(e.prefix).map(|rest| (e, rest)));
            let mapped = if let Some(rest) = name.strip_prefix(UNET) {
                let projection = layout.linear_projection && (rest.ends_with(".proj_in.weight") || rest.ends_with(".proj_out.weight"));
                let entry = if projection { linear(entry) } else { entry };
                unet_name(rest, layout).map_err(bad)?.map(|n| vec![("unet", n, entry)])
            } else if let Some(rest) = name.strip_prefix(VAE) {
                vae_entry(rest, entry, layout).map_err(bad)?.map(|(n, e)| vec![("vae", n, e)])
            } else if let Some((encoder, rest)) = encoder {
                let entries = match encoder.naming {
                    Naming::Transformers => Some(vec![(rest.to_string(), entry)]),
                    Naming::OpenClip => open_clip_entries(rest, entry).map_err(bad)?,
                    Naming::SdCpp => sd_cpp_clip_entries(rest, entry).map_err(bad)?,
                };
                entries.map(|v| v.into_iter().map(|(n, e)| (encoder.dir, n, e)).collect())
            } else {
                None // state that diffusers drops too (EMA copies, denoiser sigmas, ...)
            };
            for (component, name, entry) in mapped.into_iter().flatten() {
                components.entry(component).or_default().insert(name, entry);
            }
        }
        Ok(Checkpoint { path: path.to_string(), kind, components })
    }

    /// The tensors of diffusers' component folder `dir` ("unet", "vae", "text_encoder", "text_encoder_2").
    pub fn component(&self, location: &str, dir: &str) -> Result<&HashMap<String, Entry>> {
        self.components.get(dir).ok_or_else(|| Error::Tensor {
            path: location.to_string(),
            tensor: format!("{dir}/*"),
            message: format!("missing: the checkpoint is {}, which has no {dir}", self.kind.describe()),
        })
    }
}

/// A model seen as a diffusers folder: model_index.json, configs, tokenizers and the scheduler from
/// `config` (a diffusers-layout folder whose weights, if any, are not read), every tensor from the
/// one checkpoint file `path` in `file`.
pub struct CheckpointSource<C: Source, F: Source> {
    config: C,
    file: F,
    checkpoint: Checkpoint,
}

impl<C: Source, F: Source> CheckpointSource<C, F> {
    /// Indexes the checkpoint with `config`'s UNet and VAE configs and checks that both describe
    /// the same model (base or refiner).
    pub async fn open(config: C, file: F, path: &str) -> Result<CheckpointSource<C, F>> {
        let layout = Layout::load(&config).await?;
        let checkpoint = Checkpoint::open(&file, path, &layout).await?;
        let config_kind = if config.exists("text_encoder/config.json").await { Kind::Base } else { Kind::Refiner };
        if config_kind != checkpoint.kind {
            let message = format!(
                "the checkpoint {} is {}, but this config folder is for {}",
                file.describe(path),
                checkpoint.kind.describe(),
                config_kind.describe()
            );
            return Err(Error::Config { path: config.describe("model_index.json"), message });
        }
        Ok(CheckpointSource { config, file, checkpoint })
    }

    pub fn kind(&self) -> Kind {
        self.checkpoint.kind
    }
}

impl<C: Source, F: Source> Source for CheckpointSource<C, F> {
    fn describe(&self, path: &str) -> String {
        match path == self.checkpoint.path {
            true => self.file.describe(path),
            false => self.config.describe(path),
        }
    }
    async fn exists(&self, path: &str) -> bool {
        match path == self.checkpoint.path {
            true => self.file.exists(path).await,
            false => self.config.exists(path).await,
        }
    }
    async fn len(&self, path: &str) -> Result<u64> {
        match path == self.checkpoint.path {
            true => self.file.len(path).await,
            false => self.config.len(path).await,
        }
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        match path == self.checkpoint.path {
            true => self.file.read_range(path, start, end).await,
            false => self.config.read_range(path, start, end).await,
        }
    }
    fn checkpoint(&self) -> Option<&Checkpoint> {
        Some(&self.checkpoint)
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
            _ => layout.vae_levels.checked_sub(level + 1).ok_or_else(|| format!("up.{level} lies beyond the {} levels of vae/config.json", layout.vae_levels))?,
        };
        match rest.split_once('.') {
            Some(("block", rest)) => format!("{kind}_blocks.{level}.resnets.{}", resnet(rest)),
            Some(("downsample" | "upsample", rest)) => format!("{kind}_blocks.{level}.{kind}samplers.0.{rest}"),
            _ => return Ok(None),
        }
    } else if let Some((block, rest)) = rest.strip_prefix("mid.").and_then(|r| r.split_once('.')) {
        match block.strip_prefix("block_").map(index) {
            Some(k) => format!("mid_block.resnets.{}.{}", k? - 1, resnet(rest)),
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
