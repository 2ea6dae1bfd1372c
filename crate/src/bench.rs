//! `sdxl bench`: speed and memory of the kernels on SDXL's real shapes, of a whole UNet step, of
//! the VAE decode and of the TAESD-XL preview decode, with random weights generated on the GPU
//! ([`RandomSource`]), so no checkpoint is needed. Every figure is relative to a peak measured on
//! the same adapter with a best-case kernel (shaders/bench.wgsl). Timings are wall-clock over whole submissions, waiting
//! for the GPU, after a warm-up run that compiles the pipelines.

use serde::Serialize;

use crate::adapt::{Layers, LowRank};
use crate::error::{Error, Result};
use crate::gpu::{kernel_params, shader, DType, Gpu, Shader, Tensor};
use crate::models::taesd::{TaesdConfig, TaesdDecoder};
use crate::ops::Addend;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetLayout};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::quant::{QuantFormat, QuantPolicy, QuantPreset, Weight};
use crate::weights::random::{self, RandomTensors};
use crate::weights::Vars;

kernel_params! { struct BenchParams { n: u32, iterations: u32, _p0: u32, _p1: u32 } }
const BENCH: Shader<BenchParams> = shader!("bench");

/// The real SDXL base configs, the default model of the bench.
const SDXL_UNET: &str = include_str!("../configs/sdxl-base/unet/config.json");
const SDXL_VAE: &str = include_str!("../configs/sdxl-base/vae/config.json");

/// Seconds of repeated runs each timing aims for.
const TIMED_SECONDS: f64 = 0.25;
/// Token count of the text context (CLIP's 77).
const CONTEXT_TOKENS: usize = 77;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Image sizes (square) of the UNet steps and VAE decodes; the kernel suite uses the largest.
    pub sizes: Vec<usize>,
    /// Weight formats of the UNet steps.
    pub quants: Vec<QuantPreset>,
    /// Ranks of the LoRAs whose per-step cost is measured on the UNet steps.
    pub lora_ranks: Vec<usize>,
    pub kernels: bool,
    pub unet: bool,
    /// The VAE decodes and the TAESD-XL preview decode.
    pub vae: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { sizes: vec![512, 1024], quants: vec![QuantPreset::F16, QuantPreset::Q8, QuantPreset::Q4], lora_ranks: vec![32, 128], kernels: true, unet: true, vae: true }
    }
}

/// The model whose shapes are measured: its UNet and VAE config.json.
pub struct BenchModel {
    pub name: String,
    pub unet_config: Vec<u8>,
    pub vae_config: Vec<u8>,
}

impl BenchModel {
    pub fn sdxl_base() -> BenchModel {
        BenchModel { name: "sdxl-base-1.0".into(), unet_config: SDXL_UNET.into(), vae_config: SDXL_VAE.into() }
    }
}

#[derive(Debug, Clone, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
pub struct Peak {
    /// f32 multiply-adds in registers, GFLOP/s.
    pub gflops: f64,
    /// Device-memory copy, GB/s (bytes read plus written).
    pub gbps: f64,
}

#[derive(Debug, Clone, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
pub struct KernelResult {
    pub kernel: String,
    pub shape: String,
    /// Weight format (linear and conv), else "-".
    pub weights: String,
    pub ms: f64,
    /// Useful GFLOP/s (compute-bound kernels) or GB/s (memory-bound ones).
    pub rate: f64,
    pub unit: &'static str,
    /// `rate` as a share of the measured peak, in percent.
    pub percent_of_peak: f64,
}

#[derive(Debug, Clone, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
// Options cross as null (the engine serialises missing values as null).
#[tsify(missing_as_null)]
pub struct UnetResult {
    pub size: usize,
    pub quant: String,
    /// The rank of a LoRA on every transformer Linear (kohya's default targets), run beside the
    /// weights; None: the base alone.
    pub lora_rank: Option<usize>,
    /// One UNet evaluation with classifier-free guidance (batch 2), steady (pipelines compiled).
    pub seconds_per_step: f64,
    /// The first evaluation at this size in this process: the steady step plus compiling the
    /// pipelines it is the first to use.
    pub first_step_seconds: f64,
    /// Pipelines compiled by the first step.
    pub pipelines_compiled: u64,
    /// Kernel launches of one step.
    pub dispatches_per_step: u64,
    pub tflops: f64,
    /// GPU memory of the weights, and the peak of everything during the steps.
    pub weight_bytes: u64,
    pub peak_bytes: u64,
}

