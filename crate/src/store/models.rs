//! Models in a [`RecordStore`]: download, resume, repair, list, delete, verify, open.
//!
//! A model `id` is stored as the records of a model pack under `id/` (`id/shards/00000.bin`, ...),
//! plus `id/download.json` (where it comes from) and, while a diffusers folder is being converted,
//! `id/conversion.json`. `id/manifest.json` is written last: a model without it is incomplete,
//! and nothing loads it.
//!
//! Downloading a pack fetches the shards the store lacks (a few at a time), checks each against
//! the manifest's sha256 before storing it, and re-checks the records already stored, so calling
//! [`ModelStore::download`] again after an interruption, a network failure or damage fetches only
//! what is missing or bad. Downloading a diffusers folder (a Hugging Face repository) or a
//! single-file checkpoint (safetensors or GGUF) converts it as it streams in
//! ([`crate::pack::convert`]: headers first, then tensor by tensor, float weights quantized on the
//! fly, GGUF blocks kept as stored); it resumes from the last saved state, and a damaged record of
//! a finished conversion is rebuilt from the tensors it holds. [`ModelStore::import`] does the
//! same for any model source (a file the user picked in the browser).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use serde::{Deserialize, Serialize};

use super::{Bytes, HttpSource, RecordStore, StoreSource};
use crate::error::{mib, Error, Result};
use crate::pack::convert::encode;
use crate::pack::{self, ConvertState, Manifest, ModelKind, Pack, PackSink, Segment, MANIFEST, SHARD_BYTES};
use crate::quant::QuantPreset;
use crate::weights::{all_rows, ModelSource, Source};

const DOWNLOAD: &str = "download.json";
/// A conversion's [`ConvertState`] while it is unfinished.
const CONVERSION: &str = "conversion.json";

#[derive(Debug, Clone, Copy)]
pub struct DownloadOptions {
    /// A pack must have been made with this preset; a diffusers folder is converted with it.
    pub quant: QuantPreset,
    /// Shards fetched at once.
    pub parallel: usize,
    /// Retries of a failed request (with exponential backoff from 0.5 s).
    pub retries: u32,
    /// Record size when converting a diffusers folder (tests use small ones).
    pub shard_bytes: u64,
}

impl DownloadOptions {
    pub fn new(quant: QuantPreset) -> DownloadOptions {
        DownloadOptions { quant, parallel: 4, retries: 4, shard_bytes: SHARD_BYTES }
    }
}

/// Reported as a download goes: `stage` is "verify" (records already stored), "download" (pack
/// shards) or "convert" (a diffusers folder); bytes count what the stage reads.
#[derive(Debug, Clone)]
pub struct Progress {
    pub stage: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub detail: String,
}

/// A model in the store, complete or not (the JS API lists these).
#[derive(Debug, Clone, PartialEq, Serialize, tsify::Tsify)]
#[serde(rename_all = "camelCase")]
// Options cross as null (the engine serialises missing values as null).
#[tsify(missing_as_null)]
pub struct StoredModel {
    pub id: String,
    pub url: Option<String>,
    pub quant: Option<String>,
    pub model: Option<ModelKind>,
    /// Bytes of the records stored.
    pub stored_bytes: u64,
    /// Bytes of the complete model (for an unfinished conversion: the planned size).
    pub total_bytes: Option<u64>,
    pub complete: bool,
}

/// Where a stored model comes from (`id/download.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Origin {
    url: String,
    quant: String,
    /// Bytes of the complete pack (planned, for a conversion).
    bytes: u64,
}

pub struct ModelStore<R: RecordStore> {
    records: R,
}

impl<R: RecordStore> ModelStore<R> {
    pub fn new(records: R) -> ModelStore<R> {
        ModelStore { records }
    }

    pub fn records(&self) -> &R {
        &self.records
    }

    fn key(id: &str, path: &str) -> String {
        format!("{id}/{path}")
    }

    async fn json<T: for<'de> Deserialize<'de>>(&self, id: &str, path: &str) -> Result<Option<T>> {
        let key = Self::key(id, path);
        let Some(bytes) = self.records.get(&key).await? else { return Ok(None) };
        let parsed = serde_json::from_slice(&bytes.slice(0, bytes.len()))
            .map_err(|e| Error::Corrupt { path: self.records.describe(&key), message: format!("invalid JSON: {e}") })?;
        Ok(Some(parsed))
    }

    async fn put_json(&self, id: &str, path: &str, value: &impl Serialize) -> Result<()> {
        let json = serde_json::to_vec(value).expect("store records always serialise");
        self.records.put(&Self::key(id, path), &Bytes::from(json)).await
    }

