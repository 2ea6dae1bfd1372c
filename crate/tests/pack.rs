//! Model packs (`sdxl::pack`, `sdxl convert`): the tiny base and refiner converted with each
//! preset into packs with deliberately small shards (so that planes and files cross shard
//! boundaries), generation from a pack against the same model loaded from its folder, the
//! manifest's invariants, corruption and truncation, and the CLI.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{copy_tree, max_abs, sdxl, TempDir};
use std::path::{Path, PathBuf};
use std::process::Output;

use sdxl::pack::{self, ConvertOptions, Manifest, Storage, SHARD_BYTES};
use sdxl::pipeline::generate::{generate, GenerateParams, SdxlModel};
use sdxl::quant::{dequantize, quantize, QuantPolicy, QuantPreset, Weight};
use sdxl::weights::{host_f32, safetensors, DirSource, FileTensors, MemorySource, ModelSource, Source, TensorSource, Vars};
use sdxl::{Gpu, Precision};

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");
const REFINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-refiner");
/// Small, and not a power of two, so that many planes cross shard boundaries at odd offsets.
const TEST_SHARD: u64 = 20_000;



/// Converts `from` into `out` with the test shard size.
fn convert(from: &str, out: &Path, quant: QuantPreset) -> Manifest {
    let options = ConvertOptions { shard_bytes: TEST_SHARD, ..ConvertOptions::new(quant) };
    pollster::block_on(pack::convert_path(Path::new(from), None, out, &options, |_| {})).unwrap_or_else(|e| panic!("convert {from} ({quant:?}): {e}"))
}

fn gpu() -> Gpu {
    pollster::block_on(Gpu::new(Precision::F32)).expect("a GPU adapter (lavapipe)")
}

/// An f16 device, where the adapter has shader-f16.
fn f16_gpu() -> Option<Gpu> {
    gpu().has_shader_f16.then(|| pollster::block_on(Gpu::new(Precision::F16)).expect("an f16 device"))
}


/// Base → refiner at 64x64 with a negative prompt and guidance: (latents, image).
async fn run(gpu: &Gpu, base: &SdxlModel, refiner: &SdxlModel) -> (Vec<f32>, Vec<f32>) {
    let params = GenerateParams {
        prompt: "a lighthouse on a cliff at dawn".into(),
        negative: Some("blurry".into()),
        width: 64,
        height: 64,
        steps: 4,
        guidance: 6.0,
        seed: 11,
        refiner_start: 0.5,
        ..Default::default()
    };
    let out = generate(gpu, base, Some(refiner), &params, |_| {}).await.unwrap();
    (gpu.read(&out.latents).await.unwrap(), gpu.read(&out.image).await.unwrap())
}

/// Every file of a pack folder in memory (what a browser store would hand over).
fn in_memory(dir: &Path) -> MemorySource {
    let mut source = MemorySource::default();
    source.insert(pack::MANIFEST, std::fs::read(dir.join(pack::MANIFEST)).unwrap());
    for entry in std::fs::read_dir(dir.join("shards")).unwrap() {
        let entry = entry.unwrap();
        source.insert(&format!("shards/{}", entry.file_name().to_string_lossy()), std::fs::read(entry.path()).unwrap());
    }
    source
}

/// Asserts that generating from the packs (read from memory where `memory`) differs from the
/// folders by at most `tolerance` in the latents and the image.
fn assert_pack_matches_folder(gpu: &Gpu, preset: QuantPreset, memory: bool, tolerance: f32) {
    let (latents, image) = pack_vs_folder(gpu, preset, memory);
    let source = if memory { " (MemorySource)" } else { "" };
    eprintln!("{preset:?} pack{source} vs folder with {preset:?} ({:?} GPU): latents max |Δ| {latents:e}, image max |Δ| {image:e}", gpu.dtype);
    assert!(latents <= tolerance && image <= tolerance, "latents {latents}, image {image}");
}

