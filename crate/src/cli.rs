//! The `sdxl` command line (native only): clap parses it into one `…Args` struct per command,
//! and each command's function runs it.

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{self, BenchPart, BenchRequest, Front, GenerateRequest, RecipeSources};
use crate::bench;
use crate::models::taesd::TaesdDecoder;
use crate::pipeline::generate::{generate_with, GenerateParams, SdxlModel, Stage, StepProgress};
use crate::pipeline::image;
use crate::pipeline::lora::LoraChoice;
use crate::pipeline::prompt::{PromptEncoder, PromptOptions};
use crate::pipeline::quality::{allocate, quality, sensitivity, FormatErrors};
use crate::pipeline::ModelIndex;
use crate::pack::{self, ConvertOptions};
use crate::quant::{QuantFormat, QuantPolicy, QuantPreset};
use crate::scheduler::{SamplerChoice, TimestepSpacing};
use crate::store::{DirStore, DownloadOptions, ModelStore};
use crate::weights::lora::LoraFile;
use crate::weights::{safetensors, DirSource, ModelSource, SharedSource};
use crate::{Error, Gpu, Precision, Result};

/// Stable Diffusion XL on the GPU (Vulkan, Metal or DX12 through wgpu): text to image, img2img,
/// inpainting and outpainting, model packs, and measurements of quality and speed.
///
/// `sdxl COMMAND --help` describes a command, the model formats it reads and every option.
/// A Vulkan/Metal/DX12 driver is needed (`apt-get install mesa-vulkan-drivers` gives the software
/// lavapipe driver).
#[derive(Parser)]
// An option given twice takes its last value, as the hand-written parser before clap did.
#[command(name = "sdxl", version, arg_required_else_help = true, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Encode(EncodeArgs),
    Generate(Box<GenerateArgs>),
    Convert(ConvertArgs),
    Download(DownloadArgs),
    /// Lists the stored models, verifies one against its sha256 or deletes models.
    ///
    /// The store folder holds the model packs `sdxl download` wrote, one folder per ID, each a
    /// model pack that `generate --model STORE/ID` reads.
    #[command(subcommand)]
    Store(StoreCommand),
    Quality(QualityArgs),
    Bench(BenchArgs),
    /// Prints the GPU adapter and its features.
    Info,
}

/// Encodes a prompt with the model's text encoders into a .safetensors file.
///
/// Takes any model `generate --model` takes and writes prompt_embeds, pooled_prompt_embeds,
/// negative_prompt_embeds and negative_pooled_prompt_embeds (f32), as diffusers' encode_prompt.
/// Without --negative, a model with force_zeros_for_empty_prompt gets zero negative embeddings.
#[derive(clap::Args)]
struct EncodeArgs {
    /// The model: a diffusers folder, a model pack or a single-file checkpoint (see `generate --help`).
    #[arg(long, value_name = "DIR|FILE")]
    model: String,
    /// A diffusers folder whose configs replace those of a single-file --model (its weights are not read).
    #[arg(long, value_name = "DIR")]
    config: Option<String>,
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    prompt: String,
    /// The negative prompt (see above when left out).
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    negative: Option<String>,
    /// The .safetensors file written.
    #[arg(long, value_name = "FILE.safetensors")]
    out: String,
    /// The float type of weights and activations on the GPU (auto: f16 where the adapter has shader-f16).
    #[arg(long, value_name = "auto|f32|f16", default_value = "auto")]
    precision: Precision,
    #[command(flatten)]
    prompt_options: PromptArgs,
}

