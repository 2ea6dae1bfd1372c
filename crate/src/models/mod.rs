//! Model building blocks with their weights, mirroring torch modules; components in submodules.

pub mod clip;
pub mod resnet;
pub mod taesd;
pub mod transformer;
pub mod unet;
pub mod vae;

use std::cell::RefCell;

use crate::adapt::Slot;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::Addend;
use crate::quant::Weight;
use crate::weights::Vars;

/// Widest attention head a config may give. The attention kernel is generated for its head width,
/// unrolled over it (ops.rs `flash_prelude`): a config with heads 2^20 wide took more than 60 s
/// and 24 GB to compile. SDXL's heads are 64 wide; 256 leaves room for other models'.
pub const MAX_HEAD_DIM: usize = 256;

/// nn.Linear: weight [out, in] (dense or quantized), optional bias [out], and the LoRAs' side
/// path when they adapt it (crate::adapt).
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    lora: Slot,
}

impl Linear {
    pub async fn load(vb: &Vars<'_>, inputs: usize, outputs: usize, bias: bool) -> Result<Linear> {
        Linear::with_weight(vb, vb.matrix("weight", &[outputs, inputs]).await?, &[outputs, inputs], bias).await
    }

    /// A Linear over `weight` as loaded (of the file's `shape`: a 1x1 convolution's run as a
    /// Linear keeps its 4-D shape for LoRAs).
    pub async fn with_weight(vb: &Vars<'_>, weight: Weight, shape: &[usize], bias: bool) -> Result<Linear> {
        let bias = match bias {
            true => Some(vb.tensor("bias", &shape[..1]).await?),
            false => None,
        };
        Ok(Linear { weight, bias, lora: vb.lora_slot(shape) })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.forward_add(gpu, x, None)
    }

    /// The layer's output plus `residual` (a skip connection shaped as the output), added in the
    /// product's epilogue.
    pub fn forward_add(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let addend = Addend { bias: self.bias.as_ref(), residual };
        match &*self.lora.get() {
            Some(lora) => gpu.linear_add(x, &self.weight, Addend::residual(&lora.linear_delta(gpu, x, addend)?)),
            None => gpu.linear_add(x, &self.weight, addend),
        }
    }

    /// The projection followed by diffusers' GEGLU gate, fused (see `Gpu::linear_geglu`).
    pub fn forward_geglu(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let addend = Addend::bias(self.bias.as_ref());
        match &*self.lora.get() {
            Some(lora) => gpu.linear_geglu(x, &self.weight, Addend::residual(&lora.linear_delta(gpu, x, addend)?)),
            None => gpu.linear_geglu(x, &self.weight, addend),
        }
    }

    /// Adds `extra` [out] to the bias (at load: a following layer's bias folded in).
    pub fn fold_bias(&mut self, gpu: &Gpu, extra: &Tensor) -> Result<()> {
        self.bias = Some(match &self.bias {
            Some(bias) => gpu.add(bias, extra)?,
            None => extra.clone(),
        });
        Ok(())
    }
}

/// nn.LayerNorm over the last dimension.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub async fn load(vb: &Vars<'_>, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: vb.tensor("weight", &[dim]).await?, bias: vb.tensor("bias", &[dim]).await?, eps: eps as f32 })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        gpu.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// nn.Conv2d with a square kernel (dense or quantized weight), stride and zero padding, and the
/// LoRAs' side path when they adapt it.
pub struct Conv2d {
    weight: Weight,
    lora: Slot,
    kernel: usize,
    bias: Tensor,
    stride: usize,
    /// [top, bottom, left, right]
    padding: [usize; 4],
}

impl Conv2d {
    pub async fn load(vb: &Vars<'_>, inputs: usize, outputs: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
        let bias = vb.tensor("bias", &[outputs]).await?;
        Conv2d::with_bias(vb, inputs, outputs, kernel, stride, padding, bias).await
    }

    /// nn.Conv2d(bias=False), as a zero bias (which the kernel adds at no cost).
    pub async fn load_unbiased(vb: &Vars<'_>, inputs: usize, outputs: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
        let bias = vb.gpu().zeros_as(&[outputs], vb.dtype())?;
        Conv2d::with_bias(vb, inputs, outputs, kernel, stride, padding, bias).await
    }