#[derive(Debug, Clone, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
pub struct VaeResult {
    pub size: usize,
    pub tiled: bool,
    pub seconds: f64,
    pub peak_bytes: u64,
}

/// One TAESD-XL preview decode ([`TaesdDecoder::decode`] of a [1, 4, size/8, size/8] latent with
/// taesdxl's shapes, [`TaesdConfig::default`]): the cost of one live preview per denoising step.
#[derive(Debug, Clone, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
pub struct TaesdResult {
    pub size: usize,
    pub seconds: f64,
    pub peak_bytes: u64,
}

/// A measurement that could not run (e.g. a buffer over this adapter's limits).
#[derive(Debug, Clone, Serialize, tsify::Tsify)]
pub struct Skipped {
    pub what: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub adapter: String,
    pub dtype: String,
    pub model: String,
    pub peak: Peak,
    pub kernels: Vec<KernelResult>,
    pub unet: Vec<UnetResult>,
    pub vae: Vec<VaeResult>,
    pub taesd: Vec<TaesdResult>,
    pub skipped: Vec<Skipped>,
}

#[cfg(not(target_arch = "wasm32"))]
fn now() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

#[cfg(target_arch = "wasm32")]
fn now() -> f64 {
    js_sys::Date::now() / 1000.0
}

/// Runs of `f`, each waited for: the first (which compiles the pipelines it is the first to use),
/// then the steady time per run.
struct Timing {
    first: f64,
    steady: f64,
    pipelines: u64,
    dispatches: u64,
}

/// Times `f`: one first run, one to size the loop, then enough runs to fill `TIMED_SECONDS`
/// (none when one run fills it: a full-size step on a CPU driver takes minutes).
async fn timing(gpu: &Gpu, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    let (before, t0) = (gpu.counters(), now());
    f()?;
    gpu.sync().await?;
    let (first, warm) = (now() - t0, gpu.counters());
    let t0 = now();
    f()?;
    gpu.sync().await?;
    let once = (now() - t0).max(1e-6);
    let (pipelines, dispatches) = (warm.pipelines - before.pipelines, gpu.counters().dispatches - warm.dispatches);
    if once >= TIMED_SECONDS {
        return Ok(Timing { first, steady: once, pipelines, dispatches });
    }
    let runs = ((TIMED_SECONDS / once).ceil() as usize).clamp(1, 50);
    let t0 = now();
    for _ in 0..runs {
        f()?;
    }
    gpu.sync().await?;
    Ok(Timing { first, steady: (now() - t0) / runs as f64, pipelines, dispatches })
}

/// Steady seconds per run of `f` (see `timing`).
async fn time(gpu: &Gpu, f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(timing(gpu, f).await?.steady)
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Config { path: what.into(), message: e.to_string() })
}