// How encode and generate encode prompts. (No doc comment: a flattened struct's would replace the
// command's description.)
#[derive(clap::Args)]
pub(crate) struct PromptArgs {
    /// Prompts past 75 tokens: truncated (diffusers' pipeline), or chunked in windows of 75.
    ///
    /// `chunked` switches to lpw_stable_diffusion_xl's encoding (docs/samplers.md: long prompts).
    #[arg(long, value_enum, default_value_t = LongPrompt::Truncate)]
    long_prompt: LongPrompt,
    /// `on` reads (word:1.2) weights in the prompts, and <lora:NAME:WEIGHT> tags in generate's prompt
    /// (see --lora-dir).
    ///
    /// `on` switches to lpw_stable_diffusion_xl's encoding (docs/samplers.md: long prompts).
    #[arg(long, value_enum, default_value_t = PromptWeighting::Off)]
    prompt_weighting: PromptWeighting,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum LongPrompt {
    Truncate,
    Chunked,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum PromptWeighting {
    Off,
    On,
}

impl PromptArgs {
    pub(crate) fn options(&self) -> PromptOptions {
        PromptOptions { long_prompt: self.long_prompt == LongPrompt::Chunked, weighting: self.prompt_weighting == PromptWeighting::On }
    }
}

/// Text to image (or img2img, inpainting, outpainting) into a PNG with its recipe.
///
/// Runs diffusers' StableDiffusionXLPipeline: classifier-free guidance when --guidance is above 1;
/// 0 or 1 runs the UNet once per step, as few-step Turbo/Lightning models want. With --refiner,
/// the refiner takes over after --refiner-start of the schedule. The same --seed gives diffusers'
/// image. Progress goes to stderr per step. The PNG records the recipe in a `parameters` text
/// chunk (AUTOMATIC1111's format).
///
/// --init-image: img2img as StableDiffusionXLImg2ImgPipeline at the image's size, noised to
/// --strength of the schedule; with --refiner and no --model, the refiner alone refines the image
/// (SDEdit). --mask: inpainting as StableDiffusionXLInpaintPipeline (white repaints, black keeps;
/// grey binarized at 0.5; the image's size; --strength defaults to 0.9999) with an inpainting UNet
/// (9 input channels) or an ordinary one (the original kept outside the mask each step);
/// --outpaint extends the canvas and inpaints the new area. docs/inpainting.md.
///
/// --model / --refiner take a diffusers-layout folder (text encoders with or without
/// transformers 5's missing `text_model.` prefix, sharded or not), a model pack (a folder with
/// manifest.json, from `sdxl convert`: loaded as stored, so --quant must be left out or match its
/// preset), or a single-file checkpoint: an original SGM .safetensors (sd_xl_base_1.0.safetensors
/// layout, or a fine-tune saved so; F32, F16, BF16, F8_E4M3, F8_E5M2) or a GGUF of one
/// (stable-diffusion.cpp's naming; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K,
/// Q5_K, Q6_K; quantized weights stay as stored). A single file's configs are inferred from its
/// tensors (SDXL 1.0's files otherwise, shipped in the binary); --config (--refiner-config for the
/// refiner) overrides them. Pickle checkpoints (.ckpt, .bin) are refused: use safetensors.
#[derive(clap::Args)]
pub(crate) struct GenerateArgs {
    /// The base model: a diffusers folder, a model pack or a single-file checkpoint (see above).
    #[arg(long, value_name = "DIR|FILE")]
    pub model: Option<String>,
    /// A diffusers-layout folder whose configs replace those of a single-file --model (its weights
    /// are not read).
    #[arg(long, value_name = "DIR")]
    pub config: Option<String>,
    /// The refiner, in any format --model takes: it takes over after --refiner-start of the schedule.
    #[arg(long, value_name = "DIR|FILE")]
    pub refiner: Option<String>,
    /// --config for a single-file --refiner.
    #[arg(long, value_name = "DIR")]
    pub refiner_config: Option<String>,
    /// What the image shows.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub prompt: String,
    /// What the image should not show.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub negative: Option<String>,
    /// Image width, a multiple of 8 [default: the init image's, else 1024].
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// Image height, a multiple of 8 [default: the init image's, else 1024].
    #[arg(long, allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Denoising steps of the whole schedule.
    #[arg(long, default_value_t = GenerateParams::default().steps, allow_negative_numbers = true)]
    pub steps: usize,
    /// Classifier-free guidance scale: 0 or 1 runs without it.
    #[arg(long, default_value_t = GenerateParams::default().guidance, allow_negative_numbers = true)]
    pub guidance: f32,
    /// The seed of the initial noise: the same seed gives diffusers' image.
    #[arg(long, default_value_t = GenerateParams::default().seed, allow_negative_numbers = true)]
    pub seed: u64,
    /// The fraction of the schedule the base runs before the refiner takes over.
    #[arg(long, default_value_t = GenerateParams::default().refiner_start, allow_negative_numbers = true)]
    pub refiner_start: f64,
    /// The PNG written.
    #[arg(long, value_name = "IMAGE.png")]
    pub out: String,
    /// The sampler [default: the model folder's scheduler_config.json].
    #[arg(long, value_name = "euler|euler_a|dpmpp_2m|dpmpp_2m_karras|ddim")]
    pub scheduler: Option<SamplerChoice>,
    /// How the steps spread over the training timesteps [default: the model folder's
    /// scheduler_config.json].
    #[arg(long, value_name = "leading|trailing|linspace")]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// img2img (or, with --mask / --outpaint, inpainting) from this image, at its size.
    #[arg(long, value_name = "IMAGE.png")]
    pub init_image: Option<String>,
    /// How much of the schedule the init image is noised to [default: 0.3, with a mask 0.9999].
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Inpainting: white repaints, black keeps (grey binarized at 0.5); the init image's size.
    #[arg(long, value_name = "MASK.png")]
    pub mask: Option<String>,
    /// Blurs the mask first by radius R (PIL's GaussianBlur, diffusers' mask_processor.blur): soft
    /// edges for the paste-back of --mask-padding.
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub mask_blur: Option<f32>,
    /// Inpaints only the region around the mask (diffusers' padding_mask_crop): padded by N and
    /// widened to --width x --height, at that size, then pasted back into the image (any size)
    /// through the mask as given (soft edges blend).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub mask_padding: Option<usize>,
    /// Extends the canvas by that many pixels per side (edges repeated) and inpaints the new area.
    #[arg(long, value_name = "LEFT,TOP,RIGHT,BOTTOM", value_parser = outpaint_sides)]
    pub outpaint: Option<[usize; 4]>,
    /// How many pixels into the old image the outpainted area reaches [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub outpaint_overlap: Option<usize>,
    /// Also writes f32 `noise`, `latents` and `image`.
    #[arg(long, value_name = "FILE.safetensors")]
    pub tensors_out: Option<String>,
    /// The float type of weights and activations on the GPU (auto: f16 where the adapter has shader-f16).
    #[arg(long, value_name = "auto|f32|f16", default_value = "auto")]
    pub precision: Precision,
    /// Keeps the UNet's and text encoders' weight matrices block-quantized on the GPU (quantized as
    /// they load).
    #[arg(long, value_name = "f16|q8|q4")]
    pub quant: Option<QuantPreset>,
    #[command(flatten)]
    pub prompt_options: PromptArgs,
    /// Adds a LoRA to the base (repeatable; weight 1 when left out, negative subtracts).
    ///
    /// kohya / A1111 (lora_unet_*, lora_te1_*, lora_te2_*, LoCon convolutions) or diffusers / peft
    /// naming, run beside the weights as stored (a q4 base stays q4, the LoRA is not quantized). The
    /// PNG recipe records the LoRAs as A1111 does (<lora:...> tags, Lora hashes). docs/lora.md.
    #[arg(long, value_name = "FILE[:WEIGHT]", allow_hyphen_values = true)]
    pub lora: Vec<String>,
    /// With --prompt-weighting on, each <lora:NAME:WEIGHT> tag of the prompt adds DIR/NAME.safetensors.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<String>,
    /// Makes the final image TAESD-XL's decode instead of the VAE's (fast, approximate).
    ///
    /// A diffusers AutoencoderTiny folder or one decoder .safetensors (e.g. madebyollin's
    /// taesdxl_decoder.safetensors); recorded as `VAE: TAESD`. Refused where its decode would not fit
    /// the adapter at this size.
    #[arg(long, value_name = "DIR|FILE")]
    pub taesd: Option<String>,
}

/// `--outpaint LEFT,TOP,RIGHT,BOTTOM`: the pixels added on each side.
fn outpaint_sides(sides: &str) -> Result<[usize; 4]> {
    let pad: Vec<usize> = sides.split(',').map(|v| v.trim().parse().ok()).collect::<Option<_>>().unwrap_or_default();
    pad.try_into().map_err(|_| Error::InvalidParameter(format!("--outpaint '{sides}' must be LEFT,TOP,RIGHT,BOTTOM pixel counts")))
}

/// Converts an SDXL model (base or refiner) into a model pack.
///
/// Takes any --model of generate but a pack, and writes manifest.json and shards/NNNNN.bin of at
/// most 64 MiB holding the configs, tokenizers and every tensor, with the text encoders' and
/// UNet's float weight matrices stored block-quantized as --quant says (GGUF blocks kept as
/// stored; the VAE and embedding tables stay dense f16).
#[derive(clap::Args)]
struct ConvertArgs {
    #[arg(long, value_name = "DIR|FILE")]
    from: String,
    /// A diffusers folder whose configs replace those of a single-file --from.
    #[arg(long, value_name = "DIR")]
    config: Option<String>,
    #[arg(long, value_name = "f16|q8|q4")]
    quant: QuantPreset,
    /// The pack folder: missing or empty (see --force).
    #[arg(long, value_name = "PACK_DIR")]
    out: String,
    /// Replaces a pack already at --out.
    #[arg(long)]
    force: bool,
    /// A smaller record size (tests).
    #[arg(long, value_name = "N", default_value_t = pack::SHARD_BYTES)]
    shard_bytes: u64,
}

/// Downloads a model into the store as a model pack, or resumes or repairs its download.
///
/// URL is a model pack, a diffusers-layout SDXL folder or a single .safetensors / .gguf file (http
/// or https, redirects followed; owner/name is a hub repository, owner/name/FILE a file in one),
/// e.g. `sdxl download stabilityai/stable-diffusion-xl-base-1.0 --quant q4`. It is stored as
/// STORE/ID, a model pack --model reads; a folder or file is converted with --quant as it streams
/// in. Run it again to resume an interrupted download or to re-fetch records that fail their sha256.
#[derive(clap::Args)]
struct DownloadArgs {
    /// What to download (or give it as --url).
    #[arg(value_name = "URL", required_unless_present = "url", conflicts_with = "url")]
    source: Option<String>,
    #[arg(long)]
    url: Option<String>,
    /// The model's name in the store [default: the URL's last part and the preset, as the JS API
    /// names it: stable-diffusion-xl-base-1.0-q4].
    #[arg(long)]
    id: Option<String>,
    #[arg(long, value_name = "f16|q8|q4")]
    quant: QuantPreset,
    #[command(flatten)]
    store: StoreDir,
    #[arg(long, value_name = "N", default_value_t = pack::SHARD_BYTES)]
    shard_bytes: u64,
}

#[derive(clap::Args)]
struct StoreDir {
    /// The store folder.
    #[arg(long, value_name = "DIR", default_value = "sdxl-models")]
    store: String,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Lists the stored models: sizes, complete or not, and where they came from.
    List(StoreDir),
    /// Checks one model's records against their sha256.
    Verify {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        store: StoreDir,
    },
    /// Deletes one model (--id), or every model.
    Delete {
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        store: StoreDir,
    },
}

/// Measures quantization error on a model.
///
/// Per-layer relative error of every UNet weight matrix in Q4_0, Q4_1 and Q8_0, the UNet output
/// error and the image PSNR of the q8 and q4 presets against dense weights (same seed).
///
/// With --sensitivity: the UNet output error when only one role (a weight's name without layer
/// indices) is quantized, per role and format, and the per-role formats that fit --budget bytes for
/// the UNet of SHAPES.json (e.g. tests/fixtures/reference/sdxl_unet_tensors.json, the real SDXL
/// shapes): how the q4 preset's exceptions were chosen.
#[derive(clap::Args)]
struct QualityArgs {
    #[arg(long, value_name = "DIR")]
    model: String,
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    prompt: String,
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    negative: Option<String>,
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    width: usize,
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    height: usize,
    #[arg(long, default_value_t = GenerateParams::default().steps, allow_negative_numbers = true)]
    steps: usize,
    #[arg(long, default_value_t = GenerateParams::default().guidance, allow_negative_numbers = true)]
    guidance: f32,
    #[arg(long, default_value_t = GenerateParams::default().seed, allow_negative_numbers = true)]
    seed: u64,
    /// The float type of weights and activations on the GPU (auto: f16 where the adapter has shader-f16).
    #[arg(long, value_name = "f32|f16|auto", default_value = "f32")]
    precision: Precision,
    /// Writes the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Measures each role's sensitivity and allocates --budget over the UNet of SHAPES.json.
    #[arg(long, value_name = "SHAPES.json")]
    sensitivity: Option<String>,
    /// The UNet's size in bytes that --sensitivity allocates (e.g. 1.6e9).
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    budget: Option<f64>,
}

/// Measures speed and memory with random weights generated on the GPU (no checkpoint needed).
///
/// The adapter's peaks (f32 FMA GFLOP/s, copy GB/s), the kernels on the model's real shapes at the
/// largest size (GFLOP/s or GB/s and % of peak), one UNet step with classifier-free guidance per
/// weight format and size (s/step, weight and peak GPU memory), alone and with a LoRA of each
/// --loras rank on every transformer Linear (its per-step cost), the VAE decode whole and tiled,
/// and one TAESD-XL preview decode per size (part of --only vae). Prints tables; --json writes the
/// report. docs/performance.md.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// A diffusers folder whose UNet and VAE configs give the shapes [default: the real SDXL 1.0 base].
    #[arg(long, value_name = "DIR")]
    pub model: Option<String>,
    /// Square image sizes [default: 512,1024].
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = bench_size)]
    pub sizes: Option<Vec<usize>>,
    /// Weight formats of the UNet steps [default: f16,q8,q4].
    #[arg(long, value_name = "f16|q8|q4,...", value_delimiter = ',', value_parser = |q: &str| q.trim().parse::<QuantPreset>())]
    pub quants: Option<Vec<QuantPreset>>,
    /// LoRA ranks measured on the UNet steps, or `none` [default: 32,128].
    #[arg(long, value_name = "RANK,...|none", value_delimiter = ',')]
    pub loras: Option<Vec<String>>,
    /// What runs [default: all of them].
    #[arg(long, value_name = "kernels|unet|vae,...", value_delimiter = ',', value_enum)]
    pub only: Option<Vec<BenchPart>>,
    /// The float type of weights and activations on the GPU (auto: f16 where the adapter has shader-f16).
    #[arg(long, value_name = "auto|f32|f16", default_value = "auto")]
    pub precision: Precision,
    /// Writes the report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
}

