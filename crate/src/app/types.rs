//! The requests, results and events both fronts share, as the JS API sees them (camelCase).
//! Doc comments here are the TypeScript declarations' too.

use serde::{Deserialize, Serialize};
use tsify::Tsify;

use super::de;
use crate::gpu::Precision;
use crate::pipeline::generate::Stage;
use crate::quant::QuantPreset;
use crate::scheduler::{SamplerChoice, TimestepSpacing};

/// The options of a generation (the JS API's `generate()` takes these with its images and callbacks).
#[derive(Debug, Clone, Default, Deserialize, Tsify)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: String,
    #[tsify(optional)]
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Multiples of 8 (default 1024; with an image, the image's).
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::count")]
    pub width: Option<usize>,
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::count")]
    pub height: Option<usize>,
    /// Default 30.
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::count")]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default 5; at most 1 skips the unconditional pass).
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::finite_f32")]
    pub guidance: Option<f32>,
    /// Default: random (reported in the result).
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::seed")]
    pub seed: Option<u64>,
    /// Fraction of the schedule after which the refiner takes over (default 0.8 when one is loaded); null: base only.
    #[tsify(optional, type = "number | null")]
    #[serde(default, deserialize_with = "de::nullable_finite")]
    pub refiner_start: Option<Option<f64>>,
    /// The sampler (default: the model's scheduler_config.json; few-step Turbo/Lightning models name theirs).
    #[tsify(optional, type = "Scheduler | null")]
    #[serde(default, deserialize_with = "de::choice")]
    pub scheduler: Option<SamplerChoice>,
    /// How the steps spread over the noise levels (default: the model's config; few-step models use 'trailing').
    #[tsify(optional, type = "TimestepSpacing | null")]
    #[serde(default, deserialize_with = "de::choice")]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Encode prompts past 75 tokens in windows of 75 (lpw_stable_diffusion_xl); default false: truncated as diffusers.
    #[tsify(optional)]
    #[serde(default)]
    pub long_prompt: bool,
    /// Read A1111 weights `(word:1.2)`, `(word)`, `[word]` (lpw_stable_diffusion_xl) and `<lora:ID:WEIGHT>` tags naming stored LoRAs; default false: brackets are text.
    #[tsify(optional)]
    #[serde(default)]
    pub prompt_weighting: bool,
    /// Stored LoRAs (see storeLora) applied to the base, each at its weight (negative subtracts; 0 leaves it out).
    #[tsify(optional)]
    #[serde(default)]
    pub loras: Vec<LoraWeight>,
    /// How much of the schedule img2img and inpainting run, in (0, 1]: default 0.9999 with a mask or outpaint, 0.3 without.
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::finite")]
    pub strength: Option<f64>,
    /// Outpainting: pixels added [left, top, right, bottom] around `image` (edges repeated), then inpainted; the new size must stay a multiple of 8.
    #[tsify(optional, type = "[number, number, number, number]")]
    #[serde(default, deserialize_with = "de::sides")]
    pub outpaint: Option<[usize; 4]>,
    /// Outpainting: how many pixels into the image the repainted area reaches (default 0).
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::count")]
    pub outpaint_overlap: Option<usize>,
    /// diffusers' padding_mask_crop: inpaint only the region around the mask, padded by this many pixels, at width × height (default the image's), then paste it back into the image (any size) through the mask as given, soft edges blending.
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::count")]
    pub mask_padding: Option<usize>,
    /// diffusers' mask_processor.blur: blur the mask first by this Gaussian radius (PIL's), softening the paste-back of maskPadding runs.
    #[tsify(optional, type = "number")]
    #[serde(default, deserialize_with = "de::finite_f32")]
    pub mask_blur: Option<f32>,
    /// What decodes the final image: 'vae' (default) or 'taesd', the loaded preview decoder (fast, approximate; needs loadPreviewDecoder()).
    #[tsify(optional)]
    #[serde(default)]
    pub final_decoder: FinalDecoder,
}

/// A LoRA of a generation at its weight.
#[derive(Debug, Clone, Deserialize, Tsify)]
#[serde(deny_unknown_fields)]
pub struct LoraWeight {
    /// The stored LoRA's id (the CLI: its file).
    pub model: String,
    #[tsify(type = "number")]
    #[serde(deserialize_with = "de::required_f32")]
    pub weight: f32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Tsify)]
#[serde(rename_all = "lowercase")]
pub enum FinalDecoder {
    #[default]
    Vae,
    Taesd,
}

/// Options of the engine's creation.
#[derive(Debug, Default, Deserialize, Tsify)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct CreateRequest {
    /// 'auto' uses f16 where the adapter has shader-f16 (default).
    #[tsify(optional, type = "'auto' | 'f16' | 'f32'")]
    #[serde(deserialize_with = "de::choice")]
    pub precision: Option<Precision>,
    /// The IndexedDB database for models (default 'sdxl-models'; LoRAs and preview decoders in the ones named this + '-loras' / '-decoders').
    #[tsify(optional)]
    pub store_name: Option<String>,
}

/// A model (or LoRA, or preview decoder) as the engine gets it: where it comes from when it is
/// not stored, a URL (a pack, a diffusers folder, a single .safetensors / .gguf) or, with `file`
/// (its name), the picked File passed beside the options; and its store id.
#[derive(Debug, Clone, Default, Deserialize, Tsify)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// Default: the URL's last part (or the file's name) with characters outside `A-Za-z0-9._-`
    /// as `-`, then for a model `-` and the preset (`stable-diffusion-xl-base-1.0-q4`), for a LoRA
    /// or decoder without `.safetensors` (what `<lora:NAME:WEIGHT>` tags name).
    #[tsify(optional)]
    pub id: Option<String>,
    #[tsify(optional)]
    pub url: Option<String>,
    /// The picked file's name.
    #[tsify(optional)]
    pub file: Option<String>,
}

