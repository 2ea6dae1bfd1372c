//! diffusers' `EulerDiscreteScheduler` (SDXL's scheduler) as plain numbers: the timesteps, the
//! noise levels and the per-step coefficients that the GPU applies, for a whole text-to-image run,
//! for the base and refiner halves of an SDXL ensemble of experts, and for img2img.
//!
//! The sigmas are computed in float32 the way diffusers does (torch's float32 `linspace` for the
//! betas, a cumulative product accumulated in double, numpy's float64 `interp`), so they match
//! diffusers within one float32 ulp: torch's own float32 `sqrt` is not correctly rounded.
//!
//! Sampling loop for one step `i` of a [`Schedule`]:
//! ```text
//! eps = unet(x * schedule.input_scale(i), schedule.timesteps[i], ...)   // + guidance
//! (a, b) = schedule.step_coefficients(i)
//! x = a * x + b * eps
//! ```

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::weights::{read_json, Source};

/// `scheduler/scheduler_config.json`, with diffusers' field names and defaults (diffusers 0.42).
/// Values this engine does not implement are rejected when the scheduler is built.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The scheduler class the model folder asks for; only checked by [`EulerDiscreteScheduler::load`].
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
    /// Only "linear".
    pub interpolation_type: String,
    /// diffusers types these `bool | None`; only false/null is supported.
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// "leading", "trailing" or "linspace".
    pub timestep_spacing: String,
    /// Only "discrete".
    pub timestep_type: String,
    pub steps_offset: usize,
    /// Only false.
    pub rescale_betas_zero_snr: bool,
    /// "zero" or "sigma_min": the noise level the last step lands on.
    pub final_sigmas_type: String,
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
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            timestep_spacing: "linspace".into(),
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: "zero".into(),
        }
    }
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

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`, see
/// table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    /// Noise level sqrt((1 - ᾱ_t) / ᾱ_t) of each training timestep t, in float32 like diffusers.
    train_sigmas: Vec<f32>,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction: PredictionType,
    /// Where the last step lands: 0, or the smallest training sigma ("sigma_min").
    final_sigma: f32,
}

impl EulerDiscreteScheduler {
    /// Reads `path` (normally `scheduler/scheduler_config.json`) from a model folder.
    pub async fn load(source: &impl Source, path: &str) -> Result<EulerDiscreteScheduler> {
        let config: SchedulerConfig = read_json(source, path).await?;
        let config_error = |message| Error::Config { path: source.describe(path), message };
        // A folder configured for another scheduler would silently denoise differently from diffusers.
        if let Some(class) = config.class_name.as_deref().filter(|&c| c != "EulerDiscreteScheduler") {
            return Err(config_error(format!("_class_name \"{class}\" is not supported (only EulerDiscreteScheduler)")));
        }
        EulerDiscreteScheduler::build(&config).map_err(config_error)
    }

    /// Builds the scheduler from a config already in memory (its `_class_name` is not checked).
    pub fn from_config(config: &SchedulerConfig) -> Result<EulerDiscreteScheduler> {
        EulerDiscreteScheduler::build(config).map_err(|message| Error::Config { path: "scheduler config".into(), message })
    }

    fn build(config: &SchedulerConfig) -> std::result::Result<EulerDiscreteScheduler, String> {
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
        let spacing = choose(
            "timestep_spacing",
            &config.timestep_spacing,
            &[("leading", TimestepSpacing::Leading), ("trailing", TimestepSpacing::Trailing), ("linspace", TimestepSpacing::Linspace)],
        )?;
        let sigma_min = choose("final_sigmas_type", &config.final_sigmas_type, &[("zero", false), ("sigma_min", true)])?;
        choose("interpolation_type", &config.interpolation_type, &[("linear", ())])?;
        choose("timestep_type", &config.timestep_type, &[("discrete", ())])?;
        for (field, set) in [
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("rescale_betas_zero_snr", Some(config.rescale_betas_zero_snr)),
        ] {
            if set == Some(true) {
                return Err(format!("{field} = true is not supported yet"));
            }
        }
        if config.trained_betas.is_some() {
            return Err("trained_betas is not supported yet (must be null)".into());
        }
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
        let mut alphas_cumprod = 1f64;
        let train_sigmas: Vec<f32> = betas
            .iter()
            .map(|beta| {
                alphas_cumprod *= (1.0 - beta) as f64;
                let acp = alphas_cumprod as f32;
                ((1.0 - acp) / acp).sqrt()
            })
            .collect();
        let final_sigma = if sigma_min { train_sigmas[0] } else { 0.0 };
        Ok(EulerDiscreteScheduler { train_sigmas, spacing, steps_offset: config.steps_offset, prediction, final_sigma })
    }

    /// The full schedule of a `steps`-step run from pure noise (diffusers' `set_timesteps(steps)`).
    ///
    /// It usually has `steps` steps, but diffusers' "trailing" spacing yields one more for some
    /// step counts (61, 103, ...: numpy's `arange` overshoots by one element, ending on timestep
    /// -1) and its pipelines run that extra step; so does this schedule.
    pub fn timesteps(&self, steps: usize) -> Result<Schedule> {
        if steps == 0 {
            return Err(Error::InvalidParameter("the number of inference steps must be at least 1".into()));
        }
        let n_train = self.train_sigmas.len();
        let timesteps: Vec<f32> = match self.spacing {
            // numpy.linspace(0, n_train - 1, steps) in float64 (its last value set exactly), reversed.
            // A single step is timestep 0, the least noisy one: diffusers does the same.
            TimestepSpacing::Linspace => {
                let last = (n_train - 1) as f64;
                let step = last / (steps - 1).max(1) as f64;
                (0..steps).rev().map(|i| if i > 0 && i == steps - 1 { last as f32 } else { (i as f64 * step) as f32 }).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n_train / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as f32).collect()
            }
            // numpy.arange(n_train, 0, -n_train / steps).round() - 1: arange sizes its output as
            // ceil(n_train / ratio) and fills it with first + i * (second - first).
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                let first = n_train as f64;
                let delta = (first - ratio) - first;
                let len = (-first / -ratio).ceil() as usize;
                (0..len).map(|i| (first + i as f64 * delta).round_ties_even() as f32 - 1.0).collect()
            }
        };
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t as f64, &self.train_sigmas) as f32).collect();
        sigmas.push(self.final_sigma);

        let max_sigma = sigmas.iter().copied().fold(0f32, f32::max);
        // diffusers scales the initial noise by sqrt(σ_max² + 1) for "leading" spacing only.
        let init_noise_sigma = match self.spacing {
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
            TimestepSpacing::Trailing | TimestepSpacing::Linspace => max_sigma,
        };
        Ok(Schedule { timesteps, sigmas, init_noise_sigma, begin_index: 0, prediction: self.prediction })
    }

    /// The base model's part of an ensemble of experts: `StableDiffusionXLPipeline(...,
    /// denoising_end=fraction)` runs the steps whose timestep is at least
    /// `round(n_train * (1 - fraction))` and hands over latents at noise level `sigmas[len]`.
    pub fn denoising_end(&self, steps: usize, fraction: f64) -> Result<Schedule> {
        let full = self.timesteps(steps)?;
        let cutoff = self.cutoff("denoising_end", fraction)?;
        let count = full.timesteps.iter().filter(|&&t| t as f64 >= cutoff).count();
        if count == 0 {
            return Err(Error::InvalidParameter(format!("denoising_end {fraction} with {steps} steps leaves the base no step")));
        }
        Ok(full.part(0, count))
    }

    /// The refiner's part of an ensemble of experts: `StableDiffusionXLImg2ImgPipeline(...,
    /// denoising_start=fraction)` runs the last steps, those whose timestep is below the cutoff.
    ///
    /// diffusers 0.42 pins the scheduler's `begin_index` to the first of them, so the first
    /// refiner step uses the sigma of its own timestep — the same sigma the base's last step
    /// landed on when both use the same fraction; no noise is added (Euler is first order, so
    /// diffusers' order-2 adjustment does not apply).
    pub fn denoising_start(&self, steps: usize, fraction: f64) -> Result<Schedule> {
        let full = self.timesteps(steps)?;
        let cutoff = self.cutoff("denoising_start", fraction)?;
        let count = full.timesteps.iter().filter(|&&t| (t as f64) < cutoff).count();
        if count == 0 {
            return Err(Error::InvalidParameter(format!("denoising_start {fraction} with {steps} steps leaves the refiner no step")));
        }
        Ok(full.part(full.num_steps() - count, count))
    }

    /// img2img without `denoising_start`: the last `int(steps * strength)` steps (diffusers'
    /// `get_timesteps`). The image latents are noised to `start_sigma()` before the first step.
    pub fn img2img(&self, steps: usize, strength: f64) -> Result<Schedule> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::InvalidParameter(format!("strength {strength} must be in (0, 1]")));
        }
        let full = self.timesteps(steps)?;
        let count = ((steps as f64 * strength) as usize).min(steps);
        if count == 0 {
            return Err(Error::InvalidParameter(format!("strength {strength} with {steps} steps leaves no denoising step")));
        }
        // Everything after the skipped steps, including the extra "trailing" step if any.
        let begin = steps - count;
        Ok(full.part(begin, full.num_steps() - begin))
    }

    /// diffusers' `discrete_timestep_cutoff = int(round(n_train - fraction * n_train))`.
    fn cutoff(&self, name: &str, fraction: f64) -> Result<f64> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::InvalidParameter(format!("{name} {fraction} must be in (0, 1)")));
        }
        let n_train = self.train_sigmas.len() as f64;
        Ok((n_train - fraction * n_train).round_ties_even())
    }
}

