//! [`Vars`]: how models load their weights (candle's `VarBuilder`): one component's tensors, a
//! name prefix that `pp` extends, the quantization policy and the float type dense tensors take,
//! and where the layers it builds register for LoRAs ([`Layers`]).

use half::f16;

use crate::adapt::{Layers, Slot};
use super::{all_rows, host_f32, quantize_host, random, safetensors, tensor_error, HostTensor, TensorSource};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::quant::{QuantPolicy, QuantTensor, Weight};

#[derive(Clone)]
pub struct Vars<'a> {
    gpu: &'a Gpu,
    tensors: &'a dyn TensorSource,
    /// The component (`unet`), which qualifies names for the quantization policy.
    component: &'a str,
    /// Prepended to every name: `down_blocks.0.resnets.1.`.
    prefix: String,
    policy: &'a QuantPolicy,
    dtype: DType,
    layers: Option<Layers>,
}

impl<'a> Vars<'a> {
    /// The tensors of `component` in `tensors`, dense ones uploaded in the GPU's working type.
    pub fn new(gpu: &'a Gpu, tensors: &'a dyn TensorSource, component: &'a str, policy: &'a QuantPolicy) -> Vars<'a> {
        Vars { gpu, tensors, component, prefix: String::new(), policy, dtype: gpu.dtype, layers: None }
    }

    /// Registers the Linear and Conv2d layers built from here in `layers` (see [`Vars::lora_slot`]).
    pub fn with_layers(mut self, layers: &Layers) -> Vars<'a> {
        self.layers = Some(layers.clone());
        self
    }

    /// Uploads dense tensors as `dtype` (a component computing in another float type than the
    /// GPU's working one: an upcast VAE).
    pub fn with_dtype(mut self, dtype: DType) -> Vars<'a> {
        self.dtype = dtype;
        self
    }

    /// The same tensors below `name`: `vb.pp("to_q").matrix("weight", ..)` reads `{prefix}to_q.weight`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vars<'a> {
        Vars { prefix: format!("{}{name}.", self.prefix), ..self.clone() }
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    /// The float type dense tensors upload as.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The LoRA slot of the layer at this prefix, whose weight has `shape`: registered under the
    /// module's name when the builder has [`Layers`], else one no LoRA reaches.
    pub fn lora_slot(&self, shape: &[usize]) -> Slot {
        match &self.layers {
            Some(layers) => layers.register(self.prefix.trim_end_matches('.').to_string(), shape.to_vec(), self.dtype),
            None => Slot::default(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.info(&self.name(name)).is_some()
    }

    fn error(&self, name: &str, e: Error) -> Error {
        match e {
            Error::Tensor { .. } | Error::AdapterLimits(_) | Error::DeviceLost(_) | Error::Io { .. } | Error::Network { .. } | Error::Corrupt { .. } | Error::ModelIncomplete(_) => e,
            e => tensor_error(self.tensors, name, e.to_string()),
        }
    }

    /// A Linear or Conv2d weight ([out, in, ...]): as stored when the file holds blocks, else
    /// quantized on the CPU as it loads where the policy says (one tensor in memory at a time),
    /// else dense.
    pub async fn matrix(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let name = self.name(name);
        let format = self.policy.format_for(self.component, &name, shape);
        let host = self.tensors.read(&name, shape, all_rows(shape)).await?;
        let weight = match (host, format) {
            (HostTensor::Quant(q), _) => QuantTensor::upload(self.gpu, &q, &name).map(Weight::Quant),
            (HostTensor::Random(seed), format) => random::matrix(self.gpu, seed, &name, shape, format, self.dtype),
            (HostTensor::Float { dtype, bytes }, Some(format)) if dtype.is_float() => {
                let (rows, cols) = (shape[0], shape[1..].iter().product());
                quantize_host(dtype, &bytes, rows, cols, format).and_then(|q| QuantTensor::upload(self.gpu, &q, &name)).map(Weight::Quant)
            }
            (host, _) => self.dense(&name, host, shape).map(Weight::Dense),
        };
        weight.map_err(|e| self.error(&name, e))
    }

    /// A float tensor (bias, norm, embedding) uploaded dense, checking its shape.
    pub async fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let name = self.name(name);
        let host = self.tensors.read(&name, shape, all_rows(shape)).await?;
        self.dense(&name, host, shape).map_err(|e| self.error(&name, e))
    }

    /// A 2-D table [rows, dim] uploaded as row chunks that each fit one GPU binding (the text
    /// encoders' embeddings: 49408 rows), read a chunk at a time.
    pub async fn tensor_rows(&self, name: &str, shape: [usize; 2]) -> Result<Vec<Tensor>> {
        let name = self.name(name);
        let [rows, dim] = shape;
        let row_bytes = (dim * self.dtype.size()) as u64;
        let per_chunk = (self.gpu.max_binding_bytes() / row_bytes.max(1)).max(1) as usize;
        let mut chunks = Vec::new();
        for r0 in (0..rows).step_by(per_chunk) {
            let n = per_chunk.min(rows - r0);
            let host = self.tensors.read(&name, &shape, r0..r0 + n).await?;
            let chunk = match host {
                HostTensor::Random(seed) => random::tensor(self.gpu, seed, &format!("{name}.{r0}"), &[n, dim], self.dtype),
                host => self.dense(&name, host, &[n, dim]),
            };
            chunks.push(chunk.map_err(|e| self.error(&name, e))?);
        }
        Ok(chunks)
    }

    /// A tensor read to the CPU as f32, checking its shape (small tensors the models split or
    /// reshape there).
    pub async fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        host_f32(self.tensors, &self.name(name), shape).await
    }

    /// `host` (rows of `shape`) uploaded dense in the component's float type.
    fn dense(&self, name: &str, host: HostTensor, shape: &[usize]) -> Result<Tensor> {
        let (gpu, to) = (self.gpu, self.dtype);
        match host {
            // f16 widens to f32 a slice at a time (`upload_f16`): a whole f32 copy of an
            // embedding table would double the wasm heap's peak.
            HostTensor::Float { dtype: safetensors::Dtype::F16, bytes } => match bytemuck::try_cast_slice::<u8, f16>(&bytes) {
                Ok(halves) => gpu.upload_f16(halves, shape, to, name),
                Err(_) => gpu.upload_f16(&bytemuck::pod_collect_to_vec::<u8, f16>(&bytes), shape, to, name),
            },
            HostTensor::Float { dtype, .. } if !dtype.is_float() => Err(Error::InvalidParameter(format!("{} is not a float dtype", dtype.name()))),
            HostTensor::Float { dtype, bytes } => {
                let size = dtype.size();
                check_values(bytes.len() / size, shape)?;
                gpu.upload_from(shape, to, name, |values| safetensors::to_f32(dtype, &bytes[values.start * size..values.end * size]))
            }
            HostTensor::Quant(q) => {
                check_values(q.rows * q.cols, shape)?;
                gpu.upload_from(shape, to, name, |values| q.dequantize_values(values))
            }
            HostTensor::Random(seed) => random::tensor(gpu, seed, name, shape, to),
        }
    }
}

fn check_values(n: usize, shape: &[usize]) -> Result<()> {
    match n == shape.iter().product::<usize>() {
        true => Ok(()),
        false => Err(Error::InvalidParameter(format!("{n} values do not fill shape {shape:?}"))),
    }
}