/// A model as loaded or stored: its store id, and its URL or picked file's name (neither: loaded
/// by id alone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Tsify)]
pub struct LoadedModel {
    pub id: String,
    #[tsify(optional)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The picked file's name.
    #[tsify(optional)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// The models to load.
#[derive(Debug, Deserialize, Tsify)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub base: ModelSpec,
    #[tsify(optional, type = "ModelSpec | null")]
    #[serde(default)]
    pub refiner: Option<ModelSpec>,
    /// Weight format on the GPU and in storage (default 'q4').
    #[tsify(optional, type = "Quant")]
    #[serde(default = "default_quant", deserialize_with = "de::required_choice")]
    pub quant: QuantPreset,
}

fn default_quant() -> QuantPreset {
    QuantPreset::Q4
}

/// What load() made the loaded models.
#[derive(Debug, Clone, Serialize, Tsify)]
pub struct LoadedModels {
    pub base: LoadedModel,
    #[tsify(type = "LoadedModel | null")]
    pub refiner: Option<LoadedModel>,
    #[tsify(type = "Quant")]
    pub quant: &'static str,
}

/// A part of `sdxl bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Tsify)]
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum BenchPart {
    Kernels,
    Unet,
    /// The VAE decodes and the TAESD-XL preview decode.
    Vae,
}

/// What `sdxl bench` measures.
#[derive(Debug, Default, Deserialize, Tsify)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct BenchRequest {
    /// Square image sizes, multiples of 8 (default [512, 1024]); the kernels use the largest.
    #[tsify(optional, type = "number[]")]
    #[serde(deserialize_with = "de::counts")]
    pub sizes: Option<Vec<usize>>,
    /// Weight formats of the UNet steps (default all).
    #[tsify(optional, type = "Quant[]")]
    #[serde(deserialize_with = "de::choices")]
    pub quants: Option<Vec<QuantPreset>>,
    /// LoRA ranks whose per-step cost is measured on the UNet (default [32, 128]; [] for none).
    #[tsify(optional, type = "number[]")]
    #[serde(deserialize_with = "de::counts")]
    pub loras: Option<Vec<usize>>,
    /// Which parts to run (default all).
    #[tsify(optional)]
    pub only: Option<Vec<BenchPart>>,
    /// The model's name, and its unet/config.json and vae/config.json texts (default: SDXL 1.0 base).
    #[tsify(optional)]
    pub model: Option<String>,
    #[tsify(optional)]
    pub unet_config: Option<String>,
    #[tsify(optional)]
    pub vae_config: Option<String>,
}

/// Bytes moving: a download into the store (a folder or single file converted as it streams), an
/// import of a picked file, checksum checks of what is stored, an upload to the GPU.
#[derive(Debug, Clone, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub struct Transfer {
    /// The model's (or LoRA's) store id.
    pub model: String,
    #[tsify(type = "number")]
    pub loaded: u64,
    #[tsify(type = "number")]
    pub total: u64,
    #[tsify(optional)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A step of a generation.
#[derive(Debug, Clone, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub struct StepProgressEvent {
    pub stage: Stage,
    /// 1-based step within the stage.
    #[tsify(type = "number")]
    pub step: usize,
    #[tsify(type = "number")]
    pub steps: usize,
    /// The preview's size, when the step carries one.
    #[tsify(optional, type = "number")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview_width: Option<usize>,
    #[tsify(optional, type = "number")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview_height: Option<usize>,
    /// 'taesd' when the preview decoder made the preview.
    #[tsify(optional, type = "'taesd'")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview_decoder: Option<&'static str>,
}

/// What the engine reports while it works.
#[derive(Debug, Clone, Serialize, Tsify)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EngineEvent {
    Download(Transfer),
    Import(Transfer),
    Verify(Transfer),
    Upload(Transfer),
    Encode { stage: Stage },
    Step(StepProgressEvent),
    Decode,
    /// A bench measurement starts.
    Bench { what: String },
}

/// Milliseconds per phase; each stage's time includes its prompt encoding.
#[derive(Debug, Clone, Default, Serialize, Tsify)]
pub struct Timings {
    #[tsify(optional)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<f64>,
    #[tsify(optional)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refiner: Option<f64>,
    #[tsify(optional)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode: Option<f64>,
    pub total: f64,
}

/// A generated image as the engine describes it (its PNG crosses beside this, as bytes).
#[derive(Debug, Clone, Serialize, Tsify)]
pub struct GenerateOutput {
    /// The recipe, as the PNG's `parameters` text chunk holds it (AUTOMATIC1111 format).
    pub parameters: String,
    #[tsify(type = "number")]
    pub seed: u64,
    #[tsify(type = "number")]
    pub width: usize,
    #[tsify(type = "number")]
    pub height: usize,
    pub timings: Timings,
}

/// The GPU adapter the engine runs on.
#[derive(Debug, Clone, Serialize, Tsify)]
#[serde(rename_all = "camelCase")]
pub struct AdapterInfo {
    pub adapter: String,
    #[tsify(type = "'f16' | 'f32'")]
    pub precision: &'static str,
    pub shader_f16: bool,
    #[tsify(type = "number")]
    pub max_buffer_bytes: u64,
}
