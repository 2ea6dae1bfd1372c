//! diffusers' samplers as plain numbers: the timesteps, the noise levels and the per-step
//! coefficients the GPU applies, for a whole text-to-image run, for the base and refiner halves
//! of an SDXL ensemble of experts, and for img2img.
//!
//! | `--scheduler`     | diffusers class                                  | A1111 name       |
//! |-------------------|--------------------------------------------------|------------------|
//! | `euler`           | EulerDiscreteScheduler                           | Euler            |
//! | `euler_a`         | EulerAncestralDiscreteScheduler                  | Euler a          |
//! | `dpmpp_2m`        | DPMSolverMultistepScheduler (dpmsolver++, order 2) | DPM++ 2M       |
//! | `dpmpp_2m_karras` | the same with `use_karras_sigmas=True`           | DPM++ 2M Karras  |
//! | `ddim`            | DDIMScheduler (eta 0)                            | DDIM             |
//!
//! The noise levels are computed in float32 the way diffusers does (torch's float32 `linspace`
//! for the betas, a cumulative product accumulated in double, numpy's float64 `interp`), so they
//! match diffusers within one float32 ulp; the step coefficients are derived in float64.
//!
//! Sampling loop for one step `i` of a [`Schedule`] (see [`Step`]):
//! ```text
//! out = unet(x * step.input_scale, schedule.timesteps[i], ...)     // + guidance
//! x0  = clamp(step.denoised.0 * x + step.denoised.1 * out)         // when the update uses it
//! x   = u.latents * x + u.prediction * out + u.denoised * x0 + u.previous_denoised * x0_prev
//!       + u.noise * randn(generator)                               // u = step.update
//! ```
//! Euler and Euler a work on latents x = x0 + σ·ε (diffusers' "VE" space: the initial noise is
//! scaled by `init_noise_sigma` and the UNet input by 1/sqrt(σ² + 1)); DPM++ and DDIM on
//! x = α·x0 + σ_t·ε with α = 1/sqrt(σ² + 1), σ_t = σ·α (unit initial noise, unscaled input).

use serde::Deserialize;
use strum::{EnumString, IntoStaticStr, VariantNames};

use crate::error::{Error, Result};
use crate::named::Named;
use crate::weights::{read_json, Source};

/// `scheduler/scheduler_config.json` with diffusers' field names. Fields whose default differs
/// between scheduler classes are options, resolved for the class actually built (as diffusers'
/// `SchedulerClass.from_config(config)` does); values this engine does not implement are
/// rejected when the scheduler is built.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The scheduler class the model folder asks for.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// "linear" or "scaled_linear".
    pub beta_schedule: String,
    /// Not supported (must be null).
    pub trained_betas: Option<Vec<f64>>,
    /// "epsilon", "v_prediction" or "sample".
    pub prediction_type: String,
    /// Euler: only "linear".
    pub interpolation_type: String,
    /// diffusers types these `bool | None`; Karras sigmas are supported by DPM++ only.
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// "leading", "trailing" or "linspace" (default: "leading" for DDIM, else "linspace").
    pub timestep_spacing: Option<String>,
    /// Euler: only "discrete".
    pub timestep_type: String,
    pub steps_offset: usize,
    /// Only false.
    pub rescale_betas_zero_snr: bool,
    /// Only false.
    pub thresholding: bool,
    /// "zero" or "sigma_min": the noise level the last step lands on (Euler, DPM++).
    pub final_sigmas_type: String,
    /// DPM++: 1 or 2.
    pub solver_order: usize,
    /// DPM++: only "dpmsolver++".
    pub algorithm_type: String,
    /// DPM++: "midpoint" or "heun".
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// DPM++: only -inf (no clipping); diffusers' default.
    pub lambda_min_clipped: Option<f64>,
    /// DPM++: only null.
    pub variance_type: Option<String>,
    /// DDIM: clamp the predicted clean latents to ±`clip_sample_range` (diffusers' default: true).
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DDIM: the last step lands on ᾱ = 1 (true, the default) or on the first training ᾱ.
    pub set_alpha_to_one: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            interpolation_type: "linear".into(),
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            use_lu_lambdas: None,
            use_flow_sigmas: None,
            timestep_spacing: None,
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            thresholding: false,
            final_sigmas_type: "zero".into(),
            solver_order: 2,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: None,
            variance_type: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
        }
    }
}

