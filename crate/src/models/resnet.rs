//! diffusers' ResnetBlock2D, Upsample2D and Downsample2D (models/resnet.py, upsampling.py,
//! downsampling.py), shared by the UNet and the VAE.

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::models::{Conv2d, GroupNorm, Linear};
use crate::ops::Addend;
use crate::weights::Vars;

/// ResnetBlock2D with the "default" time-embedding norm, output_scale_factor 1 and a 1x1
/// `conv_shortcut` when the channel count changes (dropout is inference-time identity):
/// h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb)) per channel];
/// out = shortcut(x) + conv2(silu(norm2(h))).
/// Both additions happen in the convolutions' epilogues: conv1's bias is folded into
/// time_emb_proj's at load, whose output becomes conv1's bias per image and channel.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    in_channels: usize,
}

impl ResnetBlock2D {
    /// Its two group norms (tiled decoding sets where they take their statistics).
    pub(crate) fn norms(&self) -> [&GroupNorm; 2] {
        [&self.norm1, &self.norm2]
    }

    pub async fn load(vb: &Vars<'_>, in_channels: usize, out_channels: usize, temb_channels: Option<usize>, groups: usize, eps: f64) -> Result<Self> {
        let norm1 = GroupNorm::load(&vb.pp("norm1"), in_channels, groups, eps).await?;
        let conv1 = Conv2d::load(&vb.pp("conv1"), in_channels, out_channels, 3, 1, 1).await?;
        let time_emb_proj = match temb_channels {
            Some(t) => {
                let mut proj = Linear::load(&vb.pp("time_emb_proj"), t, out_channels, true).await?;
                proj.fold_bias(vb.gpu(), conv1.bias())?;
                Some(proj)
            }
            None => None,
        };
        let norm2 = GroupNorm::load(&vb.pp("norm2"), out_channels, groups, eps).await?;
        let conv2 = Conv2d::load(&vb.pp("conv2"), out_channels, out_channels, 3, 1, 1).await?;
        let conv_shortcut = match in_channels != out_channels {
            true => Some(Conv2d::load(&vb.pp("conv_shortcut"), in_channels, out_channels, 1, 1, 0).await?),
            false => None,
        };
        Ok(ResnetBlock2D { norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut, in_channels })
    }

    /// x [B, C, H, W]; temb [B, temb_channels]: the time embedding after the SiLU that diffusers
    /// applies in every resnet (the same for all of them: the UNet applies it once); time_emb_proj
    /// is applied here. A block loaded with temb_channels ignores a missing temb (diffusers'
    /// `temb=None`); a block without time_emb_proj ignores a given one.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        if x.shape().len() != 4 || x.shape()[1] != self.in_channels {
            return Err(crate::error::Error::InvalidParameter(format!(
                "ResnetBlock2D: expected [batch, {}, height, width], got {:?}",
                self.in_channels,
                x.shape()
            )));
        }
        let h = self.norm1.forward(gpu, x, true)?;
        let h = match (&self.time_emb_proj, temb) {
            // Per image and channel: the projection with conv1's bias folded in.
            (Some(proj), Some(temb)) => self.conv1.forward_add(gpu, &h, Addend::bias(Some(&proj.forward(gpu, temb)?)))?,
            _ => self.conv1.forward(gpu, &h)?,
        };
        let h = self.norm2.forward(gpu, &h, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(gpu, x)?,
            None => x.clone(),
        };
        self.conv2.forward_add(gpu, &h, Addend { bias: Some(self.conv2.bias()), residual: Some(&shortcut) })
    }
}

/// Upsample2D with use_conv: nearest-neighbour ×2 (or to an explicit size), then a 3x3 `conv`
/// (padding 1).
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub async fn load(vb: &Vars<'_>, channels: usize) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1).await? })
    }

    /// `size` is diffusers' `output_size`: the UNet passes the next skip's [h, w] so that latents
    /// that are not a multiple of 2^levels line up with their skips.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, size: Option<[usize; 2]>) -> Result<Tensor> {
        let up = match size {
            Some([h, w]) => gpu.upsample_nearest(x, h, w)?,
            None => gpu.upsample_nearest2x(x)?,
        };
        self.conv.forward(gpu, &up)
    }
}

/// Downsample2D with use_conv: a 3x3 stride-2 `conv`. With padding 0 (the VAE encoder) diffusers
/// first pads the input by (left 0, right 1, top 0, bottom 1).
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub async fn load(vb: &Vars<'_>, channels: usize, padding: usize) -> Result<Self> {
        let conv = Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding).await?;
        Ok(Downsample2D { conv: if padding == 0 { conv.with_padding([0, 1, 0, 1]) } else { conv } })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(gpu, x)
    }
}
