//! Quantization quality on the tiny base fixture (issue bar: q8 image PSNR >= 35 dB against dense
//! f32 on the same seed; q4 measured and reported).
#![cfg(not(target_arch = "wasm32"))]

use sdxl::pipeline::generate::{generate, GenerateParams, SdxlModel};
use sdxl::pipeline::quality::{allocate, psnr, quality, sensitivity, FormatErrors, RoleSensitivity};
use sdxl::quant::{role, QuantFormat, QuantPolicy, Q4_EXCEPTIONS};
use sdxl::weights::safetensors::Dtype;
use sdxl::weights::{random, DirSource, Encoding, Fetch, HostTensor, MemorySource, ModelSource, SharedSource, Source, TensorInfo, TensorSource};
use sdxl::{Gpu, Precision};
use std::collections::HashMap;

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a red fox in the snow, watercolor".into(),
        negative: Some("blurry".into()),
        width: 96,
        height: 64,
        steps: 5,
        seed: 42,
        ..Default::default()
    }
}

#[test]
fn q8_and_q4_quality_against_dense_f32() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let report = quality(&gpu, &ModelSource::folder(DirSource::new(BASE), false), &params()).await.unwrap();
        assert!(report.layers.len() > 50, "every quantizable UNet matrix is measured (127 in the fixture)");
        for l in &report.layers {
            // Q8_0's error per element is at most half a step of max|x| / 127; Q4_1's of
            // (max - min) / 15, Q4_0's of max|x| / 8 (a whole step for the clamped code 15).
            let e = &l.errors;
            assert!(e.q8_0 < 0.01 && e.q4_1 < 0.1 && e.q4_0 < 0.15 && e.q8_0 < e.q4_1.min(e.q4_0), "{}: {e:?}", l.name);
        }
        let [q8, q4] = [&report.presets[0], &report.presets[1]];
        eprintln!("q8: UNet rel. error {:.2e}, PSNR {:.1} dB; q4: {:.2e}, {:.1} dB", q8.unet_relative_error, q8.image_psnr, q4.unet_relative_error, q4.image_psnr);
        assert!(q8.image_psnr >= 35.0, "q8 image PSNR {:.1} dB < 35 dB", q8.image_psnr);
        assert!(q8.unet_relative_error < 0.05, "q8 UNet relative error {:.2e}", q8.unet_relative_error);
        assert!(q4.image_psnr.is_finite() && q4.image_psnr > 20.0, "q4 image PSNR {:.1} dB", q4.image_psnr);
        assert!(q4.unet_bytes < q8.unet_bytes, "q4 must be smaller than q8");
    });
}

#[test]
fn roles_group_layers_across_indices() {
    assert_eq!(role("unet/down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_k.weight"), "unet/down_blocks.attentions.transformer_blocks.attn2.to_k");
    assert_eq!(role("unet/up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"), "unet/up_blocks.attentions.transformer_blocks.ff.net.proj");
    assert_eq!(role("text_encoder_2/text_model.encoder.layers.31.mlp.fc1.weight"), "text_encoder_2/text_model.encoder.layers.mlp.fc1");
    let policy = QuantPolicy {
        default: Some(QuantFormat::Q4_0),
        exceptions: vec![("unet/mid_block.resnets.conv1".into(), Some(QuantFormat::Q8_0)), ("unet/up_blocks.upsamplers.conv".into(), None)],
    };
    assert_eq!(policy.format_for("unet", "mid_block.resnets.1.conv1.weight", &[2, 1280 * 9]), Some(QuantFormat::Q8_0));
    assert_eq!(policy.format_for("unet", "mid_block.resnets.1.conv2.weight", &[2, 1280 * 9]), Some(QuantFormat::Q4_0));
    assert_eq!(policy.format_for("unet", "up_blocks.1.upsamplers.0.conv.weight", &[2, 1280 * 9]), None);
    assert_eq!(policy.format_for("unet", "conv_in.weight", &[2, 36]), None, "always dense");
    assert_eq!(policy.format_for("unet", "down_blocks.0.resnets.0.time_emb_proj.weight", &[2, 1280]), None, "always dense");
    assert_eq!(policy.format_for("text_encoder_2", "text_projection.weight", &[2, 1280]), None, "always dense");
    assert_eq!(policy.format_for("unet", "down_blocks.0.resnets.0.conv1.weight", &[2, 16]), None, "narrower than a block");
    // The q4 preset's exceptions name roles that exist in the real SDXL base UNet.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference/sdxl_unet_tensors.json")).unwrap();
    let real: std::collections::HashMap<String, Vec<(String, Vec<usize>)>> = serde_json::from_str(&text).unwrap();
    for (r, _) in Q4_EXCEPTIONS {
        assert!(real["base"].iter().any(|(n, _)| role(&format!("unet/{n}")) == *r), "{r} is no role of the SDXL base UNet");
    }
    assert!(Q4_EXCEPTIONS.iter().all(|(_, f)| *f != QuantFormat::Q4_0));
}