/// A sampler users pick by name (`--scheduler`); each is a diffusers scheduler class built from
/// the model's scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumString, VariantNames)]
#[strum(serialize_all = "snake_case", parse_err_ty = Error, parse_err_fn = crate::named::unknown::<Self>)]
pub enum SamplerChoice {
    Euler,
    #[strum(serialize = "euler_a")]
    EulerAncestral,
    #[strum(serialize = "dpmpp_2m")]
    DpmPP2M,
    #[strum(serialize = "dpmpp_2m_karras")]
    DpmPP2MKarras,
    Ddim,
}

impl Named for SamplerChoice {
    const WHAT: &'static str = "scheduler";
}

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`, see
/// table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumString, IntoStaticStr, VariantNames)]
#[strum(serialize_all = "lowercase", parse_err_ty = Error, parse_err_fn = crate::named::unknown::<Self>)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl Named for TimestepSpacing {
    const WHAT: &'static str = "timestep spacing";
}

/// What the UNet predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PredictionType {
    /// The added noise (SDXL base and refiner).
    Epsilon,
    /// The velocity `alpha * noise - sigma * x0`.
    VPrediction,
    /// The denoised sample itself.
    Sample,
}

#[derive(Debug, Clone, Copy)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sampler {
    Euler,
    EulerAncestral,
    /// DPM-Solver++ multistep (`solver_order` 1 or 2).
    DpmSolver { order: usize, heun: bool, karras: bool, lower_order_final: bool, euler_at_final: bool },
    /// DDIM with eta 0; `clip`: clamp x0 to ±clip; `final_alpha`: ᾱ after the last step.
    Ddim { clip: Option<f32>, final_alpha: f32 },
}

/// One of diffusers' schedulers for one model, ready to plan runs of any step count.
#[derive(Debug, Clone)]
pub struct Scheduler {
    sampler: Sampler,
    /// ᾱ_t of each training timestep t, in float32 like diffusers.
    alphas_cumprod: Vec<f32>,
    /// Noise level sqrt((1 - ᾱ_t) / ᾱ_t) of each training timestep, in float32.
    train_sigmas: Vec<f32>,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction: PredictionType,
    /// Euler and DPM++: where the last step lands: 0, or the smallest training sigma ("sigma_min").
    final_sigma: f32,
}

impl Scheduler {
    /// Reads `path` (normally `scheduler/scheduler_config.json`) from a model folder and builds the
    /// scheduler it names, or `choice` from the same config; `spacing` overrides its timestep spacing.
    pub async fn load(source: &impl Source, path: &str, choice: Option<SamplerChoice>, spacing: Option<TimestepSpacing>) -> Result<Scheduler> {
        let config: SchedulerConfig = read_json(source, path).await?;
        Scheduler::build(&config, choice, spacing).map_err(|message| Error::Config { path: source.describe(path), message })
    }

    /// Builds a scheduler from a config already in memory (see [`Scheduler::load`]).
    pub fn from_config(config: &SchedulerConfig, choice: Option<SamplerChoice>, spacing: Option<TimestepSpacing>) -> Result<Scheduler> {
        Scheduler::build(config, choice, spacing).map_err(|message| Error::Config { path: "scheduler config".into(), message })
    }

    fn build(config: &SchedulerConfig, choice: Option<SamplerChoice>, spacing: Option<TimestepSpacing>) -> std::result::Result<Scheduler, String> {
        const CLASSES: [(&str, SamplerChoice); 4] = [
            ("EulerDiscreteScheduler", SamplerChoice::Euler),
            ("EulerAncestralDiscreteScheduler", SamplerChoice::EulerAncestral),
            ("DPMSolverMultistepScheduler", SamplerChoice::DpmPP2M),
            ("DDIMScheduler", SamplerChoice::Ddim),
        ];
        let karras = config.use_karras_sigmas == Some(true);
        let choice = match (choice, config.class_name.as_deref()) {
            (Some(choice), _) => choice,
            (None, None) => SamplerChoice::Euler,
            (None, Some(class)) => match choose("_class_name", class, &CLASSES)? {
                SamplerChoice::DpmPP2M if karras => SamplerChoice::DpmPP2MKarras,
                choice => choice,
            },
        };
        // Options the chosen class does not have are ignored, as diffusers' from_config does.
        let mut unsupported = vec![
            ("use_exponential_sigmas", config.use_exponential_sigmas == Some(true)),
            ("use_beta_sigmas", config.use_beta_sigmas == Some(true)),
            ("rescale_betas_zero_snr", config.rescale_betas_zero_snr),
            ("thresholding", config.thresholding && matches!(choice, SamplerChoice::DpmPP2M | SamplerChoice::DpmPP2MKarras | SamplerChoice::Ddim)),
            ("trained_betas", config.trained_betas.is_some()),
        ];
        let sampler = match choice {
            SamplerChoice::Euler | SamplerChoice::EulerAncestral => {
                unsupported.push(("use_karras_sigmas", karras));
                if choice == SamplerChoice::Euler {
                    choose("interpolation_type", &config.interpolation_type, &[("linear", ())])?;
                    choose("timestep_type", &config.timestep_type, &[("discrete", ())])?;
                    Sampler::Euler
                } else {
                    Sampler::EulerAncestral
                }
            }
            SamplerChoice::DpmPP2M | SamplerChoice::DpmPP2MKarras => {
                choose("algorithm_type", &config.algorithm_type, &[("dpmsolver++", ())])?;
                let heun = choose("solver_type", &config.solver_type, &[("midpoint", false), ("heun", true)])?;
                if !(1..=2).contains(&config.solver_order) {
                    return Err(format!("solver_order {} is not supported (1 or 2)", config.solver_order));
                }
                unsupported.extend([
                    ("use_lu_lambdas", config.use_lu_lambdas == Some(true)),
                    ("use_flow_sigmas", config.use_flow_sigmas == Some(true)),
                    ("lambda_min_clipped", config.lambda_min_clipped.is_some_and(|l| l > f64::MIN)),
                    ("variance_type", config.variance_type.is_some()),
                ]);
                Sampler::DpmSolver {
                    order: config.solver_order,
                    heun,
                    karras: choice == SamplerChoice::DpmPP2MKarras,
                    lower_order_final: config.lower_order_final,
                    euler_at_final: config.euler_at_final,
                }
            }
            SamplerChoice::Ddim => Sampler::Ddim {
                clip: config.clip_sample.unwrap_or(true).then_some(config.clip_sample_range as f32),
                final_alpha: 0.0, // set below from ᾱ
            },
        };
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(format!("{field} is not supported yet"));
        }
        let beta_schedule = choose(
            "beta_schedule",
            &config.beta_schedule,
            &[("linear", BetaSchedule::Linear), ("scaled_linear", BetaSchedule::ScaledLinear)],
        )?;
        let prediction = choose(
            "prediction_type",
            &config.prediction_type,
            &[("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction), ("sample", PredictionType::Sample)],
        )?;
        if sampler == Sampler::EulerAncestral && prediction == PredictionType::Sample {
            return Err("prediction_type \"sample\" is not supported by Euler a (diffusers has none either)".into());
        }
        let default_spacing = if choice == SamplerChoice::Ddim { "leading" } else { "linspace" };
        let spacing = match spacing {
            Some(spacing) => spacing,
            None => {
                let name = config.timestep_spacing.as_deref().unwrap_or(default_spacing);
                name.parse().map_err(|_| not_supported("timestep_spacing", name, TimestepSpacing::VARIANTS))?
            }
        };
        let sigma_min = choose("final_sigmas_type", &config.final_sigmas_type, &[("zero", false), ("sigma_min", true)])?;
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(format!("num_train_timesteps {n} must be at least 2"));
        }

        let betas: Vec<f32> = match beta_schedule {
            BetaSchedule::Linear => torch_linspace(config.beta_start as f32, config.beta_end as f32, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace(config.beta_start.sqrt() as f32, config.beta_end.sqrt() as f32, n).into_iter().map(|b| b * b).collect()
            }
        };
        // torch's CPU cumprod accumulates float32 in double and rounds each output.
        let mut product = 1f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|beta| {
                product *= (1.0 - beta) as f64;
                product as f32
            })
            .collect();
        let train_sigmas: Vec<f32> = alphas_cumprod.iter().map(|&acp| ((1.0 - acp) / acp).sqrt()).collect();
        let sampler = match sampler {
            Sampler::Ddim { clip, .. } => {
                Sampler::Ddim { clip, final_alpha: if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] } }
            }
            sampler => sampler,
        };
        let final_sigma = if sigma_min { train_sigmas[0] } else { 0.0 };
        Ok(Scheduler { sampler, alphas_cumprod, train_sigmas, spacing, steps_offset: config.steps_offset, prediction, final_sigma })
    }

    /// The sampler's name as AUTOMATIC1111 writes it in a PNG's parameters ("DPM++ 2M Karras").
    pub fn name(&self) -> &'static str {
        match self.sampler {
            Sampler::Euler => "Euler",
            Sampler::EulerAncestral => "Euler a",
            Sampler::DpmSolver { order: 1, .. } => "DPM++ 1S",
            Sampler::DpmSolver { karras: true, .. } => "DPM++ 2M Karras",
            Sampler::DpmSolver { .. } => "DPM++ 2M",
            Sampler::Ddim { .. } => "DDIM",
        }
    }

    /// The full schedule of a `steps`-step run from pure noise (diffusers' `set_timesteps(steps)`).
    ///
    /// It usually has `steps` steps, but diffusers' "trailing" spacing yields one more for some
    /// step counts (61, 103, ...: numpy's `arange` overshoots by one element, ending on timestep
    /// -1) and its pipelines run that extra step; so does this schedule.
    pub fn timesteps(&self, steps: usize) -> Result<Schedule> {
        let full = self.plan(steps)?;
        Ok(self.part(&full, 0, full.timesteps.len()))
    }

    /// The base model's part of an ensemble of experts: `StableDiffusionXLPipeline(...,
    /// denoising_end=fraction)` (or the img2img pipeline with it) runs the steps of `schedule`
    /// whose timestep is at least `round(n_train * (1 - fraction))` and hands over latents at
    /// noise level `sigmas[len]`.
    pub fn denoising_end(&self, mut schedule: Schedule, fraction: f64) -> Result<Schedule> {
        let cutoff = self.cutoff("denoising_end", fraction)?;
        let count = schedule.timesteps.iter().filter(|&&t| t as f64 >= cutoff).count();
        if count == 0 {
            return Err(Error::InvalidParameter(format!(
                "denoising_end {fraction} leaves the base no step of its {}",
                schedule.num_steps()
            )));
        }
        schedule.timesteps.truncate(count);
        schedule.sigmas.truncate(count + 1);
        schedule.steps.truncate(count);
        Ok(schedule)
    }

    /// The refiner's part of an ensemble of experts: `StableDiffusionXLImg2ImgPipeline(...,
    /// denoising_start=fraction)` runs the last steps, those whose timestep is below the cutoff.
    ///
    /// diffusers 0.42 pins the scheduler's `begin_index` to the first of them, so the first
    /// refiner step uses the sigma of its own timestep — the same sigma the base's last step
    /// landed on when both use the same fraction; no noise is added (every sampler here has
    /// diffusers' `order` 1, so its order-2 adjustment does not apply). A multistep sampler starts
    /// afresh (first order), as the refiner pipeline's own scheduler does.
    pub fn denoising_start(&self, steps: usize, fraction: f64) -> Result<Schedule> {
        let full = self.plan(steps)?;
        let cutoff = self.cutoff("denoising_start", fraction)?;
        let count = full.timesteps.iter().filter(|&&t| (t as f64) < cutoff).count();
        if count == 0 {
            return Err(Error::InvalidParameter(format!("denoising_start {fraction} with {steps} steps leaves the refiner no step")));
        }
        Ok(self.part(&full, full.timesteps.len() - count, count))
    }

    /// img2img without `denoising_start`: the last `int(steps * strength)` steps (diffusers'
    /// `get_timesteps`). The image latents are noised with [`Schedule::add_noise`] first.
    pub fn img2img(&self, steps: usize, strength: f64) -> Result<Schedule> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::InvalidParameter(format!("strength {strength} must be in (0, 1]")));
        }
        let full = self.plan(steps)?;
        let count = ((steps as f64 * strength) as usize).min(steps);
        if count == 0 {
            return Err(Error::InvalidParameter(format!("strength {strength} with {steps} steps leaves no denoising step")));
        }
        // Everything after the skipped steps, including the extra "trailing" step if any.
        let begin = steps - count;
        Ok(self.part(&full, begin, full.timesteps.len() - begin))
    }

    /// diffusers' `discrete_timestep_cutoff = int(round(n_train - fraction * n_train))`.
    fn cutoff(&self, name: &str, fraction: f64) -> Result<f64> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::InvalidParameter(format!("{name} {fraction} must be in (0, 1)")));
        }
        let n_train = self.train_sigmas.len() as f64;
        Ok((n_train - fraction * n_train).round_ties_even())
    }

    /// The timesteps and noise levels of a `steps`-step run, as the class's `set_timesteps`.
    fn plan(&self, steps: usize) -> Result<Plan> {
        let n_train = self.train_sigmas.len();
        if steps == 0 || steps > n_train {
            return Err(Error::InvalidParameter(format!("the number of inference steps must be in 1..={n_train} (got {steps})")));
        }
        // numpy.arange(n_train, 0, -n_train / steps).round() - 1: arange sizes its output as
        // ceil(n_train / ratio) and fills it with first + i * (second - first).
        let trailing = || {
            let ratio = n_train as f64 / steps as f64;
            let first = n_train as f64;
            let delta = (first - ratio) - first;
            let len = (-first / -ratio).ceil() as usize;
            (0..len).map(|i| (first + i as f64 * delta).round_ties_even() - 1.0).collect::<Vec<f64>>()
        };
        let last = (n_train - 1) as f64;
        let timesteps: Vec<f64> = match (self.sampler, self.spacing) {
            (_, TimestepSpacing::Trailing) => trailing(),
            // DPM-Solver spaces steps + 1 points and drops the last (timestep 0).
            (Sampler::DpmSolver { .. }, TimestepSpacing::Linspace) => {
                (1..=steps).rev().map(|i| (numpy_linspace(last, steps + 1, i)).round_ties_even()).collect()
            }
            (Sampler::DpmSolver { .. }, TimestepSpacing::Leading) => {
                let ratio = n_train / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + self.steps_offset) as f64).collect()
            }
            // numpy.linspace(0, n_train - 1, steps) in float64 (its last value set exactly),
            // reversed; DDIM rounds to integers, Euler keeps the fractions.
            (Sampler::Ddim { .. }, TimestepSpacing::Linspace) => (0..steps).rev().map(|i| numpy_linspace(last, steps, i).round_ties_even()).collect(),
            (_, TimestepSpacing::Linspace) => (0..steps).rev().map(|i| numpy_linspace(last, steps, i) as f32 as f64).collect(),
            (_, TimestepSpacing::Leading) => {
                let ratio = n_train / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as f64).collect()
            }
        };
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = match self.sampler {
            Sampler::DpmSolver { karras: true, .. } => {
                let sigmas = karras_sigmas(self.train_sigmas[0] as f64, self.train_sigmas[n_train - 1] as f64, steps);
                let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
                (sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even()).collect(), sigmas.iter().map(|&s| s as f32).collect())
            }
            // The noise level σ = sqrt((1 - ᾱ) / ᾱ) of each DDIM timestep and of where it lands.
            Sampler::Ddim { .. } => {
                let sigmas = timesteps.iter().map(|&t| self.ddim_sigma(t as i64)).collect();
                (timesteps, sigmas)
            }
            _ => {
                let sigmas = timesteps.iter().map(|&t| interp(t, &self.train_sigmas) as f32).collect();
                (timesteps, sigmas)
            }
        };
        let landing = match self.sampler {
            Sampler::Ddim { final_alpha, .. } => {
                let prev = timesteps.last().copied().unwrap_or(0.0) as i64 - (n_train / steps) as i64;
                if prev >= 0 { self.ddim_sigma(prev) } else { ((1.0 - final_alpha) / final_alpha).sqrt() }
            }
            _ => self.final_sigma,
        };
        sigmas.push(landing);
        Ok(Plan { timesteps: timesteps.iter().map(|&t| t as f32).collect(), sigmas, steps })
    }

    /// ᾱ of a DDIM timestep; a negative one (the extra "trailing" step) indexes from the end, as
    /// torch's `alphas_cumprod[-1]` does in diffusers.
    fn ddim_alpha(&self, t: i64) -> f32 {
        let n = self.alphas_cumprod.len() as i64;
        self.alphas_cumprod[t.rem_euclid(n) as usize]
    }

    fn ddim_sigma(&self, t: i64) -> f32 {
        let acp = self.ddim_alpha(t);
        ((1.0 - acp) / acp).sqrt()
    }

    /// Steps `begin..begin + count` of a full plan as a fresh scheduler runs them.
    fn part(&self, full: &Plan, begin: usize, count: usize) -> Schedule {
        let sigmas = full.sigmas[begin..=begin + count].to_vec();
        let max_sigma = full.sigmas.iter().copied().fold(0f32, f32::max);
        let init_noise_sigma = match self.sampler {
            // diffusers scales the initial noise by sqrt(σ_max² + 1) for "leading" spacing only.
            Sampler::Euler | Sampler::EulerAncestral if self.spacing == TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
            Sampler::Euler | Sampler::EulerAncestral => max_sigma,
            Sampler::DpmSolver { .. } | Sampler::Ddim { .. } => 1.0,
        };
        let steps = (0..count).map(|i| self.step(full, begin, i)).collect();
        let sigma = sigmas[0] as f64;
        let add_noise = match self.sampler {
            Sampler::Euler | Sampler::EulerAncestral => (1.0, sigma as f32),
            Sampler::DpmSolver { .. } => vp(sigma),
            Sampler::Ddim { .. } => {
                let acp = self.ddim_alpha(full.timesteps[begin] as i64) as f64;
                (acp.sqrt() as f32, (1.0 - acp).sqrt() as f32)
            }
        };
        let variance_preserving = !matches!(self.sampler, Sampler::Euler | Sampler::EulerAncestral);
        Schedule { timesteps: full.timesteps[begin..begin + count].to_vec(), sigmas, init_noise_sigma, begin_index: begin, add_noise, variance_preserving, steps }
    }

    /// Step `i` of the part starting at `begin` of a full plan.
    fn step(&self, full: &Plan, begin: usize, i: usize) -> Step {
        let k = begin + i;
        let (sigma, next) = (full.sigmas[k] as f64, full.sigmas[k + 1] as f64);
        let s2 = sigma * sigma + 1.0;
        match self.sampler {
            Sampler::Euler | Sampler::EulerAncestral => {
                // Euler a steps deterministically down to σ_down and adds noise up to σ_next.
                let (target, noise) = if self.sampler == Sampler::EulerAncestral {
                    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                    ((next * next - up * up).sqrt(), Some(up as f32))
                } else {
                    (next, None)
                };
                let dt = target - sigma;
                // diffusers computes the ODE derivative d = (x - x0) / σ and steps x + dt·d:
                // epsilon: x0 = x - σ ε, d = ε; v_prediction: x0 = x / (σ² + 1) - σ v / sqrt(σ² + 1);
                // sample: x0 = model_output.
                let (latents, prediction) = match self.prediction {
                    PredictionType::Epsilon => (1.0, dt),
                    PredictionType::VPrediction => (1.0 + dt * sigma / s2, dt / s2.sqrt()),
                    PredictionType::Sample => (1.0 + dt / sigma, -dt / sigma),
                };
                let denoised = match self.prediction {
                    PredictionType::Epsilon => (1.0, -sigma),
                    PredictionType::VPrediction => (1.0 / s2, -sigma / s2.sqrt()),
                    PredictionType::Sample => (0.0, 1.0),
                };
                Step {
                    input_scale: (1.0 / s2.sqrt()) as f32,
                    denoised: pair(denoised),
                    clip: None,
                    update: Update { latents: latents as f32, prediction: prediction as f32, noise, ..Update::default() },
                }
            }
            Sampler::DpmSolver { order, heun, lower_order_final, euler_at_final, .. } => {
                let (alpha_s, sigma_s) = vp(sigma);
                let denoised = match self.prediction {
                    PredictionType::Epsilon => (s2.sqrt(), -sigma),
                    PredictionType::VPrediction => (alpha_s as f64, -(sigma_s as f64)),
                    PredictionType::Sample => (0.0, 1.0),
                };
                let n_steps = full.timesteps.len();
                let last = k == n_steps - 1
                    && (euler_at_final || (lower_order_final && n_steps < 15) || self.final_sigma == 0.0);
                // With λ = log(α / σ_t) = -log σ: h = log(σ / σ_next), exp(-h) = σ_next / σ.
                let alpha_t = 1.0 / (next * next + 1.0).sqrt();
                let ratio = next / sigma; // exp(-h)
                let decay = alpha_t * (ratio - 1.0); // α_t (exp(-h) - 1)
                let latents = ratio * alpha_t * s2.sqrt(); // σ_t(next) / σ_t(sigma)
                let update = if order == 1 || i == 0 || last {
                    Update { latents: latents as f32, denoised: -decay as f32, ..Update::default() }
                } else {
                    let previous = full.sigmas[k - 1] as f64;
                    let h = (sigma / next).ln();
                    let r0 = (previous / sigma).ln() / h;
                    // D0 = m0, D1 = (m0 - m1) / r0.
                    let d1 = if heun { alpha_t * ((ratio - 1.0) / h + 1.0) } else { -0.5 * decay };
                    Update { latents: latents as f32, denoised: (-decay + d1 / r0) as f32, previous_denoised: (-d1 / r0) as f32, ..Update::default() }
                };
                Step { input_scale: 1.0, denoised: pair(denoised), clip: None, update }
            }
            Sampler::Ddim { clip, final_alpha } => {
                let t = full.timesteps[k] as i64;
                let prev = t - (self.train_sigmas.len() / full.steps) as i64;
                let acp = self.ddim_alpha(t) as f64;
                let acp_prev = if prev >= 0 { self.ddim_alpha(prev) } else { final_alpha } as f64;
                let (a, b) = (acp.sqrt(), (1.0 - acp).sqrt());
                // x = a x0 + b ε: the clean latents and the noise each model output implies.
                let (denoised, epsilon) = match self.prediction {
                    PredictionType::Epsilon => ((1.0 / a, -b / a), (0.0, 1.0)),
                    PredictionType::VPrediction => ((a, -b), (b, a)),
                    PredictionType::Sample => ((0.0, 1.0), (1.0 / b, -a / b)),
                };
                let direction = (1.0 - acp_prev).sqrt();
                Step {
                    input_scale: 1.0,
                    denoised: pair(denoised),
                    clip,
                    update: Update {
                        latents: (direction * epsilon.0) as f32,
                        prediction: (direction * epsilon.1) as f32,
                        denoised: acp_prev.sqrt() as f32,
                        ..Update::default()
                    },
                }
            }
        }
    }
}