/// The steps of one denoising run (or of one part of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The UNet's timestep at each step.
    pub timesteps: Vec<f32>,
    /// `sigmas[i]` is the noise level of the latents entering step `i`; `sigmas[num_steps()]` the
    /// level the last step lands on (0 at the end of a full run). One longer than `timesteps`.
    pub sigmas: Vec<f32>,
    /// Scale of the unit Gaussian noise that starts a text-to-image run: σ_max for "linspace" and
    /// "trailing" spacing, sqrt(σ_max² + 1) for "leading" (diffusers' `init_noise_sigma`, taken
    /// over the full schedule).
    pub init_noise_sigma: f32,
    /// Index of the first step in the full schedule (diffusers' `begin_index`).
    pub begin_index: usize,
    prediction: PredictionType,
}

impl Schedule {
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The noise level of the latents entering the first step: img2img adds `noise * start_sigma()`
    /// to the image latents (diffusers' `add_noise` at `begin_index`).
    pub fn start_sigma(&self) -> f32 {
        self.sigmas[0]
    }

    /// Factor on the latents fed to the UNet at step `i`: 1 / sqrt(σ_i² + 1) (diffusers'
    /// `scale_model_input` divides by the square root). Panics if `i >= num_steps()`.
    pub fn input_scale(&self, i: usize) -> f32 {
        let sigma = self.sigmas[i];
        1.0 / (sigma * sigma + 1.0).sqrt()
    }

