//! End-to-end text-to-image against diffusers on the tiny fixtures: a base-only run (non-square,
//! negative prompt) and a base → refiner ensemble-of-experts run, same seeds as diffusers.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{fixture, max_abs, psnr, Case};

use sdxl::pipeline::generate::{generate, Event, Observer, SdxlModel};
use sdxl::quant::QuantPreset;
use sdxl::weights::FileTensors;
use sdxl::{DType, Gpu};

gpu_tests!(pipelines_match_diffusers);

/// The events of a run, as text, and the last step's denoised estimate.
#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    last_denoised: Vec<f32>,
}

impl Observer for &mut Recorder {
    async fn event(&mut self, gpu: &Gpu, event: Event<'_>) -> sdxl::Result<()> {
        self.events.push(match event {
            Event::Encode(stage) => format!("encode {stage:?}"),
            Event::Step { progress: p, estimate } => {
                self.last_denoised = gpu.read(&estimate.denoised(gpu)?).await?;
                format!("{:?} step {}/{}", p.stage, p.step, p.steps)
            }
            Event::Decode => "decode".into(),
        });
        Ok(())
    }
}

async fn pipelines_match_diffusers(gpu: &Gpu) {
    let reference = fixture("reference");
    let refs = FileTensors::open(&reference, vec!["pipeline.safetensors".into()]).await.unwrap();
    let cases = Case::load("pipeline_cases.json");
    let base = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-base")), &QuantPreset::F16.policy()).await.unwrap();
    let refiner = SdxlModel::load(gpu, &common::folder(gpu, fixture("tiny-sdxl-refiner")), &QuantPreset::F16.policy()).await.unwrap();
    // f32 as the issue states; f16 storage rounds every activation, so only the image is held to a bar.
    let (latent_tol, min_psnr) = if gpu.dtype == DType::F32 { (1e-3, 45.0) } else { (f32::INFINITY, 30.0) };
    for case in &cases {
        let params = case.params();
        let with_refiner = case.refiner_start.map(|_| &refiner);
        let mut recorder = Recorder::default();
        let out = generate(gpu, &base, with_refiner, &params, &mut recorder).await.unwrap();
        assert_eq!(gpu.memory().cached, 0, "{}: a run hands its pooled activations back", case.name);
        let stage_steps = |stage: &'static str, n: usize| (1..=n).map(move |i| format!("{stage} step {i}/{n}"));
        let mut expected: Vec<String> = vec!["encode Base".into()];
        match case.refiner_start {
            Some(start) => {
                let base_steps = recorder.events.iter().filter(|e| e.starts_with("Base step")).count();
                assert!(base_steps > 0 && base_steps < case.steps, "{}: the refiner takes over at {start}", case.name);
                expected.extend(stage_steps("Base", base_steps));
                expected.push("encode Refiner".into());
                expected.extend(stage_steps("Refiner", case.steps - base_steps));
            }
            None => expected.extend(stage_steps("Base", case.steps)),
        }
        expected.push("decode".into());
        assert_eq!(recorder.events, expected, "{}: events in order, every step once", case.name);
        // The last step lands on sigma 0, where the estimate of the clean latents is the result.
        let final_latents = gpu.read(&out.latents).await.unwrap();
        let denoised_err = max_abs(&recorder.last_denoised, &final_latents);
        assert!(denoised_err <= 1e-6, "{}: last step's denoised estimate differs from the final latents by {denoised_err}", case.name);
        let read = |key: &str, shape: &[usize]| {
            let key = format!("{}.{key}", case.name);
            let shape = shape.to_vec();
            let refs = &refs;
            async move { refs.host(&key, &shape).await.unwrap() }
        };
        let noise = gpu.read(&out.noise).await.unwrap();
        let noise_err = max_abs(&noise, &read("noise", out.noise.shape()).await);
        let noise_tol = if gpu.dtype == DType::F32 { 1e-5 } else { 1e-3 };
        assert!(noise_err <= noise_tol, "{}: noise max |Δ| {noise_err}", case.name);
        let want = read("latents", out.latents.shape()).await;
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let latent_err = max_abs(&gpu.read(&out.latents).await.unwrap(), &want) / scale;
        assert!(latent_err <= latent_tol, "{}: latents relative error {latent_err} ({:?})", case.name, gpu.dtype);
        let image = gpu.read(&out.image).await.unwrap();
        let db = psnr(&image, &read("image", out.image.shape()).await);
        assert!(db >= min_psnr, "{}: image PSNR {db:.1} dB < {min_psnr} ({:?})", case.name, gpu.dtype);
        eprintln!("{} {:?}: latents rel err {latent_err:.2e}, image PSNR {db:.1} dB", case.name, gpu.dtype);
    }
}