    /// Whether `id` holds a complete model from `origin` (a URL as [`url_origin`] gives it, or a
    /// picked file's description); an error if it holds one from elsewhere: two files or URLs
    /// whose names give the same id must not load each other's model.
    pub async fn holds_complete(&self, id: &str, origin: &str) -> Result<bool> {
        let Some(stored) = self.list().await?.into_iter().find(|m| m.id == id) else {
            return Ok(false);
        };
        match (stored.complete, stored.url) {
            (true, Some(url)) if url != origin => Err(Error::InvalidParameter(format!("'{id}' already holds {url}, not {origin}; delete it first or choose another id"))),
            (complete, _) => Ok(complete),
        }
    }

    /// Every model in the store, by id.
    pub async fn list(&self) -> Result<Vec<StoredModel>> {
        let mut by_id: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for (key, n) in self.records.list("").await? {
            if let Some((id, path)) = key.split_once('/') {
                by_id.entry(id.to_string()).or_default().insert(path.to_string(), n);
            }
        }
        let mut models = Vec::new();
        for (id, records) in by_id {
            let origin: Option<Origin> = self.json(&id, DOWNLOAD).await.ok().flatten();
            let manifest: Option<Manifest> = self.json(&id, MANIFEST).await.ok().flatten();
            let complete = manifest.as_ref().is_some_and(|m| m.shards.iter().all(|s| records.get(&s.path) == Some(&s.bytes)));
            models.push(StoredModel {
                url: origin.as_ref().map(|o| o.url.clone()),
                quant: manifest.as_ref().map(|m| m.quant.name().to_string()).or_else(|| origin.as_ref().map(|o| o.quant.clone())),
                model: manifest.as_ref().map(|m| m.model),
                stored_bytes: records.values().sum(),
                total_bytes: manifest.as_ref().map(|m| m.bytes()).or_else(|| origin.as_ref().map(|o| o.bytes)),
                complete,
                id,
            });
        }
        models.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(models)
    }

    /// Deletes a model's records (the manifest first, so that an interrupted delete leaves an
    /// incomplete model, never a broken complete one). Returns the bytes freed.
    pub async fn delete(&self, id: &str) -> Result<u64> {
        check_id(id)?;
        self.records.delete_all_under(&Self::key(id, ""), MANIFEST).await
    }

    /// Deletes every model; returns the bytes freed.
    pub async fn delete_all(&self) -> Result<u64> {
        let mut freed = 0;
        for model in self.list().await? {
            freed += self.delete(&model.id).await?;
        }
        Ok(freed)
    }

    /// Checks every record of a complete model against the manifest's sizes and sha256; returns
    /// the paths of the missing or damaged ones (`download` again re-fetches exactly those).
    pub async fn verify(&self, id: &str) -> Result<Vec<String>> {
        let manifest = self.manifest(id).await?;
        let bad = self.missing_or_bad(id, &manifest.shards, &mut |_| {}).await?;
        Ok(bad.into_iter().map(|i| manifest.shards[i].path.clone()).collect())
    }

    async fn manifest(&self, id: &str) -> Result<Manifest> {
        check_id(id)?;
        match self.json::<Manifest>(id, MANIFEST).await? {
            Some(m) => Ok(m),
            None => Err(self.incomplete(id).await),
        }
    }

    async fn incomplete(&self, id: &str) -> Error {
        let stored: u64 = self.records.list(&Self::key(id, "")).await.map(|r| r.iter().map(|(_, n)| n).sum()).unwrap_or(0);
        if stored == 0 {
            return Error::ModelIncomplete(format!("no model '{id}' is stored; download it first"));
        }
        let total = self.json::<Origin>(id, DOWNLOAD).await.ok().flatten().map_or(String::new(), |o| format!(" of {}", mib(o.bytes)));
        Error::ModelIncomplete(format!("the download of '{id}' is incomplete ({}{total} stored); download it again to resume", mib(stored)))
    }

