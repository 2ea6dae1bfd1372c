//! The browser record store: one IndexedDB database with an object store of records (ArrayBuffers)
//! and one of their sizes, written in the same transaction (listing never reads record bytes).

use std::future::Future;

use js_sys::{Array, Promise, Uint8Array};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbKeyRange, IdbRequest, IdbRequestReadyState, IdbTransaction, IdbTransactionMode, StorageEstimate};

use super::js::{Global, JsFailure};
use super::{Bytes, RecordStore};
use crate::error::{Error, Result};

const RECORDS: &str = "records";
const SIZES: &str = "sizes";

/// A request's result, or the DOMException it failed with. The handlers are set at once (not when
/// the future is first polled), so requests issued together can be awaited one after another.
fn request(q: &IdbRequest) -> impl Future<Output = std::result::Result<JsValue, JsFailure>> {
    // The promise's own resolve and reject are the event handlers: no closures to keep alive.
    let done = JsFuture::from(Promise::new(&mut |resolve, reject| {
        q.set_onsuccess(Some(&resolve));
        q.set_onerror(Some(&reject));
    }));
    let q = q.clone();
    async move {
        match done.await {
            Ok(_) => Ok(q.result()?),
            Err(_) => Err(q.error().ok().flatten().map_or_else(|| JsFailure::new("the request failed"), |e| JsValue::from(e).into())),
        }
    }
}

/// Waits for a transaction to commit. A failed request aborts its transaction, whose error is then
/// the request's (or a failed commit's, such as QuotaExceededError).
fn finished(tx: &IdbTransaction) -> impl Future<Output = std::result::Result<(), JsFailure>> {
    let done = JsFuture::from(Promise::new(&mut |resolve, reject| {
        tx.set_oncomplete(Some(&resolve));
        tx.set_onabort(Some(&reject));
    }));
    let tx = tx.clone();
    async move {
        done.await.map(drop).map_err(|_| match tx.error() {
            Some(e) => JsValue::from(e).into(),
            None => JsFailure { name: "AbortError".into(), ..JsFailure::new("transaction aborted") },
        })
    }
}

/// Opens version 1 of the database `name`, creating its object stores where it is new.
async fn open_database(name: &str) -> std::result::Result<IdbDatabase, JsFailure> {
    let q = Global::get()?.indexed_db()?.open_with_u32(name, 1)?;
    let create_stores = Closure::<dyn FnMut()>::new({
        let q = q.clone();
        move || {
            if let Ok(db) = q.result() {
                let db: IdbDatabase = db.unchecked_into();
                let _ = db.create_object_store(RECORDS);
                let _ = db.create_object_store(SIZES);
            }
        }
    });
    q.set_onupgradeneeded(Some(create_stores.as_ref().unchecked_ref()));
    let opened = JsFuture::from(Promise::new(&mut |resolve, reject| {
        q.set_onsuccess(Some(&resolve));
        q.set_onerror(Some(&reject));
        q.set_onblocked(Some(&reject));
    }));
    match opened.await {
        Ok(_) => Ok(q.result()?.unchecked_into()),
        Err(_) if q.ready_state() == IdbRequestReadyState::Pending => {
            // Blocked: the upgrade may still run once the other tab lets go.
            create_stores.forget();
            Err(JsFailure::new(format!("IndexedDB '{name}' is held open by another tab")))
        }
        Err(_) => Err(q.error().ok().flatten().map_or_else(|| JsFailure::new("the request failed"), |e| JsValue::from(e).into())),
    }
}

fn both_stores() -> Array {
    Array::of2(&RECORDS.into(), &SIZES.into())
}

async fn read(db: &IdbDatabase, key: &str) -> std::result::Result<Option<Uint8Array>, JsFailure> {
    let value = request(&db.transaction_with_str(RECORDS)?.object_store(RECORDS)?.get(&key.into())?).await?;
    Ok((!value.is_undefined()).then(|| Uint8Array::new(&value)))
}

async fn write(db: &IdbDatabase, key: &str, bytes: &Uint8Array) -> std::result::Result<(), JsFailure> {
    let tx = db.transaction_with_str_sequence_and_mode(&both_stores(), IdbTransactionMode::Readwrite)?;
    // Store exactly these bytes: cloning a view would clone its whole buffer.
    let whole = bytes.byte_offset() == 0 && bytes.byte_length() == bytes.buffer().byte_length();
    let buffer = if whole { bytes.buffer() } else { bytes.slice(0, bytes.length()).buffer() };
    let key = JsValue::from_str(key);
    tx.object_store(RECORDS)?.put_with_key(&buffer, &key)?;
    tx.object_store(SIZES)?.put_with_key(&bytes.length().into(), &key)?;
    finished(&tx).await
}

