#![cfg(not(target_arch = "wasm32"))]
//! The CPU side of sampling against diffusers / torch (reference/scheduler.safetensors, written by
//! tests/fixtures/ref_scheduler.py): torch's seeded normals, EulerDiscreteScheduler's schedules,
//! what diffusers' SDXL pipelines really use per step (base with denoising_end, refiner with
//! denoising_start, img2img strength), the Euler update coefficients, and the errors.

use std::collections::BTreeMap;

use sdxl::random::TorchGenerator;
use sdxl::scheduler::{Schedule, Scheduler, SchedulerConfig};
use sdxl::weights::safetensors::{header_len, parse_header};
use sdxl::weights::{DirSource, MemorySource, FileTensors};
use sdxl::Error;

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");
const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference");
const CONFIG: &str = "scheduler/scheduler_config.json";
/// The constants of ref_scheduler.py.
const SPACINGS: [&str; 3] = ["leading", "trailing", "linspace"];
const SCHEDULE_STEPS: [usize; 6] = [1, 2, 7, 30, 50, 61];
const PIPE_STEPS: [usize; 2] = [10, 30];
const SPLIT: f64 = 0.8;
const STRENGTH: f64 = 0.3;

/// Every tensor of reference/scheduler.safetensors, flattened.
fn reference() -> BTreeMap<String, Vec<f32>> {
    let file = "scheduler.safetensors";
    let bytes = std::fs::read(format!("{REFERENCE}/{file}")).unwrap();
    let n = header_len(file, &bytes, bytes.len() as u64).unwrap() as usize;
    let header = parse_header(file, &bytes[8..8 + n], bytes.len() as u64).unwrap();
    let source = DirSource::new(REFERENCE);
    pollster::block_on(async {
        let weights = FileTensors::open(&source, vec![file.to_string()]).await.unwrap();
        let mut all = BTreeMap::new();
        for (name, info) in header.tensors {
            let values = weights.host(&name, &info.shape).await.unwrap();
            all.insert(name, values);
        }
        all
    })
}

fn get<'a>(reference: &'a BTreeMap<String, Vec<f32>>, key: &str) -> &'a [f32] {
    reference.get(key).unwrap_or_else(|| panic!("{key} missing from the reference (rerun ref_scheduler.py)"))
}

/// The tiny base's scheduler config, optionally with another `timestep_spacing`/`prediction_type`.
fn tiny_config() -> SchedulerConfig {
    serde_json::from_slice(&std::fs::read(format!("{BASE}/{CONFIG}")).unwrap()).unwrap()
}

fn tiny_scheduler(edit: impl FnOnce(&mut SchedulerConfig)) -> Scheduler {
    let mut config = tiny_config();
    edit(&mut config);
    Scheduler::from_config(&config, None, None).unwrap()
}

/// Asserts |got - want| <= tol * |want| elementwise.
fn assert_relative(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length (got {got:?}, want {want:?})");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs(), "{what}[{i}]: got {g} want {w} (relative tolerance {tol})");
    }
}

/// Compares a schedule with what a pipeline run recorded under `key`.
fn assert_schedule_matches_run(schedule: &Schedule, reference: &BTreeMap<String, Vec<f32>>, key: &str) {
    let n = schedule.num_steps();
    assert_eq!(schedule.timesteps, get(reference, &format!("{key}.timesteps")), "{key}: timesteps");
    assert_relative(&format!("{key}.sigmas"), &schedule.sigmas[..n], get(reference, &format!("{key}.sigmas")), 1e-6);
    assert_relative(&format!("{key}.sigmas_next"), &schedule.sigmas[1..], get(reference, &format!("{key}.sigmas_next")), 1e-6);
    let scales: Vec<f32> = (0..n).map(|i| schedule.step(i).input_scale).collect();
    assert_relative(&format!("{key}.scales"), &scales, get(reference, &format!("{key}.scales")), 1e-6);
    assert_relative(
        &format!("{key}.init_noise_sigma"),
        &[schedule.init_noise_sigma],
        get(reference, &format!("{key}.init_noise_sigma")),
        1e-6,
    );
}

#[test]
fn randn_matches_torch() {
    let reference = reference();
    // "randn.{seed}.{n0}-{n1}-....{k}": draw k of consecutive draws of n0, n1, ... values.
    let mut cases = 0;
    for key in reference.keys().filter(|k| k.starts_with("randn.") && k.ends_with(".0")) {
        let parts: Vec<&str> = key.split('.').collect();
        let seed: u64 = parts[1].parse().unwrap();
        let mut generator = TorchGenerator::new(seed);
        for (k, n) in parts[2].split('-').enumerate() {
            let got = generator.randn(n.parse().unwrap());
            let want = get(&reference, &format!("randn.{seed}.{}.{k}", parts[2]));
            assert_eq!(got.len(), want.len(), "seed {seed}, draw {k}: length");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() <= 1e-6, "seed {seed}, draws {}, draw {k}, element {i}: got {g} want {w}", parts[2]);
            }
        }
        cases += 1;
    }
    assert!(cases >= 13, "only {cases} randn cases in the reference");
}

