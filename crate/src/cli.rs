//! The `sdxl` command line (native only).

use std::process::ExitCode;

use crate::pipeline::prompt::PromptEncoder;
use crate::pipeline::ModelIndex;
use crate::weights::{safetensors, DirSource};
use crate::{Error, Gpu, Precision, Result};

const USAGE: &str = "usage:
  sdxl encode --model DIR --prompt TEXT [--negative TEXT] --out FILE.safetensors [--precision auto|f32|f16]
      Encodes a prompt with the model's text encoders (diffusers-layout folder) and writes
      prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds (f32).
      Without --negative, a model with force_zeros_for_empty_prompt gets zero negative embeddings.
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
}

async fn encode(args: &Args) -> Result<()> {
    let model = args.required("model")?;
    let prompt = args.required("prompt")?;
    let out = args.required("out")?;
    let precision: Precision = args.get("precision").unwrap_or("auto").parse()?;
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
    let views: Vec<_> = host.iter().map(|(n, s, d)| (*n, s.clone(), d.as_slice())).collect();
    std::fs::write(out, safetensors::serialize_f32(&views)).map_err(|e| Error::Io { path: out.to_string(), message: e.to_string() })?;
    eprintln!("wrote {out}");
    Ok(())
}

async fn run(argv: &[String]) -> Result<()> {
    match argv.first().map(String::as_str) {
        Some("encode") => encode(&Args::parse(&argv[1..], &["model", "prompt", "negative", "out", "precision"])?).await,
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
