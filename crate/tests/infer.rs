//! Configs inferred from a single file's tensors (crate/src/weights/infer.rs), on the real SDXL
//! 1.0 base and refiner: their tensor lists (tests/fixtures/reference/sdxl_*_tensors.json, read
//! off diffusers and transformers) renamed to Stability's SGM names as their single files hold
//! them, inferred back, and compared with the real config.json files; the name mapping is checked
//! to give back every diffusers name. Since inference starts from SDXL 1.0's shipped configs, a
//! file whose every size differs from SDXL's (tiny-sdxl-std.gguf) checks that each inferred field
//! follows the tensors. Last, the tiny fixtures' widths, which only --config allows, are refused.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

use sdxl::models::clip::ClipTextConfig;
use sdxl::models::unet::UNet2DConditionConfig;
use sdxl::weights::infer::{self, clip_vocab, Shapes};
use sdxl::weights::names::{self, Entry, Kind, Layout, SingleFile, Stored};
use sdxl::weights::safetensors::Dtype;
use sdxl::weights::{FileTensors, Source, TensorSource};
use serde_json::Value;

use common::sgm::{sgm_unet, sgm_vae};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");

type Tensors = Vec<(String, Vec<usize>)>;

fn lists() -> HashMap<String, Tensors> {
    let mut all = HashMap::new();
    for file in ["sdxl_unet_tensors.json", "sdxl_other_tensors.json"] {
        let json = std::fs::read(format!("{ROOT}/reference/{file}")).unwrap();
        all.extend(serde_json::from_slice::<HashMap<String, Tensors>>(&json).unwrap());
    }
    all
}

fn config(which: &str, path: &str) -> Value {
    serde_json::from_slice(&std::fs::read(format!("{CONFIGS}/sdxl-{which}/{path}")).unwrap()).unwrap()
}

/// The real model `which` as its single file names its tensors (text encoders left out but for
/// bigG's text_projection, which sets the pooled width).
fn sgm_file(which: &str, lists: &HashMap<String, Tensors>) -> Tensors {
    let unet_config: UNet2DConditionConfig = serde_json::from_value(config(which, "unet/config.json")).unwrap();
    let layout = unet_config.layout().unwrap();
    let layers: Vec<usize> = layout.down.iter().map(|b| b.resnet_in.len()).collect();
    let up_attention: Vec<bool> = layout.up.iter().map(|b| !b.attentions.is_empty()).collect();
    let mut file: Tensors = lists[which].iter().map(|(n, s)| (sgm_unet(n, &layers, &up_attention), s.clone())).collect();
    file.extend(lists["vae"].iter().map(|(n, s)| sgm_vae(n, s, 4)));
    let bigg = if which == "base" { "conditioner.embedders.1.model" } else { "conditioner.embedders.0.model" };
    file.push((format!("{bigg}.text_projection"), vec![1280, 1280]));
    if which == "base" {
        file.push(("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight".into(), vec![768]));
    }
    file
}

fn entries(file: &Tensors) -> Vec<(String, Entry)> {
    file.iter().map(|(n, s)| (n.clone(), Entry { file: 0, stored: Stored::Float(Dtype::F16), shape: s.clone(), start: 0, end: 0, transposed: false })).collect()
}

