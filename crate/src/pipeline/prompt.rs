//! Prompt encoding exactly as diffusers' `StableDiffusionXLPipeline.encode_prompt`: each present
//! text encoder's penultimate hidden states concatenated along the width, the pooled projection
//! of the last encoder, and the same for the negative prompt — or zeros when no negative prompt is
//! given and the model sets `force_zeros_for_empty_prompt`. With [`PromptOptions`] on, prompts are
//! encoded as diffusers' community pipeline `lpw_stable_diffusion_xl.py` does instead (see `lpw.rs`).

use std::collections::BTreeMap;

use crate::adapt::Layers;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::pipeline::lpw::{WeightedTokens, WINDOW};
use crate::pipeline::ModelIndex;
use crate::quant::QuantPolicy;
use crate::tokenizer::ClipTokenizer;
use crate::weights::{ModelSource, Source, Vars};

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

/// How a prompt is read. Both off (the default) is diffusers' `encode_prompt`, which keeps the
/// first 75 tokens. Either on switches to lpw_stable_diffusion_xl's `get_weighted_text_embeddings_sdxl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptOptions {
    /// Encode every 75 tokens as a window of its own and concatenate the windows' hidden states
    /// (the prompt and the negative get the same number); off keeps the first window only.
    pub long_prompt: bool,
    /// Read A1111's `(word:1.2)`, `(word)`, `[word]` weights; off reads brackets literally.
    pub weighting: bool,
}

/// One encoded text: concatenated hidden states and the pooled projection.
struct Encoded {
    hidden: Tensor,
    pooled: Tensor,
}

