//! The engine behind the JS API (`web/sdxl.js`), exported with wasm-bindgen. `web/worker.js` runs
//! it in a dedicated worker, one call at a time: options and results cross as JSON, images and
//! previews as `Uint8Array`s, events through a callback. Errors are JS `Error`s whose `name` is
//! [`Error::kind`] (`AbortError` for a cancelled run).

use std::cell::{Cell, RefCell};

use js_sys::{Function, Object, Reflect, Uint8Array};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use wasm_bindgen::prelude::*;

use crate::bench::{self, BenchModel, BenchOptions};
use crate::error::{Error, Result};
use crate::pack::ModelKind;
use crate::pipeline::crop::{crop_for_run, gaussian_blur, CropRun, Pixels};
use crate::pipeline::generate::{generate_with, outpaint_canvas, Event, GenerateParams, InitImage, Mask, Observer, SdxlModel, Stage, IMG2IMG_STRENGTH, INPAINT_STRENGTH, MAX_SIDE};
use crate::pipeline::image::{self, LoraRecipe};
use crate::pipeline::lora::{prompt_tags, LoraChoice};
use crate::pipeline::prompt::PromptOptions;
use crate::quant::QuantPreset;
use crate::store::{url_origin, BlobSource, DownloadOptions, HttpSource, IdbStore, LoraStore, ModelStore, Progress, StoredLora};
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
    let error = js_sys::Error::new(&e.to_string());
    error.set_name(e.kind());
    error.into()
}

fn parse<T: DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| Error::InvalidParameter(format!("{what}: {e}")))
}

