//! LoRAs against diffusers' `load_lora_weights` (peft) on the tiny base: kohya / A1111 naming with
//! LoCon convolutions and per-module alphas, diffusers / peft naming with and without convolutions
//! (alpha from the file's metadata), both text encoders, two LoRAs at once with a negative weight;
//! weight 0 gives the base image exactly, and clearing them gives the base back.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{fixture, psnr, sdxl, Case, TempDir};

use sdxl::pipeline::generate::{generate, SdxlModel};
use sdxl::pipeline::lora::LoraChoice;
use sdxl::quant::QuantPreset;
use sdxl::weights::lora::LoraFile;
use sdxl::weights::safetensors::serialize_f32;
use sdxl::weights::{DirSource, FileTensors, MemorySource};
use sdxl::{DType, Error, Gpu};

gpu_tests!(loras_match_diffusers, bad_loras_fail_typed_and_leave_the_base_working);

#[derive(serde::Deserialize)]
struct LoraCase {
    name: String,
    loras: Vec<LoraUse>,
}

#[derive(serde::Deserialize)]
struct LoraUse {
    file: String,
    weight: f32,
}

async fn image(gpu: &Gpu, base: &SdxlModel, case: &Case) -> Vec<f32> {
    let out = generate(gpu, base, None, &case.params(), |_: sdxl::pipeline::generate::StepProgress| {}).await.unwrap();
    gpu.read(&out.image).await.unwrap()
}

async fn loras_match_diffusers(gpu: &Gpu) {
    let reference = fixture("reference");
    let refs = FileTensors::open(&reference, vec!["lora.safetensors".into()]).await.unwrap();
    let cases = Case::load("lora_cases.json");
    let path = format!("{}/../tests/fixtures/reference/lora_cases.json", env!("CARGO_MANIFEST_DIR"));
    let lora_cases: Vec<LoraCase> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let base = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-base")), &QuantPreset::F16.policy()).await.unwrap();
    let files = fixture("");
    let min_psnr = if gpu.dtype == DType::F32 { 45.0 } else { 30.0 };

    let plain = image(gpu, &base, &cases[0]).await;
    for (case, loras) in cases.iter().zip(&lora_cases) {
        assert_eq!(case.name, loras.name);
        let mut opened = Vec::new();
        for lora in &loras.loras {
            opened.push((LoraFile::open(&files, &lora.file).await.unwrap(), lora.weight));
        }
        let choices: Vec<LoraChoice> = opened.iter().map(|(file, weight)| LoraChoice { file, weight: *weight }).collect();
        base.set_loras(gpu, &choices).await.unwrap();
        let got = image(gpu, &base, case).await;
        let shape = [1, 3, case.height, case.width];
        let want = refs.host(&format!("{}.image", case.name), &shape).await.unwrap();
        let (db, base_db) = (psnr(&got, &want), psnr(&plain, &want));
        eprintln!("{:?} {}: {db:.1} dB against diffusers (the base alone: {base_db:.1} dB)", gpu.dtype, case.name);
        assert!(db >= min_psnr, "{}: {db:.1} dB against diffusers, want >= {min_psnr}", case.name);
        assert!(base_db < 35.0, "{}: the LoRA changes the image ({base_db:.1} dB between the base and diffusers' LoRA image)", case.name);
    }

    // Weight 0 leaves the base as it is; clearing gives it back.
    let kohya = LoraFile::open(&files, "lora/kohya.safetensors").await.unwrap();
    base.set_loras(gpu, &[LoraChoice { file: &kohya, weight: 0.0 }]).await.unwrap();
    assert!(image(gpu, &base, &cases[0]).await == plain, "weight 0 gives the base image exactly");
    base.set_loras(gpu, &[LoraChoice { file: &kohya, weight: 0.7 }]).await.unwrap();
    base.clear_loras();
    assert!(image(gpu, &base, &cases[0]).await == plain, "cleared LoRAs give the base image exactly");
}

/// A safetensors file of (name, shape) tensors filled with small values.
fn lora_file(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let data: Vec<Vec<f32>> = tensors.iter().map(|(_, shape)| common::random(shape.iter().product(), 3).iter().map(|v| v * 0.1).collect()).collect();
    let views: Vec<_> = tensors.iter().zip(&data).map(|((name, shape), d)| (*name, shape.to_vec(), d.as_slice())).collect();
    serialize_f32(&views)
}

