//! Original single-file SDXL checkpoints (SGM layout) of the tiny fixtures
//! (tests/fixtures/single-file/, written by make_single_file.py and checked there against
//! diffusers' own single-file loader): every tensor equals its diffusers folder's, whole pipelines
//! give the folders' images, and bad files get typed errors naming the file and the tensor. The
//! same for GGUF files of them in stable-diffusion.cpp's naming, quantized as it quantizes.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::Path;

use common::{psnr, sdxl, Case, TempDir};
use sdxl::pipeline::generate::{generate, SdxlModel};
use sdxl::quant::QuantPreset;
use sdxl::weights::gguf::{GgmlType, GgufWriter};
use sdxl::weights::safetensors::Dtype;
use sdxl::weights::{host_f32, DirSource, Encoding, FileTensors, ModelSource, SharedSource, TensorSource};
use sdxl::{DType, Error, Gpu, Precision};

gpu_tests!(pipelines_match_the_folders);

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// A copy of a fixture folder without its weights, so that only the checkpoint can serve tensors.
fn configs_only(model: &str, to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().map(Result::unwrap) {
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else if !entry.file_name().to_string_lossy().ends_with(".safetensors") {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    copy(&Path::new(FIXTURES).join(model), to);
}

/// `file` in `dir` as a model, with the configs of fixture `model` (weights left out).
async fn open_in(configs: &TempDir, model: &str, dir: &Path, file: &str) -> sdxl::Result<ModelSource<'static>> {
    let config_dir = configs.path(model);
    if !config_dir.exists() {
        configs_only(model, &config_dir);
    }
    ModelSource::single_file(DirSource::new(dir), file, Some(SharedSource::new(DirSource::new(config_dir)))).await
}

/// The committed single file of fixture `model`.
async fn single_file(configs: &TempDir, model: &str) -> ModelSource<'static> {
    open_in(configs, model, &Path::new(FIXTURES).join("single-file"), &format!("{model}.safetensors")).await.unwrap()
}

fn folder(model: &str) -> ModelSource<'static> {
    ModelSource::folder(DirSource::new(Path::new(FIXTURES).join(model)), true)
}

