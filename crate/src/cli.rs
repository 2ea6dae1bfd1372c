//! The `sdxl` command line (native only).

use std::process::ExitCode;

use crate::pipeline::generate::{generate, GenerateParams, SdxlModel, Stage};
use crate::pipeline::prompt::PromptEncoder;
use crate::pipeline::quality::quality;
use crate::pipeline::ModelIndex;
use crate::pack::{self, ConvertOptions, PackSource};
use crate::quant::QuantPreset;
use crate::weights::{safetensors, DirSource};
use crate::{Error, Gpu, Precision, Result};

const USAGE: &str = "usage:
  sdxl encode --model DIR --prompt TEXT [--negative TEXT] --out FILE.safetensors [--precision auto|f32|f16]
      Encodes a prompt with the model's text encoders (diffusers-layout folder) and writes
      prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds (f32).
      Without --negative, a model with force_zeros_for_empty_prompt gets zero negative embeddings.
  sdxl generate --model DIR [--refiner DIR] --prompt TEXT [--negative TEXT] [--width 1024] [--height 1024]
                [--steps 30] [--guidance 5.0] [--seed 0] [--refiner-start 0.8] --out IMAGE.png
                [--tensors-out FILE.safetensors] [--precision auto|f32|f16] [--quant f16|q8|q4]
      Text to image as diffusers' StableDiffusionXLPipeline (Euler, classifier-free guidance); with
      --refiner, the refiner takes over after --refiner-start of the schedule. The same --seed gives
      diffusers' image. --tensors-out also writes f32 `noise`, `latents` and `image`. --quant keeps
      the UNet's and text encoders' weight matrices block-quantized on the GPU (quantized as they load).
      --model / --refiner may also be model packs (folders with manifest.json, from `sdxl convert`):
      they load as stored; --quant must then be left out or match the pack's preset.
  sdxl convert --from DIR --quant f16|q8|q4 --out PACK_DIR [--force]
      Converts a diffusers-layout SDXL folder (base or refiner) into a model pack: manifest.json and
      shards/NNNNN.bin of at most 64 MiB holding the configs, tokenizers and every tensor, with the
      text encoders' and UNet's weight matrices stored block-quantized as --quant says (the VAE and
      embedding tables stay dense f16). --out must be missing or empty; --force replaces a pack there.
  sdxl quality --model DIR --prompt TEXT [--negative TEXT] [--width 256] [--height 256] [--steps 30]
               [--guidance 5.0] [--seed 0] [--precision f32|f16|auto] [--json FILE]
      Measures quantization: per-layer relative error of every UNet weight matrix in Q8 and Q4, the
      UNet output error and the image PSNR of the q8 and q4 presets against dense weights (same seed).
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

fn write_safetensors(path: &str, host: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let views: Vec<_> = host.iter().map(|(n, s, d)| (*n, s.clone(), d.as_slice())).collect();
    std::fs::write(path, safetensors::serialize_f32(&views)).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })
}