/// `message` names the kind and mentions every needle.
fn check(err: Error, kind: &str, needles: &[&str]) {
    let message = err.to_string();
    assert_eq!(err.kind(), kind, "{message}");
    for needle in needles {
        assert!(message.contains(needle), "{message:?} does not mention {needle:?}");
    }
}

async fn bad_loras_fail_typed_and_leave_the_base_working(gpu: &Gpu) {
    let base = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-base")), &QuantPreset::F16.policy()).await.unwrap();
    const TO_Q: &str = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
    let mut files = MemorySource::default();
    // SD 1.5's widths at a name SDXL has: the layer is named.
    files.insert("sd15_shapes.safetensors", lora_file(&[(&format!("{TO_Q}.lora_down.weight"), &[4, 320]), (&format!("{TO_Q}.lora_up.weight"), &[320, 4])]));
    files.insert("sd15_te.safetensors", lora_file(&[("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", &[4, 768]), ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", &[768, 4])]));
    let nowhere = "lora_unet_down_blocks_0_attentions_0_proj_in";
    files.insert("unmatched.safetensors", lora_file(&[(&format!("{TO_Q}.lora_down.weight"), &[4, 16]), (&format!("{TO_Q}.lora_up.weight"), &[16, 4]), (&format!("{nowhere}.lora_down.weight"), &[4, 8]), (&format!("{nowhere}.lora_up.weight"), &[8, 4])]));
    files.insert("loha.safetensors", lora_file(&[(&format!("{TO_Q}.hada_w1_a"), &[16, 4]), (&format!("{TO_Q}.hada_w1_b"), &[4, 16])]));
    files.insert("no_up.safetensors", lora_file(&[(&format!("{TO_Q}.lora_down.weight"), &[4, 16])]));
    files.insert("stranger.safetensors", lora_file(&[(&format!("{TO_Q}.lora_down.weight"), &[4, 16]), (&format!("{TO_Q}.lora_up.weight"), &[16, 4]), ("model.diffusion_model.out.2.weight", &[4, 8])]));
    let kohya = std::fs::read(format!("{}/../tests/fixtures/lora/kohya.safetensors", env!("CARGO_MANIFEST_DIR"))).unwrap();
    files.insert("truncated.safetensors", kohya[..kohya.len() - 100].to_vec());
    let mut nan = lora_file(&[(&format!("{TO_Q}.lora_down.weight"), &[4, 16]), (&format!("{TO_Q}.lora_up.weight"), &[16, 4])]);
    let at = nan.len() - 4;
    nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    files.insert("nan.safetensors", nan);
    files.insert("kohya.safetensors", kohya);

    let set = |file: &'static str| {
        let (files, base) = (&files, &base);
        async move {
            let lora = LoraFile::open(files, file).await?;
            base.set_loras(gpu, &[LoraChoice { file: &lora, weight: 0.8 }]).await
        }
    };
    check(set("sd15_shapes.safetensors").await.unwrap_err(), "WrongModel", &["sd15_shapes.safetensors", TO_Q, "[4, 320]", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "[16, 16]", "another model"]);
    check(set("sd15_te.safetensors").await.unwrap_err(), "WrongModel", &["Stable Diffusion 1.x", "lora_te_"]);
    check(set("unmatched.safetensors").await.unwrap_err(), "WrongModel", &["1 of its 2 modules adapt no layer", nowhere]);
    check(set("loha.safetensors").await.unwrap_err(), "UnsupportedFormat", &["LoHa", "hada_w1_a"]);
    check(set("no_up.safetensors").await.unwrap_err(), "WrongModel", &[TO_Q, "no up (B) factor"]);
    check(set("stranger.safetensors").await.unwrap_err(), "UnsupportedFormat", &["no LoRA factor", "model.diffusion_model.out.2.weight"]);
    check(set("truncated.safetensors").await.unwrap_err(), "CorruptWeights", &["truncated.safetensors", "truncated"]);
    check(set("nan.safetensors").await.unwrap_err(), "WrongModel", &[TO_Q, "non-finite"]);
    check(LoraFile::open(&files, "style.pt").await.err().unwrap(), "UnsupportedFormat", &["pickle"]);
    // A failed set leaves no LoRA behind, and the next valid one works.
    let cases = Case::load("lora_cases.json");
    let plain = {
        base.clear_loras();
        image(gpu, &base, &cases[0]).await
    };
    set("sd15_shapes.safetensors").await.unwrap_err();
    assert!(image(gpu, &base, &cases[0]).await == plain, "a refused LoRA leaves the base alone");
    set("kohya.safetensors").await.unwrap();
    assert!(image(gpu, &base, &cases[0]).await != plain, "the next valid LoRA applies");
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// The RGB8 pixels of a PNG and its `parameters` text.
fn read_png(path: &str) -> (Vec<u8>, String) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}")));
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    let text = reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone()).unwrap_or_default();
    (buf, text)
}

