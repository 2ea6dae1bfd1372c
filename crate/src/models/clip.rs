//! CLIP text transformer (transformers' CLIPTextModel / CLIPTextModelWithProjection), driven by
//! its config.json: pre-LN layers with causal self-attention and a quick_gelu or gelu MLP.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::{LayerNorm, Linear, MAX_HEAD_DIM};
use crate::ops::Activation;
use crate::weights::Vars;

/// Mirrors transformers' CLIPTextConfig (defaults as transformers).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: i64,
}

impl ClipTextConfig {
    /// Checks the config against what this engine implements, before any weight is read; gives
    /// the MLP's activation.
    pub fn check(&self) -> std::result::Result<Activation, String> {
        let activation = Activation::from_name(&self.hidden_act).filter(|a| *a != Activation::Silu).ok_or_else(|| format!("unsupported hidden_act '{}'", self.hidden_act))?;
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        if heads == 0 || h % heads != 0 || self.num_hidden_layers < 2 {
            return Err(format!("hidden_size {h} with {heads} heads and {} layers", self.num_hidden_layers));
        }
        if h / heads > MAX_HEAD_DIM {
            return Err(format!("hidden_size {h} in {heads} heads makes heads {} wide, more than the {MAX_HEAD_DIM} supported", h / heads));
        }
        Ok(activation)
    }
}

mod defaults {
    pub fn vocab_size() -> usize { 49408 }
    pub fn hidden_size() -> usize { 512 }
    pub fn intermediate_size() -> usize { 2048 }
    pub fn projection_dim() -> usize { 512 }
    pub fn num_hidden_layers() -> usize { 12 }
    pub fn num_attention_heads() -> usize { 8 }
    pub fn max_position_embeddings() -> usize { 77 }
    pub fn hidden_act() -> String { "quick_gelu".into() }
    pub fn layer_norm_eps() -> f64 { 1e-5 }
    pub fn eos_token_id() -> i64 { 49407 }
}

struct ClipLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    activation: Activation,
    token_embedding: Vec<Tensor>,
    position_embedding: Vec<Tensor>,
    layers: Vec<ClipLayer>,
    final_norm: LayerNorm,
    /// Present in CLIPTextModelWithProjection (SDXL's text_encoder_2).
    projection: Option<Linear>,
}

