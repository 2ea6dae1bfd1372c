//! Model building blocks with their weights, mirroring torch modules; components in submodules.

pub mod clip;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::quant::Weight;
use crate::weights::{Source, Weights};

/// nn.Linear: weight [out, in] (dense or quantized), optional bias [out].
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub async fn load<S: Source>(gpu: &Gpu, w: &Weights<'_, S>, prefix: &str, inputs: usize, outputs: usize, bias: bool) -> Result<Linear> {
        let weight = w.matrix(gpu, &format!("{prefix}.weight"), &[outputs, inputs]).await?;
        let bias = match bias {
            true => Some(w.tensor(gpu, &format!("{prefix}.bias"), &[outputs]).await?),
            false => None,
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(weight) => gpu.linear(x, weight, self.bias.as_ref()),
            Weight::Quant(weight) => gpu.linear_q(x, weight, self.bias.as_ref()),
        }
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

/// nn.Conv2d with a square kernel (dense or quantized weight), stride and zero padding.
pub struct Conv2d {
    weight: Weight,
    kernel: usize,
    bias: Tensor,
    stride: usize,
    /// [top, bottom, left, right]
    padding: [usize; 4],
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub async fn load<S: Source>(
        gpu: &Gpu,
        w: &Weights<'_, S>,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: w.matrix(gpu, &format!("{prefix}.weight"), &[outputs, inputs, kernel, kernel]).await?,
            kernel,
            bias: w.tensor(gpu, &format!("{prefix}.bias"), &[outputs]).await?,
            stride,
            padding: [padding; 4],
        })
    }

    /// Replaces the symmetric padding by [top, bottom, left, right].
    pub fn with_padding(mut self, padding: [usize; 4]) -> Conv2d {
        self.padding = padding;
        self
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(weight) => gpu.conv2d_padded(x, weight, &self.bias, self.stride, self.padding),
            Weight::Quant(weight) => gpu.conv2d_q(x, weight, self.kernel, Some(&self.bias), self.stride, self.padding),
        }
    }
}

/// nn.GroupNorm over [batch, channels, ...], optionally fused with the SiLU that usually follows.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub async fn load<S: Source>(gpu: &Gpu, w: &Weights<'_, S>, prefix: &str, channels: usize, groups: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm {
            weight: w.tensor(gpu, &format!("{prefix}.weight"), &[channels]).await?,
            bias: w.tensor(gpu, &format!("{prefix}.bias"), &[channels]).await?,
            groups,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        gpu.group_norm(x, self.groups, &self.weight, &self.bias, self.eps, silu)
    }
}
