//! The GPU runtime: one device, tensors in storage buffers, WGSL kernels specialised per dtype,
//! and one dispatch helper. Everything above this module talks to the GPU through `Gpu` and
//! `Tensor` only, so a direct web-sys WebGPU path could replace wgpu here later.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};

/// Element type of a tensor in GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
}

/// Which float type activations and weights use on the GPU. Accumulation is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f16 where the adapter has `shader-f16`, else f32.
    #[default]
    Auto,
    F32,
    F16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            _ => Err(Error::InvalidParameter(format!("precision '{s}': expected auto, f32 or f16"))),
        }
    }
}

/// A WGSL kernel family: one file in `shaders/`, compiled once per entry point.
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// An n-dimensional array in one GPU storage buffer, row-major.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) buffer: wgpu::Buffer,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Same buffer, new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::InvalidParameter(format!("cannot reshape {:?} to {:?}", self.shape, shape)));
        }
        Ok(Tensor { buffer: self.buffer.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
}

/// Dispatches recorded before the encoder is submitted; bounds the memory held by pending
/// uniform buffers and bind groups.
const DISPATCHES_PER_SUBMIT: u32 = 64;
/// Bytes of `write_buffer` uploads after which the queue is submitted and the GPU waited for: each
/// write is staged until the next submit, so loading a model without submitting would hold a
/// second copy of all its weights.
const STAGED_BYTES_PER_SUBMIT: u64 = 256 << 20;
/// Elements widened from f16 to f32 at a time on upload.
const WIDEN_CHUNK: usize = 1 << 20;
/// WebGPU's guaranteed maximum workgroup count per dimension.
const MAX_GROUPS_PER_DIM: u32 = 65535;

pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Float type of activations and weights.
    pub dtype: DType,
    pub has_shader_f16: bool,
    pub has_subgroups: bool,
    pub adapter_name: String,
    limits: wgpu::Limits,
    pipelines: RefCell<HashMap<(&'static str, &'static str), wgpu::ComputePipeline>>,
    pending: RefCell<Option<wgpu::CommandEncoder>>,
    pending_dispatches: Cell<u32>,
    staged_bytes: Cell<u64>,
    failure: Arc<Mutex<Option<Error>>>,
}