/// Runs the measurements `options` asks for; a case that fails (over the adapter's limits, out
/// of memory) is reported in `skipped` and the others go on: each case is its own GPU operation.
pub async fn run(gpu: &Gpu, model: &BenchModel, options: &BenchOptions, mut log: impl FnMut(&str)) -> Result<BenchReport> {
    let unet: UNet2DConditionConfig = parse(&model.unet_config, "unet/config.json")?;
    let vae: VaeConfig = parse(&model.vae_config, "vae/config.json")?;
    if options.sizes.is_empty() || options.sizes.iter().any(|&s| s == 0 || s % 8 != 0) {
        return Err(Error::InvalidParameter(format!("bench sizes {:?}: each must be a positive multiple of 8", options.sizes)));
    }
    log("measuring the adapter's peaks");
    let peak = measure_peak(gpu).await?;
    let mut report = BenchReport {
        adapter: gpu.adapter_name.clone(),
        dtype: format!("{:?}", gpu.dtype).to_lowercase(),
        model: model.name.clone(),
        peak,
        kernels: Vec::new(),
        unet: Vec::new(),
        vae: Vec::new(),
        taesd: Vec::new(),
        skipped: Vec::new(),
    };
    if options.kernels {
        let size = *options.sizes.iter().max().unwrap();
        for case in kernel_cases(&unet, &vae, size)? {
            log(&format!("kernel {} {}", case.kernel, case.shape));
            match gpu.operation(measure_kernel(gpu, &case, &report.peak)).await {
                Ok(r) => report.kernels.push(r),
                Err(e) => report.skipped.push(Skipped { what: format!("{} {} {}", case.kernel, case.shape, case.weights()), error: e.to_string() }),
            }
            gpu.trim();
        }
    }
    if options.unet {
        for &quant in &options.quants {
            measure_unet(gpu, &unet, quant, options, &mut report, &mut log).await;
            gpu.trim();
        }
    }
    if options.vae {
        for &size in &options.sizes {
            for tiled in [false, true] {
                log(&format!("vae decode {size}² {}", if tiled { "tiled" } else { "whole" }));
                match gpu.operation(measure_vae(gpu, &vae, size, tiled)).await {
                    Ok(r) => report.vae.push(r),
                    Err(e) => report.skipped.push(Skipped { what: format!("vae decode {size}² tiled={tiled}"), error: e.to_string() }),
                }
                gpu.trim();
            }
            let what = format!("taesd preview decode {size}²");
            log(&what);
            match gpu.operation(measure_taesd(gpu, size)).await {
                Ok(r) => report.taesd.push(r),
                Err(e) => report.skipped.push(Skipped { what, error: e.to_string() }),
            }
            gpu.trim();
        }
    }
    Ok(report)
}

async fn measure_peak(gpu: &Gpu) -> Result<Peak> {
    let vec4s = (gpu.max_binding_bytes().min(256 << 20) / 16) as usize;
    let src = gpu.empty_weight(&[vec4s, 4], DType::F32, "bench source")?;
    let dst = gpu.empty_weight(&[vec4s, 4], DType::F32, "bench destination")?;
    let threads = 1usize << 20;
    let iterations = 1024u32;
    let fma = time(gpu, || gpu.dispatch(&BENCH, "peak_fma", DType::F32, &BenchParams { n: vec4s as u32, iterations, _p0: 0, _p1: 0 }, &[&src, &dst], Gpu::grid(threads, 256)?)).await?;
    let copy = time(gpu, || gpu.dispatch(&BENCH, "copy", DType::F32, &BenchParams { n: vec4s as u32, iterations: 0, _p0: 0, _p1: 0 }, &[&src, &dst], Gpu::grid(vec4s, 256)?)).await?;
    Ok(Peak { gflops: threads as f64 * iterations as f64 * 64.0 / fma / 1e9, gbps: 2.0 * 16.0 * vec4s as f64 / copy / 1e9 })
}

/// One kernel measurement on one shape.
enum Op {
    /// x [m, k] · W[n, k]ᵀ, optionally fused with GEGLU (n is the projection's width).
    Linear { m: usize, k: usize, n: usize, geglu: bool, format: Option<QuantFormat> },
    /// 3×3 convolution, padding 1.
    Conv { batch: usize, cin: usize, cout: usize, hw: usize, format: Option<QuantFormat> },
    Attention { batch: usize, lq: usize, lk: usize, heads: usize, head_dim: usize },
    GroupNormSilu { batch: usize, channels: usize, hw: usize, groups: usize },
}

struct KernelCase {
    kernel: String,
    shape: String,
    op: Op,
}

impl KernelCase {
    fn weights(&self) -> String {
        match &self.op {
            Op::Linear { format, .. } | Op::Conv { format, .. } => format.map_or("f16/f32".into(), |f| f.name().to_string()),
            _ => "-".into(),
        }
    }
}