    /// `(a, b)` such that the Euler step from σ_i to σ_{i+1} is `x_next = a * x + b * model_output`,
    /// with `model_output` the (guided) UNet prediction at step `i`. diffusers computes the ODE
    /// derivative d = (x - x0) / σ and steps `x + (σ_{i+1} - σ_i) d`; with dt = σ_{i+1} - σ_i:
    /// - epsilon: x0 = x - σ ε, so d = ε: (1, dt)
    /// - v_prediction: x0 = x / (σ² + 1) - σ v / sqrt(σ² + 1), so d = σ x / (σ² + 1) + v / sqrt(σ² + 1)
    /// - sample: x0 = model_output, so d = (x - x0) / σ: (1 + dt / σ, -dt / σ)
    ///
    /// Panics if `i >= num_steps()`.
    pub fn step_coefficients(&self, i: usize) -> (f32, f32) {
        let sigma = self.sigmas[i];
        let dt = self.sigmas[i + 1] - sigma;
        let (sigma, dt64) = (sigma as f64, dt as f64);
        match self.prediction {
            PredictionType::Epsilon => (1.0, dt),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                ((1.0 + dt64 * sigma / s2) as f32, (dt64 / s2.sqrt()) as f32)
            }
            PredictionType::Sample => ((1.0 + dt64 / sigma) as f32, (-dt64 / sigma) as f32),
        }
    }

    /// `(a, b)` such that the model's estimate of the clean latents at step `i` is
    /// `x0 = a * x + b * model_output` (the `pred_original_sample` of diffusers' Euler step): what
    /// previews show. Panics if `i >= num_steps()`.
    pub fn denoised_coefficients(&self, i: usize) -> (f32, f32) {
        let sigma = self.sigmas[i] as f64;
        let s2 = sigma * sigma + 1.0;
        let (a, b) = match self.prediction {
            PredictionType::Epsilon => (1.0, -sigma),
            PredictionType::VPrediction => (1.0 / s2, -sigma / s2.sqrt()),
            PredictionType::Sample => (0.0, 1.0),
        };
        (a as f32, b as f32)
    }

    /// Steps `begin..begin + count` of a full schedule, with their landing sigma.
    fn part(&self, begin: usize, count: usize) -> Schedule {
        Schedule {
            timesteps: self.timesteps[begin..begin + count].to_vec(),
            sigmas: self.sigmas[begin..=begin + count].to_vec(),
            init_noise_sigma: self.init_noise_sigma,
            begin_index: begin,
            prediction: self.prediction,
        }
    }
}

/// The option of `options` named `value`, or an error naming the field and the accepted values.
fn choose<T: Copy>(field: &str, value: &str, options: &[(&str, T)]) -> std::result::Result<T, String> {
    options.iter().find(|(name, _)| *name == value).map(|&(_, option)| option).ok_or_else(|| {
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        format!("{field} \"{value}\" is not supported (expected one of: {})", names.join(", "))
    })
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
