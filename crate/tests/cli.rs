#![cfg(not(target_arch = "wasm32"))]
//! The `sdxl` binary end to end: `encode` on the tiny base fixture against diffusers' reference
//! embeddings, and the errors it prints for bad command lines.

mod common;

use common::{read_all, sdxl, TempDir};
use std::collections::BTreeMap;
use std::process::Output;

use sdxl::weights::{DirSource, FileTensors};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");
const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference");
/// The "plain" case of reference/text_cases.json (no negative prompt).
const PROMPT: &str = "a photo of an astronaut riding a horse on mars";
/// The negative prompt of the "unicode" case.
const NEGATIVE: &str = "blurry, low quality";

const PROMPT_EMBEDS: &str = "prompt_embeds";
const POOLED: &str = "pooled_prompt_embeds";
const NEGATIVE_EMBEDS: &str = "negative_prompt_embeds";
const NEGATIVE_POOLED: &str = "negative_pooled_prompt_embeds";




/// `sdxl encode` of PROMPT (and `negative`) in f32; returns every tensor of the output file.
fn encode(negative: Option<&str>) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let dir = TempDir::new(if negative.is_some() { "negative" } else { "plain" });
    let out = dir.file("e.safetensors");
    let mut args = vec!["encode", "--model", MODEL, "--prompt", PROMPT, "--out", &out, "--precision", "f32"];
    args.extend(negative.iter().flat_map(|n| ["--negative", n]));
    let run = sdxl(&args);
    assert!(run.status.success(), "sdxl {args:?} failed: {}", String::from_utf8_lossy(&run.stderr));
    read_all(&dir.0, "e.safetensors")
}

/// diffusers' `encode_prompt` output for `key` (e.g. "plain.base.prompt_embeds").
fn reference(key: &str, shape: &[usize]) -> Vec<f32> {
    let source = DirSource::new(REFERENCE);
    pollster::block_on(async {
        let weights = FileTensors::open(&source, vec!["text.safetensors".into()]).await.unwrap();
        weights.host(key, shape).await.unwrap()
    })
}

fn assert_matches_reference(got: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, name: &str, key: &str) {
    let (shape, values) = &got[name];
    let want = reference(key, shape);
    let err = values.iter().zip(&want).fold(0f32, |m, (g, w)| if g.is_nan() { f32::INFINITY } else { m.max((g - w).abs()) });
    assert!(err <= 1e-4, "{name} vs {key}: max |Δ| {err} > 1e-4");
}

fn is_zero(got: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, name: &str) -> bool {
    got[name].1.iter().all(|&v| v == 0.0)
}

#[test]
fn encode_matches_diffusers() {
    let got = encode(None);
    let shapes: Vec<(&str, &[usize])> = got.iter().map(|(name, (shape, _))| (name.as_str(), shape.as_slice())).collect();
    let expected: [(&str, &[usize]); 4] = [(NEGATIVE_POOLED, &[1, 32]), (NEGATIVE_EMBEDS, &[1, 77, 40]), (POOLED, &[1, 32]), (PROMPT_EMBEDS, &[1, 77, 40])];
    assert_eq!(shapes, expected);
    for name in [PROMPT_EMBEDS, POOLED, NEGATIVE_EMBEDS, NEGATIVE_POOLED] {
        assert_matches_reference(&got, name, &format!("plain.base.{name}"));
    }
    // No --negative and force_zeros_for_empty_prompt: zeros, not the encoding of "".
    assert!(is_zero(&got, NEGATIVE_EMBEDS) && is_zero(&got, NEGATIVE_POOLED), "negative embeddings are not zero");
}

