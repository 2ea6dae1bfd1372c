//! The samplers beside Euler against diffusers (reference/samplers.safetensors, written by
//! tests/fixtures/ref_samplers.py): each scheduler's timesteps and noise levels for every spacing,
//! its step math on its own (CPU, ancestral noise from torch's generator stream), and whole tiny
//! pipeline runs compared step by step: text to image, few-step Turbo/Lightning style without
//! guidance, base → refiner, img2img and the refiner's SDEdit.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{fixture, psnr};
use sdxl::pipeline::generate::{generate, Event, GenerateParams, Observer, SdxlModel};
use sdxl::pipeline::image::decode_png;
use sdxl::quant::QuantPreset;
use sdxl::random::TorchGenerator;
use sdxl::scheduler::{SamplerChoice, Schedule, Scheduler, SchedulerConfig, TimestepSpacing};
use sdxl::weights::{DirSource, Source, FileTensors};
use sdxl::{DType, Gpu};
use serde::Deserialize;

gpu_tests!(pipelines_match_diffusers_step_by_step);

const SAMPLERS: [&str; 5] = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"];
const SPACINGS: [&str; 3] = ["leading", "trailing", "linspace"];
/// The constants of ref_samplers.py.
const SCHEDULE_STEPS: [usize; 6] = [1, 2, 4, 7, 30, 61];
const WALK_STEPS: [usize; 3] = [1, 4, 7];

async fn reference() -> FileTensors<'static> {
    let source: &'static DirSource = Box::leak(Box::new(fixture("reference")));
    FileTensors::open(source, vec!["samplers.safetensors".into()]).await.unwrap()
}

async fn get(refs: &FileTensors<'_>, key: &str) -> Vec<f32> {
    let shape = refs.shape(key).unwrap_or_else(|_| panic!("{key} missing (rerun ref_samplers.py)")).to_vec();
    refs.host(key, &shape).await.unwrap()
}

fn tiny_scheduler(sampler: &str, spacing: &str) -> Scheduler {
    let path = format!("{}/../tests/fixtures/tiny-sdxl-base/scheduler/scheduler_config.json", env!("CARGO_MANIFEST_DIR"));
    let config: SchedulerConfig = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    Scheduler::from_config(&config, Some(sampler.parse().unwrap()), Some(spacing.parse().unwrap())).unwrap()
}

/// Each sampler with each spacing, for each of `step_counts`: (sampler, key, schedule), keys named
/// as ref_samplers.py writes them (`{kind}.{sampler}.{spacing}.{steps}`).
fn schedules(kind: &str, step_counts: &[usize]) -> Vec<(&'static str, String, Schedule)> {
    let mut all = vec![];
    for sampler in SAMPLERS {
        for spacing in SPACINGS {
            let scheduler = tiny_scheduler(sampler, spacing);
            for steps in step_counts {
                all.push((sampler, format!("{kind}.{sampler}.{spacing}.{steps}"), scheduler.timesteps(*steps).unwrap()));
            }
        }
    }
    all
}

/// Max |got − want| relative to max |want| (at least 1e-6).
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0f32, |m, (g, w)| if g.is_nan() { f32::INFINITY } else { m.max((g - w).abs()) }) / scale
}

#[test]
fn schedules_match_diffusers() {
    pollster::block_on(async {
        let refs = reference().await;
        for (sampler, key, schedule) in schedules("sched", &SCHEDULE_STEPS) {
            assert_eq!(schedule.timesteps, get(&refs, &format!("{key}.timesteps")).await, "{key}: timesteps");
            if sampler != "ddim" {
                let err = relative_error(&schedule.sigmas, &get(&refs, &format!("{key}.sigmas")).await);
                assert!(err <= 1e-6, "{key}: sigmas relative error {err}");
            }
        }
    })
}

/// One step on the CPU, as the pipeline applies it on the GPU.
fn apply(schedule: &Schedule, i: usize, x: &[f32], out: &[f32], previous: &mut Option<Vec<f32>>, noise: &mut TorchGenerator) -> Vec<f32> {
    let step = schedule.step(i);
    let (a, b) = step.denoised;
    let clip = step.clip.unwrap_or(f32::INFINITY);
    let x0: Vec<f32> = x.iter().zip(out).map(|(x, o)| (a * x + b * o).clamp(-clip, clip)).collect();
    let u = step.update;
    let drawn = u.noise.map(|_| noise.randn(x.len()));
    let next = (0..x.len())
        .map(|j| {
            u.latents * x[j]
                + u.prediction * out[j]
                + u.denoised * x0[j]
                + previous.as_ref().map_or(0.0, |p| u.previous_denoised * p[j])
                + drawn.as_ref().map_or(0.0, |n| u.noise.unwrap() * n[j])
        })
        .collect();
    *previous = u.uses_denoised().then_some(x0);
    next
}

