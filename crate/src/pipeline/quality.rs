//! What quantization costs, measured rather than assumed (`sdxl quality`): per-layer weight error
//! of each format, the UNet output error of the q8 / q4 presets and the final image's PSNR against
//! dense weights on the same seed; and, for the mixed q4 preset, each role's sensitivity (the UNet
//! output error when only that role is quantized) and the per-role formats a byte budget allows.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipeline::generate::{generate, GenerateParams, SdxlModel};
use crate::gpu::Tensor;
use crate::pack::convert::planned_bytes;
use crate::quant::{dequantize, quantize, role, QuantFormat, QuantPolicy, QuantPreset};
use crate::random::TorchGenerator;
use crate::weights::{host_f32, Encoding, ModelSource, TensorSource, Vars};

/// The formats, cheapest first.
pub const FORMATS: [QuantFormat; 3] = [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0];

/// One error per format, in [`FORMATS`] order.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FormatErrors {
    pub q4_0: f64,
    pub q4_1: f64,
    pub q8_0: f64,
}

impl FormatErrors {
    /// The error of one of [`FORMATS`] (NaN for the others, which are not measured).
    pub fn get(&self, format: QuantFormat) -> f64 {
        match format {
            QuantFormat::Q4_0 => self.q4_0,
            QuantFormat::Q4_1 => self.q4_1,
            QuantFormat::Q8_0 => self.q8_0,
            _ => f64::NAN,
        }
    }

    async fn measure<F: std::future::Future<Output = Result<f64>>>(mut f: impl FnMut(QuantFormat) -> F) -> Result<FormatErrors> {
        Ok(FormatErrors { q4_0: f(QuantFormat::Q4_0).await?, q4_1: f(QuantFormat::Q4_1).await?, q8_0: f(QuantFormat::Q8_0).await? })
    }
}