/// A full run's timesteps and noise levels (one more level than timesteps: where the last lands).
struct Plan {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// The step count asked for (DDIM's step size is n_train / steps).
    steps: usize,
}

/// What one step computes from the latents x and the (guided) model output; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Factor on the latents fed to the UNet.
    pub input_scale: f32,
    /// x0 = denoised.0 · x + denoised.1 · out: the model's estimate of the clean latents (what
    /// previews show; diffusers' `pred_original_sample`).
    pub denoised: (f32, f32),
    /// Clamp x0 to ±clip (DDIM's `clip_sample`).
    pub clip: Option<f32>,
    pub update: Update,
}

/// The next latents as a combination of the step's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Update {
    pub latents: f32,
    pub prediction: f32,
    /// Weight of this step's (clamped) x0.
    pub denoised: f32,
    /// Weight of the previous step's x0 (multistep samplers).
    pub previous_denoised: f32,
    /// Some(scale) when the step draws fresh unit noise from the run's generator (ancestral
    /// samplers draw at every step, even where the scale is 0, as diffusers does).
    pub noise: Option<f32>,
}

impl Update {
    /// Whether the update reads this step's x0.
    pub fn uses_denoised(&self) -> bool {
        self.denoised != 0.0
    }
}

/// The steps of one denoising run (or of one part of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The UNet's timestep at each step.
    pub timesteps: Vec<f32>,
    /// `sigmas[i]` is the noise level σ of the latents entering step `i` (as x0 + σ·ε);
    /// `sigmas[num_steps()]` the level the last step lands on. One longer than `timesteps`.
    pub sigmas: Vec<f32>,
    /// Scale of the unit Gaussian noise that starts a text-to-image run (diffusers'
    /// `init_noise_sigma`, taken over the full schedule).
    pub init_noise_sigma: f32,
    /// Index of the first step in the full schedule (diffusers' `begin_index`).
    pub begin_index: usize,
    /// (a, b) of img2img's start: latents = a · image_latents + b · noise (the scheduler's `add_noise`
    /// at the first step's timestep).
    pub add_noise: (f32, f32),
    /// Whether `add_noise` scales the latents too (DPM-Solver, DDIM), or adds σ·ε (Euler).
    variance_preserving: bool,
    steps: Vec<Step>,
}