/// Every tensor of `want` is in `got` with the same shape and the same f32 bits.
async fn same_tensors(what: &str, got: &dyn TensorSource, want: &dyn TensorSource) {
    for name in want.names() {
        let shape = want.info(name).unwrap().shape.clone();
        assert_eq!(got.info(name).map(|i| &i.shape), Some(&shape), "{what}: {name} shape");
        let (a, b) = (host_f32(got, name, &shape).await.unwrap(), host_f32(want, name, &shape).await.unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: {name} differs");
    }
}

const BASE: (&str, &[&str]) = ("tiny-sdxl-base", &["text_encoder", "text_encoder_2", "unet", "vae"]);
const REFINER: (&str, &[&str]) = ("tiny-sdxl-refiner", &["text_encoder_2", "unet", "vae"]);

#[test]
fn every_tensor_equals_the_folders() {
    pollster::block_on(async {
        let configs = TempDir::new("configs");
        for (model, components) in [BASE, REFINER] {
            let checkpoint = single_file(&configs, model).await;
            let kind = if model == BASE.0 { "Base" } else { "Refiner" };
            assert!(checkpoint.format.contains(kind), "{model}: detected as {}", checkpoint.format);
            let folder = folder(model);
            for &dir in components {
                let (want, got) = (folder.tensors(dir).await.unwrap(), checkpoint.tensors(dir).await.unwrap());
                same_tensors(&format!("{model}/{dir}"), &*got, &*want).await;
                for name in want.names() {
                    assert_eq!(got.info(name).unwrap().encoding, want.info(name).unwrap().encoding, "{model}/{dir}: {name} dtype");
                }
                // SGM's CLIP-L also stores position_ids, which diffusers' folders leave out.
                let extra: Vec<&str> = got.names().into_iter().filter(|n| want.info(n).is_none()).collect();
                let allowed: &[&str] = if dir == "text_encoder" { &["text_model.embeddings.position_ids"] } else { &[] };
                assert_eq!(extra, allowed, "{model}/{dir}: tensors the folder does not have");
                eprintln!("{model}/{dir}: {} tensors equal the folder's", want.names().len());
            }
        }
    });
}

async fn pipelines_match_the_folders(gpu: &Gpu) {
    let configs = TempDir::new(&format!("pipeline-{:?}", gpu.dtype));
    let from_file = (
        SdxlModel::load(gpu, &single_file(&configs, BASE.0).await, &QuantPreset::F16.policy()).await.unwrap(),
        SdxlModel::load(gpu, &single_file(&configs, REFINER.0).await, &QuantPreset::F16.policy()).await.unwrap(),
    );
    let from_dir = (
        SdxlModel::load(gpu, &folder(BASE.0), &QuantPreset::F16.policy()).await.unwrap(),
        SdxlModel::load(gpu, &folder(REFINER.0), &QuantPreset::F16.policy()).await.unwrap(),
    );
    let references = DirSource::new(Path::new(FIXTURES).join("reference"));
    let reference = FileTensors::open(&references, vec!["pipeline.safetensors".into()]).await.unwrap();
    let min_reference_psnr = if gpu.dtype == DType::F32 { 45.0 } else { 30.0 };
    for case in Case::load("pipeline_cases.json") {
        let image = run(gpu, &from_file, &case).await;
        let folder_image = run(gpu, &from_dir, &case).await;
        let db = psnr(&image, &folder_image);
        assert!(db >= 45.0, "{}: single file vs folder image PSNR {db:.1} dB < 45 ({:?})", case.name, gpu.dtype);
        let shape = [1, 3, case.height, case.width];
        let want = reference.host(&format!("{}.image", case.name), &shape).await.unwrap();
        let db_ref = psnr(&image, &want);
        assert!(db_ref >= min_reference_psnr, "{}: single file vs diffusers PSNR {db_ref:.1} dB ({:?})", case.name, gpu.dtype);
        eprintln!("{} {:?}: single file vs folder PSNR {db:.1} dB, vs diffusers {db_ref:.1} dB", case.name, gpu.dtype);
    }
}

/// The image of a case's run (base only, or base then refiner).
async fn run(gpu: &Gpu, (base, refiner): &(SdxlModel, SdxlModel), case: &Case) -> Vec<f32> {
    let out = generate(gpu, base, case.refiner_start.map(|_| refiner), &case.params(), |_| {}).await.unwrap();
    gpu.read(&out.image).await.unwrap()
}

/// Rewrites the committed single file of `model` into `dir/name` with its JSON header edited by
/// `edit` (tensor bytes untouched).
fn edited(dir: &TempDir, model: &str, name: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let bytes = std::fs::read(Path::new(FIXTURES).join(format!("single-file/{model}.safetensors"))).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(&bytes[8 + n..]);
    std::fs::write(dir.path(name), out).unwrap();
    name.to_string()
}

fn tensor_error(result: sdxl::Result<impl Sized>) -> (String, String, String) {
    match result.map(|_| ()) {
        Err(Error::Tensor { path, tensor, message }) => (path, tensor, message),
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

#[test]
fn bad_files_get_errors_naming_the_problem() {
    pollster::block_on(async {
        let dir = TempDir::new("bad");
        let configs = TempDir::new("bad-configs");
        let base = "tiny-sdxl-base";

        // Truncated: the last tensor's bytes lie past the end.
        let bytes = std::fs::read(Path::new(FIXTURES).join("single-file/tiny-sdxl-base.safetensors")).unwrap();
        std::fs::write(dir.path("truncated.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
        match open_in(&configs, base, &dir.0, "truncated.safetensors").await.map(|_| ()) {
            Err(e @ Error::Safetensors { .. }) => assert!(e.to_string().contains("truncated.safetensors") && e.to_string().contains("truncated"), "{e}"),
            other => panic!("truncated file: {other:?}"),
        }

        // Unrelated tensors: neither base nor refiner.
        let unrelated = edited(&dir, base, "unrelated.safetensors", |h| {
            let tensors: Vec<(String, serde_json::Value)> = std::mem::take(h).into_iter().collect();
            h.extend(tensors.into_iter().map(|(k, v)| (k.replace("conditioner.embedders.", "cond_stage_model.encoders."), v)));
        });
        match open_in(&configs, base, &dir.0, &unrelated).await.map(|_| ()) {
            Err(Error::WrongModel { path, message }) => assert!(path.ends_with("unrelated.safetensors") && message.contains("neither an SDXL base"), "{path}: {message}"),
            other => panic!("unrelated tensors: {other:?}"),
        }

        // A missing tensor surfaces when the model asks for it, under diffusers' name.
        let missing = edited(&dir, base, "missing.safetensors", |h| {
            h.remove("model.diffusion_model.out.2.weight");
        });
        let source = open_in(&configs, base, &dir.0, &missing).await.unwrap();
        let unet = source.tensors("unet").await.unwrap();
        let (path, tensor, message) = tensor_error(host_f32(&*unet, "conv_out.weight", &[4, 8, 3, 3]).await);
        assert!(path.ends_with("missing.safetensors") && tensor == "conv_out.weight" && message.contains("missing"), "{path}: {tensor}: {message}");

        // A wrong shape: text_projection stored [projection, hidden] instead of OpenCLIP's [hidden, projection].
        let wrong = edited(&dir, base, "wrong_shape.safetensors", |h| {
            h["conditioner.embedders.1.model.text_projection"]["shape"] = serde_json::json!([32, 24]);
        });
        let source = open_in(&configs, base, &dir.0, &wrong).await.unwrap();
        let text = source.tensors("text_encoder_2").await.unwrap();
        let (_, tensor, message) = tensor_error(host_f32(&*text, "text_projection.weight", &[32, 24]).await);
        assert!(tensor == "text_projection.weight" && message.contains("[24, 32]"), "{tensor}: {message}");

        // Fused q/k/v rows that do not split in three are reported when the file is indexed.
        let fused = edited(&dir, base, "fused.safetensors", |h| {
            h["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"]["shape"] = serde_json::json!([8, 9]);
        });
        let (_, tensor, message) = tensor_error(open_in(&configs, base, &dir.0, &fused).await);
        assert!(tensor.ends_with("resblocks.0.attn.in_proj_bias") && message.contains("split in three"), "{tensor}: {message}");

        // A base checkpoint with a refiner's config folder, and a refiner asked for CLIP-L.
        let mismatch = open_in(&configs, "tiny-sdxl-refiner", &Path::new(FIXTURES).join("single-file"), "tiny-sdxl-base.safetensors").await;
        match mismatch.map(|_| ()) {
            Err(e @ Error::Config { .. }) => assert!(e.to_string().contains("is an SDXL base") && e.to_string().contains("for an SDXL refiner"), "{e}"),
            other => panic!("base file with refiner configs: {other:?}"),
        }
        let refiner = single_file(&configs, "tiny-sdxl-refiner").await;
        let (_, tensor, message) = tensor_error(refiner.tensors("text_encoder").await);
        assert!(tensor == "text_encoder/*" && message.contains("no text_encoder"), "{tensor}: {message}");
    });
}

#[test]
fn cli_generates_from_single_files_as_from_folders() {
    // The split case, weight matrices quantized to q8 as they load: the same image either way.
    let case = Case::load("pipeline_cases.json").into_iter().find(|c| c.name == "split").unwrap();
    let dir = TempDir::new("cli");
    let configs = dir.path("configs");
    configs_only(BASE.0, &configs.join("base"));
    configs_only(REFINER.0, &configs.join("refiner"));
    let single = |name: &str| format!("{FIXTURES}/single-file/{name}.safetensors");
    let (base_file, refiner_file) = (single(BASE.0), single(REFINER.0));
    let (base_configs, refiner_configs) = (configs.join("base").display().to_string(), configs.join("refiner").display().to_string());
    let (base_dir, refiner_dir) = (format!("{FIXTURES}/{}", BASE.0), format!("{FIXTURES}/{}", REFINER.0));
    let from_files = ["--model", &base_file, "--config", &base_configs, "--refiner", &refiner_file, "--refiner-config", &refiner_configs];
    let from_folders = ["--model", &base_dir, "--refiner", &refiner_dir];
    let (steps, seed, width, height) = (case.steps.to_string(), case.seed.to_string(), case.width.to_string(), case.height.to_string());
    let mut images = Vec::new();
    for (name, models) in [("files", &from_files[..]), ("folders", &from_folders[..])] {
        let (png, tensors) = (dir.file(&format!("{name}.png")), dir.file(&format!("{name}.safetensors")));
        let mut args = vec!["generate", "--prompt", &case.prompt, "--steps", &steps, "--seed", &seed, "--width", &width, "--height", &height];
        args.extend(models);
        args.extend(["--quant", "q8", "--out", &png, "--tensors-out", &tensors]);
        let run = sdxl(&args);
        assert!(run.status.success(), "sdxl {args:?}:\n{}", String::from_utf8_lossy(&run.stderr));
        let source = DirSource::new(&dir.0);
        let w = pollster::block_on(FileTensors::open(&source, vec![format!("{name}.safetensors")])).unwrap();
        images.push(pollster::block_on(w.host("image", &[1, 3, case.height, case.width])).unwrap());
    }
    let db = psnr(&images[0], &images[1]);
    assert!(db >= 45.0, "q8 from single files vs folders: PSNR {db:.1} dB");
    eprintln!("CLI, q8: single files vs folders PSNR {db:.1} dB");

    // Without --config, the configs are inferred: the tiny model's 8-channel levels are not SDXL's
    // 64-wide heads, which the error says, pointing to --config.
    let run = sdxl(&["generate", "--model", &base_file, "--prompt", "x", "--out", &dir.file("x.png")]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("--config") && stderr.contains("tiny-sdxl-base.safetensors") && stderr.contains("64-wide"), "{stderr}");
}

/// stable-diffusion.cpp's name of an SGM tensor (what `sd -M convert` writes; None: a tensor it
/// drops), and the shape it stores: transformers' names under `cond_stage_model.` for the text
/// encoders with OpenCLIP's fused in_proj kept, the UNet's Linear proj_in/out as 1x1 convolutions.
fn sd_cpp_name(sgm: &str, shape: &[usize]) -> Option<(String, Vec<usize>)> {
    const OPEN_CLIP: [(&str, &str); 10] = [
        ("transformer.resblocks.", "text_model.encoder.layers."),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("token_embedding.", "text_model.embeddings.token_embedding."),
        ("ln_final.", "text_model.final_layer_norm."),
        ("text_projection", "text_model.text_projection"),
        ("attn.in_proj_", "self_attn.in_proj."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
    ];
    let open_clip = |prefix: &str, rest: &str| {
        let renamed = OPEN_CLIP.iter().fold(rest.replace("mlp.c_proj.", "mlp.fc2."), |name, (sgm, sd)| name.replacen(sgm, sd, 1));
        (rest != "logit_scale").then(|| format!("{prefix}{renamed}"))
    };
    let name = if let Some(rest) = sgm.strip_prefix("conditioner.embedders.0.transformer.") {
        (!rest.ends_with("position_ids")).then(|| format!("cond_stage_model.transformer.{rest}"))?
    } else if let Some(rest) = sgm.strip_prefix("conditioner.embedders.1.model.") {
        open_clip("cond_stage_model.1.transformer.", rest)?
    } else if let Some(rest) = sgm.strip_prefix("conditioner.embedders.0.model.") {
        open_clip("cond_stage_model.transformer.", rest)?
    } else {
        sgm.to_string()
    };
    let conv = name.starts_with("model.diffusion_model.") && (name.ends_with("proj_in.weight") || name.ends_with("proj_out.weight"));
    Some((name, if conv { [shape, &[1, 1]].concat() } else { shape.to_vec() }))
}

/// Writes fixture `model`'s single file as a GGUF file in stable-diffusion.cpp's naming, with the
/// weight matrices of Linear, attention and feed-forward layers stored as `quant` (as sd.cpp
/// quantizes: not convolutions, norms, biases, embeddings or the time/label embedding MLPs; only
/// rows of whole 32-value blocks) and everything else F16. Returns the number of quantized tensors.
fn write_gguf(model: &str, quant: GgmlType, path: &Path) -> usize {
    let dir = Path::new(FIXTURES).join("single-file");
    let source = DirSource::new(&dir);
    let file = format!("{model}.safetensors");
    let weights = pollster::block_on(FileTensors::open(&source, vec![file])).unwrap();
    let mut writer = GgufWriter::new();
    let mut quantized = 0;
    for sgm in weights.names() {
        let shape = weights.shape(sgm).unwrap().to_vec();
        let Some((name, stored_shape)) = sd_cpp_name(sgm, &shape) else { continue };
        let matrix = shape.len() == 2 && name.ends_with(".weight") && !name.contains("embedding") && !name.contains("time_embed.") && !name.contains("label_emb.");
        let ggml_type = if (matrix || name.ends_with("text_projection")) && shape[1].is_multiple_of(32) { quant } else { GgmlType::F16 };
        quantized += usize::from(ggml_type != GgmlType::F16);
        let values = pollster::block_on(weights.host(sgm, &shape)).unwrap();
        writer.tensor(&name, &stored_shape, ggml_type, &values).unwrap();
    }
    std::fs::write(path, writer.to_bytes()).unwrap();
    quantized
}

#[test]
fn gguf_files_generate_the_folders_image() {
    // The split case (base then refiner) on an f32 device, from GGUF files of every type.
    let case = Case::load("pipeline_cases.json").into_iter().find(|c| c.name == "split").unwrap();
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let dir = TempDir::new("gguf");
        let configs = TempDir::new("gguf-configs");
        let folders = (
            SdxlModel::load(&gpu, &folder(BASE.0), &QuantPreset::F16.policy()).await.unwrap(),
            SdxlModel::load(&gpu, &folder(REFINER.0), &QuantPreset::F16.policy()).await.unwrap(),
        );
        let want = run(&gpu, &folders, &case).await;
        // Floors well under what was measured (f16 identical; q8_0 70 dB; q4/q5 45-50 dB), yet far
        // above what a wrong block layout or name gives.
        let floors = [(GgmlType::F16, 45.0), (GgmlType::Q8_0, 50.0), (GgmlType::Q5_0, 30.0), (GgmlType::Q5_1, 30.0), (GgmlType::Q4_1, 30.0), (GgmlType::Q4_0, 30.0)];
        for (ggml_type, floor) in floors {
            let mut models = Vec::new();
            for model in [BASE.0, REFINER.0] {
                let file = format!("{model}-{}.gguf", ggml_type.name());
                let quantized = write_gguf(model, ggml_type, &dir.path(&file));
                let source = open_in(&configs, model, &dir.0, &file).await.unwrap();
                models.push(SdxlModel::load(&gpu, &source, &QuantPreset::F16.policy()).await.unwrap());
                eprintln!("{file}: {quantized} weight matrices stored as {}, the rest F16", ggml_type.name());
            }
            let models: (SdxlModel, SdxlModel) = (models.remove(0), models.remove(0));
            let db = psnr(&run(&gpu, &models, &case).await, &want);
            eprintln!("GGUF {}: image PSNR {db:.1} dB vs the folders", ggml_type.name());
            assert!(db >= floor, "GGUF {}: PSNR {db:.1} dB < {floor}", ggml_type.name());
        }
    });
}

#[test]
fn gguf_tensors_equal_the_folders_and_bad_types_are_named() {
    pollster::block_on(async {
        let dir = TempDir::new("gguf-tensors");
        let configs = TempDir::new("gguf-tensors-configs");
        // F16 GGUF in sd.cpp's naming: every tensor the folder has, bit for bit.
        for (model, components) in [BASE, REFINER] {
            let file = format!("{model}.gguf");
            write_gguf(model, GgmlType::F16, &dir.path(&file));
            let (source, folder) = (open_in(&configs, model, &dir.0, &file).await.unwrap(), folder(model));
            for &component in components {
                let (want, got) = (folder.tensors(component).await.unwrap(), source.tensors(component).await.unwrap());
                same_tensors(&format!("{model}.gguf {component}"), &*got, &*want).await;
            }
        }
        // Q8_0: a quantized transposed text_projection is dequantized and transposed on load.
        write_gguf(REFINER.0, GgmlType::Q8_0, &dir.path("q8.gguf"));
        let source = open_in(&configs, REFINER.0, &dir.0, "q8.gguf").await.unwrap();
        let got = source.tensors("text_encoder_2").await.unwrap();
        let want = folder(REFINER.0).tensors("text_encoder_2").await.unwrap();
        let (a, b) = (host_f32(&*got, "text_projection.weight", &[32, 24]).await.unwrap(), host_f32(&*want, "text_projection.weight", &[32, 24]).await.unwrap());
        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
        assert!(err <= scale / 100.0, "q8_0 text_projection max |Δ| {err} (values up to {scale})");
        assert_eq!(got.info("text_projection.weight").unwrap().encoding, Encoding::Float(Dtype::F32), "a transposed block-quantized entry is served dense");

        // A tensor in a ggml type the engine does not load (IQ4_NL): the error names tensor and type.
        let mut writer = GgufWriter::new();
        writer.raw_tensor("model.diffusion_model.out.2.weight", &[4, 32], 20, vec![0; 18 * 4]);
        std::fs::write(dir.path("iq4.gguf"), writer.to_bytes()).unwrap();
        let (path, tensor, message) = tensor_error(open_in(&configs, BASE.0, &dir.0, "iq4.gguf").await);
        assert!(path.ends_with("iq4.gguf") && tensor == "model.diffusion_model.out.2.weight" && message.contains("IQ4_NL"), "{path}: {tensor}: {message}");
    });
}

/// A GGUF single file at SDXL's hyperparameters (tests/fixtures/make_inferable.py) needs no config:
/// the CLI infers it and generates diffusers' image of the same weights; `sdxl convert --quant f16`
/// packs it (its Q4_0 blocks as stored, its F16 tensors as they are) and the pack gives the same image.
#[test]
fn single_files_without_configs_generate_diffusers_image() {
    let case = Case::load("inferable_cases.json").remove(0);
    let dir = TempDir::new("inferable");
    let file = format!("{FIXTURES}/single-file/tiny-sdxl-std.gguf");
    let pack = dir.file("pack");
    assert!(sdxl(&["convert", "--from", &file, "--quant", "f16", "--out", &pack]).status.success());
    let (steps, seed, width, height, guidance) = (case.steps.to_string(), case.seed.to_string(), case.width.to_string(), case.height.to_string(), case.guidance.to_string());
    let source = DirSource::new(&dir.0);
    let reference = DirSource::new(format!("{FIXTURES}/reference"));
    let want = pollster::block_on(async { FileTensors::open(&reference, vec!["inferable.safetensors".into()]).await.unwrap().host("std.image", &[1, 3, case.height, case.width]).await.unwrap() });
    let mut images = Vec::new();
    for (name, model) in [("file", file.as_str()), ("pack", pack.as_str())] {
        let (png, tensors) = (dir.file(&format!("{name}.png")), dir.file(&format!("{name}.safetensors")));
        let args = ["generate", "--model", model, "--prompt", &case.prompt, "--steps", &steps, "--seed", &seed, "--width", &width, "--height", &height,
            "--guidance", &guidance, "--precision", "f32", "--out", &png, "--tensors-out", &tensors];
        let run = sdxl(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "sdxl {args:?}:\n{stderr}");
        if name == "file" {
            assert!(stderr.contains("configs inferred from the tensors"), "{stderr}");
        }
        let image = pollster::block_on(async { FileTensors::open(&source, vec![format!("{name}.safetensors")]).await.unwrap().host("image", &[1, 3, case.height, case.width]).await.unwrap() });
        let db = psnr(&image, &want);
        eprintln!("tiny-sdxl-std.gguf ({name}), configs inferred: image PSNR {db:.1} dB vs diffusers");
        assert!(db >= 45.0, "{name}: {db:.1} dB vs diffusers");
        images.push(image);
    }
    assert_eq!(images[0], images[1], "the pack keeps the file's blocks as stored");
}

/// A safetensors file of the given (name, shape) tensors, all F16 zeros.
fn safetensors_of(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name.to_string(), serde_json::json!({ "dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes] }));
        offset += bytes;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.resize(out.len() + offset, 0);
    out
}

/// Single files of other architectures, named as their real checkpoints name their tensors, are
/// refused with `WrongModel` saying what they look like (as a file, and loaded for generation).
#[test]
fn other_architectures_are_refused_naming_what_they_look_like() {
    let sd1: &[(&str, &[usize])] = &[
        ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
        ("model.diffusion_model.time_embed.0.weight", &[1280, 320]),
        ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", &[49408, 768]),
    ];
    let sd2: &[(&str, &[usize])] = &[
        ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
        ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", &[3072, 1024]),
        ("cond_stage_model.model.token_embedding.weight", &[49408, 1024]),
    ];
    let sd3: &[(&str, &[usize])] = &[
        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", &[4608, 1536]),
        ("text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight", &[49408, 768]),
        ("first_stage_model.decoder.conv_in.weight", &[512, 16, 3, 3]),
    ];
    let flux: &[(&str, &[usize])] = &[("double_blocks.0.img_attn.qkv.weight", &[9216, 3072]), ("single_blocks.0.linear1.weight", &[21504, 3072])];
    let flux_comfy: &[(&str, &[usize])] = &[("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", &[9216, 3072])];
    let unet: &[(&str, &[usize])] = &[("down_blocks.0.resnets.0.conv1.weight", &[320, 320, 3, 3]), ("add_embedding.linear_1.weight", &[1280, 2816])];
    let vae: &[(&str, &[usize])] = &[("decoder.conv_in.weight", &[512, 4, 3, 3]), ("encoder.conv_in.weight", &[128, 3, 3, 3])];
    let cases = [
        ("sd15.safetensors", sd1, "Stable Diffusion 1.x"),
        ("sd21.safetensors", sd2, "Stable Diffusion 2.x"),
        ("sd3.safetensors", sd3, "Stable Diffusion 3"),
        ("flux1-dev.safetensors", flux, "FLUX"),
        ("flux1-comfy.safetensors", flux_comfy, "FLUX"),
        ("diffusion_pytorch_model.safetensors", unet, "a UNet alone"),
        ("sdxl_vae.safetensors", vae, "a VAE alone"),
    ];
    for (file, tensors, looks) in cases {
        let mut source = sdxl::weights::MemorySource::default();
        source.insert(file, safetensors_of(tensors));
        match pollster::block_on(ModelSource::single_file(source, file, None)).map(|_| ()) {
            Err(e @ Error::WrongModel { .. }) => {
                let message = e.to_string();
                assert!(e.kind() == "WrongModel" && message.contains(file) && message.contains(looks), "{file}: {message}");
            }
            other => panic!("{file}: {other:?}"),
        }
    }
}
