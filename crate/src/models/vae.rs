//! diffusers' AutoencoderKL (models/autoencoders/autoencoder_kl.py, vae.py), driven by its
//! config.json: an Encoder (DownEncoderBlock2D ×N, a resnet-attention-resnet mid block) to a
//! diagonal Gaussian over the latents, and a Decoder (mid block, UpDecoderBlock2D ×N) back to pixels.

use serde::Deserialize;

use crate::adapt::Slot;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::models::{Conv2d, GroupNorm, Linear};
use crate::quant::Weight;
use crate::weights::Vars;

/// Mirrors diffusers' AutoencoderKL config (defaults as diffusers).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "defaults::channels")]
    pub in_channels: usize,
    #[serde(default = "defaults::channels")]
    pub out_channels: usize,
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "defaults::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: usize,
    /// An int or [height, width]; only used by diffusers' tiled decoding.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "defaults::scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs such a VAE in f32 even in an f16 pipeline (SDXL's VAE overflows f16).
    #[serde(default = "defaults::yes")]
    pub force_upcast: bool,
    #[serde(default = "defaults::yes")]
    pub use_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    pub mid_block_add_attention: bool,
}

mod defaults {
    pub fn channels() -> usize { 3 }
    pub fn down_block_types() -> Vec<String> { vec!["DownEncoderBlock2D".into()] }
    pub fn up_block_types() -> Vec<String> { vec!["UpDecoderBlock2D".into()] }
    pub fn block_out_channels() -> Vec<usize> { vec![64] }
    pub fn layers_per_block() -> usize { 1 }
    pub fn act_fn() -> String { "silu".into() }
    pub fn latent_channels() -> usize { 4 }
    pub fn norm_num_groups() -> usize { 32 }
    pub fn scaling_factor() -> f64 { 0.18215 }
    pub fn yes() -> bool { true }
}

/// Encoder and Decoder norms and resnets use eps 1e-6 (fixed in diffusers' vae.py).
const EPS: f64 = 1e-6;

/// diffusers' `Attention` as built by UNetMidBlock2D for the VAE: group norm, one head over all
/// channels, q/k/v/out projections with bias, tokens = H*W, residual connection.
struct MidAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl MidAttention {
    async fn load(vb: &Vars<'_>, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints from before diffusers 0.14 name the projections query/key/value/proj_attn
        // (diffusers converts them on load).
        let names = if vb.contains("query.weight") { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        let mut linears = Vec::with_capacity(4);
        for name in names {
            linears.push(Linear::load(&vb.pp(name), channels, channels, true).await?);
        }
        let [q, k, v, out] = <[Linear; 4]>::try_from(linears).ok().expect("four projections");
        let group_norm = GroupNorm::load(&vb.pp("group_norm"), channels, groups, EPS).await?;
        Ok(MidAttention { group_norm, q, k, v, out })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else { unreachable!("checked by the resnet before") };
        let n = self.group_norm.forward(gpu, x, false)?;
        let tokens = gpu.transpose(&n.reshape(&[b, c, h * w])?)?;
        let (q, k, v) = (self.q.forward(gpu, &tokens)?, self.k.forward(gpu, &tokens)?, self.v.forward(gpu, &tokens)?);
        let a = self.out.forward(gpu, &gpu.attention(&q, &k, &v, 1, false)?)?;
        gpu.add(x, &gpu.transpose(&a)?.reshape(&[b, c, h, w])?)
    }
}

/// UNetMidBlock2D without time embedding: resnet, (attention, resnet).
struct MidBlock {
    first: ResnetBlock2D,
    attention: Option<MidAttention>,
    second: ResnetBlock2D,
}

impl MidBlock {
    async fn load(vb: &Vars<'_>, channels: usize, groups: usize, attention: bool) -> Result<Self> {
        let first = ResnetBlock2D::load(&vb.pp("resnets.0"), channels, channels, None, groups, EPS).await?;
        let attention = match attention {
            true => Some(MidAttention::load(&vb.pp("attentions.0"), channels, groups).await?),
            false => None,
        };
        let second = ResnetBlock2D::load(&vb.pp("resnets.1"), channels, channels, None, groups, EPS).await?;
        Ok(MidBlock { first, attention, second })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut x = self.first.forward(gpu, x, None)?;
        if let Some(attention) = &self.attention {
            x = attention.forward(gpu, &x)?;
        }
        self.second.forward(gpu, &x, None)
    }
}

/// DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resampler.
struct Block<R> {
    resnets: Vec<ResnetBlock2D>,
    resample: Option<R>,
}

/// Overlapping tiles along one axis of `size` latents: tiles of `len` starting every `len -
/// overlap`, the last one flush with the end (overlapping its neighbour by more).
struct Tiling {
    starts: Vec<usize>,
    len: usize,
}

impl Tiling {
    fn new(size: usize, tile: usize, overlap: usize) -> Tiling {
        let len = tile.min(size);
        let mut starts: Vec<usize> = (0..size - len).step_by(tile - overlap).collect();
        starts.push(size - len);
        Tiling { starts, len }
    }

