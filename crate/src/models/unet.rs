//! diffusers' UNet2DConditionModel as SDXL's base and refiner use it, driven by unet/config.json
//! (models/unets/unet_2d_condition.py, unet_2d_blocks.py): sinusoidal time embedding plus SDXL's
//! "text_time" micro-conditioning, DownBlock2D / CrossAttnDownBlock2D levels, the cross-attention
//! mid block, and up blocks that consume the down path's skips in reverse order.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::models::transformer::{Transformer2DConfig, Transformer2DModel};
use crate::models::{Conv2d, GroupNorm, Linear, MAX_HEAD_DIM};
use crate::ops::Activation;
use crate::weights::Vars;

/// A config value given once for every level or as a list with one entry per level (or, nested,
/// per layer). `Each` is tried first so that a list of numbers is read as per-level values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    Each(Vec<T>),
    All(T),
}

impl<T: Clone> PerLevel<T> {
    /// The value for each of `n` entries; `name` names the field in errors.
    fn expand(&self, n: usize, name: &str) -> std::result::Result<Vec<T>, String> {
        match self {
            PerLevel::All(v) => Ok(vec![v.clone(); n]),
            PerLevel::Each(v) if v.len() == n => Ok(v.clone()),
            PerLevel::Each(v) => Err(format!("{name} has {} entries where {n} are needed", v.len())),
        }
    }
}

/// Mirrors diffusers' UNet2DConditionModel config (field names and defaults as diffusers 0.42).
/// Fields that only matter for block types this engine rejects are kept for completeness and
/// ignored, as diffusers ignores them for the supported blocks.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<PerLevel<usize>>,
    #[serde(default = "defaults::four")]
    pub in_channels: usize,
    #[serde(default = "defaults::four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "defaults::yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "defaults::mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "defaults::no")]
    pub only_cross_attention: PerLevel<bool>,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: PerLevel<usize>,
    #[serde(default = "defaults::one")]
    pub downsample_padding: usize,
    #[serde(default = "defaults::unit")]
    pub mid_block_scale_factor: f64,
    /// Training only.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "defaults::cross_attention_dim")]
    pub cross_attention_dim: PerLevel<usize>,
    #[serde(default = "defaults::transformer_layers_per_block")]
    pub transformer_layers_per_block: PerLevel<PerLevel<usize>>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerLevel<usize>>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// diffusers' naming quirk: with `num_attention_heads` null this holds the number of heads
    /// per level, and the head width is channels / heads.
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: PerLevel<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerLevel<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Attention already accumulates in f32 here (null in the official SDXL configs).
    #[serde(default = "defaults::no_upcast")]
    pub upcast_attention: Option<bool>,
    #[serde(default = "defaults::default_name")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "defaults::unit")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "defaults::positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "defaults::three")]
    pub conv_in_kernel: usize,
    #[serde(default = "defaults::three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "defaults::default_name")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "defaults::addition_embed_type_num_heads")]
    pub addition_embed_type_num_heads: usize,
}

mod defaults {
    use super::PerLevel;
    pub fn one() -> usize { 1 }
    pub fn three() -> usize { 3 }
    pub fn four() -> usize { 4 }
    pub fn unit() -> f64 { 1.0 }
    pub fn yes() -> bool { true }
    pub fn no() -> PerLevel<bool> { PerLevel::All(false) }
    pub fn no_upcast() -> Option<bool> { Some(false) }
    pub fn down_block_types() -> Vec<String> {
        ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
    }
    pub fn mid_block_type() -> Option<String> { Some("UNetMidBlock2DCrossAttn".into()) }
    pub fn up_block_types() -> Vec<String> {
        ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
    }
    pub fn block_out_channels() -> Vec<usize> { vec![320, 640, 1280, 1280] }
    pub fn layers_per_block() -> PerLevel<usize> { PerLevel::All(2) }
    pub fn act_fn() -> String { "silu".into() }
    pub fn norm_num_groups() -> Option<usize> { Some(32) }
    pub fn norm_eps() -> f64 { 1e-5 }
    pub fn cross_attention_dim() -> PerLevel<usize> { PerLevel::All(1280) }
    pub fn transformer_layers_per_block() -> PerLevel<PerLevel<usize>> { PerLevel::All(PerLevel::All(1)) }
    pub fn attention_head_dim() -> PerLevel<usize> { PerLevel::All(8) }
    pub fn default_name() -> String { "default".into() }
    pub fn positional() -> String { "positional".into() }
    pub fn addition_embed_type_num_heads() -> usize { 64 }
}

