//! The engine behind the JS API (`web/sdxl.js`), exported with wasm-bindgen. `web/worker.js` runs
//! it in a dedicated worker, one call at a time: options, results and events cross as JS values of
//! the app layer's types (serde-wasm-bindgen; declared in web/sdxl.d.ts), images and previews as
//! `Uint8Array`s. Errors are JS `Error`s whose `name` is [`Error::kind`] (`AbortError` for a
//! cancelled run).

use std::cell::{Cell, RefCell};

use js_sys::{Function, Reflect, Uint8Array};
use serde::de::DeserializeOwned;
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::app::{self, de, AdapterInfo, BenchRequest, CreateRequest, EngineEvent, FinalDecoder, Front, GenerateOutput, GenerateRequest, Input, LoadRequest, LoadedModel, LoadedModels, ModelSpec, Picture, RecipeSources, StepProgressEvent, Timings, Transfer};
use crate::bench;
use crate::error::{Error, Result};
use crate::pack::ModelKind;
use crate::pipeline::generate::{generate_with, Event, Observer, SdxlModel, Stage, MAX_SIDE};
use crate::pipeline::image::{self, LoraRecipe};
use crate::pipeline::lora::LoraChoice;
use crate::quant::QuantPreset;
use crate::store::{url_origin, BlobSource, DownloadOptions, HttpSource, IdbStore, FileStore, ModelStore, Progress, StoredFile};
use crate::models::taesd::TaesdDecoder;
use crate::weights::lora::LoraFile;
use crate::weights::{ModelSource, Source};
use crate::{Gpu, Precision};

thread_local! {
    /// Where a panic's message goes: the worker's callback (see [`set_panic_hook`]).
    static ON_PANIC: RefCell<Option<Function>> = const { RefCell::new(None) };
}

/// Makes a panic call `report(message)` (its text and source location) before the trap that ends
/// the call, which JS sees only as "RuntimeError: unreachable": the worker answers the call with an
/// `InternalError` naming the bug, and the client replaces the worker (an instance that panicked is
/// not usable again).
#[wasm_bindgen(js_name = setPanicHook)]
pub fn set_panic_hook(report: Function) {
    ON_PANIC.with(|slot| *slot.borrow_mut() = Some(report));
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        ON_PANIC.with(|slot| {
            if let Ok(Some(report)) = slot.try_borrow().as_deref() {
                let _ = report.call1(&JsValue::NULL, &JsValue::from_str(&message));
            }
        });
    }));
}

fn js_error(e: Error) -> JsValue {
    // The name says the kind: an invalid parameter's message is what is wrong with it.
    let message = match &e {
        Error::InvalidParameter(m) => m.clone(),
        e => e.to_string(),
    };
    let error = js_sys::Error::new(&message);
    error.set_name(e.kind());
    error.into()
}

/// A request of `call` from a JS value: read whole, then checked (see [`de::Loose`]).
fn parse<T: DeserializeOwned>(value: JsValue, call: &str) -> Result<T> {
    let loose: de::Loose = serde_wasm_bindgen::from_value(value).map_err(|e| Error::InvalidParameter(format!("{call}: {e}")))?;
    de::request(loose, call)
}

/// A result or event as a JS value: maps as objects and None as null, as JSON would have them,
/// bytes as `Uint8Array`s. A whole number past 2^53 has no exact JS number: such a size can only
/// come from stored or downloaded data claiming it, so it is refused as corrupt (`what` names it).
fn to_js(value: &impl Serialize, what: &str) -> Result<JsValue> {
    let serializer = serde_wasm_bindgen::Serializer::new().serialize_missing_as_null(true).serialize_maps_as_objects(true);
    value.serialize(&serializer).map_err(|e| Error::Corrupt { path: what.into(), message: e.to_string() })
}

fn emit(callback: &Function, event: EngineEvent) {
    // The callback is the worker's own postMessage wrapper; it does not throw. An event that
    // cannot cross (see `to_js`) is dropped: the call's own result reports the failure.
    if let Ok(event) = to_js(&event, "a progress event") {
        let _ = callback.call1(&JsValue::NULL, &event);
    }
}

