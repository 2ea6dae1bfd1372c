//! A file the user picked or dropped (a JS `File` / `Blob`) as a [`Source`] holding one file: read
//! a byte range at a time (`blob.slice().arrayBuffer()`), so a multi-GB file never enters wasm
//! memory whole.

use std::cell::Cell;

use js_sys::Uint8Array;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use super::js::JsFailure;
use crate::error::{Error, Result};
use crate::weights::Source;

pub struct BlobSource {
    blob: Blob,
    /// The file's name: the one path this source holds.
    name: String,
    size: u64,
    read: Cell<u64>,
}

impl BlobSource {
    /// `blob` must be a JS `Blob` (a `File` is one); `name` is what errors and the path call it.
    pub fn new(blob: JsValue, name: &str) -> Result<BlobSource> {
        match blob.dyn_into::<Blob>() {
            Ok(blob) => Ok(BlobSource { size: blob.size() as u64, blob, name: name.to_string(), read: Cell::new(0) }),
            Err(_) => Err(Error::InvalidParameter(format!("'{name}' is not a File or Blob"))),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes read so far (progress).
    pub fn bytes_read(&self) -> u64 {
        self.read.get()
    }

    async fn slice(&self, start: u64, end: u64) -> std::result::Result<Uint8Array, JsFailure> {
        let slice = self.blob.slice_with_f64_and_f64(start as f64, end as f64)?;
        Ok(Uint8Array::new(&JsFuture::from(slice.array_buffer()).await?))
    }

    fn check(&self, path: &str) -> Result<()> {
        match path == self.name {
            true => Ok(()),
            false => Err(Error::Io { path: self.describe(path), message: format!("the picked file is '{}'", self.name) }),
        }
    }
}

impl Source for BlobSource {
    fn describe(&self, path: &str) -> String {
        format!("file {path}")
    }
    async fn exists(&self, path: &str) -> bool {
        path == self.name
    }
    async fn len(&self, path: &str) -> Result<u64> {
        self.check(path)?;
        Ok(self.size)
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        self.check(path)?;
        if start > end || end > self.size {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} lie outside the {}-byte file", self.size) });
        }
        let bytes = self.slice(start, end).await.map_err(|f| Error::Io {
            path: self.describe(path),
            message: format!("the browser could not read the file ({}: {}); pick it again", f.name, f.message),
        })?;
        if bytes.length() as u64 != end - start {
            return Err(Error::Io {
                path: self.describe(path),
                message: format!("read {} of bytes {start}..{end}: the file changed since it was picked; pick it again", bytes.length()),
            });
        }
        self.read.set(self.read.get() + bytes.length() as u64);
        Ok(bytes.to_vec())
    }
}
