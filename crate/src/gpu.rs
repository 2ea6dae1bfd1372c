//! The GPU runtime: one device, tensors in storage buffers, WGSL kernels specialised per dtype,
//! and one dispatch helper. Everything above this module talks to the GPU through `Gpu` and
//! `Tensor` only, so a direct web-sys WebGPU path could replace wgpu here later.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use strum::{EnumString, VariantNames};

use crate::error::{mib, Error, Result};
use crate::named::Named;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, EnumString, VariantNames)]
#[strum(serialize_all = "lowercase", parse_err_ty = Error, parse_err_fn = crate::named::unknown::<Self>)]
pub enum Precision {
    /// f16 where the adapter has `shader-f16`, else f32.
    #[default]
    Auto,
    F32,
    F16,
}

impl Named for Precision {
    const WHAT: &'static str = "precision";
}

/// A WGSL kernel family: one file in `shaders/`, compiled once per entry point, whose uniform
/// parameters are a `P` (see `kernel_params!`). The file declares neither its `struct Params` nor
/// the ids it switches on: both are generated from their Rust declarations and prepended.
pub struct Shader<P> {
    pub name: &'static str,
    pub source: &'static str,
    /// The id enums the kernel switches on (see `kernel_ids!`).
    pub ids: &'static [KernelIds],
    params: std::marker::PhantomData<fn() -> P>,
}

impl<P: KernelParams> Shader<P> {
    pub const fn new(name: &'static str, source: &'static str, ids: &'static [KernelIds]) -> Shader<P> {
        Shader { name, source, ids, params: std::marker::PhantomData }
    }
}

/// `Shader::new` for `shaders/<name>.wgsl`, with the id enums it switches on.
macro_rules! shader {
    ($name:literal $(, $ids:expr)* $(,)?) => {
        $crate::gpu::Shader::new($name, include_str!(concat!("../../shaders/", $name, ".wgsl")), &[$($ids),*])
    };
}
pub(crate) use shader;

/// A kernel family's uniform block: the Rust struct `dispatch` uploads as it is in memory and the
/// WGSL `struct Params` the kernel reads, both from one `kernel_params!` declaration.
pub trait KernelParams: bytemuck::Pod {
    /// `struct Params { .. }` in WGSL.
    const WGSL: &'static str;
}

/// Declares a kernel family's parameters once: a `#[repr(C)]` Pod struct and, from the same
/// field list, its WGSL `struct Params` (u32, i32 and f32 are spelled alike in both languages, so
/// the two layouts agree field for field). Padding fields are explicit: the block must fill whole
/// 16-byte rows, as WGSL lays out uniforms.
macro_rules! kernel_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($field:ident: $ty:ident),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $(pub $field: $ty),*
        }

        impl $crate::gpu::KernelParams for $name {
            const WGSL: &'static str = concat!("struct Params {\n", $("    ", stringify!($field), ": ", stringify!($ty), ",\n",)* "}\n");
        }

        const _: () = {
            let size = std::mem::size_of::<$name>();
            assert!(size > 0 && size % 16 == 0, concat!(stringify!($name), ": a uniform block fills whole 16-byte rows (add explicit padding)"));
        };
    };
}
pub(crate) use kernel_params;

/// The WGSL constants of an id enum a kernel switches on (see `kernel_ids!`).
pub struct KernelIds {
    /// The constants' prefix, e.g. `FORMAT` for `FORMAT_Q8_0`.
    pub prefix: &'static str,
    /// Each variant's Rust name and value.
    pub variants: &'static [(&'static str, u32)],
}

impl KernelIds {
    /// `const PREFIX_VARIANT: u32 = ..u;` per variant, the Rust name in upper snake case
    /// (`QuickGelu` -> `QUICK_GELU`).
    fn wgsl(&self) -> String {
        self.variants
            .iter()
            .map(|(variant, value)| {
                let mut name = String::new();
                let mut after_lower = false;
                for c in variant.chars() {
                    if c.is_ascii_uppercase() && after_lower {
                        name.push('_');
                    }
                    after_lower = c.is_ascii_lowercase();
                    name.push(c.to_ascii_uppercase());
                }
                format!("const {}_{name}: u32 = {value}u;\n", self.prefix)
            })
            .collect()
    }
}