/// A download, import or upload's progress.
fn transfer(id: &str, loaded: u64, total: u64, detail: Option<String>) -> Transfer {
    Transfer { model: id.to_string(), loaded, total, detail }
}

struct Loaded {
    id: String,
    /// Where it came from, as the store records it (None: loaded by id alone).
    origin: Option<String>,
    quant: QuantPreset,
    model: SdxlModel,
    /// The LoRAs set on the model: (id, weight, hash), as the last generation asked.
    loras: RefCell<Vec<(String, f32, String)>>,
}

#[wasm_bindgen]
pub struct Engine {
    gpu: Gpu,
    store: ModelStore<IdbStore>,
    loras: FileStore<IdbStore>,
    /// Stored preview decoders (TAESD-XL), and the one loaded.
    decoders: FileStore<IdbStore>,
    preview_decoder: Option<TaesdDecoder>,
    base: Option<Loaded>,
    refiner: Option<Loaded>,
}

#[wasm_bindgen]
impl Engine {
    /// Opens the GPU and the model store (`options`: a [`CreateRequest`]).
    pub async fn create(options: JsValue) -> std::result::Result<Engine, JsValue> {
        async {
            let options: CreateRequest = parse(options, "Sdxl.create")?;
            let gpu = Gpu::new(options.precision.unwrap_or(Precision::Auto)).await?;
            let name = options.store_name.as_deref().unwrap_or("sdxl-models");
            let store = ModelStore::new(IdbStore::open(name).await?);
            let loras = FileStore::new(IdbStore::open(&format!("{name}-loras")).await?);
            let decoders = FileStore::of(IdbStore::open(&format!("{name}-decoders")).await?, "preview decoder");
            Ok(Engine { gpu, store, loras, decoders, preview_decoder: None, base: None, refiner: None })
        }
        .await
        .map_err(js_error)
    }

    /// The adapter ([`AdapterInfo`]).
    pub fn info(&self) -> std::result::Result<JsValue, JsValue> {
        let precision = if self.gpu.dtype == crate::DType::F16 { "f16" } else { "f32" };
        let info = AdapterInfo { adapter: self.gpu.adapter_name.clone(), precision, shader_f16: self.gpu.has_shader_f16, max_buffer_bytes: self.gpu.max_binding_bytes() };
        to_js(&info, "the adapter's limits").map_err(js_error)
    }

    /// Makes the models of `options` (a [`LoadRequest`])
    /// the loaded ones: each is downloaded (or, from the `File`s in `files` — [base, refiner] —
    /// imported) into the store unless it is stored complete, then uploaded to the GPU. Models
    /// already loaded with the same id and preset stay; others are released first, so the GPU
    /// never holds two of a kind. `on_event` gets progress events. Returns the [`LoadedModels`].
    pub async fn load(&mut self, options: JsValue, files: js_sys::Array, on_event: Function) -> std::result::Result<JsValue, JsValue> {
        async {
            let file = |i: u32| Some(files.get(i)).filter(|f| !f.is_undefined() && !f.is_null());
            let options: LoadRequest = parse(options, "load")?;
            let quant = options.quant;
            let id = |url: &str| app::store_id(url, quant);
            let refiner = options.refiner.as_ref().map(|r| r.resolve(id)).transpose()?;
            let loaded = LoadedModels { base: options.base.resolve(id)?, refiner, quant: quant.name() };
            let base = (&loaded.base, origin(&loaded.base, file(0).as_ref())?);
            let refiner = match &loaded.refiner {
                Some(wanted) => Some((wanted, origin(wanted, file(1).as_ref())?)),
                None => None,
            };
            let keep = |slot: &Option<Loaded>, wanted: Option<&(&LoadedModel, Option<String>)>| {
                matches!((slot, wanted), (Some(l), Some((w, origin))) if l.id == w.id && l.quant == quant && l.origin == *origin)
            };
            if !keep(&self.base, Some(&base)) {
                self.base = None;
            }
            if !keep(&self.refiner, refiner.as_ref()) {
                self.refiner = None;
            }
            if self.base.is_none() {
                self.base = Some(self.load_one(base.0, base.1, file(0), quant, ModelKind::Base, &on_event).await?);
            }
            if let (None, Some((wanted, origin))) = (&self.refiner, refiner) {
                self.refiner = Some(self.load_one(wanted, origin, file(1), quant, ModelKind::Refiner, &on_event).await?);
            }
            to_js(&loaded, "the loaded models")
        }
        .await
        .map_err(js_error)
    }

