// The dedicated worker behind sdxl.js: owns the wasm engine (GPU, model store) and runs one call at
// a time. Messages in: {id, method, args} and {cancel: id}. Messages out: {id, event, preview?},
// {id, result} or {id, error: {name, message}}.
import init, { Engine } from './pkg/sdxl.js';

let engine = null;
const cancelled = new Set();
let queue = Promise.resolve();

const methods = {
  async create(id, options) {
    await init();
    engine = await Engine.create(JSON.stringify(options));
    return JSON.parse(engine.info());
  },
  async load(id, options, files) {
    await engine.load(JSON.stringify(options), files, (event) => post({ id, event: JSON.parse(event) }));
  },
  async generate(id, options) {
    const onEvent = (event, preview) => post({ id, event: JSON.parse(event), preview }, preview ? [preview.buffer] : []);
    const out = await engine.generate(JSON.stringify(options), onEvent, () => cancelled.has(id));
    return { result: out, transfer: [out.png.buffer] };
  },
  async models() { return JSON.parse(await engine.models()); },
  async deleteModel(id, modelId) { return engine.deleteModel(modelId); },
  async verify(id, modelId) { return JSON.parse(await engine.verify(modelId)); },
  async storeLora(id, options, files) {
    return JSON.parse(await engine.storeLora(JSON.stringify(options), files, (event) => post({ id, event: JSON.parse(event) })));
  },
  async loras() { return JSON.parse(await engine.loras()); },
  async deleteLora(id, loraId) { return engine.deleteLora(loraId); },
  async bench(id, options) { return JSON.parse(await engine.bench(JSON.stringify(options), (event) => post({ id, event: JSON.parse(event) }))); },
  async storage() {
    const { usage = 0, quota = 0 } = await navigator.storage.estimate();
    return { usage, quota };
  },
};

function post(message, transfer = []) { self.postMessage(message, transfer); }

async function handle({ id, method, args }) {
  try {
    if (method !== 'create' && !engine) throw Object.assign(new Error('the engine is not created'), { name: 'InvalidState' });
    const out = await methods[method](id, ...args);
    if (out && out.transfer) post({ id, result: out.result }, out.transfer);
    else post({ id, result: out });
  } catch (e) {
    // Engine errors carry their kind as `name`; anything else (a wasm trap) is an internal error.
    const known = e instanceof Error && e.name !== 'Error' && e.name !== 'RuntimeError';
    post({ id, error: { name: known ? e.name : 'InternalError', message: String(e?.message ?? e) } });
  } finally {
    cancelled.delete(id);
  }
}

self.onmessage = ({ data }) => {
  if ('cancel' in data) cancelled.add(data.cancel);
  else queue = queue.then(() => handle(data));
};
