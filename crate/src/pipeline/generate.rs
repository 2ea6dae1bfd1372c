//! Text-to-image as diffusers' StableDiffusionXLPipeline, with the refiner taking over the last
//! part of the schedule as StableDiffusionXLImg2ImgPipeline(denoising_start=f) does ("ensemble of
//! experts"): same timestep schedule, no noise added at the handoff, then the VAE decode.

use std::collections::BTreeMap;

use crate::adapt::Layers;
use crate::error::{mib, Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::models::taesd::TaesdDecoder;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::prompt::{PromptEmbeds, PromptEncoder, PromptOptions};
use crate::pipeline::ModelIndex;
use crate::quant::QuantPolicy;
use crate::random::TorchGenerator;
use crate::scheduler::{SamplerChoice, Schedule, Scheduler, SchedulerConfig, Step, TimestepSpacing};
use crate::weights::lora::COMPONENTS;
use crate::weights::{read_json, ModelSource, Source, Vars};

const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// One SDXL model folder (base or refiner) loaded on the GPU.
pub struct SdxlModel {
    pub index: ModelIndex,
    pub prompt_encoder: PromptEncoder,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json`: the sampler a run uses unless it picks another.
    pub scheduler_config: SchedulerConfig,
    /// Where the scheduler config came from, for errors.
    scheduler_path: String,
    /// The layers LoRAs may adapt, by component (see `set_loras`).
    pub(crate) layers: BTreeMap<&'static str, Layers>,
}

impl SdxlModel {
    /// Loads a model; `policy` (a preset's, [`crate::quant::QuantPreset::policy`]) selects which float weight
    /// matrices are quantized as they load (the VAE always stays dense; weights stored quantized
    /// stay as stored).
    pub async fn load(gpu: &Gpu, model: &ModelSource<'_>, policy: &QuantPolicy) -> Result<SdxlModel> {
        gpu.operation(Self::load_parts(gpu, model, policy)).await
    }

    async fn load_parts(gpu: &Gpu, model: &ModelSource<'_>, policy: &QuantPolicy) -> Result<SdxlModel> {
        let files = &model.files;
        let index = ModelIndex::load(files).await?;
        for part in ["unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2"] {
            if !index.has(part) {
                return Err(Error::Config { path: files.describe("model_index.json"), message: format!("the model has no {part}") });
            }
        }
        let layers: BTreeMap<&'static str, Layers> = COMPONENTS.iter().map(|c| (*c, Layers::default())).collect();
        let (unet_config, unet_tensors) = model.component::<UNet2DConditionConfig>("unet").await?;
        let unet_vars = Vars::new(gpu, &*unet_tensors, "unet", policy).with_layers(&layers["unet"]);
        let unet = UNet2DConditionModel::load(&unet_vars, unet_config).await.map_err(model.config_error("unet"))?;
        let (vae_config, vae_tensors) = model.component::<VaeConfig>("vae").await?;
        let vae = AutoencoderKL::load(&Vars::new(gpu, &*vae_tensors, "vae", policy), vae_config).await.map_err(model.config_error("vae"))?;
        Ok(SdxlModel {
            prompt_encoder: PromptEncoder::load(gpu, model, &index, policy, &layers).await?,
            unet,
            vae,
            scheduler_config: read_json(files, SCHEDULER_CONFIG).await?,
            scheduler_path: files.describe(SCHEDULER_CONFIG),
            index,
            layers,
        })
    }

    /// The scheduler a run with these parameters uses: the model's own, or the sampler and
    /// spacing the parameters pick, built from the model's config.
    pub fn scheduler(&self, p: &GenerateParams) -> Result<Scheduler> {
        Scheduler::from_config(&self.scheduler_config, p.scheduler, p.timestep_spacing).map_err(|e| match e {
            Error::Config { message, .. } => Error::Config { path: self.scheduler_path.clone(), message },
            e => e,
        })
    }

    /// Image sizes must be multiples of this: 8 (diffusers' check) and the VAE's downscale.
    pub fn size_multiple(&self) -> usize {
        let d = self.vae.downscale();
        8 * d / gcd(8, d)
    }

    /// diffusers' `_get_add_time_ids`: (original size, crop top-left, target size) for the base,
    /// (original size, crop top-left, aesthetic score) for a model that requires aesthetics scores.
    pub(crate) fn time_ids(&self, p: &GenerateParams, aesthetic_score: f32) -> Vec<f32> {
        let (oh, ow) = p.original_size.unwrap_or((p.height, p.width));
        let (ct, cl) = p.crops_coords_top_left;
        let mut ids = vec![oh as f32, ow as f32, ct as f32, cl as f32];
        if self.index.requires_aesthetics_score {
            ids.push(aesthetic_score);
        } else {
            let (th, tw) = p.target_size.unwrap_or((p.height, p.width));
            ids.extend([th as f32, tw as f32]);
        }
        ids
    }
}

/// Generation settings; defaults as diffusers' SDXL pipelines.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// None is diffusers' `negative_prompt=None` (zeros on the base, "" on the refiner).
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; at most 1 runs the UNet once per step without guidance.
    pub guidance: f32,
    pub seed: u64,
    /// Fraction of the schedule after which the refiner takes over (denoising_end / denoising_start).
    pub refiner_start: f64,
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    pub aesthetic_score: f32,
    pub negative_aesthetic_score: f32,
    /// The sampler; None: the one the model's scheduler config names.
    pub scheduler: Option<SamplerChoice>,
    /// None: the model's scheduler config's spacing.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// img2img / SDEdit: start from this image (width × height) noised to `strength`.
    pub init_image: Option<InitImage>,
    /// Inpainting: regenerate where this mask (width × height, 1 = repaint) is set, keep the
    /// init image elsewhere. Needs `init_image`.
    pub mask: Option<Mask>,
    /// How much of the schedule img2img and inpainting run, in (0, 1] (diffusers' `strength`;
    /// exactly 1 starts inpainting from pure noise).
    pub strength: f64,
    /// Long prompts and A1111 weights as lpw_stable_diffusion_xl; off by default (diffusers' truncation).
    pub prompt_options: PromptOptions,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative: None,
            width: 1024,
            height: 1024,
            steps: 30,
            guidance: 5.0,
            seed: 0,
            refiner_start: 0.8,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            scheduler: None,
            timestep_spacing: None,
            init_image: None,
            mask: None,
            strength: IMG2IMG_STRENGTH,
            prompt_options: PromptOptions::default(),
        }
    }
}

/// An RGB image for img2img: planes [3, height, width] in 0..1.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<f32>,
}

/// diffusers' default `strength`: StableDiffusionXLImg2ImgPipeline's, and the inpainting
/// pipeline's (just under 1: the run starts from the noised image, not from pure noise).
pub const IMG2IMG_STRENGTH: f64 = 0.3;
pub const INPAINT_STRENGTH: f64 = 0.9999;

/// An inpainting mask: `values` [height, width], 1 where the image is regenerated and 0 where it
/// is kept (diffusers binarizes its masks at 0.5; [`Mask::from_gray`] does the same).
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl Mask {
    /// From grey levels in 0..1, binarized as diffusers' mask processor does (`>= 0.5` is 1).
    pub fn from_gray(width: usize, height: usize, gray: impl IntoIterator<Item = f32>) -> Mask {
        Mask { width, height, values: gray.into_iter().map(|v| if v >= 0.5 { 1.0 } else { 0.0 }).collect() }
    }

    /// diffusers' `interpolate(mask, size=(h, w))` (nearest) to the latents' size.
    fn downsample(&self, h: usize, w: usize) -> Vec<f32> {
        let (sy, sx) = (self.height / h, self.width / w);
        (0..h * w).map(|i| self.values[(i / w) * sy * self.width + (i % w) * sx]).collect()
    }
}

/// Outpainting's canvas: `image` extended by `[left, top, right, bottom]` pixels (the new pixels
/// repeat the nearest edge, a neutral start for the noised latents) and the mask that repaints
/// exactly the new area, optionally `overlap` pixels into the old one to blend the seam.
pub fn outpaint_canvas(image: &InitImage, [left, top, right, bottom]: [usize; 4], overlap: usize) -> Result<(InitImage, Mask)> {
    let too_large = || Error::InvalidParameter(format!("{}x{} extended by {left},{top},{right},{bottom} is too large", image.width, image.height));
    let width = [image.width, left, right].iter().try_fold(0usize, |a, &b| a.checked_add(b)).filter(|&w| w <= MAX_SIDE).ok_or_else(too_large)?;
    let height = [image.height, top, bottom].iter().try_fold(0usize, |a, &b| a.checked_add(b)).filter(|&h| h <= MAX_SIDE).ok_or_else(too_large)?;
    if width * height > MAX_PIXELS {
        return Err(too_large());
    }
    if image.width == 0 || image.height == 0 || image.rgb.len() != 3 * image.width * image.height {
        return Err(Error::InvalidParameter(format!("outpainting needs a non-empty image with 3 x {} x {} values", image.width, image.height)));
    }
    let (plane, old_plane) = (width * height, image.width * image.height);
    let mut rgb = vec![0f32; 3 * plane];
    let mut values = vec![0f32; plane];
    for y in 0..height {
        let sy = y.saturating_sub(top).min(image.height - 1);
        for x in 0..width {
            let sx = x.saturating_sub(left).min(image.width - 1);
            for c in 0..3 {
                rgb[c * plane + y * width + x] = image.rgb[c * old_plane + sy * image.width + sx];
            }
            // How far into the old image the pixel lies from each extended side (None: outside it).
            let depth = [(left, x.checked_sub(left)), (top, y.checked_sub(top)), (right, (left + image.width).checked_sub(x + 1)), (bottom, (top + image.height).checked_sub(y + 1))];
            let repaint = depth.iter().any(|&(extended, d)| extended > 0 && d.is_none_or(|d| d < overlap));
            values[y * width + x] = if repaint { 1.0 } else { 0.0 };
        }
    }
    Ok((InitImage { width, height, rgb }, Mask { width, height, values }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, tsify::Tsify)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Base,
    Refiner,
}

/// Reported after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub stage: Stage,
    /// 1-based step within the stage.
    pub step: usize,
    pub steps: usize,
}

/// What a generation is doing, in order: `Encode(Base)`, the base's steps, then (with a refiner)
/// `Encode(Refiner)` and its steps, then `Decode`. The first model is the `Base` stage even when
/// it is a refiner refining an image on its own.
pub enum Event<'a> {
    /// The stage's model starts by encoding the prompt.
    Encode(Stage),
    /// A step finished (its GPU work done).
    Step { progress: StepProgress, estimate: Estimate<'a> },
    /// The final decode (the VAE's, or the TAESD decoder's given to [`generate_with`]) starts.
    Decode,
}

/// What a step started from and what the model predicted there, from which the model's current
/// estimate of the final latents (what previews show) is one GPU op away, computed only when asked.
pub struct Estimate<'a> {
    latents: &'a Tensor,
    prediction: &'a Tensor,
    step: &'a Step,
    next: &'a Tensor,
}

impl Estimate<'_> {
    /// The clean-latent estimate [1, C, h, w] (diffusers' `pred_original_sample`).
    pub fn denoised(&self, gpu: &Gpu) -> Result<Tensor> {
        denoised(gpu, self.step, self.latents, self.prediction)
    }

    /// The latents the step produced (what diffusers' `callback_on_step_end` sees).
    pub fn next_latents(&self) -> &Tensor {
        self.next
    }
}

/// Watches a generation; an error it returns (e.g. [`Error::Cancelled`]) stops the run there and
/// frees its GPU buffers.
#[allow(async_fn_in_trait)]
pub trait Observer {
    async fn event(&mut self, gpu: &Gpu, event: Event<'_>) -> Result<()>;
}

/// A closure sees the steps only.
impl<F: FnMut(StepProgress)> Observer for F {
    async fn event(&mut self, _: &Gpu, event: Event<'_>) -> Result<()> {
        if let Event::Step { progress, .. } = event {
            self(progress);
        }
        Ok(())
    }
}

pub struct Generated {
    /// The seed's unit Gaussian noise [1, C, h, w]: the initial latents before scaling by
    /// init_noise_sigma, or (img2img) the noise added to the image latents.
    pub noise: Tensor,
    /// Final latents [1, C, h, w] before the decode.
    pub latents: Tensor,
    /// RGB [1, 3, H, W] in 0..1.
    pub image: Tensor,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The largest image a run takes: 8192 pixels on a side and 16 megapixels (4096², 16 times
/// SDXL's training size). Past these the latents, the decoded image and its readback outgrow
/// wasm's 4 GiB address space; below them the adapter's limits are checked per buffer.
pub const MAX_SIDE: usize = 8192;
pub const MAX_PIXELS: usize = 4096 * 4096;

fn check_params(p: &GenerateParams, multiple: usize, with_refiner: bool) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidParameter(m));
    if p.steps == 0 {
        return bad("steps must be at least 1".into());
    }
    if p.width == 0 || p.height == 0 || !p.width.is_multiple_of(multiple) || !p.height.is_multiple_of(multiple) {
        return bad(format!("width and height must be positive multiples of {multiple} for this model (got {}x{})", p.width, p.height));
    }
    if p.width > MAX_SIDE || p.height > MAX_SIDE || p.width * p.height > MAX_PIXELS {
        return bad(format!("{}x{} is too large: at most {MAX_SIDE} on a side and {} megapixels", p.width, p.height, MAX_PIXELS >> 20));
    }
    if !p.guidance.is_finite() || p.guidance < 0.0 {
        return bad(format!("guidance {} must be a finite number >= 0", p.guidance));
    }
    if with_refiner && !(p.refiner_start > 0.0 && p.refiner_start < 1.0) {
        return bad(format!("refiner start {} must be in (0, 1)", p.refiner_start));
    }
    if let Some(image) = &p.init_image {
        if (image.width, image.height) != (p.width, p.height) {
            return bad(format!("the init image is {}x{} but the run is {}x{}", image.width, image.height, p.width, p.height));
        }
        if image.rgb.len() != 3 * image.width * image.height {
            return bad(format!("the init image has {} values, not 3 x {} x {}", image.rgb.len(), image.width, image.height));
        }
    }
    if let Some(mask) = &p.mask {
        if p.init_image.is_none() {
            return bad("a mask needs an init image to inpaint".into());
        }
        if (mask.width, mask.height) != (p.width, p.height) {
            return bad(format!("the mask is {}x{} but the image is {}x{}: they must be the same size", mask.width, mask.height, p.width, p.height));
        }
        if mask.values.len() != mask.width * mask.height {
            return bad(format!("the mask has {} values, not {} x {}", mask.values.len(), mask.width, mask.height));
        }
        if let Some(i) = mask.values.iter().position(|&v| v != 0.0 && v != 1.0) {
            return bad(format!("the mask must be binary (0 keep, 1 repaint): value {} at pixel {}", mask.values[i], i));
        }
    }
    Ok(())
}

/// What an inpainting run adds to the denoising loop of each model.
struct Inpaint {
    /// The mask at latent resolution [h, w].
    mask: Tensor,
    /// A 9-channel inpainting UNet's extra input: mask and masked-image latents [1, 1 + C, h, w].
    extra: Option<Tensor>,
    /// An ordinary UNet's blend target outside the mask: the original's latents and the noise
    /// they are noised with to each step's level.
    original: Option<(Tensor, Tensor)>,
}

/// How a model's UNet takes part in an inpainting run: an inpainting UNet's input is the latents,
/// the mask and the masked image's latents (diffusers' 9-channel check); an ordinary one's is the latents.
fn inpainting_unet(model: &SdxlModel) -> Result<bool> {
    let (unet, latent) = (model.unet.config.in_channels, model.vae.config.latent_channels);
    match unet {
        _ if unet == latent => Ok(false),
        _ if unet == 2 * latent + 1 => Ok(true),
        _ => Err(Error::InvalidParameter(format!("the UNet takes {unet} input channels: {latent} (latents) or {} (inpainting) fit this VAE", 2 * latent + 1))),
    }
}

/// Runs the first model (the base, or a refiner on its own for SDEdit), the refiner for the last
/// part of the schedule when given, then decodes. Text to image, or img2img from `p.init_image`.
pub async fn generate(
    gpu: &Gpu,
    base: &SdxlModel,
    refiner: Option<&SdxlModel>,
    p: &GenerateParams,
    observer: impl Observer,
) -> Result<Generated> {
    generate_with(gpu, base, refiner, p, None, observer).await
}

/// [`generate`], the final image decoded by `final_decoder` (TAESD-XL: fast, approximate) instead
/// of the last model's VAE when given. The decoder must take the VAE's latents (channels and
/// scale) and its decode must fit the adapter at this size: checked before any GPU work,
/// [`Error::InvalidParameter`] or [`Error::AdapterLimits`] otherwise (no silent VAE fallback).
pub async fn generate_with(
    gpu: &Gpu,
    base: &SdxlModel,
    refiner: Option<&SdxlModel>,
    p: &GenerateParams,
    final_decoder: Option<&TaesdDecoder>,
    observer: impl Observer,
) -> Result<Generated> {
    gpu.operation(run(gpu, base, refiner, p, final_decoder, observer)).await
}

/// Whether `decoder` can make the final image of a `p` run on `vae`'s latents.
fn check_final_decoder(gpu: &Gpu, decoder: &TaesdDecoder, vae: &AutoencoderKL, p: &GenerateParams) -> Result<()> {
    let (channels, downscale) = (vae.config.latent_channels, vae.downscale());
    let c = &decoder.config;
    if c.latent_channels != channels || decoder.upscale() != downscale || c.out_channels != 3 {
        return Err(Error::InvalidParameter(format!(
            "the TAESD final decoder takes {} latent channels, upscales {}x and makes {} channels; this model's VAE needs {channels}, {downscale}x and 3",
            c.latent_channels,
            decoder.upscale(),
            c.out_channels
        )));
    }
    if !decoder.fits(gpu, p.height / downscale, p.width / downscale) {
        return Err(Error::AdapterLimits(format!(
            "a TAESD decode of a {}x{} image needs more than this adapter's {} in one buffer; leave out the TAESD final decoder (the VAE decodes in tiles)",
            p.width,
            p.height,
            mib(gpu.max_binding_bytes())
        )));
    }
    Ok(())
}

async fn run(
    gpu: &Gpu,
    base: &SdxlModel,
    refiner: Option<&SdxlModel>,
    p: &GenerateParams,
    final_decoder: Option<&TaesdDecoder>,
    mut observer: impl Observer,
) -> Result<Generated> {
    // Declared first, so dropped last: once the run's activations are back in the pool (also
    // after an error or a cancel), their memory goes back to the device.
    let _trim = TrimOnDrop(gpu);
    let multiple = refiner.map_or(1, |r| r.size_multiple()).max(base.size_multiple());
    check_params(p, multiple, refiner.is_some())?;
    if let Some(decoder) = final_decoder {
        check_final_decoder(gpu, decoder, &refiner.unwrap_or(base).vae, p)?;
    }
    let base_inpaints = inpainting_unet(base)?;
    if base_inpaints && p.mask.is_none() {
        return Err(Error::InvalidParameter("this model's UNet is an inpainting UNet (9 input channels): give an init image and a mask".into()));
    }
    if let Some(r) = refiner.filter(|r| inpainting_unet(r).unwrap_or(true)) {
        return Err(Error::InvalidParameter(format!("the refiner's UNet takes {} input channels: a refiner must be an ordinary one", r.unet.config.in_channels)));
    }
    let latent_shape = [1, base.vae.config.latent_channels, p.height / base.vae.downscale(), p.width / base.vae.downscale()];
    let numel = latent_shape.iter().product();

    let scheduler = base.scheduler(p)?;
    let mut base_schedule = match p.init_image {
        Some(_) => scheduler.img2img(p.steps, p.strength)?,
        None => scheduler.timesteps(p.steps)?,
    };
    let refiner_schedule = match refiner {
        Some(r) => {
            base_schedule = scheduler.denoising_end(base_schedule, p.refiner_start)?;
            Some(r.scheduler(p)?.denoising_start(p.steps, p.refiner_start)?)
        }
        None => None,
    };

    // One generator per pipeline call, as diffusers' examples seed each: the posterior samples and
    // the initial noise come first (in the order diffusers draws them), then the draws of an
    // ancestral sampler's steps.
    let mut generator = TorchGenerator::new(p.seed);
    let encode = |rgb: &[f32], generator: &mut TorchGenerator| -> Result<Tensor> {
        let pixels = gpu.upload(rgb, &[1, 3, p.height, p.width])?;
        let (mean, logvar) = base.vae.encode(gpu, &gpu.affine(&pixels, 2.0, -1.0, false, (f32::NEG_INFINITY, f32::INFINITY))?)?;
        let sample = gpu.upload(&generator.randn(numel), &latent_shape)?;
        base.vae.encode_latents(gpu, &mean, &logvar, &sample)
    };
    let (noise, mut latents, mut inpaint) = match (&p.init_image, &p.mask) {
        (Some(image), None) => {
            let image_latents = encode(&image.rgb, &mut generator)?;
            let noise = gpu.upload(&generator.randn(numel), &latent_shape)?;
            let (a, b) = base_schedule.add_noise;
            let latents = gpu.axpby(a, &image_latents, b, &noise)?;
            (noise, latents, None)
        }
        (Some(image), Some(mask)) => {
            // StableDiffusionXLInpaintPipeline: the image's latents unless an inpainting UNet starts
            // from pure noise (strength 1), the noise, then the masked image's latents.
            let from_noise = p.strength == 1.0;
            let image_latents = match !base_inpaints || !from_noise {
                true => Some(encode(&image.rgb, &mut generator)?),
                false => None,
            };
            let noise = gpu.upload(&generator.randn(numel), &latent_shape)?;
            let latents = match &image_latents {
                Some(image_latents) if !from_noise => {
                    let (a, b) = base_schedule.add_noise;
                    gpu.axpby(a, image_latents, b, &noise)?
                }
                _ => gpu.scale(&noise, base_schedule.init_noise_sigma)?,
            };
            let (h, w) = (latent_shape[2], latent_shape[3]);
            let small_mask = mask.downsample(h, w);
            // diffusers encodes the masked image for either UNet; an ordinary one does not read it.
            let extra = match base_inpaints {
                true => {
                    // Masked pixels become 0 in -1..1, 0.5 here.
                    let plane = p.width * p.height;
                    let masked: Vec<f32> = image.rgb.iter().enumerate().map(|(i, &v)| if mask.values[i % plane] >= 0.5 { 0.5 } else { v }).collect();
                    let masked_latents = encode(&masked, &mut generator)?;
                    Some(gpu.concat(&gpu.upload(&small_mask, &[1, 1, h, w])?, &masked_latents, 1)?)
                }
                false => {
                    generator.randn(numel);
                    None
                }
            };
            let original = image_latents.filter(|_| !base_inpaints).map(|l| (l, noise.clone()));
            let inpaint = Inpaint { mask: gpu.upload(&small_mask, &[h, w])?, extra, original };
            (noise, latents, Some(inpaint))
        }
        _ => {
            let noise = gpu.upload(&generator.randn(numel), &latent_shape)?;
            let latents = gpu.scale(&noise, base_schedule.init_noise_sigma)?;
            (noise, latents, None)
        }
    };
    latents = denoise(gpu, base, p, &base_schedule, latents, Stage::Base, inpaint.as_ref(), &mut generator, &mut observer).await?;
    let last = match (refiner, refiner_schedule) {
        (Some(r), Some(schedule)) => {
            let mut generator = TorchGenerator::new(p.seed);
            if let Some(inpaint) = &mut inpaint {
                // The inpainting pipeline on the refiner (diffusers' recipe): the handed-over latents
                // are its "image latents", blended outside the mask with a noise of its own.
                let noise = gpu.upload(&generator.randn(numel), &latent_shape)?;
                *inpaint = Inpaint { mask: inpaint.mask.clone(), extra: None, original: Some((latents.clone(), noise)) };
            }
            latents = denoise(gpu, r, p, &schedule, latents, Stage::Refiner, inpaint.as_ref(), &mut generator, &mut observer).await?;
            r
        }
        _ => base,
    };
    observer.event(gpu, Event::Decode).await?;
    let image = match final_decoder {
        Some(decoder) => decoder.decode(gpu, &latents)?,
        None => last.vae.decode_within_limits(gpu, &latents)?,
    };
    Ok(Generated { noise, latents, image })
}

/// Frees the GPU's activation pool when dropped.
struct TrimOnDrop<'a>(&'a Gpu);

impl Drop for TrimOnDrop<'_> {
    fn drop(&mut self) {
        self.0.trim();
    }
}

/// A step's clean-latent estimate x0 from the latents it started from and the model's prediction.
fn denoised(gpu: &Gpu, step: &Step, latents: &Tensor, prediction: &Tensor) -> Result<Tensor> {
    let (a, b) = step.denoised;
    let x0 = gpu.axpby(a, latents, b, prediction)?;
    match step.clip {
        Some(clip) => gpu.affine(&x0, 1.0, 0.0, false, (-clip, clip)),
        None => Ok(x0),
    }
}

/// Σ cᵢ·tᵢ over the terms with a non-zero coefficient (at least one).
fn combine(gpu: &Gpu, terms: &[(f32, Option<&Tensor>)]) -> Result<Tensor> {
    let mut terms = terms.iter().filter_map(|&(c, t)| t.filter(|_| c != 0.0).map(|t| (c, t)));
    let (c0, t0) = terms.next().ok_or_else(|| Error::InvalidParameter("a sampler step with no terms".into()))?;
    let mut sum = match terms.next() {
        Some((c1, t1)) => gpu.axpby(c0, t0, c1, t1)?,
        None => gpu.scale(t0, c0)?,
    };
    for (c, t) in terms {
        sum = gpu.axpby(1.0, &sum, c, t)?;
    }
    Ok(sum)
}

/// The denoising loop of one model over `schedule`, with classifier-free guidance as a batch of 2
/// (negative first, as diffusers concatenates them); ancestral noise comes from `generator`.
#[allow(clippy::too_many_arguments)]
async fn denoise(
    gpu: &Gpu,
    model: &SdxlModel,
    p: &GenerateParams,
    schedule: &Schedule,
    mut latents: Tensor,
    stage: Stage,
    inpaint: Option<&Inpaint>,
    generator: &mut TorchGenerator,
    observer: &mut impl Observer,
) -> Result<Tensor> {
    observer.event(gpu, Event::Encode(stage)).await?;
    let guided = p.guidance > 1.0;
    let negative = if guided { p.negative.as_deref() } else { None };
    let PromptEmbeds { prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds } =
        model.prompt_encoder.encode_with(gpu, &p.prompt, negative, p.prompt_options)?;
    let time_ids = model.time_ids(p, p.aesthetic_score);
    let (context, pooled, time_ids) = if guided {
        let negative_time_ids = model.time_ids(p, p.negative_aesthetic_score);
        (
            gpu.concat(&negative_prompt_embeds, &prompt_embeds, 0)?,
            gpu.concat(&negative_pooled_prompt_embeds, &pooled_prompt_embeds, 0)?,
            [negative_time_ids, time_ids].concat(),
        )
    } else {
        (prompt_embeds, pooled_prompt_embeds, time_ids)
    };
    // An inpainting UNet's extra channels, once per batch.
    let extra = match inpaint.and_then(|i| i.extra.as_ref()) {
        Some(extra) if guided => Some(gpu.concat(extra, extra, 0)?),
        extra => extra.cloned(),
    };
    // The previous step's x0, for multistep samplers.
    let mut previous: Option<Tensor> = None;
    for i in 0..schedule.num_steps() {
        let step = schedule.step(i);
        let input = if guided { gpu.concat(&latents, &latents, 0)? } else { latents.clone() };
        let input = if step.input_scale != 1.0 { gpu.scale(&input, step.input_scale)? } else { input };
        let input = match &extra {
            Some(extra) => gpu.concat(&input, extra, 1)?,
            None => input,
        };
        let mut prediction = model.unet.forward(gpu, &input, schedule.timesteps[i], &context, &pooled, &time_ids)?;
        if guided {
            let (uncond, text) = (gpu.narrow(&prediction, 0, 1)?, gpu.narrow(&prediction, 1, 1)?);
            prediction = gpu.axpby(1.0 - p.guidance, &uncond, p.guidance, &text)?;
        }
        let u = step.update;
        let x0 = if u.uses_denoised() { Some(denoised(gpu, step, &latents, &prediction)?) } else { None };
        let noise = match u.noise {
            Some(_) => Some(gpu.upload(&generator.randn(latents.len()), latents.shape())?),
            None => None,
        };
        let next = combine(
            gpu,
            &[
                (u.latents, Some(&latents)),
                (u.prediction, Some(&prediction)),
                (u.denoised, x0.as_ref()),
                (u.previous_denoised, previous.as_ref()),
                (u.noise.unwrap_or(0.0), noise.as_ref()),
            ],
        )?;
        // An ordinary UNet inpaints by keeping the original outside the mask, noised to the
        // level of the next step (not at all after the last).
        let next = match inpaint.and_then(|i| i.original.as_ref().map(|o| (&i.mask, o))) {
            Some((mask, (original, noise))) => {
                let kept = match i + 1 < schedule.num_steps() {
                    true => {
                        let (a, b) = schedule.add_noise_at(i + 1);
                        gpu.axpby(a, original, b, noise)?
                    }
                    false => original.clone(),
                };
                let repainted = gpu.mul(&gpu.axpby(1.0, &next, -1.0, &kept)?, mask)?;
                gpu.add(&kept, &repainted)?
            }
            None => next,
        };
        gpu.sync().await?;
        let progress = StepProgress { stage, step: i + 1, steps: schedule.num_steps() };
        let estimate = Estimate { latents: &latents, prediction: &prediction, step, next: &next };
        observer.event(gpu, Event::Step { progress, estimate }).await?;
        previous = x0;
        latents = next;
    }
    Ok(latents)
}
