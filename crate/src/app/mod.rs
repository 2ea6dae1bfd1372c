//! The application layer under both fronts (`cli` and `web`): what a user asks for, as typed
//! requests, turned into the pipeline's inputs, and the pipeline's outputs turned into what the
//! user gets back. A generation request with its images → [`Prepared`] (`GenerateParams`, the
//! crop of a masked-area run, the prompt's LoRA tags); the generated pixels → the PNG with its
//! recipe ([`render`]); a bench request → the bench's model and options.
//!
//! The request, result and event types are also the JS API's: the engine reads and writes them
//! as JS values (serde-wasm-bindgen) and web/sdxl.d.ts declares them from here (tsify; the
//! `typescript` test fails when the committed declarations are stale).

pub mod de;
mod types;

pub use types::*;

use crate::bench::{BenchModel, BenchOptions};
use crate::error::{Error, Result};
use crate::pipeline::crop::{crop_for_run, gaussian_blur, CropRun, Pixels};
use crate::pipeline::generate::{outpaint_canvas, GenerateParams, InitImage, Mask, IMG2IMG_STRENGTH, INPAINT_STRENGTH};
use crate::pipeline::image::{self, LoraRecipe};
use crate::pipeline::lora::prompt_tags;
use crate::pipeline::prompt::PromptOptions;
use crate::quant::QuantPreset;

/// How a front names the options in its messages: `--mask-blur` on the command line, `maskBlur`
/// in the JS API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Cli,
    Web,
}

impl Front {
    /// An option by its request field name (snake case).
    pub fn option(self, field: &str) -> String {
        match (self, field) {
            (Front::Cli, "image") => "--init-image".into(),
            (Front::Cli, "negative_prompt") => "--negative".into(),
            (Front::Cli, _) => format!("--{}", field.replace('_', "-")),
            (Front::Web, _) => {
                let mut words = field.split('_');
                let first = words.next().unwrap_or_default().to_string();
                words.fold(first, |name, w| name + &w[..1].to_uppercase() + &w[1..])
            }
        }
    }

    /// What an option requires, as a phrase: "--init-image" / "an image".
    fn needs(self, field: &str) -> String {
        match (self, field) {
            (Front::Web, "image") => "an image".into(),
            (Front::Web, "mask") => "a mask".into(),
            _ => self.option(field),
        }
    }
}

/// An image input as its front names it in messages ("--init-image photo.png", "image").
pub struct Input {
    pub name: String,
    pub picture: Picture,
}

/// An image: PNG bytes (decoded as the CLI decodes its files) or 8-bit RGBA pixels.
pub enum Picture {
    Png(Vec<u8>),
    Rgba { width: usize, height: usize, data: Vec<u8> },
}

impl Input {
    fn image(self) -> Result<InitImage> {
        match self.picture {
            Picture::Png(bytes) => image::decode_png(&bytes),
            Picture::Rgba { width, height, data } => image::image_from_pixels(width, height, 4, &data),
        }
        .map_err(|e| in_context(&self.name, e))
    }

    /// 8-bit pixels: RGB, or (`gray`) a grey mask as given.
    fn pixels(self, gray: bool) -> Result<Pixels> {
        match self.picture {
            Picture::Png(bytes) => image::decode_png_pixels(&bytes, gray),
            Picture::Rgba { width, height, data } if gray => image::gray_pixels(width, height, 4, &data),
            Picture::Rgba { width, height, data } => image::rgb_pixels(width, height, 4, &data),
        }
        .map_err(|e| in_context(&self.name, e))
    }
}

/// A generation ready to run.
pub struct Prepared {
    /// The prompt without its `<lora:...>` tags (with prompt weighting on).
    pub params: GenerateParams,
    /// The prompt as typed, tags included: what the recipe records.
    pub typed_prompt: String,
    /// The prompt's `<lora:NAME:WEIGHT>` tags.
    pub lora_tags: Vec<(String, f32)>,
    /// A run on a crop around the mask, pasted back into the image afterwards.
    pub crop: Option<CropRun>,
}

fn in_context(name: &str, e: Error) -> Error {
    match e {
        Error::InvalidParameter(m) => Error::InvalidParameter(format!("{name}: {m}")),
        e => e,
    }
}