    /// Latents tile i shares with the tile before it.
    fn overlap_before(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.starts[i - 1] + self.len - self.starts[i] }
    }

    /// How tile i blends into the one before it, in pixels (`f` per latent): (skip, ramp) for
    /// `Gpu::paste`, the ramp over the middle half of the overlap, away from both tiles' edges
    /// (which saw zero padding instead of their neighbours).
    fn blend(&self, i: usize, f: usize) -> (usize, usize) {
        let o = self.overlap_before(i) * f;
        (o / 4, o / 2)
    }

    /// The part of tile i that counts towards whole-image statistics (each latent in exactly one
    /// tile: overlaps split at their middle), as fractions of the tile.
    fn share(&self, i: usize) -> (f32, f32) {
        let start = self.starts[i] + self.overlap_before(i) / 2;
        let end = match self.starts.get(i + 1) {
            Some(_) => self.starts[i] + self.len - self.overlap_before(i + 1).div_ceil(2),
            None => self.starts[i] + self.len,
        };
        let f = |v: usize| (v - self.starts[i]) as f32 / self.len as f32;
        (f(start), f(end))
    }
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    /// The float type of its weights and activations (see `load`).
    dtype: DType,
    // Encoder
    enc_conv_in: Conv2d,
    enc_blocks: Vec<Block<Downsample2D>>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    /// Encoder conv_out, applied whole when a quant_conv follows, else split as `moments`.
    enc_conv_out: Option<Conv2d>,
    /// The last convolution producing [mean; logvar], split by output channel into two.
    moments: [Conv2d; 2],
    // Decoder
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_blocks: Vec<Block<Upsample2D>>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl AutoencoderKL {
    /// Builds the VAE `config` describes from the weights of `vb` (a config this engine does not
    /// implement is [`Error::Config`]).
    ///
    /// A VAE whose config says `force_upcast` (the official SDXL VAE) computes in f32 even on an
    /// f16 device, as diffusers' pipelines upcast it: its up blocks produce activations beyond
    /// f16's 65504, which become infinities and then NaN through the next group norm (black
    /// images). Upcasting up front rather than decoding in f16, checking for non-finite values and
    /// decoding again: for that VAE the f16 decode fails on most images, so a fallback would cost
    /// a second decode (and f32 weights held besides the f16 ones) nearly every time. A VAE with
    /// `force_upcast: false` (madebyollin/sdxl-vae-fp16-fix, fine-tuned to stay in range) keeps
    /// the device's type: half the memory and bandwidth. Inputs and outputs are converted at the
    /// boundary: every method takes and returns tensors of the device's working type.
    pub async fn load(vb: &Vars<'_>, config: VaeConfig) -> Result<AutoencoderKL> {
        check_config(&config).map_err(|message| Error::Config { path: "vae/config.json".into(), message })?;
        let dtype = if config.force_upcast { DType::F32 } else { vb.gpu().dtype };
        let w = vb.clone().with_dtype(dtype);
        let c = &config;
        let (groups, boc, lpb, latent) = (c.norm_num_groups, &c.block_out_channels, c.layers_per_block, c.latent_channels);
        let last = *boc.last().expect("checked");
        let conv = |name: &'static str, cin: usize, cout: usize, k: usize| {
            let w = w.pp(name);
            async move { Conv2d::load(&w, cin, cout, k, 1, k / 2).await }
        };

        // Encoder.
        let enc_conv_in = conv("encoder.conv_in", c.in_channels, boc[0], 3).await?;
        let mut enc_blocks = Vec::with_capacity(boc.len());
        let mut channels = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let p = w.pp(format!("encoder.down_blocks.{i}"));
            let mut resnets = Vec::with_capacity(lpb);
            for j in 0..lpb {
                let cin = if j == 0 { channels } else { out };
                resnets.push(ResnetBlock2D::load(&p.pp(format!("resnets.{j}")), cin, out, None, groups, EPS).await?);
            }
            let resample = match i + 1 < boc.len() {
                true => Some(Downsample2D::load(&p.pp("downsamplers.0"), out, 0).await?),
                false => None,
            };
            enc_blocks.push(Block { resnets, resample });
            channels = out;
        }
        let enc_mid = MidBlock::load(&w.pp("encoder.mid_block"), last, groups, c.mid_block_add_attention).await?;
        let enc_norm_out = GroupNorm::load(&w.pp("encoder.conv_norm_out"), last, groups, EPS).await?;
        let (enc_conv_out, split_name, split_in, split_k) = match c.use_quant_conv {
            true => (Some(conv("encoder.conv_out", last, 2 * latent, 3).await?), "quant_conv", 2 * latent, 1),
            false => (None, "encoder.conv_out", last, 3),
        };
        let moments = split_conv(&w.pp(split_name), split_in, latent, split_k).await?;