#[test]
fn steps_match_diffusers_step() {
    pollster::block_on(async {
        let refs = reference().await;
        for (_, key, schedule) in schedules("walk", &WALK_STEPS) {
            let n = schedule.num_steps();
            let mut x = get(&refs, &format!("{key}.x")).await;
            let outs = get(&refs, &format!("{key}.out")).await;
            let prevs = get(&refs, &format!("{key}.prev")).await;
            let size = x.len();
            assert_eq!(outs.len(), n * size, "{key}: step count");
            let (mut previous, mut noise) = (None, TorchGenerator::new(7));
            for i in 0..n {
                x = apply(&schedule, i, &x, &outs[i * size..(i + 1) * size], &mut previous, &mut noise);
                let err = relative_error(&x, &prevs[i * size..(i + 1) * size]);
                assert!(err <= 1e-5, "{key}: step {i} relative error {err}");
            }
        }
    })
}

#[test]
fn bad_choices_are_named() {
    for (result, needle) in [
        ("euler_b".parse::<SamplerChoice>().map(|_| ()), "euler_b"),
        ("uniform".parse::<TimestepSpacing>().map(|_| ()), "uniform"),
    ] {
        match result {
            Err(sdxl::Error::InvalidParameter(m)) => assert!(m.contains(needle) && m.contains("expected one of"), "{m}"),
            other => panic!("{needle}: {other:?}"),
        }
    }
    for strength in [0.0, 1.5, f64::NAN] {
        match tiny_scheduler("ddim", "leading").img2img(10, strength) {
            Err(sdxl::Error::InvalidParameter(m)) => assert!(m.contains("strength"), "{m}"),
            other => panic!("strength {strength}: {other:?}"),
        }
    }
}

#[derive(Deserialize)]
struct Case {
    name: String,
    sampler: String,
    spacing: Option<String>,
    seed: u64,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f32,
    refiner_start: Option<f64>,
    #[serde(default)]
    init_image: bool,
    strength: Option<f64>,
    #[serde(default)]
    refiner_only: bool,
}

/// The latents after every step.
#[derive(Default)]
struct Steps(Vec<Vec<f32>>);

impl Observer for &mut Steps {
    async fn event(&mut self, gpu: &Gpu, event: Event<'_>) -> sdxl::Result<()> {
        if let Event::Step { estimate, .. } = event {
            self.0.push(gpu.read(estimate.next_latents()).await?);
        }
        Ok(())
    }
}

async fn pipelines_match_diffusers_step_by_step(gpu: &Gpu) {
    let refs = reference().await;
    let files = fixture("reference");
    let cases: Vec<Case> = serde_json::from_slice(&files.read("samplers_cases.json").await.unwrap()).unwrap();
    let image = decode_png(&files.read("init_96x64.png").await.unwrap()).unwrap();
    let base = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-base")), &QuantPreset::F16.policy()).await.unwrap();
    let refiner = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-refiner")), &QuantPreset::F16.policy()).await.unwrap();
    // f32 as the issue states; f16 storage rounds every activation (measured: final latents within
    // 2.8e-3, images above 62 dB).
    let (step_tol, min_psnr) = if gpu.dtype == DType::F32 { (1e-3, 45.0) } else { (1e-2, 50.0) };
    for case in &cases {
        let params = GenerateParams {
            prompt: "a lighthouse on a cliff at dawn".into(),
            negative: Some("blurry".into()),
            width: case.width,
            height: case.height,
            steps: case.steps,
            guidance: case.guidance,
            seed: case.seed,
            refiner_start: case.refiner_start.unwrap_or(0.8),
            scheduler: Some(case.sampler.parse().unwrap()),
            timestep_spacing: case.spacing.as_deref().map(|s| s.parse().unwrap()),
            init_image: case.init_image.then(|| image.clone()),
            strength: case.strength.unwrap_or(0.3),
            ..Default::default()
        };
        let (first, second) = match (case.refiner_only, case.refiner_start) {
            (true, _) => (&refiner, None),
            (false, Some(_)) => (&base, Some(&refiner)),
            (false, None) => (&base, None),
        };
        let mut steps = Steps::default();
        let out = generate(gpu, first, second, &params, &mut steps).await.unwrap();
        let want_steps = get(&refs, &format!("{}.steps", case.name)).await;
        let size = out.latents.len();
        assert_eq!(steps.0.len() * size, want_steps.len(), "{}: steps run", case.name);
        for (i, got) in steps.0.iter().enumerate() {
            let err = relative_error(got, &want_steps[i * size..(i + 1) * size]);
            assert!(err <= step_tol, "{}: step {i} latents relative error {err} ({:?})", case.name, gpu.dtype);
        }
        let latent_err = relative_error(&gpu.read(&out.latents).await.unwrap(), &get(&refs, &format!("{}.latents", case.name)).await);
        assert!(latent_err <= step_tol, "{}: latents relative error {latent_err}", case.name);
        let db = psnr(&gpu.read(&out.image).await.unwrap(), &get(&refs, &format!("{}.image", case.name)).await);
        assert!(db >= min_psnr, "{}: image PSNR {db:.1} dB < {min_psnr} ({:?})", case.name, gpu.dtype);
        eprintln!("{} {:?}: {} steps, final latents rel err {latent_err:.2e}, image PSNR {db:.1} dB", case.name, gpu.dtype, steps.0.len());
    }
}