/// RGB [1, 3, H, W] in 0..1 to 8-bit PNG, rounding as diffusers' numpy_to_pil ((x * 255).round()).
fn write_png(path: &str, image: &[f32], height: usize, width: usize) -> Result<()> {
    let plane = height * width;
    let rgb: Vec<u8> = (0..plane)
        .flat_map(|i| (0..3).map(move |c| (image[c * plane + i].clamp(0.0, 1.0) * 255.0).round_ties_even() as u8))
        .collect();
    let io = |e: String| Error::Io { path: path.to_string(), message: e };
    let file = std::fs::File::create(path).map_err(|e| io(e.to_string()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| io(e.to_string()))?;
    writer.write_image_data(&rgb).map_err(|e| io(e.to_string()))
}

async fn generate_command(args: &Args) -> Result<()> {
    let defaults = GenerateParams::default();
    let params = GenerateParams {
        prompt: args.required("prompt")?.to_string(),
        negative: args.get("negative").map(str::to_string),
        width: args.parsed("width", defaults.width)?,
        height: args.parsed("height", defaults.height)?,
        steps: args.parsed("steps", defaults.steps)?,
        guidance: args.parsed("guidance", defaults.guidance)?,
        seed: args.parsed("seed", defaults.seed)?,
        refiner_start: args.parsed("refiner-start", defaults.refiner_start)?,
        ..defaults
    };
    let out = args.required("out")?;
    let model = args.required("model")?;
    let precision: Precision = args.parsed("precision", Precision::Auto)?;
    let gpu = Gpu::new(precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let quant = args.get("quant").map(|_| args.parsed("quant", QuantPreset::F16)).transpose()?;
    let base = load_model(&gpu, model, quant).await?;
    let refiner = match args.get("refiner") {
        Some(dir) => Some(load_model(&gpu, dir, quant).await?),
        None => None,
    };
    let result = generate(&gpu, &base, refiner.as_ref(), &params, |p| {
        let stage = if p.stage == Stage::Base { "base" } else { "refiner" };
        eprintln!("{stage} step {}/{}", p.step, p.steps);
    })
    .await?;
    let image = gpu.read(&result.image).await?;
    write_png(out, &image, params.height, params.width)?;
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

/// Loads a diffusers folder (quantized on load as `quant` says, dense without it) or a model pack
/// (a folder with manifest.json: loaded as stored; `quant` must be absent or the pack's preset).
async fn load_model(gpu: &Gpu, dir: &str, quant: Option<QuantPreset>) -> Result<SdxlModel> {
    if !std::path::Path::new(dir).join(pack::MANIFEST).is_file() {
        return SdxlModel::load(gpu, &DirSource::new(dir), quant.unwrap_or(QuantPreset::F16)).await;
    }
    let source = PackSource::open(DirSource::new(dir)).await?;
    let m = source.manifest();
    let stored = pack::preset_name(m.quant);
    if let Some(q) = quant.filter(|&q| q != m.quant) {
        return Err(Error::InvalidParameter(format!(
            "--quant {} does not apply to the model pack {dir}: it is stored as {stored} (convert again with --quant {} instead)",
            pack::preset_name(q),
            pack::preset_name(q)
        )));
    }
    eprintln!("{dir}: model pack ({:?}, {stored}, {} shards, {:.1} MiB)", m.model, m.shards.len(), m.bytes() as f64 / 1048576.0);
    SdxlModel::load(gpu, &source, m.quant).await
}

async fn convert_command(args: &Args, force: bool) -> Result<()> {
    let from = args.required("from")?;
    let out = args.required("out")?;
    let quant: QuantPreset = args.required("quant")?.parse()?;
    let options = ConvertOptions { force, ..ConvertOptions::new(quant) };
    let manifest = pack::convert_dir(std::path::Path::new(from), std::path::Path::new(out), &options, |line| eprintln!("{line}")).await?;
    eprintln!(
        "wrote {out}: {:?} pack, {}, {} shards, {:.1} MiB",
        manifest.model,
        pack::preset_name(manifest.quant),
        manifest.shards.len(),
        manifest.bytes() as f64 / 1048576.0
    );
    Ok(())
}

async fn encode(args: &Args) -> Result<()> {
    let model = args.required("model")?;
    let prompt = args.required("prompt")?;
    let out = args.required("out")?;
    let precision: Precision = args.parsed("precision", Precision::Auto)?;
    let gpu = Gpu::new(precision).await?;
    eprintln!("adapter: {} ({:?})", gpu.adapter_name, gpu.dtype);
    let source = DirSource::new(model);
    let index = ModelIndex::load(&source).await?;
    let encoder = PromptEncoder::load(&gpu, &source, &index).await?;
    let embeds = encoder.encode(&gpu, prompt, args.get("negative"))?;
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
    let report = quality(&gpu, &DirSource::new(args.required("model")?), &params).await?;
    let mut worst = report.layers.clone();
    worst.sort_by(|a, b| b.q4.total_cmp(&a.q4));
    println!("UNet weight matrices: {} quantizable; largest Q4 errors (relative RMS):", report.layers.len());
    for l in worst.iter().take(10) {
        println!("  {:<70} q8 {:.2e}  q4 {:.2e}", l.name, l.q8, l.q4);
    }
    let mean = |f: fn(&crate::pipeline::quality::LayerError) -> f64| report.layers.iter().map(f).sum::<f64>() / report.layers.len().max(1) as f64;
    println!("  mean over layers: q8 {:.2e}, q4 {:.2e}", mean(|l| l.q8), mean(|l| l.q4));
    for p in &report.presets {
        println!(
            "{}: UNet matrices {:.1} MiB, UNet output relative error {:.2e}, image PSNR {:.1} dB",
            p.preset,
            p.unet_matrix_bytes as f64 / 1048576.0,
            p.unet_relative_error,
            p.image_psnr
        );
    }
    if let Some(path) = args.get("json") {
        let json = serde_json::to_vec_pretty(&report).expect("the report serialises");
        std::fs::write(path, json).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })?;
    }
    Ok(())
}

async fn run(argv: &[String]) -> Result<()> {
    match argv.first().map(String::as_str) {
        Some("encode") => encode(&Args::parse(&argv[1..], &["model", "prompt", "negative", "out", "precision"])?).await,
        Some("generate") => {
            let known = [
                "model", "refiner", "prompt", "negative", "width", "height", "steps", "guidance", "seed", "refiner-start", "out",
                "tensors-out", "precision", "quant",
            ];
            generate_command(&Args::parse(&argv[1..], &known)?).await
        }
        Some("convert") => {
            let rest: Vec<String> = argv[1..].iter().filter(|a| *a != "--force").cloned().collect();
            let force = rest.len() + 1 != argv.len();
            convert_command(&Args::parse(&rest, &["from", "quant", "out"])?, force).await
        }
        Some("quality") => {
            let known = ["model", "prompt", "negative", "width", "height", "steps", "guidance", "seed", "precision", "json"];
            quality_command(&Args::parse(&argv[1..], &known)?).await
        }
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