/// Generates from the folders (quantized on load with `preset`) and from their packs, and
/// returns the largest differences of (latents, image).
fn pack_vs_folder(gpu: &Gpu, preset: QuantPreset, memory: bool) -> (f32, f32) {
    let dir = TempDir::new(&format!("gen-{preset:?}-{memory}-{:?}", gpu.dtype));
    convert(BASE, &dir.path("base"), preset);
    convert(REFINER, &dir.path("refiner"), preset);
    pollster::block_on(async {
        let folder = {
            let base = SdxlModel::load(gpu, &common::folder(gpu, DirSource::new(BASE)), &preset.policy()).await.unwrap();
            let refiner = SdxlModel::load(gpu, &common::folder(gpu, DirSource::new(REFINER)), &preset.policy()).await.unwrap();
            run(gpu, &base, &refiner).await
        };
        let packed = if memory {
            let (base, _) = pack::open(in_memory(&dir.path("base"))).await.unwrap();
            let (refiner, _) = pack::open(in_memory(&dir.path("refiner"))).await.unwrap();
            // The preset passed to load does not matter for a pack: entries load as stored.
            let base = SdxlModel::load(gpu, &base, &QuantPreset::F16.policy()).await.unwrap();
            let refiner = SdxlModel::load(gpu, &refiner, &QuantPreset::F16.policy()).await.unwrap();
            run(gpu, &base, &refiner).await
        } else {
            let (base, base_pack) = pack::open(DirSource::new(dir.path("base"))).await.unwrap();
            let (refiner, refiner_pack) = pack::open(DirSource::new(dir.path("refiner"))).await.unwrap();
            assert_eq!(base_pack.manifest().model, pack::ModelKind::Base);
            assert_eq!(refiner_pack.manifest().model, pack::ModelKind::Refiner);
            let base = SdxlModel::load(gpu, &base, &preset.policy()).await.unwrap();
            let refiner = SdxlModel::load(gpu, &refiner, &preset.policy()).await.unwrap();
            run(gpu, &base, &refiner).await
        };
        assert!(folder.1.iter().all(|v| v.is_finite()));
        (max_abs(&folder.0, &packed.0), max_abs(&folder.1, &packed.1))
    })
}

#[test]
fn f16_pack_generates_the_folders_image() {
    // The fixtures' weights are fp16 already: the pack holds the same values.
    assert_pack_matches_folder(&gpu(), QuantPreset::F16, false, 1e-6);
}

#[test]
fn q8_pack_generates_the_folders_q8_image() {
    // Same quantizer on the same values: the same planes as quantize-on-load.
    assert_pack_matches_folder(&gpu(), QuantPreset::Q8, false, 1e-6);
}

#[test]
fn q4_pack_from_memory_generates_the_folders_q4_image() {
    assert_pack_matches_folder(&gpu(), QuantPreset::Q4, true, 1e-6);
}

#[test]
fn q8_pack_on_an_f16_gpu_generates_the_folders_q8_image() {
    let Some(gpu) = f16_gpu() else {
        eprintln!("skipped: the adapter has no shader-f16");
        return;
    };
    // Dense f16 entries upload as f16 bits, as the fp16 safetensors do: exactly the folder's image.
    assert_pack_matches_folder(&gpu, QuantPreset::Q8, false, 0.0);
}