/// Declares a `#[repr(u32)]` enum whose discriminants a kernel switches on, and its WGSL
/// constants as `Enum::KERNEL_IDS` (name the enum in the kernel's `shader!`).
macro_rules! kernel_ids {
    ($(#[$meta:meta])* $vis:vis enum $name:ident as $prefix:literal { $($(#[$vmeta:meta])* $variant:ident = $value:literal),* $(,)? }) => {
        $(#[$meta])*
        #[repr(u32)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value),*
        }

        impl $name {
            pub(crate) const KERNEL_IDS: $crate::gpu::KernelIds =
                $crate::gpu::KernelIds { prefix: $prefix, variants: &[$((stringify!($variant), $value)),*] };
        }
    };
}
pub(crate) use kernel_ids;

/// An n-dimensional array in one GPU storage buffer, row-major.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Rc<Buffer>,
    shape: Vec<usize>,
    dtype: DType,
}

/// A storage buffer with its accounting: an activation buffer goes back to the pool when its last
/// tensor drops (and is reused by the next allocation of its size class); a weight is freed.
#[derive(Debug)]
struct Buffer {
    raw: wgpu::Buffer,
    pooled: bool,
    memory: Rc<RefCell<Memory>>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.memory.borrow_mut().release(&self.raw, self.pooled);
    }
}

/// GPU memory held through tensors: a caching allocator for activations. Reusing freed buffers by
/// size class bounds a step's memory by its peak of live activations rather than by the sum of
/// everything it allocates, and spares the driver an allocation per op. Reuse is safe without
/// waiting: the queue runs commands in order, so a later kernel writing a recycled buffer runs
/// after every earlier reader.
#[derive(Debug, Default)]
struct Memory {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    /// Bytes of all buffers that exist (live tensors plus the pool).
    allocated: u64,
    /// Bytes in the pool.
    cached: u64,
    peak: u64,
}

impl Memory {
    fn release(&mut self, raw: &wgpu::Buffer, pooled: bool) {
        if pooled {
            self.cached += raw.size();
            self.free.entry(raw.size()).or_default().push(raw.clone());
        } else {
            self.allocated -= raw.size();
        }
    }

    fn take(&mut self, size: u64) -> Option<wgpu::Buffer> {
        let raw = self.free.get_mut(&size)?.pop()?;
        self.cached -= size;
        Some(raw)
    }

    fn grow(&mut self, size: u64) {
        self.allocated += size;
        self.peak = self.peak.max(self.allocated);
    }
}

/// Pooled buffer sizes: multiples of 256 bytes up to 64 KiB, then eight classes per power of two
/// (at most 12.5 % unused), so that activations of nearby sizes share buffers.
fn size_class(bytes: u64) -> u64 {
    if bytes <= 1 << 16 {
        return bytes.next_multiple_of(256);
    }
    let step = 1u64 << (63 - bytes.leading_zeros() - 3);
    bytes.next_multiple_of(step)
}

/// GPU memory figures, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    /// Every buffer that exists now: live tensors (weights, activations) and the pool.
    pub allocated: u64,
    /// Freed activation buffers kept for reuse (part of `allocated`).
    pub cached: u64,
    /// The most `allocated` has been since the device opened or `reset_peak`.
    pub peak: u64,
}