impl Gpu {
    /// Opens the best adapter with the largest buffer limits it offers.
    pub async fn new(precision: Precision) -> Result<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY | wgpu::Backends::BROWSER_WEBGPU,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(format!("{e} (WebGPU needs a recent Chrome/Edge, or Vulkan/Metal/DX12 natively)")))?;
        let info = adapter.get_info();
        let available = adapter.features();
        let has_shader_f16 = available.contains(wgpu::Features::SHADER_F16);
        let has_subgroups = available.contains(wgpu::Features::SUBGROUP);
        let dtype = match precision {
            Precision::F32 => DType::F32,
            Precision::Auto if !has_shader_f16 => DType::F32,
            Precision::Auto | Precision::F16 => DType::F16,
        };
        if dtype == DType::F16 && !has_shader_f16 {
            return Err(Error::AdapterLimits(format!("adapter '{}' lacks shader-f16; use f32 precision", info.name)));
        }
        let mut features = wgpu::Features::empty();
        if has_shader_f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        let offered = adapter.limits();
        let limits = wgpu::Limits {
            max_buffer_size: offered.max_buffer_size,
            max_storage_buffer_binding_size: offered.max_storage_buffer_binding_size,
            max_storage_buffers_per_shader_stage: offered.max_storage_buffers_per_shader_stage.min(10),
            max_compute_workgroup_storage_size: offered.max_compute_workgroup_storage_size,
            ..wgpu::Limits::default()
        };
        let needed = wgpu::Limits::default();
        if offered.max_compute_invocations_per_workgroup < needed.max_compute_invocations_per_workgroup
            || offered.max_compute_workgroup_storage_size < needed.max_compute_workgroup_storage_size
        {
            return Err(Error::AdapterLimits(format!(
                "adapter '{}' offers {} invocations and {} bytes of workgroup memory; the kernels need {} and {}",
                info.name,
                offered.max_compute_invocations_per_workgroup,
                offered.max_compute_workgroup_storage_size,
                needed.max_compute_invocations_per_workgroup,
                needed.max_compute_workgroup_storage_size
            )));
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("sdxl"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::AdapterLimits(format!("adapter '{}' refused the device: {e}", info.name)))?;
        let failure: Arc<Mutex<Option<Error>>> = Arc::default();
        let on_error = failure.clone();
        device.on_uncaptured_error(Arc::new(move |e| {
            let mut slot = on_error.lock().unwrap();
            if slot.is_none() {
                *slot = Some(match e {
                    wgpu::Error::OutOfMemory { .. } => Error::Gpu(format!("out of GPU memory: {e}")),
                    _ => Error::Gpu(e.to_string()),
                });
            }
        }));
        let on_lost = failure.clone();
        device.set_device_lost_callback(move |reason, message| {
            *on_lost.lock().unwrap() = Some(Error::DeviceLost(format!("{reason:?}: {message}")));
        });
        Ok(Gpu {
            device,
            queue,
            dtype,
            has_shader_f16,
            has_subgroups,
            adapter_name: format!("{} ({:?})", info.name, info.backend),
            limits,
            pipelines: RefCell::default(),
            pending: RefCell::default(),
            pending_dispatches: Cell::new(0),
            staged_bytes: Cell::new(0),
            failure,
        })
    }

    /// Largest tensor, in bytes, that one kernel binding can address.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// The first error the device reported since it was created, if any.
    fn check(&self) -> Result<()> {
        match self.failure.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn alloc(&self, shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()).max(4).next_multiple_of(4) as u64;
        if bytes > self.max_binding_bytes() {
            return Err(Error::AdapterLimits(format!(
                "{what} {shape:?} needs {:.1} MiB in one buffer; this adapter allows {:.1} MiB",
                bytes as f64 / 1048576.0,
                self.max_binding_bytes() as f64 / 1048576.0
            )));
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Tensor { buffer, shape: shape.to_vec(), dtype })
    }

    /// An uninitialised tensor of the working float type (kernels overwrite every element).
    pub fn empty(&self, shape: &[usize]) -> Result<Tensor> {
        self.alloc(shape, self.dtype, "tensor")
    }

    /// A tensor of zeros (WebGPU zero-initialises new buffers).
    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        self.empty(shape)
    }

    /// Uploads f32 data, converted to the working float type.
    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_as(data, shape, self.dtype, "tensor")
    }

    /// Uploads f32 data and keeps it f32 whatever the working type (timesteps, scalars).
    pub fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_as(data, shape, DType::F32, "tensor")
    }

    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        self.check_len(data.len(), shape)?;
        let t = self.alloc(shape, DType::U32, "index tensor")?;
        self.write(&t, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Uploads f32 data as `dtype`; `what` names the tensor in errors.
    pub fn upload_as(&self, data: &[f32], shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        self.check_len(data.len(), shape)?;
        let t = self.alloc(shape, dtype, what)?;
        match dtype {
            DType::F32 => self.write(&t, bytemuck::cast_slice(data)),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                self.write(&t, bytemuck::cast_slice(&h));
            }
            DType::U32 => return Err(Error::InvalidParameter(format!("{what}: cannot upload floats as u32"))),
        }
        Ok(t)
    }

    /// Uploads f16 data as the working float type without a detour through f32 when possible.
    pub fn upload_f16(&self, data: &[half::f16], shape: &[usize], what: &str) -> Result<Tensor> {
        self.check_len(data.len(), shape)?;
        if self.dtype == DType::F16 {
            let t = self.alloc(shape, DType::F16, what)?;
            self.write(&t, bytemuck::cast_slice(data));
            Ok(t)
        } else {
            // Widened a slice at a time: a whole f32 copy of a large table would double the heap peak.
            let t = self.alloc(shape, DType::F32, what)?;
            for (i, chunk) in data.chunks(WIDEN_CHUNK).enumerate() {
                let f: Vec<f32> = chunk.iter().map(|x| x.to_f32()).collect();
                self.write_at(&t, (i * WIDEN_CHUNK * 4) as u64, bytemuck::cast_slice(&f));
            }
            Ok(t)
        }
    }

    fn check_len(&self, len: usize, shape: &[usize]) -> Result<()> {
        if len != shape.iter().product::<usize>() {
            return Err(Error::InvalidParameter(format!("{len} values do not fill shape {shape:?}")));
        }
        Ok(())
    }

    fn write(&self, t: &Tensor, bytes: &[u8]) {
        self.write_at(t, 0, bytes);
    }

    /// Writes `bytes` at byte `offset` (a multiple of 4) of the tensor's buffer.
    fn write_at(&self, t: &Tensor, offset: u64, bytes: &[u8]) {
        // write_buffer needs a multiple of 4 bytes; odd-length f16 tensors get one padding element.
        if bytes.len() % 4 == 0 {
            self.queue.write_buffer(&t.buffer, offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4), 0);
            self.queue.write_buffer(&t.buffer, offset, &padded);
        }
        self.staged_bytes.set(self.staged_bytes.get() + bytes.len() as u64);
        if self.staged_bytes.get() >= STAGED_BYTES_PER_SUBMIT {
            self.release_staging();
        }
    }

    /// Submits the staged writes and, natively, waits for them so that their staging memory is
    /// freed (the browser's writeBuffer copies outside the wasm heap and needs no wait).
    fn release_staging(&self) {
        self.staged_bytes.set(0);
        self.flush();
        self.queue.submit([]);
        #[cfg(not(target_arch = "wasm32"))]
        if let Err(e) = self.device.poll(wgpu::PollType::wait_indefinitely()) {
            self.failure.lock().unwrap().get_or_insert(Error::Gpu(format!("waiting for uploads: {e}")));
        }
    }

    /// Copy of items `start..start + len` along the first axis (e.g. one half of a CFG batch).
    pub fn narrow(&self, t: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let outer = *t.shape.first().ok_or_else(|| Error::InvalidParameter("narrow: scalar tensor".into()))?;
        if start + len > outer {
            return Err(Error::InvalidParameter(format!("narrow {start}..{} of {:?}", start + len, t.shape)));
        }
        let item_bytes = (t.len() / outer * t.dtype.size()) as u64;
        let (offset, bytes) = (start as u64 * item_bytes, len as u64 * item_bytes);
        if offset % 4 != 0 || bytes % 4 != 0 {
            return Err(Error::InvalidParameter(format!("narrow of {:?}: items of {item_bytes} bytes are not 4-byte aligned", t.shape)));
        }
        let mut shape = t.shape.clone();
        shape[0] = len;
        let out = self.alloc(&shape, t.dtype, "narrowed tensor")?;
        let mut pending = self.pending.borrow_mut();
        let encoder = pending.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        encoder.copy_buffer_to_buffer(&t.buffer, offset, &out.buffer, 0, bytes);
        Ok(out)
    }

    /// Copies a tensor back to the CPU as f32.
    pub async fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(t).await?;
        let n = t.len();
        Ok(match t.dtype {
            DType::F32 => bytemuck::cast_slice::<u8, f32>(&bytes)[..n].to_vec(),
            DType::F16 => bytemuck::cast_slice::<u8, half::f16>(&bytes)[..n].iter().map(|x| x.to_f32()).collect(),
            DType::U32 => bytemuck::cast_slice::<u8, u32>(&bytes)[..n].iter().map(|&x| x as f32).collect(),
        })
    }

    pub async fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        if t.dtype != DType::U32 {
            return Err(Error::InvalidParameter(format!("read_u32 on a {:?} tensor", t.dtype)));
        }
        let bytes = self.read_bytes(t).await?;
        Ok(bytemuck::cast_slice::<u8, u32>(&bytes)[..t.len()].to_vec())
    }

    async fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let size = t.buffer.size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.take_encoder();
        encoder.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        let mapped = rx.await.map_err(|_| Error::DeviceLost("readback was cancelled".into()))?;
        self.check()?;
        mapped.map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
        let bytes = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    /// Submits all recorded work and waits until the GPU has finished it: bounds how far the CPU
    /// runs ahead (and so the memory held by queued work), and surfaces device errors.
    pub async fn sync(&self) -> Result<()> {
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        rx.await.map_err(|_| Error::DeviceLost("the queue was dropped".into()))?;
        self.check()
    }

    /// Submits all recorded work (so that it starts while the CPU prepares more).
    pub fn flush(&self) {
        if let Some(encoder) = self.pending.borrow_mut().take() {
            self.queue.submit([encoder.finish()]);
        }
        self.pending_dispatches.set(0);
    }

    fn take_encoder(&self) -> wgpu::CommandEncoder {
        self.pending_dispatches.set(0);
        self.pending
            .borrow_mut()
            .take()
            .unwrap_or_else(|| self.device.create_command_encoder(&Default::default()))
    }

    fn pipeline(&self, shader: &Shader, entry: &'static str) -> wgpu::ComputePipeline {
        let key = (shader.name, entry);
        if let Some(p) = self.pipelines.borrow().get(&key) {
            return p.clone();
        }
        let prelude = match self.dtype {
            DType::F16 => "enable f16;\nalias T = f16;\n",
            _ => "alias T = f32;\n",
        };
        let source = format!("{prelude}{}\n{}", include_str!("../../shaders/common.wgsl"), shader.source);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        self.pipelines.borrow_mut().insert(key, pipeline.clone());
        pipeline
    }

    /// Records one kernel launch. Binding 0 is a uniform block holding `params` (u32 words; floats
    /// via `f32::to_bits`); bindings 1.. are `tensors` in order.
    pub(crate) fn dispatch(&self, shader: &Shader, entry: &'static str, params: &[u32], tensors: &[&Tensor], groups: [u32; 3]) -> Result<()> {
        if groups.iter().any(|&g| g > MAX_GROUPS_PER_DIM) {
            return Err(Error::InvalidParameter(format!("{}::{entry}: grid {groups:?} exceeds {MAX_GROUPS_PER_DIM} per dimension", shader.name)));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let pipeline = self.pipeline(shader, entry);
        let mut words = params.to_vec();
        words.resize(params.len().next_multiple_of(4).max(4), 0);
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        entries.extend(
            tensors
                .iter()
                .enumerate()
                .map(|(i, t)| wgpu::BindGroupEntry { binding: i as u32 + 1, resource: t.buffer.as_entire_binding() }),
        );
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pending = self.pending.borrow_mut();
        let encoder = pending.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        drop(pending);
        self.pending_dispatches.set(self.pending_dispatches.get() + 1);
        if self.pending_dispatches.get() >= DISPATCHES_PER_SUBMIT {
            self.flush();
        }
        Ok(())
    }

    /// Grid for `n` independent items handled `per_group` to a workgroup, folded into two
    /// dimensions when it exceeds the per-dimension limit. Shaders rebuild the flat index with
    /// `flat_index` from common.wgsl.
    pub(crate) fn grid(n: usize, per_group: u32) -> Result<[u32; 3]> {
        let groups = (n as u64).div_ceil(per_group as u64);
        let x = groups.min(MAX_GROUPS_PER_DIM as u64);
        let y = groups.div_ceil(x.max(1));
        if y > MAX_GROUPS_PER_DIM as u64 {
            return Err(Error::InvalidParameter(format!("{n} work items exceed the dispatch limit")));
        }
        Ok([x as u32, y as u32, 1])
    }
}