/// Weights on a pack: names, shapes, dense and quantized entries, dequantization on request,
/// embedding rows, all against the folder.
#[test]
fn weights_read_from_a_pack_match_the_folder() {
    let dir = TempDir::new("weights");
    convert(BASE, &dir.path("q4"), QuantPreset::Q4);
    let gpu = &gpu();
    pollster::block_on(async {
        let (packed, _) = pack::open(DirSource::new(dir.path("q4"))).await.unwrap();
        let folder = ModelSource::folder(DirSource::new(BASE), false);
        // Small files come back verbatim under their own paths.
        for path in ["model_index.json", "unet/config.json", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json"] {
            assert_eq!(packed.files.read(path).await.unwrap(), folder.files.read(path).await.unwrap(), "{path}");
            assert!(packed.files.exists(path).await, "{path}");
        }
        assert!(!packed.files.exists("unet/diffusion_pytorch_model.safetensors").await);
        assert_eq!(packed.files.read_range("unet/config.json", 3, 10).await.unwrap(), folder.files.read_range("unet/config.json", 3, 10).await.unwrap());

        let dense_policy = QuantPolicy::default();
        let (mut quantized, mut dense) = (0, 0);
        for component in ["text_encoder", "text_encoder_2", "unet", "vae"] {
            let (p, f) = (packed.tensors(component).await.unwrap(), folder.tensors(component).await.unwrap());
            let vars = Vars::new(gpu, &*p, component, &dense_policy);
            assert_eq!(p.names(), f.names(), "{component}: names");
            for name in f.names() {
                let shape = f.info(name).unwrap().shape.clone();
                assert_eq!(p.info(name).unwrap().shape, shape, "{component}/{name}");
                assert!(vars.contains(name));
                let want = host_f32(&*f, name, &shape).await.unwrap();
                let got = host_f32(&*p, name, &shape).await.unwrap();
                match QuantPreset::Q4.policy().format_for(component, name, &shape) {
                    None => {
                        dense += 1;
                        assert_eq!(got, want, "{component}/{name}: dense values");
                    }
                    Some(format) => {
                        quantized += 1;
                        let q = quantize(&want, shape[0], shape[1..].iter().product(), format).unwrap();
                        assert_eq!(got, dequantize(&q), "{component}/{name}: dequantized values");
                        // matrix(): the stored planes, not a re-quantization; tensor(): dequantized.
                        let Weight::Quant(w) = vars.matrix(name, &shape).await.unwrap() else { panic!("{name}: dense") };
                        assert_eq!(w.format, format);
                        assert_eq!(gpu.read_u32(&w.data).await.unwrap(), q.data, "{name}: codes");
                        assert_eq!(gpu.read_u32(w.scales.as_ref().unwrap()).await.unwrap(), q.gpu_scales(), "{name}: scales");
                        let t = vars.tensor(name, &shape).await.unwrap();
                        assert_eq!(gpu.read(&t).await.unwrap(), dequantize(&q), "{name}: tensor() of a quantized entry");
                    }
                }
            }
            assert!(host_f32(&*p, "nope.weight", &[1]).await.is_err());
            let wrong = host_f32(&*p, f.names()[0], &[7, 7, 7]).await.unwrap_err().to_string();
            assert!(wrong.contains("shape"), "{wrong}");
        }
        assert!(quantized > 100 && dense > 100, "{quantized} quantized, {dense} dense");

        // Dense entries: matrix() gives Weight::Dense; embedding tables by rows (cross shards).
        let (p, f) = (packed.tensors("text_encoder_2").await.unwrap(), folder.tensors("text_encoder_2").await.unwrap());
        let (pv, fv) = (Vars::new(gpu, &*p, "text_encoder_2", &dense_policy), Vars::new(gpu, &*f, "text_encoder_2", &dense_policy));
        let name = "text_model.embeddings.token_embedding.weight";
        let shape = f.info(name).unwrap().shape.clone();
        assert!(matches!(pv.matrix(name, &shape).await.unwrap(), Weight::Dense(_)));
        let (p_rows, f_rows) = (pv.tensor_rows(name, [shape[0], shape[1]]).await.unwrap(), fv.tensor_rows(name, [shape[0], shape[1]]).await.unwrap());
        assert_eq!(p_rows.len(), f_rows.len());
        for (a, b) in p_rows.iter().zip(&f_rows) {
            assert_eq!(gpu.read(a).await.unwrap(), gpu.read(b).await.unwrap());
        }
        let missing = packed.tensors("image_encoder").await.err().unwrap().to_string();
        assert!(missing.contains("image_encoder"), "{missing}");
    });
}

