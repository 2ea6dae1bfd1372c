//! Configs for single-file checkpoints, which carry none: SDXL 1.0's own files (shipped in the
//! crate, crate/configs/) with every field a file's tensors determine read from their names and
//! shapes, as stable-diffusion.cpp and diffusers' `from_single_file` do.
//!
//! From the tensors: the UNet's levels (channels, resnets, which have attention and how many
//! transformer blocks, up and down), input/output channels and kernels, cross-attention width,
//! linear or 1x1-conv projections, time and micro-conditioning widths; the VAE's levels, resnets,
//! latent channels and mid attention; each text encoder's width, depth, MLP width, vocabulary,
//! positions and projection. What no tensor shows comes from SDXL: 64-wide attention heads (SGM's
//! `num_head_channels`), 32 norm groups, activations, epsilons, the VAE's scaling factor and
//! `force_upcast`, the scheduler and the tokenizers. A file whose widths break those (channels
//! not whole 64-wide heads or 32 groups) is refused with a pointer to `--config`.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;

use serde_json::{json, Value};

use super::names::{Entry, Kind};
use super::MemorySource;
use crate::error::{Error, Result};

/// A shipped model's small files (crate/configs/`$dir`/`$path`), by path.
macro_rules! shipped {
    ($dir:literal: $($path:literal),+) => {
        [$(($path, include_str!(concat!("../../configs/", $dir, "/", $path)))),+]
    };
}

/// SDXL 1.0 base's small files, by path.
const BASE: [(&str, &str); 10] = shipped!("sdxl-base":
    "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
    "text_encoder/config.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "text_encoder_2/config.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json"
);

/// SDXL 1.0 refiner's small files, by path.
const REFINER: [(&str, &str); 7] = shipped!("sdxl-refiner":
    "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
    "text_encoder_2/config.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json"
);

/// The CLIP BPE merges both SDXL tokenizers use (openai/clip-vit-large-patch14's merges.txt).
const MERGES: &str = include_str!("../../configs/clip/merges.txt");

/// SGM's attention head width and GroupNorm group count for every SDXL model.
const HEAD_WIDTH: usize = 64;
const GROUPS: usize = 32;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";

/// SDXL 1.0's small files for `kind`: model_index.json, configs, the scheduler, and both
/// tokenizers' files (vocab.json built from the shipped merges).
pub fn sdxl_files(kind: Kind) -> MemorySource {
    let mut files = MemorySource::default();
    let list = shipped_files(kind);
    for (path, text) in list {
        files.insert(path, text.as_bytes().to_vec());
    }
    let vocab = clip_vocab(MERGES);
    for tokenizer in list.iter().filter_map(|(p, _)| p.strip_suffix("/tokenizer_config.json")) {
        files.insert(&format!("{tokenizer}/merges.txt"), MERGES.as_bytes().to_vec());
        files.insert(&format!("{tokenizer}/vocab.json"), vocab.clone());
    }
    files
}

/// vocab.json of a CLIP BPE from its merges.txt, as CLIP's SimpleTokenizer builds it: the 256
/// byte symbols (GPT-2's byte-to-unicode order), the same with `</w>`, each merge, then
/// `<|startoftext|>` and `<|endoftext|>`.
pub fn clip_vocab(merges: &str) -> Vec<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut symbols: Vec<char> = (0..256u32).filter(|&b| printable(b)).filter_map(char::from_u32).collect();
    symbols.extend((0..256u32).filter(|&b| !printable(b)).enumerate().filter_map(|(n, _)| char::from_u32(256 + n as u32)));
    let mut vocab: Vec<String> = symbols.iter().map(char::to_string).collect();
    vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.lines().skip_while(|l| l.starts_with("#version")).filter(|l| !l.trim().is_empty()).map(|l| l.replacen(' ', "", 1)));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let map: serde_json::Map<String, Value> = vocab.into_iter().enumerate().map(|(i, token)| (token, json!(i))).collect();
    serde_json::to_vec(&map).expect("a vocabulary always serialises")
}

/// Shapes of a file's tensors by their own names.
pub type Shapes<'n> = HashMap<&'n str, &'n [usize]>;

fn shipped_files(kind: Kind) -> &'static [(&'static str, &'static str)] {
    match kind {
        Kind::Base => &BASE,
        Kind::Refiner => &REFINER,
    }
}

fn base_config(kind: Kind, path: &str) -> Value {
    let text = shipped_files(kind).iter().find(|(p, _)| *p == path).map_or("{}", |(_, t)| *t);
    serde_json::from_str(text).expect("the shipped configs are JSON")
}