    /// Text to image, img2img or inpainting with the loaded models (`options`: a
    /// [`GenerateRequest`]; `images`: [image, mask], each null, PNG bytes (a Uint8Array) or
    /// `{data, width, height}` RGBA pixels). With `preview`, `on_event(event, preview)` gets each
    /// step's preview (RGBA bytes); `cancelled()` is asked before every step and before the
    /// decode, and a true answer ends the run with an `AbortError`. Returns a [`GenerateOutput`] with `png`, its bytes.
    pub async fn generate(&self, options: JsValue, images: js_sys::Array, preview: bool, on_event: Function, cancelled: Function) -> std::result::Result<JsValue, JsValue> {
        // One GPU operation: a GPU error fails this run only (see Gpu::operation).
        let (png, out) = self.gpu.operation(self.run(options, &images, preview, &on_event, &cancelled)).await.map_err(js_error)?;
        // The PNG is the part the worker transfers to the page: bytes beside the typed fields.
        let result = to_js(&out, "the generation's result").map_err(js_error)?;
        Reflect::set(&result, &"png".into(), &Uint8Array::from(png.as_slice())).expect("setting a field of a new object");
        Ok(result)
    }

    /// The stored models ([`crate::store::StoredModel`]s).
    pub async fn models(&self) -> std::result::Result<JsValue, JsValue> {
        self.store.list().await.and_then(|m| to_js(&m, "the stored models")).map_err(js_error)
    }

    /// Deletes a stored model (releasing it from the GPU if loaded); returns the bytes freed.
    #[wasm_bindgen(js_name = deleteModel)]
    pub async fn delete_model(&mut self, id: String) -> std::result::Result<f64, JsValue> {
        for slot in [&mut self.base, &mut self.refiner] {
            if slot.as_ref().is_some_and(|l| l.id == id) {
                *slot = None;
            }
        }
        self.store.delete(&id).await.map(|n| n as f64).map_err(js_error)
    }

