//! TAESD-XL (diffusers' AutoencoderTiny decoder) against diffusers on a tiny random-weight model
//! with taesdxl's structure (tests/fixtures/tiny-taesdxl; references written by
//! tests/fixtures/ref_taesd.py): the SDXL pipeline's decode of latents large enough for the input
//! clamp to matter, the raw decoder output, a scaling factor other than taesdxl's 1, madebyollin's
//! bare `taesdxl_decoder.safetensors` naming, and refused inputs and configs. Then TAESD as a
//! generation's final decoder (`generate_with`) on the tiny SDXL base.

mod common;

use sdxl::models::taesd::TaesdDecoder;
use sdxl::pipeline::generate::{generate, generate_with, GenerateParams, SdxlModel, StepProgress};
use sdxl::quant::QuantPreset;
use sdxl::weights::{FileTensors, MemorySource, Source, TensorSource};
use sdxl::{DType, Error, Gpu, Tensor};

gpu_tests!(
    decode_matches_diffusers,
    scaling_factor_is_honoured,
    bare_decoder_file_loads,
    single_file_infers_its_config,
    bad_inputs_and_configs_are_refused,
    final_decode_with_taesd,
);

fixtures! {
    "tiny-taesdxl" => ["config.json", "diffusion_pytorch_model.safetensors"],
    "reference" => ["taesd.safetensors"],
    "tiny-sdxl-base" => [
        "model_index.json", "scheduler/scheduler_config.json",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json", "tokenizer_2/special_tokens_map.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ],
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Max |Δ| allowed against diffusers (f32 reference): 1e-4 in f32 (measured on lavapipe: 6e-7 for
/// the image, 1.9e-6 for the raw output). f16 storage rounds every activation to 11 bits through
/// 35 convolutions: measured 7.5e-4 (image) and 2.1e-3 (raw, values up to 2.1), so 1e-2 as vae.rs.
fn tolerance(gpu: &Gpu) -> f32 {
    match gpu.dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

async fn reference(key: &str) -> (Vec<f32>, Vec<usize>) {
    let source = fixture("reference");
    let refs = FileTensors::open(&source, vec!["taesd.safetensors".into()]).await.unwrap();
    let shape = refs.shape(key).unwrap().to_vec();
    (refs.host(key, &shape).await.unwrap(), shape)
}

/// Returns max |Δ| after asserting shape, dtype (the device's) and tolerance.
async fn check(gpu: &Gpu, key: &str, what: &str, got: &Tensor) -> f32 {
    let (want, shape) = reference(key).await;
    assert_eq!(got.shape(), shape.as_slice(), "{what}: shape");
    assert_eq!(got.dtype(), gpu.dtype, "{what}: dtype");
    let err = common::max_abs(&gpu.read(got).await.unwrap(), &want);
    println!("{what} on a {:?} device: max |Δ| {err:.3e}", gpu.dtype);
    assert!(err <= tolerance(gpu), "{what}: max |Δ| {err} > {} on a {:?} device", tolerance(gpu), gpu.dtype);
    err
}

/// The fixture with `config` edited, and its weights as they are or renamed by `rename` into
/// `file` (f32).
async fn edited(edit: impl Fn(&mut serde_json::Value), file: &str, rename: impl Fn(&str) -> Option<String>) -> MemorySource {
    let base = fixture("tiny-taesdxl");
    let mut config: serde_json::Value = serde_json::from_slice(&base.read("config.json").await.unwrap()).unwrap();
    edit(&mut config);
    let mut source = MemorySource::default();
    source.insert("config.json", serde_json::to_vec(&config).unwrap());
    let w = FileTensors::open(&base, vec![WEIGHTS.into()]).await.unwrap();
    let mut tensors = Vec::new();
    for name in w.names() {
        if let Some(new) = rename(name) {
            let shape = w.shape(name).unwrap().to_vec();
            tensors.push((new, shape.clone(), w.host(name, &shape).await.unwrap()));
        }
    }
    let views: Vec<_> = tensors.iter().map(|(name, shape, values)| (name.as_str(), shape.clone(), values.as_slice())).collect();
    source.insert(file, sdxl::weights::safetensors::serialize_f32(&views));
    source
}

async fn latents(gpu: &Gpu, scale: f32) -> Tensor {
    let (latents, shape) = reference("decode.latents").await;
    assert!(latents.iter().filter(|v| v.abs() > 3.0).count() * 5 > latents.len(), "latents must reach where tanh(x / 3) * 3 clamps");
    gpu.upload_f32(&latents.iter().map(|v| v * scale).collect::<Vec<_>>(), &shape).unwrap()
}

async fn decode_matches_diffusers(gpu: &Gpu) {
    let taesd = TaesdDecoder::open(gpu, fixture("tiny-taesdxl")).await.unwrap();
    assert_eq!((taesd.dtype(), taesd.upscale()), (gpu.dtype, 8));
    let latents = latents(gpu, 1.0).await;
    let image = taesd.decode(gpu, &latents).unwrap();
    check(gpu, "decode.image", "decode", &image).await;
    let pixels = gpu.read(&image).await.unwrap();
    assert!(pixels.iter().all(|v| (0.0..=1.0).contains(v)), "the post-processed image must lie in 0..1");
    let (want, _) = reference("decode.image").await;
    let mean = want.iter().sum::<f32>() / want.len() as f32;
    let std = (want.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / want.len() as f32).sqrt();
    assert!(std > 0.1, "the reference image must have structure for the comparison to mean anything (std {std})");
    // taesdxl's scaling factor is 1: the latents are `z` as they are.
    check(gpu, "decode.raw", "decode_raw", &taesd.decode_raw(gpu, &latents).unwrap()).await;
}

/// The pipeline divides the latents by the config's scaling_factor: with 2 (exact in binary),
/// latents twice as large decode to the reference.
async fn scaling_factor_is_honoured(gpu: &Gpu) {
    let source = edited(|c| c["scaling_factor"] = 2.0.into(), WEIGHTS, |n| Some(n.to_string())).await;
    let taesd = TaesdDecoder::open(gpu, source).await.unwrap();
    check(gpu, "decode.image", "decode with scaling_factor 2", &taesd.decode(gpu, &latents(gpu, 2.0).await).unwrap()).await;
}

/// A diffusers name in madebyollin's bare decoder layout (`decoder.layers.N.x` is `{N+1}.x`; the
/// encoder's are dropped).
fn bare(name: &str) -> Option<String> {
    let rest = name.strip_prefix("decoder.layers.")?;
    let (index, tail) = rest.split_once('.')?;
    Some(format!("{}.{tail}", index.parse::<usize>().ok()? + 1))
}

/// madebyollin's `taesdxl_decoder.safetensors`: the decoder's nn.Sequential alone, with its Clamp
/// at index 0, no encoder.
async fn bare_decoder_file_loads(gpu: &Gpu) {
    let source = edited(|_| {}, "taesdxl_decoder.safetensors", bare).await;
    assert!(source.exists("taesdxl_decoder.safetensors").await && !source.exists(WEIGHTS).await);
    let taesd = TaesdDecoder::open(gpu, source).await.unwrap();
    check(gpu, "decode.image", "decode (bare decoder file)", &taesd.decode(gpu, &latents(gpu, 1.0).await).unwrap()).await;
}

/// A stored preview decoder is one file, no config.json: its config is read off its tensors
/// (the fixture is 8 wide, taesdxl's default 64), in either layout; the check before storing
/// tells a decoder from other safetensors.
async fn single_file_infers_its_config(gpu: &Gpu) {
    for (file, source) in [(WEIGHTS, edited(|_| {}, WEIGHTS, |n| Some(n.to_string())).await), ("taesdxl_decoder.safetensors", edited(|_| {}, "taesdxl_decoder.safetensors", bare).await)] {
        assert!(TaesdDecoder::check_file(&source, file).await.unwrap() > 8);
        let taesd = TaesdDecoder::from_file(gpu, source, file).await.unwrap();
        assert_eq!((taesd.config.decoder_block_out_channels.clone(), taesd.config.num_decoder_blocks.clone()), (vec![8; 4], vec![3, 3, 3, 1]));
        check(gpu, "decode.image", &format!("decode ({file} alone)"), &taesd.decode(gpu, &latents(gpu, 1.0).await).unwrap()).await;
    }
    let not_decoder = edited(|_| {}, "other.safetensors", |n| n.strip_prefix("decoder.layers.").map(|rest| format!("unet.{rest}"))).await;
    match TaesdDecoder::check_file(&not_decoder, "other.safetensors").await {
        Err(Error::Unsupported { message, .. }) => assert!(message.contains("not a TAESD-XL decoder"), "{message}"),
        other => panic!("other safetensors: {:?}", other.map(|_| ())),
    }
}

async fn bad_inputs_and_configs_are_refused(gpu: &Gpu) {
    let taesd = TaesdDecoder::open(gpu, fixture("tiny-taesdxl")).await.unwrap();
    match taesd.decode(gpu, &gpu.zeros(&[1, 3, 5, 7]).unwrap()) {
        Err(Error::InvalidParameter(m)) => assert!(m.contains("[batch, 4, height, width]") && m.contains("[1, 3, 5, 7]"), "unclear message: {m}"),
        Err(e) => panic!("wrong error for a 3-channel latent: {e}"),
        Ok(_) => panic!("a 3-channel latent was accepted"),
    }
    assert!(matches!(taesd.decode_raw(gpu, &gpu.zeros(&[4, 5, 7]).unwrap()), Err(Error::InvalidParameter(_))), "a 3-D latent was accepted");
    for (field, value, expect) in [
        ("decoder_block_out_channels", serde_json::json!([8, 16, 8, 8]), "decoder_block_out_channels"),
        ("act_fn", serde_json::json!("mish"), "act_fn"),
        ("upsample_fn", serde_json::json!("bilinear"), "upsample_fn"),
    ] {
        let source = edited(|c| c[field] = value.clone(), WEIGHTS, |n| Some(n.to_string())).await;
        match TaesdDecoder::open(gpu, source).await {
            Err(Error::Config { path, message }) => assert!(path.ends_with("config.json") && message.contains(expect), "{field}: unclear error {path}: {message}"),
            Err(e) => panic!("{field}: wrong error {e}"),
            Ok(_) => panic!("{field}: unsupported config accepted"),
        }
    }
    // A folder whose weights lack a tensor names it.
    let source = edited(|_| {}, WEIGHTS, |n| (n != "decoder.layers.9.conv.2.bias").then(|| n.to_string())).await;
    match TaesdDecoder::open(gpu, source).await {
        Err(e) => assert!(e.to_string().contains("decoder.layers.9.conv.2.bias"), "unclear error: {e}"),
        Ok(_) => panic!("a missing tensor was accepted"),
    }
    match TaesdDecoder::open(gpu, MemorySource::default()).await {
        Err(Error::Io { message, .. }) => assert!(message.contains("taesdxl_decoder.safetensors"), "unclear message: {message}"),
        Err(e) => panic!("wrong error for an empty folder: {e}"),
        Ok(_) => panic!("an empty folder was accepted"),
    }
}

/// `generate_with` a TAESD final decoder: the same latents as `generate`, decoded by TAESD (exactly
/// its own decode of them) instead of the VAE; a decoder that does not fit the VAE's latents is
/// refused before the first step.
async fn final_decode_with_taesd(gpu: &Gpu) {
    let base = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-base")), &QuantPreset::F16.policy()).await.unwrap();
    let taesd = TaesdDecoder::open(gpu, fixture("tiny-taesdxl")).await.unwrap();
    assert_eq!((taesd.config.latent_channels, taesd.upscale()), (base.vae.config.latent_channels, base.vae.downscale()));
    let params = GenerateParams { prompt: "a red fox in the snow".into(), width: 64, height: 64, steps: 2, seed: 7, ..Default::default() };
    let fast = generate_with(gpu, &base, None, &params, Some(&taesd), |_: StepProgress| {}).await.unwrap();
    let full = generate(gpu, &base, None, &params, |_: StepProgress| {}).await.unwrap();
    assert_eq!(fast.image.shape(), &[1, 3, 64, 64]);
    let latents = (gpu.read(&fast.latents).await.unwrap(), gpu.read(&full.latents).await.unwrap());
    assert!(common::max_abs(&latents.0, &latents.1) <= 1e-6, "the final decoder must not change the latents");
    let image = gpu.read(&fast.image).await.unwrap();
    let own = gpu.read(&taesd.decode(gpu, &fast.latents).unwrap()).await.unwrap();
    let err = common::max_abs(&image, &own);
    assert!(err <= 1e-6, "the final image is not TAESD's decode of the latents: max |Δ| {err}");
    let vae = gpu.read(&full.image).await.unwrap();
    let apart = common::max_abs(&image, &vae);
    println!("TAESD vs VAE final image on a {:?} device: max |Δ| {apart:.3e}", gpu.dtype);
    assert!(apart > 1e-2, "the TAESD image equals the VAE's (max |Δ| {apart}): the final decoder was not used");

    // A decoder upscaling 1x (not the VAE's 8x) would make a 8x8 image: refused before any step.
    let source = edited(|c| c["upsampling_scaling_factor"] = 1.into(), WEIGHTS, |n| Some(n.to_string())).await;
    let small = TaesdDecoder::open(gpu, source).await.unwrap();
    let mut steps = 0;
    match generate_with(gpu, &base, None, &params, Some(&small), |_: StepProgress| steps += 1).await {
        Err(Error::InvalidParameter(m)) => assert!(m.contains("upscales 1x") && m.contains("8x"), "unclear message: {m}"),
        Err(e) => panic!("wrong error for a mismatched final decoder: {e}"),
        Ok(_) => panic!("a final decoder upscaling 1x was accepted"),
    }
    assert_eq!(steps, 0, "the mismatch must be refused before the first step");
}
