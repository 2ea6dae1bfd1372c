// The dedicated worker behind sdxl.js: owns the wasm engine (GPU, model store) and runs one call at
// a time. Messages in: {id, method, args} and {cancel: id} (a call still queued is skipped). Messages
// out: {id, event, preview?}, {id, result} or {id, error: {name, message}}. Options, results and
// events are the engine's own typed values (crate/src/app/types.rs): this file only routes them.
import init, { Engine, setPanicHook } from './pkg/sdxl.js';

let engine = null;
const cancelled = new Set();
let queue = Promise.resolve();
/** The id of the call running. */
let current = null;
/** A Rust panic's message (and location), recorded by the engine's hook before the trap. */
let panicked = null;

const methods = {
  async create(id, options) {
    await init();
    setPanicHook((message) => { panicked = message; });
    engine = await Engine.create(options);
    return engine.info();
  },
  async load(id, options, files) { return engine.load(options, files, (event) => post({ id, event })); },
  async generate(id, options, [image, mask], preview) {
    const onEvent = (event, previewBytes) => post({ id, event, preview: previewBytes }, previewBytes ? [previewBytes.buffer] : []);
    const images = [await pixels(image, 'image'), await pixels(mask, 'mask')];
    const out = await engine.generate(options, images, preview, onEvent, () => cancelled.has(id));
    return { result: out, transfer: [out.png.buffer] };
  },
  async models() { return engine.models(); },
  async deleteModel(id, modelId) { return engine.deleteModel(modelId); },
  async verify(id, modelId) { return engine.verify(modelId); },
  async storeLora(id, options, files) { return engine.storeLora(options, files, (event) => post({ id, event })); },
  async loras() { return engine.loras(); },
  async loadPreviewDecoder(id, options, files) { return engine.loadPreviewDecoder(options, files, (event) => post({ id, event })); },
  async previewDecoders() { return engine.previewDecoders(); },
  async deletePreviewDecoder(id, decoderId) { return engine.deletePreviewDecoder(decoderId); },
  async deleteLora(id, loraId) { return engine.deleteLora(loraId); },
  async bench(id, options) { return engine.bench(options, (event) => post({ id, event })); },
  async storage() {
    const { usage = 0, quota = 0 } = await navigator.storage.estimate();
    return { usage, quota };
  },
};

function post(message, transfer = []) { self.postMessage(message, transfer); }

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/**
 * An image of generate() as the engine takes it: a PNG file's bytes (decoded in the engine as the
 * CLI decodes its files), or RGBA pixels {data, width, height} (an ImageData; other images drawn
 * unconverted: no colour management, no premultiplied alpha); null when not given.
 */
async function pixels(value, name) {
  if (value === null) return null;
  if (value instanceof Blob) {
    const bytes = new Uint8Array(await value.arrayBuffer());
    if (PNG_SIGNATURE.every((b, i) => bytes[i] === b)) return bytes;
    try {
      value = await createImageBitmap(value, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
    } catch (e) {
      throw Object.assign(new Error(`${name}: the file is not an image this browser decodes (${e.message})`), { name: 'InvalidParameter' });
    }
  }
  if (value instanceof ImageData) return value;
  const context = new OffscreenCanvas(value.width, value.height).getContext('2d');
  context.drawImage(value, 0, 0);
  return context.getImageData(0, 0, value.width, value.height);
}

async function handle({ id, method, args }) {
  current = id;
  try {
    if (cancelled.has(id)) throw Object.assign(new Error('cancelled'), { name: 'AbortError' });
    if (method !== 'create' && !engine) throw Object.assign(new Error('the engine is not created'), { name: 'InvalidState' });
    const out = await methods[method](id, ...args);
    if (out && out.transfer) post({ id, result: out.result }, out.transfer);
    else post({ id, result: out });
  } catch (e) {
    // Engine errors carry their kind as `name`; anything else (a wasm trap) is an internal error. A
    // panic traps as "RuntimeError: unreachable": its hook said why. The client replaces this worker.
    const known = e instanceof Error && e.name !== 'Error' && e.name !== 'RuntimeError';
    const error = panicked !== null ? { name: 'InternalError', message: `the engine panicked: ${panicked}` }
      : { name: known ? e.name : 'InternalError', message: String(e?.message ?? e) };
    post({ id, error });
  } finally {
    cancelled.delete(id);
    current = null;
  }
}

// A panic in a task of the engine's futures traps outside the call's promise, which never settles:
// answer the call here (a trap within the call is answered by handle()).
self.addEventListener('error', (event) => {
  if (panicked === null || current === null) return;
  event.preventDefault();
  post({ id: current, error: { name: 'InternalError', message: `the engine panicked: ${panicked}` } });
});

self.onmessage = ({ data }) => {
  if ('cancel' in data) cancelled.add(data.cancel);
  else queue = queue.then(() => handle(data));
};
