//! Model building blocks with their weights, mirroring torch modules; components in submodules.

pub mod clip;

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::weights::{Source, Weights};

/// nn.Linear: weight [out, in], optional bias [out].
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub async fn load<S: Source>(gpu: &Gpu, w: &Weights<'_, S>, prefix: &str, inputs: usize, outputs: usize, bias: bool) -> Result<Linear> {
        let weight = w.tensor(gpu, &format!("{prefix}.weight"), &[outputs, inputs]).await?;
        let bias = match bias {
            true => Some(w.tensor(gpu, &format!("{prefix}.bias"), &[outputs]).await?),
            false => None,
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        gpu.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// nn.LayerNorm over the last dimension.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub async fn load<S: Source>(gpu: &Gpu, w: &Weights<'_, S>, prefix: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: w.tensor(gpu, &format!("{prefix}.weight"), &[dim]).await?,
            bias: w.tensor(gpu, &format!("{prefix}.bias"), &[dim]).await?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        gpu.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