/// The pipeline's inputs for `request` with its image and mask: the mask blurred
/// (`mask_blur`), the crop around it (`mask_padding`) or the outpainting canvas (`outpaint`),
/// the defaults (the image's size; strength 0.9999 with a mask, 0.3 without), and every option
/// that needs another refused without it. `seed`: the seed when the request has none.
pub fn prepare(request: &GenerateRequest, image: Option<Input>, mask: Option<Input>, front: Front, seed: u64) -> Result<Prepared> {
    let name = |field: &str| front.option(field);
    let needs = |field: &str, inputs: &[&str]| {
        let wanted: Vec<String> = inputs.iter().map(|i| front.needs(i)).collect();
        Error::InvalidParameter(format!("{} needs {}", name(field), wanted.join(" and ")))
    };
    // The mask in grey as given, blurred as diffusers' mask_processor.blur(mask, mask_blur).
    let soft_mask = match (mask, request.mask_blur) {
        (Some(mask), blur) => {
            let gray = mask.pixels(true)?;
            Some(match blur {
                Some(radius) => gaussian_blur(&gray, radius).map_err(|e| in_context(&name("mask_blur"), e))?,
                None => gray,
            })
        }
        (None, Some(_)) => return Err(needs("mask_blur", &["mask"])),
        (None, None) => None,
    };
    if request.outpaint_overlap.is_some() && request.outpaint.is_none() {
        return Err(needs("outpaint_overlap", &["outpaint"]));
    }
    let (init_image, mask, crop) = match (request.mask_padding, image, soft_mask, request.outpaint) {
        (Some(_), _, _, Some(_)) => {
            return Err(Error::InvalidParameter(format!("{} crops around the mask: leave out {}", name("mask_padding"), name("outpaint"))));
        }
        // Inpainting a crop around the mask: the run's size is width x height (the image's by default).
        (Some(padding), Some(image), Some(soft_mask), None) => {
            let original = image.pixels(false)?;
            let (width, height) = (request.width.unwrap_or(original.width), request.height.unwrap_or(original.height));
            let crop = crop_for_run(&original, &soft_mask, width, height, padding)?;
            (Some(crop.image.clone()), Some(crop.mask.clone()), Some(crop))
        }
        (Some(_), _, _, None) => return Err(needs("mask_padding", &["image", "mask"])),
        (None, None, Some(_), _) => return Err(needs("mask", &["image"])),
        (None, None, None, Some(_)) => return Err(needs("outpaint", &["image"])),
        (None, Some(_), Some(_), Some(_)) => {
            return Err(Error::InvalidParameter(format!("{} makes its own mask: leave out {}", name("outpaint"), name("mask"))));
        }
        (None, image, soft_mask, outpaint) => {
            let image = image.map(Input::image).transpose()?;
            let mask = soft_mask.map(|g| Mask::from_gray(g.width, g.height, g.data.iter().map(|&v| v as f32 / 255.0)));
            match (image, outpaint) {
                (Some(image), Some(sides)) => {
                    let (canvas, mask) = outpaint_canvas(&image, sides, request.outpaint_overlap.unwrap_or(0))?;
                    (Some(canvas), Some(mask), None)
                }
                (image, _) => (image, mask, None),
            }
        }
    };
    if request.strength.is_some() && init_image.is_none() {
        return Err(needs("strength", &["image"]));
    }
    // The recipe keeps the prompt as typed, <lora:...> tags included.
    let (prompt, lora_tags) = match request.prompt_weighting {
        true => prompt_tags(&request.prompt)?,
        false => (request.prompt.clone(), Vec::new()),
    };
    let defaults = GenerateParams::default();
    // img2img and inpainting run at the image's size.
    let (width, height) = init_image.as_ref().map_or((defaults.width, defaults.height), |i| (i.width, i.height));
    let strength = if mask.is_some() { INPAINT_STRENGTH } else { IMG2IMG_STRENGTH };
    let params = GenerateParams {
        prompt,
        negative: request.negative_prompt.clone(),
        width: request.width.unwrap_or(width),
        height: request.height.unwrap_or(height),
        steps: request.steps.unwrap_or(defaults.steps),
        guidance: request.guidance.unwrap_or(defaults.guidance),
        seed: request.seed.unwrap_or(seed),
        refiner_start: request.refiner_start.flatten().unwrap_or(defaults.refiner_start),
        scheduler: request.scheduler,
        timestep_spacing: request.timestep_spacing,
        strength: request.strength.unwrap_or(strength),
        init_image,
        mask,
        prompt_options: PromptOptions { long_prompt: request.long_prompt, weighting: request.prompt_weighting },
        ..defaults
    };
    Ok(Prepared { params, typed_prompt: request.prompt.clone(), lora_tags, crop })
}