/// `allocate` on made-up measurements: upgrades by error removed per byte, within the budget.
#[test]
fn allocation_spends_the_budget_where_it_removes_most_error() {
    let matrix = |name: &str| (name.to_string(), vec![320usize, 320]);
    let shapes = vec![matrix("a.0.w.weight"), matrix("a.1.w.weight"), matrix("b.0.w.weight"), matrix("c.0.w.weight"), ("c.0.bias".into(), vec![320])];
    let measured = |role: &str, q4_0: f64, q4_1: f64, q8_0: f64| RoleSensitivity {
        role: format!("unet/{role}"),
        matrices: 1,
        params: 320 * 320,
        output_error: FormatErrors { q4_0, q4_1, q8_0 },
    };
    // a: two matrices, sensitive; b: one matrix, very sensitive; c: insensitive.
    let m = vec![measured("a.w", 0.1, 0.08, 0.01), measured("b.w", 0.2, 0.15, 0.01), measured("c.w", 0.001, 0.001, 0.0001)];
    let q4_0 = QuantFormat::Q4_0.matrix_bytes(320, 320);
    let q8_0 = QuantFormat::Q8_0.matrix_bytes(320, 320);
    let floor = 4 * q4_0 + 320 * 2;
    let none = allocate(&m, &shapes, floor);
    assert_eq!(none.bytes, floor);
    assert!(none.exceptions.is_empty(), "no room: {:?}", none.exceptions);
    // Room for one matrix in Q8_0: b (one matrix, most error per byte) gets it.
    let one = allocate(&m, &shapes, floor + (q8_0 - q4_0));
    assert_eq!(one.exceptions, vec![("unet/b.w".to_string(), "q8_0".to_string())]);
    assert!(one.error_sq < none.error_sq && one.bytes <= floor + q8_0 - q4_0);
    // Unlimited: everything whose error Q8_0 lowers goes Q8_0.
    let all = allocate(&m, &shapes, u64::MAX / 2);
    assert_eq!(all.exceptions.len(), 3);
    assert!(all.exceptions.iter().all(|(_, f)| f == "q8_0"));
    assert_eq!(all.bytes, 4 * q8_0 + 320 * 2);
}

/// The measurement itself on the tiny fixture: every role its (narrow) UNet quantizes, each format.
#[test]
fn sensitivity_measures_each_role_in_each_format() {
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let mut seen = Vec::new();
        let measured = sensitivity(&gpu, &ModelSource::folder(DirSource::new(BASE), false), &params(), |r| seen.push(r.role.clone())).await.unwrap();
        assert_eq!(seen.len(), measured.len());
        assert!(measured.len() >= 10, "{seen:?}");
        for r in &measured {
            let e = &r.output_error;
            assert!(e.q8_0 > 0.0 && e.q8_0 * 4.0 < e.q4_0.min(e.q4_1), "{}: {e:?}", r.role);
            assert!(e.q4_0 < 0.2 && e.q4_1 < 0.2, "{}: {e:?}", r.role);
        }
    });
}