struct Reader<'a, 'n> {
    location: &'a str,
    shapes: &'a Shapes<'n>,
    prefix: &'static str,
    /// The names under `prefix`, sorted: [`Reader::indices`] reads only the range of its stem
    /// (a scan of every name per block made inference quadratic: 20k blocks took 15 s).
    sorted: BTreeSet<&'n str>,
}

impl<'a, 'n> Reader<'a, 'n> {
    fn new(location: &'a str, shapes: &'a Shapes<'n>, prefix: &'static str) -> Reader<'a, 'n> {
        let sorted = shapes.keys().copied().filter(|n| n.starts_with(prefix)).collect();
        Reader { location, shapes, prefix, sorted }
    }

    fn error(&self, message: String) -> Error {
        Error::Tensor { path: self.location.to_string(), tensor: format!("{}*", self.prefix), message }
    }

    fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes.get(format!("{}{name}", self.prefix).as_str()).copied().ok_or_else(|| self.error(format!("missing {}{name}, which the config is read from", self.prefix)))
    }

    fn dim(&self, name: &str, i: usize) -> Result<usize> {
        let shape = self.shape(name)?;
        shape.get(i).copied().ok_or_else(|| self.error(format!("{}{name} has shape {shape:?}", self.prefix)))
    }

    fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(format!("{}{name}", self.prefix).as_str())
    }

    /// The indices i of names `{prefix}{stem}{i}.…`, sorted.
    fn indices(&self, stem: &str) -> BTreeSet<usize> {
        let stem = format!("{}{stem}", self.prefix);
        let names = self.sorted.range::<str, _>((Bound::Included(stem.as_str()), Bound::Unbounded)).take_while(|n| n.starts_with(stem.as_str()));
        names.filter_map(|n| n[stem.len()..].split('.').next()?.parse().ok()).collect()
    }

    /// Channels that must be whole 64-wide heads and 32 groups.
    fn sdxl_width(&self, what: &str, channels: usize) -> Result<usize> {
        if channels == 0 || !channels.is_multiple_of(HEAD_WIDTH) || !channels.is_multiple_of(GROUPS) {
            return Err(self.error(format!(
                "{what} has {channels} channels, not whole {HEAD_WIDTH}-wide attention heads and {GROUPS} norm groups as in SDXL: \
                 its config cannot be inferred; give the model's diffusers config folder with --config"
            )));
        }
        Ok(channels / HEAD_WIDTH)
    }
}

/// One level of the UNet's down path as its tensors show it.
#[derive(Debug, Default)]
struct Level {
    channels: usize,
    resnets: usize,
    /// Transformer blocks after each resnet (empty: no attention).
    depths: Vec<usize>,
}

