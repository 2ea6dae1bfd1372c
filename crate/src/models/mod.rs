//! Model building blocks with their weights, mirroring torch modules; components in submodules.

pub mod clip;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;

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

/// nn.Conv2d with square kernel, stride and symmetric zero padding.
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
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
            weight: w.tensor(gpu, &format!("{prefix}.weight"), &[outputs, inputs, kernel, kernel]).await?,
            bias: w.tensor(gpu, &format!("{prefix}.bias"), &[outputs]).await?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        gpu.conv2d(x, &self.weight, &self.bias, self.stride, self.padding)
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