/// What the recipe names besides the settings.
pub struct RecipeSources<'a> {
    /// The sampler's name as A1111 writes it.
    pub sampler: &'a str,
    pub model: &'a str,
    pub refiner: Option<&'a str>,
    pub loras: &'a [LoraRecipe],
    /// Whether TAESD decoded the final image.
    pub taesd: bool,
}

/// A generated image as the user gets it.
pub struct Rendered {
    pub png: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// The recipe in A1111's `parameters` format (also in the PNG).
    pub recipe: String,
}

/// The generated image (RGB planes in 0..1 at the run's size) as a PNG with its recipe; a crop
/// run pasted back into the whole image.
pub fn render(prepared: &Prepared, pixels: &[f32], sources: &RecipeSources) -> Result<Rendered> {
    let params = &prepared.params;
    let typed = GenerateParams { prompt: prepared.typed_prompt.clone(), ..params.clone() };
    let recipe = image::parameters(&typed, sources.sampler, sources.model, sources.refiner, sources.loras);
    let recipe = if sources.taesd { image::with_entry(recipe, "VAE", "TAESD") } else { recipe };
    match &prepared.crop {
        Some(crop) => {
            let pasted = crop.paste_back(pixels);
            let recipe = image::with_entry(recipe, "Masked area padding", &crop.padding.to_string());
            let png = image::encode_png(&pasted.data, pasted.width, pasted.height, &recipe)?;
            Ok(Rendered { png, width: pasted.width, height: pasted.height, recipe })
        }
        None => {
            let png = image::encode_png(&image::rgb8(pixels, params.height, params.width), params.width, params.height, &recipe)?;
            Ok(Rendered { png, width: params.width, height: params.height, recipe })
        }
    }
}

/// A store id made of a URL's last part (or a file's name): characters outside `A-Za-z0-9._-` as
/// `-`, leading dots dropped.
fn store_name(url: &str) -> String {
    let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let last = last.split(['?', '#']).next().unwrap_or_default();
    let name: String = last.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect();
    name.trim_start_matches('.').to_string()
}

/// A model's store id when none is given: its name and the preset.
pub fn store_id(url: &str, quant: QuantPreset) -> String {
    format!("{}-{}", store_name(url), quant.name())
}

/// A LoRA's (or preview decoder's) store id when none is given: its file's name without
/// `.safetensors`, as `<lora:NAME:WEIGHT>` tags name it.
pub fn file_id(url: &str) -> String {
    let name = store_name(url);
    // ASCII only (store_name replaced the rest), so the suffix's length in bytes is its own.
    match name.to_ascii_lowercase().ends_with(".safetensors") {
        true => name[..name.len() - ".safetensors".len()].to_string(),
        false => name,
    }
}

impl ModelSpec {
    /// The spec with its store id: the one given, or `default_id` of its URL or file name.
    pub fn resolve(&self, default_id: impl Fn(&str) -> String) -> Result<LoadedModel> {
        let id = match (&self.id, self.url.as_deref().or(self.file.as_deref())) {
            (Some(id), _) => id.clone(),
            (None, Some(source)) => default_id(source),
            (None, None) => return Err(Error::InvalidParameter("a model needs an id, a url or a file".into())),
        };
        if id.is_empty() {
            return Err(Error::InvalidParameter("a model's id is empty".into()));
        }
        Ok(LoadedModel { id, url: self.url.clone(), file: self.file.clone() })
    }
}

/// The bench's model (the request's configs, or SDXL 1.0 base) and options.
pub fn bench_plan(request: BenchRequest) -> Result<(BenchModel, BenchOptions)> {
    let model = match (request.unet_config, request.vae_config) {
        (Some(unet), Some(vae)) => BenchModel { name: request.model.unwrap_or_else(|| "custom".into()), unet_config: unet.into(), vae_config: vae.into() },
        (None, None) => BenchModel::sdxl_base(),
        _ => return Err(Error::InvalidParameter("bench: give both the UNet's and the VAE's config, or neither".into())),
    };
    let mut options = BenchOptions::default();
    if let Some(sizes) = request.sizes {
        options.sizes = sizes;
    }
    if let Some(quants) = request.quants {
        options.quants = quants;
    }
    if let Some(ranks) = request.loras {
        if ranks.contains(&0) {
            return Err(Error::InvalidParameter("bench loras: ranks are at least 1".into()));
        }
        options.lora_ranks = ranks;
    }
    if let Some(only) = request.only {
        (options.kernels, options.unet, options.vae) = (only.contains(&BenchPart::Kernels), only.contains(&BenchPart::Unet), only.contains(&BenchPart::Vae));
    }
    Ok((model, options))
}
