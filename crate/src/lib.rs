//! Stable Diffusion XL on WebGPU. Data flows one way:
//! store (downloads, imports, records) → pack (manifest, reader, converter) → weights (byte
//! sources, formats as `TensorSource`s, `ModelSource`, `Vars`, LoRA files) → gpu/ops (`adapt`:
//! LoRA side paths) → models → pipeline → API (`web`: the engine the JS API in web/ drives from a
//! worker).
//! The store hands the models a `weights::ModelSource` over what it stored (`pack::open`) and
//! converts downloads and picked files with `pack`'s converter.

pub mod adapt;
pub mod app;
pub mod bench;
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;
pub mod error;
pub mod gpu;
pub mod models;
pub mod named;
pub mod ops;
mod ops_gemm;
pub mod pack;
pub mod pipeline;
pub mod quant;
pub mod random;
pub mod scheduler;
pub mod store;
pub mod tokenizer;
#[cfg(target_arch = "wasm32")]
pub mod web;
pub mod weights;

pub use error::{Error, Result};
pub use gpu::{DType, Gpu, Precision, Tensor};
