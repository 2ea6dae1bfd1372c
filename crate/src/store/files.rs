//! Single safetensors files in a record store: LoRAs, and (in a store of their own) preview
//! decoders, kept as the files they are (tens to hundreds of MB): the file in records of
//! [`FILE_RECORD`] bytes under `{id}/`, then `{id}/lora.json` (its name, origin, size, A1111 short
//! hash and each record's sha256; named so for every kind, as stores already hold it), written
//! last so that an interrupted store is never taken for a complete one. [`FileStore::open`]
//! serves a stored file as a [`Source`] holding it, every record checked against its sha256 as it
//! is read.

use std::cell::RefCell;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::models::check_id;
use super::{Bytes, RecordStore};
use crate::error::{mib, Error, Result};
use crate::weights::lora::{LoraFile, ShortHash};
use crate::weights::Source;

/// Bytes per record of a stored file.
pub const FILE_RECORD: u64 = 16 << 20;
/// Records a stored file's source keeps once read (in the browser as JS arrays, outside wasm
/// memory): a LoRA's factors are read layer by layer, not in file order, so every LoRA up to
/// this size is fetched and checked once.
const CACHE_BYTES: u64 = 1 << 30;
const INFO: &str = "lora.json";

/// A stored file (a LoRA or a preview decoder) as the JS API lists it.
#[derive(Debug, Clone, PartialEq, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
#[tsify(missing_as_null)] // as StoredModel's
pub struct StoredFile {
    pub id: String,
    /// The file's name.
    pub file: Option<String>,
    /// Where it came from: its URL, or a picked file's name, size and date.
    pub origin: Option<String>,
    pub stored_bytes: u64,
    /// AUTOMATIC1111's short hash (the PNG recipe's `Lora hashes`).
    pub hash: Option<String>,
    /// False for a store that was interrupted (store it again, or delete it).
    pub complete: bool,
}

/// `{id}/lora.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Info {
    file: String,
    origin: String,
    bytes: u64,
    hash: String,
    /// The sha256 of each record, in order.
    records: Vec<String>,
}

/// Stored safetensors files by id: LoRAs, or (a store of its own) preview decoders.
pub struct FileStore<R: RecordStore> {
    records: R,
    /// What the files are, for messages ("LoRA").
    noun: &'static str,
}

fn record_key(id: &str, index: usize) -> String {
    format!("{id}/data/{index:05}.bin")
}

impl<R: RecordStore> FileStore<R> {
    pub fn new(records: R) -> FileStore<R> {
        FileStore { records, noun: "LoRA" }
    }

    /// A store of other safetensors files (`noun` names them in messages), stored with
    /// [`FileStore::store_file`].
    pub fn of(records: R, noun: &'static str) -> FileStore<R> {
        FileStore { records, noun }
    }

    pub fn records(&self) -> &R {
        &self.records
    }

    async fn info(&self, id: &str) -> Result<Option<Info>> {
        let key = format!("{id}/{INFO}");
        let Some(bytes) = self.records.get(&key).await? else { return Ok(None) };
        let info = serde_json::from_slice(&bytes.slice(0, bytes.len()))
            .map_err(|e| Error::Corrupt { path: self.records.describe(&key), message: format!("invalid JSON: {e}") })?;
        Ok(Some(info))
    }

    /// Every stored file, by id.
    pub async fn list(&self) -> Result<Vec<StoredFile>> {
        let mut sizes: std::collections::BTreeMap<String, u64> = Default::default();
        for (key, n) in self.records.list("").await? {
            if let Some((id, _)) = key.split_once('/') {
                *sizes.entry(id.to_string()).or_default() += n;
            }
        }
        let mut files = Vec::new();
        for (id, stored_bytes) in sizes {
            let info = self.info(&id).await.ok().flatten();
            files.push(StoredFile {
                file: info.as_ref().map(|i| i.file.clone()),
                origin: info.as_ref().map(|i| i.origin.clone()),
                hash: info.as_ref().map(|i| i.hash.clone()),
                complete: info.is_some(),
                stored_bytes,
                id,
            });
        }
        Ok(files)
    }

    /// Stores the LoRA file `file` of `source` (a URL's folder, a picked file) as `id`, unless
    /// `id` holds it from `origin` already. The file is checked to be a LoRA first (its header:
    /// other adapter formats and pickles are refused before anything is stored). `progress` gets
    /// (bytes stored, bytes in all).
    pub async fn store(&self, id: &str, origin: &str, source: &impl Source, file: &str, progress: impl FnMut(u64, u64)) -> Result<StoredFile> {
        self.store_file(id, origin, source, file, async { Ok(LoraFile::open(source, file).await?.data_start()) }, progress).await
    }