#[test]
fn inferred_configs_equal_the_real_sdxl_configs() {
    let lists = lists();
    for (which, kind) in [("base", Kind::Base), ("refiner", Kind::Refiner)] {
        let file = sgm_file(which, &lists);
        let shapes: Shapes = file.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        assert_eq!(infer::pooled_width(&shapes), Some(1280));
        let unet = infer::unet_config(which, kind, &shapes, 1280).unwrap();
        let (got, want): (UNet2DConditionConfig, UNet2DConditionConfig) =
            (serde_json::from_value(unet.clone()).unwrap(), serde_json::from_value(config(which, "unet/config.json")).unwrap());
        assert_eq!(got.layout().unwrap(), want.layout().unwrap(), "{which}: the UNet's blocks, heads, widths and embeddings");
        for field in ["in_channels", "out_channels", "conv_in_kernel", "conv_out_kernel", "block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection", "addition_time_embed_dim", "projection_class_embeddings_input_dim", "down_block_types", "up_block_types", "layers_per_block", "norm_num_groups", "sample_size"] {
            assert_eq!(unet[field], config(which, "unet/config.json")[field], "{which}: unet {field}");
        }
        let vae = infer::vae_config(which, kind, &shapes).unwrap();
        let real = config(which, "vae/config.json");
        for (field, value) in real.as_object().unwrap() {
            assert_eq!(&vae[field], value, "{which}: vae {field}");
        }
        // The mapping those configs drive gives back every diffusers name and shape.
        let layout = Layout::from_configs(&serde_json::to_vec(&unet).unwrap(), &serde_json::to_vec(&vae).unwrap(), which).unwrap();
        let identified = names::identify(which, file.iter().map(|(n, s)| (n.as_str(), s.as_slice()))).unwrap();
        assert_eq!(identified.kind, kind);
        let index = SingleFile::index(which, identified, entries(&file), &layout).unwrap();
        assert_eq!(index.kind, kind);
        for (component, list) in [("unet", &lists[which]), ("vae", &lists["vae"])] {
            let mapped = &index.components[component];
            assert_eq!(mapped.len(), list.len(), "{which} {component}: tensor count");
            for (name, shape) in list {
                assert_eq!(mapped.get(name).map(|e| &e.shape), Some(shape), "{which} {component}: {name}");
            }
        }
        println!("{which}: the inferred unet and vae configs equal SDXL 1.0's; {} tensors map back", lists[which].len() + lists["vae"].len());
    }
}

#[test]
fn inferred_text_configs_equal_the_real_ones() {
    let lists = lists();
    for (which, component) in [("base", "text_encoder"), ("base", "text_encoder_2"), ("refiner", "text_encoder_2")] {
        let kind = if which == "base" { Kind::Base } else { Kind::Refiner };
        // transformers 5 lists CLIP-L without its `text_model.` prefix: the folder mapping adds it.
        let tensors = names::diffusers(component, entries(&lists[component]));
        let got: ClipTextConfig = serde_json::from_value(infer::text_config(which, kind, component, &tensors).unwrap()).unwrap();
        let want: ClipTextConfig = serde_json::from_value(config(which, &format!("{component}/config.json"))).unwrap();
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{which} {component}");
    }
}

#[test]
fn shipped_tokenizer_vocabulary_is_clips() {
    // vocab.json follows from merges.txt: the shipped merges give the fixtures' (openai) vocabulary.
    let merges = std::fs::read_to_string(format!("{CONFIGS}/clip/merges.txt")).unwrap();
    let built: HashMap<String, u32> = serde_json::from_slice(&clip_vocab(&merges)).unwrap();
    let want: HashMap<String, u32> = serde_json::from_slice(&std::fs::read(format!("{ROOT}/tiny-sdxl-base/tokenizer/vocab.json")).unwrap()).unwrap();
    assert_eq!(built.len(), 49408);
    assert_eq!(built, want);
    let files = infer::sdxl_files(Kind::Base);
    let tokenizer = pollster::block_on(sdxl::tokenizer::ClipTokenizer::load(&files, "tokenizer_2")).unwrap();
    let ids = tokenizer.encode("a photo of an astronaut riding a horse on mars!").unwrap();
    assert_eq!(&ids[..13], &[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 0, 49407], "tokenizer_2 maps '!' to its pad id 0");
    assert_eq!(ids[13..].iter().copied().collect::<std::collections::BTreeSet<_>>(), [0].into(), "padded with '!'");
}

/// Special tokens are split off in linear time: tokenizer_2's "!" (its pad token) repeated, and
/// mixed with text, takes about sixteen times as long when sixteen times as long (quadratic: 256;
/// it was: 4.5 s for 80k; the 64× bound leaves room for a busy machine). The two sizes run in
/// turns, so that a busy machine slows both alike.
#[test]
fn tokenizing_is_linear() {
    let files = infer::sdxl_files(Kind::Base);
    let tokenizer = pollster::block_on(sdxl::tokenizer::ClipTokenizer::load(&files, "tokenizer_2")).unwrap();
    let time = |text: &str| {
        let start = std::time::Instant::now();
        assert!(tokenizer.tokens(text).unwrap().len() >= text.len() / 8);
        start.elapsed().as_secs_f64()
    };
    for unit in ["!", "a fox! <|endoftext|>!"] {
        let (small, large) = (unit.repeat(5_000), unit.repeat(80_000));
        let (small, large) = (0..5).fold((f64::INFINITY, f64::INFINITY), |(s, l), _| (s.min(time(&small)), l.min(time(&large))));
        assert!(large < 64.0 * small, "{unit:?}: 5k → {small:.4} s, 80k → {large:.4} s: not linear");
    }
}