/// One down, mid or up block as diffusers builds it from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Input channels of each ResnetBlock2D (in up blocks including the concatenated skip).
    pub resnet_in: Vec<usize>,
    /// Output channels of every resnet, transformer and resampler in the block.
    pub out_channels: usize,
    /// The Transformer2DModel after each resnet (in the mid block: after each resnet but the
    /// first); empty for DownBlock2D / UpBlock2D.
    pub attentions: Vec<Transformer2DConfig>,
    /// A Downsample2D ends a down block / an Upsample2D ends an up block (all but the last).
    pub resample: bool,
}

/// The whole block structure implied by a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    pub down: Vec<BlockLayout>,
    pub mid: Option<BlockLayout>,
    pub up: Vec<BlockLayout>,
    /// Width of the time embedding every resnet receives.
    pub time_embed_dim: usize,
    /// SDXL's "text_time" embedding: (addition_time_embed_dim, projection_class_embeddings_input_dim).
    pub add_time: Option<(usize, usize)>,
}

impl UNet2DConditionConfig {
    /// Checks the config against what this engine implements and derives the blocks exactly as
    /// diffusers' constructor does. The error names the offending field.
    pub fn layout(&self) -> std::result::Result<UNetLayout, String> {
        self.check_supported()?;
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} down_block_types, {} up_block_types and {} block_out_channels must be equal in number and non-zero",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            ));
        }
        let channels = &self.block_out_channels;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let transformer_layers = self.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        let groups = self.norm_num_groups.ok_or("norm_num_groups null (no normalisation) is not supported")?;
        let attention = |level: &str, channels: usize, heads: usize, layers: usize, cross: usize| {
            if heads == 0 || !channels.is_multiple_of(heads) {
                return Err(format!("{level}: {channels} channels do not split into {heads} attention heads"));
            }
            if channels / heads > MAX_HEAD_DIM {
                return Err(format!("{level}: {channels} channels in {heads} attention heads make heads {} wide, more than the {MAX_HEAD_DIM} supported", channels / heads));
            }
            Ok(Transformer2DConfig {
                channels,
                heads,
                head_dim: channels / heads,
                layers,
                cross_attention_dim: cross,
                groups,
                use_linear_projection: self.use_linear_projection,
            })
        };

        let mut down = Vec::with_capacity(n);
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let level = format!("down_blocks.{i}");
            let (input, out) = (channels[i.saturating_sub(1)], channels[i]);
            let with_attention = match kind.strip_prefix("UNetRes").unwrap_or(kind) {
                "DownBlock2D" => false,
                "CrossAttnDownBlock2D" => true,
                other => return Err(format!("{level}: unsupported down block type '{other}'")),
            };
            let attentions = match with_attention {
                true => transformer_layers[i]
                    .expand(layers[i], &format!("transformer_layers_per_block[{i}]"))?
                    .into_iter()
                    .map(|l| attention(&level, out, heads[i], l, cross[i]))
                    .collect::<std::result::Result<_, _>>()?,
                false => Vec::new(),
            };
            let resnet_in = (0..layers[i]).map(|j| if j == 0 { input } else { out }).collect();
            down.push(BlockLayout { resnet_in, out_channels: out, attentions, resample: i + 1 < n });
        }

        let last = channels[n - 1];
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                // The mid block has one attention; a per-layer list contributes its first entry.
                let layers = match &transformer_layers[n - 1] {
                    PerLevel::All(l) => *l,
                    PerLevel::Each(v) => *v.first().ok_or("transformer_layers_per_block: empty list for the last level")?,
                };
                let attention = attention("mid_block", last, heads[n - 1], layers, cross[n - 1])?;
                Some(BlockLayout { resnet_in: vec![last, last], out_channels: last, attentions: vec![attention], resample: false })
            }
            Some(other) => return Err(format!("unsupported mid_block_type '{other}'")),
        };

        let up_transformer_layers = match &self.reverse_transformer_layers_per_block {
            Some(reverse) if reverse.len() == n => reverse.clone(),
            Some(reverse) => return Err(format!("reverse_transformer_layers_per_block has {} entries for {n} up blocks", reverse.len())),
            None if transformer_layers.iter().any(|l| matches!(l, PerLevel::Each(_))) => {
                return Err("per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block (as in diffusers)".into())
            }
            None => transformer_layers.iter().rev().cloned().collect(),
        };
        let mut up = Vec::with_capacity(n);
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let level = format!("up_blocks.{i}");
            let r = n - 1 - i; // the down level this up block mirrors
            let prev = channels[(r + 1).min(n - 1)];
            let out = channels[r];
            // The skip of the block's last resnet comes from the level below (conv_in at the top).
            let skip_in = channels[r.saturating_sub(1)];
            let resnets = layers[r] + 1;
            let with_attention = match kind.strip_prefix("UNetRes").unwrap_or(kind) {
                "UpBlock2D" => false,
                "CrossAttnUpBlock2D" => true,
                other => return Err(format!("{level}: unsupported up block type '{other}'")),
            };
            let attentions = match with_attention {
                true => up_transformer_layers[i]
                    .expand(resnets, &format!("transformer layers of {level}"))?
                    .into_iter()
                    .map(|l| attention(&level, out, heads[r], l, cross[r]))
                    .collect::<std::result::Result<_, _>>()?,
                false => Vec::new(),
            };
            let resnet_in = (0..resnets)
                .map(|j| (if j == 0 { prev } else { out }) + (if j + 1 == resnets { skip_in } else { out }))
                .collect();
            up.push(BlockLayout { resnet_in, out_channels: out, attentions, resample: i + 1 < n });
        }

        let add_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some(_) => match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
                (Some(t), Some(p)) if t >= 2 => Some((t, p)),
                _ => return Err("addition_embed_type 'text_time' needs addition_time_embed_dim >= 2 and projection_class_embeddings_input_dim".into()),
            },
        };
        Ok(UNetLayout { down, mid, up, time_embed_dim: self.time_embedding_dim.unwrap_or(4 * channels[0]), add_time })
    }

    /// Rejects every option whose computation this engine does not implement.
    fn check_supported(&self) -> std::result::Result<(), String> {
        let unsupported = |what: String| Err(format!("{what} is not supported (this engine implements what the SDXL base and refiner use)"));
        if self.num_attention_heads.is_some() {
            // diffusers itself raises here: the field name was swapped with attention_head_dim.
            return Err("num_attention_heads must be null; diffusers reads the head count from attention_head_dim".into());
        }
        if self.center_input_sample {
            return unsupported("center_input_sample true".into());
        }
        if self.time_embedding_type != "positional" {
            return unsupported(format!("time_embedding_type '{}'", self.time_embedding_type));
        }
        for (name, value) in [("time_embedding_act_fn", &self.time_embedding_act_fn), ("timestep_post_act", &self.timestep_post_act)] {
            if let Some(v) = value {
                return unsupported(format!("{name} '{v}'"));
            }
        }
        if let Some(d) = self.time_cond_proj_dim {
            return unsupported(format!("time_cond_proj_dim {d}"));
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() || self.class_embeddings_concat {
            return unsupported(format!(
                "class embedding (class_embed_type {:?}, num_class_embeds {:?}, class_embeddings_concat {})",
                self.class_embed_type, self.num_class_embeds, self.class_embeddings_concat
            ));
        }
        if self.encoder_hid_dim.is_some() || self.encoder_hid_dim_type.is_some() {
            return unsupported(format!("encoder_hid_proj (encoder_hid_dim {:?}, encoder_hid_dim_type {:?})", self.encoder_hid_dim, self.encoder_hid_dim_type));
        }
        if let Some(t) = self.addition_embed_type.as_deref().filter(|t| *t != "text_time") {
            return unsupported(format!("addition_embed_type '{t}'"));
        }
        if self.attention_type != "default" {
            return unsupported(format!("attention_type '{}'", self.attention_type));
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(format!("resnet_time_scale_shift '{}'", self.resnet_time_scale_shift));
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention true".into());
        }
        let only_cross = match &self.only_cross_attention {
            PerLevel::All(v) => *v,
            PerLevel::Each(v) => v.contains(&true),
        };
        if only_cross {
            return unsupported(format!("only_cross_attention {:?}", self.only_cross_attention));
        }
        // ResnetBlock2D and conv_act run SiLU.
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return unsupported(format!("act_fn '{}'", self.act_fn));
        }
        if self.mid_block_scale_factor != 1.0 {
            return unsupported(format!("mid_block_scale_factor {}", self.mid_block_scale_factor));
        }
        for (name, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k.is_multiple_of(2) {
                return unsupported(format!("{name} {k} (even kernels change the latent size)"));
            }
        }
        Ok(())
    }
}

