//! UNet2DConditionModel and Transformer2DModel against diffusers on the tiny random-weight
//! fixtures (references written by tests/fixtures/ref_unet.py), the layout derived from the real
//! SDXL configs, and refused inputs.

mod common;

use sdxl::models::transformer::{Transformer2DConfig, Transformer2DModel};
use sdxl::models::unet::{BlockLayout, UNet2DConditionConfig};
use sdxl::quant::QuantPolicy;
use sdxl::weights::{FileTensors, Vars};
use sdxl::{DType, Error, Gpu, Tensor};

gpu_tests!(
    base_unet_matches_diffusers,
    refiner_unet_matches_diffusers,
    conv_projection_transformer_matches_diffusers,
    bad_unet_inputs_are_refused,
);

fixtures! {
    "tiny-sdxl-base" => ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"],
    "tiny-sdxl-refiner" => ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"],
    "reference" => ["unet.safetensors"],
}

/// f32 meets the issue's 1e-4 relative error. f16 storage rounds every activation to 11 bits
/// through ~100 layers (measured on lavapipe: about 1e-3), so only 1e-2 is asserted there.
fn tolerance(gpu: &Gpu) -> f32 {
    match gpu.dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

async fn reference(gpu: &Gpu, refs: &FileTensors<'_>, key: &str) -> (Tensor, Vec<f32>) {
    let shape = refs.shape(key).unwrap().to_vec();
    let data = refs.host(key, &shape).await.unwrap();
    (gpu.upload(&data, &shape).unwrap(), data)
}

/// max |got - want| / max |want|, asserted against the device's tolerance.
async fn check(gpu: &Gpu, what: &str, got: &Tensor, want: &[f32], shape: &[usize]) {
    assert_eq!(got.shape(), shape, "{what}: shape");
    let got = gpu.read(got).await.unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |m, (g, w)| if g.is_nan() { f32::INFINITY } else { m.max((g - w).abs()) });
    let relative = err / scale;
    println!("{what} ({:?}): max |Δ| {err:.3e}, relative {relative:.3e}", gpu.dtype);
    assert!(relative <= tolerance(gpu), "{what} ({:?}): relative error {relative} > {}", gpu.dtype, tolerance(gpu));
}

async fn check_unet(gpu: &Gpu, dir: &str, name: &str) {
    let unet = common::unet(gpu, &common::folder(gpu, fixture(dir))).await.unwrap();
    let reference_files = fixture("reference");
    let refs = FileTensors::open(&reference_files, vec!["unet.safetensors".into()]).await.unwrap();
    let (sample, _) = reference(gpu, &refs, &format!("{name}.sample")).await;
    let (context, _) = reference(gpu, &refs, &format!("{name}.encoder_hidden_states")).await;
    let (text_embeds, _) = reference(gpu, &refs, &format!("{name}.text_embeds")).await;
    let ids_key = format!("{name}.time_ids");
    let time_ids = refs.host(&ids_key, refs.shape(&ids_key).unwrap()).await.unwrap();
    let timestep = refs.host(&format!("{name}.timestep"), &[1]).await.unwrap()[0];
    let out = unet.forward(gpu, &sample, timestep, &context, &text_embeds, &time_ids).unwrap();
    let (_, want) = reference(gpu, &refs, &format!("{name}.output")).await;
    check(gpu, &format!("{name} UNet"), &out, &want, sample.shape()).await;
}

async fn base_unet_matches_diffusers(gpu: &Gpu) {
    check_unet(gpu, "tiny-sdxl-base", "base").await;
}

async fn refiner_unet_matches_diffusers(gpu: &Gpu) {
    check_unet(gpu, "tiny-sdxl-refiner", "refiner").await;
}