#[test]
fn encode_with_negative_prompt() {
    let got = encode(Some(NEGATIVE));
    assert!(!is_zero(&got, NEGATIVE_EMBEDS) && !is_zero(&got, NEGATIVE_POOLED), "negative embeddings are zero");
    // The prompt's embeddings do not depend on the negative; the negative's are those diffusers
    // computed for the same negative text in the "unicode" case.
    for name in [PROMPT_EMBEDS, POOLED] {
        assert_matches_reference(&got, name, &format!("plain.base.{name}"));
    }
    for name in [NEGATIVE_EMBEDS, NEGATIVE_POOLED] {
        assert_matches_reference(&got, name, &format!("unicode.base.{name}"));
    }
}

/// Asserts that the run failed cleanly (exit 1, not a panic) with an `error:` line mentioning `needle`.
fn assert_fails_with(run: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "exit status {:?}; stderr:\n{stderr}", run.status);
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no 'error:' line in:\n{stderr}"));
    assert!(line.contains(needle), "{line:?} does not mention {needle:?}");
}

#[test]
fn missing_model_option() {
    let dir = TempDir::new("missing-model");
    assert_fails_with(&sdxl(&["encode", "--prompt", PROMPT, "--out", &dir.file("e.safetensors")]), "--model is required");
}

#[test]
fn unknown_option() {
    let dir = TempDir::new("unknown-option");
    let run = sdxl(&["encode", "--model", MODEL, "--prompt", PROMPT, "--steps", "4", "--out", &dir.file("e.safetensors")]);
    assert_fails_with(&run, "unknown option '--steps'");
}

#[test]
fn nonexistent_model_dir() {
    let dir = TempDir::new("no-model");
    let model = dir.file("no-such-model");
    let run = sdxl(&["encode", "--model", &model, "--prompt", PROMPT, "--out", &dir.file("e.safetensors"), "--precision", "f32"]);
    assert_fails_with(&run, &model);
    assert!(!dir.0.join("e.safetensors").exists(), "an output file was written");
}

/// Runs `sdxl args`, asserting it printed help on stdout and exited 0; returns the help.
fn help_of(args: &[&str]) -> String {
    let run = sdxl(args);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert_eq!(run.status.code(), Some(0), "sdxl {args:?}: exit status {:?}; stderr:\n{}", run.status, String::from_utf8_lossy(&run.stderr));
    stdout
}

#[test]
fn help_lists_commands_and_options() {
    for args in [&[][..], &["--help"], &["help"]] {
        let help = help_of(args);
        for command in ["encode", "generate", "convert", "download", "store", "quality", "bench", "info"] {
            assert!(help.contains(command), "sdxl {args:?} does not list {command}:\n{help}");
        }
    }
    for args in [&["generate", "--help"][..], &["help", "generate"]] {
        let help = help_of(args);
        for option in ["--prompt", "--mask-blur", "--outpaint", "--lora", "--taesd", "LEFT,TOP,RIGHT,BOTTOM", "single-file checkpoint"] {
            assert!(help.contains(option), "sdxl {args:?} does not mention {option}:\n{help}");
        }
    }
    assert!(help_of(&["store", "--help"]).contains("verify"));
}

#[test]
fn usage_errors_exit_1() {
    assert_fails_with(&sdxl(&["generate", "--bogus"]), "unknown option '--bogus'");
    assert_fails_with(&sdxl(&["generate", "--sed", "1"]), "unknown option '--sed' (did you mean '--seed'?)");
    assert_fails_with(&sdxl(&["generate", "--model", MODEL, "--prompt", PROMPT, "--out", "x.png", "--steps"]), "--steps needs a value");
    assert_fails_with(&sdxl(&["encode", "--model", MODEL, "--prompt", PROMPT, "--out", "x", "--long-prompt", "yes"]), "--long-prompt 'yes' must be truncate or chunked");
    assert_fails_with(&sdxl(&["bench", "--sizes", "512,big"]), "--sizes: 'big' is not a size");
    assert_fails_with(&sdxl(&["convert", "--from", MODEL, "--out", "x", "--quant", "q3"]), "quantization 'q3'");
    assert_fails_with(&sdxl(&["frobnicate"]), "unknown command 'frobnicate'");
    assert_fails_with(&sdxl(&["store", "verify"]), "--id is required");
}
