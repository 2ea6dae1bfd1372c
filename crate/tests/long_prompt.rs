//! Long and weighted prompts (`PromptOptions`) against lpw_stable_diffusion_xl's encodings of the
//! tiny fixtures (tests/fixtures/ref_long_prompt.py): the embeddings of every case on the base and
//! the refiner, a base → refiner run on a 3-window context against diffusers fed the same
//! embeddings, the default path untouched, and the inputs lpw fails on as typed errors.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{fixture, max_abs, sdxl, TempDir};

use sdxl::pipeline::generate::{generate, GenerateParams, SdxlModel};
use sdxl::pipeline::prompt::{PromptEmbeds, PromptEncoder, PromptOptions};
use sdxl::pipeline::ModelIndex;
use sdxl::quant::{QuantPolicy, QuantPreset};
use sdxl::weights::{DirSource, Source, FileTensors};
use sdxl::{DType, Error, Gpu, Tensor};
use serde::Deserialize;

gpu_tests!(encodings_match_lpw, long_context_run_matches_diffusers, options_off_and_unweighted_prompts, inputs_lpw_fails_on_are_errors);

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative: Option<String>,
    long_prompt: bool,
    weighting: bool,
    windows: usize,
}

impl Case {
    fn options(&self) -> PromptOptions {
        PromptOptions { long_prompt: self.long_prompt, weighting: self.weighting }
    }
}

#[derive(Deserialize)]
struct Run {
    name: String,
    case: String,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f32,
    seed: u64,
    refiner_start: f64,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
    run: Run,
}

async fn cases() -> Cases {
    serde_json::from_slice(&fixture("reference").read("long_prompt_cases.json").await.unwrap()).unwrap()
}

async fn encoder(gpu: &Gpu, dir: &str) -> PromptEncoder {
    let model = common::folder(gpu, fixture(dir));
    PromptEncoder::load(gpu, &model, &ModelIndex::load(&model.files).await.unwrap(), &QuantPolicy::default(), &Default::default()).await.unwrap()
}

