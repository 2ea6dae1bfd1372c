//! LoRA at run time: a low-rank side path next to a Linear or Conv2d weight,
//! y = W·x + bias + B·(A·x), with W as stored (dense or any block format: never requantized, so a
//! q4 base keeps its quality and the LoRA keeps all of its own) and A, B in the working float type.
//! Several LoRAs on one layer are stacked along the rank, each one's scale folded into its columns
//! of B, so any number of them costs two small GEMMs per layer. The product W·x takes B·(A·x) + bias
//! (+ the layer's skip connection) as its residual addend (shaders/gemm.wgsl), GEGLU included.
//!
//! Every Linear and Conv2d a model loads registers a [`Slot`] in its component's [`Layers`] under
//! diffusers' module name, so LoRAs are set or cleared between generations without reloading.

use std::cell::{Ref, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::Addend;
use crate::quant::Weight;

/// The stacked low-rank factors of one layer.
pub struct LowRank {
    /// A: [rank, in·k·k], k the layer's kernel (1 for a Linear).
    down: Weight,
    /// B with the scales folded in: [out, rank].
    up: Weight,
}

impl LowRank {
    /// Uploads A ([rank, in·k·k] row-major) and B ([out, rank]) for a layer whose weight has
    /// `shape` ([out, in] or [out, in, k, k]) and whose activations are `dtype`.
    pub fn upload(gpu: &Gpu, down: &[f32], up: &[f32], rank: usize, shape: &[usize], dtype: DType, name: &str) -> Result<LowRank> {
        let out = shape.first().copied().unwrap_or(0);
        let cols: usize = shape.iter().skip(1).product();
        if rank == 0 || down.len() != rank * cols || up.len() != out * rank {
            return Err(Error::InvalidParameter(format!("LoRA of {name}: rank {rank} with {} + {} values for a {shape:?} weight", down.len(), up.len())));
        }
        Ok(LowRank {
            down: Weight::Dense(gpu.upload_as(down, &[rank, cols], dtype, &format!("{name} lora down"))?),
            up: Weight::Dense(gpu.upload_as(up, &[out, rank], dtype, &format!("{name} lora up"))?),
        })
    }

    /// Factors already on the GPU: A [rank, in·k·k] and B [out, rank] (a benchmark's random ones).
    pub fn from_tensors(down: Tensor, up: Tensor) -> LowRank {
        LowRank { down: Weight::Dense(down), up: Weight::Dense(up) }
    }

    /// A Linear's side path plus the layer's `addend` (its bias, a skip connection), B·(A·x) +
    /// addend: the whole addend of its product (`Gpu::linear_add`, `Gpu::linear_geglu`).
    pub fn linear_delta(&self, gpu: &Gpu, x: &Tensor, addend: Addend) -> Result<Tensor> {
        gpu.linear_add(&gpu.linear(x, &self.down, None)?, &self.up, addend)
    }

    /// A Conv2d's side path plus the layer's `addend`: A a convolution like the layer's (kernel
    /// `k`, `stride`, `pad`), B a 1x1 one; the whole addend of `Gpu::conv2d_add`.
    pub fn conv2d_delta(&self, gpu: &Gpu, x: &Tensor, k: usize, addend: Addend, stride: usize, pad: [usize; 4]) -> Result<Tensor> {
        gpu.conv2d_add(&gpu.conv2d(x, &self.down, k, None, stride, pad)?, &self.up, 1, addend, 1, [0; 4])
    }
}

/// One layer's side path: empty unless LoRAs adapt the layer.
#[derive(Clone, Default)]
pub struct Slot(Rc<RefCell<Option<LowRank>>>);

impl Slot {
    pub fn get(&self) -> Ref<'_, Option<LowRank>> {
        self.0.borrow()
    }
}

/// A layer LoRAs may adapt: its weight's shape and the float type its activations take.
pub struct Layer {
    pub shape: Vec<usize>,
    pub dtype: DType,
    slot: Slot,
}

/// The layers of one model component (`unet`, `text_encoder`, ...) by diffusers' module name
/// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
#[derive(Clone, Default)]
pub struct Layers(Rc<RefCell<BTreeMap<String, Layer>>>);

impl Layers {
    /// Registers layer `name` and returns the slot its forward reads.
    pub fn register(&self, name: String, shape: Vec<usize>, dtype: DType) -> Slot {
        let slot = Slot::default();
        self.0.borrow_mut().insert(name, Layer { shape, dtype, slot: slot.clone() });
        slot
    }

    /// Every layer by name.
    pub fn layers(&self) -> Ref<'_, BTreeMap<String, Layer>> {
        self.0.borrow()
    }

    /// Sets (or with None clears) layer `name`'s side path.
    pub fn set(&self, name: &str, low_rank: Option<LowRank>) -> Result<()> {
        let layers = self.0.borrow();
        let layer = layers.get(name).ok_or_else(|| Error::InvalidParameter(format!("no layer {name} to adapt")))?;
        *layer.slot.0.borrow_mut() = low_rank;
        Ok(())
    }

    /// Clears every side path.
    pub fn clear(&self) {
        for layer in self.0.borrow().values() {
            *layer.slot.0.borrow_mut() = None;
        }
    }
}
