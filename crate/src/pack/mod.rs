//! Model packs: one SDXL model (base or refiner) as self-contained records of at most
//! [`SHARD_BYTES`] — what the browser stores (one IndexedDB record per shard) and what the GPU
//! upload reads shard by shard.
//!
//! A pack is a folder (or any [`crate::weights::Source`]) holding `manifest.json` and
//! `shards/00000.bin`, `shards/00001.bin`, ... Every shard but the last is exactly `shard_bytes`
//! long. The shards hold, back to back, the small files a model needs (model_index.json, each
//! component's config.json, scheduler/scheduler_config.json, the tokenizers' vocab.json,
//! merges.txt, tokenizer_config.json and special_tokens_map.json) and then every tensor of
//! text_encoder, text_encoder_2, unet and vae, each stored as it will be uploaded: dense f16 (f32
//! only where a value exceeds f16's range), or the planes of a quantized tensor (`data`: u32
//! words, `scales`: f16, `mins`: f16 for q4_1; K-quants: their blocks in `data` alone; the layout
//! of [`crate::quant`]). Every plane (and file) starts 4-byte aligned and is a list of segments
//! `{shard, offset, length}`: a plane larger than what is left of a shard continues at offset 0
//! of the next one. All numbers are little-endian.
//!
//! ```json
//! {
//!   "format": "sdxl-pack",
//!   "version": 1,
//!   "model": "sdxl-base",
//!   "quant": "q8",
//!   "shard_bytes": 67108864,
//!   "shards": [{ "path": "shards/00000.bin", "bytes": 67108864, "sha256": "9f86d0…" }, …],
//!   "files": [{ "path": "unet/config.json", "bytes": 1784, "sha256": "…",
//!               "segments": [{ "shard": 0, "offset": 1360, "length": 1784 }] }, …],
//!   "tensors": [
//!     { "name": "unet/conv_in.weight", "storage": "f16", "shape": [320, 4, 3, 3],
//!       "data": [{ "shard": 0, "offset": 2891776, "length": 23040 }] },
//!     { "name": "unet/down_blocks.1.attentions.0.proj_in.weight", "storage": "q8_0", "shape": [640, 640],
//!       "rows": 640, "cols": 640,
//!       "data": [{ "shard": 3, "offset": 67010560, "length": 98304 }, { "shard": 4, "offset": 0, "length": 311296 }],
//!       "scales": [{ "shard": 4, "offset": 311296, "length": 25600 }] },
//!     …
//!   ]
//! }
//! ```
//!
//! By job: [`manifest`] (the types and their validation), [`read`] (a pack as a
//! [`crate::weights::ModelSource`], and `verify`), [`convert`] (any model to a pack).

pub mod convert;
pub mod manifest;
pub mod read;

pub use convert::{convert, plan, ConvertOptions, ConvertState, PackSink, Plan};
#[cfg(not(target_arch = "wasm32"))]
pub use convert::{convert_path, DirSink};
pub use manifest::{shard_path, Manifest, ModelKind, Pack, PackFile, PackTensor, Segment, Shard, Storage, MANIFEST, SHARD_BYTES};
pub use read::{open, verify};