/// TimestepEmbedding with SiLU between its two linears (no cond_proj, no post activation).
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    async fn load(vb: &Vars<'_>, inputs: usize, dim: usize) -> Result<TimestepEmbedding> {
        Ok(TimestepEmbedding { linear_1: Linear::load(&vb.pp("linear_1"), inputs, dim, true).await?, linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, true).await? })
    }

    /// The embedding of `x`, plus `residual` (added by the last projection).
    fn forward(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.linear_2.forward_add(gpu, &gpu.activation(&self.linear_1.forward(gpu, x)?, Activation::Silu)?, residual)
    }
}

/// The resnets of a block and the transformers that follow them.
struct Block {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl Block {
    async fn load(vb: &Vars<'_>, layout: &BlockLayout, temb: usize, groups: usize, eps: f64) -> Result<Block> {
        let mut resnets = Vec::with_capacity(layout.resnet_in.len());
        for (j, &input) in layout.resnet_in.iter().enumerate() {
            resnets.push(ResnetBlock2D::load(&vb.pp(format!("resnets.{j}")), input, layout.out_channels, Some(temb), groups, eps).await?);
        }
        let mut attentions = Vec::with_capacity(layout.attentions.len());
        for (j, config) in layout.attentions.iter().enumerate() {
            attentions.push(Transformer2DModel::load(&vb.pp(format!("attentions.{j}")), config).await?);
        }
        Ok(Block { resnets, attentions })
    }

