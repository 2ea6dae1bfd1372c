//! Files by path: where a model's bytes come from (a folder on disk, memory, HTTP, the store's
//! records, a file the user picked). Every format above reads through [`Source`], one byte range
//! at a time, so no file is ever held whole.

use std::collections::HashMap;
use std::rc::Rc;

use serde::de::DeserializeOwned;

use super::Fetch;
use crate::error::{Error, Result};

/// Read access to files by relative path (`unet/config.json`).
#[allow(async_fn_in_trait)]
pub trait Source {
    /// Human-readable location of `path`, for errors.
    fn describe(&self, path: &str) -> String;
    async fn exists(&self, path: &str) -> bool;
    async fn len(&self, path: &str) -> Result<u64>;
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>>;
    async fn read(&self, path: &str) -> Result<Vec<u8>> {
        let n = self.len(path).await?;
        self.read_range(path, 0, n).await
    }
}

impl<S: Source> Source for &S {
    fn describe(&self, path: &str) -> String {
        (**self).describe(path)
    }
    async fn exists(&self, path: &str) -> bool {
        (**self).exists(path).await
    }
    async fn len(&self, path: &str) -> Result<u64> {
        (**self).len(path).await
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        (**self).read_range(path, start, end).await
    }
}

/// [`Source`] as a trait object (what a [`SharedSource`] holds); every `Source` is one.
/// (Its methods carry a suffix so that both traits can be in scope.)
pub trait DynSource {
    fn describe_dyn(&self, path: &str) -> String;
    fn exists_dyn<'a>(&'a self, path: &'a str) -> Fetch<'a, bool>;
    fn len_dyn<'a>(&'a self, path: &'a str) -> Fetch<'a, u64>;
    fn read_range_dyn<'a>(&'a self, path: &'a str, start: u64, end: u64) -> Fetch<'a, Vec<u8>>;
}

impl<S: Source> DynSource for S {
    fn describe_dyn(&self, path: &str) -> String {
        self.describe(path)
    }
    fn exists_dyn<'a>(&'a self, path: &'a str) -> Fetch<'a, bool> {
        Box::pin(async move { Ok(self.exists(path).await) })
    }
    fn len_dyn<'a>(&'a self, path: &'a str) -> Fetch<'a, u64> {
        Box::pin(self.len(path))
    }
    fn read_range_dyn<'a>(&'a self, path: &'a str, start: u64, end: u64) -> Fetch<'a, Vec<u8>> {
        Box::pin(self.read_range(path, start, end))
    }
}

/// One source shared by everything reading a model (its configs and each component's tensors).
#[derive(Clone)]
pub struct SharedSource<'a>(Rc<dyn DynSource + 'a>);

impl<'a> SharedSource<'a> {
    pub fn new(source: impl Source + 'a) -> SharedSource<'a> {
        SharedSource(Rc::new(source))
    }
}

impl Source for SharedSource<'_> {
    fn describe(&self, path: &str) -> String {
        self.0.describe_dyn(path)
    }
    async fn exists(&self, path: &str) -> bool {
        self.0.exists_dyn(path).await.unwrap_or(false)
    }
    async fn len(&self, path: &str) -> Result<u64> {
        self.0.len_dyn(path).await
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        self.0.read_range_dyn(path, start, end).await
    }
}

/// A folder on disk.
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSource {
    root: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl DirSource {
    pub fn new(root: impl Into<std::path::PathBuf>) -> DirSource {
        DirSource { root: root.into() }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Source for DirSource {
    fn describe(&self, path: &str) -> String {
        self.root.join(path).display().to_string()
    }
    async fn exists(&self, path: &str) -> bool {
        self.root.join(path).is_file()
    }
    async fn len(&self, path: &str) -> Result<u64> {
        std::fs::metadata(self.root.join(path)).map(|m| m.len()).map_err(|e| Error::Io { path: self.describe(path), message: e.to_string() })
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |e: std::io::Error| Error::Io { path: self.describe(path), message: e.to_string() };
        let mut f = std::fs::File::open(self.root.join(path)).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if start > end || end > len {
            return Err(Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} lie outside the {len}-byte file") });
        }
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = vec![0; (end - start) as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

/// Files held in memory (configs made up for a single file, tests, pages that hold the bytes).
#[derive(Default, Clone)]
pub struct MemorySource {
    files: HashMap<String, Rc<Vec<u8>>>,
}

impl MemorySource {
    pub fn insert(&mut self, path: &str, bytes: Vec<u8>) {
        self.files.insert(path.to_string(), Rc::new(bytes));
    }
    fn get(&self, path: &str) -> Result<&[u8]> {
        self.files.get(path).map(|b| b.as_slice()).ok_or_else(|| Error::Io { path: self.describe(path), message: "no such file".into() })
    }
}

impl Source for MemorySource {
    fn describe(&self, path: &str) -> String {
        format!("memory:{path}")
    }
    async fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }
    async fn len(&self, path: &str) -> Result<u64> {
        Ok(self.get(path)?.len() as u64)
    }
    async fn read_range(&self, path: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let bytes = self.get(path)?;
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| bytes.get(s..e))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Io { path: self.describe(path), message: format!("bytes {start}..{end} out of range of {}", bytes.len()) })
    }
}

/// Reads and parses a JSON file.
pub async fn read_json<T: DeserializeOwned>(source: &impl Source, path: &str) -> Result<T> {
    let bytes = source.read(path).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Config { path: source.describe(path), message: format!("invalid JSON: {e}") })
}

/// `name` (a file a model's index names, relative to `dir`) as a path inside `dir`: plain file
/// names only, so an index cannot point a reader outside its model's folder.
pub fn confined(dir: &str, name: &str) -> Option<String> {
    let plain = !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".." && !name.contains('\0');
    plain.then(|| if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") })
}
