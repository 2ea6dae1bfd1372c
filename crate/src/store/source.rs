//! A stored model's records seen as a model folder, for [`crate::pack::PackSource`]: records are
//! read whole, one at a time (the loader reads tensors in pack order, so each record is read once),
//! and every one is checked against the manifest's sha256 as it is read: a damaged record fails
//! the load that reads it, every time (the hash costs less than the read and the upload; see
//! docs/store.md for the policy and its cost).

use std::cell::RefCell;
use std::collections::HashMap;

use super::{Bytes, RecordStore};
use crate::error::{Error, Result};
use crate::pack::{Manifest, MANIFEST};
use crate::weights::Source;

pub struct StoreSource<'a, R: RecordStore> {
    records: &'a R,
    /// Told the bytes of every read.
    on_read: &'a dyn Fn(u64),
    id: String,
    /// Record sizes by path within the model.
    sizes: HashMap<String, u64>,
    /// The manifest's sha256 of each record.
    sha256: HashMap<String, String>,
    cache: RefCell<Option<(String, Bytes)>>,
}

impl<'a, R: RecordStore> StoreSource<'a, R> {
    pub(crate) async fn open(records: &'a R, id: &str, on_read: &'a dyn Fn(u64)) -> Result<StoreSource<'a, R>> {
        let prefix = format!("{id}/");
        let sizes: HashMap<String, u64> =
            records.list(&prefix).await?.into_iter().map(|(k, n)| (k[prefix.len()..].to_string(), n)).collect();
        let mut source = StoreSource { records, on_read, id: id.to_string(), sizes, sha256: HashMap::new(), cache: RefCell::default() };
        let manifest: Manifest = serde_json::from_slice(&source.read(MANIFEST).await?)
            .map_err(|e| Error::Config { path: source.describe(MANIFEST), message: format!("invalid manifest: {e}") })?;
        source.sha256 = manifest.shards.into_iter().map(|s| (s.path, s.sha256)).collect();
        Ok(source)
    }

    async fn record(&self, path: &str) -> Result<Bytes> {
        if let Some((cached, bytes)) = &*self.cache.borrow() {
            if cached == path {
                return Ok(bytes.clone());
            }
        }
        let key = format!("{}/{path}", self.id);
        let bytes = self.records.get(&key).await?.ok_or_else(|| Error::ModelIncomplete(format!("{} is missing", self.records.describe(&key))))?;
        if let Some(want) = self.sha256.get(path) {
            let got = bytes.sha256().await;
            if &got != want {
                return Err(Error::Corrupt {
                    path: self.records.describe(&key),
                    message: format!("sha256 {got} does not match the manifest's {want}: load or download the model again from its origin to repair the record"),
                });
            }
        }
        *self.cache.borrow_mut() = Some((path.to_string(), bytes.clone()));
        Ok(bytes)
    }
}

impl<R: RecordStore> Source for StoreSource<'_, R> {
    fn describe(&self, path: &str) -> String {
        self.records.describe(&format!("{}/{path}", self.id))
    }
    async fn exists(&self, path: &str) -> bool {
        self.sizes.contains_key(path)
    }
    async fn len(&self, path: &str) -> Result<u64> {
        self.sizes.get(path).copied().ok_or_else(|| Error::ModelIncomplete(format!("{} is missing", self.describe(path))))
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let bytes = self.record(path).await?;
        if start > end || end > bytes.len() {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} out of range of {}", bytes.len()) });
        }
        (self.on_read)(end - start);
        Ok(bytes.slice(start, end))
    }
}