/// The kernels of one UNet step and one VAE decode at `size`², on their real shapes: for each
/// level with attention, the GEGLU feed-forward projection and self- and cross-attention; the
/// 3×3 convolutions of the first and last level; GroupNorm+SiLU; the VAE's full-resolution
/// convolution and its mid-block attention. Batch 2 (classifier-free guidance) for the UNet.
fn kernel_cases(unet: &UNet2DConditionConfig, vae: &VaeConfig, size: usize) -> Result<Vec<KernelCase>> {
    let layout = unet.layout().map_err(|message| Error::Config { path: "unet/config.json".into(), message })?;
    let latent = size / 8;
    let mut cases = Vec::new();
    let formats = [None, Some(QuantFormat::Q8_0), Some(QuantFormat::Q4_0)];
    for (level, block) in layout.down.iter().enumerate() {
        let Some(t) = block.attentions.first() else { continue };
        let side = latent >> level;
        let tokens = side * side;
        let c = t.channels;
        for format in formats {
            let op = Op::Linear { m: 2 * tokens, k: c, n: 8 * c, geglu: true, format };
            cases.push(KernelCase { kernel: "linear+geglu".into(), shape: format!("{}x{c}->{}", 2 * tokens, 8 * c), op });
        }
        let op = Op::Attention { batch: 2, lq: tokens, lk: tokens, heads: t.heads, head_dim: t.head_dim };
        cases.push(KernelCase { kernel: "self-attention".into(), shape: format!("2x{tokens} tokens, {}x{}", t.heads, t.head_dim), op });
        let op = Op::Attention { batch: 2, lq: tokens, lk: CONTEXT_TOKENS, heads: t.heads, head_dim: t.head_dim };
        cases.push(KernelCase { kernel: "cross-attention".into(), shape: format!("2x{tokens} vs {CONTEXT_TOKENS}, {}x{}", t.heads, t.head_dim), op });
    }
    let last = layout.down.len() - 1;
    for level in [0, last] {
        let c = layout.down[level].out_channels;
        let hw = latent >> level;
        for format in formats {
            let op = Op::Conv { batch: 2, cin: c, cout: c, hw, format };
            cases.push(KernelCase { kernel: "conv3x3".into(), shape: format!("2x{c}x{hw}x{hw}"), op });
        }
    }
    let c0 = layout.down[0].out_channels;
    let groups = unet.norm_num_groups.unwrap_or(32);
    let op = Op::GroupNormSilu { batch: 2, channels: c0, hw: latent, groups };
    cases.push(KernelCase { kernel: "groupnorm+silu".into(), shape: format!("2x{c0}x{latent}x{latent}"), op });
    let (vc, vmid) = (vae.block_out_channels[0], *vae.block_out_channels.last().unwrap());
    let op = Op::Conv { batch: 1, cin: vc, cout: vc, hw: size, format: None };
    cases.push(KernelCase { kernel: "vae conv3x3".into(), shape: format!("1x{vc}x{size}x{size}"), op });
    let op = Op::Attention { batch: 1, lq: latent * latent, lk: latent * latent, heads: 1, head_dim: vmid };
    cases.push(KernelCase { kernel: "vae attention".into(), shape: format!("{} tokens, 1x{vmid}", latent * latent), op });
    Ok(cases)
}

fn input(gpu: &Gpu, shape: &[usize]) -> Result<Tensor> {
    let t = gpu.empty(shape)?;
    gpu.fill_uniform(&t, shape.iter().product::<usize>() as u32, 0.0, 1.0)?;
    Ok(t)
}

fn weight(gpu: &Gpu, shape: &[usize], format: Option<QuantFormat>) -> Result<Weight> {
    random::matrix(gpu, 7, "bench.weight", shape, format, gpu.dtype)
}