fn emit(callback: &Function, event: serde_json::Value) {
    // The callback is the worker's own postMessage wrapper; it does not throw.
    let _ = callback.call1(&JsValue::NULL, &JsValue::from_str(&event.to_string()));
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Base => "base",
        Stage::Refiner => "refiner",
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateOptions {
    /// "auto" (f16 where the adapter has shader-f16), "f16" or "f32".
    precision: Option<String>,
    /// The IndexedDB database holding the models (LoRAs: the one named this + "-loras").
    store_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BenchRequest {
    sizes: Option<Vec<usize>>,
    /// "f16", "q8", "q4".
    quants: Option<Vec<String>>,
    /// LoRA ranks whose per-step cost is measured (empty: none).
    loras: Option<Vec<usize>>,
    /// Any of "kernels", "unet", "vae".
    only: Option<Vec<String>>,
    /// The model's name and its unet/config.json and vae/config.json texts (default: SDXL 1.0 base).
    model: Option<String>,
    unet_config: Option<String>,
    vae_config: Option<String>,
}

/// A model to load (or a LoRA to store): its id in the store, and where it comes from when it is
/// not stored: a URL (a pack, a diffusers folder, a single .safetensors / .gguf) or, with `file`
/// (its name), the picked `File` passed beside the options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRef {
    id: String,
    url: Option<String>,
    file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadOptions {
    base: ModelRef,
    refiner: Option<ModelRef>,
    quant: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GenerateOptions {
    prompt: String,
    negative_prompt: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    steps: Option<usize>,
    guidance: Option<f32>,
    seed: Option<u64>,
    /// Fraction of the schedule after which the refiner takes over; `null` runs the base alone.
    refiner_start: Option<f64>,
    /// The sampler (`euler`, `euler_a`, `dpmpp_2m`, `dpmpp_2m_karras`, `ddim`); null: the model's.
    scheduler: Option<String>,
    /// `leading`, `trailing` or `linspace`; null: the model's.
    timestep_spacing: Option<String>,
    /// Whether to send a latent preview with every step.
    #[serde(default)]
    preview: bool,
    /// Prompts past 75 tokens encoded in windows, and A1111 weights (lpw_stable_diffusion_xl).
    #[serde(default)]
    long_prompt: bool,
    /// A1111's `(word:1.2)` weights and `<lora:NAME:WEIGHT>` tags (NAME: a stored LoRA's id).
    #[serde(default)]
    prompt_weighting: bool,
    /// Stored LoRAs applied to the base, each at its weight.
    #[serde(default)]
    loras: Vec<LoraWeight>,
    /// img2img / inpainting strength; null: 0.9999 with a mask (or outpainting), 0.3 without.
    strength: Option<f64>,
    /// Outpainting: pixels added [left, top, right, bottom] around the image, then inpainted.
    outpaint: Option<[usize; 4]>,
    /// Outpainting: how far into the image the repainted area reaches, to blend the seam.
    outpaint_overlap: Option<usize>,
    /// diffusers' padding_mask_crop: inpaint only the region around the mask, padded by this,
    /// at width x height, and paste it back into the image through the mask as given.
    mask_padding: Option<usize>,
    /// diffusers' mask_processor.blur: the mask blurred by this Gaussian radius first (PIL's).
    mask_blur: Option<f32>,
    /// What decodes the final image: "vae" (the default) or "taesd" (the loaded preview decoder:
    /// fast, approximate).
    final_decoder: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraWeight {
    /// The stored LoRA's id.
    model: String,
    weight: f32,
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
    loras: LoraStore<IdbStore>,
    /// Stored preview decoders (TAESD-XL), and the one loaded.
    decoders: LoraStore<IdbStore>,
    preview_decoder: Option<TaesdDecoder>,
    base: Option<Loaded>,
    refiner: Option<Loaded>,
}

#[wasm_bindgen]
impl Engine {
    /// Opens the GPU and the model store. `options`: JSON of `{precision?, storeName?}`.
    pub async fn create(options: String) -> std::result::Result<Engine, JsValue> {
        async {
            let options: CreateOptions = parse(&options, "Sdxl.create options")?;
            let precision: Precision = options.precision.as_deref().unwrap_or("auto").parse()?;
            let gpu = Gpu::new(precision).await?;
            let name = options.store_name.as_deref().unwrap_or("sdxl-models");
            let store = ModelStore::new(IdbStore::open(name).await?);
            let loras = LoraStore::new(IdbStore::open(&format!("{name}-loras")).await?);
            let decoders = LoraStore::of(IdbStore::open(&format!("{name}-decoders")).await?, "preview decoder");
            Ok(Engine { gpu, store, loras, decoders, preview_decoder: None, base: None, refiner: None })
        }
        .await
        .map_err(js_error)
    }

    /// JSON `{adapter, precision, shaderF16, maxBufferBytes}`.
    pub fn info(&self) -> String {
        json!({
            "adapter": self.gpu.adapter_name,
            "precision": format!("{:?}", self.gpu.dtype).to_lowercase(),
            "shaderF16": self.gpu.has_shader_f16,
            "maxBufferBytes": self.gpu.max_binding_bytes(),
        })
        .to_string()
    }

    /// Makes the models of `options` (JSON of `{base: {id, url?, file?}, refiner?: {...}, quant}`)
    /// the loaded ones: each is downloaded (or, from the `File`s in `files` — [base, refiner] —
    /// imported) into the store unless it is stored complete, then uploaded to the GPU. Models
    /// already loaded with the same id and preset stay; others are released first, so the GPU
    /// never holds two of a kind. `on_event` gets JSON progress events.
    pub async fn load(&mut self, options: String, files: js_sys::Array, on_event: Function) -> std::result::Result<(), JsValue> {
        async {
            let file = |i: u32| Some(files.get(i)).filter(|f| !f.is_undefined() && !f.is_null());
            let options: LoadOptions = parse(&options, "load options")?;
            let quant: QuantPreset = options.quant.parse()?;
            let base = (&options.base, origin(&options.base, file(0).as_ref())?);
            let refiner = match &options.refiner {
                Some(wanted) => Some((wanted, origin(wanted, file(1).as_ref())?)),
                None => None,
            };
            let keep = |slot: &Option<Loaded>, wanted: Option<&(&ModelRef, Option<String>)>| {
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
            Ok(())
        }
        .await
        .map_err(js_error)
    }

    /// Text to image, img2img or inpainting with the loaded models (JSON options as
    /// `GenerateOptions`; `images`: [image, mask], each null, PNG bytes (a Uint8Array) or
    /// `{data, width, height}` RGBA pixels). `on_event(json,
    /// preview)` gets encode / step / decode events (`preview`: RGBA bytes at latent resolution, or
    /// undefined); `cancelled()` is asked before every step and before the decode, and a true answer
    /// ends the run with an `AbortError`. Returns `{png, parameters, seed, width, height, timings}`.
    pub async fn generate(&self, options: String, images: js_sys::Array, on_event: Function, cancelled: Function) -> std::result::Result<Object, JsValue> {
        // One GPU operation: a GPU error fails this run only (see Gpu::operation).
        self.gpu.operation(self.run(&options, &images, &on_event, &cancelled)).await.map_err(js_error)
    }

    /// JSON list of the stored models: `{id, url, quant, model, storedBytes, totalBytes, complete}`.
    pub async fn models(&self) -> std::result::Result<String, JsValue> {
        let models = self.store.list().await.map_err(js_error)?;
        Ok(serde_json::to_string(&models).expect("stored models serialise"))
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

    /// `sdxl bench` in the browser (JSON options as `BenchRequest`): `on_event(json)` gets
    /// `{type: "bench", what}` as each measurement starts. Returns `{report, table}` as JSON. Needs
    /// no stored model: weights are random, generated on the GPU (beside any loaded models).
    pub async fn bench(&self, options: String, on_event: Function) -> std::result::Result<String, JsValue> {
        let request: BenchRequest = parse(&options, "bench options").map_err(js_error)?;
        let model = match (request.unet_config, request.vae_config) {
            (Some(unet), Some(vae)) => BenchModel { name: request.model.unwrap_or_else(|| "custom".into()), unet_config: unet.into(), vae_config: vae.into() },
            (None, None) => BenchModel::sdxl_base(),
            _ => return Err(js_error(Error::InvalidParameter("bench: give both unetConfig and vaeConfig, or neither".into()))),
        };
        let mut bench_options = BenchOptions::default();
        if let Some(sizes) = request.sizes {
            bench_options.sizes = sizes;
        }
        if let Some(quants) = request.quants {
            bench_options.quants = quants.iter().map(|q| q.parse()).collect::<Result<_>>().map_err(js_error)?;
        }
        if let Some(ranks) = request.loras {
            if ranks.contains(&0) {
                return Err(js_error(Error::InvalidParameter("bench loras: ranks are at least 1".into())));
            }
            bench_options.lora_ranks = ranks;
        }
        if let Some(only) = request.only {
            if let Some(bad) = only.iter().find(|o| !["kernels", "unet", "vae"].contains(&o.as_str())) {
                return Err(js_error(Error::InvalidParameter(format!("bench only: '{bad}' is not kernels, unet or vae"))));
            }
            let has = |part: &str| only.iter().any(|o| o == part);
            (bench_options.kernels, bench_options.unet, bench_options.vae) = (has("kernels"), has("unet"), has("vae"));
        }
        let report = bench::run(&self.gpu, &model, &bench_options, |what| emit(&on_event, json!({"type": "bench", "what": what})))
            .await
            .map_err(js_error)?;
        Ok(json!({"report": report, "table": report.table()}).to_string())
    }

    /// Stores the LoRA of `options` (JSON `{id, url?, file?}`: a .safetensors URL, or with `file`
    /// its name, the picked `File` in `files`) unless it is stored from there already; JSON of
    /// the stored LoRA. The file is checked to be a LoRA before anything is stored; whether it
    /// fits the base is checked when a generation uses it. `on_event` gets JSON progress events.
    #[wasm_bindgen(js_name = storeLora)]
    pub async fn store_lora(&self, options: String, files: js_sys::Array, on_event: Function) -> std::result::Result<String, JsValue> {
        async {
            let wanted: ModelRef = parse(&options, "storeLora options")?;
            let stored = store_file(&self.loras, &wanted, &files, &on_event, FileKind::Lora).await?;
            Ok(serde_json::to_string(&stored).expect("stored LoRAs serialise"))
        }
        .await
        .map_err(js_error)
    }

    /// Stores the preview decoder of `options` (JSON `{id, url?, file?}` as `storeLora`'s: a
    /// TAESD-XL decoder, diffusers' AutoencoderTiny safetensors or madebyollin's
    /// taesdxl_decoder.safetensors) unless stored, and loads it: later runs' step previews are
    /// its decodes at image size (the linear latent map where it would not fit the adapter).
    /// `options` null unloads it. JSON of the stored decoder, or null.
    #[wasm_bindgen(js_name = loadPreviewDecoder)]
    pub async fn load_preview_decoder(&mut self, options: String, files: js_sys::Array, on_event: Function) -> std::result::Result<String, JsValue> {
        self.preview_decoder = None;
        async {
            let Some(wanted) = parse::<Option<ModelRef>>(&options, "loadPreviewDecoder options")? else { return Ok("null".into()) };
            let stored = store_file(&self.decoders, &wanted, &files, &on_event, FileKind::PreviewDecoder).await?;
            let (source, file) = self.decoders.open(&wanted.id).await?;
            let decoder = self.gpu.operation(TaesdDecoder::from_file(&self.gpu, source, &file)).await?;
            self.preview_decoder = Some(decoder);
            Ok(serde_json::to_string(&stored).expect("stored decoders serialise"))
        }
        .await
        .map_err(js_error)
    }

    /// JSON list of the stored preview decoders, as `loras()` lists LoRAs.
    #[wasm_bindgen(js_name = previewDecoders)]
    pub async fn preview_decoders(&self) -> std::result::Result<String, JsValue> {
        let stored = self.decoders.list().await.map_err(js_error)?;
        Ok(serde_json::to_string(&stored).expect("stored decoders serialise"))
    }

    /// Deletes a stored preview decoder; returns the bytes freed.
    #[wasm_bindgen(js_name = deletePreviewDecoder)]
    pub async fn delete_preview_decoder(&self, id: String) -> std::result::Result<f64, JsValue> {
        self.decoders.delete(&id).await.map(|n| n as f64).map_err(js_error)
    }

    /// JSON list of the stored LoRAs: `{id, file, origin, storedBytes, hash, complete}`.
    pub async fn loras(&self) -> std::result::Result<String, JsValue> {
        let loras = self.loras.list().await.map_err(js_error)?;
        Ok(serde_json::to_string(&loras).expect("stored LoRAs serialise"))
    }

    /// Deletes a stored LoRA; returns the bytes freed.
    #[wasm_bindgen(js_name = deleteLora)]
    pub async fn delete_lora(&self, id: String) -> std::result::Result<f64, JsValue> {
        self.loras.delete(&id).await.map(|n| n as f64).map_err(js_error)
    }

    /// Checks a stored model's records against their sha256; JSON list of the bad ones.
    pub async fn verify(&self, id: String) -> std::result::Result<String, JsValue> {
        let bad = self.store.verify(&id).await.map_err(js_error)?;
        Ok(serde_json::to_string(&bad).expect("paths serialise"))
    }
}

/// Where `wanted` comes from, as the store records it: a picked `file`'s name, size and
/// modification time, or its URL's origin; None for a model named by id alone.
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
async fn store_file(store: &LoraStore<IdbStore>, wanted: &ModelRef, files: &js_sys::Array, on_event: &Function, kind: FileKind) -> Result<StoredLora> {
    let file = Some(files.get(0)).filter(|f| !f.is_undefined() && !f.is_null());
    let origin = origin(wanted, file.as_ref())?.ok_or_else(|| Error::InvalidParameter(format!("{} '{}': give its url or a file", kind.noun(), wanted.id)))?;
    let id = &wanted.id;
    let progress = |stage: &'static str| move |done: u64, total: u64| emit(on_event, json!({"type": stage, "model": id, "loaded": done, "total": total}));
    match (file, &wanted.url) {
        (Some(blob), _) => {
            let name = wanted.file.as_deref().unwrap_or_default();
            let source = BlobSource::new(blob, name)?;
            store.store_file(id, &origin, &source, name, kind.check(&source, name), progress("import")).await
        }
        (None, Some(url)) => {
            let (http, Some(name)) = HttpSource::for_url(url)? else {
                return Err(Error::InvalidParameter(format!("{} '{id}': {url} names no .safetensors file", kind.noun())));
            };
            let stored = store.store_file(id, &origin, &http, &name, kind.check(&http, &name), progress("download")).await?;
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

fn origin(wanted: &ModelRef, file: Option<&JsValue>) -> Result<Option<String>> {
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
    async fn load_one(&self, wanted: &ModelRef, origin: Option<String>, file: Option<JsValue>, quant: QuantPreset, kind: ModelKind, on_event: &Function) -> Result<Loaded> {
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
    async fn fetch(&self, wanted: &ModelRef, origin: &Option<String>, file: Option<JsValue>, quant: QuantPreset, on_event: &Function) -> Result<()> {
        let options = DownloadOptions::new(quant);
        // A folder or file is converted as it arrives: for the user, both are the download (or the import).
        let progress = |stage: &'static str| {
            move |p: &Progress| {
                let stage = if p.stage == "verify" { "verify" } else { stage };
                emit(on_event, json!({"type": stage, "model": wanted.id, "loaded": p.bytes_done, "total": p.bytes_total, "detail": p.detail}));
            }
        };
        match (file, &wanted.url, origin) {
            (Some(blob), _, Some(origin)) => {
                let name = wanted.file.as_deref().unwrap_or_default();
                let source = BlobSource::new(blob, name)?;
                let model = ModelSource::single_file(&source, name, None).await?;
                self.store.import(&wanted.id, origin, &model, &options, &|| source.bytes_read(), progress("import")).await.map(drop)
            }
            (None, Some(url), _) => self.store.download(&wanted.id, url, &options, progress("download")).await.map(drop),
            _ => Err(Error::ModelIncomplete(format!("'{}' is not stored: give its url or a file", wanted.id))),
        }
    }

    /// Uploads the stored `wanted` to the GPU.
    async fn upload(&self, wanted: &ModelRef, origin: &Option<String>, quant: QuantPreset, kind: ModelKind, on_event: &Function) -> Result<Loaded> {
        let (total, done, reported) = (Cell::new(0), Cell::new(0), Cell::new(0));
        // Thousands of tensors: an event per 0.5 % is enough for a progress bar.
        let report = |read: u64| {
            done.set(done.get() + read);
            let (done, total) = (done.get(), total.get());
            // (The manifest is read before the total is known: nothing to report yet.)
            if total > 0 && (done - reported.get() >= total / 200 || done >= total) {
                reported.set(done);
                emit(on_event, json!({"type": "upload", "model": wanted.id, "loaded": done.min(total), "total": total}));
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
        let stored: Vec<StoredLora> = match wanted.is_empty() {
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

    async fn run(&self, options: &str, images: &js_sys::Array, on_event: &Function, cancelled: &Function) -> Result<Object> {
        let options: GenerateOptions = parse(options, "generate options")?;
        let image_in = Picture::from_js(&images.get(0), "image")?;
        // The mask in grey as given, blurred as diffusers' mask_processor.blur(mask, maskBlur).
        let soft_mask = match Picture::from_js(&images.get(1), "mask")? {
            Some(mask) => {
                let gray = mask.pixels(true)?;
                Some(match options.mask_blur {
                    Some(radius) => gaussian_blur(&gray, radius).map_err(|e| in_context("maskBlur", e))?,
                    None => gray,
                })
            }
            None if options.mask_blur.is_some() => return Err(Error::InvalidParameter("maskBlur needs a mask".into())),
            None => None,
        };
        // Inpainting a crop around the mask: the run's size is width x height (the image's by default).
        let crop = match (options.mask_padding, image_in, soft_mask) {
            (Some(_), _, _) if options.outpaint.is_some() => return Err(Error::InvalidParameter("maskPadding crops around the mask: leave out outpaint".into())),
            (Some(pad), Some(image_in), Some(soft_mask)) => {
                let original = image_in.pixels(false)?;
                let (width, height) = (options.width.unwrap_or(original.width), options.height.unwrap_or(original.height));
                Some(crop_for_run(&original, &soft_mask, width, height, pad)?)
            }
            (Some(_), _, _) => return Err(Error::InvalidParameter("maskPadding needs an image and a mask".into())),
            (None, image_in, soft_mask) => {
                let init_image = image_in.map(|p| p.image("image")).transpose()?;
                let mask = soft_mask.map(|g| Mask::from_gray(g.width, g.height, g.data.iter().map(|&v| v as f32 / 255.0)));
                return self.generate_from(options, init_image, mask, None, on_event, cancelled).await;
            }
        };
        let (init_image, mask) = crop.as_ref().map(|c| (Some(c.image.clone()), Some(c.mask.clone()))).unwrap_or_default();
        self.generate_from(options, init_image, mask, crop.as_ref(), on_event, cancelled).await
    }

    /// A generation from its decoded image inputs; `crop`: a run on a crop around the mask,
    /// its result pasted back into the original.
    async fn generate_from(
        &self,
        options: GenerateOptions,
        init_image: Option<InitImage>,
        mask: Option<Mask>,
        crop: Option<&CropRun>,
        on_event: &Function,
        cancelled: &Function,
    ) -> Result<Object> {
        let (init_image, mask) = match (init_image, mask, options.outpaint) {
            (None, mask, outpaint) if mask.is_some() || outpaint.is_some() => {
                return Err(Error::InvalidParameter(format!("{} needs an image", if mask.is_some() { "mask" } else { "outpaint" })));
            }
            (Some(_), Some(_), Some(_)) => return Err(Error::InvalidParameter("outpaint makes its own mask: leave out mask".into())),
            (Some(image), None, Some(pad)) => {
                let (canvas, mask) = outpaint_canvas(&image, pad, options.outpaint_overlap.unwrap_or(0))?;
                (Some(canvas), Some(mask))
            }
            (image, mask, _) => (image, mask),
        };
        if options.strength.is_some() && init_image.is_none() {
            return Err(Error::InvalidParameter("strength needs an image".into()));
        }
        let final_decoder = match options.final_decoder.as_deref() {
            None | Some("vae") => None,
            Some("taesd") => Some(self.preview_decoder.as_ref().ok_or_else(|| {
                Error::InvalidParameter("finalDecoder 'taesd' decodes with the preview decoder, and none is loaded: call loadPreviewDecoder() first".into())
            })?),
            Some(other) => return Err(Error::InvalidParameter(format!("finalDecoder '{other}' must be 'vae' or 'taesd'"))),
        };
        let base = self.base.as_ref().ok_or_else(|| Error::ModelIncomplete("no model is loaded: call load() first".into()))?;
        let refiner = match options.refiner_start {
            Some(_) => Some(self.refiner.as_ref().ok_or_else(|| {
                Error::InvalidParameter("refinerStart is set but no refiner is loaded (load one, or set refinerStart to null)".into())
            })?),
            None => None,
        };
        // The recipe keeps the prompt as typed, <lora:...> tags included.
        let (prompt, tags) = match options.prompt_weighting {
            true => prompt_tags(&options.prompt)?,
            false => (options.prompt.clone(), Vec::new()),
        };
        let wanted = options.loras.iter().map(|l| (l.model.clone(), l.weight)).chain(tags);
        let recipes = self.set_loras(base, wanted.collect()).await?;
        let defaults = GenerateParams::default();
        // img2img and inpainting run at the image's size.
        let (width, height) = init_image.as_ref().map_or((defaults.width, defaults.height), |i| (i.width, i.height));
        let strength = if mask.is_some() { INPAINT_STRENGTH } else { IMG2IMG_STRENGTH };
        let params = GenerateParams {
            prompt,
            negative: options.negative_prompt,
            width: options.width.unwrap_or(width),
            height: options.height.unwrap_or(height),
            strength: options.strength.unwrap_or(strength),
            init_image,
            mask,
            steps: options.steps.unwrap_or(defaults.steps),
            guidance: options.guidance.unwrap_or(defaults.guidance),
            // A random seed fits a JS number exactly (53 bits), so the result can report it.
            seed: options.seed.unwrap_or_else(|| (js_sys::Math::random() * 2f64.powi(53)) as u64),
            refiner_start: options.refiner_start.unwrap_or(defaults.refiner_start),
            scheduler: options.scheduler.as_deref().map(str::parse).transpose()?,
            timestep_spacing: options.timestep_spacing.as_deref().map(str::parse).transpose()?,
            prompt_options: PromptOptions { long_prompt: options.long_prompt, weighting: options.prompt_weighting },
            ..defaults
        };
        let decoder = self.preview_decoder.as_ref().filter(|_| options.preview);
        let mut watcher = JsObserver { on_event, cancelled, preview: options.preview, decoder, marks: vec![("start", js_sys::Date::now())] };
        let out = generate_with(&self.gpu, &base.model, refiner.map(|r| &r.model), &params, final_decoder, &mut watcher).await?;
        let pixels = self.gpu.read(&out.image).await?;
        watcher.marks.push(("end", js_sys::Date::now()));

        let typed = GenerateParams { prompt: options.prompt, ..params.clone() };
        let recipe = image::parameters(&typed, base.model.scheduler(&params)?.name(), &base.id, refiner.map(|r| r.id.as_str()), &recipes);
        let recipe = if final_decoder.is_some() { image::with_entry(recipe, "VAE", "TAESD") } else { recipe };
        let (png, width, height, recipe) = match crop {
            Some(crop) => {
                let pasted = crop.paste_back(&pixels);
                let recipe = image::with_entry(recipe, "Masked area padding", &crop.padding.to_string());
                (image::encode_png(&pasted.data, pasted.width, pasted.height, &recipe)?, pasted.width, pasted.height, recipe)
            }
            None => (image::encode_png(&image::rgb8(&pixels, params.height, params.width), params.width, params.height, &recipe)?, params.width, params.height, recipe),
        };
        let timings = watcher.timings();
        let result = Object::new();
        let set = |key: &str, value: JsValue| Reflect::set(&result, &key.into(), &value).expect("setting a field of a new object");
        set("png", Uint8Array::from(png.as_slice()).into());
        set("parameters", recipe.into());
        set("seed", (params.seed as f64).into());
        set("width", width.into());
        set("height", height.into());
        set("timings", js_sys::JSON::parse(&timings.to_string()).expect("timings are JSON"));
        Ok(result)
    }
}

/// An image argument of `generate`: PNG bytes (decoded as the CLI decodes its files), or RGBA
/// pixels `{data, width, height}` (an ImageData, or what sdxl.js draws other images into).
enum Picture {
    Png(Vec<u8>),
    Rgba { width: usize, height: usize, data: Vec<u8> },
}

impl Picture {
    fn from_js(value: &JsValue, what: &str) -> Result<Option<Picture>> {
        if value.is_undefined() || value.is_null() {
            return Ok(None);
        }
        if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
            return Ok(Some(Picture::Png(bytes.to_vec())));
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
        Ok(Some(Picture::Rgba { width: width as usize, height: height as usize, data }))
    }

    fn image(self, what: &str) -> Result<InitImage> {
        match self {
            Picture::Png(bytes) => image::decode_png(&bytes),
            Picture::Rgba { width, height, data } => image::image_from_pixels(width, height, 4, &data),
        }
        .map_err(|e| in_context(what, e))
    }

    /// 8-bit pixels: RGB, or (`gray`) a grey mask as given.
    fn pixels(self, gray: bool) -> Result<Pixels> {
        let what = if gray { "mask" } else { "image" };
        match self {
            Picture::Png(bytes) => image::decode_png_pixels(&bytes, gray),
            Picture::Rgba { width, height, data } if gray => image::gray_pixels(width, height, 4, &data),
            Picture::Rgba { width, height, data } => image::rgb_pixels(width, height, 4, &data),
        }
        .map_err(|e| in_context(what, e))
    }

}

fn in_context(what: &str, e: Error) -> Error {
    match e {
        Error::InvalidParameter(m) => Error::InvalidParameter(format!("{what}: {m}")),
        e => e,
    }
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
    fn timings(&self) -> serde_json::Value {
        let mut timings = serde_json::Map::new();
        for pair in self.marks.windows(2) {
            if pair[0].0 != "start" {
                timings.insert(pair[0].0.to_string(), json!(pair[1].1 - pair[0].1));
            }
        }
        timings.insert("total".into(), json!(self.marks.last().unwrap().1 - self.marks[0].1));
        json!(timings)
    }
}

impl Observer for &mut JsObserver<'_> {
    async fn event(&mut self, gpu: &Gpu, event: Event<'_>) -> Result<()> {
        if self.cancelled.call0(&JsValue::NULL).map_or(false, |v| v.is_truthy()) {
            return Err(Error::Cancelled("the run was cancelled; its GPU buffers are freed".into()));
        }
        let (json, preview) = match event {
            Event::Encode(stage) => {
                self.marks.push((stage_name(stage), js_sys::Date::now()));
                (json!({"type": "encode", "stage": stage_name(stage)}), JsValue::UNDEFINED)
            }
            Event::Step { progress, estimate } => {
                let mut json = json!({"type": "step", "stage": stage_name(progress.stage), "step": progress.step, "steps": progress.steps});
                let preview = if self.preview {
                    let denoised = estimate.denoised(gpu)?;
                    let &[_, c, h, w] = denoised.shape() else { unreachable!("latents are [1, C, h, w]") };
                    let rgba = match self.decoder.filter(|d| d.fits(gpu, h, w) && d.config.latent_channels == c) {
                        Some(decoder) => {
                            let up = decoder.upscale();
                            let (ih, iw) = (h * up, w * up);
                            json["previewDecoder"] = json!("taesd");
                            (iw, ih, image::rgba8(&gpu.read(&decoder.decode(gpu, &denoised)?).await?, ih, iw))
                        }
                        None => (w, h, image::latent_preview(&gpu.read(&denoised).await?, c, h, w)),
                    };
                    json["previewWidth"] = json!(rgba.0);
                    json["previewHeight"] = json!(rgba.1);
                    Uint8Array::from(rgba.2.as_slice()).into()
                } else {
                    JsValue::UNDEFINED
                };
                (json, preview)
            }
            Event::Decode => {
                self.marks.push(("decode", js_sys::Date::now()));
                (json!({"type": "decode"}), JsValue::UNDEFINED)
            }
        };
        let _ = self.on_event.call2(&JsValue::NULL, &JsValue::from_str(&json.to_string()), &preview);
        Ok(())
    }
}