    /// A complete model, ready for [`crate::pipeline::generate::SdxlModel::load`], with its pack:
    /// records are read one at a time, a sample of them checked against their sha256; `on_read`
    /// gets the bytes of every read (upload progress).
    pub async fn open<'s>(&'s self, id: &str, on_read: &'s dyn Fn(u64)) -> Result<(ModelSource<'s>, std::rc::Rc<Pack>)> {
        self.manifest(id).await?;
        pack::open(StoreSource::open(&self.records, id, on_read).await?).await
    }

    /// Indices of `shards` whose record is missing, of the wrong size or fails its sha256.
    async fn missing_or_bad(&self, id: &str, shards: &[pack::Shard], progress: &mut dyn FnMut(&Progress)) -> Result<Vec<usize>> {
        let stored: HashMap<String, u64> = self.records.list(&Self::key(id, "shards/")).await?.into_iter().collect();
        let total = shards.iter().map(|s| s.bytes).sum();
        let (mut done, mut bad) = (0, Vec::new());
        for (i, shard) in shards.iter().enumerate() {
            let key = Self::key(id, &shard.path);
            let good = match stored.get(&key) {
                Some(&n) if n == shard.bytes => match self.records.get(&key).await? {
                    Some(bytes) => bytes.sha256().await == shard.sha256,
                    None => false,
                },
                _ => false,
            };
            if !good {
                bad.push(i);
            }
            done += shard.bytes;
            progress(&Progress { stage: "verify", bytes_done: done, bytes_total: total, detail: shard.path.clone() });
        }
        Ok(bad)
    }

    async fn check_space(&self, needed: u64) -> Result<()> {
        if let Some(available) = self.records.available().await? {
            if available < needed {
                return Err(Error::QuotaExceeded(format!(
                    "the model needs {} more but only {} of storage is available; free space or delete stored models",
                    mib(needed),
                    mib(available)
                )));
            }
        }
        Ok(())
    }

    /// Records where the model comes from; refuses an id that holds another download.
    async fn begin(&self, id: &str, origin: &Origin) -> Result<()> {
        if let Some(old) = self.json::<Origin>(id, DOWNLOAD).await? {
            if old.url != origin.url || old.quant != origin.quant {
                return Err(Error::InvalidParameter(format!(
                    "'{id}' already holds {} ({}); delete it first or choose another id",
                    old.url, old.quant
                )));
            }
        }
        self.put_json(id, DOWNLOAD, origin).await?;
        self.records.persist().await;
        Ok(())
    }

    /// Downloads the model pack, diffusers folder or single-file checkpoint (`.safetensors`,
    /// `.gguf`) at `url` (a hub repository `owner/name` is its `resolve/main` URL) as `id`, or
    /// completes and repairs an earlier download of it. A folder's or file's bytes are checked
    /// against the sha256 the server states for them where they were read whole, in order.
    pub async fn download(&self, id: &str, url: &str, options: &DownloadOptions, mut progress: impl FnMut(&Progress)) -> Result<Manifest> {
        check_id(id)?;
        if options.parallel == 0 {
            return Err(Error::InvalidParameter("parallel downloads must be at least 1".into()));
        }
        let (http, file) = HttpSource::for_url(url)?;
        let http = http.with_retries(options.retries);
        let fetched = || http.bytes_fetched();
        if let Some(file) = file {
            let model = ModelSource::single_file(&http, &file, None).await?;
            let manifest = self.convert(id, &http.url(&file), &model, options, &fetched, &mut progress).await?;
            return self.check_source(id, &http, manifest, &mut progress).await;
        }
        if http.length(MANIFEST).await?.is_some() {
            self.download_pack(id, &http, options, &mut progress).await
        } else if http.length("model_index.json").await?.is_some() {
            let model = ModelSource::folder(&http, true);
            let manifest = self.convert(id, http.base(), &model, options, &fetched, &mut progress).await?;
            self.check_source(id, &http, manifest, &mut progress).await
        } else {
            Err(Error::Network {
                url: http.base().to_string(),
                status: Some(404),
                message: "neither a model pack (manifest.json), a diffusers model folder (model_index.json) nor a .safetensors / .gguf file is there".into(),
            })
        }
    }

    /// Checks the source files of a converted download against the sha256 their server states: on
    /// a difference the model is left incomplete (its manifest removed), so it never loads.
    async fn check_source(&self, id: &str, http: &HttpSource, manifest: Manifest, progress: &mut dyn FnMut(&Progress)) -> Result<Manifest> {
        let found = match http.check_stated() {
            Ok(found) => found,
            Err(e) => {
                self.records.delete(&Self::key(id, MANIFEST)).await?;
                return Err(e);
            }
        };
        let (total, mut done) = (found.matched.iter().map(|(_, n)| n).sum(), 0);
        for (path, bytes) in &found.matched {
            done += bytes;
            progress(&Progress { stage: "verify", bytes_done: done, bytes_total: total, detail: format!("{path}: has the sha256 its server states") });
        }
        Ok(manifest)
    }

    /// Stores `model` (any source: a file the user picked) as `id`, converted with the options'
    /// preset, or completes and repairs an earlier import of the same `origin`. `read` tells the
    /// bytes read from the model so far (progress).
    pub async fn import(&self, id: &str, origin: &str, model: &ModelSource<'_>, options: &DownloadOptions, read: &dyn Fn() -> u64, mut progress: impl FnMut(&Progress)) -> Result<Manifest> {
        check_id(id)?;
        self.convert(id, origin, model, options, read, &mut progress).await
    }

    async fn download_pack(&self, id: &str, http: &HttpSource, options: &DownloadOptions, progress: &mut dyn FnMut(&Progress)) -> Result<Manifest> {
        let manifest_bytes = http.read(MANIFEST).await?;
        let manifest = Pack::from_manifest_bytes(&manifest_bytes, http.describe(MANIFEST))?.manifest().clone();
        if manifest.quant != options.quant {
            return Err(Error::InvalidParameter(format!(
                "{} holds a {} pack, not {}",
                http.base(),
                manifest.quant.name(),
                options.quant.name()
            )));
        }
        let origin = Origin { url: http.base().into(), quant: options.quant.name().into(), bytes: manifest.bytes() };
        self.begin(id, &origin).await?;
        // The pack was updated at its URL: the model stays incomplete until every record of the
        // new manifest is stored, so that old and new records never load together.
        let key = Self::key(id, MANIFEST);
        if self.records.get(&key).await?.is_some_and(|stored| stored.slice(0, stored.len()) != manifest_bytes) {
            self.records.delete(&key).await?;
        }
        let todo = self.missing_or_bad(id, &manifest.shards, progress).await?;
        let needed = todo.iter().map(|&i| manifest.shards[i].bytes).sum();
        self.check_space(needed).await?;

        let done = RefCell::new(0u64);
        let progress = RefCell::new(progress);
        let shards = &manifest.shards;
        for_each_concurrent(todo, options.parallel, |i| {
            let (done, progress) = (&done, &progress);
            async move {
                let shard = &shards[i];
                let bytes = http.fetch(&shard.path, 0, shard.bytes).await?;
                let sum = bytes.sha256().await;
                if sum != shard.sha256 {
                    return Err(Error::Corrupt {
                        path: http.url(&shard.path),
                        message: format!("downloaded sha256 {sum} does not match the manifest's {}", shard.sha256),
                    });
                }
                self.records.put(&Self::key(id, &shard.path), &bytes).await?;
                *done.borrow_mut() += shard.bytes;
                let p = Progress { stage: "download", bytes_done: *done.borrow(), bytes_total: needed, detail: shard.path.clone() };
                (progress.borrow_mut())(&p);
                Ok(())
            }
        })
        .await?;
        self.records.put(&Self::key(id, MANIFEST), &Bytes::from(manifest_bytes)).await?;
        Ok(manifest)
    }

    /// Converts `model` (from `url`) into the records of `id`, resuming a conversion cut before,
    /// or rebuilding the damaged records of a finished one.
    async fn convert(&self, id: &str, url: &str, model: &ModelSource<'_>, options: &DownloadOptions, read: &dyn Fn() -> u64, progress: &mut dyn FnMut(&Progress)) -> Result<Manifest> {
        let plan = pack::plan(model, options.quant).await?;
        let origin = Origin { url: url.into(), quant: options.quant.name().into(), bytes: plan.pack_bytes().await? };
        self.begin(id, &origin).await?;

        if let Some(manifest) = self.json::<Manifest>(id, MANIFEST).await? {
            // Finished before: rebuild what is missing or damaged from the tensors it held.
            Pack::new(manifest.clone(), self.records.describe(&Self::key(id, MANIFEST)))?;
            let todo = self.missing_or_bad(id, &manifest.shards, progress).await?;
            self.check_space(todo.iter().map(|&i| manifest.shards[i].bytes).sum()).await?;
            for (n, &i) in todo.iter().enumerate() {
                let bytes = rebuild(&plan, &manifest, i).await?;
                self.records.put(&Self::key(id, &manifest.shards[i].path), &bytes).await?;
                progress(&Progress { stage: "convert", bytes_done: n as u64 + 1, bytes_total: todo.len() as u64, detail: manifest.shards[i].path.clone() });
            }
            return Ok(manifest);
        }

        let mut resume = self.json::<ConvertState>(id, CONVERSION).await?;
        if let Some(state) = &resume {
            if !self.missing_or_bad(id, &state.shards, progress).await?.is_empty() {
                resume = None; // a damaged record of an unfinished conversion: convert again
            }
        }
        let stored: u64 = resume.as_ref().map_or(0, |c| c.shards.iter().map(|s| s.bytes).sum());
        self.check_space(origin.bytes.saturating_sub(stored)).await?;
        let read_bytes = plan.read_bytes().await?;

        let mut sink = StoreSink { store: self, id };
        let read_before = read();
        let manifest = pack::convert(plan, options.shard_bytes, resume, &mut sink, |line| {
            let done = read() - read_before;
            progress(&Progress { stage: "convert", bytes_done: done, bytes_total: read_bytes, detail: line.trim().to_string() });
        })
        .await?;
        self.records.delete(&Self::key(id, CONVERSION)).await?;
        Ok(manifest)
    }
}