/// `--sizes 512,1024`: one square image size.
fn bench_size(size: &str) -> Result<usize> {
    let size = size.trim();
    size.parse().map_err(|_| Error::InvalidParameter(format!("--sizes: '{size}' is not a size")))
}

/// What `bench` measures as the app layer takes it: `--model`'s configs (or the real SDXL 1.0
/// base's), and the options given.
pub(crate) fn bench_request(args: &BenchArgs) -> Result<BenchRequest> {
    let read = |dir: &str, file: &str| std::fs::read_to_string(format!("{dir}/{file}")).map_err(|e| Error::Io { path: format!("{dir}/{file}"), message: e.to_string() });
    let (unet_config, vae_config) = match &args.model {
        Some(dir) => (Some(read(dir, "unet/config.json")?), Some(read(dir, "vae/config.json")?)),
        None => (None, None),
    };
    let loras = match args.loras.as_deref() {
        Some([none]) if none.trim() == "none" => Some(Vec::new()),
        Some(ranks) => Some(ranks.iter().map(|r| r.trim().parse().map_err(|_| Error::InvalidParameter(format!("--loras: '{r}' is not a rank")))).collect::<Result<_>>()?),
        None => None,
    };
    let model = args.model.as_deref().map(model_name);
    Ok(BenchRequest { sizes: args.sizes.clone(), quants: args.quants.clone(), loras, only: args.only.clone(), model, unet_config, vae_config })
}