        // Decoder.
        let post_quant_conv = match c.use_post_quant_conv {
            true => Some(conv("post_quant_conv", latent, latent, 1).await?),
            false => None,
        };
        let dec_conv_in = conv("decoder.conv_in", latent, last, 3).await?;
        let dec_mid = MidBlock::load(&w.pp("decoder.mid_block"), last, groups, c.mid_block_add_attention).await?;
        let mut dec_blocks = Vec::with_capacity(boc.len());
        let mut channels = last;
        for (i, &out) in boc.iter().rev().enumerate() {
            let p = w.pp(format!("decoder.up_blocks.{i}"));
            let mut resnets = Vec::with_capacity(lpb + 1);
            for j in 0..=lpb {
                let cin = if j == 0 { channels } else { out };
                resnets.push(ResnetBlock2D::load(&p.pp(format!("resnets.{j}")), cin, out, None, groups, EPS).await?);
            }
            let resample = match i + 1 < boc.len() {
                true => Some(Upsample2D::load(&p.pp("upsamplers.0"), out).await?),
                false => None,
            };
            dec_blocks.push(Block { resnets, resample });
            channels = out;
        }
        let dec_norm_out = GroupNorm::load(&w.pp("decoder.conv_norm_out"), boc[0], groups, EPS).await?;
        let dec_conv_out = conv("decoder.conv_out", boc[0], c.out_channels, 3).await?;
        Ok(AutoencoderKL {
            config,
            dtype,
            enc_conv_in,
            enc_blocks,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            moments,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_blocks,
            dec_norm_out,
            dec_conv_out,
        })
    }

    /// The float type it computes in: f32 when the config says `force_upcast`, else the device's.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Total down-sampling factor between pixels and latents (8 for SDXL).
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    fn check_input(&self, x: &Tensor, channels: usize, what: &str) -> Result<()> {
        match x.shape() {
            &[b, c, h, w] if c == channels && b > 0 && h > 0 && w > 0 => Ok(()),
            s => Err(Error::InvalidParameter(format!("VAE {what}: expected [batch, {channels}, height, width], got {s:?}"))),
        }
    }

    /// `vae.decode(z).sample`: latents already divided by the scaling factor -> raw decoder output
    /// [B, out_channels, H·f, W·f] (about -1..1, unclamped).
    pub fn decode_raw(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        self.check_input(z, self.config.latent_channels, "decode input (latents)")?;
        let z = gpu.cast(z, self.dtype)?;
        gpu.cast(&self.decode_up(gpu, &self.decode_mid(gpu, &z)?)?, gpu.dtype)
    }

    /// Latents of any float type, divided by the scaling factor in the VAE's type (SDXL's 1 /
    /// 0.13025 could take large f16 latents out of f16's range).
    fn unscaled(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        gpu.scale(&gpu.cast(latents, self.dtype)?, (1.0 / self.config.scaling_factor) as f32)
    }

    /// diffusers' image post-processing, (x / 2 + 0.5).clamp(0, 1), in the device's working type.
    fn postprocess(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        gpu.cast(&gpu.affine(x, 0.5, 0.5, false, (0.0, 1.0))?, gpu.dtype)
    }

    /// The decoder up to its mid block, at latent resolution.
    fn decode_mid(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let x = match &self.post_quant_conv {
            Some(conv) => conv.forward(gpu, z)?,
            None => z.clone(),
        };
        self.dec_mid.forward(gpu, &self.dec_conv_in.forward(gpu, &x)?)
    }

    /// The decoder's up blocks and output layers: mid-block activations -> raw image.
    fn decode_up(&self, gpu: &Gpu, mid: &Tensor) -> Result<Tensor> {
        let mut x = mid.clone();
        for block in &self.dec_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(gpu, &x, None)?;
            }
            if let Some(up) = &block.resample {
                x = up.forward(gpu, &x, None)?;
            }
        }
        let x = self.dec_norm_out.forward(gpu, &x, true)?;
        self.dec_conv_out.forward(gpu, &x)
    }

    /// What diffusers' SDXL pipeline makes of denoised latents [B, latent_channels, h, w]:
    /// `vae.decode(latents / scaling_factor).sample`, post-processed as `(x / 2 + 0.5).clamp(0, 1)`
    /// -> image [B, out_channels, h·f, w·f] in 0..1 (f = 8 for SDXL).
    pub fn decode(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents, self.config.latent_channels, "decode input (latents)")?;
        let z = self.unscaled(gpu, latents)?;
        self.postprocess(gpu, &self.decode_up(gpu, &self.decode_mid(gpu, &z)?)?)
    }

    /// `decode` when its largest activation fits in one GPU binding, else `decode_tiled`: the
    /// same image within this adapter's limits (a browser's 128 MiB binding holds SDXL's
    /// full-resolution activations up to about 512², so 1024² images are decoded in tiles).
    pub fn decode_within_limits(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents, self.config.latent_channels, "decode input (latents)")?;
        let (h, w) = (latents.shape()[2], latents.shape()[3]);
        match self.largest_up_activation(h, w) * self.dtype.size() as u64 <= gpu.max_binding_bytes() {
            true => self.decode(gpu, latents),
            false => self.decode_tiled(gpu, latents),
        }
    }

    /// Elements of the largest activation of the decoder's up path for an h × w latent: block i
    /// works at 2^i times the latent size, and its upsampler's output, at twice that, still has
    /// the block's channels (SDXL: 256 channels at full image size, 16384 per latent pixel).
    fn largest_up_activation(&self, h: usize, w: usize) -> u64 {
        let blocks = self.config.block_out_channels.iter().rev().enumerate();
        let n = self.config.block_out_channels.len();
        blocks.map(|(i, &c)| (c * h * w) as u64 * 4u64.pow(i as u32 + (i + 1 < n) as u32)).max().unwrap_or(0)
    }

    /// `decode` in overlapping latent tiles, each decoded alone and blended into the image over
    /// the middle of the overlap: bounded memory at any size. Tiles are the largest whose
    /// activations fit one binding, at most 64 latents (512 px) a side, overlapping by half.
    pub fn decode_tiled(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        let mut tile = 64;
        while tile > 8 && self.largest_up_activation(tile, tile) * self.dtype.size() as u64 > gpu.max_binding_bytes() {
            tile -= 8;
        }
        self.decode_tiles(gpu, latents, tile, tile / 2)
    }

    /// `decode_tiled` with tiles of `tile` latents a side overlapping by `overlap`. The mid block
    /// (latent resolution, where the attention sees every token) runs on the whole latent; only
    /// the up blocks, whose activations grow 64-fold, run tile by tile. Their group norms use the
    /// whole image's statistics, gathered in a first pass over the tiles, so tiles agree in
    /// brightness and contrast rather than only being blended at the seams.
    pub fn decode_tiles(&self, gpu: &Gpu, latents: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        self.check_input(latents, self.config.latent_channels, "decode input (latents)")?;
        if tile == 0 || overlap >= tile {
            return Err(Error::InvalidParameter(format!("VAE tiles of {tile} latents overlapping by {overlap}")));
        }
        let &[b, _, h, w] = latents.shape() else { unreachable!("checked by check_input") };
        let (rows, cols) = (Tiling::new(h, tile, overlap), Tiling::new(w, tile, overlap));
        let tiles: Vec<(usize, usize)> = (0..rows.starts.len()).flat_map(|i| (0..cols.starts.len()).map(move |j| (i, j))).collect();
        if tiles.len() == 1 {
            return self.decode(gpu, latents);
        }
        let mid = self.decode_mid(gpu, &self.unscaled(gpu, latents)?)?;
        let crop = |(i, j): (usize, usize)| gpu.crop(&mid, rows.starts[i], cols.starts[j], rows.len, cols.len);
        let norms: Vec<&GroupNorm> = self.dec_blocks.iter().flat_map(|b| &b.resnets).flat_map(|r| r.norms()).chain([&self.dec_norm_out]).collect();
        let passes = || -> Result<Tensor> {
            norms.iter().for_each(|n| n.record(tiles.len()));
            for (k, &(i, j)) in tiles.iter().enumerate() {
                let (y, x) = (rows.share(i), cols.share(j));
                norms.iter().for_each(|n| n.record_tile(k, [y.0, y.1, x.0, x.1]));
                self.decode_up(gpu, &crop((i, j))?)?;
            }
            for n in &norms {
                n.use_recorded()?;
            }
            let f = self.downscale();
            let image = gpu.zeros_as(&[b, self.config.out_channels, h * f, w * f], self.dtype)?;
            for &(i, j) in &tiles {
                let part = gpu.affine(&self.decode_up(gpu, &crop((i, j))?)?, 0.5, 0.5, false, (0.0, 1.0))?;
                let blend = [rows.blend(i, f), cols.blend(j, f)];
                gpu.paste(&image, &part, rows.starts[i] * f, cols.starts[j] * f, blend)?;
            }
            gpu.cast(&image, gpu.dtype)
        };
        let image = passes();
        norms.iter().for_each(|n| n.use_own());
        image
    }

    /// `vae.encode(image).latent_dist`: image [B, in_channels, H, W] in -1..1 -> (mean, logvar),
    /// each [B, latent_channels, ceil(H/f), ceil(W/f)], logvar clamped to [-30, 20] as diffusers'
    /// DiagonalGaussianDistribution does.
    pub fn encode(&self, gpu: &Gpu, image: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_input(image, self.config.in_channels, "encode input (image)")?;
        let mut x = self.enc_conv_in.forward(gpu, &gpu.cast(image, self.dtype)?)?;
        for block in &self.enc_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(gpu, &x, None)?;
            }
            if let Some(down) = &block.resample {
                x = down.forward(gpu, &x)?;
            }
        }
        x = self.enc_mid.forward(gpu, &x)?;
        x = self.enc_norm_out.forward(gpu, &x, true)?;
        if let Some(conv) = &self.enc_conv_out {
            x = conv.forward(gpu, &x)?;
        }
        let mean = gpu.cast(&self.moments[0].forward(gpu, &x)?, gpu.dtype)?;
        let logvar = gpu.affine(&self.moments[1].forward(gpu, &x)?, 1.0, 0.0, false, (-30.0, 20.0))?;
        Ok((mean, gpu.cast(&logvar, gpu.dtype)?))
    }

    /// The posterior's standard deviation, exp(logvar / 2).
    pub fn std(&self, gpu: &Gpu, logvar: &Tensor) -> Result<Tensor> {
        gpu.affine(logvar, 0.5, 0.0, true, (f32::NEG_INFINITY, f32::INFINITY))
    }

    /// A sample of the posterior, mean + std · noise, scaled for the UNet (× scaling_factor), as
    /// diffusers' img2img `prepare_latents` does with `latent_dist.sample()`.
    pub fn encode_latents(&self, gpu: &Gpu, mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Result<Tensor> {
        if mean.shape() != logvar.shape() || mean.shape() != noise.shape() {
            return Err(Error::InvalidParameter(format!(
                "encode_latents: mean {:?}, logvar {:?} and noise {:?} must have one shape",
                mean.shape(),
                logvar.shape(),
                noise.shape()
            )));
        }
        let sample = gpu.add(mean, &gpu.mul(&self.std(gpu, logvar)?, noise)?)?;
        gpu.scale(&sample, self.config.scaling_factor as f32)
    }
}