/// Relative RMS error ‖w − deq(q(w))‖ / ‖w‖ of one weight matrix in each format.
#[derive(Debug, Clone, Serialize)]
pub struct LayerError {
    pub name: String,
    pub params: usize,
    pub errors: FormatErrors,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresetQuality {
    pub preset: String,
    /// Bytes of the UNet's tensors under this preset, as a pack stores them (dense ones in f16).
    pub unet_bytes: u64,
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

/// The UNet's quantizable matrices: (name, shape) of every weight the q8 preset quantizes.
fn unet_matrices(w: &dyn TensorSource) -> Vec<(String, Vec<usize>)> {
    let q8 = QuantPreset::Q8.policy();
    let matrices = w.names().into_iter().filter_map(|name| Some((name, &w.info(name)?.shape)));
    matrices.filter(|(name, shape)| q8.format_for("unet", name, shape).is_some()).map(|(n, s)| (n.to_string(), s.clone())).collect()
}

/// Per-layer errors of every UNet matrix the presets quantize, in each format.
async fn layer_errors(model: &ModelSource<'_>) -> Result<Vec<LayerError>> {
    let w = model.tensors("unet").await?;
    let mut layers = Vec::new();
    for (name, shape) in unet_matrices(&*w) {
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        let values = host_f32(&*w, &name, &shape).await?;
        let values = &values;
        let errors = FormatErrors::measure(|format| async move { Ok(relative_rms(values, &dequantize(&quantize(values, rows, cols, format)?))) }).await?;
        layers.push(LayerError { name, params: values.len(), errors });
    }
    Ok(layers)
}

/// Bytes of the UNet's tensors under `preset` as a pack stores them.
async fn unet_bytes(model: &ModelSource<'_>, preset: QuantPreset) -> Result<u64> {
    let w = model.tensors("unet").await?;
    let tensors = w.names().into_iter().filter_map(|n| Some((n, w.info(n)?))).map(|(n, i)| (n, i.shape.as_slice(), i.encoding));
    Ok(planned_bytes(&preset.policy(), "unet", tensors))
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
pub async fn quality(gpu: &Gpu, model: &ModelSource<'_>, p: &GenerateParams) -> Result<QualityReport> {
    let layers = layer_errors(model).await?;
    let dense = SdxlModel::load(gpu, model, &QuantPreset::F16.policy()).await?;
    let inputs = UnetInputs::new(gpu, &dense, p).await?;
    let reference_unet = inputs.run(gpu, &dense.unet).await?;
    let reference_image = gpu.read(&generate(gpu, &dense, None, p, |_| {}).await?.image).await?;
    drop(dense);
    let mut presets = Vec::new();
    for (preset, label) in [(QuantPreset::Q8, "q8"), (QuantPreset::Q4, "q4")] {
        let quantized = SdxlModel::load(gpu, model, &preset.policy()).await?;
        let unet = inputs.run(gpu, &quantized.unet).await?;
        let image = gpu.read(&generate(gpu, &quantized, None, p, |_| {}).await?.image).await?;
        presets.push(PresetQuality {
            preset: label.into(),
            unet_bytes: unet_bytes(model, preset).await?,
            unet_relative_error: max_relative(&reference_unet, &unet),
            image_psnr: psnr(&reference_image, &image),
        });
    }
    Ok(QualityReport { layers, presets })
}

/// How much the UNet's output moves when only the matrices of one role are quantized.
#[derive(Debug, Clone, Serialize)]
pub struct RoleSensitivity {
    pub role: String,
    pub matrices: usize,
    pub params: usize,
    /// Relative RMS error of one guided UNet forward against dense weights, per format.
    pub output_error: FormatErrors,
}

/// Measures every role of the UNet in `model` (dense f32 elsewhere), reporting each as it is done.
pub async fn sensitivity(gpu: &Gpu, model: &ModelSource<'_>, p: &GenerateParams, mut on_role: impl FnMut(&RoleSensitivity)) -> Result<Vec<RoleSensitivity>> {
    let dense = SdxlModel::load(gpu, model, &QuantPreset::F16.policy()).await?;
    let inputs = UnetInputs::new(gpu, &dense, p).await?;
    let reference = inputs.run(gpu, &dense.unet).await?;
    drop(dense);
    let (config, tensors) = model.component::<UNet2DConditionConfig>("unet").await?;
    let mut roles: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (name, shape) in unet_matrices(&*tensors) {
        let entry = roles.entry(role(&format!("unet/{name}"))).or_default();
        entry.0 += 1;
        entry.1 += shape.iter().product::<usize>();
    }
    let mut out = Vec::new();
    for (role, (matrices, params)) in roles {
        let (inputs, reference, role_ref, config, tensors) = (&inputs, &reference, &role, &config, &tensors);
        let output_error = FormatErrors::measure(|format| async move {
            let policy = QuantPolicy { default: None, exceptions: vec![(role_ref.clone(), Some(format))] };
            let unet = UNet2DConditionModel::load(&Vars::new(gpu, &**tensors, "unet", &policy), config.clone()).await?;
            Ok(relative_rms(reference, &inputs.run(gpu, &unet).await?))
        })
        .await?;
        let r = RoleSensitivity { role, matrices, params, output_error };
        on_role(&r);
        out.push(r);
    }
    Ok(out)
}

/// A per-role format choice for a byte budget.
#[derive(Debug, Clone, Serialize)]
pub struct Allocation {
    /// Roles that leave the default Q4_0, with their format name.
    pub exceptions: Vec<(String, String)>,
    /// Bytes of the sized model under the resulting policy, and under plain Q4_0.
    pub bytes: u64,
    pub q4_0_bytes: u64,
    /// Sum of the measured squared output errors of every role, before and after.
    pub q4_0_error_sq: f64,
    pub error_sq: f64,
    /// Roles of the sized model that were not measured (left at Q4_0).
    pub unmeasured: Vec<String>,
}

/// Chooses formats per role for the UNet whose tensors are `shapes` ((name, shape), e.g. the real
/// SDXL base) within `budget` bytes: every role starts at Q4_0; then, repeatedly, the upgrade
/// (role → costlier format) that removes the most measured squared output error per added byte
/// and still fits is taken. Squared errors of different roles add (their noise is independent).
pub fn allocate(measured: &[RoleSensitivity], shapes: &[(String, Vec<usize>)], budget: u64) -> Allocation {
    let base = QuantPolicy { default: Some(QuantFormat::Q4_0), exceptions: Vec::new() };
    let tensors = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice(), Encoding::Float(crate::weights::safetensors::Dtype::F16)));
    let q4_0_bytes = planned_bytes(&base, "unet", tensors());
    // Bytes of each role's matrices per format, in the sized model.
    let mut role_bytes: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for (name, shape) in shapes {
        if base.format_for("unet", name, shape).is_some() {
            let bytes = role_bytes.entry(role(&format!("unet/{name}"))).or_default();
            for (b, f) in bytes.iter_mut().zip(FORMATS) {
                *b += f.matrix_bytes(shape[0], shape[1..].iter().product());
            }
        }
    }
    let unmeasured: Vec<String> = role_bytes.keys().filter(|r| !measured.iter().any(|m| &m.role == *r)).cloned().collect();
    let sq = |m: &RoleSensitivity, f: usize| m.output_error.get(FORMATS[f]).powi(2);
    let mut level = vec![0usize; measured.len()];
    let mut bytes = q4_0_bytes;
    loop {
        let mut best: Option<(f64, usize, usize, u64)> = None;
        for (i, m) in measured.iter().enumerate() {
            let Some(b) = role_bytes.get(&m.role) else { continue };
            for f in level[i] + 1..FORMATS.len() {
                let (gain, cost) = (sq(m, level[i]) - sq(m, f), b[f].saturating_sub(b[level[i]]));
                if gain > 0.0 && bytes + cost <= budget && best.is_none_or(|(g, ..)| gain / cost.max(1) as f64 > g) {
                    best = Some((gain / cost.max(1) as f64, i, f, cost));
                }
            }
        }
        let Some((_, i, f, cost)) = best else { break };
        level[i] = f;
        bytes += cost;
    }
    let exceptions = measured.iter().zip(&level).filter(|(_, &l)| l > 0).map(|(m, &l)| (m.role.clone(), FORMATS[l].name().to_string())).collect();
    Allocation {
        exceptions,
        bytes,
        q4_0_bytes,
        q4_0_error_sq: measured.iter().map(|m| sq(m, 0)).sum(),
        error_sq: measured.iter().zip(&level).map(|(m, &l)| sq(m, l)).sum(),
        unmeasured,
    }
}