async fn remove(db: &IdbDatabase, key: &str) -> std::result::Result<(), JsFailure> {
    let tx = db.transaction_with_str_sequence_and_mode(&both_stores(), IdbTransactionMode::Readwrite)?;
    let key = JsValue::from_str(key);
    tx.object_store(RECORDS)?.delete(&key)?;
    tx.object_store(SIZES)?.delete(&key)?;
    finished(&tx).await
}

async fn record_sizes(db: &IdbDatabase, prefix: &str) -> std::result::Result<Vec<(String, u64)>, JsFailure> {
    let store = db.transaction_with_str(SIZES)?.object_store(SIZES)?;
    let range = IdbKeyRange::bound(&prefix.into(), &format!("{prefix}\u{ffff}").into())?;
    let (keys, sizes) = (request(&store.get_all_keys_with_key(&range)?), request(&store.get_all_with_key(&range)?));
    let (keys, sizes): (Array, Array) = (keys.await?.unchecked_into(), sizes.await?.unchecked_into());
    Ok(keys.iter().zip(sizes.iter()).map(|(key, size)| (key.as_string().unwrap_or_default(), size.as_f64().unwrap_or(0.0) as u64)).collect())
}

/// What the browser's quota leaves, where it says.
async fn storage_available() -> std::result::Result<Option<u64>, JsFailure> {
    let Some(storage) = Global::get()?.storage() else { return Ok(None) };
    let estimate: StorageEstimate = JsFuture::from(storage.estimate()?).await?.unchecked_into();
    Ok(estimate.get_quota().map(|quota| (quota - estimate.get_usage().unwrap_or(0.0)).max(0.0) as u64))
}

pub struct IdbStore {
    name: String,
    db: IdbDatabase,
    /// A byte limit standing in for the browser's quota (tests of running out of space).
    quota: Option<u64>,
}

impl IdbStore {
    /// Opens (creating if needed) the database `name`.
    pub async fn open(name: &str) -> Result<IdbStore> {
        let db = open_database(name).await.map_err(|f| Error::Io { path: format!("IndexedDB '{name}'"), message: f.message })?;
        Ok(IdbStore { name: name.to_string(), db, quota: None })
    }

    /// Refuses writes that would take the stored records past `bytes`, as a full quota would.
    pub fn with_quota(mut self, bytes: u64) -> IdbStore {
        self.quota = Some(bytes);
        self
    }

    fn error(&self, key: &str, f: JsFailure) -> Error {
        if f.name == "QuotaExceededError" {
            return Error::QuotaExceeded(format!("{}: the browser refused the write ({})", self.describe(key), f.message));
        }
        Error::Io { path: self.describe(key), message: format!("{} {}", f.name, f.message).trim().to_string() }
    }

    async fn used(&self) -> Result<u64> {
        Ok(self.list("").await?.iter().map(|(_, n)| n).sum())
    }
}

impl RecordStore for IdbStore {
    fn describe(&self, key: &str) -> String {
        format!("IndexedDB '{}' record '{key}'", self.name)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let array = read(&self.db, key).await.map_err(|f| self.error(key, f))?;
        Ok(array.map(|array| Bytes { array }))
    }

    async fn put(&self, key: &str, bytes: &Bytes) -> Result<()> {
        if let Some(quota) = self.quota {
            let used = self.used().await?;
            if used + bytes.len() > quota {
                return Err(Error::QuotaExceeded(format!("{}: {} bytes do not fit: {used} of {quota} bytes are used", self.describe(key), bytes.len())));
            }
        }
        write(&self.db, key, &bytes.array).await.map_err(|f| self.error(key, f))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        remove(&self.db, key).await.map_err(|f| self.error(key, f))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = record_sizes(&self.db, prefix).await.map_err(|f| self.error(prefix, f))?;
        out.sort();
        Ok(out)
    }

    async fn available(&self) -> Result<Option<u64>> {
        let browser = storage_available().await.map_err(|f| self.error("", f))?;
        let simulated = match self.quota {
            Some(quota) => Some(quota.saturating_sub(self.used().await?)),
            None => None,
        };
        Ok(match (browser, simulated) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    async fn persist(&self) -> bool {
        let Some(storage) = Global::get().ok().and_then(|global| global.storage()) else { return false };
        // A worker's storage manager has no persist(): that throws, and counts as a refusal.
        match storage.persist() {
            Ok(asked) => JsFuture::from(asked).await.is_ok_and(|agreed| agreed.is_truthy()),
            Err(_) => false,
        }
    }
}