    /// `sdxl bench` in the browser (`options`: a [`BenchRequest`]): `on_event` gets a bench event
    /// as each measurement starts. Returns `{report, table}`. Needs no stored model: weights are
    /// random, generated on the GPU (beside any loaded models).
    pub async fn bench(&self, options: JsValue, on_event: Function) -> std::result::Result<JsValue, JsValue> {
        async {
            let (model, options) = app::bench_plan(parse::<BenchRequest>(options, "bench")?)?;
            let report = bench::run(&self.gpu, &model, &options, |what| emit(&on_event, EngineEvent::Bench { what: what.to_string() })).await?;
            #[derive(Serialize)]
            struct Measured<'a> {
                report: &'a bench::BenchReport,
                table: String,
            }
            to_js(&Measured { report: &report, table: report.table() }, "the benchmark report")
        }
        .await
        .map_err(js_error)
    }

    /// Stores the LoRA of `options` (a [`ModelSpec`]: a .safetensors URL, or with `file` its name,
    /// the picked `File` in `files`) unless it is stored from there already; the stored LoRA. The file is checked to be a LoRA before anything is stored; whether it
    /// fits the base is checked when a generation uses it. `on_event` gets progress events.
    #[wasm_bindgen(js_name = storeLora)]
    pub async fn store_lora(&self, options: JsValue, files: js_sys::Array, on_event: Function) -> std::result::Result<JsValue, JsValue> {
        async {
            let wanted = parse::<ModelSpec>(options, "storeLora")?.resolve(app::file_id)?;
            to_js(&store_file(&self.loras, &wanted, &files, &on_event, FileKind::Lora).await?, "the stored LoRA")
        }
        .await
        .map_err(js_error)
    }

    /// Stores the preview decoder of `options` (a [`ModelSpec`] as `storeLora`'s: a
    /// TAESD-XL decoder, diffusers' AutoencoderTiny safetensors or madebyollin's
    /// taesdxl_decoder.safetensors) unless stored, and loads it: later runs' step previews are
    /// its decodes at image size (the linear latent map where it would not fit the adapter).
    /// `options` null unloads it. The stored decoder, or null.
    #[wasm_bindgen(js_name = loadPreviewDecoder)]
    pub async fn load_preview_decoder(&mut self, options: JsValue, files: js_sys::Array, on_event: Function) -> std::result::Result<JsValue, JsValue> {
        self.preview_decoder = None;
        async {
            let Some(wanted) = parse::<Option<ModelSpec>>(options, "loadPreviewDecoder")? else { return Ok(JsValue::NULL) };
            let wanted = wanted.resolve(app::file_id)?;
            let stored = store_file(&self.decoders, &wanted, &files, &on_event, FileKind::PreviewDecoder).await?;
            let (source, file) = self.decoders.open(&wanted.id).await?;
            let decoder = self.gpu.operation(TaesdDecoder::from_file(&self.gpu, source, &file)).await?;
            self.preview_decoder = Some(decoder);
            to_js(&stored, "the stored preview decoder")
        }
        .await
        .map_err(js_error)
    }

    /// The stored preview decoders, as `loras()` lists LoRAs.
    #[wasm_bindgen(js_name = previewDecoders)]
    pub async fn preview_decoders(&self) -> std::result::Result<JsValue, JsValue> {
        self.decoders.list().await.and_then(|d| to_js(&d, "the stored preview decoders")).map_err(js_error)
    }

    /// Deletes a stored preview decoder; returns the bytes freed.
    #[wasm_bindgen(js_name = deletePreviewDecoder)]
    pub async fn delete_preview_decoder(&self, id: String) -> std::result::Result<f64, JsValue> {
        self.decoders.delete(&id).await.map(|n| n as f64).map_err(js_error)
    }

    /// The stored LoRAs ([`StoredFile`]s).
    pub async fn loras(&self) -> std::result::Result<JsValue, JsValue> {
        self.loras.list().await.and_then(|l| to_js(&l, "the stored LoRAs")).map_err(js_error)
    }

    /// Deletes a stored LoRA; returns the bytes freed.
    #[wasm_bindgen(js_name = deleteLora)]
    pub async fn delete_lora(&self, id: String) -> std::result::Result<f64, JsValue> {
        self.loras.delete(&id).await.map(|n| n as f64).map_err(js_error)
    }

    /// Checks a stored model's records against their sha256; the bad ones.
    pub async fn verify(&self, id: String) -> std::result::Result<JsValue, JsValue> {
        self.store.verify(&id).await.and_then(|bad| to_js(&bad, "the damaged records")).map_err(js_error)
    }
}

/// What a stored single file is, checked before it is stored.
#[derive(Clone, Copy)]
enum FileKind {
    Lora,
    PreviewDecoder,
}

impl FileKind {
    fn noun(self) -> &'static str {
        match self {
            FileKind::Lora => "LoRA",
            FileKind::PreviewDecoder => "preview decoder",
        }
    }

    /// Checks `file` is of this kind; where its data section starts.
    async fn check(self, source: &impl Source, file: &str) -> Result<u64> {
        match self {
            FileKind::Lora => Ok(LoraFile::open(source, file).await?.data_start()),
            FileKind::PreviewDecoder => TaesdDecoder::check_file(source, file).await,
        }
    }
}

