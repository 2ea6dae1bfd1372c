//! Where models live once downloaded, and where they come from.
//!
//! A [`RecordStore`] holds records of at most [`crate::pack::SHARD_BYTES`] by key: IndexedDB in the
//! browser ([`IdbStore`]), a folder natively ([`DirStore`], whose model folders are model packs any
//! `--model` option reads). [`HttpSource`] reads a model folder, pack or single file over HTTP with
//! range requests and retries; in the browser, `BlobSource` reads a file the user picked. [`ModelStore`] puts them together: download (a pack record by record, or a
//! diffusers folder converted tensor by tensor as it streams in), resume, repair, list, delete,
//! verify, and [`ModelStore::open`] to load a stored model record by record. [`FileStore`] keeps
//! single files (LoRAs, preview decoders) as they are, beside the models.
//!
//! Record bytes travel as [`Bytes`]: in the browser a JS `Uint8Array` outside wasm memory, so that
//! downloading a pack never copies a shard into the wasm heap and loading copies one tensor at a
//! time.

mod http;
mod files;
mod models;
mod source;

#[cfg(not(target_arch = "wasm32"))]
mod dir;
#[cfg(target_arch = "wasm32")]
mod blob;
#[cfg(target_arch = "wasm32")]
mod idb;
#[cfg(target_arch = "wasm32")]
mod js;

#[cfg(not(target_arch = "wasm32"))]
pub use dir::DirStore;
pub use http::{hub_url, HttpSource, StatedHashes};
#[cfg(target_arch = "wasm32")]
pub use blob::BlobSource;
#[cfg(target_arch = "wasm32")]
pub use idb::IdbStore;
pub use files::{FileStore, StoredFile, StoredFileSource, FILE_RECORD};
pub use models::{url_origin, DownloadOptions, ModelStore, Progress, StoredModel};
pub use source::StoreSource;

use crate::error::Result;

/// Keyed records. Keys are `/`-separated paths (`model-id/shards/00000.bin`).
#[allow(async_fn_in_trait)]
pub trait RecordStore {
    /// Where `key` lives, for errors.
    fn describe(&self, key: &str) -> String;
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;
    /// Stores `bytes` under `key`, replacing what was there. Running out of space is
    /// [`crate::Error::QuotaExceeded`].
    async fn put(&self, key: &str, bytes: &Bytes) -> Result<()>;
    async fn delete(&self, key: &str) -> Result<()>;
    /// Keys starting with `prefix`, with their record sizes, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>>;
    /// Bytes that can still be stored, where the platform says.
    async fn available(&self) -> Result<Option<u64>>;
    /// Asks the platform to keep the records under storage pressure; whether it agreed.
    async fn persist(&self) -> bool {
        true
    }

    /// Deletes the records under `prefix`, the one whose key ends with `first` (what marks them
    /// complete) first, so that an interrupted delete leaves them incomplete, never broken and
    /// complete. Returns the bytes freed.
    async fn delete_all_under(&self, prefix: &str, first: &str) -> Result<u64> {
        let mut records = self.list(prefix).await?;
        records.sort_by_key(|(k, _)| !k.ends_with(first));
        let mut freed = 0;
        for (key, n) in records {
            self.delete(&key).await?;
            freed += n;
        }
        Ok(freed)
    }
}

/// Record bytes: a JS `Uint8Array` in the browser (outside wasm memory), a `Vec<u8>` natively.
#[derive(Clone)]
pub struct Bytes {
    #[cfg(target_arch = "wasm32")]
    array: js_sys::Uint8Array,
    #[cfg(not(target_arch = "wasm32"))]
    vec: std::rc::Rc<Vec<u8>>,
}

impl Bytes {
    pub fn len(&self) -> u64 {
        #[cfg(target_arch = "wasm32")]
        return self.array.length() as u64;
        #[cfg(not(target_arch = "wasm32"))]
        return self.vec.len() as u64;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `start..end`, copied into wasm memory (callers check the range).
    pub fn slice(&self, start: u64, end: u64) -> Vec<u8> {
        #[cfg(target_arch = "wasm32")]
        return self.array.subarray(start as u32, end as u32).to_vec();
        #[cfg(not(target_arch = "wasm32"))]
        return self.vec[start as usize..end as usize].to_vec();
    }

    /// Lowercase hex sha256 (WebCrypto in the browser).
    pub async fn sha256(&self) -> String {
        #[cfg(target_arch = "wasm32")]
        return js::sha256_hex(&self.array).await;
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::pack::manifest::sha256_hex(self.vec.as_slice())
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(vec: Vec<u8>) -> Bytes {
        #[cfg(target_arch = "wasm32")]
        return Bytes { array: js_sys::Uint8Array::from(vec.as_slice()) };
        #[cfg(not(target_arch = "wasm32"))]
        return Bytes { vec: std::rc::Rc::new(vec) };
    }
}

impl From<&[u8]> for Bytes {
    fn from(bytes: &[u8]) -> Bytes {
        #[cfg(target_arch = "wasm32")]
        return Bytes { array: js_sys::Uint8Array::from(bytes) };
        #[cfg(not(target_arch = "wasm32"))]
        return Bytes { vec: std::rc::Rc::new(bytes.to_vec()) };
    }
}

/// Waits `ms` milliseconds (retry backoff).
pub(crate) async fn sleep(ms: u64) {
    #[cfg(target_arch = "wasm32")]
    js::sleep(ms).await;
    #[cfg(not(target_arch = "wasm32"))]
    std::thread::sleep(std::time::Duration::from_millis(ms));
}