impl Schedule {
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// (a, b) of the scheduler's `add_noise` at the noise level step `k` starts from
    /// (`sigmas[k]`): what inpainting with an ordinary UNet noises the original's latents to
    /// after each step. DDIM's ᾱ of a timestep is 1 / (σ² + 1), so one formula serves it too.
    pub fn add_noise_at(&self, k: usize) -> (f32, f32) {
        let sigma = self.sigmas[k] as f64;
        match self.variance_preserving {
            true => vp(sigma),
            false => (1.0, sigma as f32),
        }
    }

    /// Step `i`'s coefficients. Panics if `i >= num_steps()`.
    pub fn step(&self, i: usize) -> &Step {
        &self.steps[i]
    }
}

fn pair((a, b): (f64, f64)) -> (f32, f32) {
    (a as f32, b as f32)
}

/// (α, σ_t) = (1 / sqrt(σ² + 1), σ / sqrt(σ² + 1)): a VE noise level in the VP parametrisation.
fn vp(sigma: f64) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha as f32, (sigma * alpha) as f32)
}

/// Element `i` of numpy.linspace(0, last, n) in float64: `i * step`, the last set exactly.
fn numpy_linspace(last: f64, n: usize, i: usize) -> f64 {
    if i > 0 && i == n - 1 {
        last
    } else {
        i as f64 * (last / (n - 1).max(1) as f64)
    }
}