/// unet/config.json of a single file's UNet (SGM names in `shapes`); `pooled` is the width of the
/// pooled text embedding (text_encoder_2's projection), from which the micro-conditioning widths follow.
pub fn unet_config(location: &str, kind: Kind, shapes: &Shapes, pooled: usize) -> Result<Value> {
    let r = Reader::new(location, shapes, UNET);
    let conv_in = r.shape("input_blocks.0.0.weight")?.to_vec();
    let &[first, in_channels, kernel, ..] = conv_in.as_slice() else {
        return Err(r.error(format!("input_blocks.0.0.weight has shape {conv_in:?}")));
    };
    let depth = |stem: String| r.indices(&format!("{stem}.1.transformer_blocks.")).len();
    let mut levels = vec![Level::default()];
    for i in r.indices("input_blocks.").into_iter().filter(|&i| i >= 1) {
        if r.has(&format!("input_blocks.{i}.0.op.weight")) {
            levels.push(Level::default());
            continue;
        }
        let level = levels.last_mut().expect("one level at least");
        level.channels = r.dim(&format!("input_blocks.{i}.0.out_layers.3.weight"), 0)?;
        level.resnets += 1;
        let d = depth(format!("input_blocks.{i}"));
        if d > 0 {
            level.depths.push(d);
        }
    }
    if levels.iter().any(|l| l.resnets == 0 || (!l.depths.is_empty() && l.depths.len() != l.resnets)) {
        return Err(r.error("the down path's levels are not whole resnet (+ transformer) blocks".into()));
    }
    let heads: Vec<usize> = levels.iter().enumerate().map(|(i, l)| r.sdxl_width(&format!("down level {i}"), l.channels)).collect::<Result<_>>()?;
    let mid = r.indices("middle_block.1.transformer_blocks.").len();
    let attention: Vec<usize> = levels.iter().filter_map(|l| l.depths.first().copied()).collect();
    if levels.iter().any(|l| l.depths.iter().any(|&d| d != l.depths[0])) {
        return Err(r.error("transformer depths vary within a level: give the model's config with --config".into()));
    }
    let n = levels.len();
    let uniform = attention.iter().all(|&d| d == mid);
    // Levels without attention take a depth nothing reads, except the last one's, which the mid block reads.
    let depths: Vec<usize> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| l.depths.first().copied().unwrap_or(if uniform || i + 1 == n { mid.max(1) } else { 1 }))
        .collect();
    if depths[n - 1] != mid.max(1) && mid > 0 {
        return Err(r.error(format!("the mid block has {mid} transformer blocks and the last level {}: diffusers' config cannot say so", depths[n - 1])));
    }
    // Up levels mirror the down levels; their transformer depths may differ from the mirror's.
    let mut up: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut up_resnets = vec![0; n];
    let mut level = 0;
    for i in r.indices("output_blocks.") {
        if level >= n {
            return Err(r.error(format!("output_blocks.{i} lies beyond the {n} levels of the down path")));
        }
        up_resnets[level] += 1;
        let d = depth(format!("output_blocks.{i}"));
        if d > 0 {
            up[level].push(d);
        }
        if up_resnets[level] == levels[n - 1 - level].resnets + 1 {
            level += 1;
        }
    }
    if (0..n).any(|l| up_resnets[l] != levels[n - 1 - l].resnets + 1 || (!up[l].is_empty() && up[l].len() != up_resnets[l])) {
        return Err(r.error("the up path does not mirror the down path (one resnet more per level)".into()));
    }
    let mirrored = (0..n).all(|l| up[l].iter().all(|&d| d == depths[n - 1 - l]));
    let block = |attn: bool, down: bool| match (attn, down) {
        (true, true) => "CrossAttnDownBlock2D",
        (false, true) => "DownBlock2D",
        (true, false) => "CrossAttnUpBlock2D",
        (false, false) => "UpBlock2D",
    };
    let cross = levels.iter().position(|l| !l.depths.is_empty()).map(|i| {
        let index = 1 + (0..i).map(|l| levels[l].resnets + 1).sum::<usize>();
        r.dim(&format!("input_blocks.{index}.1.transformer_blocks.0.attn2.to_k.weight"), 1)
    });
    let add_in = r.dim("label_emb.0.0.weight", 1)?;
    let ids = if kind == Kind::Base { 6 } else { 5 };
    let time_dim = add_in.checked_sub(pooled).filter(|t| t % ids == 0).map(|t| t / ids).ok_or_else(|| {
        r.error(format!("label_emb takes {add_in} inputs, not the {pooled}-wide pooled text embedding plus {ids} time ids"))
    })?;
    let temb = r.dim("time_embed.0.weight", 0)?;
    let out = r.shape("out.2.weight")?.to_vec();
    let first_projection = levels.iter().position(|l| !l.depths.is_empty()).map(|i| 1 + (0..i).map(|l| levels[l].resnets + 1).sum::<usize>());

    let mut c = base_config(kind, "unet/config.json");
    let channels: Vec<usize> = levels.iter().map(|l| l.channels).collect();
    if channels[0] != first {
        return Err(r.error(format!("conv_in has {first} outputs, the first level {} channels", channels[0])));
    }
    c["in_channels"] = json!(in_channels);
    c["conv_in_kernel"] = json!(kernel);
    c["out_channels"] = json!(out.first().copied().unwrap_or(4));
    c["conv_out_kernel"] = json!(out.get(2).copied().unwrap_or(3));
    c["block_out_channels"] = json!(channels);
    let resnets: Vec<usize> = levels.iter().map(|l| l.resnets).collect();
    c["layers_per_block"] = if resnets.iter().all(|&x| x == resnets[0]) { json!(resnets[0]) } else { json!(resnets) };
    c["attention_head_dim"] = json!(heads);
    c["down_block_types"] = json!(levels.iter().map(|l| block(!l.depths.is_empty(), true)).collect::<Vec<_>>());
    c["up_block_types"] = json!((0..n).map(|l| block(!up[l].is_empty(), false)).collect::<Vec<_>>());
    c["transformer_layers_per_block"] = if depths.iter().all(|&d| d == depths[0]) { json!(depths[0]) } else { json!(depths) };
    c["reverse_transformer_layers_per_block"] = match mirrored {
        true => Value::Null,
        false => json!((0..n).map(|l| up[l].first().copied().unwrap_or(1)).collect::<Vec<_>>()),
    };
    c["mid_block_type"] = if mid > 0 { json!("UNetMidBlock2DCrossAttn") } else { Value::Null };
    if let Some(cross) = cross {
        c["cross_attention_dim"] = json!(cross?);
    }
    if let Some(index) = first_projection {
        c["use_linear_projection"] = json!(r.shape(&format!("input_blocks.{index}.1.proj_in.weight"))?.len() == 2);
    }
    c["addition_time_embed_dim"] = json!(time_dim);
    c["projection_class_embeddings_input_dim"] = json!(add_in);
    c["time_embedding_dim"] = if first.checked_mul(4) == Some(temb) { Value::Null } else { json!(temb) };
    Ok(c)
}