/// `sdxl generate --lora` gives diffusers' image and records the LoRA as A1111 does; a prompt's
/// `<lora:...>` tag (with --prompt-weighting on) is the same as --lora; bad --lora values fail.
#[test]
fn cli_generates_with_loras() {
    let case = &Case::load("lora_cases.json")[0];
    assert_eq!(case.name, "kohya_0.7");
    let tmp = TempDir::new("lora-cli");
    let (kohya, dir) = (format!("{FIXTURES}/lora/kohya.safetensors"), format!("{FIXTURES}/lora"));
    let (width, height, steps, guidance, seed) = (case.width.to_string(), case.height.to_string(), case.steps.to_string(), case.guidance.to_string(), case.seed.to_string());
    let run = |prompt: &str, extra: &[&str], out: &str| {
        let mut args = vec!["generate", "--model", concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base"), "--precision", "f32"];
        args.extend(["--prompt", prompt, "--negative", case.negative.as_deref().unwrap(), "--width", &width, "--height", &height]);
        args.extend(["--steps", &steps, "--guidance", &guidance, "--seed", &seed]);
        args.extend(extra);
        let out = tmp.file(out);
        args.extend(["--out", &out]);
        (sdxl(&args), out)
    };
    let (output, png) = run(&case.prompt, &["--lora", &format!("{kohya}:0.7"), "--tensors-out", &tmp.file("t.safetensors")], "a.png");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let source = DirSource::new(&tmp.0);
    let (got, want) = pollster::block_on(async {
        let reference = fixture("reference");
        let refs = FileTensors::open(&reference, vec!["lora.safetensors".into()]).await.unwrap();
        let shape = [1, 3, case.height, case.width];
        let got = FileTensors::open(&source, vec!["t.safetensors".into()]).await.unwrap().host("image", &shape).await.unwrap();
        (got, refs.host("kohya_0.7.image", &shape).await.unwrap())
    });
    let db = psnr(&got, &want);
    assert!(db >= 45.0, "sdxl generate --lora: {db:.1} dB against diffusers");
    let bytes = std::fs::read(&kohya).unwrap();
    let data = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let hash: String = <sha2::Sha256 as sha2::Digest>::digest(&bytes[data..]).iter().take(6).map(|b| format!("{b:02x}")).collect();
    let (pixels, recipe) = read_png(&png);
    assert!(recipe.starts_with(&format!("{} <lora:kohya:0.7>\nNegative prompt:", case.prompt)), "{recipe}");
    assert!(recipe.contains(&format!(", Lora hashes: \"kohya: {hash}\", ")), "{recipe}");

    // A tag in the prompt is the same LoRA (prompt weighting on for both runs).
    let (a, png_a) = run(&case.prompt, &["--prompt-weighting", "on", "--lora", &format!("{kohya}:0.7")], "b.png");
    let (b, png_b) = run(&format!("{} <lora:kohya:0.7>", case.prompt), &["--prompt-weighting", "on", "--lora-dir", &dir], "c.png");
    assert!(a.status.success() && b.status.success(), "{}{}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    assert_eq!(read_png(&png_a), read_png(&png_b), "a <lora:...> tag generates as --lora does");
    assert_ne!(read_png(&png_a).0, pixels, "prompt weighting on reads the prompt as lpw does");

    for (extra, prompt, needle) in [
        (vec!["--lora", "/nonexistent/x.safetensors"], case.prompt.clone(), "x.safetensors"),
        (vec!["--prompt-weighting", "on"], format!("{} <lora:kohya:0.7>", case.prompt), "--lora-dir"),
        (vec!["--lora", &format!("{FIXTURES}/single-file/tiny-sdxl-base.safetensors")], case.prompt.clone(), "no LoRA factor"),
    ] {
        let (output, _) = run(&prompt, &extra, "bad.png");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(needle), "{extra:?}: {stderr}");
    }
}
