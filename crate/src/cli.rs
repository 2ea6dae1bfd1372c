//! The `sdxl` command line (native only).

use std::collections::HashMap;
use std::process::ExitCode;

use crate::bench::{self, BenchModel, BenchOptions};
use crate::models::taesd::TaesdDecoder;
use crate::pipeline::crop::{crop_for_run, gaussian_blur};
use crate::pipeline::generate::{generate_with, outpaint_canvas, GenerateParams, Mask, SdxlModel, Stage, StepProgress, IMG2IMG_STRENGTH, INPAINT_STRENGTH};
use crate::pipeline::image;
use crate::pipeline::lora::{prompt_tags, LoraChoice};
use crate::pipeline::prompt::{PromptEncoder, PromptOptions};
use crate::pipeline::quality::{allocate, quality, sensitivity, FormatErrors};
use crate::pipeline::ModelIndex;
use crate::pack::{self, ConvertOptions};
use crate::quant::{QuantFormat, QuantPolicy, QuantPreset};
use crate::store::{DirStore, DownloadOptions, ModelStore};
use crate::weights::lora::LoraFile;
use crate::weights::{safetensors, DirSource, ModelSource, SharedSource};
use crate::{Error, Gpu, Precision, Result};

const USAGE: &str = "usage:
  sdxl encode --model DIR|FILE [--config DIR] --prompt TEXT [--negative TEXT] --out FILE.safetensors [--precision auto|f32|f16]
              [--long-prompt truncate|chunked] [--prompt-weighting off|on]
      Encodes a prompt with the model's text encoders (any model --model takes, see generate) and writes
      prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds (f32).
      Without --negative, a model with force_zeros_for_empty_prompt gets zero negative embeddings.
      --long-prompt chunked encodes prompts past 75 tokens in windows of 75; --prompt-weighting on reads
      (word:1.2) weights; either switches to lpw_stable_diffusion_xl's encoding (docs/samplers.md: long prompts).
  sdxl generate --model DIR|FILE [--config DIR] [--refiner DIR|FILE] [--refiner-config DIR] --prompt TEXT [--negative TEXT] [--width 1024] [--height 1024]
                [--steps 30] [--guidance 5.0] [--seed 0] [--refiner-start 0.8] --out IMAGE.png
                [--scheduler euler|euler_a|dpmpp_2m|dpmpp_2m_karras|ddim] [--timestep-spacing leading|trailing|linspace]
                [--init-image IMAGE.png [--strength 0.3] [--mask MASK.png [--mask-blur R] [--mask-padding N] | --outpaint LEFT,TOP,RIGHT,BOTTOM [--outpaint-overlap 0]]]
                [--tensors-out FILE.safetensors] [--precision auto|f32|f16] [--quant f16|q8|q4]
                [--long-prompt truncate|chunked] [--prompt-weighting off|on] [--lora FILE[:WEIGHT]]... [--lora-dir DIR] [--taesd DIR|FILE]
      Text to image as diffusers' StableDiffusionXLPipeline (classifier-free guidance when --guidance
      is above 1; 0 or 1 runs the UNet once per step, as few-step Turbo/Lightning models want); with
      --refiner, the refiner takes over after --refiner-start of the schedule. The same --seed gives
      diffusers' image. --scheduler and --timestep-spacing default to the model folder's
      scheduler_config.json. --init-image: img2img as StableDiffusionXLImg2ImgPipeline at the image's
      size, noised to --strength of the schedule; with --refiner and no --model, the refiner alone
      refines the image (SDEdit). --mask: inpainting as StableDiffusionXLInpaintPipeline (white repaints,
      black keeps; grey binarized at 0.5; the image's size; --strength defaults to 0.9999) with an
      inpainting UNet (9 input channels) or an ordinary one (the original kept outside the mask each step);
      --outpaint extends the canvas by that many pixels per side (edges repeated) and inpaints the new
      area, --outpaint-overlap pixels into the old one. --mask-padding N (diffusers' padding_mask_crop):
      inpaint only the region around the mask, padded by N and widened to --width x --height, at that
      size, then paste it back into the image (any size) through the mask as given (soft edges blend).
      --mask-blur R blurs the mask first (PIL's GaussianBlur, diffusers' mask_processor.blur): soft edges
      for the paste-back. docs/inpainting.md. --tensors-out also writes f32 `noise`, `latents` and `image`. --quant keeps
      the UNet's and text encoders' weight matrices block-quantized on the GPU (quantized as they load).
      --model / --refiner take a diffusers-layout folder (text encoders with or without
      transformers 5's missing `text_model.` prefix, sharded or not), a model pack (a folder with
      manifest.json, from `sdxl convert`: loaded as stored, so --quant must be left out or match its
      preset), or a single-file checkpoint: an original SGM .safetensors (sd_xl_base_1.0.safetensors
      layout, or a fine-tune saved so; F32, F16, BF16, F8_E4M3, F8_E5M2) or a GGUF of one
      (stable-diffusion.cpp's naming; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K,
      Q5_K, Q6_K; quantized weights stay as stored). A single file's configs are inferred from its
      tensors (SDXL 1.0's files otherwise, shipped in the binary); --config DIR (--refiner-config DIR
      for the refiner) overrides them with a diffusers-layout folder's (its weights are not read).
      Pickle checkpoints (.ckpt, .bin) are refused: use safetensors.
      --lora adds a LoRA to the base (repeatable; weight 1 when left out, negative subtracts): kohya /
      A1111 (lora_unet_*, lora_te1_*, lora_te2_*, LoCon convolutions) or diffusers / peft naming, run
      beside the weights as stored (a q4 base stays q4, the LoRA is not quantized). With
      --prompt-weighting on, <lora:NAME:WEIGHT> tags in the prompt add --lora-dir/NAME.safetensors.
      The PNG recipe records them as A1111 does (<lora:...> tags, Lora hashes). docs/lora.md.
      --taesd makes the final image TAESD-XL's decode instead of the VAE's (fast, approximate; recorded
      as `VAE: TAESD`): a diffusers AutoencoderTiny folder or one decoder .safetensors (e.g. madebyollin's
      taesdxl_decoder.safetensors). Refused where its decode would not fit the adapter at this size.
  sdxl convert --from DIR|FILE [--config DIR] --quant f16|q8|q4 --out PACK_DIR [--force] [--shard-bytes 67108864]
      Converts an SDXL model (base or refiner; any --model of generate but a pack) into a model
      pack: manifest.json and shards/NNNNN.bin of at most 64 MiB holding the configs, tokenizers and
      every tensor, with the text encoders' and UNet's float weight matrices stored block-quantized
      as --quant says (GGUF blocks kept as stored; the VAE and embedding tables stay dense f16).
      --out must be missing or empty; --force replaces a pack there. --shard-bytes sets a smaller
      record size (tests).
  sdxl download --url URL --id ID --quant f16|q8|q4 [--store DIR] [--shard-bytes N]
      Downloads the model pack, diffusers-layout SDXL folder or single .safetensors / .gguf file at
      URL (http or https, redirects followed; owner/name is a hub repository, owner/name/FILE a file in one) into
      the store folder (default: sdxl-models) as STORE/ID, a model pack --model reads. A folder or
      file is converted with --quant as it streams in. Run it again to resume an interrupted download
      or to re-fetch records that fail their sha256.
  sdxl store list|verify|delete [--id ID] [--store DIR]
      Lists the stored models (sizes, complete or not), checks one model's records against their
      sha256 (verify --id), or deletes one (delete --id) or all (delete).
  sdxl quality --model DIR --prompt TEXT [--negative TEXT] [--width 256] [--height 256] [--steps 30]
               [--guidance 5.0] [--seed 0] [--precision f32|f16|auto] [--json FILE]
               [--sensitivity SHAPES.json --budget BYTES]
      Measures quantization: per-layer relative error of every UNet weight matrix in Q4_0, Q4_1 and
      Q8_0, the UNet output error and the image PSNR of the q8 and q4 presets against dense weights
      (same seed). With --sensitivity: the UNet output error when only one role (a weight's name
      without layer indices) is quantized, per role and format, and the per-role formats that fit
      --budget bytes for the UNet of SHAPES.json (e.g. tests/fixtures/reference/sdxl_unet_tensors.json,
      the real SDXL shapes): how the q4 preset's exceptions were chosen.
  sdxl bench [--model DIR] [--sizes 512,1024] [--quants f16,q8,q4] [--loras 32,128|none] [--only kernels,unet,vae]
             [--precision auto|f32|f16] [--json FILE]
      Measures speed and memory with random weights generated on the GPU (no checkpoint needed):
      the adapter's peaks (f32 FMA GFLOP/s, copy GB/s), the kernels on the model's real shapes at
      the largest size (GFLOP/s or GB/s and % of peak), one UNet step with classifier-free guidance
      per weight format and size (s/step, weight and peak GPU memory), alone and with a LoRA of each
      --loras rank on every transformer Linear (its per-step cost), the VAE decode whole and
      tiled, and one TAESD-XL preview decode per size (part of --only vae). --model takes the
      configs of a diffusers folder (default: the real SDXL 1.0 base).
      Prints tables; --json writes the report.
  sdxl info
      Prints the GPU adapter and its features.";

/// `--name value` options after the subcommand.
struct Args {
    pairs: Vec<(String, String)>,
}

impl Args {
    fn parse(args: &[String], known: &[&str]) -> Result<Args> {
        let mut pairs = Vec::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .filter(|n| known.contains(n))
                .ok_or_else(|| Error::InvalidParameter(format!("unknown option '{flag}'")))?;
            let value = it.next().ok_or_else(|| Error::InvalidParameter(format!("--{name} needs a value")))?;
            pairs.push((name.to_string(), value.clone()));
        }
        Ok(Args { pairs })
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    /// Every value of a repeatable option, in order.
    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> {
        self.pairs.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    fn required(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| Error::InvalidParameter(format!("--{name} is required")))
    }
    fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| Error::InvalidParameter(format!("--{name} '{v}' is not a valid value"))),
        }
    }
}