/// Random weights as a file would give them to the CPU (PyTorch's init, `weights::random::host`):
/// every tensor a model asks for exists, at the shape it asks for.
struct HostRandom {
    seed: u32,
    any: TensorInfo,
    /// Added to the tensors they name (a LoRA merged into the weights).
    deltas: HashMap<String, Vec<f32>>,
}

impl TensorSource for HostRandom {
    fn location(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }
    fn names(&self) -> Vec<&str> {
        Vec::new()
    }
    fn info(&self, _: &str) -> Option<&TensorInfo> {
        Some(&self.any)
    }
    fn read<'a>(&'a self, name: &'a str, shape: &'a [usize], rows: std::ops::Range<usize>) -> Fetch<'a, HostTensor> {
        Box::pin(async move {
            let mut values = random::host(self.seed, name, shape);
            if let Some(delta) = self.deltas.get(name) {
                values.iter_mut().zip(delta).for_each(|(v, d)| *v += d);
            }
            let per_row: usize = shape.iter().skip(1).product();
            let rows = if shape.len() < 2 { 0..values.len() } else { rows.start * per_row..rows.end * per_row };
            Ok(HostTensor::Float { dtype: Dtype::F32, bytes: bytemuck::cast_slice(&values[rows]).to_vec() })
        })
    }
}

/// A base whose UNet levels are 256 channels wide (so that its linear layers have rows of whole
/// 256-value blocks; its convolutions' cin·9 = 2304 columns too), random weights as a file gives
/// them (`HostRandom`), with `deltas` added to the UNet's tensors they name; the fixture's tiny
/// text encoders (16, 24 wide) and VAE.
async fn wide_random_model(deltas: HashMap<String, Vec<f32>>) -> ModelSource<'static> {
    let mut files = MemorySource::default();
    let fixture = DirSource::new(BASE);
    for path in ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder_2/config.json", "vae/config.json"]
        .into_iter()
        .map(String::from)
        .chain(["tokenizer", "tokenizer_2"].iter().flat_map(|t| ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"].map(|f| format!("{t}/{f}"))))
    {
        files.insert(&path, fixture.read(&path).await.unwrap());
    }
    let mut unet: serde_json::Value = serde_json::from_slice(&fixture.read("unet/config.json").await.unwrap()).unwrap();
    for (field, value) in [
        ("block_out_channels", serde_json::json!([256, 256])),
        ("attention_head_dim", serde_json::json!([4, 4])),
        ("down_block_types", serde_json::json!(["DownBlock2D", "CrossAttnDownBlock2D"])),
        ("up_block_types", serde_json::json!(["CrossAttnUpBlock2D", "UpBlock2D"])),
        ("layers_per_block", serde_json::json!(1)),
        ("transformer_layers_per_block", serde_json::json!([1, 1])),
        ("norm_num_groups", serde_json::json!(32)),
    ] {
        unet[field] = value;
    }
    files.insert("unet/config.json", serde_json::to_vec(&unet).unwrap());
    let any = TensorInfo { shape: Vec::new(), encoding: Encoding::Float(Dtype::F32), bytes: 0 };
    let mut deltas = Some(deltas);
    let components = ["text_encoder", "text_encoder_2", "unet", "vae"]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let deltas = if *c == "unet" { deltas.take().unwrap_or_default() } else { HashMap::new() };
            (c.to_string(), std::rc::Rc::new(HostRandom { seed: 10 + i as u32, any: any.clone(), deltas }) as std::rc::Rc<dyn TensorSource>)
        })
        .collect();
    ModelSource::indexed(SharedSource::new(files), components, "random host weights".into())
}