async fn measure_kernel(gpu: &Gpu, case: &KernelCase, peak: &Peak) -> Result<KernelResult> {
    let bytes = gpu.dtype.size() as f64;
    let (seconds, work, unit) = match case.op {
        Op::Linear { m, k, n, geglu, format } => {
            let (x, w) = (input(gpu, &[m, k])?, weight(gpu, &[n, k], format)?);
            let b = random::tensor(gpu, 7, "bench.bias", &[n], gpu.dtype)?;
            let s = time(gpu, || match geglu {
                true => gpu.linear_geglu(&x, &w, Addend::bias(Some(&b))).map(drop),
                false => gpu.linear(&x, &w, Some(&b)).map(drop),
            })
            .await?;
            (s, 2.0 * (m * n * k) as f64, "GFLOP/s")
        }
        Op::Conv { batch, cin, cout, hw, format } => {
            let (x, w) = (input(gpu, &[batch, cin, hw, hw])?, weight(gpu, &[cout, cin, 3, 3], format)?);
            let b = random::tensor(gpu, 7, "bench.bias", &[cout], gpu.dtype)?;
            let s = time(gpu, || gpu.conv2d(&x, &w, 3, Some(&b), 1, [1; 4]).map(drop)).await?;
            (s, 2.0 * (batch * cout * hw * hw * cin * 9) as f64, "GFLOP/s")
        }
        Op::Attention { batch, lq, lk, heads, head_dim } => {
            let width = heads * head_dim;
            let (q, k, v) = (input(gpu, &[batch, lq, width])?, input(gpu, &[batch, lk, width])?, input(gpu, &[batch, lk, width])?);
            let s = time(gpu, || gpu.attention(&q, &k, &v, heads, false).map(drop)).await?;
            (s, 4.0 * (batch * heads * lq * lk * head_dim) as f64, "GFLOP/s")
        }
        Op::GroupNormSilu { batch, channels, hw, groups } => {
            let x = input(gpu, &[batch, channels, hw, hw])?;
            let (g, b) = (random::tensor(gpu, 7, "bench.norm.weight", &[channels], gpu.dtype)?, random::tensor(gpu, 7, "bench.bias", &[channels], gpu.dtype)?);
            let s = time(gpu, || gpu.group_norm(&x, groups, &g, &b, 1e-5, true).map(drop)).await?;
            // Read once and written once (the statistics pass reads again, from cache at best).
            (s, 2.0 * bytes * (batch * channels * hw * hw) as f64, "GB/s")
        }
    };
    let rate = work / seconds / 1e9;
    let reference = if unit == "GB/s" { peak.gbps } else { peak.gflops };
    Ok(KernelResult {
        kernel: case.kernel.clone(),
        shape: case.shape.clone(),
        weights: case.weights(),
        ms: seconds * 1e3,
        rate,
        unit,
        percent_of_peak: 100.0 * rate / reference,
    })
}

async fn measure_unet(gpu: &Gpu, config: &UNet2DConditionConfig, quant: QuantPreset, options: &BenchOptions, report: &mut BenchReport, log: &mut impl FnMut(&str)) {
    let name = format!("{quant:?}").to_lowercase();
    log(&format!("unet {name}: generating random weights"));
    let (tensors, policy, layers) = (RandomTensors { seed: 1, component: "unet".into() }, quant.policy(), Layers::default());
    let before = gpu.memory().allocated;
    let unet = match gpu.operation(UNet2DConditionModel::load(&Vars::new(gpu, &tensors, "unet", &policy).with_layers(&layers), config.clone())).await {
        Ok(u) => u,
        Err(e) => return report.skipped.push(Skipped { what: format!("unet {name}"), error: e.to_string() }),
    };
    let weight_bytes = gpu.memory().allocated - before;
    for lora_rank in std::iter::once(None).chain(options.lora_ranks.iter().copied().map(Some)) {
        let what = lora_rank.map_or(String::new(), |r| format!(" + rank-{r} LoRA"));
        if let Err(e) = gpu.operation(async { random_loras(gpu, &layers, lora_rank) }).await {
            report.skipped.push(Skipped { what: format!("unet {name}{what}"), error: e.to_string() });
            continue;
        }
        for &size in &options.sizes {
            log(&format!("unet {name}{what} {size}²"));
            match gpu.operation(unet_step(gpu, &unet, config, size)).await {
                Ok((t, peak)) => report.unet.push(UnetResult {
                    size,
                    quant: name.clone(),
                    lora_rank,
                    seconds_per_step: t.steady,
                    first_step_seconds: t.first,
                    pipelines_compiled: t.pipelines,
                    dispatches_per_step: t.dispatches,
                    tflops: unet_flops(config, size) / t.steady / 1e12,
                    weight_bytes,
                    peak_bytes: peak,
                }),
                Err(e) => report.skipped.push(Skipped { what: format!("unet {name}{what} {size}²"), error: e.to_string() }),
            }
            gpu.trim();
        }
    }
    layers.clear();
}