    /// Resnet j, then transformer j when the block has one.
    fn layer(&self, gpu: &Gpu, j: usize, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.resnets[j].forward(gpu, x, Some(temb))?;
        match self.attentions.get(j) {
            Some(attention) => attention.forward(gpu, &x, context),
            None => Ok(x),
        }
    }
}

/// DownBlock2D / CrossAttnDownBlock2D: every layer's output and the downsampler's are skips.
struct DownBlock {
    block: Block,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for j in 0..self.block.resnets.len() {
            x = self.block.layer(gpu, j, &x, temb, context)?;
            skips.push(x.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            x = downsampler.forward(gpu, &x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs.
struct MidBlock {
    block: Block,
}

impl MidBlock {
    fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let b = &self.block;
        let mut x = b.resnets[0].forward(gpu, x, Some(temb))?;
        for (attention, resnet) in b.attentions.iter().zip(&b.resnets[1..]) {
            x = resnet.forward(gpu, &attention.forward(gpu, &x, context)?, Some(temb))?;
        }
        Ok(x)
    }
}

/// UpBlock2D / CrossAttnUpBlock2D: each layer first concatenates the latest skip after its input
/// along the channels (torch.cat([hidden, skip], dim=1)).
struct UpBlock {
    block: Block,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    fn forward(&self, gpu: &Gpu, x: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for j in 0..self.block.resnets.len() {
            let skip = skips.pop().expect("the layout gives one skip per up-block resnet");
            x = self.block.layer(gpu, j, &gpu.concat(&x, &skip, 1)?, temb, context)?;
        }
        match &self.upsampler {
            // Always to the next skip's size: ×2 when the latent divides evenly, else diffusers'
            // forward_upsample_size.
            Some(upsampler) => upsampler.forward(gpu, &x, skips.last().map(|s| [s.shape()[2], s.shape()[3]])),
            None => Ok(x),
        }
    }
}

pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    pub layout: UNetLayout,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model `config` describes from the weights of `vb`. A config this engine does not
    /// implement is [`Error::Config`] naming the field.
    pub async fn load(vb: &Vars<'_>, config: UNet2DConditionConfig) -> Result<UNet2DConditionModel> {
        let layout = config.layout().map_err(|message| Error::Config { path: "unet/config.json".into(), message })?;
        let c = &config;
        let (groups, eps) = (c.norm_num_groups.expect("checked by layout()"), c.norm_eps);
        let first = c.block_out_channels[0];
        let temb = layout.time_embed_dim;

        let time_embedding = TimestepEmbedding::load(&vb.pp("time_embedding"), first, temb).await?;
        let add_embedding = match layout.add_time {
            Some((_, inputs)) => Some(TimestepEmbedding::load(&vb.pp("add_embedding"), inputs, temb).await?),
            None => None,
        };
        let k = c.conv_in_kernel;
        let conv_in = Conv2d::load(&vb.pp("conv_in"), c.in_channels, first, k, 1, (k - 1) / 2).await?;
        let mut down = Vec::with_capacity(layout.down.len());
        for (i, l) in layout.down.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let downsampler = match l.resample {
                true => Some(Downsample2D::load(&vb.pp("downsamplers.0"), l.out_channels, c.downsample_padding).await?),
                false => None,
            };
            down.push(DownBlock { block: Block::load(&vb, l, temb, groups, eps).await?, downsampler });
        }
        let mid = match &layout.mid {
            Some(l) => Some(MidBlock { block: Block::load(&vb.pp("mid_block"), l, temb, groups, eps).await? }),
            None => None,
        };
        let mut up = Vec::with_capacity(layout.up.len());
        for (i, l) in layout.up.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let upsampler = match l.resample {
                true => Some(Upsample2D::load(&vb.pp("upsamplers.0"), l.out_channels).await?),
                false => None,
            };
            up.push(UpBlock { block: Block::load(&vb, l, temb, groups, eps).await?, upsampler });
        }
        let conv_norm_out = GroupNorm::load(&vb.pp("conv_norm_out"), first, groups, eps).await?;
        let k = c.conv_out_kernel;
        let conv_out = Conv2d::load(&vb.pp("conv_out"), first, c.out_channels, k, 1, (k - 1) / 2).await?;
        Ok(UNet2DConditionModel { config, layout, time_embedding, add_embedding, conv_in, down, mid, up, conv_norm_out, conv_out })
    }