    /// Stores `file` as [`FileStore::store`] does, after `checked` (awaited only when the file is
    /// not stored yet) checks what it is and gives where its data section starts.
    pub async fn store_file(
        &self,
        id: &str,
        origin: &str,
        source: &impl Source,
        file: &str,
        checked: impl std::future::Future<Output = Result<u64>>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<StoredFile> {
        let noun = self.noun;
        check_id(id)?;
        if let Some(info) = self.info(id).await? {
            if info.origin != origin {
                return Err(Error::InvalidParameter(format!("{noun} '{id}' already holds {}, not {origin}; delete it first or choose another id", info.origin)));
            }
            return self.stored(id).await;
        }
        let data_start = checked.await?;
        let bytes = source.len(file).await?;
        if let Some(available) = self.records.available().await? {
            if available < bytes {
                return Err(Error::QuotaExceeded(format!("{noun} '{id}' needs {} but only {} of storage is available", mib(bytes), mib(available))));
            }
        }
        // What an interrupted store left (no lora.json) is replaced.
        self.delete(id).await?;
        let written = async {
            let (mut hash, mut records) = (ShortHash::new(data_start), Vec::new());
            for (index, start) in (0..bytes).step_by(FILE_RECORD as usize).enumerate() {
                let end = (start + FILE_RECORD).min(bytes);
                let chunk = source.read_range(file, start, end).await?;
                hash.update(start, &chunk);
                let chunk = Bytes::from(chunk);
                records.push(chunk.sha256().await);
                self.records.put(&record_key(id, index), &chunk).await?;
                progress(end, bytes);
            }
            let info = Info { file: file.to_string(), origin: origin.to_string(), bytes, hash: hash.finish(), records };
            let json = serde_json::to_vec(&info).expect("a file's info serialises");
            self.records.put(&format!("{id}/{INFO}"), &Bytes::from(json)).await
        };
        if let Err(e) = written.await {
            // Best effort: the error says what went wrong; the next store starts over anyway.
            let _ = self.delete(id).await;
            return Err(e);
        }
        self.stored(id).await
    }

    async fn stored(&self, id: &str) -> Result<StoredFile> {
        let all = self.list().await?;
        all.into_iter().find(|l| l.id == id).ok_or_else(|| Error::ModelIncomplete(format!("no {} '{id}' is stored", self.noun)))
    }

    /// Deletes a file's records (lora.json first); returns the bytes freed.
    pub async fn delete(&self, id: &str) -> Result<u64> {
        check_id(id)?;
        self.records.delete_all_under(&format!("{id}/"), INFO).await
    }

    /// A stored file as a source holding it, and the file's name in it.
    pub async fn open(&self, id: &str) -> Result<(StoredFileSource<'_, R>, String)> {
        check_id(id)?;
        let info = self.info(id).await?.ok_or_else(|| {
            Error::ModelIncomplete(format!("no {} '{id}' is stored (or its store was interrupted): store it first", self.noun))
        })?;
        let expected = info.bytes.div_ceil(FILE_RECORD);
        if info.records.len() as u64 != expected {
            return Err(Error::Corrupt { path: self.records.describe(&format!("{id}/{INFO}")), message: format!("{} records for {} bytes", info.records.len(), info.bytes) });
        }
        let file = info.file.clone();
        Ok((StoredFileSource { records: &self.records, noun: self.noun, id: id.to_string(), info, cache: RefCell::default() }, file))
    }
}

/// A stored file, read from its records, each checked against its sha256 when first read and
/// kept (up to [`CACHE_BYTES`]).
pub struct StoredFileSource<'a, R: RecordStore> {
    records: &'a R,
    noun: &'static str,
    id: String,
    info: Info,
    cache: RefCell<HashMap<usize, Bytes>>,
}

impl<R: RecordStore> StoredFileSource<'_, R> {
    async fn record(&self, index: usize) -> Result<Bytes> {
        if let Some(bytes) = self.cache.borrow().get(&index) {
            return Ok(bytes.clone());
        }
        let key = record_key(&self.id, index);
        let bytes = self.records.get(&key).await?.ok_or_else(|| Error::ModelIncomplete(format!("{} is missing: store the {} again", self.records.describe(&key), self.noun)))?;
        let want_len = (self.info.bytes - index as u64 * FILE_RECORD).min(FILE_RECORD);
        let got = bytes.sha256().await;
        if bytes.len() != want_len || got != self.info.records[index] {
            return Err(Error::Corrupt { path: self.records.describe(&key), message: format!("{} bytes with sha256 {got}, not the {want_len} stored: delete the {} and store it again", bytes.len(), self.noun) });
        }
        let mut cache = self.cache.borrow_mut();
        if (cache.len() as u64 + 1) * FILE_RECORD > CACHE_BYTES {
            cache.clear();
        }
        cache.insert(index, bytes.clone());
        Ok(bytes)
    }
}

impl<R: RecordStore> Source for StoredFileSource<'_, R> {
    fn describe(&self, path: &str) -> String {
        format!("stored {} '{}' ({path})", self.noun, self.id)
    }
    async fn exists(&self, path: &str) -> bool {
        path == self.info.file
    }
    async fn len(&self, path: &str) -> Result<u64> {
        match path == self.info.file {
            true => Ok(self.info.bytes),
            false => Err(Error::Io { path: self.describe(path), message: format!("the stored file is '{}'", self.info.file) }),
        }
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let size = self.len(path).await?;
        if start > end || end > size {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} lie outside the {size}-byte file") });
        }
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut at = start;
        while at < end {
            let index = (at / FILE_RECORD) as usize;
            let offset = index as u64 * FILE_RECORD;
            let record = self.record(index).await?;
            let stop = end.min(offset + record.len());
            out.extend_from_slice(&record.slice(at - offset, stop - offset));
            at = stop;
        }
        Ok(out)
    }
}