/// The K-quants in whole pipelines: the wide random base quantized to each format as it loads
/// (the K-quants with the crate's plain reference quantizer, not ggml's search), against the same
/// weights dense (f32 device). The tiny text encoders stay dense, as stable-diffusion.cpp leaves
/// what K-quants cannot cut.
#[test]
fn k_quants_image_quality() {
    pollster::block_on(async {
        let model = wide_random_model(HashMap::new()).await;
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let p = GenerateParams { width: 64, height: 64, steps: 4, ..params() };
        let image = |policy: QuantPolicy| {
            let (gpu, model, p) = (&gpu, &model, &p);
            async move {
                let m = SdxlModel::load(gpu, model, &policy).await.unwrap();
                gpu.read(&generate(gpu, &m, None, p, |_| {}).await.unwrap().image).await.unwrap()
            }
        };
        let dense = image(QuantPolicy::default()).await;
        assert!(dense.iter().all(|v| v.is_finite()));
        // Floors a few dB under what was measured (65.7, 54.3, 47.4, 40.2, 40.6, 34.6, 30.3 dB).
        let floors = [(QuantFormat::Q8_0, 60.0), (QuantFormat::Q6_K, 50.0), (QuantFormat::Q5_K, 43.0), (QuantFormat::Q4_0, 36.0), (QuantFormat::Q4_K, 36.0), (QuantFormat::Q3_K, 30.0), (QuantFormat::Q2_K, 26.0)];
        for (format, floor) in floors {
            let db = psnr(&dense, &image(QuantPolicy { default: Some(format), exceptions: Vec::new() }).await);
            eprintln!("UNet matrices in {} ({} bits per weight): image PSNR {db:.1} dB against dense", format.name(), format.bits_per_weight());
            assert!(db >= floor, "{}: {db:.1} dB < {floor}", format.name());
            assert!(db < 100.0, "{}: {db:.1} dB: the matrices were not quantized", format.name());
        }
    });
}

