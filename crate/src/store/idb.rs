//! The browser record store: one IndexedDB database with an object store of records (ArrayBuffers)
//! and one of their sizes, written in the same transaction (listing never reads record bytes).

use js_sys::{Array, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};

use super::js::{self, JsFailure};
use super::{Bytes, RecordStore};
use crate::error::{Error, Result};

pub struct IdbStore {
    name: String,
    db: JsValue,
    /// A byte limit standing in for the browser's quota (tests of running out of space).
    quota: Option<u64>,
}

impl IdbStore {
    /// Opens (creating if needed) the database `name`.
    pub async fn open(name: &str) -> Result<IdbStore> {
        let db = js::idb_open(name).await.map_err(|e| Error::Io { path: format!("IndexedDB '{name}'"), message: JsFailure::from(e).message })?;
        Ok(IdbStore { name: name.to_string(), db, quota: None })
    }

    /// Refuses writes that would take the stored records past `bytes`, as a full quota would.
    pub fn with_quota(mut self, bytes: u64) -> IdbStore {
        self.quota = Some(bytes);
        self
    }

    fn error(&self, key: &str, e: JsValue) -> Error {
        let f = JsFailure::from(e);
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
        let value = js::idb_get(&self.db, key).await.map_err(|e| self.error(key, e))?;
        Ok((!value.is_undefined()).then(|| Bytes { array: value.unchecked_into::<Uint8Array>() }))
    }

    async fn put(&self, key: &str, bytes: &Bytes) -> Result<()> {
        if let Some(quota) = self.quota {
            let used = self.used().await?;
            if used + bytes.len() > quota {
                return Err(Error::QuotaExceeded(format!("{}: {} bytes do not fit: {used} of {quota} bytes are used", self.describe(key), bytes.len())));
            }
        }
        js::idb_put(&self.db, key, &bytes.array).await.map_err(|e| self.error(key, e))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        js::idb_delete(&self.db, key).await.map_err(|e| self.error(key, e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let pairs: Array = js::idb_list(&self.db, prefix).await.map_err(|e| self.error(prefix, e))?.unchecked_into();
        let mut out: Vec<(String, u64)> = pairs
            .iter()
            .map(|pair| {
                let pair: Array = pair.unchecked_into();
                (pair.get(0).as_string().unwrap_or_default(), pair.get(1).as_f64().unwrap_or(0.0) as u64)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn available(&self) -> Result<Option<u64>> {
        let browser = js::storage_available().await.map_err(|e| self.error("", e))?.as_f64().filter(|&n| n >= 0.0).map(|n| n as u64);
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
        js::storage_persist().await.as_bool().unwrap_or(false)
    }
}