fn named(e: &PromptEmbeds) -> [(&'static str, &Tensor); 4] {
    [
        ("prompt_embeds", &e.prompt_embeds),
        ("negative_prompt_embeds", &e.negative_prompt_embeds),
        ("pooled_prompt_embeds", &e.pooled_prompt_embeds),
        ("negative_pooled_prompt_embeds", &e.negative_pooled_prompt_embeds),
    ]
}

/// As text_parity.rs: within 1e-4 of the reference in f32; relative to the embedding scale in f16.
async fn check(gpu: &Gpu, refs: &FileTensors<'_>, key: &str, got: &Tensor) -> f32 {
    let shape = refs.shape(key).unwrap().to_vec();
    assert_eq!(got.shape(), shape.as_slice(), "{key}: shape");
    let want = refs.host(key, &shape).await.unwrap();
    let (tolerance, scale) = match gpu.dtype {
        DType::F32 => (1e-4, 1.0),
        _ => (3e-2, want.iter().fold(1f32, |m, v| m.max(v.abs()))),
    };
    let err = max_abs(&gpu.read(got).await.unwrap(), &want);
    assert!(err <= tolerance * scale, "{key}: max |Δ| {err} > {} ({:?})", tolerance * scale, gpu.dtype);
    err
}

async fn encodings_match_lpw(gpu: &Gpu) {
    let reference = fixture("reference");
    let refs = FileTensors::open(&reference, vec!["long_prompt.safetensors".into()]).await.unwrap();
    let cases = cases().await.cases;
    assert!(cases.iter().any(|c| c.windows == 3 && c.weighting) && cases.iter().any(|c| c.windows == 3 && !c.weighting));
    for (dir, role) in [("tiny-sdxl-base", "base"), ("tiny-sdxl-refiner", "refiner")] {
        let encoder = encoder(gpu, dir).await;
        let mut worst = 0f32;
        for case in &cases {
            let embeds = encoder.encode_with(gpu, &case.prompt, case.negative.as_deref(), case.options()).unwrap();
            let tokens = embeds.prompt_embeds.shape()[1];
            assert_eq!(tokens.div_ceil(77), case.windows, "{}: windows", case.name);
            for (key, tensor) in named(&embeds) {
                worst = worst.max(check(gpu, &refs, &format!("{}.{role}.{key}", case.name), tensor).await);
            }
        }
        eprintln!("{role} {:?}: lpw embeddings max |Δ| {worst:.2e}", gpu.dtype);
    }
}

async fn long_context_run_matches_diffusers(gpu: &Gpu) {
    let reference = fixture("reference");
    let refs = FileTensors::open(&reference, vec!["long_prompt.safetensors".into()]).await.unwrap();
    let Cases { cases, run } = cases().await;
    let case = cases.iter().find(|c| c.name == run.case).unwrap();
    assert_eq!(case.windows, 3, "the run conditions on a 3-window context");
    let base = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-base")), &QuantPreset::F16.policy()).await.unwrap();
    let refiner = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-refiner")), &QuantPreset::F16.policy()).await.unwrap();
    let params = GenerateParams {
        prompt: case.prompt.clone(),
        negative: case.negative.clone(),
        width: run.width,
        height: run.height,
        steps: run.steps,
        guidance: run.guidance,
        seed: run.seed,
        refiner_start: run.refiner_start,
        prompt_options: case.options(),
        ..Default::default()
    };
    let out = generate(gpu, &base, Some(&refiner), &params, |_| {}).await.unwrap();
    assert_eq!(out.latents.shape(), [1, 4, run.height / 8, run.width / 8]);
    let got = gpu.read(&out.latents).await.unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "finite latents");
    let want = refs.host(&format!("{}.latents", run.name), out.latents.shape()).await.unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = max_abs(&got, &want) / scale;
    // f32 as pipeline.rs; f16 storage rounds every activation of 5 steps through two UNets.
    let tolerance = if gpu.dtype == DType::F32 { 1e-3 } else { 5e-2 };
    assert!(err <= tolerance, "latents relative error {err} > {tolerance} ({:?})", gpu.dtype);
    eprintln!("3-window base → refiner run {:?}: latents relative error {err:.2e}", gpu.dtype);
}

async fn read_all(gpu: &Gpu, e: &PromptEmbeds) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for (_, t) in named(e) {
        out.push(gpu.read(t).await.unwrap());
    }
    out
}

/// Options off is `encode` bit for bit. With both on, an unweighted short prompt gives lpw's
/// `bos + tokens + eos` window: CLIP's causal attention makes those rows the default encoding's
/// first rows, and the pooled output (at the eos) the same.
async fn options_off_and_unweighted_prompts(gpu: &Gpu) {
    let encoder = encoder(gpu, "tiny-sdxl-base").await;
    let (prompt, negative) = ("a photo of an astronaut riding a horse on mars", Some("blurry, low quality"));
    let default = encoder.encode(gpu, prompt, negative).unwrap();
    let off = encoder.encode_with(gpu, prompt, negative, PromptOptions::default()).unwrap();
    assert_eq!(read_all(gpu, &off).await, read_all(gpu, &default).await, "options off is encode");
    let on = encoder.encode_with(gpu, prompt, negative, PromptOptions { long_prompt: true, weighting: true }).unwrap();
    let tokens = encoder.tokenize(prompt).unwrap()[0].iter().position(|&id| id == 49407).unwrap() + 1;
    assert_eq!(on.prompt_embeds.shape(), [1, tokens, 40]);
    let width = 40;
    let (on, default) = (read_all(gpu, &on).await, read_all(gpu, &default).await);
    let tolerance = if gpu.dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let rows = max_abs(&on[0], &default[0][..tokens * width]);
    assert!(rows <= tolerance, "prompt rows differ from the default encoding's by {rows}");
    let pooled = max_abs(&on[2], &default[2]);
    assert!(pooled <= tolerance, "pooled differs by {pooled}");
    // The negative is padded with eos to the prompt's count; its rows up to its own eos agree too.
    let negative_tokens = encoder.tokenize(negative.unwrap()).unwrap()[0].iter().position(|&id| id == 49407).unwrap() + 1;
    let rows = max_abs(&on[1][..negative_tokens * width], &default[1][..negative_tokens * width]);
    assert!(rows <= tolerance, "negative rows differ by {rows}");
}