/// tiny-sdxl-std.gguf was made (make_inferable.py) from SDXL 1.0's configs with these overrides:
/// every one of them must come back from its tensors alone.
#[test]
fn inferred_configs_follow_the_tensors_not_the_shipped_defaults() {
    let source = sdxl::weights::DirSource::new(format!("{ROOT}/single-file"));
    let model = pollster::block_on(sdxl::weights::ModelSource::single_file(source, "tiny-sdxl-std.gguf", None)).unwrap();
    let read = |path: &str| -> Value { serde_json::from_slice(&pollster::block_on(model.files.read(path)).unwrap()).unwrap() };
    let with = |mut config: Value, overrides: Value| {
        config.as_object_mut().unwrap().extend(overrides.as_object().unwrap().clone());
        config
    };
    let unet_want = with(
        config("base", "unet/config.json"),
        serde_json::json!({
            "block_out_channels": [64, 64], "attention_head_dim": [1, 1], "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": 1, "cross_attention_dim": 128, "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 64 + 6 * 8,
            // sd.cpp stores proj_in / proj_out as 1x1 convolutions (the same values as Linear ones).
            "use_linear_projection": false,
        }),
    );
    let unet = read("unet/config.json");
    let (got, want): (UNet2DConditionConfig, UNet2DConditionConfig) = (serde_json::from_value(unet.clone()).unwrap(), serde_json::from_value(unet_want.clone()).unwrap());
    assert_eq!(got.layout().unwrap(), want.layout().unwrap(), "the UNet's blocks, heads, widths and embeddings");
    for field in ["cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim", "down_block_types", "up_block_types"] {
        assert_eq!(unet[field], unet_want[field], "unet {field}");
    }
    let vae = read("vae/config.json");
    assert_eq!((&vae["block_out_channels"], &vae["latent_channels"]), (&serde_json::json!([32, 32, 32, 32]), &serde_json::json!(4)));
    let small = serde_json::json!({ "hidden_size": 64, "num_attention_heads": 1, "num_hidden_layers": 2, "intermediate_size": 128 });
    for (component, projection) in [("text_encoder", None), ("text_encoder_2", Some(64))] {
        let want = with(config("base", &format!("{component}/config.json")), small.clone());
        let want = match projection {
            Some(p) => with(want, serde_json::json!({ "projection_dim": p })),
            None => want,
        };
        let (got, want): (ClipTextConfig, ClipTextConfig) = (serde_json::from_value(read(&format!("{component}/config.json"))).unwrap(), serde_json::from_value(want).unwrap());
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{component}");
    }
}

#[test]
fn tiny_fixtures_widths_are_refused_pointing_to_config() {
    for (model, kind, pooled) in [("tiny-sdxl-base", Kind::Base, 32), ("tiny-sdxl-refiner", Kind::Refiner, 32)] {
        let source = sdxl::weights::DirSource::new(format!("{ROOT}/single-file"));
        let file = pollster::block_on(FileTensors::open(&source, vec![format!("{model}.safetensors")])).unwrap();
        let shapes: Shapes = file.names().into_iter().map(|n| (n, file.info(n).unwrap().shape.as_slice())).collect();
        assert_eq!(infer::pooled_width(&shapes), Some(pooled));
        // 8-channel levels are not whole 64-wide heads: refused, with the way out.
        let err = infer::unet_config(model, kind, &shapes, pooled).unwrap_err().to_string();
        assert!(err.contains("8 channels") && err.contains("--config"), "{err}");
        let err = infer::vae_config(model, kind, &shapes).unwrap_err().to_string();
        assert!(err.contains("8 channels") && err.contains("--config"), "{err}");
    }
}