/// The Karras et al. (2022) noise levels from σ_max down to σ_min (ρ = 7), as diffusers'
/// `_convert_to_karras` in float64.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps).map(|i| (max_inv + numpy_linspace(1.0, steps, i) * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a noise level, interpolating
/// log σ linearly between the two training timesteps around it.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // The last index whose log σ is <= log_sigma (0 when none), at most n - 2.
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The option of `options` named `value`, or an error naming the field and the accepted values.
fn choose<T: Copy>(field: &str, value: &str, options: &[(&str, T)]) -> std::result::Result<T, String> {
    options.iter().find(|(name, _)| *name == value).map(|&(_, option)| option).ok_or_else(|| {
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        not_supported(field, value, &names)
    })
}

fn not_supported(field: &str, value: &str, names: &[&str]) -> String {
    format!("{field} \"{value}\" is not supported (expected one of: {})", names.join(", "))
}

/// torch.linspace(start, end, n, dtype=float32) on the CPU: float32 arithmetic from both ends
/// towards the middle. The x86 build fuses `start + step * i` into one multiply-add, so this does too.
fn torch_linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n).map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) }).collect()
}

/// numpy.interp(t, arange(len(ys)), ys) in float64, clamped to the end values outside the range.
fn interp(t: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if t <= 0.0 {
        return ys[0] as f64;
    }
    if t >= last as f64 {
        return ys[last] as f64;
    }
    let j = t.floor() as usize;
    let (y0, y1) = (ys[j] as f64, ys[j + 1] as f64);
    if t == j as f64 {
        y0
    } else {
        (y1 - y0) * (t - j as f64) + y0
    }
}