/// A clap usage error as the typed error every other failure is: in the hand-written parser's
/// words where it had them (scripts and tests match them), in clap's otherwise.
fn usage_error(e: &clap::Error) -> Error {
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    };
    // clap names an option with its value, "--steps <STEPS>".
    let option = |arg: &String| arg.split(' ').next().unwrap_or_default().to_string();
    let first = |kind| context(kind).into_iter().next().unwrap_or_default();
    // clap lists its suggestions from the least to the most likely.
    let did_you_mean = |kind| context(kind).last().map_or(String::new(), |s| format!(" (did you mean '{s}'?)"));
    let (arg, value) = (option(&first(ContextKind::InvalidArg)), first(ContextKind::InvalidValue));
    let message = match e.kind() {
        ErrorKind::UnknownArgument => format!("unknown option '{}'{}", first(ContextKind::InvalidArg), did_you_mean(ContextKind::SuggestedArg)),
        ErrorKind::InvalidSubcommand => format!("unknown command '{}'{}; see sdxl --help", first(ContextKind::InvalidSubcommand), did_you_mean(ContextKind::SuggestedSubcommand)),
        ErrorKind::MissingRequiredArgument => context(ContextKind::InvalidArg).iter().map(|a| format!("{} is required", option(a))).collect::<Vec<_>>().join(", "),
        ErrorKind::InvalidValue if value.is_empty() => format!("{arg} needs a value"),
        ErrorKind::InvalidValue => match context(ContextKind::ValidValue).split_last() {
            Some((last, [])) => format!("{arg} '{value}' must be {last}"),
            Some((last, rest)) => format!("{arg} '{value}' must be {} or {last}", rest.join(", ")),
            None => format!("{arg} '{value}' is not a valid value"),
        },
        // The value parsers of this crate's types say what is wrong themselves.
        ErrorKind::ValueValidation => match std::error::Error::source(e).and_then(|s| s.downcast_ref::<Error>()) {
            Some(typed) => return typed.clone(),
            None => format!("{arg} '{value}' is not a valid value"),
        },
        _ => e.render().to_string().trim().trim_start_matches("error: ").to_string(),
    };
    Error::InvalidParameter(message)
}

