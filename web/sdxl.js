// Stable Diffusion XL in the browser: the JS API. The engine (Rust → wasm, WebGPU) runs in a
// dedicated worker, so the page never blocks; models stream into IndexedDB and load from there.
//
//   const sdxl = await Sdxl.create({ onProgress: (e) => console.log(e) });
//   await sdxl.load({ base: SDXL_1_0.base, refiner: SDXL_1_0.refiner, quant: 'q4' });
//   const { blob } = await sdxl.generate({ prompt: 'a red fox in the snow', seed: 7 });
//   await sdxl.storeLora(pickedFile);   // a kohya / diffusers LoRA .safetensors, kept in IndexedDB
//   await sdxl.generate({ prompt: 'a red fox', loras: [{ model: 'my-style', weight: 0.8 }] });

/** SDXL 1.0 on the Hugging Face hub (diffusers layout; converted to `quant` as it downloads). */
export const SDXL_1_0 = {
  base: 'stabilityai/stable-diffusion-xl-base-1.0',
  refiner: 'stabilityai/stable-diffusion-xl-refiner-1.0',
};

/** SDXL 1.0 base as one stable-diffusion.cpp GGUF file on the hub (Q4_K; the text encoders and VAE inside). */
export const SDXL_1_0_GGUF = 'kostakoff/stable-diffusion-xl-base-1.0-GGUF/sd_xl_base_1.0_0_Q4_K.gguf';

/** TAESD-XL (madebyollin/taesdxl on the hub, 10 MB): previews at image size, see loadPreviewDecoder. */
export const TAESDXL = { url: 'madebyollin/taesdxl/diffusion_pytorch_model.safetensors', id: 'taesdxl' };

/** SDXL's training resolutions (width, height): the sizes it draws best. */
export const RESOLUTION_BUCKETS = [
  [1024, 1024], [1152, 896], [896, 1152], [1216, 832], [832, 1216], [1344, 768], [768, 1344], [1536, 640], [640, 1536],
];

/** Every failure is an SdxlError; `name` says which kind (see sdxl.d.ts). */
export class SdxlError extends Error {
  constructor(name, message) {
    super(message);
    this.name = name;
  }
}

const abortError = () => new SdxlError('AbortError', 'cancelled');
const invalid = (message) => new SdxlError('InvalidParameter', message);
/** A value as an error message shows it (JSON where it has one; JSON.stringify throws on a BigInt). */
const shown = (value) => {
  try {
    return typeof value === 'function' ? 'a function' : JSON.stringify(value) ?? String(value);
  } catch {
    return `a ${typeof value}`;
  }
};

/** Rejects option names the call does not know (a typo would otherwise silently use a default). */
const isA = (value, type) => type in globalThis && value instanceof globalThis[type];

/**
 * An image option as it crosses to the worker, converted now so that calls reach the worker in
 * the order they were made: a Blob, an ImageBitmap or an ImageData as it is (the worker decodes
 * them), a canvas or a loaded <img> drawn into an ImageData; null when not given.
 */
function imageArg(value, name) {
  if (value === undefined || value === null) return null;
  if (value instanceof Blob || isA(value, 'ImageBitmap') || isA(value, 'ImageData')) return value;
  if (!['HTMLCanvasElement', 'OffscreenCanvas', 'HTMLImageElement'].some((type) => isA(value, type))) {
    throw invalid(`${name} must be a Blob, ImageBitmap, ImageData, canvas or <img>, not ${shown(value)}`);
  }
  const width = value.naturalWidth ?? value.width;
  const height = value.naturalHeight ?? value.height;
  if (!(width > 0 && height > 0)) throw invalid(`${name} is empty (${width}x${height}; an <img> must have loaded)`);
  const context = new OffscreenCanvas(width, height).getContext('2d');
  context.drawImage(value, 0, 0);
  return context.getImageData(0, 0, width, height);
}