/// Stores the file `wanted` names (its picked `File` in `files`, or its URL) in `store` unless
/// stored from there already; a download is checked against the sha256 its server states.
async fn store_file(store: &FileStore<IdbStore>, wanted: &LoadedModel, files: &js_sys::Array, on_event: &Function, kind: FileKind) -> Result<StoredFile> {
    let file = Some(files.get(0)).filter(|f| !f.is_undefined() && !f.is_null());
    let origin = origin(wanted, file.as_ref())?.ok_or_else(|| Error::InvalidParameter(format!("{} '{}': give its url or a file", kind.noun(), wanted.id)))?;
    let id = &wanted.id;
    let progress = |event: fn(Transfer) -> EngineEvent| move |done: u64, total: u64| emit(on_event, event(transfer(id, done, total, None)));
    match (file, &wanted.url) {
        (Some(blob), _) => {
            let name = wanted.file.as_deref().unwrap_or_default();
            let source = BlobSource::new(blob, name)?;
            store.store_file(id, &origin, &source, name, kind.check(&source, name), progress(EngineEvent::Import)).await
        }
        (None, Some(url)) => {
            let (http, Some(name)) = HttpSource::for_url(url)? else {
                return Err(Error::InvalidParameter(format!("{} '{id}': {url} names no .safetensors file", kind.noun())));
            };
            let stored = store.store_file(id, &origin, &http, &name, kind.check(&http, &name), progress(EngineEvent::Download)).await?;
            // Stored in order, so checked whole against the sha256 the server states.
            if let Err(e) = http.check_stated() {
                store.delete(id).await?;
                return Err(e);
            }
            Ok(stored)
        }
        (None, None) => unreachable!("origin() gave an origin"),
    }
}

/// Where `wanted` comes from, as the store records it: a picked `file`'s name, size and
/// modification time, or its URL's origin; None for a model named by id alone.
fn origin(wanted: &LoadedModel, file: Option<&JsValue>) -> Result<Option<String>> {
    let number = |blob: &JsValue, key: &str| Reflect::get(blob, &key.into()).ok().and_then(|v| v.as_f64());
    match (file, &wanted.url) {
        (Some(blob), _) => {
            let name = wanted.file.as_deref().ok_or_else(|| Error::InvalidParameter(format!("'{}': a file needs its name", wanted.id)))?;
            let size = number(blob, "size").ok_or_else(|| Error::InvalidParameter(format!("'{name}' is not a File or Blob")))?;
            Ok(Some(format!("file:{name} ({} bytes, modified {})", size as u64, number(blob, "lastModified").unwrap_or(0.0))))
        }
        (None, Some(url)) => url_origin(url).map(Some),
        (None, None) => Ok(None),
    }
}

impl Engine {
    /// Stores `wanted` (from `origin`: its picked `file`, or its URL) unless the store holds it
    /// complete already, then uploads it to the GPU. Every record is checked against its sha256 as
    /// it loads: a damaged one is fetched again (or rebuilt from the picked file), then the model
    /// loads again.
    async fn load_one(&self, wanted: &LoadedModel, origin: Option<String>, file: Option<JsValue>, quant: QuantPreset, kind: ModelKind, on_event: &Function) -> Result<Loaded> {
        let stored = match &origin {
            Some(origin) => self.store.holds_complete(&wanted.id, origin).await?,
            None => self.store.list().await?.iter().any(|m| m.id == wanted.id && m.complete),
        };
        if !stored {
            self.fetch(wanted, &origin, file.clone(), quant, on_event).await?;
        }
        match self.upload(wanted, &origin, quant, kind, on_event).await {
            Err(Error::Corrupt { path, message }) if stored => {
                self.fetch(wanted, &origin, file, quant, on_event).await.map_err(|e| match e {
                    Error::ModelIncomplete(_) => Error::Corrupt { path, message: format!("{message}; give its url or pick its file to repair it") },
                    e => e,
                })?;
                self.upload(wanted, &origin, quant, kind, on_event).await
            }
            loaded => loaded,
        }
    }

