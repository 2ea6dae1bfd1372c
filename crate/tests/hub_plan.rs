//! What a download of the real SDXL repositories fetches and stores: the public file layouts of
//! stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (every variant the repositories hold,
//! with the hub's sizes for the fp16 weights), served as a virtual folder whose safetensors headers
//! are synthesised from the real tensor lists. The planner must pick the configs, tokenizers and
//! the fp16 weights only, and the pack sizes per preset must be what the converter stores.
#![cfg(not(target_arch = "wasm32"))]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use sdxl::pack::{self, convert::planned_bytes};
use sdxl::quant::QuantPreset;
use sdxl::weights::safetensors::Dtype;
use sdxl::weights::{Encoding, ModelSource, Source};
use sdxl::Error;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// Files of the repositories that the engine never reads, as listed on the hub.
const UNUSED: &[&str] = &[
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "sd_xl_refiner_1.0.safetensors",
    "sd_xl_refiner_1.0_0.9vae.safetensors",
    "text_encoder/flax_model.msgpack",
    "text_encoder/model.onnx",
    "text_encoder/openvino_model.bin",
    "text_encoder/openvino_model.xml",
    "text_encoder_2/flax_model.msgpack",
    "text_encoder_2/model.onnx",
    "text_encoder_2/model.onnx_data",
    "text_encoder_2/openvino_model.bin",
    "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx",
    "unet/model.onnx_data",
    "unet/openvino_model.bin",
    "vae/diffusion_flax_model.msgpack",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/model.onnx",
    "vae_encoder/model.onnx",
    "README.md",
    "LICENSE.md",
    "01.png",
];

/// The fp16 weights and their sizes on the hub (bytes).
const BASE_FP16: &[(&str, &str, u64)] = &[
    ("text_encoder", "text_encoder/model.fp16.safetensors", 246_144_152),
    ("text_encoder_2", "text_encoder_2/model.fp16.safetensors", 1_389_382_176),
    ("base", "unet/diffusion_pytorch_model.fp16.safetensors", 5_135_149_760),
    ("vae", "vae/diffusion_pytorch_model.fp16.safetensors", 167_335_342),
];
const REFINER_FP16: &[(&str, &str, u64)] = &[
    ("text_encoder_2", "text_encoder_2/model.fp16.safetensors", 1_389_382_176),
    ("refiner", "unet/diffusion_pytorch_model.fp16.safetensors", 4_519_559_218),
    ("vae", "vae/diffusion_pytorch_model.fp16.safetensors", 167_335_342),
];

type Tensors = Vec<(String, Vec<usize>)>;

fn tensor_lists() -> HashMap<String, Tensors> {
    let mut all = HashMap::new();
    for file in ["sdxl_unet_tensors.json", "sdxl_other_tensors.json"] {
        let json = std::fs::read(format!("{ROOT}/reference/{file}")).unwrap();
        let lists: HashMap<String, Tensors> = serde_json::from_slice(&json).unwrap();
        all.extend(lists);
    }
    all
}

enum File {
    Bytes(Vec<u8>),
    /// A safetensors file: its header, then `len` bytes in all.
    Weights { head: Vec<u8>, len: u64 },
    /// A file whose content the engine must never read.
    Opaque(u64),
}

struct HubRepo {
    files: HashMap<String, File>,
    /// The weight files whose headers were read.
    opened: RefCell<BTreeSet<String>>,
}

fn header(tensors: &Tensors, dtype: &str, size: u64) -> (Vec<u8>, u64) {
    let mut map = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let end = offset + shape.iter().product::<usize>() as u64 * size;
        map.insert(name.clone(), serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let json = serde_json::to_vec(&serde_json::Value::Object(map)).unwrap();
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&json);
    (head, offset)
}

