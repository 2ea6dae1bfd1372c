//! diffusers' Transformer2DModel on continuous (image) inputs, as the SDXL UNet uses it
//! (transformers/transformer_2d.py, attention.py BasicTransformerBlock, FeedForward with GEGLU,
//! attention_processor.py Attention with the default processor).

use crate::quant::Weight;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::{GroupNorm, LayerNorm, Linear};
use crate::weights::Vars;

/// diffusers' fixed epsilons: Transformer2DModel's GroupNorm uses 1e-6 whatever the UNet's
/// norm_eps; the blocks' LayerNorms keep Transformer2DModel's default norm_eps (the UNet blocks do
/// not pass one).
const GROUP_NORM_EPS: f64 = 1e-6;
const LAYER_NORM_EPS: f64 = 1e-5;

/// The shape of one Transformer2DModel, as a UNet block derives it from the UNet config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transformer2DConfig {
    /// Input and output channels (the block's out_channels).
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Number of BasicTransformerBlocks (`transformer_layers_per_block`).
    pub layers: usize,
    /// Width of the encoder hidden states the cross-attention reads.
    pub cross_attention_dim: usize,
    pub groups: usize,
    /// proj_in / proj_out are Linear layers (SDXL) rather than 1x1 convolutions.
    pub use_linear_projection: bool,
}

impl Transformer2DConfig {
    pub fn inner_dim(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Multi-head attention with bias-free to_q/to_k/to_v and a biased to_out.0 (attention_bias false,
/// out_bias true); keys and values come from `context` for cross-attention.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `dim` is both the query width and heads * head_dim (as in every Transformer2DModel block).
    async fn load(vb: &Vars<'_>, dim: usize, context_dim: usize, heads: usize) -> Result<Attention> {
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), dim, dim, false).await?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, dim, false).await?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, dim, false).await?,
            to_out: Linear::load(&vb.pp("to_out.0"), dim, dim, true).await?,
            heads,
        })
    }

    /// Attention of `x` over `context`, plus `residual` (added by the output projection).
    fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(gpu, x)?;
        let k = self.to_k.forward(gpu, context)?;
        let v = self.to_v.forward(gpu, context)?;
        self.to_out.forward_add(gpu, &gpu.attention(&q, &k, &v, self.heads, false)?, Some(residual))
    }
}

/// BasicTransformerBlock with norm_type "layer_norm": pre-LN self-attention, cross-attention
/// against the text states, and a GEGLU feed-forward (inner width 4 * dim), each residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    async fn load(vb: &Vars<'_>, c: &Transformer2DConfig) -> Result<BasicTransformerBlock> {
        let dim = c.inner_dim();
        let ff_inner = 4 * dim;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, LAYER_NORM_EPS).await?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, c.heads).await?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, LAYER_NORM_EPS).await?,
            attn2: Attention::load(&vb.pp("attn2"), dim, c.cross_attention_dim, c.heads).await?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, LAYER_NORM_EPS).await?,
            // GEGLU projects to twice the inner width: the value half, then the gate half.
            ff_in: Linear::load(&vb.pp("ff.net.0.proj"), dim, 2 * ff_inner, true).await?,
            ff_out: Linear::load(&vb.pp("ff.net.2"), ff_inner, dim, true).await?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x)?;
        let x = self.attn1.forward(gpu, &h, &h, x)?;
        let h = self.norm2.forward(gpu, &x)?;
        let x = self.attn2.forward(gpu, &h, context, &x)?;
        let h = self.norm3.forward(gpu, &x)?;
        let h = self.ff_in.forward_geglu(gpu, &h)?;
        self.ff_out.forward_add(gpu, &h, Some(&x))
    }
}

/// Transformer2DModel: GroupNorm → tokens [B, HW, C] → proj_in → blocks → proj_out → back to
/// [B, C, H, W] → + input.
pub struct Transformer2DModel {
    config: Transformer2DConfig,
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2DModel {
    pub async fn load(vb: &Vars<'_>, config: &Transformer2DConfig) -> Result<Transformer2DModel> {
        let c = config;
        // diffusers reshapes the projected tokens back with the input's channel count, so a model
        // whose heads * head_dim differs from its channels cannot run there either.
        if c.heads == 0 || c.inner_dim() != c.channels || c.layers == 0 {
            return Err(Error::InvalidParameter(format!(
                "{} heads of width {} for {} channels and {} layers (heads * head_dim must equal the channels)",
                c.heads, c.head_dim, c.channels, c.layers
            )));
        }
        let mut blocks = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            blocks.push(BasicTransformerBlock::load(&vb.pp(format!("transformer_blocks.{i}")), c).await?);
        }
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&vb.pp("norm"), c.channels, c.groups, GROUP_NORM_EPS).await?,
            proj_in: projection(&vb.pp("proj_in"), c.channels, c.inner_dim(), c.use_linear_projection).await?,
            blocks,
            proj_out: projection(&vb.pp("proj_out"), c.inner_dim(), c.channels, c.use_linear_projection).await?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &Transformer2DConfig {
        &self.config
    }

    /// x [B, C, H, W]; encoder_hidden_states [B, tokens, cross_attention_dim].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let &[b, ch, h, w] = x.shape() else {
            return Err(Error::InvalidParameter(format!("Transformer2DModel: expected [batch, {}, height, width], got {:?}", c.channels, x.shape())));
        };
        match encoder_hidden_states.shape() {
            &[eb, _, ew] if ch == c.channels && eb == b && ew == c.cross_attention_dim => {}
            s => {
                return Err(Error::InvalidParameter(format!(
                    "Transformer2DModel with {} channels and cross_attention_dim {}: input {:?}, encoder_hidden_states {s:?}",
                    c.channels,
                    c.cross_attention_dim,
                    x.shape()
                )))
            }
        }
        let tokens = self.norm.forward(gpu, x, false)?.reshape(&[b, ch, h * w])?;
        let mut t = self.proj_in.forward(gpu, &gpu.transpose(&tokens)?)?;
        for block in &self.blocks {
            t = block.forward(gpu, &t, encoder_hidden_states)?;
        }
        let t = self.proj_out.forward(gpu, &t)?;
        gpu.add(x, &gpu.transpose(&t)?.reshape(&[b, ch, h, w])?)
    }
}

/// proj_in / proj_out. A 1x1 convolution on [B, C, H, W] applies the same matrix to every pixel as
/// a Linear on the [B, HW, C] tokens, so both variants run as a Linear on the tokens.
async fn projection(vb: &Vars<'_>, inputs: usize, outputs: usize, linear: bool) -> Result<Linear> {
    if linear {
        return Linear::load(vb, inputs, outputs, true).await;
    }
    let shape = [outputs, inputs, 1, 1];
    let weight = match vb.matrix("weight", &shape).await? {
        Weight::Dense(t) => Weight::Dense(t.reshape(&[outputs, inputs])?),
        quantized => quantized,
    };
    Linear::with_weight(vb, weight, &shape, true).await
}