#[test]
fn schedules_match_diffusers() {
    let reference = reference();
    for spacing in SPACINGS {
        let scheduler = tiny_scheduler(|c| c.timestep_spacing = Some(spacing.into()));
        for steps in SCHEDULE_STEPS {
            let key = format!("sched.{spacing}.{steps}");
            let schedule = scheduler.timesteps(steps).unwrap();
            assert_eq!(schedule.timesteps, get(&reference, &format!("{key}.timesteps")), "{key}: timesteps");
            assert_relative(&format!("{key}.sigmas"), &schedule.sigmas, get(&reference, &format!("{key}.sigmas")), 1e-6);
            assert_relative(
                &format!("{key}.init_noise_sigma"),
                &[schedule.init_noise_sigma],
                get(&reference, &format!("{key}.init_noise_sigma")),
                1e-6,
            );
            let scales: Vec<f32> = (0..schedule.num_steps()).map(|i| schedule.step(i).input_scale).collect();
            assert_relative(&format!("{key}.scales"), &scales, get(&reference, &format!("{key}.scales")), 1e-6);
            assert_eq!(schedule.begin_index, 0);
        }
    }
}

#[test]
fn trailing_spacing_keeps_diffusers_extra_step() {
    let schedule = tiny_scheduler(|c| c.timestep_spacing = Some("trailing".into())).timesteps(61).unwrap();
    assert_eq!(schedule.num_steps(), 62);
    assert_eq!(schedule.timesteps.last(), Some(&-1.0));
}

#[test]
fn load_reads_the_model_folder() {
    let reference = reference();
    let scheduler = pollster::block_on(Scheduler::load(&DirSource::new(BASE), CONFIG, None, None)).unwrap();
    let schedule = scheduler.timesteps(7).unwrap();
    assert_eq!(schedule.timesteps, get(&reference, "sched.leading.7.timesteps"));
    assert_relative("sigmas", &schedule.sigmas, get(&reference, "sched.leading.7.sigmas"), 1e-6);
}

#[test]
fn full_run_matches_pipeline() {
    let reference = reference();
    let schedule = tiny_scheduler(|_| {}).timesteps(PIPE_STEPS[0]).unwrap();
    assert_schedule_matches_run(&schedule, &reference, &format!("pipe.full.{}", PIPE_STEPS[0]));
}

#[test]
fn ensemble_split_matches_pipelines() {
    let reference = reference();
    let scheduler = tiny_scheduler(|_| {});
    for steps in PIPE_STEPS {
        let base = scheduler.denoising_end(scheduler.timesteps(steps).unwrap(), SPLIT).unwrap();
        let refiner = scheduler.denoising_start(steps, SPLIT).unwrap();
        assert_schedule_matches_run(&base, &reference, &format!("pipe.base.{steps}"));
        assert_schedule_matches_run(&refiner, &reference, &format!("pipe.refiner.{steps}"));
        assert_eq!(base.begin_index, 0);
        assert_eq!(refiner.begin_index as f32, get(&reference, &format!("pipe.refiner.{steps}.begin_index"))[0]);
        // Together they are the full run: the refiner starts at the sigma the base handed over.
        assert_eq!(base.num_steps() + refiner.num_steps(), steps);
        assert_eq!(base.sigmas.last(), refiner.sigmas.first());
    }
}

#[test]
fn img2img_strength_matches_pipeline() {
    let reference = reference();
    let scheduler = tiny_scheduler(|_| {});
    for steps in PIPE_STEPS {
        let key = format!("pipe.img2img.{steps}");
        let schedule = scheduler.img2img(steps, STRENGTH).unwrap();
        assert_schedule_matches_run(&schedule, &reference, &key);
        assert_eq!(schedule.begin_index as f32, get(&reference, &format!("{key}.begin_index"))[0]);
        assert_relative(&format!("{key}.noise_sigma"), &[schedule.add_noise.1], get(&reference, &format!("{key}.noise_sigma")), 1e-6);
    }
}

#[test]
fn step_coefficients_match_diffusers_step() {
    let reference = reference();
    for prediction in ["epsilon", "v_prediction", "sample"] {
        let schedule = tiny_scheduler(|c| c.prediction_type = prediction.into()).timesteps(10).unwrap();
        for i in [0, 4, 9] {
            let key = format!("step.{prediction}.{i}");
            let x = get(&reference, &format!("{key}.sample"));
            let model_output = get(&reference, &format!("{key}.model_output"));
            let want = get(&reference, &format!("{key}.prev_sample"));
            let u = schedule.step(i).update;
            let (a, b) = (u.latents, u.prediction);
            let scale = want.iter().fold(1f32, |m, w| m.max(w.abs()));
            for (j, ((x, m), w)) in x.iter().zip(model_output).zip(want).enumerate() {
                let got = a * x + b * m;
                assert!((got - w).abs() <= 1e-5 * scale, "{key}[{j}]: got {got} want {w} (a {a}, b {b})");
            }
        }
    }
}