    /// Downloads or imports `wanted` into the store, or completes and repairs what it holds of it.
    async fn fetch(&self, wanted: &LoadedModel, origin: &Option<String>, file: Option<JsValue>, quant: QuantPreset, on_event: &Function) -> Result<()> {
        let options = DownloadOptions::new(quant);
        // A folder or file is converted as it arrives: for the user, both are the download (or the import).
        let progress = |event: fn(Transfer) -> EngineEvent| {
            move |p: &Progress| {
                let event = if p.stage == "verify" { EngineEvent::Verify } else { event };
                emit(on_event, event(transfer(&wanted.id, p.bytes_done, p.bytes_total, Some(p.detail.clone()))));
            }
        };
        match (file, &wanted.url, origin) {
            (Some(blob), _, Some(origin)) => {
                let name = wanted.file.as_deref().unwrap_or_default();
                let source = BlobSource::new(blob, name)?;
                let model = ModelSource::single_file(&source, name, None).await?;
                self.store.import(&wanted.id, origin, &model, &options, &|| source.bytes_read(), progress(EngineEvent::Import)).await.map(drop)
            }
            (None, Some(url), _) => self.store.download(&wanted.id, url, &options, progress(EngineEvent::Download)).await.map(drop),
            _ => Err(Error::ModelIncomplete(format!("'{}' is not stored: give its url or a file", wanted.id))),
        }
    }

    /// Uploads the stored `wanted` to the GPU.
    async fn upload(&self, wanted: &LoadedModel, origin: &Option<String>, quant: QuantPreset, kind: ModelKind, on_event: &Function) -> Result<Loaded> {
        let (total, done, reported) = (Cell::new(0), Cell::new(0), Cell::new(0));
        // Thousands of tensors: an event per 0.5 % is enough for a progress bar.
        let report = |read: u64| {
            done.set(done.get() + read);
            let (done, total) = (done.get(), total.get());
            // (The manifest is read before the total is known: nothing to report yet.)
            if total > 0 && (done - reported.get() >= total / 200 || done >= total) {
                reported.set(done);
                emit(on_event, EngineEvent::Upload(transfer(&wanted.id, done.min(total), total, None)));
            }
        };
        let (source, pack) = self.store.open(&wanted.id, &report).await?;
        let manifest = pack.manifest();
        total.set(manifest.bytes());
        if manifest.quant != quant {
            return Err(Error::InvalidParameter(format!(
                "the stored model '{}' is {}, not {}: delete it or load it as {}",
                wanted.id,
                manifest.quant.name(),
                quant.name(),
                manifest.quant.name()
            )));
        }
        if manifest.model != kind {
            let (is, slot) = match manifest.model {
                ModelKind::Base => ("an SDXL base model", "base"),
                ModelKind::Refiner => ("an SDXL refiner", "refiner"),
            };
            return Err(Error::InvalidParameter(format!("'{}' is {is}: load it as `{slot}`", wanted.id)));
        }
        let model = SdxlModel::load(&self.gpu, &source, &quant.policy()).await?;
        report(total.get().saturating_sub(done.get()));
        Ok(Loaded { id: wanted.id.clone(), origin: origin.clone(), quant, model, loras: RefCell::default() })
    }

    /// Sets the stored LoRAs `wanted` (id, weight; weight 0 leaves one out) on the base unless
    /// they are set already; their recipe entries. On an error the base runs without LoRAs.
    async fn set_loras(&self, base: &Loaded, mut wanted: Vec<(String, f32)>) -> Result<Vec<LoraRecipe>> {
        wanted.retain(|(_, weight)| *weight != 0.0);
        let stored: Vec<StoredFile> = match wanted.is_empty() {
            true => Vec::new(),
            false => self.loras.list().await?,
        };
        let mut applied = Vec::new();
        for (id, weight) in wanted {
            let Some(hash) = stored.iter().find(|l| l.id == id).and_then(|l| l.hash.clone()) else {
                let names: Vec<&str> = stored.iter().filter(|l| l.complete).map(|l| l.id.as_str()).collect();
                return Err(Error::ModelIncomplete(format!("no LoRA '{id}' is stored (stored: {names:?}); store it with storeLora() first")));
            };
            applied.push((id, weight, hash));
        }
        if *base.loras.borrow() != applied {
            base.model.clear_loras();
            *base.loras.borrow_mut() = Vec::new();
            let mut files = Vec::new();
            for (id, _, _) in &applied {
                let (source, file) = self.loras.open(id).await?;
                files.push(LoraFile::open(source, &file).await?);
            }
            let choices: Vec<LoraChoice> = files.iter().zip(&applied).map(|(file, (_, weight, _))| LoraChoice { file, weight: *weight }).collect();
            base.model.set_loras(&self.gpu, &choices).await?;
            *base.loras.borrow_mut() = applied.clone();
        }
        Ok(applied.into_iter().map(|(name, weight, hash)| LoraRecipe { name, weight, hash }).collect())
    }