fn check_config(c: &VaeConfig) -> std::result::Result<(), String> {
    let n = c.block_out_channels.len();
    if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
        return Err(format!(
            "block_out_channels {:?}, down_block_types {:?} and up_block_types {:?} must have one non-zero length",
            c.block_out_channels, c.down_block_types, c.up_block_types
        ));
    }
    if let Some(t) = c.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
        return Err(format!("unsupported down block type '{t}' (only DownEncoderBlock2D)"));
    }
    if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
        return Err(format!("unsupported up block type '{t}' (only UpDecoderBlock2D)"));
    }
    if c.act_fn != "silu" && c.act_fn != "swish" {
        return Err(format!("unsupported act_fn '{}' (only silu)", c.act_fn));
    }
    if c.layers_per_block == 0 || c.latent_channels == 0 || c.in_channels == 0 || c.out_channels == 0 {
        return Err("layers_per_block, latent_channels, in_channels and out_channels must be positive".into());
    }
    let g = c.norm_num_groups;
    if g == 0 || c.block_out_channels.iter().any(|&ch| ch == 0 || ch % g != 0) {
        return Err(format!("norm_num_groups {g} does not divide block_out_channels {:?}", c.block_out_channels));
    }
    if !(c.scaling_factor.is_finite() && c.scaling_factor != 0.0) {
        return Err(format!("scaling_factor {} must be finite and non-zero", c.scaling_factor));
    }
    if let Some(s) = c.shift_factor {
        return Err(format!("shift_factor {s} is not supported (SDXL's VAE has none)"));
    }
    if c.latents_mean.is_some() || c.latents_std.is_some() {
        return Err("latents_mean / latents_std are not supported (SDXL's VAE has none)".into());
    }
    Ok(())
}

/// Loads the conv of `vb` [2·half, cin, k, k] as two convolutions of `half` output channels each,
/// in the float type of `vb`.
async fn split_conv(vb: &Vars<'_>, cin: usize, half: usize, k: usize) -> Result<[Conv2d; 2]> {
    let weight = vb.host("weight", &[2 * half, cin, k, k]).await?;
    let bias = vb.host("bias", &[2 * half]).await?;
    let (gpu, dtype) = (vb.gpu(), vb.dtype());
    let per = half * cin * k * k;
    let part = |i: usize| -> Result<Conv2d> {
        Ok(Conv2d {
            weight: Weight::Dense(gpu.upload_as(&weight[i * per..(i + 1) * per], &[half, cin, k, k], dtype, "vae moments conv weight")?),
            lora: Slot::default(),
            kernel: k,
            bias: gpu.upload_as(&bias[i * half..(i + 1) * half], &[half], dtype, "vae moments conv bias")?,
            stride: 1,
            padding: [k / 2; 4],
        })
    };
    Ok([part(0)?, part(1)?])
}