fn assert_invalid_parameter<T: std::fmt::Debug>(result: sdxl::Result<T>, needle: &str) {
    match result {
        Err(Error::InvalidParameter(message)) => assert!(message.contains(needle), "{message:?} does not mention {needle:?}"),
        other => panic!("expected InvalidParameter mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_parameters_are_rejected() {
    let scheduler = tiny_scheduler(|_| {});
    assert_invalid_parameter(scheduler.timesteps(0), "steps");
    for fraction in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
        assert_invalid_parameter(scheduler.denoising_end(scheduler.timesteps(10).unwrap(), fraction), "denoising_end");
        assert_invalid_parameter(scheduler.denoising_start(10, fraction), "denoising_start");
    }
    for strength in [0.0, -0.1, 1.5, f64::NAN] {
        assert_invalid_parameter(scheduler.img2img(10, strength), "strength");
    }
    assert_invalid_parameter(scheduler.timesteps(0), "steps");
    // Fractions that leave one side without a step.
    assert_invalid_parameter(scheduler.denoising_end(scheduler.timesteps(10).unwrap(), 0.05), "no step");
    assert_invalid_parameter(scheduler.denoising_start(10, 0.9995), "no step");
    assert_invalid_parameter(scheduler.img2img(10, 0.05), "no denoising step");
    assert_eq!(scheduler.img2img(10, 1.0).unwrap(), scheduler.timesteps(10).unwrap());
}

/// Loads `config` as `scheduler/scheduler_config.json` from memory; returns the Config error's message.
fn config_error(config: &str) -> String {
    let mut source = MemorySource::default();
    source.insert(CONFIG, config.as_bytes().to_vec());
    match pollster::block_on(Scheduler::load(&source, CONFIG, None, None)) {
        Err(Error::Config { path, message }) => {
            assert!(path.contains(CONFIG), "{path:?} does not name the config file");
            message
        }
        Err(other) => panic!("expected a Config error, got {other:?}"),
        Ok(_) => panic!("{config} was accepted"),
    }
}

#[test]
fn unsupported_configs_are_rejected() {
    for (config, needle) in [
        (r#"{"beta_schedule": "squaredcos_cap_v2"}"#, "beta_schedule \"squaredcos_cap_v2\""),
        (r#"{"prediction_type": "flow"}"#, "prediction_type \"flow\""),
        (r#"{"timestep_spacing": "uniform"}"#, "timestep_spacing \"uniform\""),
        (r#"{"interpolation_type": "log_linear"}"#, "interpolation_type \"log_linear\""),
        (r#"{"final_sigmas_type": "max"}"#, "final_sigmas_type \"max\""),
        (r#"{"timestep_type": "continuous"}"#, "timestep_type \"continuous\""),
        (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
        (r#"{"use_exponential_sigmas": true}"#, "use_exponential_sigmas"),
        (r#"{"use_beta_sigmas": true}"#, "use_beta_sigmas"),
        (r#"{"rescale_betas_zero_snr": true}"#, "rescale_betas_zero_snr"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (r#"{"num_train_timesteps": 1}"#, "num_train_timesteps"),
        (r#"{"_class_name": "LCMScheduler"}"#, "LCMScheduler"),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#, "sde-dpmsolver++"),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}"#, "solver_order 3"),
        (r#"{"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"}"#, "Euler a"),
        (r#"{"steps_offset": "one"}"#, "invalid JSON"),
    ] {
        let message = config_error(config);
        assert!(message.contains(needle), "{config}: {message:?} does not mention {needle:?}");
    }
}

#[test]
fn defaults_and_nulls_follow_diffusers() {
    // Every field missing or null (diffusers' `bool | None` flags) gives diffusers' defaults.
    let mut source = MemorySource::default();
    source.insert(CONFIG, br#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": null, "trained_betas": null}"#.to_vec());
    let loaded = pollster::block_on(Scheduler::load(&source, CONFIG, None, None)).unwrap();
    let default = Scheduler::from_config(&SchedulerConfig::default(), None, None).unwrap();
    assert_eq!(loaded.timesteps(5).unwrap(), default.timesteps(5).unwrap());
    // Defaults: linspace spacing over 1000 training steps, so the first timestep is 999.
    assert_eq!(default.timesteps(5).unwrap().timesteps[0], 999.0);
}