/// What SDXL takes from a text encoder.
pub struct ClipOutput {
    /// Hidden states after `layers - 1 - clip_skip` layers, [1, tokens, hidden].
    pub hidden: Tensor,
    /// Projected pooled output [1, projection_dim] (models with a projection only).
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    /// Builds the encoder `config` describes from the weights of `vb` (transformers' names,
    /// `text_model.*` and `text_projection.weight`). A config this engine does not implement is
    /// [`Error::Config`].
    pub async fn load(vb: &Vars<'_>, config: ClipTextConfig) -> Result<ClipTextModel> {
        let activation = config.check().map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let h = config.hidden_size;
        let p = vb.pp("text_model");
        let token_embedding = p.tensor_rows("embeddings.token_embedding.weight", [config.vocab_size, h]).await?;
        let position_embedding = p.tensor_rows("embeddings.position_embedding.weight", [config.max_position_embeddings, h]).await?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = p.pp(format!("encoder.layers.{i}"));
            layers.push(ClipLayer {
                norm1: LayerNorm::load(&l.pp("layer_norm1"), h, config.layer_norm_eps).await?,
                q: Linear::load(&l.pp("self_attn.q_proj"), h, h, true).await?,
                k: Linear::load(&l.pp("self_attn.k_proj"), h, h, true).await?,
                v: Linear::load(&l.pp("self_attn.v_proj"), h, h, true).await?,
                out: Linear::load(&l.pp("self_attn.out_proj"), h, h, true).await?,
                norm2: LayerNorm::load(&l.pp("layer_norm2"), h, config.layer_norm_eps).await?,
                fc1: Linear::load(&l.pp("mlp.fc1"), h, config.intermediate_size, true).await?,
                fc2: Linear::load(&l.pp("mlp.fc2"), config.intermediate_size, h, true).await?,
            });
        }
        let final_norm = LayerNorm::load(&p.pp("final_layer_norm"), h, config.layer_norm_eps).await?;
        let projection = match vb.contains("text_projection.weight") {
            true => Some(Linear::load(&vb.pp("text_projection"), h, config.projection_dim, false).await?),
            false => None,
        };
        Ok(ClipTextModel { config, activation, token_embedding, position_embedding, layers, final_norm, projection })
    }

    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    fn layer(&self, gpu: &Gpu, layer: &ClipLayer, x: &Tensor) -> Result<Tensor> {
        let h = layer.norm1.forward(gpu, x)?;
        let (q, k, v) = (layer.q.forward(gpu, &h)?, layer.k.forward(gpu, &h)?, layer.v.forward(gpu, &h)?);
        let a = gpu.attention(&q, &k, &v, self.config.num_attention_heads, true)?;
        let x = layer.out.forward_add(gpu, &a, Some(x))?;
        let h = layer.norm2.forward(gpu, &x)?;
        let h = gpu.activation(&layer.fc1.forward(gpu, &h)?, self.activation)?;
        layer.fc2.forward_add(gpu, &h, Some(&x))
    }

    /// Runs the encoder on one tokenised prompt. `hidden` is transformers'
    /// `hidden_states[-(clip_skip + 2)]` (SDXL: the penultimate layer, clip_skip 0); layers past it
    /// run only when the pooled projection is needed.
    pub fn forward(&self, gpu: &Gpu, ids: &[u32], clip_skip: usize) -> Result<ClipOutput> {
        let n_layers = self.layers.len();
        let tokens = ids.len();
        if tokens == 0 || tokens > self.config.max_position_embeddings {
            return Err(Error::InvalidParameter(format!("{tokens} tokens; the text encoder takes 1..={}", self.config.max_position_embeddings)));
        }
        if clip_skip + 1 >= n_layers {
            return Err(Error::InvalidParameter(format!("clip_skip {clip_skip} with {n_layers} layers")));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(Error::InvalidParameter(format!("token id {bad} outside the vocabulary of {}", self.config.vocab_size)));
        }
        let ids_t = gpu.upload_u32(ids, &[tokens])?;
        let positions: Vec<u32> = (0..tokens as u32).collect();
        let pos_t = gpu.upload_u32(&positions, &[tokens])?;
        let h = self.config.hidden_size;
        let mut x = gpu.add(&gpu.embedding(&ids_t, &self.token_embedding)?, &gpu.embedding(&pos_t, &self.position_embedding)?)?;
        x = x.reshape(&[1, tokens, h])?;
        let hidden_layers = n_layers - 1 - clip_skip;
        let mut hidden = None;
        let needed = if self.projection.is_some() { n_layers } else { hidden_layers };
        for (i, layer) in self.layers[..needed].iter().enumerate() {
            x = self.layer(gpu, layer, &x)?;
            if i + 1 == hidden_layers {
                hidden = Some(x.clone());
            }
        }
        let pooled = match &self.projection {
            Some(projection) => {
                let row = self.pooled_position(ids) as u32;
                let last = gpu.embedding(&gpu.upload_u32(&[row], &[1])?, &[x.reshape(&[tokens, h])?])?;
                Some(projection.forward(gpu, &self.final_norm.forward(gpu, &last)?)?)
            }
            None => None,
        };
        Ok(ClipOutput { hidden: hidden.expect("hidden_layers <= needed"), pooled })
    }

    /// transformers' pooling position: argmax(ids) for legacy configs (eos_token_id == 2), else the
    /// first eos token.
    fn pooled_position(&self, ids: &[u32]) -> usize {
        let target = if self.config.eos_token_id == 2 { ids.iter().copied().max() } else { Some(self.config.eos_token_id as u32) };
        ids.iter().position(|&i| Some(i) == target).unwrap_or(0)
    }
}