/// Work recorded since the device opened: what a step costs in launches, and what its first run
/// compiles (`sdxl bench` reports both per UNet step).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub dispatches: u64,
    pub pipelines: u64,
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
    /// Size of the buffer behind the tensor (its size class when pooled), in bytes.
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer.raw.size()
    }
    /// Same buffer, new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::InvalidParameter(format!("cannot reshape {:?} to {:?}", self.shape, shape)));
        }
        Ok(Tensor { buffer: self.buffer.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
}

/// Dispatches recorded before the encoder is submitted; bounds the memory held by pending bind
/// groups, and sizes the uniform arena (one slot per dispatch).
const DISPATCHES_PER_SUBMIT: u32 = 64;
/// Bytes per dispatch in the uniform arena: WebGPU's default minUniformBufferOffsetAlignment.
const UNIFORM_SLOT: u64 = 256;
/// Bytes of `write_buffer` uploads after which the queue is submitted and the GPU waited for: each
/// write is staged until the next submit, so loading a model without submitting would hold a
/// second copy of all its weights.
const STAGED_BYTES_PER_SUBMIT: u64 = 256 << 20;
/// Values the host converts at a time (widening, narrowing, quantizing, dequantizing: on upload
/// and in conversions): bounds the temporary buffers to a few MiB whatever the tensor.
pub const HOST_CHUNK: usize = 1 << 20;
/// WebGPU's guaranteed maximum workgroup count per dimension.
const MAX_GROUPS_PER_DIM: u32 = 65535;

/// Compiled pipelines by (shader, entry point, float type), then by specialisation.
type Pipelines = HashMap<(&'static str, &'static str, DType), HashMap<String, wgpu::ComputePipeline>>;

pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Float type of activations and weights unless a model chooses otherwise (the VAE may
    /// compute in f32 on an f16 device: ops follow their inputs' dtype).
    pub dtype: DType,
    pub has_shader_f16: bool,
    pub has_subgroups: bool,
    pub adapter_name: String,
    limits: wgpu::Limits,
    /// Compiled pipelines by (shader, entry, float type), then by specialisation (looked up
    /// without copying).
    pipelines: RefCell<Pipelines>,
    /// The open compute pass: consecutive dispatches share one pass (WebGPU still orders each
    /// dispatch's writes before the next's reads), ended before any copy and before submitting.
    pass: RefCell<Option<wgpu::ComputePass<'static>>>,
    pending: RefCell<Option<wgpu::CommandEncoder>>,
    /// The parameters of the dispatches recorded since the last submit, one slot each, written to
    /// `uniforms` just before the submit (the queue orders that write after the previous submit's
    /// reads, so one arena serves every batch).
    uniform_data: RefCell<Vec<u8>>,
    uniforms: wgpu::Buffer,
    memory: Rc<RefCell<Memory>>,
    pending_dispatches: Cell<u32>,
    counters: Cell<Counters>,
    staged_bytes: Cell<u64>,
    /// A GPU error reported outside any operation's scopes; taken (and so cleared) by `check`.
    failure: Arc<Mutex<Option<Error>>>,
    /// Set once the device is lost: every later call fails with it.
    lost: Arc<Mutex<Option<Error>>>,
    /// The error scopes of the operation in progress (see `operation`), innermost last.
    scopes: RefCell<Vec<wgpu::ErrorScopeGuard>>,
}

/// The errors each operation's scopes catch: one scope per filter.
const ERROR_FILTERS: [wgpu::ErrorFilter; 3] = [wgpu::ErrorFilter::OutOfMemory, wgpu::ErrorFilter::Validation, wgpu::ErrorFilter::Internal];

fn gpu_error(e: wgpu::Error) -> Error {
    match e {
        wgpu::Error::OutOfMemory { .. } => Error::Gpu(format!("out of GPU memory: {e}")),
        _ => Error::Gpu(e.to_string()),
    }
}

/// Pops an operation's error scopes (innermost first, as wgpu requires) when dropped: also when
/// the operation's future is dropped half-way.
struct ScopesGuard<'a>(&'a Gpu);