    /// Width of the encoder hidden states the cross-attention reads (None without attention).
    pub fn cross_attention_dim(&self) -> Option<usize> {
        let mut attentions = self.layout.down.iter().chain(&self.layout.mid).chain(&self.layout.up).flat_map(|b| &b.attentions);
        attentions.next().map(|a| a.cross_attention_dim)
    }

    /// One denoiser evaluation, as diffusers' `unet(sample, t, encoder_hidden_states,
    /// added_cond_kwargs={"text_embeds", "time_ids"})`.
    ///
    /// - `sample` [B, in_channels, h, w], any size (odd sizes as diffusers' forward_upsample_size);
    /// - `timestep` the same for the whole batch (fractional values are fine);
    /// - `encoder_hidden_states` [B, tokens, cross_attention_dim];
    /// - `text_embeds` [B, P] and `time_ids` (row-major [B, K], K = 6 for the base, 5 for the
    ///   refiner) with P + K * addition_time_embed_dim = projection_class_embeddings_input_dim;
    ///   both unused, as in diffusers, when the config has no addition_embed_type.
    pub fn forward(&self, gpu: &Gpu, sample: &Tensor, timestep: f32, encoder_hidden_states: &Tensor, text_embeds: &Tensor, time_ids: &[f32]) -> Result<Tensor> {
        let bad = |m: String| Error::InvalidParameter(format!("UNet2DConditionModel: {m}"));
        for (name, t) in [("sample", sample), ("encoder_hidden_states", encoder_hidden_states), ("text_embeds", text_embeds)] {
            if t.dtype() != gpu.dtype {
                return Err(bad(format!("{name} is {:?}; this device computes in {:?}", t.dtype(), gpu.dtype)));
            }
        }
        let c = &self.config;
        let &[batch, channels, h, w] = sample.shape() else {
            return Err(bad(format!("sample must be [batch, {}, height, width], got {:?}", c.in_channels, sample.shape())));
        };
        if batch == 0 || channels != c.in_channels || h == 0 || w == 0 {
            return Err(bad(format!("sample {:?}: expected [batch, {}, h, w], non-empty", sample.shape(), c.in_channels)));
        }
        if let Some(width) = self.cross_attention_dim() {
            if !matches!(encoder_hidden_states.shape(), &[b, tokens, cw] if b == batch && tokens > 0 && cw == width) {
                return Err(bad(format!(
                    "encoder_hidden_states {:?} must be [{batch}, tokens, {width}] (batch of the sample, cross_attention_dim)",
                    encoder_hidden_states.shape()
                )));
            }
        }

        let t = gpu.upload_f32(&vec![timestep; batch], &[batch])?;
        let t_emb = gpu.timestep_embedding(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, 1.0, 10000.0)?;
        let mut emb = self.time_embedding.forward(gpu, &t_emb, None)?;
        if let (Some(add_embedding), Some((time_dim, inputs))) = (&self.add_embedding, self.layout.add_time) {
            emb = add_embedding.forward(gpu, &self.text_time(gpu, batch, text_embeds, time_ids, time_dim, inputs)?, Some(&emb))?;
        }
        // Every resnet starts with SiLU(emb): applied once here.
        let emb = gpu.activation(&emb, Activation::Silu)?;

        let mut x = self.conv_in.forward(gpu, sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            x = block.forward(gpu, &x, &emb, encoder_hidden_states, &mut skips)?;
        }
        if let Some(mid) = &self.mid {
            x = mid.forward(gpu, &x, &emb, encoder_hidden_states)?;
        }
        for block in &self.up {
            x = block.forward(gpu, &x, &emb, encoder_hidden_states, &mut skips)?;
        }
        self.conv_out.forward(gpu, &self.conv_norm_out.forward(gpu, &x, true)?)
    }