    async fn run(&self, options: JsValue, images: &js_sys::Array, preview: bool, on_event: &Function, cancelled: &Function) -> Result<(Vec<u8>, GenerateOutput)> {
        let request: GenerateRequest = parse(options, "generate")?;
        let (image, mask) = (picture(&images.get(0), "image")?, picture(&images.get(1), "mask")?);
        // A random seed fits a JS number exactly (53 bits), so the result can report it.
        let seed = (js_sys::Math::random() * 2f64.powi(53)) as u64;
        let prepared = app::prepare(&request, image, mask, Front::Web, seed)?;
        let final_decoder = match request.final_decoder {
            FinalDecoder::Vae => None,
            FinalDecoder::Taesd => Some(self.preview_decoder.as_ref().ok_or_else(|| {
                Error::InvalidParameter("finalDecoder 'taesd' decodes with the preview decoder, and none is loaded: call loadPreviewDecoder() first".into())
            })?),
        };
        let base = self.base.as_ref().ok_or_else(|| Error::ModelIncomplete("no model is loaded: call load() first".into()))?;
        // Left out, refinerStart is the default where a refiner is loaded; null runs the base alone.
        let refiner = match request.refiner_start {
            Some(Some(_)) => Some(self.refiner.as_ref().ok_or_else(|| {
                Error::InvalidParameter("refinerStart is set but no refiner is loaded (load one, or set refinerStart to null)".into())
            })?),
            Some(None) => None,
            None => self.refiner.as_ref(),
        };
        let wanted = request.loras.iter().map(|l| (l.model.clone(), l.weight)).chain(prepared.lora_tags.iter().cloned());
        let loras = self.set_loras(base, wanted.collect()).await?;
        let decoder = self.preview_decoder.as_ref().filter(|_| preview);
        let mut watcher = JsObserver { on_event, cancelled, preview, decoder, marks: vec![("start", js_sys::Date::now())] };
        let params = &prepared.params;
        let out = generate_with(&self.gpu, &base.model, refiner.map(|r| &r.model), params, final_decoder, &mut watcher).await?;
        let pixels = self.gpu.read(&out.image).await?;
        watcher.marks.push(("end", js_sys::Date::now()));
        let sampler = base.model.scheduler(params)?.name();
        let sources = RecipeSources { sampler, model: &base.id, refiner: refiner.map(|r| r.id.as_str()), loras: &loras, taesd: final_decoder.is_some() };
        let rendered = app::render(&prepared, &pixels, &sources)?;
        Ok((rendered.png, GenerateOutput { parameters: rendered.recipe, seed: params.seed, width: rendered.width, height: rendered.height, timings: watcher.timings() }))
    }
}

