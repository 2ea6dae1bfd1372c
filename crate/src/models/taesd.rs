//! diffusers' AutoencoderTiny decoder (models/autoencoders/autoencoder_tiny.py; vae.py
//! `DecoderTiny`; unet_2d_blocks.py `AutoencoderTinyBlock`): TAESD, madebyollin's distilled
//! stand-in for the VAE's decoder, e.g. TAESD-XL (madebyollin/taesdxl) for SDXL's latents. Plain
//! 3x3 convolutions and ReLUs where the VAE has group norms and attention: a cheap preview decoder.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::models::Conv2d;
use crate::ops::{Activation, Addend};
use crate::quant::QuantPolicy;
use crate::weights::{read_json, safetensors, FileTensors, Source, Vars};

/// Mirrors diffusers' AutoencoderTiny config as far as decoding goes (defaults as diffusers, which
/// are taesdxl's; the encoder's fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct TaesdConfig {
    #[serde(default = "defaults::out_channels")]
    pub out_channels: usize,
    #[serde(default = "defaults::block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "defaults::num_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "defaults::upsample_fn")]
    pub upsample_fn: String,
    #[serde(default = "defaults::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "defaults::upsampling_scaling_factor")]
    pub upsampling_scaling_factor: usize,
    /// The SDXL pipeline divides the UNet's latents by it before decoding (taesdxl: 1.0).
    #[serde(default = "defaults::scaling_factor")]
    pub scaling_factor: f64,
    /// Unused by the SDXL pipeline; refused unless 0 (see `check_config`).
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

mod defaults {
    pub fn out_channels() -> usize { 3 }
    pub fn block_out_channels() -> Vec<usize> { vec![64; 4] }
    pub fn num_decoder_blocks() -> Vec<usize> { vec![3, 3, 3, 1] }
    pub fn act_fn() -> String { "relu".into() }
    pub fn upsample_fn() -> String { "nearest".into() }
    pub fn latent_channels() -> usize { 4 }
    pub fn upsampling_scaling_factor() -> usize { 2 }
    pub fn scaling_factor() -> f64 { 1.0 }
}