impl HubRepo {
    fn new(which: &str, fp16: &[(&str, &str, u64)]) -> HubRepo {
        let lists = tensor_lists();
        let mut files = HashMap::new();
        let configs = format!("{}/configs/sdxl-{which}", env!("CARGO_MANIFEST_DIR"));
        for entry in walk(std::path::Path::new(&configs)) {
            let rel = entry.strip_prefix(&configs).unwrap().to_string_lossy().trim_start_matches('/').to_string();
            files.insert(rel, File::Bytes(std::fs::read(&entry).unwrap()));
        }
        let tokenizers: Vec<&str> = ["tokenizer", "tokenizer_2"].into_iter().filter(|t| files.contains_key(&format!("{t}/tokenizer_config.json"))).collect();
        for tokenizer in tokenizers {
            for f in ["vocab.json", "merges.txt"] {
                files.insert(format!("{tokenizer}/{f}"), File::Bytes(std::fs::read(format!("{ROOT}/tiny-sdxl-base/tokenizer/{f}")).unwrap()));
            }
        }
        for &(list, path, hub_size) in fp16 {
            let (head, data) = header(&lists[list], "F16", 2);
            assert!(head.len() as u64 + data <= hub_size && hub_size - data < 1 << 20, "{path}: the hub's {hub_size} bytes vs {data} bytes of tensors");
            files.insert(path.to_string(), File::Weights { head, len: hub_size });
            // The fp32 variant beside it, twice the size: never the one to download.
            let (head, data) = header(&lists[list], "F32", 4);
            let len = head.len() as u64 + data;
            files.insert(path.replace(".fp16", ""), File::Weights { head, len });
        }
        for path in UNUSED {
            files.insert(path.to_string(), File::Opaque(1 << 30));
        }
        HubRepo { files, opened: RefCell::default() }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

impl Source for HubRepo {
    fn describe(&self, path: &str) -> String {
        format!("hub:{path}")
    }
    async fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }
    async fn len(&self, path: &str) -> sdxl::Result<u64> {
        match self.files.get(path) {
            Some(File::Bytes(b)) => Ok(b.len() as u64),
            Some(File::Weights { len, .. }) => Ok(*len),
            Some(File::Opaque(n)) => Ok(*n),
            None => Err(Error::Io { path: path.into(), message: "not in the repository".into() }),
        }
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> sdxl::Result<Vec<u8>> {
        let out_of_range = || Error::Io { path: path.into(), message: format!("bytes {start}..{end}: only headers are read when planning") };
        match self.files.get(path) {
            Some(File::Bytes(b)) => b.get(start as usize..end as usize).map(<[u8]>::to_vec).ok_or_else(out_of_range),
            Some(File::Weights { head, .. }) => {
                self.opened.borrow_mut().insert(path.to_string());
                head.get(start as usize..end as usize).map(<[u8]>::to_vec).ok_or_else(out_of_range)
            }
            _ => panic!("{path} must never be read"),
        }
    }
}

fn check(which: &str, fp16: &[(&str, &str, u64)], components: &[&str]) {
    let repo = HubRepo::new(which, fp16);
    let lists = tensor_lists();
    let mut sizes = Vec::new();
    for preset in [QuantPreset::F16, QuantPreset::Q8, QuantPreset::Q4] {
        repo.opened.borrow_mut().clear();
        let model = ModelSource::folder(&repo, true);
        let plan = pollster::block_on(pack::plan(&model, preset)).unwrap();

        // The configs and tokenizers, then exactly the fp16 weights.
        let mut want: Vec<String> = vec!["model_index.json".into(), "scheduler/scheduler_config.json".into()];
        for c in components {
            if c.starts_with("tokenizer") {
                want.extend(["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"].map(|f| format!("{c}/{f}")));
            } else {
                want.push(format!("{c}/config.json"));
            }
        }
        let mut got = plan.small.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{which}: small files");
        let opened: Vec<String> = repo.opened.borrow().iter().cloned().collect();
        let mut fp16_paths: Vec<String> = fp16.iter().map(|(_, path, _)| path.to_string()).collect();
        fp16_paths.sort();
        assert_eq!(opened, fp16_paths, "{which}: the weight files read are the fp16 ones");
        let small: u64 = got.iter().map(|p| pollster::block_on(repo.len(p)).unwrap()).sum();
        let data: u64 = fp16.iter().map(|(list, _, _)| lists[*list].iter().map(|(_, s)| 2 * s.iter().product::<usize>() as u64).sum::<u64>()).sum();
        assert_eq!(pollster::block_on(plan.read_bytes()).unwrap(), small + data, "{which}: bytes the conversion reads");
        let weights: u64 = fp16.iter().map(|(_, _, n)| n).sum();

        // The pack: the small files plus every tensor as the converter stores it.
        let policy = preset.policy();
        let stored: u64 = fp16
            .iter()
            .map(|(list, path, _)| {
                let component = path.split('/').next().unwrap();
                planned_bytes(&policy, component, lists[*list].iter().map(|(n, s)| (n.as_str(), s.as_slice(), Encoding::Float(Dtype::F16))))
            })
            .sum();
        let pack_bytes = pollster::block_on(plan.pack_bytes()).unwrap();
        assert_eq!(pack_bytes, stored + small, "{which} {preset:?}: pack bytes");
        sizes.push((preset, weights + small, pack_bytes));
    }
    for (preset, download, stored) in &sizes {
        println!("{which} {preset:?}: download {:.3} GB, stored {:.3} GB", *download as f64 / 1e9, *stored as f64 / 1e9);
    }
    let [(_, _, f16), (_, _, q8), (_, _, q4)] = sizes[..] else { unreachable!() };
    assert!(q4 < q8 && q8 < f16, "{which}: q4 {q4} < q8 {q8} < f16 {f16}");
}

#[test]
fn base_repository_plan() {
    let components = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"];
    check("base", BASE_FP16, &components);
}

#[test]
fn refiner_repository_plan() {
    check("refiner", REFINER_FP16, &["text_encoder_2", "tokenizer_2", "unet", "vae"]);
}

/// The planner's pack size is what the converter writes (up to the 4-byte alignment of each plane
/// and file), on the tiny base folder, for every preset.
#[test]
fn planned_pack_size_is_what_convert_writes() {
    use sdxl::weights::{DirSource, MemorySource};
    let model = ModelSource::folder(DirSource::new(format!("{ROOT}/tiny-sdxl-base")), true);
    for preset in [QuantPreset::F16, QuantPreset::Q8, QuantPreset::Q4] {
        let plan = pollster::block_on(pack::plan(&model, preset)).unwrap();
        let planned = pollster::block_on(plan.pack_bytes()).unwrap();
        let mut sink = MemorySource::default();
        let manifest = pollster::block_on(pack::convert(plan, 1 << 20, None, &mut sink, |_| {})).unwrap();
        let planes = manifest.files.len() + manifest.tensors.iter().map(|t| 1 + t.scales.is_some() as usize + t.mins.is_some() as usize).sum::<usize>();
        let written = manifest.bytes();
        assert!(planned <= written && written < planned + 4 * planes as u64, "{preset:?}: planned {planned}, written {written} ({planes} planes)");
    }
}