/// Shard sizes, alignment, planes crossing shards, checksums, sizes per preset.
#[test]
fn manifests_are_consistent_and_verify() {
    let dir = TempDir::new("manifests");
    let mut sizes = Vec::new();
    for (model, from) in [("base", BASE), ("refiner", REFINER)] {
        for preset in [QuantPreset::F16, QuantPreset::Q8, QuantPreset::Q4] {
            let out = dir.path(&format!("{model}-{preset:?}"));
            let m = convert(from, &out, preset);
            assert_eq!((m.format.as_str(), m.version, m.quant, m.shard_bytes), ("sdxl-pack", 1, preset, TEST_SHARD));
            let (last, full) = m.shards.split_last().unwrap();
            assert!(full.iter().all(|s| s.bytes == TEST_SHARD), "{model} {preset:?}: every shard but the last is full");
            assert!(last.bytes <= TEST_SHARD);
            for (i, s) in m.shards.iter().enumerate() {
                assert_eq!(std::fs::metadata(out.join(&s.path)).unwrap().len(), s.bytes, "{}", s.path);
                assert_eq!(s.path, format!("shards/{i:05}.bin"));
            }
            let planes = m.tensors.iter().flat_map(|t| [Some(&t.data), t.scales.as_ref(), t.mins.as_ref()].into_iter().flatten());
            let mut crossing = 0;
            for segments in planes.chain(m.files.iter().map(|f| &f.segments)) {
                for s in segments {
                    assert_eq!(s.offset % 4, 0);
                    assert!(s.offset + s.length <= m.shards[s.shard as usize].bytes);
                }
                crossing += (segments.len() > 1) as usize;
            }
            assert!(crossing > 10, "{model} {preset:?}: only {crossing} planes cross a shard boundary");
            if preset != QuantPreset::F16 {
                let q = m.tensors.iter().filter(|t| matches!(t.storage, Storage::Q8_0 | Storage::Q4_0 | Storage::Q4_1));
                assert!(q.clone().any(|t| t.data.len() > 1), "{model} {preset:?}: no quantized plane crosses a shard");
                assert!(m.tensors.iter().filter(|t| t.name.starts_with("vae/")).all(|t| t.storage == Storage::F16), "VAE stays dense");
                assert!(m.tensors.iter().filter(|t| t.name.contains("embeddings.")).all(|t| t.storage == Storage::F16), "embeddings stay dense");
            } else {
                assert!(m.tensors.iter().all(|t| t.storage == Storage::F16));
            }
            let want_files = if model == "base" { 14 } else { 9 };
            assert_eq!(m.files.len(), want_files, "{model}: {:?}", m.files.iter().map(|f| &f.path).collect::<Vec<_>>());
            let manifest: Manifest = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(manifest, m);
            pollster::block_on(pack::verify(&DirSource::new(&out))).unwrap();
            let tensor_bytes: u64 = m.tensors.iter().map(|t| t.bytes()).sum();
            sizes.push(format!("{model} {}: {} shards, {} bytes ({} in tensors)", preset.name(), m.shards.len(), m.bytes(), tensor_bytes));
        }
    }
    eprintln!("pack sizes ({TEST_SHARD}-byte shards):\n  {}", sizes.join("\n  "));

    // Converting is deterministic: same input, same bytes.
    let again = convert(BASE, &dir.path("again"), QuantPreset::Q8);
    let first: Manifest = serde_json::from_slice(&std::fs::read(dir.path("base-Q8/manifest.json")).unwrap()).unwrap();
    assert_eq!(again, first);
    assert_eq!(SHARD_BYTES, 64 << 20);
}

/// A copy of the q8 base pack that tests may damage.
fn damaged_copy(dir: &TempDir) -> (PathBuf, Manifest) {
    let out = dir.path("pack");
    let m = convert(BASE, &out, QuantPreset::Q8);
    (out, m)
}