/// Random factors of rank `rank` on every Linear of the transformer blocks (None: clears them).
fn random_loras(gpu: &Gpu, layers: &Layers, rank: Option<usize>) -> Result<()> {
    layers.clear();
    let Some(rank) = rank else { return Ok(()) };
    let targets: Vec<(String, Vec<usize>, DType)> =
        layers.layers().iter().filter(|(name, l)| name.contains(".attentions.") && l.shape.len() == 2).map(|(n, l)| (n.clone(), l.shape.clone(), l.dtype)).collect();
    for (name, shape, dtype) in targets {
        let down = random::tensor(gpu, 3, &format!("{name}.lora_down"), &[rank, shape[1]], dtype)?;
        let up = random::tensor(gpu, 4, &format!("{name}.lora_up"), &[shape[0], rank], dtype)?;
        layers.set(&name, Some(LowRank::from_tensors(down, up)))?;
    }
    Ok(())
}

/// FLOPs of one batch-2 step, from torch's FlopCounterMode on the real base UNet (FIELD-NOTES:
/// 1,589 GFLOP at 512² and 6,761 at 1024², batch 1), scaled by the token count for other sizes;
/// 0 for other models (reported as 0 TFLOP/s).
fn unet_flops(config: &UNet2DConditionConfig, size: usize) -> f64 {
    let sdxl = config.layout().is_ok_and(|l| context_width(&l) == 2048);
    if config.block_out_channels != [320, 640, 1280] || !sdxl {
        return 0.0;
    }
    let per_item = if size <= 512 { 1589e9 * (size * size) as f64 / (512.0 * 512.0) } else { 6761e9 * (size * size) as f64 / (1024.0 * 1024.0) };
    2.0 * per_item
}

/// Width of the text context the cross-attention layers read.
fn context_width(layout: &UNetLayout) -> usize {
    layout.down.iter().chain(&layout.mid).chain(&layout.up).find_map(|b| b.attentions.first()).map_or(1, |t| t.cross_attention_dim)
}

async fn unet_step(gpu: &Gpu, unet: &UNet2DConditionModel, c: &UNet2DConditionConfig, size: usize) -> Result<(Timing, u64)> {
    let latent = size / 8;
    let sample = input(gpu, &[2, c.in_channels, latent, latent])?;
    let context = input(gpu, &[2, CONTEXT_TOKENS, context_width(&unet.layout)])?;
    // SDXL's six micro-conditioning ids; the text embedding fills the rest of the added input.
    let (time_dim, inputs) = unet.layout.add_time.unwrap_or((1, 6));
    let text_width = inputs.checked_sub(6 * time_dim).filter(|&w| w > 0).unwrap_or(1);
    let text_embeds = input(gpu, &[2, text_width])?;
    let time_ids: Vec<f32> = [size, size, 0, 0, size, size].repeat(2).into_iter().map(|v| v as f32).collect();
    gpu.sync().await?;
    gpu.reset_peak();
    let t = timing(gpu, || unet.forward(gpu, &sample, 500.0, &context, &text_embeds, &time_ids).map(drop)).await?;
    Ok((t, gpu.memory().peak))
}

async fn measure_vae(gpu: &Gpu, config: &VaeConfig, size: usize, tiled: bool) -> Result<VaeResult> {
    let (tensors, policy) = (RandomTensors { seed: 2, component: "vae".into() }, QuantPolicy::default());
    let vae = AutoencoderKL::load(&Vars::new(gpu, &tensors, "vae", &policy), config.clone()).await?;
    let latents = input(gpu, &[1, config.latent_channels, size / 8, size / 8])?;
    gpu.sync().await?;
    gpu.reset_peak();
    let seconds = time(gpu, || (if tiled { vae.decode_tiled(gpu, &latents) } else { vae.decode(gpu, &latents) }).map(drop)).await?;
    Ok(VaeResult { size, tiled, seconds, peak_bytes: gpu.memory().peak })
}