    async fn with_bias(vb: &Vars<'_>, inputs: usize, outputs: usize, kernel: usize, stride: usize, padding: usize, bias: Tensor) -> Result<Conv2d> {
        let shape = [outputs, inputs, kernel, kernel];
        Ok(Conv2d {
            weight: vb.matrix("weight", &shape).await?,
            lora: vb.lora_slot(&shape),
            kernel,
            bias,
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
        self.forward_add(gpu, x, Addend::bias(Some(&self.bias)))
    }

    /// The convolution plus `addend` in its epilogue, whose bias (if any) replaces the layer's
    /// own: a resnet's time embedding per image and channel with this bias folded in
    /// (`Linear::fold_bias`), and a skip connection.
    pub fn forward_add(&self, gpu: &Gpu, x: &Tensor, addend: Addend) -> Result<Tensor> {
        match &*self.lora.get() {
            Some(lora) => {
                let delta = lora.conv2d_delta(gpu, x, self.kernel, addend, self.stride, self.padding)?;
                gpu.conv2d_add(x, &self.weight, self.kernel, Addend::residual(&delta), self.stride, self.padding)
            }
            None => gpu.conv2d_add(x, &self.weight, self.kernel, addend, self.stride, self.padding),
        }
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

/// nn.GroupNorm over [batch, channels, ...], optionally fused with the SiLU that usually follows.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
    statistics: RefCell<Statistics>,
}

/// Where a GroupNorm's statistics come from: its input (the module's definition), or the whole
/// image when a decoder runs tile by tile (`AutoencoderKL::decode_tiles`): a first pass over the
/// tiles records each tile's share, a second normalises every tile with the merged statistics.
enum Statistics {
    Own,
    /// Own statistics, and those of the tile's share (rows, cols as fractions of the input's
    /// height and width) recorded into the tile's slots of `slots` (allocated at first use).
    Record { slots: Option<Tensor>, tiles: usize, tile: usize, share: [f32; 4] },
    Merged(Tensor),
}

/// Statistics slots each tile records.
const SLOTS_PER_TILE: usize = 16;

impl GroupNorm {
    pub async fn load(vb: &Vars<'_>, channels: usize, groups: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm {
            weight: vb.tensor("weight", &[channels]).await?,
            bias: vb.tensor("bias", &[channels]).await?,
            groups,
            eps: eps as f32,
            statistics: RefCell::new(Statistics::Own),
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (groups, eps) = (self.groups, self.eps);
        match &mut *self.statistics.borrow_mut() {
            Statistics::Own => gpu.group_norm(x, groups, &self.weight, &self.bias, eps, silu),
            Statistics::Merged(slots) => gpu.group_norm_with(x, groups, &self.weight, &self.bias, eps, silu, slots),
            Statistics::Record { slots, tiles, tile, share } => {
                let y = gpu.group_norm(x, groups, &self.weight, &self.bias, eps, silu)?;
                let &[batch, _, h, w] = x.shape() else {
                    return Err(Error::InvalidParameter(format!("tiled group norm: expected [batch, channels, h, w], got {:?}", x.shape())));
                };
                let slots = match slots {
                    Some(t) => t,
                    None => slots.insert(gpu.empty_as(&[batch * groups, *tiles * SLOTS_PER_TILE, 4], DType::F32)?),
                };
                let at = |f: f32, size: usize| (f * size as f32).round() as usize;
                let region = [at(share[0], h), at(share[1], h), at(share[2], w), at(share[3], w)];
                gpu.group_partials(x, groups, region, slots, *tile * SLOTS_PER_TILE, SLOTS_PER_TILE)?;
                Ok(y)
            }
        }
    }

    /// Starts recording the statistics of `tiles` tiles (see [`Statistics`]).
    pub(crate) fn record(&self, tiles: usize) {
        *self.statistics.borrow_mut() = Statistics::Record { slots: None, tiles, tile: 0, share: [0.0, 1.0, 0.0, 1.0] };
    }

    /// The tile the next forward records, and its share (rows y0..y1, cols x0..x1 as fractions).
    pub(crate) fn record_tile(&self, index: usize, region: [f32; 4]) {
        if let Statistics::Record { tile, share, .. } = &mut *self.statistics.borrow_mut() {
            (*tile, *share) = (index, region);
        }
    }

    /// Normalises with the recorded statistics from now on.
    pub(crate) fn use_recorded(&self) -> Result<()> {
        let mut statistics = self.statistics.borrow_mut();
        match std::mem::replace(&mut *statistics, Statistics::Own) {
            Statistics::Record { slots: Some(slots), .. } => {
                *statistics = Statistics::Merged(slots);
                Ok(())
            }
            _ => Err(Error::InvalidParameter("group norm: no statistics were recorded".into())),
        }
    }

    /// Back to the input's own statistics.
    pub(crate) fn use_own(&self) {
        *self.statistics.borrow_mut() = Statistics::Own;
    }
}