fn write_safetensors(path: &str, host: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let views: Vec<_> = host.iter().map(|(n, s, d)| (*n, s.clone(), d.as_slice())).collect();
    std::fs::write(path, safetensors::serialize_f32(&views)).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })
}

async fn generate_command(args: &GenerateArgs) -> Result<()> {
    let read = |option: &str, path: &Option<String>| -> Result<Option<app::Input>> {
        let Some(path) = path else { return Ok(None) };
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })?;
        Ok(Some(app::Input { name: format!("{option} {path}"), picture: app::Picture::Png(bytes) }))
    };
    let prompt_options = args.prompt_options.options();
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        width: args.width,
        height: args.height,
        steps: Some(args.steps),
        guidance: Some(args.guidance),
        seed: Some(args.seed),
        refiner_start: Some(Some(args.refiner_start)),
        scheduler: args.scheduler,
        timestep_spacing: args.timestep_spacing,
        long_prompt: prompt_options.long_prompt,
        prompt_weighting: prompt_options.weighting,
        strength: args.strength,
        outpaint: args.outpaint,
        outpaint_overlap: args.outpaint_overlap,
        mask_padding: args.mask_padding,
        mask_blur: args.mask_blur,
        ..Default::default()
    };
    let prepared = app::prepare(&request, read("--init-image", &args.init_image)?, read("--mask", &args.mask)?, Front::Cli, args.seed)?;
    let params = &prepared.params;
    let out = &args.out;
    // A refiner on its own refines an image (SDEdit); with --model it takes over the last steps.
    let (model, refiner) = match (args.model.as_deref(), args.refiner.as_deref()) {
        (Some(model), refiner) => (model, refiner),
        (None, Some(refiner)) if params.init_image.is_some() => (refiner, None),
        (None, Some(_)) => return Err(Error::InvalidParameter("--refiner without --model needs --init-image (SDEdit refinement)".into())),
        (None, None) => return Err(Error::InvalidParameter("--model is required".into())),
    };
    let gpu = Gpu::new(args.precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let quant = args.quant;
    let taesd = match &args.taesd {
        Some(path) => Some(open_taesd(&gpu, path).await?),
        None => None,
    };
    // Single files take their configs from --config / --refiner-config (the refiner's when it runs alone).
    let config = if args.model.is_some() { args.config.as_deref() } else { args.refiner_config.as_deref() };
    let base = load_model(&gpu, model, config, quant).await?;
    let loras = open_loras(&args.lora, args.lora_dir.as_deref(), &prepared.lora_tags).await?;
    let choices: Vec<LoraChoice> = loras.iter().map(|(file, weight, _)| LoraChoice { file, weight: *weight }).collect();
    base.set_loras(&gpu, &choices).await?;
    let mut recipes = Vec::new();
    for (file, weight, name) in &loras {
        recipes.push(image::LoraRecipe { name: name.clone(), weight: *weight, hash: file.short_hash().await? });
    }
    let refiner_model = match refiner {
        Some(dir) => Some(load_model(&gpu, dir, args.refiner_config.as_deref(), quant).await?),
        None => None,
    };
    let result = generate_with(&gpu, &base, refiner_model.as_ref(), params, taesd.as_ref(), |p: StepProgress| {
        let stage = if p.stage == Stage::Base { "base" } else { "refiner" };
        eprintln!("{stage} step {}/{}", p.step, p.steps);
    })
    .await?;
    let image = gpu.read(&result.image).await?;
    let sampler = base.scheduler(params)?.name();
    let (model_name, refiner_name) = (model_name(model), refiner.map(model_name));
    let sources = RecipeSources { sampler, model: &model_name, refiner: refiner_name.as_deref(), loras: &recipes, taesd: taesd.is_some() };
    let png = app::render(&prepared, &image, &sources)?.png;
    std::fs::write(out, png).map_err(|e| Error::Io { path: out.to_string(), message: e.to_string() })?;
    eprintln!("wrote {out}");
    if let Some(path) = &args.tensors_out {
        let host = [
            ("noise", result.noise.shape().to_vec(), gpu.read(&result.noise).await?),
            ("latents", result.latents.shape().to_vec(), gpu.read(&result.latents).await?),
            ("image", result.image.shape().to_vec(), image),
        ];
        write_safetensors(path, &host)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// The LoRAs of a run with their weights and names: each `--lora FILE[:WEIGHT]` (weight 1 when
/// left out), then each `<lora:NAME:WEIGHT>` tag of the prompt as `--lora-dir`/NAME.safetensors.
async fn open_loras(lora_args: &[String], lora_dir: Option<&str>, tags: &[(String, f32)]) -> Result<Vec<(LoraFile<'static>, f32, String)>> {
    let mut wanted = Vec::new();
    for arg in lora_args {
        wanted.push(match arg.rsplit_once(':').map(|(file, w)| (file, w.parse::<f32>())) {
            Some((file, Ok(weight))) if !file.is_empty() => (std::path::PathBuf::from(file), weight),
            _ => (std::path::PathBuf::from(arg), 1.0),
        });
    }
    if !tags.is_empty() {
        let dir = lora_dir.ok_or_else(|| Error::InvalidParameter("the prompt's <lora:...> tags name files of --lora-dir, which is missing".into()))?;
        wanted.extend(tags.iter().map(|(name, weight)| (std::path::Path::new(dir).join(format!("{name}.safetensors")), *weight)));
    }
    let mut loras = Vec::new();
    for (path, weight) in wanted {
        let (folder, file) = (path.parent().unwrap_or(std::path::Path::new("")), path.file_name().unwrap_or_default().to_string_lossy());
        let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        loras.push((LoraFile::open(DirSource::new(folder), &file).await?, weight, name));
    }
    Ok(loras)
}

/// `--taesd`: a TAESD-XL decoder from a diffusers AutoencoderTiny folder or one .safetensors file.
async fn open_taesd(gpu: &Gpu, path: &str) -> Result<TaesdDecoder> {
    let at = std::path::Path::new(path);
    let decoder = if at.is_file() {
        let (folder, file) = (at.parent().unwrap_or(std::path::Path::new("")), at.file_name().unwrap_or_default().to_string_lossy());
        let source = DirSource::new(folder);
        // Another safetensors (a LoRA, a UNet) is named as such rather than by a missing tensor.
        TaesdDecoder::check_file(&source, &file).await?;
        gpu.operation(TaesdDecoder::from_file(gpu, source, &file)).await
    } else if at.is_dir() {
        gpu.operation(TaesdDecoder::open(gpu, DirSource::new(path))).await
    } else {
        return Err(Error::Io { path: path.to_string(), message: "--taesd: no such file or folder".into() });
    };
    let decoder = decoder?;
    eprintln!("{path}: TAESD final decoder");
    Ok(decoder)
}

/// A model folder's name, as the PNG recipe names it.
fn model_name(dir: &str) -> String {
    let path = std::path::Path::new(dir);
    path.file_name().unwrap_or(path.as_os_str()).to_string_lossy().into_owned()
}

/// A model as the CLI names it: a diffusers folder, a model pack (a folder with manifest.json,
/// returned with its preset) or a single-file checkpoint (configs inferred from its tensors, or
/// from the diffusers folder `config`). The `.fp16` weights of a folder are preferred with `prefer_fp16`.
async fn open_model(path: &str, config: Option<&str>, prefer_fp16: bool) -> Result<(ModelSource<'static>, Option<QuantPreset>)> {
    let at = std::path::Path::new(path);
    if at.is_file() {
        let (folder, file) = (at.parent().unwrap_or(std::path::Path::new("")), at.file_name().unwrap_or_default().to_string_lossy());
        let config = config.map(|c| SharedSource::new(DirSource::new(c)));
        return Ok((ModelSource::single_file(DirSource::new(folder), &file, config).await?, None));
    }
    if !at.is_dir() {
        return Err(Error::Io { path: path.to_string(), message: "no such file or folder".into() });
    }
    if config.is_some() {
        return Err(Error::InvalidParameter(format!("--config / --refiner-config apply to single-file checkpoints, and {path} is a folder")));
    }
    if !at.join(pack::MANIFEST).is_file() {
        return Ok((ModelSource::folder(DirSource::new(path), prefer_fp16), None));
    }
    let (model, pack) = pack::open(DirSource::new(path)).await?;
    Ok((model, Some(pack.manifest().quant)))
}

/// Loads a model (see [`open_model`]) quantized on load as `quant` says (dense without it); a
/// pack loads as stored, so `quant` must then be absent or the pack's preset.
async fn load_model(gpu: &Gpu, path: &str, config: Option<&str>, quant: Option<QuantPreset>) -> Result<SdxlModel> {
    let (model, stored) = open_model(path, config, gpu.dtype == crate::DType::F16).await?;
    if let (Some(stored), Some(q)) = (stored, quant.filter(|&q| Some(q) != stored)) {
        return Err(Error::InvalidParameter(format!(
            "--quant {} does not apply to the model pack {path}: it is stored as {} (convert again with --quant {} instead)",
            q.name(),
            stored.name(),
            q.name()
        )));
    }
    eprintln!("{path}: {}", model.format);
    SdxlModel::load(gpu, &model, &(stored.or(quant).unwrap_or(QuantPreset::F16)).policy()).await
}

async fn convert_command(args: &ConvertArgs) -> Result<()> {
    let (from, out) = (&args.from, &args.out);
    let options = ConvertOptions { force: args.force, shard_bytes: args.shard_bytes, ..ConvertOptions::new(args.quant) };
    let config = args.config.as_deref().map(std::path::Path::new);
    let manifest = pack::convert_path(std::path::Path::new(from), config, std::path::Path::new(out), &options, |line| eprintln!("{line}")).await?;
    eprintln!(
        "wrote {out}: {:?} pack, {}, {} shards, {:.1} MiB",
        manifest.model,
        manifest.quant.name(),
        manifest.shards.len(),
        manifest.bytes() as f64 / 1048576.0
    );
    Ok(())
}

fn model_store(dir: &StoreDir) -> ModelStore<DirStore> {
    ModelStore::new(DirStore::new(&dir.store))
}

async fn download_command(args: &DownloadArgs) -> Result<()> {
    let store = model_store(&args.store);
    let url = args.source.as_ref().or(args.url.as_ref()).ok_or_else(|| Error::InvalidParameter("download needs a URL".into()))?;
    let id = &args.id.clone().unwrap_or_else(|| app::store_id(url, args.quant));
    let options = DownloadOptions { shard_bytes: args.shard_bytes, ..DownloadOptions::new(args.quant) };
    let mut last_stage = "";
    let manifest = store
        .download(id, url, &options, |p| {
            if p.stage != last_stage || p.bytes_done == p.bytes_total {
                eprintln!("{}: {:.1} of {:.1} MiB {}", p.stage, p.bytes_done as f64 / 1048576.0, p.bytes_total as f64 / 1048576.0, p.detail);
                last_stage = p.stage;
            }
        })
        .await?;
    let dir = store.records().root().join(id);
    eprintln!("stored {}: {:?}, {}, {} shards, {:.1} MiB", dir.display(), manifest.model, manifest.quant.name(), manifest.shards.len(), manifest.bytes() as f64 / 1048576.0);
    Ok(())
}

async fn store_command(action: &StoreCommand) -> Result<()> {
    match action {
        StoreCommand::List(dir) => {
            let store = model_store(dir);
            for m in store.list().await? {
                let total = m.total_bytes.map_or("?".into(), |n| format!("{:.1}", n as f64 / 1048576.0));
                let state = if m.complete { "complete" } else { "incomplete" };
                println!("{}\t{}\t{:.1} of {total} MiB\t{state}\t{}", m.id, m.quant.unwrap_or_default(), m.stored_bytes as f64 / 1048576.0, m.url.unwrap_or_default());
            }
            Ok(())
        }
        StoreCommand::Verify { id, store } => match model_store(store).verify(id).await?.as_slice() {
            [] => {
                println!("{id}: every record matches its sha256");
                Ok(())
            }
            bad => Err(Error::Corrupt { path: id.into(), message: format!("missing or damaged: {} (download again to re-fetch them)", bad.join(", ")) }),
        },
        StoreCommand::Delete { id, store } => {
            let (what, freed) = match id {
                Some(id) => (id.as_str(), model_store(store).delete(id).await?),
                None => ("every model", model_store(store).delete_all().await?),
            };
            println!("deleted {what}: {:.1} MiB freed", freed as f64 / 1048576.0);
            Ok(())
        }
    }
}

async fn encode(args: &EncodeArgs) -> Result<()> {
    let out = &args.out;
    let gpu = Gpu::new(args.precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let (source, _) = open_model(&args.model, args.config.as_deref(), gpu.dtype == crate::DType::F16).await?;
    let index = ModelIndex::load(&source.files).await?;
    let encoder = PromptEncoder::load(&gpu, &source, &index, &QuantPolicy::default(), &Default::default()).await?;
    let embeds = encoder.encode_with(&gpu, &args.prompt, args.negative.as_deref(), args.prompt_options.options())?;
    let named = [
        ("prompt_embeds", &embeds.prompt_embeds),
        ("pooled_prompt_embeds", &embeds.pooled_prompt_embeds),
        ("negative_prompt_embeds", &embeds.negative_prompt_embeds),
        ("negative_pooled_prompt_embeds", &embeds.negative_pooled_prompt_embeds),
    ];
    let mut host = Vec::new();
    for (name, t) in named {
        host.push((name, t.shape().to_vec(), gpu.read(t).await?));
    }
    write_safetensors(out, &host)?;
    eprintln!("wrote {out}");
    Ok(())
}

async fn quality_command(args: &QualityArgs) -> Result<()> {
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        ..GenerateParams::default()
    };
    let gpu = Gpu::new(args.precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let (source, _) = open_model(&args.model, None, gpu.dtype == crate::DType::F16).await?;
    if let Some(shapes) = &args.sensitivity {
        return sensitivity_command(&gpu, &source, &params, shapes, args.budget.unwrap_or(0.0), args.json.as_deref()).await;
    }
    let report = quality(&gpu, &source, &params).await?;
    let mut worst = report.layers.clone();
    worst.sort_by(|a, b| b.errors.q4_0.total_cmp(&a.errors.q4_0));
    println!("UNet weight matrices: {} quantizable; largest Q4_0 errors (relative RMS):", report.layers.len());
    let line = |e: &FormatErrors| format!("q4_0 {:.2e}  q4_1 {:.2e}  q8_0 {:.2e}", e.q4_0, e.q4_1, e.q8_0);
    for l in worst.iter().take(10) {
        println!("  {:<70} {}", l.name, line(&l.errors));
    }
    let n = report.layers.len().max(1) as f64;
    let mean = |f: QuantFormat| report.layers.iter().map(|l| l.errors.get(f)).sum::<f64>() / n;
    let means = FormatErrors { q4_0: mean(QuantFormat::Q4_0), q4_1: mean(QuantFormat::Q4_1), q8_0: mean(QuantFormat::Q8_0) };
    println!("  mean over layers: {}", line(&means));
    for p in &report.presets {
        println!(
            "{}: UNet {:.1} MiB, UNet output relative error {:.2e}, image PSNR {:.1} dB",
            p.preset,
            p.unet_bytes as f64 / 1048576.0,
            p.unet_relative_error,
            p.image_psnr
        );
    }
    write_json(args.json.as_deref(), &report)
}

async fn bench_command(args: &BenchArgs) -> Result<()> {
    let (model, options) = app::bench_plan(bench_request(args)?)?;
    let gpu = Gpu::new(args.precision).await?;
    let report = bench::run(&gpu, &model, &options, |what| eprintln!("bench: {what}")).await?;
    println!("{}", report.table());
    write_json(args.json.as_deref(), &report)
}

fn write_json(path: Option<&str>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_vec_pretty(value).expect("the report serialises");
        std::fs::write(path, json).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })?;
    }
    Ok(())
}

