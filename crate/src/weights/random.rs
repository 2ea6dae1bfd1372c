//! Random weights generated on the GPU, for benchmarks of full-size models without a checkpoint:
//! [`RandomTensors`] answers every tensor a model asks for, at the shape the config implies, with
//! [`HostTensor::Random`], and [`super::Vars`] fills a GPU buffer from a hash of the seed and the
//! tensor's name (nothing is uploaded, so a 2.6 B-parameter UNet loads in seconds). Values follow
//! PyTorch's default init (uniform in ±1/√fan_in; norms near 1, biases near 0), so activations
//! stay finite through a whole network. Quantized matrices get random codes with one block scale
//! per matrix spanning the same range. Optional tensors are absent.

use std::ops::Range;

use super::{Fetch, HostTensor, TensorInfo, TensorSource};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::quant::{QuantFormat, QuantTensor, Weight, BLOCK};

/// Every tensor of one component, random.
pub struct RandomTensors {
    pub seed: u32,
    pub component: String,
}

impl TensorSource for RandomTensors {
    fn location(&self) -> String {
        format!("random weights (seed {}) of {}", self.seed, self.component)
    }
    fn names(&self) -> Vec<&str> {
        Vec::new()
    }
    fn info(&self, _: &str) -> Option<&TensorInfo> {
        None
    }
    fn read<'a>(&'a self, _: &'a str, _: &'a [usize], _: Range<usize>) -> Fetch<'a, HostTensor> {
        Box::pin(async move { Ok(HostTensor::Random(self.seed)) })
    }
}

/// (center, half-width) of a tensor's uniform distribution.
fn distribution(name: &str, shape: &[usize]) -> (f32, f32) {
    let fan_in: usize = shape.iter().skip(1).product();
    if name.ends_with(".bias") {
        (0.0, 0.02)
    } else if name.contains("norm") {
        (1.0, 0.02)
    } else {
        (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
    }
}

/// FNV-1a of the name, mixed with the model's seed.
fn tensor_seed(seed: u32, name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5 ^ seed, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

pub fn tensor(gpu: &Gpu, seed: u32, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let t = gpu.empty_weight(shape, dtype, name)?;
    let (center, scale) = distribution(name, shape);
    gpu.fill_uniform(&t, tensor_seed(seed, name), center, scale)?;
    Ok(t)
}

/// The same distribution on the CPU (small tensors the loaders split or reshape there).
pub fn host(seed: u32, name: &str, shape: &[usize]) -> Vec<f32> {
    let (center, scale) = distribution(name, shape);
    let mut state = tensor_seed(seed, name) as u64;
    (0..shape.iter().product::<usize>())
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let unit = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            center + scale * unit
        })
        .collect()
}

/// A weight matrix [rows, cols...], dense in `dtype` or in `format` with random codes.
pub fn matrix(gpu: &Gpu, seed: u32, name: &str, shape: &[usize], format: Option<QuantFormat>, dtype: DType) -> Result<Weight> {
    let Some(format) = format else {
        return Ok(Weight::Dense(tensor(gpu, seed, name, shape, dtype)?));
    };
    if format.is_k() {
        return Err(Error::InvalidParameter(format!("{name}: random weights come as q8_0, q4_0 or q4_1, not {}", format.name())));
    }
    let rows = shape.first().copied().unwrap_or(1);
    let cols: usize = shape.iter().skip(1).product();
    let blocks = rows * cols.div_ceil(BLOCK);
    let (_, bound) = distribution(name, shape);
    let half = |v: f32| half::f16::from_f32(v).to_bits() as u32;
    // Codes are uniform over their range: q8 -128..127, q4 0..15.
    let (scale_words, scale) = match format {
        QuantFormat::Q8_0 => (blocks.div_ceil(2), half(bound / 127.0) * 0x1_0001),
        QuantFormat::Q4_0 => (blocks.div_ceil(2), half(bound / 8.0) * 0x1_0001),
        _ => (blocks, half(2.0 * bound / 15.0) | half(-bound) << 16), // Q4_1
    };
    let data = gpu.empty_weight(&[rows, cols.div_ceil(BLOCK) * format.words_per_block()], DType::U32, name)?;
    gpu.fill_words(&data, tensor_seed(seed, name), None)?;
    let scales = gpu.empty_weight(&[scale_words], DType::U32, name)?;
    gpu.fill_words(&scales, 0, Some(scale))?;
    Ok(Weight::Quant(QuantTensor { format, rows, cols, data, scales: Some(scales) }))
}
