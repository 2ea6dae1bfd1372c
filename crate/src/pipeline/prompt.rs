//! Prompt encoding exactly as diffusers' `StableDiffusionXLPipeline.encode_prompt`: each present
//! text encoder's penultimate hidden states concatenated along the width, the pooled projection
//! of the last encoder, and the same for the negative prompt — or zeros when no negative prompt is
//! given and the model sets `force_zeros_for_empty_prompt`.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::clip::ClipTextModel;
use crate::pipeline::ModelIndex;
use crate::quant::QuantPolicy;
use crate::tokenizer::ClipTokenizer;
use crate::weights::Source;

pub struct PromptEncoder {
    /// (tokenizer, encoder) pairs in diffusers' order: text_encoder then text_encoder_2.
    encoders: Vec<(ClipTokenizer, ClipTextModel)>,
    force_zeros_for_empty_prompt: bool,
}

/// Conditioning for one prompt and its negative, on the GPU.
pub struct PromptEmbeds {
    /// [1, tokens, sum of encoder widths]
    pub prompt_embeds: Tensor,
    /// [1, projection_dim]
    pub pooled_prompt_embeds: Tensor,
    pub negative_prompt_embeds: Tensor,
    pub negative_pooled_prompt_embeds: Tensor,
}

/// One encoded text: concatenated hidden states and the pooled projection.
struct Encoded {
    hidden: Tensor,
    pooled: Tensor,
}

impl PromptEncoder {
    /// Loads the text encoders and tokenizers that `model_index.json` declares.
    pub async fn load(gpu: &Gpu, source: &impl Source, index: &ModelIndex) -> Result<PromptEncoder> {
        Self::load_quantized(gpu, source, index, &QuantPolicy::default()).await
    }

    /// Loads with the encoders' weight matrices quantized as `quant` says.
    pub async fn load_quantized(gpu: &Gpu, source: &impl Source, index: &ModelIndex, quant: &QuantPolicy) -> Result<PromptEncoder> {
        let mut encoders = Vec::new();
        for (tok, enc) in [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")] {
            if index.has(enc) {
                if !index.has(tok) {
                    return Err(Error::Config { path: source.describe("model_index.json"), message: format!("{enc} without {tok}") });
                }
                encoders.push((ClipTokenizer::load(source, tok).await?, ClipTextModel::load_quantized(gpu, source, enc, quant).await?));
            }
        }
        match encoders.last() {
            Some((_, last)) if last.has_projection() => {}
            _ => {
                return Err(Error::Config {
                    path: source.describe("model_index.json"),
                    message: "SDXL needs text_encoder_2 with a text_projection (CLIPTextModelWithProjection)".into(),
                })
            }
        }
        Ok(PromptEncoder { encoders, force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt })
    }

    /// Token ids per encoder, as diffusers' tokenizers produce them.
    pub fn tokenize(&self, text: &str) -> Result<Vec<Vec<u32>>> {
        self.encoders.iter().map(|(tokenizer, _)| tokenizer.encode(text)).collect()
    }

    fn encode_one(&self, gpu: &Gpu, text: &str) -> Result<Encoded> {
        let mut hidden: Option<Tensor> = None;
        let mut pooled = None;
        for ((_, encoder), ids) in self.encoders.iter().zip(self.tokenize(text)?) {
            let out = encoder.forward(gpu, &ids, 0)?;
            hidden = Some(match hidden {
                Some(h) => gpu.concat(&h, &out.hidden, 2)?,
                None => out.hidden,
            });
            pooled = out.pooled.or(pooled);
        }
        Ok(Encoded { hidden: hidden.expect("at least one encoder"), pooled: pooled.expect("last encoder has a projection") })
    }

    /// `negative: None` is diffusers' `negative_prompt=None`; `Some("")` encodes the empty string.
    pub fn encode(&self, gpu: &Gpu, prompt: &str, negative: Option<&str>) -> Result<PromptEmbeds> {
        let positive = self.encode_one(gpu, prompt)?;
        let negative = match negative {
            None if self.force_zeros_for_empty_prompt => Encoded {
                hidden: gpu.zeros(positive.hidden.shape())?,
                pooled: gpu.zeros(positive.pooled.shape())?,
            },
            other => self.encode_one(gpu, other.unwrap_or(""))?,
        };
        Ok(PromptEmbeds {
            prompt_embeds: positive.hidden,
            pooled_prompt_embeds: positive.pooled,
            negative_prompt_embeds: negative.hidden,
            negative_pooled_prompt_embeds: negative.pooled,
        })
    }
}
