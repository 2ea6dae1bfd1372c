//! What quantization costs, measured rather than assumed: per-layer weight error of Q8 and Q4, the
//! UNet output error of the q8 / q4 presets, and the final image's PSNR against dense weights on
//! the same seed (`sdxl quality`).

use serde::Serialize;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::unet::UNet2DConditionModel;
use crate::pipeline::generate::{generate, GenerateParams, SdxlModel};
use crate::gpu::Tensor;
use crate::quant::{dequantize, quantize, QuantFormat, QuantPreset, BLOCK};
use crate::random::TorchGenerator;
use crate::weights::{Source, Weights};

/// Relative RMS error ‖w − deq(q(w))‖ / ‖w‖ of one weight matrix in each format.
#[derive(Debug, Clone, Serialize)]
pub struct LayerError {
    pub name: String,
    pub params: usize,
    pub q8: f64,
    pub q4: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresetQuality {
    pub preset: String,
    /// Bytes of the UNet's weight matrices under this preset (dense ones at the GPU's float size).
    pub unet_matrix_bytes: u64,
    /// max |Δ| / max |reference| of one UNet forward against dense weights.
    pub unet_relative_error: f64,
    /// PSNR (dB) of the generated image against the dense-weight image, same seed.
    pub image_psnr: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub layers: Vec<LayerError>,
    pub presets: Vec<PresetQuality>,
}

fn relative_rms(reference: &[f32], other: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&r, &o) in reference.iter().zip(other) {
        err += ((r - o) as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn max_relative(reference: &[f32], other: &[f32]) -> f64 {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let err = reference.iter().zip(other).fold(0f64, |m, (r, o)| m.max((r - o).abs() as f64));
    if other.iter().any(|v| !v.is_finite()) { f64::INFINITY } else { err / scale.max(f64::MIN_POSITIVE) }
}

/// PSNR of two images in 0..1.
pub fn psnr(reference: &[f32], other: &[f32]) -> f64 {
    let mse = reference.iter().zip(other).map(|(r, o)| ((r - o) as f64).powi(2)).sum::<f64>() / reference.len().max(1) as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

/// Per-layer errors of every UNet matrix the q8 preset would quantize, in both formats.
async fn layer_errors(source: &impl Source) -> Result<Vec<LayerError>> {
    let w = Weights::open(source, "unet", false).await?;
    let mut layers = Vec::new();
    for name in w.names() {
        let shape = w.shape(name)?.to_vec();
        let (rows, cols) = (shape[0], shape.iter().skip(1).product::<usize>());
        if shape.len() < 2 || !name.ends_with(".weight") || QuantPreset::Q8.format_for(name, cols).is_none() {
            continue;
        }
        let values = w.host(name, &shape).await?;
        let error = |format| -> Result<f64> { Ok(relative_rms(&values, &dequantize(&quantize(&values, rows, cols, format)?))) };
        layers.push(LayerError { name: name.to_string(), params: values.len(), q8: error(QuantFormat::Q8)?, q4: error(QuantFormat::Q4)? });
    }
    Ok(layers)
}

/// Bytes of the UNet's weight matrices under `preset`.
async fn matrix_bytes(gpu: &Gpu, source: &impl Source, preset: QuantPreset) -> Result<u64> {
    let w = Weights::open(source, "unet", false).await?;
    let mut bytes = 0u64;
    for name in w.names() {
        let shape = w.shape(name)?;
        let (rows, cols) = (shape[0], shape.iter().skip(1).product::<usize>());
        if shape.len() < 2 || !name.ends_with(".weight") {
            continue;
        }
        bytes += match preset.format_for(name, cols) {
            Some(format) => (rows * cols.div_ceil(BLOCK)) as u64 * (BLOCK as f64 * format.bits_per_weight() / 8.0) as u64,
            None => (rows * cols * gpu.dtype.size()) as u64,
        };
    }
    Ok(bytes)
}

/// The UNet's inputs for one guided step of `p` (dense text encoders, so that only the UNet's
/// quantization is measured): seeded latents, both prompts' embeddings, time ids.
struct UnetInputs {
    sample: Vec<f32>,
    latent_shape: [usize; 4],
    context: (Vec<f32>, Vec<usize>),
    pooled: (Vec<f32>, Vec<usize>),
    time_ids: Vec<f32>,
}

impl UnetInputs {
    async fn new(gpu: &Gpu, model: &SdxlModel, p: &GenerateParams) -> Result<UnetInputs> {
        let d = model.vae.downscale();
        let latent_shape = [2, model.unet.config.in_channels, p.height / d, p.width / d];
        let sample = TorchGenerator::new(p.seed).randn(latent_shape.iter().product());
        let e = model.prompt_encoder.encode(gpu, &p.prompt, p.negative.as_deref())?;
        let context = gpu.concat(&e.negative_prompt_embeds, &e.prompt_embeds, 0)?;
        let pooled = gpu.concat(&e.negative_pooled_prompt_embeds, &e.pooled_prompt_embeds, 0)?;
        let host = |t: Tensor| async move { Ok::<_, crate::Error>((gpu.read(&t).await?, t.shape().to_vec())) };
        let time_ids = [model.time_ids(p, p.negative_aesthetic_score), model.time_ids(p, p.aesthetic_score)].concat();
        Ok(UnetInputs { sample, latent_shape, context: host(context).await?, pooled: host(pooled).await?, time_ids })
    }

    async fn run(&self, gpu: &Gpu, unet: &UNet2DConditionModel) -> Result<Vec<f32>> {
        let sample = gpu.upload(&self.sample, &self.latent_shape)?;
        let context = gpu.upload(&self.context.0, &self.context.1)?;
        let pooled = gpu.upload(&self.pooled.0, &self.pooled.1)?;
        gpu.read(&unet.forward(gpu, &sample, 500.0, &context, &pooled, &self.time_ids)?).await
    }
}

/// Measures the q8 and q4 presets against dense weights for the model in `source`.
pub async fn quality(gpu: &Gpu, source: &impl Source, p: &GenerateParams) -> Result<QualityReport> {
    let layers = layer_errors(source).await?;
    let dense = SdxlModel::load(gpu, source, QuantPreset::F16).await?;
    let inputs = UnetInputs::new(gpu, &dense, p).await?;
    let reference_unet = inputs.run(gpu, &dense.unet).await?;
    let reference_image = gpu.read(&generate(gpu, &dense, None, p, |_| {}).await?.image).await?;
    drop(dense);
    let mut presets = Vec::new();
    for (preset, label) in [(QuantPreset::Q8, "q8"), (QuantPreset::Q4, "q4")] {
        let model = SdxlModel::load(gpu, source, preset).await?;
        let unet = inputs.run(gpu, &model.unet).await?;
        let image = gpu.read(&generate(gpu, &model, None, p, |_| {}).await?.image).await?;
        presets.push(PresetQuality {
            preset: label.into(),
            unet_matrix_bytes: matrix_bytes(gpu, source, preset).await?,
            unet_relative_error: max_relative(&reference_unet, &unet),
            image_psnr: psnr(&reference_image, &image),
        });
    }
    Ok(QualityReport { layers, presets })
}