/// A LoRA on a q4 base runs beside the stored blocks, so only the base's own rounding remains:
/// on the wide random base (f32 device) with a rank-8 LoRA on every UNet layer at weight 0.8,
/// q4 base + LoRA is held to dense base + LoRA as closely as the q4 base alone is to the dense
/// base; merging the LoRA into the weights before quantizing to q4 (what a merged q4 file holds)
/// is measured for comparison.
#[test]
fn lora_on_a_q4_base_keeps_its_own_precision() {
    use sdxl::pipeline::lora::LoraChoice;
    use sdxl::weights::lora::LoraFile;
    const RANK: usize = 8;
    const WEIGHT: f32 = 0.8;
    pollster::block_on(async {
        let gpu = Gpu::new(Precision::F32).await.unwrap();
        let p = GenerateParams { width: 64, height: 64, steps: 4, ..params() };
        let plain = wide_random_model(HashMap::new()).await;
        let dense = SdxlModel::load(&gpu, &plain, &QuantPolicy::default()).await.unwrap();
        let q4 = QuantPolicy { default: Some(QuantFormat::Q4_0), exceptions: Vec::new() };
        let q4_base = SdxlModel::load(&gpu, &plain, &q4).await.unwrap();

        // A kohya-named LoRA (diffusers' module names, `_` for `.`) on every UNet layer, and the
        // same update merged into the weights.
        let layers = dense.adaptable().layers["unet"].clone();
        let (mut tensors, mut merged) = (Vec::new(), HashMap::new());
        for (i, (name, shape)) in layers.iter().enumerate() {
            let (out, cols) = (shape[0], shape[1..].iter().product::<usize>());
            let down = random::host(100 + i as u32, "down", &[RANK, cols]);
            // A fine-tune's update is small next to the weights: a tenth of their scale.
            let up: Vec<f32> = random::host(200 + i as u32, "up", &[out, RANK]).iter().map(|v| v * 0.1).collect();
            let delta: Vec<f32> = (0..out * cols).map(|e| (0..RANK).map(|r| up[e / cols * RANK + r] * down[r * cols + e % cols]).sum::<f32>() * WEIGHT).collect();
            merged.insert(format!("{name}.weight"), delta);
            let key = format!("lora_unet_{}", name.replace('.', "_"));
            let mut down_shape = vec![RANK, shape[1]];
            down_shape.extend(&shape[2..]);
            let up_shape = if shape.len() == 4 { vec![out, RANK, 1, 1] } else { vec![out, RANK] };
            tensors.push((format!("{key}.lora_down.weight"), down_shape, down));
            tensors.push((format!("{key}.lora_up.weight"), up_shape, up));
        }
        let views: Vec<_> = tensors.iter().map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice())).collect();
        let mut files = MemorySource::default();
        files.insert("lora.safetensors", sdxl::weights::safetensors::serialize_f32(&views));
        let lora = LoraFile::open(&files, "lora.safetensors").await.unwrap();

        let with = [LoraChoice { file: &lora, weight: WEIGHT }];
        let (reference, dense_alone) = (run(&gpu, &dense, &p, &with).await, run(&gpu, &dense, &p, &[]).await);
        let (q4_lora, q4_alone) = (run(&gpu, &q4_base, &p, &with).await, run(&gpu, &q4_base, &p, &[]).await);
        let merged_q4 = SdxlModel::load(&gpu, &wide_random_model(merged.clone()).await, &q4).await.unwrap();
        let merged_dense = SdxlModel::load(&gpu, &wide_random_model(merged).await, &QuantPolicy::default()).await.unwrap();
        let (merged_q4, merged_dense) = (run(&gpu, &merged_q4, &p, &[]).await, run(&gpu, &merged_dense, &p, &[]).await);

        // What the LoRA adds to the image, and how much of that each q4 variant gets wrong.
        let contribution = |with: &[f32], without: &[f32]| with.iter().zip(without).map(|(a, b)| a - b).collect::<Vec<f32>>();
        let wanted = contribution(&reference, &dense_alone);
        let error = |got: Vec<f32>| (got.iter().zip(&wanted).map(|(g, w)| (g - w).powi(2)).sum::<f32>() / wanted.iter().map(|w| w * w).sum::<f32>()).sqrt();
        let (beside_error, merged_error) = (error(contribution(&q4_lora, &q4_alone)), error(contribution(&merged_q4, &q4_alone)));
        let (effect, own, beside, merged_db) = (psnr(&reference, &dense_alone), psnr(&dense_alone, &q4_alone), psnr(&reference, &q4_lora), psnr(&reference, &merged_q4));
        eprintln!(
            "LoRA effect {effect:.1} dB; q4 base vs dense {own:.1} dB; against dense + LoRA: q4 + LoRA beside {beside:.1} dB, merged into q4 \
             {merged_db:.1} dB; the LoRA's contribution off by {:.1} % beside, {:.1} % merged",
            100.0 * beside_error,
            100.0 * merged_error
        );
        assert!(effect < 45.0, "the LoRA changes the image ({effect:.1} dB)");
        assert!(psnr(&reference, &merged_dense) > 60.0, "running beside the weights is merging them");
        assert!(beside >= own - 1.0, "q4 + LoRA {beside:.1} dB is no worse than the q4 base's own {own:.1} dB");
        assert!(beside_error < merged_error, "beside the blocks the LoRA's contribution is kept better than merged into them");
    });
}

/// The image of `model` with `loras` set.
async fn run(gpu: &Gpu, model: &SdxlModel, p: &GenerateParams, loras: &[sdxl::pipeline::lora::LoraChoice<'_, '_>]) -> Vec<f32> {
    model.set_loras(gpu, loras).await.unwrap();
    gpu.read(&generate(gpu, model, None, p, |_| {}).await.unwrap().image).await.unwrap()
}
