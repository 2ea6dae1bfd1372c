//! Tokenizers and prompt encoding against diffusers' `encode_prompt` on the tiny random-weight
//! fixtures (tests/fixtures, written by tests/fixtures/generate.py).

mod common;

use sdxl::pipeline::prompt::PromptEncoder;
use sdxl::pipeline::ModelIndex;
use sdxl::quant::QuantPolicy;
use sdxl::weights::{FileTensors, Source};
use sdxl::{DType, Gpu};
use serde::Deserialize;

gpu_tests!(base_encode_prompt_matches_diffusers, refiner_encode_prompt_matches_diffusers);

fixtures! {
    "tiny-sdxl-base" => [
        "model_index.json",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json", "tokenizer_2/special_tokens_map.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    ],
    "tiny-sdxl-refiner" => [
        "model_index.json",
        "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json", "tokenizer_2/special_tokens_map.json",
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    ],
    "reference" => ["text.safetensors", "text_cases.json"],
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative: Option<String>,
}

/// diffusers' values within 1e-4 in f32; f16 storage rounds every activation to 11 bits, so only
/// closeness relative to the embedding scale is asserted there.
fn tolerance(gpu: &Gpu) -> f32 {
    match gpu.dtype {
        DType::F32 => 1e-4,
        _ => 3e-2,
    }
}

async fn check_tensor(gpu: &Gpu, refs: &FileTensors<'_>, key: &str, got: &sdxl::Tensor) {
    let shape = refs.shape(key).unwrap().to_vec();
    assert_eq!(got.shape(), shape.as_slice(), "{key}: shape");
    let want = refs.host(key, &shape).await.unwrap();
    let got = gpu.read(got).await.unwrap();
    let scale = if gpu.dtype == DType::F32 { 1.0 } else { want.iter().fold(1f32, |m, v| m.max(v.abs())) };
    let err = got.iter().zip(&want).fold(0f32, |m, (g, w)| if g.is_nan() { f32::INFINITY } else { m.max((g - w).abs()) });
    assert!(err <= tolerance(gpu) * scale, "{key}: max |Δ| {err} > {} ({:?})", tolerance(gpu) * scale, gpu.dtype);
}

async fn check_ids(refs: &FileTensors<'_>, key: &str, got: &[u32]) {
    let want: Vec<u32> = refs.host(key, &[1, got.len()]).await.unwrap().iter().map(|&v| v as u32).collect();
    assert_eq!(got, want.as_slice(), "{key}: token ids differ from diffusers' tokenizer");
}

async fn check_pipeline(gpu: &Gpu, dir: &str, role: &str) {
    let source = fixture(dir);
    let reference = fixture("reference");
    let refs = FileTensors::open(&reference, vec!["text.safetensors".into()]).await.unwrap();
    let cases: Vec<Case> = serde_json::from_slice(&reference.read("text_cases.json").await.unwrap()).unwrap();
    assert!(cases.len() >= 5, "the fixture should hold several prompt cases");
    let model = common::folder(gpu, source);
    let index = ModelIndex::load(&model.files).await.unwrap();
    let encoder = PromptEncoder::load(gpu, &model, &index, &QuantPolicy::default(), &Default::default()).await.unwrap();
    for case in &cases {
        let n = &case.name;
        let ids = encoder.tokenize(&case.prompt).unwrap();
        // The refiner has only tokenizer_2; the base has both.
        let id_keys: &[&str] = if ids.len() == 2 { &["input_ids", "input_ids_2"] } else { &["input_ids_2"] };
        for (ids, key) in ids.iter().zip(id_keys) {
            check_ids(&refs, &format!("{n}.{key}"), ids).await;
        }
        if let Some(negative) = &case.negative {
            for (ids, key) in encoder.tokenize(negative).unwrap().iter().zip(id_keys) {
                check_ids(&refs, &format!("{n}.negative_{key}"), ids).await;
            }
        }
        let e = encoder.encode(gpu, &case.prompt, case.negative.as_deref()).unwrap();
        check_tensor(gpu, &refs, &format!("{n}.{role}.prompt_embeds"), &e.prompt_embeds).await;
        check_tensor(gpu, &refs, &format!("{n}.{role}.pooled_prompt_embeds"), &e.pooled_prompt_embeds).await;
        check_tensor(gpu, &refs, &format!("{n}.{role}.negative_prompt_embeds"), &e.negative_prompt_embeds).await;
        check_tensor(gpu, &refs, &format!("{n}.{role}.negative_pooled_prompt_embeds"), &e.negative_pooled_prompt_embeds).await;
    }
}

async fn base_encode_prompt_matches_diffusers(gpu: &Gpu) {
    check_pipeline(gpu, "tiny-sdxl-base", "base").await;
}

async fn refiner_encode_prompt_matches_diffusers(gpu: &Gpu) {
    check_pipeline(gpu, "tiny-sdxl-refiner", "refiner").await;
}