/// lpw raises on these (float('1.2.3'), torch.cat of no windows, windows of different lengths,
/// float16 weights of inf); here they are typed errors naming the problem.
async fn inputs_lpw_fails_on_are_errors(gpu: &Gpu) {
    let base = encoder(gpu, "tiny-sdxl-base").await;
    let refiner = encoder(gpu, "tiny-sdxl-refiner").await;
    let on = PromptOptions { long_prompt: true, weighting: true };
    let long_only = PromptOptions { long_prompt: true, weighting: false };
    let error = |r: sdxl::Result<PromptEmbeds>| match r {
        Err(Error::InvalidParameter(m)) => m,
        Err(e) => panic!("expected InvalidParameter, got {e}"),
        Ok(_) => panic!("expected an error"),
    };
    assert!(error(base.encode_with(gpu, "a (cat:1.2.3)", None, on)).contains("'1.2.3'"));
    assert!(error(base.encode_with(gpu, "", Some(""), on)).contains("both empty"));
    assert!(error(base.encode_with(gpu, "a (cat:70000)", None, on)).contains("70000"));
    // "!!!" is one token for tokenizer 1 and three "!" (pad) tokens for tokenizer_2.
    assert!(error(base.encode_with(gpu, "wow!!!", None, long_only)).contains("tokenizers"));
    // The refiner has one tokenizer, so the same prompt encodes.
    assert!(refiner.encode_with(gpu, "wow!!!", None, long_only).is_ok());
    // Brackets without weighting are text, so the weight is never read.
    assert!(base.encode_with(gpu, "a (cat:1.2.3)", None, long_only).is_ok());
}

/// `sdxl encode` with both flags gives the reference encoding; a bad flag value is refused.
#[test]
fn cli_encode_flags() {
    let cases = pollster::block_on(cases()).cases;
    let case = cases.iter().find(|c| c.long_prompt && c.weighting && c.windows == 3).unwrap();
    let dir = TempDir::new("long-prompt-encode");
    let out = dir.file("e.safetensors");
    let model = format!("{}/../tests/fixtures/tiny-sdxl-base", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["encode", "--model", &model, "--prompt", &case.prompt, "--out", &out, "--precision", "f32"];
    args.extend(["--long-prompt", "chunked", "--prompt-weighting", "on"]);
    args.extend(case.negative.iter().flat_map(|n| ["--negative", n.as_str()]));
    let run = sdxl(&args);
    assert!(run.status.success(), "sdxl encode failed: {}", String::from_utf8_lossy(&run.stderr));
    let written = DirSource::new(&dir.0);
    let got = pollster::block_on(FileTensors::open(&written, vec!["e.safetensors".into()])).unwrap();
    let reference = fixture("reference");
    let refs = pollster::block_on(FileTensors::open(&reference, vec!["long_prompt.safetensors".into()])).unwrap();
    for key in ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"] {
        let want_key = format!("{}.base.{key}", case.name);
        let shape = refs.shape(&want_key).unwrap().to_vec();
        assert_eq!(got.shape(key).unwrap(), shape.as_slice(), "{key}: shape");
        let err = max_abs(&pollster::block_on(got.host(key, &shape)).unwrap(), &pollster::block_on(refs.host(&want_key, &shape)).unwrap());
        assert!(err <= 1e-4, "sdxl encode {key}: max |Δ| {err}");
    }
    let chunked = args.iter().position(|&a| a == "chunked").unwrap();
    args[chunked] = "yes";
    let run = sdxl(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("--long-prompt 'yes' must be truncate or chunked"), "{stderr}");
}