/// The 1x1-convolution proj_in / proj_out variant (use_linear_projection false), which the SDXL
/// UNets do not exercise.
async fn conv_projection_transformer_matches_diffusers(gpu: &Gpu) {
    let reference_files = fixture("reference");
    let refs = FileTensors::open(&reference_files, vec!["unet.safetensors".into()]).await.unwrap();
    let config = Transformer2DConfig {
        channels: 16,
        heads: 2,
        head_dim: 8,
        layers: 1,
        cross_attention_dim: 24,
        groups: 4,
        use_linear_projection: false,
    };
    let model = Transformer2DModel::load(&Vars::new(gpu, &refs, "unet", &QuantPolicy::default()).pp("conv_transformer.model"), &config).await.unwrap();
    let (x, _) = reference(gpu, &refs, "conv_transformer.input").await;
    let (context, _) = reference(gpu, &refs, "conv_transformer.encoder_hidden_states").await;
    let (_, want) = reference(gpu, &refs, "conv_transformer.output").await;
    let out = model.forward(gpu, &x, &context).unwrap();
    check(gpu, "conv-projection Transformer2DModel", &out, &want, x.shape()).await;
}

fn refused(result: sdxl::Result<Tensor>, needles: &[&str]) {
    match result {
        Err(Error::InvalidParameter(message)) => {
            for needle in needles {
                assert!(message.contains(needle), "error '{message}' should mention '{needle}'");
            }
        }
        Err(other) => panic!("expected InvalidParameter mentioning {needles:?}, got {other}"),
        Ok(t) => panic!("expected an error mentioning {needles:?}, got a tensor {:?}", t.shape()),
    }
}

async fn bad_unet_inputs_are_refused(gpu: &Gpu) {
    let unet = common::unet(gpu, &common::folder(gpu, fixture("tiny-sdxl-base"))).await.unwrap();
    let zeros = |shape: &[usize]| gpu.zeros(shape).unwrap();
    let (sample, context, text) = (zeros(&[2, 4, 8, 12]), zeros(&[2, 77, 40]), zeros(&[2, 32]));
    let ids = [64.0, 48.0, 0.0, 0.0, 64.0, 48.0].repeat(2);
    // cross_attention_dim is 40: a text encoder of the wrong width.
    refused(unet.forward(gpu, &sample, 500.0, &zeros(&[2, 77, 41]), &text, &ids), &["encoder_hidden_states", "[2, 77, 41]", "40"]);
    refused(unet.forward(gpu, &sample, 500.0, &zeros(&[1, 77, 40]), &text, &ids), &["encoder_hidden_states", "[1, 77, 40]"]);
    refused(unet.forward(gpu, &zeros(&[2, 3, 8, 12]), 500.0, &context, &text, &ids), &["sample", "[2, 3, 8, 12]"]);
    refused(unet.forward(gpu, &zeros(&[2, 3, 8, 12]), 500.0, &context, &text, &ids), &["sample", "[2, 3, 8, 12]"]);
    // The refiner's 5 time ids with the base: 32 + 5 * 8 != 80.
    refused(unet.forward(gpu, &sample, 500.0, &context, &text, &ids[..10]), &["time_ids", "80"]);
    refused(unet.forward(gpu, &sample, 500.0, &context, &zeros(&[2, 24]), &ids), &["text_embeds", "[2, 24]"]);
    let f32_sample = gpu.upload_f32(&vec![0.0; 2 * 4 * 8 * 12], &[2, 4, 8, 12]).unwrap();
    if gpu.dtype == DType::F16 {
        refused(unet.forward(gpu, &f32_sample, 500.0, &context, &text, &ids), &["sample", "F32"]);
    }
}

fn real_config(which: &str) -> UNet2DConditionConfig {
    let json = match which {
        "base" => include_str!("../configs/sdxl-base/unet/config.json"),
        _ => include_str!("../configs/sdxl-refiner/unet/config.json"),
    };
    serde_json::from_str(json).unwrap()
}

fn attention(channels: usize, heads: usize, layers: usize, cross_attention_dim: usize) -> Transformer2DConfig {
    Transformer2DConfig { channels, heads, head_dim: 64, layers, cross_attention_dim, groups: 32, use_linear_projection: true }
}

fn block(resnet_in: &[usize], out_channels: usize, attentions: Vec<Transformer2DConfig>, resample: bool) -> BlockLayout {
    BlockLayout { resnet_in: resnet_in.to_vec(), out_channels, attentions, resample }
}