impl PromptEncoder {
    /// Loads the text encoders and tokenizers that `model_index.json` declares, the encoders'
    /// weight matrices quantized as `policy` says, their layers registered for LoRAs in `layers`.
    pub async fn load(gpu: &Gpu, model: &ModelSource<'_>, index: &ModelIndex, policy: &QuantPolicy, layers: &BTreeMap<&'static str, Layers>) -> Result<PromptEncoder> {
        let files = &model.files;
        let mut encoders = Vec::new();
        for (tok, enc) in [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")] {
            if index.has(enc) {
                if !index.has(tok) {
                    return Err(Error::Config { path: files.describe("model_index.json"), message: format!("{enc} without {tok}") });
                }
                let (config, tensors) = model.component::<ClipTextConfig>(enc).await?;
                let mut vars = Vars::new(gpu, &*tensors, enc, policy);
                if let Some(layers) = layers.get(enc) {
                    vars = vars.with_layers(layers);
                }
                let encoder = ClipTextModel::load(&vars, config).await.map_err(model.config_error(enc))?;
                encoders.push((ClipTokenizer::load(files, tok).await?, encoder));
            }
        }
        match encoders.last() {
            Some((_, last)) if last.has_projection() => {}
            _ => {
                return Err(Error::Config {
                    path: files.describe("model_index.json"),
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
        Ok(embeds(positive, negative))
    }

    /// [`encode`](Self::encode) with `options`. Off, it is `encode`; on, as lpw: no negative is
    /// the empty string (never zeros), the prompt and the negative are padded with eos to the
    /// same token count, each 75-token window is encoded as `bos + tokens + eos` (the last window
    /// unpadded, so the context has `77 * (windows - 1) + last + 2` tokens), a weight `w != 1` moves
    /// its token's hidden state to `eos + (h - eos) * w` (eos: the window's last row), and the
    /// pooled embedding is the last window's. The base applies the first tokenizer's weights to
    /// both encoders' states (as lpw), so both tokenizers must give the same token count.
    pub fn encode_with(&self, gpu: &Gpu, prompt: &str, negative: Option<&str>, options: PromptOptions) -> Result<PromptEmbeds> {
        if options == PromptOptions::default() {
            return self.encode(gpu, prompt, negative);
        }
        let tokenize = |text: &str| self.encoders.iter().map(|(t, _)| WeightedTokens::new(t, text, options.weighting)).collect::<Result<Vec<_>>>();
        // [prompt, negative][encoder] token lists, padded and cut as lpw does before windowing.
        let mut tokens = [tokenize(prompt)?, tokenize(negative.unwrap_or(""))?];
        let mut lengths = Vec::with_capacity(self.encoders.len());
        for (e, (tokenizer, _)) in self.encoders.iter().enumerate() {
            let mut len = tokens[0][e].ids.len().max(tokens[1][e].ids.len());
            if !options.long_prompt {
                len = len.min(WINDOW);
            }
            for text in tokens.iter_mut() {
                text[e].pad_to(len, tokenizer.eos_id);
                text[e].truncate(len);
            }
            lengths.push(len);
        }
        if lengths.iter().any(|&n| n != lengths[0]) {
            return Err(Error::InvalidParameter(format!(
                "the prompt and negative prompt give {lengths:?} tokens with the two tokenizers (runs of '!' tokenize differently); \
                 long-prompt/weighted encoding needs equal counts"
            )));
        }
        if lengths[0] == 0 {
            return Err(Error::InvalidParameter("the prompt and the negative prompt are both empty: long-prompt/weighted encoding needs at least one token".into()));
        }
        Ok(embeds(self.encode_windows(gpu, &tokens[0])?, self.encode_windows(gpu, &tokens[1])?))
    }

    /// Encodes one text's windows with every encoder, weights them with the first tokenizer's
    /// weights, concatenates them along the tokens; the pooled output is the last window's.
    fn encode_windows(&self, gpu: &Gpu, tokens: &[WeightedTokens]) -> Result<Encoded> {
        let windows = self
            .encoders
            .iter()
            .zip(tokens)
            .map(|((tokenizer, _), t)| t.windows(tokenizer.bos_id, tokenizer.eos_id))
            .collect::<Result<Vec<_>>>()?;
        let mut hidden: Option<Tensor> = None;
        let mut pooled = None;
        for w in 0..windows[0].len() {
            let mut window: Option<Tensor> = None;
            for ((_, encoder), per_encoder) in self.encoders.iter().zip(&windows) {
                let out = encoder.forward(gpu, &per_encoder[w].0, 0)?;
                window = Some(match window {
                    Some(h) => gpu.concat(&h, &out.hidden, 2)?,
                    None => out.hidden,
                });
                pooled = out.pooled.or(pooled);
            }
            let window = apply_weights(gpu, &window.expect("at least one encoder"), &windows[0][w].1)?;
            hidden = Some(match hidden {
                Some(h) => gpu.concat(&h, &window, 1)?,
                None => window,
            });
        }
        Ok(Encoded { hidden: hidden.expect("at least one window"), pooled: pooled.expect("last encoder has a projection") })
    }
}

/// lpw's emphasis on one window [1, tokens, width]: row j becomes `last + (row_j - last) * w_j`
/// where `w_j != 1`, with `last` the window's final (eos) row; rows of weight 1 are copied as they
/// are. Runs of equal weight are done together.
fn apply_weights(gpu: &Gpu, window: &Tensor, weights: &[f32]) -> Result<Tensor> {
    let (tokens, width) = match window.shape() {
        &[1, t, w] if t == weights.len() => (t, w),
        s => return Err(Error::InvalidParameter(format!("prompt weights: {} weights for hidden states {s:?}", weights.len()))),
    };
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(window.clone());
    }
    let rows = window.reshape(&[tokens, width])?;
    let last = gpu.narrow(&rows, tokens - 1, 1)?.reshape(&[width])?;
    let minus_last = gpu.scale(&last, -1.0)?;
    let mut out: Option<Tensor> = None;
    let mut start = 0;
    while start < tokens {
        let weight = weights[start];
        let end = (start..tokens).find(|&j| weights[j] != weight).unwrap_or(tokens);
        let mut run = gpu.narrow(&rows, start, end - start)?;
        if weight != 1.0 {
            run = gpu.add(&gpu.scale(&gpu.add(&run, &minus_last)?, weight)?, &last)?;
        }
        out = Some(match out {
            Some(o) => gpu.concat(&o, &run, 0)?,
            None => run,
        });
        start = end;
    }
    out.expect("tokens > 0").reshape(&[1, tokens, width])
}

fn embeds(positive: Encoded, negative: Encoded) -> PromptEmbeds {
    PromptEmbeds {
        prompt_embeds: positive.hidden,
        pooled_prompt_embeds: positive.pooled,
        negative_prompt_embeds: negative.hidden,
        negative_pooled_prompt_embeds: negative.pooled,
    }
}