    /// add_embedding's input: text_embeds, then the sinusoidal embedding of every time id
    /// (add_time_proj on the flattened ids, reshaped to [B, K * addition_time_embed_dim]).
    fn text_time(&self, gpu: &Gpu, batch: usize, text_embeds: &Tensor, time_ids: &[f32], time_dim: usize, inputs: usize) -> Result<Tensor> {
        let bad = |m: String| Error::InvalidParameter(format!("UNet2DConditionModel: {m}"));
        let &[b, pooled] = text_embeds.shape() else {
            return Err(bad(format!("text_embeds must be [batch, width], got {:?}", text_embeds.shape())));
        };
        let ids_per_item = time_ids.len() / batch;
        if b != batch || !time_ids.len().is_multiple_of(batch) || pooled + ids_per_item * time_dim != inputs {
            return Err(bad(format!(
                "text_embeds {:?} and {} time_ids for batch {batch}: need [{batch}, P] and [{batch}, K] with P + K * {time_dim} = {inputs} \
                 (projection_class_embeddings_input_dim)",
                text_embeds.shape(),
                time_ids.len()
            )));
        }
        let c = &self.config;
        let ids = gpu.upload_f32(time_ids, &[time_ids.len()])?;
        let time_embeds = gpu.timestep_embedding(&ids, time_dim, c.flip_sin_to_cos, c.freq_shift, 1.0, 10000.0)?;
        gpu.concat(text_embeds, &time_embeds.reshape(&[batch, ids_per_item * time_dim])?, 1)
    }
}
