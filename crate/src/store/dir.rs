//! The native record store: one file per record under a root folder (`ROOT/model-id/manifest.json`,
//! `ROOT/model-id/shards/00000.bin`), so a stored model's folder is a model pack.

use std::path::{Path, PathBuf};

use super::{Bytes, RecordStore};
use crate::error::{Error, Result};

pub struct DirStore {
    root: PathBuf,
    /// A byte limit standing in for a full disk (tests of running out of space).
    quota: Option<u64>,
}

impl DirStore {
    pub fn new(root: impl Into<PathBuf>) -> DirStore {
        DirStore { root: root.into(), quota: None }
    }

    /// Refuses writes that would take the stored records past `bytes`, as a full disk would.
    pub fn with_quota(mut self, bytes: u64) -> DirStore {
        self.quota = Some(bytes);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty() || key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(Error::InvalidParameter(format!("'{key}' is not a record key")));
        }
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::StorageFull {
            return Error::QuotaExceeded(format!("{}: {e}", self.describe(key)));
        }
        Error::Io { path: self.describe(key), message: e.to_string() }
    }

    fn walk(&self, dir: &Path, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                self.walk(&entry.path(), out)?;
            } else if !entry.file_name().to_string_lossy().ends_with(".partial") {
                let key = entry.path().strip_prefix(&self.root).unwrap_or(&entry.path()).to_string_lossy().replace('\\', "/");
                out.push((key, meta.len()));
            }
        }
        Ok(())
    }
}

impl RecordStore for DirStore {
    fn describe(&self, key: &str) -> String {
        self.root.join(key).display().to_string()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match std::fs::read(self.path(key)?) {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    async fn put(&self, key: &str, bytes: &Bytes) -> Result<()> {
        let path = self.path(key)?;
        if let Some(quota) = self.quota {
            let used: u64 = self.list("").await?.iter().filter(|(k, _)| k != key).map(|(_, n)| n).sum();
            if used + bytes.len() > quota {
                return Err(Error::QuotaExceeded(format!(
                    "{}: {} bytes do not fit: {used} of {quota} bytes are used",
                    self.describe(key),
                    bytes.len()
                )));
            }
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| self.io(key, e))?;
        }
        // Written aside, then renamed: a record is either whole or absent.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, bytes.vec.as_slice()).map_err(|e| self.io(key, e))?;
        std::fs::rename(&partial, &path).map_err(|e| self.io(key, e))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(key, e)),
        }
        // Drop folders the delete emptied, up to the root.
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| *d != self.root) {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut all = Vec::new();
        self.walk(&self.root, &mut all).map_err(|e| self.io(prefix, e))?;
        all.retain(|(k, _)| k.starts_with(prefix));
        all.sort();
        Ok(all)
    }

    async fn available(&self) -> Result<Option<u64>> {
        let Some(quota) = self.quota else { return Ok(None) };
        let used: u64 = self.list("").await?.iter().map(|(_, n)| n).sum();
        Ok(Some(quota.saturating_sub(used)))
    }
}