async fn measure_taesd(gpu: &Gpu, size: usize) -> Result<TaesdResult> {
    let config = TaesdConfig::default();
    // The widest activation: the last level's blocks, `width` channels at the full image size.
    let largest = (config.decoder_block_out_channels[0] * size * size * gpu.dtype.size()) as u64;
    if largest > gpu.max_binding_bytes() {
        return Err(Error::AdapterLimits(format!(
            "its largest activation, {} MiB ({}x{size}x{size}), exceeds this adapter's {} MiB binding",
            largest >> 20,
            config.decoder_block_out_channels[0],
            gpu.max_binding_bytes() >> 20
        )));
    }
    let (tensors, policy) = (RandomTensors { seed: 3, component: "taesd".into() }, QuantPolicy::default());
    let taesd = TaesdDecoder::load(&Vars::new(gpu, &tensors, "vae", &policy), config).await?;
    let f = taesd.upscale();
    let latents = input(gpu, &[1, taesd.config.latent_channels, size / f, size / f])?;
    gpu.sync().await?;
    gpu.reset_peak();
    let seconds = time(gpu, || taesd.decode(gpu, &latents).map(drop)).await?;
    Ok(TaesdResult { size, seconds, peak_bytes: gpu.memory().peak })
}

impl BenchReport {
    /// The report as aligned text tables.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut s = format!(
            "adapter: {} ({})  model: {}\npeak: {:.1} GFLOP/s f32 FMA, {:.1} GB/s copy\n\n",
            self.adapter, self.dtype, self.model, self.peak.gflops, self.peak.gbps
        );
        s += &format!("{:<16} {:<30} {:<8} {:>10} {:>18} {:>7}\n", "kernel", "shape", "weights", "ms", "rate", "% peak");
        for k in &self.kernels {
            s += &format!("{:<16} {:<30} {:<8} {:>10.3} {:>10.1} {:<7} {:>6.1}\n", k.kernel, k.shape, k.weights, k.ms, k.rate, k.unit, k.percent_of_peak);
        }
        if !self.unet.is_empty() {
            s += &format!(
                "\n{:<6} {:<6} {:<6} {:>10} {:>9} {:>13} {:>13} {:>12} {:>10} {:>10}\n",
                "unet", "quant", "lora", "s/step", "TFLOP/s", "weights MiB", "peak MiB", "first step s", "pipelines", "dispatches"
            );
            for u in &self.unet {
                let tflops = if u.tflops > 0.0 { format!("{:.2}", u.tflops) } else { "-".into() };
                let lora = u.lora_rank.map_or("-".into(), |r| format!("r{r}"));
                s += &format!(
                    "{:<6} {:<6} {:<6} {:>10.3} {:>9} {:>13.1} {:>13.1} {:>12.3} {:>10} {:>10}\n",
                    u.size,
                    u.quant,
                    lora,
                    u.seconds_per_step,
                    tflops,
                    mib(u.weight_bytes),
                    mib(u.peak_bytes),
                    u.first_step_seconds,
                    u.pipelines_compiled,
                    u.dispatches_per_step
                );
            }
        }
        if !self.vae.is_empty() {
            s += &format!("\n{:<6} {:<6} {:>10} {:>13}\n", "vae", "tiled", "s", "peak MiB");
            for v in &self.vae {
                s += &format!("{:<6} {:<6} {:>10.3} {:>13.1}\n", v.size, v.tiled, v.seconds, mib(v.peak_bytes));
            }
        }
        if !self.taesd.is_empty() {
            s += &format!("\n{:<6} {:>26} {:>13}\n", "taesd", "TAESD preview decode ms", "peak MiB");
            for t in &self.taesd {
                s += &format!("{:<6} {:>26.3} {:>13.1}\n", t.size, t.seconds * 1e3, mib(t.peak_bytes));
            }
        }
        for k in &self.skipped {
            s += &format!("\nskipped {}: {}", k.what, k.error);
        }
        s
    }
}
