//! What the converter would produce for the real SDXL models, computed from their real tensor
//! lists (tests/fixtures/reference/sdxl_{unet,other}_tensors.json, read off diffusers and
//! transformers by tests/fixtures/ref_full_size.py) with the same rule `sdxl convert` applies,
//! against the size targets: base UNet q4 ≤ 1.6 GB and q8 ≤ 2.8 GB; base + refiner at q4 ≤ 4.0 GB.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;

use sdxl::pack::convert::planned_bytes;
use sdxl::quant::{QuantFormat, QuantPreset};
use sdxl::weights::safetensors::Dtype;
use sdxl::weights::Encoding;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference");

type Tensors = Vec<(String, Vec<usize>)>;

fn load(file: &str) -> HashMap<String, Tensors> {
    let text = std::fs::read_to_string(format!("{REFERENCE}/{file}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn bytes(preset: QuantPreset, component: &str, tensors: &Tensors) -> u64 {
    planned_bytes(&preset.policy(), component, tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice(), Encoding::Float(Dtype::F16))))
}

#[test]
fn real_sdxl_pack_sizes_meet_the_targets() {
    let unets = load("sdxl_unet_tensors.json");
    let other = load("sdxl_other_tensors.json");
    let gb = |b: u64| b as f64 / 1e9;
    let mut totals = HashMap::new();
    println!("| preset | base UNet | refiner UNet | CLIP-L | bigG | VAE | base total | refiner total | both, shared bigG + VAE |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (preset, label) in [(QuantPreset::F16, "f16"), (QuantPreset::Q8, "q8"), (QuantPreset::Q4, "q4")] {
        let base_unet = bytes(preset, "unet", &unets["base"]);
        let refiner_unet = bytes(preset, "unet", &unets["refiner"]);
        let clip_l = bytes(preset, "text_encoder", &other["text_encoder"]);
        let big_g = bytes(preset, "text_encoder_2", &other["text_encoder_2"]);
        let vae = bytes(preset, "vae", &other["vae"]);
        let base = base_unet + clip_l + big_g + vae;
        let refiner = refiner_unet + big_g + vae;
        let shared = base + refiner_unet;
        println!(
            "| {label} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            gb(base_unet),
            gb(refiner_unet),
            gb(clip_l),
            gb(big_g),
            gb(vae),
            gb(base),
            gb(refiner),
            gb(shared)
        );
        totals.insert(label, (base_unet, shared, base + refiner));
    }
    let params: u64 = unets["base"].iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    assert_eq!(totals["f16"].0, 2 * params, "f16 stores every base UNet tensor in 2 bytes");
    assert!(totals["q4"].0 < totals["q8"].0 && totals["q8"].0 < totals["f16"].0);
    assert!(totals["q4"].0 <= 1_600_000_000, "base UNet q4: {:.3} GB > 1.6 GB", gb(totals["q4"].0));
    assert!(totals["q8"].0 <= 2_800_000_000, "base UNet q8: {:.3} GB > 2.8 GB", gb(totals["q8"].0));
    // The refiner's text_encoder_2 and VAE have the base's configs and, the text encoders being
    // frozen in SDXL's training (sgm configs: is_trainable: False), the base's weights: stored once.
    assert!(totals["q4"].1 <= 4_000_000_000, "base + refiner q4: {:.3} GB > 4.0 GB", gb(totals["q4"].1));
}

/// The browser's GGUF preset (stable-diffusion.cpp's Q4_K file of the base) as computed from the
/// real tensor lists, assuming sd.cpp's rule (2-D `.weight` matrices whose rows are whole 256-value
/// blocks become Q4_K, the rest F16): the file's bytes, and what the store keeps at q4 (Q4_K blocks
/// as stored, the F16 tensors as the q4 preset stores them).
#[test]
fn gguf_preset_sizes() {
    let unets = load("sdxl_unet_tensors.json");
    let other = load("sdxl_other_tensors.json");
    let policy = QuantPreset::Q4.policy();
    let (mut file, mut stored) = (0u64, 0u64);
    for (component, tensors) in [("unet", &unets["base"]), ("text_encoder", &other["text_encoder"]), ("text_encoder_2", &other["text_encoder_2"]), ("vae", &other["vae"])] {
        let encodings: Vec<(&str, &[usize], Encoding)> = tensors
            .iter()
            .map(|(n, s)| {
                let k = s.len() == 2 && n.ends_with(".weight") && s[1] % 256 == 0;
                (n.as_str(), s.as_slice(), if k { Encoding::Quant(QuantFormat::Q4_K) } else { Encoding::Float(Dtype::F16) })
            })
            .collect();
        file += encodings.iter().map(|(_, s, e)| match e {
            Encoding::Quant(f) => f.matrix_bytes(s[0], s[1]),
            _ => 2 * s.iter().product::<usize>() as u64,
        }).sum::<u64>();
        stored += planned_bytes(&policy, component, encodings);
    }
    println!("sd.cpp Q4_K GGUF of the SDXL base (computed): file {:.2} GB, stored at q4 {:.2} GB", file as f64 / 1e9, stored as f64 / 1e9);
    // The README's and the page's figures (2.64 GB read, 2.17 GB stored).
    assert!((file as f64 / 1e9 - 2.64).abs() < 0.01 && (stored as f64 / 1e9 - 2.17).abs() < 0.01, "{file} / {stored} bytes");
}