impl Drop for ScopesGuard<'_> {
    fn drop(&mut self) {
        while let Some(scope) = self.0.scopes.borrow_mut().pop() {
            drop(scope);
        }
    }
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
            on_error.lock().unwrap().get_or_insert(gpu_error(e));
        }));
        let lost: Arc<Mutex<Option<Error>>> = Arc::default();
        let on_lost = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            *on_lost.lock().unwrap() = Some(Error::DeviceLost(format!("{reason:?}: {message}")));
        });
        let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("uniform arena"),
            size: DISPATCHES_PER_SUBMIT as u64 * UNIFORM_SLOT,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            device,
            queue,
            uniform_data: RefCell::default(),
            uniforms,
            memory: Rc::default(),
            dtype,
            has_shader_f16,
            has_subgroups,
            adapter_name: format!("{} ({:?})", info.name, info.backend),
            limits,
            pipelines: RefCell::default(),
            pass: RefCell::default(),
            pending: RefCell::default(),
            pending_dispatches: Cell::new(0),
            counters: Cell::default(),
            staged_bytes: Cell::new(0),
            failure,
            lost,
            scopes: RefCell::default(),
        })
    }

    /// Largest tensor, in bytes, that one kernel binding can address.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// The device's loss, or an error reported outside any operation since the last check.
    fn check(&self) -> Result<()> {
        if let Some(lost) = self.lost.lock().unwrap().clone() {
            return Err(lost);
        }
        match self.failure.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs one engine operation (a load, a generation, a LoRA upload, a bench) in its own GPU
    /// error scopes, so that a GPU error (out of memory, a failed validation) fails this operation
    /// only: it returns the error (also where the work itself went on to succeed), the buffers
    /// of its tensors are freed as they drop, the activation pool is released, and the next call
    /// starts clean. An operation within another belongs to the outer one. A lost device fails
    /// every later operation with `DeviceLost`.
    pub async fn operation<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if !self.scopes.borrow().is_empty() {
            return work.await;
        }
        // An error reported outside any operation belongs to none: it does not fail this one.
        self.failure.lock().unwrap().take();
        if let Some(lost) = self.lost.lock().unwrap().clone() {
            return Err(lost);
        }
        let guard = ScopesGuard(self);
        self.open_scopes();
        let result = work.await;
        // Every command of the operation has run before its scopes close.
        let drained = self.sync().await;
        let caught = self.close_scopes(false).await;
        drop(guard);
        // A GPU error explains whatever else went wrong (a failed map after an out-of-memory), and a
        // lost device explains any GPU error.
        let lost = self.lost.lock().unwrap().clone();
        let result = match lost.or(caught).or(drained.err()) {
            Some(e) => Err(e),
            None => result,
        };
        if result.is_err() {
            self.trim();
        }
        result
    }

    fn open_scopes(&self) {
        let scopes = ERROR_FILTERS.map(|filter| self.device.push_error_scope(filter));
        self.scopes.borrow_mut().extend(scopes);
    }

    /// Closes the open operation's scopes and, with `reopen`, opens fresh ones in their place; the
    /// error they caught (the first of the most telling kind).
    async fn close_scopes(&self, reopen: bool) -> Option<Error> {
        let mut popped = Vec::new();
        while let Some(scope) = self.scopes.borrow_mut().pop() {
            popped.push(scope.pop());
        }
        if reopen {
            self.open_scopes();
        }
        // In the order of ERROR_FILTERS: an out-of-memory explains the validation errors of the
        // invalid buffers it leaves.
        let mut first = None;
        for caught in popped.into_iter().rev() {
            if let Some(e) = caught.await {
                first.get_or_insert(gpu_error(e));
            }
        }
        first
    }

    /// GPU memory held through tensors now, and its peak.
    pub fn memory(&self) -> MemoryStats {
        let m = self.memory.borrow();
        MemoryStats { allocated: m.allocated, cached: m.cached, peak: m.peak }
    }

    /// Dispatches and pipeline compilations so far.
    pub fn counters(&self) -> Counters {
        self.counters.get()
    }

    fn count(&self, update: impl FnOnce(&mut Counters)) {
        let mut counters = self.counters.get();
        update(&mut counters);
        self.counters.set(counters);
    }

    /// Starts a new peak measurement from what is allocated now.
    pub fn reset_peak(&self) {
        let mut m = self.memory.borrow_mut();
        m.peak = m.allocated;
    }

    /// Frees the pooled activation buffers (after a run, before loading another model).
    pub fn trim(&self) {
        let mut m = self.memory.borrow_mut();
        m.allocated -= m.cached;
        m.cached = 0;
        m.free.clear();
    }

    /// A buffer for `shape`: weights (`pooled` false) get exactly their size and are freed on drop;
    /// activations come from the pool by size class.
    fn alloc(&self, shape: &[usize], dtype: DType, what: &str, pooled: bool) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()).max(4).next_multiple_of(4) as u64;
        let limit = self.max_binding_bytes();
        if bytes > limit {
            return Err(Error::AdapterLimits(format!(
                "{what} {shape:?} needs {} in one buffer; this adapter allows {}",
                mib(bytes),
                mib(limit)
            )));
        }
        let size = if pooled { size_class(bytes).min(limit) } else { bytes };
        let reused = if pooled { self.memory.borrow_mut().take(size) } else { None };
        let raw = match reused {
            Some(raw) => raw,
            None => {
                self.memory.borrow_mut().grow(size);
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }
        };
        let buffer = Rc::new(Buffer { raw, pooled, memory: self.memory.clone() });
        Ok(Tensor { buffer, shape: shape.to_vec(), dtype })
    }

    /// An uninitialised activation of the working float type (kernels overwrite every element).
    pub fn empty(&self, shape: &[usize]) -> Result<Tensor> {
        self.alloc(shape, self.dtype, "tensor", true)
    }

    /// An uninitialised pooled tensor of `dtype` (f32 statistics and the like).
    pub(crate) fn empty_as(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc(shape, dtype, "tensor", true)
    }

    /// A weight-like tensor that is not pooled (freed when dropped), left for a kernel to fill.
    pub(crate) fn empty_weight(&self, shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        self.alloc(shape, dtype, what, false)
    }

    /// An activation of zeros (a pooled buffer may hold an earlier tensor's values: cleared).
    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        self.zeros_as(shape, self.dtype)
    }

    /// `zeros` of `dtype`.
    pub fn zeros_as(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.empty_as(shape, dtype)?;
        self.encoder().clear_buffer(&t.buffer.raw, 0, None);
        Ok(t)
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
        let t = self.alloc(shape, DType::U32, "index tensor", false)?;
        self.write(&t, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Uploads f32 data as `dtype`; `what` names the tensor in errors.
    pub fn upload_as(&self, data: &[f32], shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        self.check_len(data.len(), shape)?;
        if dtype == DType::F32 {
            let t = self.alloc(shape, DType::F32, what, false)?;
            self.write(&t, bytemuck::cast_slice(data));
            return Ok(t);
        }
        self.upload_from(shape, dtype, what, |values| data[values].to_vec())
    }

    /// Uploads f16 data as float type `dtype` without a detour through f32 when possible.
    pub fn upload_f16(&self, data: &[half::f16], shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        self.check_len(data.len(), shape)?;
        if dtype == DType::F16 {
            let t = self.alloc(shape, DType::F16, what, false)?;
            self.write(&t, bytemuck::cast_slice(data));
            return Ok(t);
        }
        self.upload_from(shape, dtype, what, |values| data[values].iter().map(|x| x.to_f32()).collect())
    }

    /// Uploads a tensor of `shape` as float type `dtype`, its values made [`HOST_CHUNK`] at a time
    /// by `values(range)`: converting or dequantizing never holds a large table (an embedding) whole
    /// on the host.
    pub fn upload_from(&self, shape: &[usize], dtype: DType, what: &str, mut values: impl FnMut(std::ops::Range<usize>) -> Vec<f32>) -> Result<Tensor> {
        if dtype == DType::U32 {
            return Err(Error::InvalidParameter(format!("{what}: cannot upload floats as u32")));
        }
        let n: usize = shape.iter().product();
        let t = self.alloc(shape, dtype, what, false)?;
        for start in (0..n).step_by(HOST_CHUNK) {
            let range = start..(start + HOST_CHUNK).min(n);
            let chunk = values(range.clone());
            self.check_len(chunk.len(), &[range.len()])?;
            match dtype {
                DType::F32 => self.write_at(&t, (start * 4) as u64, bytemuck::cast_slice(&chunk)),
                _ => {
                    let halves: Vec<half::f16> = chunk.iter().map(|&x| half::f16::from_f32(x)).collect();
                    self.write_at(&t, (start * 2) as u64, bytemuck::cast_slice(&halves));
                }
            }
        }
        Ok(t)
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
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(&t.buffer.raw, offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4), 0);
            self.queue.write_buffer(&t.buffer.raw, offset, &padded);
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
        let out = self.alloc(&shape, t.dtype, "narrowed tensor", true)?;
        self.encoder().copy_buffer_to_buffer(&t.buffer.raw, offset, &out.buffer.raw, 0, bytes);
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
        let size = (t.len() * t.dtype.size()).next_multiple_of(4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.take_encoder();
        encoder.copy_buffer_to_buffer(&t.buffer.raw, 0, &staging, 0, size);
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
        self.check()?;
        // Within an operation, its errors so far: a failure mid-way stops it at the next sync.
        if !self.scopes.borrow().is_empty() {
            if let Some(e) = self.close_scopes(true).await {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Submits all recorded work (so that it starts while the CPU prepares more).
    pub fn flush(&self) {
        if self.pending.borrow().is_some() {
            let encoder = self.take_encoder();
            self.queue.submit([encoder.finish()]);
        }
    }

    /// The pending encoder for a command outside compute passes (the open pass is ended first).
    fn encoder(&self) -> std::cell::RefMut<'_, wgpu::CommandEncoder> {
        self.pass.borrow_mut().take();
        std::cell::RefMut::map(self.pending.borrow_mut(), |p| p.get_or_insert_with(|| self.device.create_command_encoder(&Default::default())))
    }

    /// The recorded work, its dispatches' parameters written to the uniform arena.
    fn take_encoder(&self) -> wgpu::CommandEncoder {
        self.pass.borrow_mut().take();
        self.pending_dispatches.set(0);
        let mut data = self.uniform_data.borrow_mut();
        if !data.is_empty() {
            self.queue.write_buffer(&self.uniforms, 0, &data);
            data.clear();
        }
        self.pending
            .borrow_mut()
            .take()
            .unwrap_or_else(|| self.device.create_command_encoder(&Default::default()))
    }

    /// The pipeline of `entry` in `shader` with storage float type `T` = `dtype`, compiled once
    /// per `defines` (WGSL declarations prepended to the source, e.g. a head size or tile shape
    /// the kernel is specialised for).
    fn pipeline<P: KernelParams>(&self, shader: &Shader<P>, entry: &'static str, dtype: DType, defines: &str) -> wgpu::ComputePipeline {
        let key = (shader.name, entry, dtype);
        if let Some(p) = self.pipelines.borrow().get(&key).and_then(|variants| variants.get(defines)) {
            return p.clone();
        }
        let prelude = match dtype {
            DType::F16 => "enable f16;\nalias T = f16;\n",
            _ => "alias T = f32;\n",
        };
        let ids: String = shader.ids.iter().map(KernelIds::wgsl).collect();
        let source = format!("{prelude}{defines}\n{}\n{}{ids}\n{}", include_str!("../../shaders/common.wgsl"), P::WGSL, shader.source);
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
        self.pipelines.borrow_mut().entry(key).or_default().insert(defines.to_string(), pipeline.clone());
        self.count(|c| c.pipelines += 1);
        pipeline
    }

    /// Records one kernel launch with storage float type `T` = `dtype`. Binding 0 is a uniform
    /// block holding `params`; bindings 1.. are `tensors` in order.
    pub(crate) fn dispatch<P: KernelParams>(&self, shader: &Shader<P>, entry: &'static str, dtype: DType, params: &P, tensors: &[&Tensor], groups: [u32; 3]) -> Result<()> {
        self.dispatch_with(shader, entry, dtype, "", params, tensors, groups)
    }

    /// `dispatch` of a kernel specialised by `defines` (see `pipeline`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch_with<P: KernelParams>(
        &self,
        shader: &Shader<P>,
        entry: &'static str,
        dtype: DType,
        defines: &str,
        params: &P,
        tensors: &[&Tensor],
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.iter().any(|&g| g > MAX_GROUPS_PER_DIM) {
            return Err(Error::InvalidParameter(format!("{}::{entry}: grid {groups:?} exceeds {MAX_GROUPS_PER_DIM} per dimension", shader.name)));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let bytes = bytemuck::bytes_of(params);
        if bytes.len() > UNIFORM_SLOT as usize {
            return Err(Error::InvalidParameter(format!("{}::{entry}: {} bytes of parameters exceed {UNIFORM_SLOT}", shader.name, bytes.len())));
        }
        let pipeline = self.pipeline(shader, entry, dtype, defines);
        let offset = self.pending_dispatches.get() as u64 * UNIFORM_SLOT;
        {
            let mut data = self.uniform_data.borrow_mut();
            data.resize(offset as usize, 0);
            data.extend_from_slice(bytes);
        }
        let uniform = wgpu::BufferBinding { buffer: &self.uniforms, offset, size: std::num::NonZeroU64::new(bytes.len() as u64) };
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: wgpu::BindingResource::Buffer(uniform) }];
        entries.extend(
            tensors
                .iter()
                .enumerate()
                .map(|(i, t)| wgpu::BindGroupEntry { binding: i as u32 + 1, resource: t.buffer.raw.as_entire_binding() }),
        );
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        {
            let mut open = self.pass.borrow_mut();
            let pass = match &mut *open {
                Some(pass) => pass,
                None => {
                    let mut pending = self.pending.borrow_mut();
                    let encoder = pending.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
                    open.insert(encoder.begin_compute_pass(&Default::default()).forget_lifetime())
                }
            };
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        self.pending_dispatches.set(self.pending_dispatches.get() + 1);
        self.count(|c| c.dispatches += 1);
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

#[cfg(test)]
mod tests {
    use super::*;

    kernel_params! { struct ExampleParams { n: u32, scale: f32, offset: i32, _p0: u32 } }
    kernel_ids! {
        #[allow(non_camel_case_types, dead_code)] // ggml-style names; only the constants are read
        enum ExampleIds as "MODE" {
            Plain = 0,
            QuickGelu = 2,
            Q4_K = 7,
        }
    }

    #[test]
    fn kernel_declarations_become_wgsl() {
        assert_eq!(ExampleParams::WGSL, "struct Params {\n    n: u32,\n    scale: f32,\n    offset: i32,\n    _p0: u32,\n}\n");
        assert_eq!(
            bytemuck::bytes_of(&ExampleParams { n: 3, scale: 0.5, offset: -1, _p0: 0 }),
            [3u32, 0.5f32.to_bits(), (-1i32) as u32, 0].iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>()
        );
        assert_eq!(
            ExampleIds::KERNEL_IDS.wgsl(),
            "const MODE_PLAIN: u32 = 0u;\nconst MODE_QUICK_GELU: u32 = 2u;\nconst MODE_Q4_K: u32 = 7u;\n"
        );
        assert_eq!(ExampleIds::Q4_K as u32, 7);
    }

    /// A buffer over the device's size limit: a validation error (tests/gpu_faults.rs forces a
    /// real out-of-memory; this one needs no memory).
    fn invalid_buffer(gpu: &Gpu) -> wgpu::Buffer {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("over the limit"),
            size: gpu.device.limits().max_buffer_size + 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    #[test]
    fn a_gpu_error_fails_its_operation_only() {
        pollster::block_on(async {
            let gpu = Gpu::new(Precision::F32).await.unwrap();
            let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
            let roundtrip = || gpu.operation(async { gpu.read(&gpu.upload(&values, &[16])?).await });
            assert_eq!(roundtrip().await.unwrap(), values);

            // The work after the error "succeeds" (as a load whose uploads ran out of memory
            // used to): the operation still fails, with the GPU's error.
            let failed = gpu
                .operation(async {
                    invalid_buffer(&gpu);
                    gpu.read(&gpu.upload(&values, &[16])?).await.map(drop)
                })
                .await;
            assert!(matches!(&failed, Err(Error::Gpu(m)) if m.contains("over the limit")), "{failed:?}");
            // An error mid-way stops the operation at its next sync.
            let mut reached = false;
            let stopped = gpu
                .operation(async {
                    invalid_buffer(&gpu);
                    gpu.sync().await?;
                    reached = true;
                    Ok(())
                })
                .await;
            assert!(stopped.is_err() && !reached, "{stopped:?}");
            for _ in 0..3 {
                assert_eq!(roundtrip().await.unwrap(), values, "the operation after a failed one");
            }
            // Outside any operation an error is reported once, by the next sync.
            invalid_buffer(&gpu);
            assert!(gpu.sync().await.is_err());
            assert!(gpu.sync().await.is_ok());
        });
    }
}