/// `--long-prompt truncate|chunked` and `--prompt-weighting off|on` (the first of each is the default).
fn prompt_options(args: &Args) -> Result<PromptOptions> {
    let choice = |name: &str, off: &str, on: &str| match args.get(name) {
        None => Ok(false),
        Some(v) if v == off || v == on => Ok(v == on),
        Some(v) => Err(Error::InvalidParameter(format!("--{name} '{v}' must be {off} or {on}"))),
    };
    Ok(PromptOptions { long_prompt: choice("long-prompt", "truncate", "chunked")?, weighting: choice("prompt-weighting", "off", "on")? })
}

fn write_safetensors(path: &str, host: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let views: Vec<_> = host.iter().map(|(n, s, d)| (*n, s.clone(), d.as_slice())).collect();
    std::fs::write(path, safetensors::serialize_f32(&views)).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })
}

async fn generate_command(args: &Args) -> Result<()> {
    let defaults = GenerateParams::default();
    let read = |option: &str| -> Result<Option<Vec<u8>>> {
        let Some(path) = args.get(option) else { return Ok(None) };
        std::fs::read(path).map(Some).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })
    };
    let in_context = |option: &str, e: Error| Error::InvalidParameter(format!("--{option} {}: {e}", args.get(option).unwrap_or_default()));
    let init_bytes = read("init-image")?;
    let init_image = init_bytes.as_deref().map(image::decode_png).transpose().map_err(|e| in_context("init-image", e))?;
    // The mask in grey as given, blurred as diffusers' mask_processor.blur(mask, --mask-blur).
    let soft_mask = match read("mask")? {
        Some(bytes) => {
            let gray = image::decode_png_pixels(&bytes, true).map_err(|e| in_context("mask", e))?;
            Some(match args.get("mask-blur") {
                Some(_) => gaussian_blur(&gray, args.parsed("mask-blur", 0.0)?).map_err(|e| in_context("mask-blur", e))?,
                None => gray,
            })
        }
        None if args.get("mask-blur").is_some() => return Err(Error::InvalidParameter("--mask-blur needs --mask".into())),
        None => None,
    };
    // Inpainting a crop around the mask: the run's size is --width x --height (the image's by default).
    let crop = match (args.get("mask-padding"), &init_bytes, &soft_mask) {
        (None, _, _) => None,
        (Some(_), _, _) if args.get("outpaint").is_some() => return Err(Error::InvalidParameter("--mask-padding crops around --mask: leave out --outpaint".into())),
        (Some(_), Some(image_bytes), Some(soft_mask)) => {
            let original = image::decode_png_pixels(image_bytes, false).map_err(|e| in_context("init-image", e))?;
            let (width, height) = (args.parsed("width", original.width)?, args.parsed("height", original.height)?);
            Some(crop_for_run(&original, soft_mask, width, height, args.parsed("mask-padding", 0)?)?)
        }
        _ => return Err(Error::InvalidParameter("--mask-padding needs --init-image and --mask".into())),
    };
    let (init_image, mask) = match (init_image, soft_mask, args.get("outpaint")) {
        _ if crop.is_some() => crop.as_ref().map(|c| (Some(c.image.clone()), Some(c.mask.clone()))).unwrap_or_default(),
        (None, mask, outpaint) if mask.is_some() || outpaint.is_some() => {
            return Err(Error::InvalidParameter(format!("--{} needs --init-image", if mask.is_some() { "mask" } else { "outpaint" })));
        }
        (Some(_), Some(_), Some(_)) => return Err(Error::InvalidParameter("--outpaint makes its own mask: leave out --mask".into())),
        (Some(image), Some(gray), None) => (Some(image), Some(Mask::from_gray(gray.width, gray.height, gray.data.iter().map(|&v| v as f32 / 255.0)))),
        (Some(image), None, Some(sides)) => {
            let pad: Vec<usize> = sides.split(',').map(|v| v.trim().parse().ok()).collect::<Option<_>>().unwrap_or_default();
            let pad: [usize; 4] = pad.try_into().map_err(|_| Error::InvalidParameter(format!("--outpaint '{sides}' must be LEFT,TOP,RIGHT,BOTTOM pixel counts")))?;
            let (canvas, mask) = outpaint_canvas(&image, pad, args.parsed("outpaint-overlap", 0)?)?;
            (Some(canvas), Some(mask))
        }
        (image, _, _) => (image, None),
    };
    if args.get("outpaint-overlap").is_some() && args.get("outpaint").is_none() {
        return Err(Error::InvalidParameter("--outpaint-overlap needs --outpaint".into()));
    }
    // img2img and inpainting run at the image's size.
    let (width, height) = init_image.as_ref().map_or((defaults.width, defaults.height), |i| (i.width, i.height));
    let strength = if mask.is_some() { INPAINT_STRENGTH } else { IMG2IMG_STRENGTH };
    let params = GenerateParams {
        prompt: args.required("prompt")?.to_string(),
        negative: args.get("negative").map(str::to_string),
        width: args.parsed("width", width)?,
        height: args.parsed("height", height)?,
        steps: args.parsed("steps", defaults.steps)?,
        guidance: args.parsed("guidance", defaults.guidance)?,
        seed: args.parsed("seed", defaults.seed)?,
        refiner_start: args.parsed("refiner-start", defaults.refiner_start)?,
        scheduler: args.get("scheduler").map(str::parse).transpose()?,
        timestep_spacing: args.get("timestep-spacing").map(str::parse).transpose()?,
        strength: args.parsed("strength", strength)?,
        init_image,
        mask,
        prompt_options: prompt_options(args)?,
        ..defaults
    };
    if args.get("strength").is_some() && params.init_image.is_none() {
        return Err(Error::InvalidParameter("--strength needs --init-image".into()));
    }
    let out = args.required("out")?;
    // The recipe keeps the prompt as typed, <lora:...> tags included.
    let typed = params.prompt.clone();
    let (prompt, tags) = match params.prompt_options.weighting {
        true => prompt_tags(&typed)?,
        false => (typed.clone(), Vec::new()),
    };
    let params = GenerateParams { prompt, ..params };
    // A refiner on its own refines an image (SDEdit); with --model it takes over the last steps.
    let (model, refiner) = match (args.get("model"), args.get("refiner")) {
        (Some(model), refiner) => (model, refiner),
        (None, Some(refiner)) if params.init_image.is_some() => (refiner, None),
        (None, Some(_)) => return Err(Error::InvalidParameter("--refiner without --model needs --init-image (SDEdit refinement)".into())),
        (None, None) => return Err(Error::InvalidParameter("--model is required".into())),
    };
    let precision: Precision = args.parsed("precision", Precision::Auto)?;
    let gpu = Gpu::new(precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let quant = args.get("quant").map(|_| args.parsed("quant", QuantPreset::F16)).transpose()?;
    let taesd = match args.get("taesd") {
        Some(path) => Some(open_taesd(&gpu, path).await?),
        None => None,
    };
    // Single files take their configs from --config / --refiner-config (the refiner's when it runs alone).
    let config = if args.get("model").is_some() { args.get("config") } else { args.get("refiner-config") };
    let base = load_model(&gpu, model, config, quant).await?;
    let loras = open_loras(args, &tags).await?;
    let choices: Vec<LoraChoice> = loras.iter().map(|(file, weight, _)| LoraChoice { file, weight: *weight }).collect();
    base.set_loras(&gpu, &choices).await?;
    let mut recipes = Vec::new();
    for (file, weight, name) in &loras {
        recipes.push(image::LoraRecipe { name: name.clone(), weight: *weight, hash: file.short_hash().await? });
    }
    let refiner_model = match refiner {
        Some(dir) => Some(load_model(&gpu, dir, args.get("refiner-config"), quant).await?),
        None => None,
    };
    let result = generate_with(&gpu, &base, refiner_model.as_ref(), &params, taesd.as_ref(), |p: StepProgress| {
        let stage = if p.stage == Stage::Base { "base" } else { "refiner" };
        eprintln!("{stage} step {}/{}", p.step, p.steps);
    })
    .await?;
    let image = gpu.read(&result.image).await?;
    let typed = GenerateParams { prompt: typed, ..params.clone() };
    let recipe = image::parameters(&typed, base.scheduler(&params)?.name(), &model_name(model), refiner.map(model_name).as_deref(), &recipes);
    let recipe = if taesd.is_some() { image::with_entry(recipe, "VAE", "TAESD") } else { recipe };
    let png = match &crop {
        Some(crop) => {
            let pasted = crop.paste_back(&image);
            image::encode_png(&pasted.data, pasted.width, pasted.height, &image::with_entry(recipe, "Masked area padding", &crop.padding.to_string()))?
        }
        None => image::encode_png(&image::rgb8(&image, params.height, params.width), params.width, params.height, &recipe)?,
    };
    std::fs::write(out, png).map_err(|e| Error::Io { path: out.to_string(), message: e.to_string() })?;
    eprintln!("wrote {out}");
    if let Some(path) = args.get("tensors-out") {
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
async fn open_loras(args: &Args, tags: &[(String, f32)]) -> Result<Vec<(LoraFile<'static>, f32, String)>> {
    let mut wanted = Vec::new();
    for arg in args.all("lora") {
        wanted.push(match arg.rsplit_once(':').map(|(file, w)| (file, w.parse::<f32>())) {
            Some((file, Ok(weight))) if !file.is_empty() => (std::path::PathBuf::from(file), weight),
            _ => (std::path::PathBuf::from(arg), 1.0),
        });
    }
    if !tags.is_empty() {
        let dir = args.get("lora-dir").ok_or_else(|| Error::InvalidParameter("the prompt's <lora:...> tags name files of --lora-dir, which is missing".into()))?;
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

async fn convert_command(args: &Args, force: bool) -> Result<()> {
    let from = args.required("from")?;
    let out = args.required("out")?;
    let quant: QuantPreset = args.required("quant")?.parse()?;
    let options = ConvertOptions { force, shard_bytes: args.parsed("shard-bytes", pack::SHARD_BYTES)?, ..ConvertOptions::new(quant) };
    let config = args.get("config").map(std::path::Path::new);
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

fn model_store(args: &Args) -> ModelStore<DirStore> {
    ModelStore::new(DirStore::new(args.get("store").unwrap_or("sdxl-models")))
}

async fn download_command(args: &Args) -> Result<()> {
    let store = model_store(args);
    let id = args.required("id")?;
    let options = DownloadOptions { shard_bytes: args.parsed("shard-bytes", pack::SHARD_BYTES)?, ..DownloadOptions::new(args.required("quant")?.parse()?) };
    let mut last_stage = "";
    let manifest = store
        .download(id, args.required("url")?, &options, |p| {
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

async fn store_command(action: Option<&str>, args: &Args) -> Result<()> {
    let store = model_store(args);
    match (action, args.get("id")) {
        (Some("list"), _) => {
            for m in store.list().await? {
                let total = m.total_bytes.map_or("?".into(), |n| format!("{:.1}", n as f64 / 1048576.0));
                let state = if m.complete { "complete" } else { "incomplete" };
                println!("{}\t{}\t{:.1} of {total} MiB\t{state}\t{}", m.id, m.quant.unwrap_or_default(), m.stored_bytes as f64 / 1048576.0, m.url.unwrap_or_default());
            }
            Ok(())
        }
        (Some("verify"), Some(id)) => match store.verify(id).await?.as_slice() {
            [] => Ok(println!("{id}: every record matches its sha256")),
            bad => Err(Error::Corrupt { path: id.into(), message: format!("missing or damaged: {} (download again to re-fetch them)", bad.join(", ")) }),
        },
        (Some("delete"), Some(id)) => Ok(println!("deleted {id}: {:.1} MiB freed", store.delete(id).await? as f64 / 1048576.0)),
        (Some("delete"), None) => Ok(println!("deleted every model: {:.1} MiB freed", store.delete_all().await? as f64 / 1048576.0)),
        _ => Err(Error::InvalidParameter(format!("store needs list, verify --id ID or delete [--id ID]\n{USAGE}"))),
    }
}

async fn encode(args: &Args) -> Result<()> {
    let model = args.required("model")?;
    let prompt = args.required("prompt")?;
    let out = args.required("out")?;
    let precision: Precision = args.parsed("precision", Precision::Auto)?;
    let gpu = Gpu::new(precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let (source, _) = open_model(model, args.get("config"), gpu.dtype == crate::DType::F16).await?;
    let index = ModelIndex::load(&source.files).await?;
    let encoder = PromptEncoder::load(&gpu, &source, &index, &QuantPolicy::default(), &Default::default()).await?;
    let embeds = encoder.encode_with(&gpu, prompt, args.get("negative"), prompt_options(args)?)?;
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

async fn quality_command(args: &Args) -> Result<()> {
    let defaults = GenerateParams::default();
    let params = GenerateParams {
        prompt: args.required("prompt")?.to_string(),
        negative: args.get("negative").map(str::to_string),
        width: args.parsed("width", 256)?,
        height: args.parsed("height", 256)?,
        steps: args.parsed("steps", defaults.steps)?,
        guidance: args.parsed("guidance", defaults.guidance)?,
        seed: args.parsed("seed", defaults.seed)?,
        ..defaults
    };
    let gpu = Gpu::new(args.parsed("precision", Precision::F32)?).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let (source, _) = open_model(args.required("model")?, None, gpu.dtype == crate::DType::F16).await?;
    if let Some(shapes) = args.get("sensitivity") {
        return sensitivity_command(&gpu, &source, &params, shapes, args.parsed("budget", 0f64)?, args.get("json")).await;
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
    write_json(args.get("json"), &report)
}

async fn bench_command(args: &Args) -> Result<()> {
    let model = match args.get("model") {
        None => BenchModel::sdxl_base(),
        Some(dir) => {
            let read = |file: &str| std::fs::read(format!("{dir}/{file}")).map_err(|e| Error::Io { path: format!("{dir}/{file}"), message: e.to_string() });
            BenchModel { name: model_name(dir), unet_config: read("unet/config.json")?, vae_config: read("vae/config.json")? }
        }
    };
    let list = |name: &str| args.get(name).map(|v| v.split(',').map(str::trim).collect::<Vec<_>>());
    let mut options = BenchOptions::default();
    if let Some(sizes) = list("sizes") {
        options.sizes = sizes.iter().map(|s| s.parse().map_err(|_| Error::InvalidParameter(format!("--sizes: '{s}' is not a size")))).collect::<Result<_>>()?;
    }
    if let Some(quants) = list("quants") {
        options.quants = quants.iter().map(|q| q.parse()).collect::<Result<_>>()?;
    }
    if let Some(ranks) = list("loras") {
        options.lora_ranks = match ranks[..] {
            ["none"] => Vec::new(),
            _ => ranks.iter().map(|r| r.parse().ok().filter(|&r| r > 0).ok_or_else(|| Error::InvalidParameter(format!("--loras: '{r}' is not a rank")))).collect::<Result<_>>()?,
        };
    }
    if let Some(only) = list("only") {
        if let Some(bad) = only.iter().find(|o| !["kernels", "unet", "vae"].contains(o)) {
            return Err(Error::InvalidParameter(format!("--only: '{bad}' is not kernels, unet or vae")));
        }
        (options.kernels, options.unet, options.vae) = (only.contains(&"kernels"), only.contains(&"unet"), only.contains(&"vae"));
    }
    let gpu = Gpu::new(args.parsed("precision", Precision::Auto)?).await?;
    let report = bench::run(&gpu, &model, &options, |what| eprintln!("bench: {what}")).await?;
    println!("{}", report.table());
    write_json(args.get("json"), &report)
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

async fn run(argv: &[String]) -> Result<()> {
    match argv.first().map(String::as_str) {
        Some("encode") => encode(&Args::parse(&argv[1..], &["model", "config", "prompt", "negative", "out", "precision", "long-prompt", "prompt-weighting"])?).await,
        Some("generate") => {
            let known = [
                "model", "config", "refiner", "refiner-config", "prompt", "negative", "width", "height", "steps", "guidance", "seed",
                "refiner-start", "out", "tensors-out", "precision", "quant", "scheduler", "timestep-spacing", "init-image", "strength", "mask", "mask-padding", "mask-blur", "outpaint", "outpaint-overlap",
                "long-prompt", "prompt-weighting", "lora", "lora-dir", "taesd",
            ];
            generate_command(&Args::parse(&argv[1..], &known)?).await
        }
        Some("convert") => {
            let rest: Vec<String> = argv[1..].iter().filter(|a| *a != "--force").cloned().collect();
            let force = rest.len() + 1 != argv.len();
            convert_command(&Args::parse(&rest, &["from", "config", "quant", "out", "shard-bytes"])?, force).await
        }
        Some("download") => download_command(&Args::parse(&argv[1..], &["url", "id", "quant", "store", "shard-bytes"])?).await,
        Some("store") => store_command(argv.get(1).map(String::as_str), &Args::parse(argv.get(2..).unwrap_or_default(), &["id", "store"])?).await,
        Some("quality") => {
            let known = ["model", "prompt", "negative", "width", "height", "steps", "guidance", "seed", "precision", "json", "sensitivity", "budget"];
            quality_command(&Args::parse(&argv[1..], &known)?).await
        }
        Some("bench") => bench_command(&Args::parse(&argv[1..], &["model", "sizes", "quants", "loras", "only", "precision", "json"])?).await,
        Some("info") => {
            let gpu = Gpu::new(Precision::Auto).await?;
            println!("adapter: {}\nshader-f16: {}\nsubgroups: {}\nmax binding: {} MiB", gpu.adapter_name, gpu.has_shader_f16, gpu.has_subgroups, gpu.max_binding_bytes() >> 20);
            Ok(())
        }
        _ => Err(Error::InvalidParameter(format!("unknown command\n{USAGE}"))),
    }
}

pub fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() || argv[0] == "--help" || argv[0] == "-h" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match pollster::block_on(run(&argv)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