/** Rejects unknown names among options that never reach the engine (its own options it checks itself). */
function checkOptions(what, options, known) {
  const unknown = Object.keys(options ?? {}).filter((key) => !known.includes(key));
  if (unknown.length) throw invalid(`${what}: unknown option ${unknown.map((k) => `\`${k}\``).join(', ')} (known: ${known.join(', ')})`);
}

/** Rejects a `signal` that is not an AbortSignal and callbacks that are not functions. */
function checkHooks(what, { signal, ...callbacks }) {
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw invalid(`${what}: signal must be an AbortSignal`);
  for (const [name, callback] of Object.entries(callbacks)) {
    if (callback !== undefined && typeof callback !== 'function') throw invalid(`${what}: ${name} must be a function`);
  }
}

/**
 * Where `value` holds something the worker cannot be sent, as "PATH is a WHAT", or null. Options
 * cross as JSON (strings, numbers, booleans, null, arrays, plain objects), picked files and
 * images as Blobs, ImageBitmaps or ImageData;
 * a function, a symbol, a DOM node or a class instance would fail to clone or turn into `{}`.
 */
function unsendable(value, path) {
  if (value === null || value === undefined || ['string', 'number', 'boolean'].includes(typeof value) || value instanceof Blob || isA(value, 'ImageBitmap') || isA(value, 'ImageData')) return null;
  const prototype = typeof value === 'object' ? Object.getPrototypeOf(value) : undefined;
  if (!Array.isArray(value) && prototype !== Object.prototype && prototype !== null) {
    const what = typeof value === 'object' ? `a ${value.constructor?.name ?? 'object'}` : typeof value === 'bigint' ? 'a BigInt' : `a ${typeof value}`;
    return `${path || 'the argument'} is ${what}`;
  }
  for (const [key, item] of Object.entries(value)) {
    const bad = unsendable(item, Array.isArray(value) ? `${path}[${key}]` : path ? `${path}.${key}` : key);
    if (bad) return bad;
  }
  return null;
}

/** Throws InvalidParameter naming the first value in `args` the worker cannot be sent. */
function checkSendable(what, args) {
  const bad = args.map((arg) => unsendable(arg, '')).find(Boolean);
  if (bad) throw invalid(`${what}: ${bad}: options are strings, numbers, booleans, null, arrays and plain objects`);
}

/**
 * `ref` → {url, id?} or {file, id?, blob}: a hub repository (`owner/name`, or `owner/name/file.gguf`
 * for one file of it), a URL (of a pack, a diffusers folder, or a single .safetensors / .gguf), a
 * path starting with `./`, `../` or `/` (relative to the page), {url, id}, a `File` / `Blob` the
 * user picked or dropped, or {file: File, id}. The engine names it in the store when no id is
 * given (ModelSpec in sdxl.d.ts).
 */
function modelRef(ref) {
  const id = ref?.id === undefined ? {} : { id: ref.id };
  const blob = ref instanceof Blob ? ref : ref?.file instanceof Blob ? ref.file : null;
  if (blob) return { file: blob.name ?? 'model.safetensors', ...id, blob };
  const url = typeof ref === 'string' ? ref : ref?.url;
  if (typeof url !== 'string' || url === '') throw invalid(`a model is a hub repository, a URL, a File or {url, id}; got ${shown(ref)}`);
  const hub = /^[\w.-]+\/[\w.-]+(\/[\w.-]+)*$/.test(url) && !/^\.{1,2}\//.test(url);
  const absolute = /^[a-z]+:\/\//i.test(url) || hub ? url : new URL(url, globalThis.location?.href).href;
  return { url: absolute, ...id };
}

/** The options given (an option set to undefined is left out: the engine applies its default). */
const given = (options) => Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined));

/** Splits a modelRef into what crosses to the worker: the JSON part and the File (or null). */
const withoutBlob = (ref) => [Object.fromEntries(Object.entries(ref).filter(([k]) => k !== 'blob')), ref.blob ?? null];

/** Adds `fraction` and `etaSeconds` (from the rate since the phase began) to progress events. */
class Eta {
  #phases = new Map();
  add(e) {
    const [key, done, total] = e.type === 'step' ? [`step ${e.stage}`, e.step, e.steps] : [`${e.type} ${e.model}`, e.loaded, e.total];
    if (done === undefined) return e;
    const now = performance.now();
    if (!this.#phases.has(key) || done < this.#phases.get(key).done) this.#phases.set(key, { t: now, done });
    const start = this.#phases.get(key);
    const rate = (done - start.done) / ((now - start.t) / 1000);
    const eta = rate > 0 ? (total - done) / rate : null;
    return { ...e, fraction: total > 0 ? done / total : 1, etaSeconds: eta };
  }
}

export class Sdxl {
  #options;
  /** The worker that runs the engine, or null: the next call starts one. */
  #worker = null;
  #next = 1;
  /** The calls posted to the worker and not yet answered, in the order it runs them: id → {method, args, onEvent, resolve, reject}. */
  #calls = new Map();
  /** The GPU adapter: {adapter, precision ('f16' | 'f32'), shaderF16, maxBufferBytes}. */
  info = null;
  /** What load() made the loaded models: {base: {id, url | file}, refiner: {id, url | file} | null, quant}. */
  loaded = null;

  constructor(options) {
    this.#options = options;
  }

  /** Starts the worker, opens the GPU and the model store. Fails with WebGpuUnavailable without WebGPU. */
  static async create(options = {}) {
    checkHooks('Sdxl.create', { onProgress: options.onProgress });
    checkSendable('Sdxl.create', [given({ precision: options.precision, storeName: options.storeName })]);
    const sdxl = new Sdxl(options);
    try {
      await sdxl.#start();
    } catch (e) {
      sdxl.terminate();
      throw e;
    }
    return sdxl;
  }

  /** Starts a worker and its engine; calls posted meanwhile queue behind its creation (and fail with it). */
  #start() {
    const { precision, storeName, workerUrl = new URL('./worker.js', import.meta.url) } = this.#options;
    const worker = new Worker(workerUrl, { type: 'module' });
    // A replaced worker's last messages and errors are no longer anyone's.
    worker.onmessage = ({ data }) => worker === this.#worker && this.#receive(data);
    worker.onerror = (e) => worker === this.#worker && this.#stop(new SdxlError('InternalError', `the worker failed: ${e.message ?? 'it could not start'}`));
    this.#worker = worker;
    return new Promise((resolve, reject) => this.#post(this.#next++, { method: 'create', args: [given({ precision, storeName })], resolve, reject }))
      .then((info) => { this.info = info; });
  }

  #post(id, call) {
    this.#worker.postMessage({ id, method: call.method, args: call.args });
    this.#calls.set(id, call);
  }

  /** Ends the worker (and with it its GPU device); returns the calls it had not answered. */
  #drop() {
    this.#worker?.terminate();
    this.#worker = null;
    this.loaded = null;
    const calls = [...this.#calls];
    this.#calls.clear();
    return calls;
  }

  /** Ends the worker and rejects every call it had not answered (the next call starts a fresh one). */
  #stop(error) {
    for (const [, call] of this.#drop()) call.reject(error);
  }

  #receive({ id, event, preview, result, error }) {
    const call = this.#calls.get(id);
    if (!call) return;
    if (event) return call.onEvent?.(event, preview);
    this.#calls.delete(id);
    if (!error) return call.resolve(result);
    if (call.method === 'create') {
      call.reject(new SdxlError(error.name, error.message));
      this.#stop(new SdxlError(error.name, error.message));
    } else if (error.name === 'InternalError' || error.name === 'DeviceLost') {
      // The engine cannot go on after these (a panicked instance, a lost device): a fresh worker and
      // GPU device take over at once; the models load again from IndexedDB.
      call.reject(new SdxlError(error.name, `${error.message} (the engine restarted: load() the models again, they come from IndexedDB)`));
      this.#stop(new SdxlError(error.name, `the engine stopped: ${error.message}`));
      this.#start().catch(() => {}); // a failed start fails the calls queued behind it
    } else call.reject(new SdxlError(error.name, error.message));
  }

  /**
   * Aborts call `id`. A generation (`cancel`) stops at its next step; a call still queued in the
   * worker is skipped there; a running download stops only with its worker, so a fresh worker
   * takes over, and the calls queued behind the download run there.
   */
  #abort(id, cancel) {
    const call = this.#calls.get(id);
    if (!call) return;
    if (cancel) return this.#worker.postMessage({ cancel: id }); // the engine rejects the run with AbortError
    const [running] = this.#calls.keys();
    this.#calls.delete(id);
    call.reject(abortError());
    if (running !== id) return this.#worker.postMessage({ cancel: id });
    const queued = this.#drop();
    this.#start().catch(() => {}); // a failed start fails the calls queued behind it
    for (const [queuedId, queuedCall] of queued) this.#post(queuedId, queuedCall);
  }

  async #call(method, args, { onEvent, signal, cancel = false } = {}) {
    checkSendable(method, args);
    if (signal?.aborted) throw abortError();
    if (!this.#worker) this.#start().catch(() => {}); // a failed start fails this call
    const id = this.#next++;
    const onAbort = () => this.#abort(id, cancel);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      return await new Promise((resolve, reject) => {
        try {
          this.#post(id, { method, args, onEvent, resolve, reject });
        } catch (e) {
          // What passes unsendable() but still fails to clone (a Proxy, a getter that throws).
          reject(invalid(`${method}: an option cannot be sent to the engine: ${e.message}`));
        }
      });
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  #progress(onProgress) {
    const eta = new Eta();
    return (event, preview) => {
      const e = eta.add(event);
      if (preview) e.preview = new ImageData(new Uint8ClampedArray(preview.buffer), e.previewWidth, e.previewHeight);
      this.#options.onProgress?.(e);
      onProgress?.(e);
      return e;
    };
  }

  /**
   * Makes `base` (and `refiner`) the loaded models: downloads (or, for a picked file, imports) each
   * into IndexedDB unless stored (resuming an interrupted download), converting it to `quant` as it
   * streams in (GGUF blocks kept as stored), then uploads it to the GPU. Aborting `signal` stops the
   * download (what is stored stays) by restarting the worker; calls queued behind it still run.
   */
  async load(options = {}) {
    // The engine reads and checks the options (LoadRequest); the models' files and the hooks stay here.
    const { base, refiner = null, signal, onProgress, ...rest } = options ?? {};
    checkHooks('load', { signal, onProgress });
    const refs = [modelRef(base), refiner ? modelRef(refiner) : null];
    const files = refs.map((r) => r?.blob ?? null);
    const [b, r] = refs.map((ref) => ref && withoutBlob(ref)[0]);
    const request = given({ ...rest, base: b, refiner: r });
    // The engine releases the models it replaces before loading: on failure, none may be loaded.
    this.loaded = null;
    this.loaded = await this.#call('load', [request, files], { onEvent: this.#progress(onProgress), signal });
    return this.loaded;
  }

  /**
   * Text to image; with `image`, img2img; with `image` and `mask` (or `outpaint`), inpainting (or
   * outpainting) as diffusers' StableDiffusionXLInpaintPipeline, with an inpainting model or an
   * ordinary one. Resolves to {blob (PNG with the recipe in its `parameters` text), bitmap, seed,
   * width, height, parameters, timings}. `onStep` gets each step with a latent preview (ImageData);
   * aborting `signal` cancels at the next step and frees the run's GPU memory.
   */
  async generate(options = {}) {
    // The engine reads and checks the options (crate/src/app/types.rs); the images and callbacks stay here.
    const { image, mask, signal, onStep, onProgress, ...request } = options ?? {};
    checkHooks('generate', { signal, onStep, onProgress });
    const progress = this.#progress(onProgress);
    const onEvent = (event, preview) => {
      const e = progress(event, preview);
      if (e.type === 'step') onStep?.(e);
    };
    const images = [imageArg(image, 'image'), imageArg(mask, 'mask')];
    const out = await this.#call('generate', [given(request), images, Boolean(onStep)], { onEvent, signal, cancel: true });
    const blob = new Blob([out.png], { type: 'image/png' });
    const bitmap = await createImageBitmap(blob);
    return { blob, bitmap, seed: out.seed, width: out.width, height: out.height, parameters: out.parameters, timings: out.timings };
  }

  /** The stored models: [{id, url, quant, model, storedBytes, totalBytes, complete}]. */
  models() { return this.#call('models', []); }

  /** Deletes a stored model (releasing it from the GPU if loaded); resolves to the bytes freed. */
  async deleteModel(id) {
    const freed = await this.#call('deleteModel', [id]);
    if (this.loaded?.base.id === id || this.loaded?.refiner?.id === id) this.loaded = null; // load() again
    return freed;
  }

  /**
   * Stores a LoRA (kohya / AUTOMATIC1111, diffusers / peft or LyCORIS LoCon .safetensors) in
   * IndexedDB as it is, unless stored from there already: a File the user picked, a URL, a hub
   * `owner/name/file.safetensors`, {file, id} or {url, id}. The id defaults to the file's name
   * without .safetensors. Resolves to the stored LoRA; generate() applies it with `loras`.
   */
  async storeLora(ref, options = {}) {
    checkOptions('storeLora', options, ['signal', 'onProgress']);
    const { signal, onProgress } = options;
    checkHooks('storeLora', { signal, onProgress });
    const [lora, file] = withoutBlob(modelRef(ref));
    return this.#call('storeLora', [lora, [file]], { onEvent: this.#progress(onProgress), signal });
  }

  /** The stored LoRAs: [{id, file, origin, storedBytes, hash, complete}]. */
  loras() { return this.#call('loras', []); }

  /** Deletes a stored LoRA; resolves to the bytes freed. */
  deleteLora(id) { return this.#call('deleteLora', [id]); }

  /**
   * Stores a TAESD-XL preview decoder in this browser (default TAESDXL from the hub; a URL, a
   * File, {url, id} or {file, id} as storeLora takes) unless stored, and loads it: from then on
   * onStep previews are its decodes at image size instead of the latent-resolution colour map
   * (which stays where the decoder would not fit the adapter). `null` unloads it. Resolves to
   * the stored decoder. A restarted engine (after an abort or a fault) has none loaded.
   */
  async loadPreviewDecoder(ref = TAESDXL, options = {}) {
    checkOptions('loadPreviewDecoder', options, ['signal', 'onProgress']);
    const { signal, onProgress } = options;
    checkHooks('loadPreviewDecoder', { signal, onProgress });
    const [decoder, file] = ref === null ? [null, null] : withoutBlob(modelRef(ref));
    return this.#call('loadPreviewDecoder', [decoder, [file]], { onEvent: this.#progress(onProgress), signal });
  }

  /** The stored preview decoders: [{id, file, origin, storedBytes, hash, complete}]. */
  previewDecoders() { return this.#call('previewDecoders', []); }

  /** Deletes a stored preview decoder; resolves to the bytes freed. */
  deletePreviewDecoder(id) { return this.#call('deletePreviewDecoder', [id]); }

  /** Checks a stored model against its checksums; resolves to the bad records (load() repairs them). */
  verify(id) { return this.#call('verify', [id]); }

  /**
   * Measures speed and memory with random weights generated on the GPU (no download): the
   * adapter's peaks, the kernels on SDXL's shapes, one UNet step per weight format and size, the
   * VAE decode whole and tiled. `model` is a diffusers folder URL whose unet/ and vae/ config.json
   * give the shapes (default: SDXL 1.0 base). Resolves to {report, table} (`table`: text).
   */
  async bench(options = {}) {
    // The engine reads and checks the options (BenchRequest); `model`'s configs are fetched here.
    const { model, signal, onProgress, ...rest } = options ?? {};
    checkHooks('bench', { signal, onProgress });
    const request = given(rest);
    if (model) {
      const base = new URL(model.replace(/\/?$/, '/'), location.href);
      const config = async (path) => {
        const response = await fetch(new URL(path, base), { signal });
        if (!response.ok) throw new SdxlError('NetworkError', `${new URL(path, base)}: HTTP ${response.status}`);
        return response.text();
      };
      Object.assign(request, { model: base.pathname.split('/').filter(Boolean).pop(), unetConfig: await config('unet/config.json'), vaeConfig: await config('vae/config.json') });
    }
    return this.#call('bench', [request], { onEvent: (event) => onProgress?.(event), signal });
  }

  /** {usage, quota, persisted} of this origin's storage. */
  async storage() {
    const estimate = await this.#call('storage', []);
    return { ...estimate, persisted: (await navigator.storage?.persisted?.()) ?? false };
  }

  /** Asks the browser to keep the models under storage pressure (call it from a user gesture). */
  async persist() { return (await navigator.storage?.persist?.()) ?? false; }

  /** Stops the worker and frees the GPU. */
  terminate() { this.#stop(new SdxlError('AbortError', 'terminated')); }
}