#[test]
fn corrupted_and_truncated_shards_are_named() {
    let dir = TempDir::new("corrupt");
    let (out, m) = damaged_copy(&dir);
    // One flipped byte in the middle shard: verify names it; loading still works (no check there).
    let victim = &m.shards[m.shards.len() / 2].path;
    let path = out.join(victim);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1234] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = pollster::block_on(pack::verify(&DirSource::new(&out))).unwrap_err().to_string();
    assert!(err.contains(victim.as_str()) && err.contains("sha256"), "{err}");
    assert!(pollster::block_on(pack::open(DirSource::new(&out))).is_ok());
    bytes[1234] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    pollster::block_on(pack::verify(&DirSource::new(&out))).unwrap();

    // A corrupt byte inside a small file is caught when the file is read.
    let index = m.files.iter().find(|f| f.path == "unet/config.json").unwrap();
    let seg = index.segments[0];
    let shard = out.join(&m.shards[seg.shard as usize].path);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[seg.offset as usize] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let (source, _) = pollster::block_on(pack::open(DirSource::new(&out))).unwrap();
    let err = pollster::block_on(source.files.read("unet/config.json")).unwrap_err().to_string();
    assert!(err.contains("unet/config.json") && err.contains("sha256"), "{err}");
    bytes[seg.offset as usize] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();

    // A truncated shard: opening the pack and verifying it both name the shard.
    let victim = &m.shards[3].path;
    let path = out.join(victim);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = pollster::block_on(pack::open(DirSource::new(&out))).err().unwrap().to_string();
    assert!(err.contains(victim.as_str()) && err.contains("truncated"), "{err}");
    let err = pollster::block_on(pack::verify(&DirSource::new(&out))).unwrap_err().to_string();
    assert!(err.contains(victim.as_str()), "{err}");
    // A missing shard too.
    std::fs::remove_file(&path).unwrap();
    let err = pollster::block_on(pack::open(DirSource::new(&out))).err().unwrap().to_string();
    assert!(err.contains(victim.as_str()), "{err}");
}