/// The expected structures were read off diffusers' UNet2DConditionModel built from the same
/// configs on the meta device (resnet conv1 inputs; heads, head width, blocks and key width of
/// every Transformer2DModel).
#[cfg_attr(not(target_arch = "wasm32"), test)]
#[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
fn real_sdxl_configs_give_diffusers_layout() {
    let base = real_config("base").layout().unwrap();
    let a = |c, h, l| attention(c, h, l, 2048);
    assert_eq!(base.time_embed_dim, 1280);
    assert_eq!(base.add_time, Some((256, 2816)));
    assert_eq!(base.down, vec![
        block(&[320, 320], 320, vec![], true),
        block(&[320, 640], 640, vec![a(640, 10, 2); 2], true),
        block(&[640, 1280], 1280, vec![a(1280, 20, 10); 2], false),
    ]);
    assert_eq!(base.mid, Some(block(&[1280, 1280], 1280, vec![a(1280, 20, 10)], false)));
    assert_eq!(base.up, vec![
        block(&[2560, 2560, 1920], 1280, vec![a(1280, 20, 10); 3], true),
        block(&[1920, 1280, 960], 640, vec![a(640, 10, 2); 3], true),
        block(&[960, 640, 640], 320, vec![], false),
    ]);

    let refiner = real_config("refiner").layout().unwrap();
    let a = |c, h| attention(c, h, 4, 1280);
    assert_eq!(refiner.time_embed_dim, 1536);
    assert_eq!(refiner.add_time, Some((256, 2560)));
    assert_eq!(refiner.down, vec![
        block(&[384, 384], 384, vec![], true),
        block(&[384, 768], 768, vec![a(768, 12); 2], true),
        block(&[768, 1536], 1536, vec![a(1536, 24); 2], true),
        block(&[1536, 1536], 1536, vec![], false),
    ]);
    assert_eq!(refiner.mid, Some(block(&[1536, 1536], 1536, vec![a(1536, 24)], false)));
    assert_eq!(refiner.up, vec![
        block(&[3072, 3072, 3072], 1536, vec![], true),
        block(&[3072, 3072, 2304], 1536, vec![a(1536, 24); 3], true),
        block(&[2304, 1536, 1152], 768, vec![a(768, 12); 3], true),
        block(&[1152, 768, 768], 384, vec![], false),
    ]);
}

/// Options whose computation is not implemented are refused by name, not run wrongly.
#[cfg_attr(not(target_arch = "wasm32"), test)]
#[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
fn unsupported_unet_configs_are_refused() {
    let base = include_str!("../configs/sdxl-base/unet/config.json");
    for (field, value, needle) in [
        ("class_embed_type", r#""timestep""#, "class_embed_type"),
        ("addition_embed_type", r#""text""#, "addition_embed_type 'text'"),
        ("time_embedding_type", r#""fourier""#, "time_embedding_type 'fourier'"),
        ("resnet_time_scale_shift", r#""scale_shift""#, "resnet_time_scale_shift"),
        ("attention_type", r#""gated""#, "attention_type 'gated'"),
        ("dual_cross_attention", "true", "dual_cross_attention"),
        ("encoder_hid_dim", "1024", "encoder_hid_dim"),
        ("num_attention_heads", "[5, 10, 20]", "num_attention_heads"),
        ("mid_block_type", r#""UNetMidBlock2DSimpleCrossAttn""#, "UNetMidBlock2DSimpleCrossAttn"),
        ("attention_head_dim", "[5, 10, 30]", "1280 channels do not split into 30"),
        ("transformer_layers_per_block", "[1, 2]", "transformer_layers_per_block has 2 entries"),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(base).unwrap();
        json[field] = serde_json::from_str(value).unwrap();
        let config: UNet2DConditionConfig = serde_json::from_value(json).unwrap();
        let message = config.layout().expect_err(field);
        assert!(message.contains(needle), "{field}: '{message}' should mention '{needle}'");
    }
}