impl Default for TaesdConfig {
    /// diffusers' defaults: taesdxl's config (what madebyollin's bare decoder file needs).
    fn default() -> TaesdConfig {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// DecoderTiny's input clamp: tanh(x / 3) · 3 (a constant in diffusers, not `latent_magnitude`).
const LATENT_BOUND: f32 = 3.0;

/// AutoencoderTinyBlock with equal input and output widths (always so in DecoderTiny; the skip is
/// then the identity): relu(conv.4(relu(conv.2(relu(conv.0(x))))) + x).
struct Block {
    convs: [Conv2d; 3],
}

impl Block {
    async fn load(vb: &Vars<'_>, channels: usize) -> Result<Block> {
        let conv = |i: usize| {
            let vb = vb.pp(format!("conv.{i}"));
            async move { Conv2d::load(&vb, channels, channels, 3, 1, 1).await }
        };
        Ok(Block { convs: [conv(0).await?, conv(2).await?, conv(4).await?] })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let [a, b, c] = &self.convs;
        let h = gpu.activation(&a.forward(gpu, x)?, Activation::Relu)?;
        let h = gpu.activation(&b.forward(gpu, &h)?, Activation::Relu)?;
        gpu.activation(&c.forward_add(gpu, &h, Addend { bias: Some(c.bias()), residual: Some(x) })?, Activation::Relu)
    }
}

/// One entry of `num_decoder_blocks`: its blocks, then (but for the last) nearest upsampling, then
/// a 3x3 conv (without bias but for the last, which makes the image).
struct Level {
    blocks: Vec<Block>,
    upsample: bool,
    conv: Conv2d,
}

pub struct TaesdDecoder {
    pub config: TaesdConfig,
    /// The float type of its weights and activations: `vb`'s (the device's, unless the caller
    /// chose otherwise; TAESD is trained to stay within f16's range).
    dtype: DType,
    conv_in: Conv2d,
    levels: Vec<Level>,
}

impl TaesdDecoder {
    /// Builds the decoder `config` describes from the weights of `vb`, named as diffusers saves
    /// them (`decoder.layers.N.*`, N indexing DecoderTiny's nn.Sequential: `0` conv, `2.conv.0`,
    /// `2.conv.2`, `2.conv.4` a block, ...) or as madebyollin's bare decoder file
    /// (`taesdxl_decoder.safetensors`: the same Sequential behind a Clamp at index 0, so `1.weight`,
    /// `3.conv.0.weight`, ...). A config this engine does not implement is [`Error::Config`].
    pub async fn load(vb: &Vars<'_>, config: TaesdConfig) -> Result<TaesdDecoder> {
        check_config(&config).map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let bare = !vb.contains("decoder.layers.0.weight") && vb.contains("1.weight");
        let (w, mut index) = if bare { (vb.clone(), 1) } else { (vb.pp("decoder.layers"), 0) };
        let c = &config;
        let width = c.decoder_block_out_channels[0];
        let conv_in = Conv2d::load(&w.pp(index), c.latent_channels, width, 3, 1, 1).await?;
        index += 2; // and the ReLU
        let mut levels = Vec::with_capacity(c.num_decoder_blocks.len());
        for (i, &n) in c.num_decoder_blocks.iter().enumerate() {
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(Block::load(&w.pp(index), width).await?);
                index += 1;
            }
            let upsample = i + 1 < c.num_decoder_blocks.len();
            index += upsample as usize; // nn.Upsample
            let conv = match upsample {
                true => Conv2d::load_unbiased(&w.pp(index), width, width, 3, 1, 1).await?,
                false => Conv2d::load(&w.pp(index), width, c.out_channels, 3, 1, 1).await?,
            };
            index += 1;
            levels.push(Level { blocks, upsample, conv });
        }
        Ok(TaesdDecoder { config, dtype: vb.dtype(), conv_in, levels })
    }

    /// A TAESD from a folder: diffusers' layout (config.json and
    /// diffusion_pytorch_model[.fp16].safetensors, the fp16 variant preferred on f16 devices), or
    /// madebyollin's bare `taesdxl_decoder.safetensors` (with taesdxl's config when there is no
    /// config.json). Its weights stay dense (loaded as the component `vae`, which no quantization
    /// policy touches).
    pub async fn open(gpu: &Gpu, source: impl Source) -> Result<TaesdDecoder> {
        let config = match source.exists("config.json").await {
            true => read_json(&source, "config.json").await?,
            false => TaesdConfig::default(),
        };
        let plain = "diffusion_pytorch_model.safetensors";
        let fp16 = "diffusion_pytorch_model.fp16.safetensors";
        let candidates = if gpu.dtype == DType::F16 { [fp16, plain] } else { [plain, fp16] };
        let mut file = None;
        for name in candidates.into_iter().chain(["taesdxl_decoder.safetensors"]) {
            if source.exists(name).await {
                file = Some(name);
                break;
            }
        }
        let Some(file) = file else {
            return Err(Error::Io { path: source.describe(""), message: "no diffusion_pytorch_model.safetensors or taesdxl_decoder.safetensors".into() });
        };
        let config_path = source.describe("config.json");
        let tensors = FileTensors::open(&source, vec![file.into()]).await?;
        let policy = QuantPolicy::default();
        TaesdDecoder::load(&Vars::new(gpu, &tensors, "vae", &policy), config).await.map_err(|e| match e {
            Error::Config { message, .. } => Error::Config { path: config_path, message },
            e => e,
        })
    }

    /// Checks that `file` of `source` holds a TAESD decoder (diffusers' or the bare layout)
    /// before it is stored; where its data section starts.
    pub async fn check_file(source: &impl Source, file: &str) -> Result<u64> {
        let header = safetensors::read_header(source, file).await?;
        let first = ["decoder.layers.0.weight", "1.weight"].iter().find_map(|name| header.tensors.get(*name));
        match first.map(|t| t.shape.as_slice()) {
            Some([_, 4, 3, 3]) => Ok(header.data_start),
            _ => Err(Error::Unsupported {
                path: source.describe(file),
                message: "not a TAESD-XL decoder (no decoder.layers.0.weight or 1.weight taking 4 latent channels)".into(),
            }),
        }
    }

    /// A decoder from one safetensors file (a stored preview decoder), its config read off its
    /// tensors: the width from the first convolution, the blocks per level from the Sequential's
    /// indices (a level ends at its bias-free convolution, the last at the biased output one).
    pub async fn from_file(gpu: &Gpu, source: impl Source, file: &str) -> Result<TaesdDecoder> {
        let tensors = FileTensors::open(&source, vec![file.into()]).await?;
        let has = |name: String| tensors.shape(&name).is_ok();
        let (prefix, first) = if has("decoder.layers.0.weight".into()) { ("decoder.layers.", 0) } else { ("", 1) };
        let mut config = TaesdConfig::default();
        if let Ok(&[width, latent, ..]) = tensors.shape(&format!("{prefix}{first}.weight")) {
            (config.decoder_block_out_channels, config.latent_channels) = (vec![width], latent);
        }
        let (mut counts, mut blocks) = (Vec::new(), 0);
        // Past the first conv and its ReLU; an Upsample holds no tensors. (taesdxl ends at index 18.)
        for i in first + 2..first + 1024 {
            if has(format!("{prefix}{i}.conv.0.weight")) {
                blocks += 1;
            } else if let Ok(&[out, ..]) = tensors.shape(&format!("{prefix}{i}.weight")) {
                counts.push(std::mem::take(&mut blocks));
                if has(format!("{prefix}{i}.bias")) {
                    config.out_channels = out;
                    break;
                }
            }
        }
        if !counts.is_empty() {
            config.decoder_block_out_channels = vec![config.decoder_block_out_channels[0]; counts.len()];
            config.num_decoder_blocks = counts;
        }
        TaesdDecoder::load(&Vars::new(gpu, &tensors, "vae", &QuantPolicy::default()), config).await
    }

    /// Whether decoding an h × w latent fits the adapter: its largest activation (the last
    /// level's, at image size) in one binding.
    pub fn fits(&self, gpu: &Gpu, h: usize, w: usize) -> bool {
        let pixels = (h * self.upscale()) as u64 * (w * self.upscale()) as u64;
        self.config.decoder_block_out_channels[0] as u64 * pixels * self.dtype.size() as u64 <= gpu.max_binding_bytes()
    }

    /// The float type it computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Total up-sampling factor between latents and pixels (8 for taesdxl).
    pub fn upscale(&self) -> usize {
        self.config.upsampling_scaling_factor.pow(self.levels.len() as u32 - 1)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.shape() {
            &[b, c, h, w] if c == self.config.latent_channels && b > 0 && h > 0 && w > 0 => Ok(()),
            s => Err(Error::InvalidParameter(format!("TAESD decode input (latents): expected [batch, {}, height, width], got {s:?}", self.config.latent_channels))),
        }
    }

    /// DecoderTiny.layers after the input clamp: clamped latents -> image in about 0..1 (TAESD's
    /// own output range, before diffusers maps it to -1..1).
    fn layers(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut x = gpu.activation(&self.conv_in.forward(gpu, x)?, Activation::Relu)?;
        let f = self.config.upsampling_scaling_factor;
        for level in &self.levels {
            for block in &level.blocks {
                x = block.forward(gpu, &x)?;
            }
            if level.upsample {
                let &[_, _, h, w] = x.shape() else { unreachable!("checked by check_input") };
                x = gpu.upsample_nearest(&x, h * f, w * f)?;
            }
            x = level.conv.forward(gpu, &x)?;
        }
        Ok(x)
    }

    /// `vae.decode(z).sample`: latents already divided by the scaling factor -> raw decoder output
    /// [B, out_channels, H·f, W·f] (about -1..1, unclamped). Any float type in, the device's out.
    pub fn decode_raw(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        self.check_input(z)?;
        let x = gpu.soft_clamp(&gpu.cast(z, self.dtype)?, 1.0, LATENT_BOUND)?;
        let image = gpu.affine(&self.layers(gpu, &x)?, 2.0, -1.0, false, (f32::NEG_INFINITY, f32::INFINITY))?;
        gpu.cast(&image, gpu.dtype)
    }

    /// What diffusers' SDXL pipeline makes of denoised latents [B, latent_channels, h, w] with this
    /// VAE: `vae.decode(latents / scaling_factor).sample` post-processed as `(x / 2 + 0.5).clamp(0,
    /// 1)` -> image [B, out_channels, h·f, w·f] in 0..1. The division is folded into the input
    /// clamp and the post-processing undoes DecoderTiny's `x * 2 - 1`, so both are one pass each
    /// (equal up to f32 rounding).
    pub fn decode(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.check_input(latents)?;
        let x = gpu.soft_clamp(&gpu.cast(latents, self.dtype)?, (1.0 / self.config.scaling_factor) as f32, LATENT_BOUND)?;
        gpu.cast(&gpu.affine(&self.layers(gpu, &x)?, 1.0, 0.0, false, (0.0, 1.0))?, gpu.dtype)
    }
}

/// The largest latent → image upscale a decoder may have (SDXL's VAE: 8).
const MAX_UPSCALE: usize = 64;

fn check_config(c: &TaesdConfig) -> std::result::Result<(), String> {
    let (widths, counts) = (&c.decoder_block_out_channels, &c.num_decoder_blocks);
    if widths.is_empty() || widths.len() != counts.len() {
        return Err(format!("decoder_block_out_channels {widths:?} and num_decoder_blocks {counts:?} must have one non-zero length"));
    }
    // DecoderTiny's conv after level i keeps its width, and level i + 1's blocks take it as is.
    if widths.iter().any(|&w| w != widths[0] || w == 0) {
        return Err(format!("decoder_block_out_channels {widths:?} must be one positive width (diffusers' DecoderTiny cannot run others)"));
    }
    if c.act_fn != "relu" {
        return Err(format!("unsupported act_fn '{}' (only relu)", c.act_fn));
    }
    if c.upsample_fn != "nearest" {
        return Err(format!("unsupported upsample_fn '{}' (only nearest)", c.upsample_fn));
    }
    if c.latent_channels == 0 || c.out_channels == 0 || c.upsampling_scaling_factor == 0 {
        return Err("latent_channels, out_channels and upsampling_scaling_factor must be positive".into());
    }
    // The total upscale sizes every level's activations: a config (or a file whose config is
    // read off its tensors) claiming hundreds of levels would overflow it. taesdxl's is 8.
    let levels = u32::try_from(counts.len() - 1).unwrap_or(u32::MAX);
    if c.upsampling_scaling_factor.checked_pow(levels).is_none_or(|up| up > MAX_UPSCALE) {
        return Err(format!("{} levels upsampling by {} each exceed {MAX_UPSCALE}x (taesdxl: 8x)", counts.len(), c.upsampling_scaling_factor));
    }
    if !(c.scaling_factor.is_finite() && c.scaling_factor != 0.0) {
        return Err(format!("scaling_factor {} must be finite and non-zero", c.scaling_factor));
    }
    match c.shift_factor {
        Some(s) if s != 0.0 => Err(format!("shift_factor {s} is not supported (taesdxl has none)")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_taesdxl() {
        let c = TaesdConfig::default();
        assert_eq!((c.decoder_block_out_channels, c.num_decoder_blocks), (vec![64; 4], vec![3, 3, 3, 1]));
        assert_eq!((c.latent_channels, c.out_channels, c.upsampling_scaling_factor, c.scaling_factor), (4, 3, 2, 1.0));
        assert!(check_config(&TaesdConfig::default()).is_ok());
    }

    #[test]
    fn unsupported_configs_are_refused() {
        let with = |f: &dyn Fn(&mut TaesdConfig)| {
            let mut c = TaesdConfig::default();
            f(&mut c);
            check_config(&c).unwrap_err()
        };
        assert!(with(&|c| c.decoder_block_out_channels = vec![64, 32, 64, 64]).contains("one positive width"));
        assert!(with(&|c| c.num_decoder_blocks = vec![3, 3, 1]).contains("one non-zero length"));
        assert!(with(&|c| c.act_fn = "mish".into()).contains("act_fn"));
        assert!(with(&|c| c.upsample_fn = "bilinear".into()).contains("upsample_fn"));
        assert!(with(&|c| c.shift_factor = Some(0.1159)).contains("shift_factor"));
        assert!(with(&|c| c.scaling_factor = 0.0).contains("scaling_factor"));
        // Upscales that overflow, or are past any VAE's: refused before any level is built.
        let many = |c: &mut TaesdConfig| (c.decoder_block_out_channels, c.num_decoder_blocks) = (vec![64; 500], vec![1; 500]);
        assert!(with(&many).contains("500 levels upsampling by 2"));
        assert!(with(&|c| c.upsampling_scaling_factor = 9).contains("exceed 64x"));
    }
}