#[test]
fn bad_manifests_are_refused() {
    let dir = TempDir::new("manifest");
    let (out, m) = damaged_copy(&dir);
    let json: serde_json::Value = serde_json::to_value(&m).unwrap();
    let open_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = json.clone();
        edit(&mut v);
        std::fs::write(out.join("manifest.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        pollster::block_on(pack::open(DirSource::new(&out))).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let err = open_with(&|v| v["version"] = 2.into());
    assert!(err.contains("version 2") && err.contains("version 1"), "{err}");
    let err = open_with(&|v| v["format"] = "safetensors".into());
    assert!(err.contains("\"safetensors\"") && err.contains("sdxl-pack"), "{err}");
    let err = open_with(&|v| {
        v.as_object_mut().unwrap().remove("version");
    });
    assert!(err.contains("version"), "{err}");
    let err = open_with(&|v| v["quant"] = "q2".into());
    assert!(err.contains("q2"), "{err}");
    // A plane pointing past its shard, an unaligned one, a wrong plane size.
    let err = open_with(&|v| v["tensors"][0]["data"][0]["offset"] = (TEST_SHARD * 2).into());
    assert!(err.contains(m.tensors[0].name.as_str()), "{err}");
    let err = open_with(&|v| v["tensors"][0]["data"][0]["offset"] = 2.into());
    assert!(err.contains("unaligned"), "{err}");
    let err = open_with(&|v| v["tensors"][0]["shape"][0] = 3.into());
    assert!(err.contains(m.tensors[0].name.as_str()), "{err}");
    let err = open_with(&|v| v["files"][0]["path"] = "../escape".into());
    assert!(err.contains("../escape"), "{err}");
    let err = open_with(&|_| {});
    assert!(err.is_empty(), "the unchanged manifest is refused: {err}");
    std::fs::write(out.join("manifest.json"), b"{ not json").unwrap();
    let err = pollster::block_on(pack::open(DirSource::new(&out))).err().unwrap().to_string();
    assert!(err.contains("manifest.json") && err.contains("JSON"), "{err}");
    let err = pollster::block_on(pack::open(DirSource::new(BASE))).err().unwrap().to_string();
    assert!(err.contains("not a model pack"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// CLI
// ------------------------------------------------------------------------------------------------


fn assert_fails_with(run: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&run.stderr);
    let code = run.status.code();
    assert!(matches!(code, Some(c) if c != 0 && c != 101), "exit status {:?}; stderr:\n{stderr}", run.status);
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no 'error:' line in:\n{stderr}"));
    for needle in needles {
        assert!(line.contains(needle), "{line:?} does not mention {needle:?}");
    }
}

fn assert_ok(run: &Output) -> String {
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "failed ({:?}):\n{stderr}", run.status);
    stderr
}

#[test]
fn cli_convert_then_generate() {
    let dir = TempDir::new("cli");
    let (base, refiner) = (dir.file("base"), dir.file("refiner"));
    let stderr = assert_ok(&sdxl(&["convert", "--from", BASE, "--quant", "q8", "--out", &base]));
    for part in ["text_encoder:", "text_encoder_2:", "unet:", "vae:", "written", "shards/00000.bin", "wrote"] {
        assert!(stderr.contains(part), "progress lacks {part:?}:\n{stderr}");
    }
    assert_ok(&sdxl(&["convert", "--from", REFINER, "--quant", "q8", "--out", &refiner]));
    pollster::block_on(pack::verify(&DirSource::new(&base))).unwrap();

    let png = dir.file("x.png");
    let common = ["--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "3", "--precision", "f32", "--out", &png];
    let mut args = vec!["generate", "--model", &base, "--refiner", &refiner, "--refiner-start", "0.6"];
    args.extend(common);
    let stderr = assert_ok(&sdxl(&args));
    assert!(stderr.contains("model pack") && stderr.contains("q8"), "{stderr}");
    assert!(Path::new(&png).is_file());
    std::fs::remove_file(&png).unwrap();

    // --quant matching the pack is accepted; another preset is an error.
    let mut args = vec!["generate", "--model", &base, "--quant", "q8"];
    args.extend(common);
    assert_ok(&sdxl(&args));
    std::fs::remove_file(&png).unwrap();
    let mut args = vec!["generate", "--model", &base, "--quant", "q4"];
    args.extend(common);
    assert_fails_with(&sdxl(&args), &["--quant q4", &base, "q8"]);
    assert!(!Path::new(&png).exists());

    // An existing pack is replaced only with --force.
    assert_fails_with(&sdxl(&["convert", "--from", BASE, "--quant", "f16", "--out", &base]), &[&base, "not empty", "--force"]);
    let stderr = assert_ok(&sdxl(&["convert", "--from", BASE, "--quant", "f16", "--out", &base, "--force"]));
    assert!(stderr.contains("f16"), "{stderr}");
    let m: Manifest = serde_json::from_slice(&std::fs::read(dir.path("base/manifest.json")).unwrap()).unwrap();
    assert_eq!(m.quant, QuantPreset::F16);
    assert_eq!(std::fs::read_dir(dir.path("base/shards")).unwrap().count(), m.shards.len(), "no stale shards");
}


/// A one-tensor safetensors file with `dtype`.
fn safetensors_with(name: &str, dtype: &str, bytes: &[u8]) -> Vec<u8> {
    let header = serde_json::json!({ name: { "dtype": dtype, "shape": [bytes.len() / 4], "data_offsets": [0, bytes.len()] } });
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(bytes);
    out
}

#[test]
fn cli_convert_refuses_bad_inputs() {
    let dir = TempDir::new("cli-bad");
    let out = dir.file("out");
    let convert = |from: &str, extra: &[&str]| {
        let mut args = vec!["convert", "--from", from, "--out", &out];
        args.extend(extra);
        sdxl(&args)
    };
    let no_output = || assert!(!Path::new(&out).exists(), "{out} was left behind");

    assert_fails_with(&convert(&format!("{BASE}/unet"), &["--quant", "q8"]), &["model_index.json", "not a diffusers model folder"]);
    no_output();
    assert_fails_with(&convert(&dir.file("nowhere"), &["--quant", "q8"]), &["nowhere", "no such file or folder"]);
    assert_fails_with(&convert(BASE, &[]), &["--quant is required"]);
    assert_fails_with(&convert(BASE, &["--quant", "q3"]), &["q3", "f16, q8 or q4"]);
    assert_fails_with(&sdxl(&["convert", "--from", BASE, "--quant", "q8"]), &["--out is required"]);
    no_output();

    // A declared component without its folder.
    let no_vae = dir.path("no-vae");
    copy_tree(Path::new(BASE), &no_vae, "vae");
    assert_fails_with(&convert(&no_vae.display().to_string(), &["--quant", "q8"]), &["vae/config.json", "declares 'vae'"]);
    no_output();
    let no_tokenizer = dir.path("no-tokenizer");
    copy_tree(Path::new(BASE), &no_tokenizer, "tokenizer");
    assert_fails_with(&convert(&no_tokenizer.display().to_string(), &["--quant", "q8"]), &["tokenizer/vocab.json", "declares 'tokenizer'"]);

    // Not an SDXL pipeline.
    let sd15 = dir.path("sd15");
    copy_tree(Path::new(BASE), &sd15, "");
    let index = std::fs::read_to_string(sd15.join("model_index.json")).unwrap().replace("StableDiffusionXLPipeline", "StableDiffusionPipeline");
    std::fs::write(sd15.join("model_index.json"), index).unwrap();
    assert_fails_with(&convert(&sd15.display().to_string(), &["--quant", "q8"]), &["StableDiffusionPipeline", "not a Stable Diffusion XL"]);

    // Unsupported dtypes: an integer weight, and a dtype safetensors allows but the engine does not.
    let ints = dir.path("ints");
    copy_tree(Path::new(BASE), &ints, "");
    std::fs::write(ints.join("vae/diffusion_pytorch_model.safetensors"), safetensors_with("decoder.conv_in.weight", "I32", &[0; 16])).unwrap();
    assert_fails_with(&convert(&ints.display().to_string(), &["--quant", "q8"]), &["decoder.conv_in.weight", "I32", "not supported"]);
    no_output();
    std::fs::write(ints.join("vae/diffusion_pytorch_model.safetensors"), safetensors_with("decoder.conv_in.weight", "C64", &[0; 16])).unwrap();
    assert_fails_with(&convert(&ints.display().to_string(), &["--quant", "q8"]), &["unsupported dtype C64"]);
    no_output();

    // A pack is not a diffusers folder.
    let packed = dir.file("packed");
    assert_ok(&sdxl(&["convert", "--from", REFINER, "--quant", "q4", "--out", &packed]));
    assert_fails_with(&convert(&packed, &["--quant", "q8"]), &[&packed, "already a model pack"]);

    // A non-empty output folder that is not a pack is never replaced.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(dir.path("out/notes.txt"), "keep me").unwrap();
    assert_fails_with(&convert(BASE, &["--quant", "q8"]), &[&out, "not empty"]);
    assert_fails_with(&convert(BASE, &["--quant", "q8", "--force"]), &[&out, "notes.txt", "even with --force"]);
    assert_eq!(std::fs::read_to_string(dir.path("out/notes.txt")).unwrap(), "keep me");
}

#[test]
fn safetensors_f32_sources_round_to_f16_unless_out_of_range() {
    // A folder whose UNet holds f32 values beyond f16's range keeps that tensor f32 in the pack.
    let dir = TempDir::new("f32");
    let src = dir.path("src");
    copy_tree(Path::new(REFINER), &src, "");
    let path = "vae/diffusion_pytorch_model.safetensors";
    let source = DirSource::new(&src);
    let values: Vec<(String, Vec<usize>, Vec<f32>)> = pollster::block_on(async {
        let w = FileTensors::open(&source, vec![path.into()]).await.unwrap();
        let mut all = Vec::new();
        for name in w.names() {
            let shape = w.shape(name).unwrap().to_vec();
            let mut v = w.host(name, &shape).await.unwrap();
            if name == "decoder.conv_out.bias" {
                v[0] = 1e6;
            }
            all.push((name.to_string(), shape, v));
        }
        all
    });
    let views: Vec<_> = values.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice())).collect();
    std::fs::write(src.join(path), safetensors::serialize_f32(&views)).unwrap();
    let m = convert(&src.display().to_string(), &dir.path("pack"), QuantPreset::F16);
    for t in m.tensors.iter().filter(|t| t.name.starts_with("vae/")) {
        let want = if t.name == "vae/decoder.conv_out.bias" { Storage::F32 } else { Storage::F16 };
        assert_eq!(t.storage, want, "{}", t.name);
    }
    pollster::block_on(async {
        let (packed, _) = pack::open(DirSource::new(dir.path("pack"))).await.unwrap();
        let w = packed.tensors("vae").await.unwrap();
        let bias = host_f32(&*w, "decoder.conv_out.bias", &[values.iter().find(|v| v.0 == "decoder.conv_out.bias").unwrap().1[0]]).await.unwrap();
        assert_eq!(bias[0], 1e6);
    });
}