/// An image argument of `generate`: PNG bytes (decoded as the CLI decodes its files), or RGBA
/// pixels `{data, width, height}` (an ImageData, or what sdxl.js draws other images into).
fn picture(value: &JsValue, what: &str) -> Result<Option<Input>> {
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
        return Ok(Some(Input { name: what.into(), picture: Picture::Png(bytes.to_vec()) }));
    }
    let bad = || Error::InvalidParameter(format!("{what} must be PNG bytes or RGBA pixels {{data, width, height}}"));
    let field = |name: &str| Reflect::get(value, &name.into()).map_err(|_| bad());
    let (Some(width), Some(height)) = (field("width")?.as_f64(), field("height")?.as_f64()) else { return Err(bad()) };
    let side = |v: f64| v >= 1.0 && v <= MAX_SIDE as f64 && v.fract() == 0.0;
    if !side(width) || !side(height) {
        return Err(Error::InvalidParameter(format!("{what} is {width}x{height}: images are 1 to {MAX_SIDE} pixels on a side")));
    }
    let data = field("data")?;
    let data = match data.dyn_ref::<js_sys::Uint8ClampedArray>() {
        Some(clamped) => clamped.to_vec(),
        None => data.dyn_ref::<Uint8Array>().ok_or_else(bad)?.to_vec(),
    };
    Ok(Some(Input { name: what.into(), picture: Picture::Rgba { width: width as usize, height: height as usize, data } }))
}

/// Reports a generation's events to JS and asks whether it was cancelled.
struct JsObserver<'a> {
    on_event: &'a Function,
    cancelled: &'a Function,
    preview: bool,
    /// Decodes previews at image size where it fits; the linear latent map otherwise.
    decoder: Option<&'a TaesdDecoder>,
    /// When each phase began (ms): "start", "base", "refiner", "decode", "end".
    marks: Vec<(&'static str, f64)>,
}

impl JsObserver<'_> {
    /// Milliseconds per phase; each stage's time includes its prompt encoding.
    fn timings(&self) -> Timings {
        let mut timings = Timings::default();
        for pair in self.marks.windows(2) {
            let ms = Some(pair[1].1 - pair[0].1);
            match pair[0].0 {
                "base" => timings.base = ms,
                "refiner" => timings.refiner = ms,
                "decode" => timings.decode = ms,
                _ => {}
            }
        }
        timings.total = self.marks.last().map_or(0.0, |end| end.1 - self.marks[0].1);
        timings
    }
}

impl Observer for &mut JsObserver<'_> {
    async fn event(&mut self, gpu: &Gpu, event: Event<'_>) -> Result<()> {
        if self.cancelled.call0(&JsValue::NULL).is_ok_and(|v| v.is_truthy()) {
            return Err(Error::Cancelled("the run was cancelled; its GPU buffers are freed".into()));
        }
        let (event, preview) = match event {
            Event::Encode(stage) => {
                self.marks.push((if stage == Stage::Base { "base" } else { "refiner" }, js_sys::Date::now()));
                (EngineEvent::Encode { stage }, JsValue::UNDEFINED)
            }
            Event::Step { progress, estimate } => {
                let mut step = StepProgressEvent { stage: progress.stage, step: progress.step, steps: progress.steps, preview_width: None, preview_height: None, preview_decoder: None };
                let preview = if self.preview {
                    let denoised = estimate.denoised(gpu)?;
                    let &[_, c, h, w] = denoised.shape() else { unreachable!("latents are [1, C, h, w]") };
                    let (width, height, rgba) = match self.decoder.filter(|d| d.fits(gpu, h, w) && d.config.latent_channels == c) {
                        Some(decoder) => {
                            let up = decoder.upscale();
                            let (ih, iw) = (h * up, w * up);
                            step.preview_decoder = Some("taesd");
                            (iw, ih, image::rgba8(&gpu.read(&decoder.decode(gpu, &denoised)?).await?, ih, iw))
                        }
                        None => (w, h, image::latent_preview(&gpu.read(&denoised).await?, c, h, w)),
                    };
                    (step.preview_width, step.preview_height) = (Some(width), Some(height));
                    Uint8Array::from(rgba.as_slice()).into()
                } else {
                    JsValue::UNDEFINED
                };
                (EngineEvent::Step(step), preview)
            }
            Event::Decode => {
                self.marks.push(("decode", js_sys::Date::now()));
                (EngineEvent::Decode, JsValue::UNDEFINED)
            }
        };
        if let Ok(event) = to_js(&event, "a step event") {
            let _ = self.on_event.call2(&JsValue::NULL, &event, &preview);
        }
        Ok(())
    }
}