/// vae/config.json of a single file's VAE (SGM names in `shapes`).
pub fn vae_config(location: &str, kind: Kind, shapes: &Shapes) -> Result<Value> {
    let r = Reader::new(location, shapes, VAE);
    let levels = r.indices("encoder.down.");
    let channels: Vec<usize> = levels.iter().map(|i| r.dim(&format!("encoder.down.{i}.block.0.conv2.weight"), 0)).collect::<Result<_>>()?;
    if channels.is_empty() || levels.iter().enumerate().any(|(k, &i)| k != i) {
        return Err(r.error("the encoder's levels are not numbered 0, 1, …".into()));
    }
    for (i, &ch) in channels.iter().enumerate() {
        if ch == 0 || !ch.is_multiple_of(GROUPS) {
            return Err(r.error(format!("encoder level {i} has {ch} channels, not whole {GROUPS} norm groups as in SDXL: give --config")));
        }
    }
    let mut c = base_config(kind, "vae/config.json");
    c["in_channels"] = json!(r.dim("encoder.conv_in.weight", 1)?);
    c["out_channels"] = json!(r.dim("decoder.conv_out.weight", 0)?);
    c["latent_channels"] = json!(r.dim("decoder.conv_in.weight", 1)?);
    c["block_out_channels"] = json!(channels);
    c["layers_per_block"] = json!(r.indices("encoder.down.0.block.").len());
    c["down_block_types"] = json!(vec!["DownEncoderBlock2D"; channels.len()]);
    c["up_block_types"] = json!(vec!["UpDecoderBlock2D"; channels.len()]);
    c["mid_block_add_attention"] = json!(r.has("encoder.mid.attn_1.q.weight"));
    c["use_quant_conv"] = json!(r.has("quant_conv.weight"));
    c["use_post_quant_conv"] = json!(r.has("post_quant_conv.weight"));
    Ok(c)
}

/// config.json of a text encoder from its tensors under diffusers' names.
pub fn text_config(location: &str, kind: Kind, component: &str, tensors: &HashMap<String, Entry>) -> Result<Value> {
    let shapes: Shapes = tensors.iter().map(|(n, e)| (n.as_str(), e.shape.as_slice())).collect();
    let r = Reader::new(location, &shapes, "");
    let err = |e: Error| match e {
        Error::Tensor { path, tensor, message } => Error::Tensor { path, tensor: format!("{component}/{tensor}"), message },
        e => e,
    };
    let [vocab, hidden] = [0, 1].map(|i| r.dim("text_model.embeddings.token_embedding.weight", i));
    let (vocab, hidden) = (vocab.map_err(err)?, hidden.map_err(err)?);
    let heads = r.sdxl_width(component, hidden).map_err(err)?;
    let mut c = base_config(kind, &format!("{component}/config.json"));
    c["vocab_size"] = json!(vocab);
    c["hidden_size"] = json!(hidden);
    c["num_attention_heads"] = json!(heads);
    c["num_hidden_layers"] = json!(r.indices("text_model.encoder.layers.").len());
    c["intermediate_size"] = json!(r.dim("text_model.encoder.layers.0.mlp.fc1.weight", 0).map_err(err)?);
    c["max_position_embeddings"] = json!(r.dim("text_model.embeddings.position_embedding.weight", 0).map_err(err)?);
    if r.has("text_projection.weight") {
        c["projection_dim"] = json!(r.dim("text_projection.weight", 0).map_err(err)?);
    }
    Ok(c)
}

/// The width of the pooled text embedding: text_encoder_2's projection, in SGM's or
/// stable-diffusion.cpp's orientation ([hidden, projection]).
pub fn pooled_width(shapes: &Shapes) -> Option<usize> {
    shapes.iter().find(|(n, s)| n.ends_with("text_projection") && s.len() == 2).map(|(_, s)| s[1])
}