/// `quality --sensitivity SHAPES.json --budget BYTES`: every role's sensitivity on this model,
/// then the per-role formats that fit the budget for the UNet listed in SHAPES.json under this
/// model's kind ("base" or "refiner"), printed as the `Q4_EXCEPTIONS` table.
async fn sensitivity_command(gpu: &Gpu, source: &ModelSource<'_>, params: &GenerateParams, shapes: &str, budget: f64, json: Option<&str>) -> Result<()> {
    let kind = if ModelIndex::load(&source.files).await?.requires_aesthetics_score { "refiner" } else { "base" };
    let text = std::fs::read_to_string(shapes).map_err(|e| Error::Io { path: shapes.to_string(), message: e.to_string() })?;
    let all: HashMap<String, Vec<(String, Vec<usize>)>> =
        serde_json::from_str(&text).map_err(|e| Error::Config { path: shapes.to_string(), message: e.to_string() })?;
    let sized = all.get(kind).ok_or_else(|| Error::Config { path: shapes.to_string(), message: format!("no \"{kind}\" tensor list") })?;
    if budget <= 0.0 {
        return Err(Error::InvalidParameter("--sensitivity needs --budget BYTES (e.g. 1.6e9)".into()));
    }
    println!("{:<72} {:>9} {:>9} {:>9}  (UNet output relative RMS error, only this role quantized)", "role", "q4_0", "q4_1", "q8_0");
    let measured = sensitivity(gpu, source, params, |r| {
        let e = &r.output_error;
        println!("{:<72} {:>9.2e} {:>9.2e} {:>9.2e}", r.role, e.q4_0, e.q4_1, e.q8_0);
    })
    .await?;
    let a = allocate(&measured, sized, budget as u64);
    println!(
        "\n{kind} UNet from {shapes}: q4_0 everywhere {:.3} GB, sum of squared errors {:.3e}; with the exceptions below {:.3} GB (budget {:.3} GB), {:.3e}",
        a.q4_0_bytes as f64 / 1e9,
        a.q4_0_error_sq,
        a.bytes as f64 / 1e9,
        budget / 1e9,
        a.error_sq
    );
    for (role, format) in &a.exceptions {
        println!("    (\"{role}\", QuantFormat::{}),", format.to_uppercase());
    }
    if !a.unmeasured.is_empty() {
        println!("roles of the sized UNet this model does not have (left at q4_0): {}", a.unmeasured.join(", "));
    }
    write_json(json, &(measured, a))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Encode(args) => encode(&args).await,
        Command::Generate(args) => generate_command(&args).await,
        Command::Convert(args) => convert_command(&args).await,
        Command::Download(args) => download_command(&args).await,
        Command::Store(action) => store_command(&action).await,
        Command::Quality(args) => quality_command(&args).await,
        Command::Bench(args) => bench_command(&args).await,
        Command::Info => {
            let gpu = Gpu::new(Precision::Auto).await?;
            println!("adapter: {}\nshader-f16: {}\nsubgroups: {}\nmax binding: {} MiB", gpu.adapter_name, gpu.has_shader_f16, gpu.has_subgroups, gpu.max_binding_bytes() >> 20);
            Ok(())
        }
    }
}

/// Runs the command line: exit 0 on success or after printing help, 1 with an `error:` line on any
/// failure, usage errors included (clap would exit 2).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, `help`, --version, and no arguments at all.
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => {
            // A closed pipe (`sdxl --help | head`) is no failure.
            let _ = write!(std::io::stdout(), "{}", e.render());
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(usage_error(&e)),
    };
    match pollster::block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