/// What [`ModelStore::download`] records as the origin of `url` (and [`ModelStore::list`] reports):
/// the single file's full URL, or the folder's or pack's base URL.
pub fn url_origin(url: &str) -> Result<String> {
    let (http, file) = HttpSource::for_url(url)?;
    Ok(match file {
        Some(file) => http.url(&file),
        None => http.base().to_string(),
    })
}

/// Writes a conversion's shards, checkpoints and (last) manifest as a model's records.
struct StoreSink<'s, R: RecordStore> {
    store: &'s ModelStore<R>,
    id: &'s str,
}

impl<R: RecordStore> PackSink for StoreSink<'_, R> {
    async fn write(&mut self, path: &str, bytes: &[u8]) -> Result<()> {
        self.store.records.put(&ModelStore::<R>::key(self.id, path), &Bytes::from(bytes)).await
    }
    async fn save_state(&mut self, state: &ConvertState) -> Result<()> {
        self.store.put_json(self.id, CONVERSION, state).await
    }
}

/// Shard `index` of a converted model, re-encoded from the entries that lie in it.
async fn rebuild(plan: &pack::Plan<'_, '_>, manifest: &Manifest, index: usize) -> Result<Bytes> {
    let shard = &manifest.shards[index];
    let mut out = vec![0u8; shard.bytes as usize];
    let mut place = |segments: &[Segment], plane: &[u8]| {
        let mut pos = 0usize;
        for s in segments {
            let n = s.length as usize;
            if s.shard as usize == index {
                out[s.offset as usize..s.offset as usize + n].copy_from_slice(&plane[pos..pos + n]);
            }
            pos += n;
        }
    };
    let touches = |segments: &[Segment]| segments.iter().any(|s| s.shard as usize == index);
    for file in manifest.files.iter().filter(|f| touches(&f.segments)) {
        place(&file.segments, &plan.model.files.read(&file.path).await?);
    }
    for t in &manifest.tensors {
        let planes = [Some(&t.data), t.scales.as_ref(), t.mins.as_ref()];
        if !planes.iter().flatten().any(|p| touches(p)) {
            continue;
        }
        let (component, name) = t.name.split_once('/').unwrap_or(("", &t.name));
        let weights = plan.weights.iter().find(|(c, _)| *c == component).map(|(_, w)| w).ok_or_else(|| Error::Corrupt {
            path: plan.model.files.describe(""),
            message: format!("the model no longer has the component of '{}'", t.name),
        })?;
        let host = weights.read(name, &t.shape, all_rows(&t.shape)).await?;
        let encoded = encode(host, &t.shape, t.storage.quant_format())?;
        if encoded.storage() != t.storage {
            return Err(Error::Corrupt { path: weights.location(), message: format!("'{}' changed since the download", t.name) });
        }
        for (segments, plane) in planes.iter().flatten().zip(encoded.planes()) {
            place(segments, plane);
        }
    }
    let bytes = Bytes::from(out);
    let sum = bytes.sha256().await;
    if sum != shard.sha256 {
        return Err(Error::Corrupt {
            path: plan.model.files.describe(""),
            message: format!("{} rebuilt from the source has sha256 {sum}, not {}: the source changed; delete the model and download it again", shard.path, shard.sha256),
        });
    }
    Ok(bytes)
}

pub(super) fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter(format!("model id '{id}' must be 1-128 letters, digits, '-', '_' or '.' (not starting with '.')")))
    }
}

/// Runs `task` on every item, at most `limit` at once; stops at the first error.
async fn for_each_concurrent<T, F, Fut>(items: Vec<T>, limit: usize, task: F) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut items = items.into_iter();
    let mut running: Vec<Pin<Box<Fut>>> = Vec::new();
    std::future::poll_fn(|cx| loop {
        while running.len() < limit {
            match items.next() {
                Some(item) => running.push(Box::pin(task(item))),
                None => break,
            }
        }
        if running.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let before = running.len();
        let mut i = 0;
        while i < running.len() {
            match running[i].as_mut().poll(cx) {
                Poll::Ready(Ok(())) => drop(running.swap_remove(i)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => i += 1,
            }
        }
        if running.len() == before {
            return Poll::Pending;
        }
    })
    .await
}
