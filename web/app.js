// The page: presets, LoRAs with weight sliders, prompt form, an image to start from with a mask to
// paint and a canvas to extend, progress, live preview, cancel, gallery, storage panel.
import { Sdxl, SDXL_1_0, SDXL_1_0_GGUF, RESOLUTION_BUCKETS, TAESDXL } from './sdxl.js';

const $ = (id) => document.getElementById(id);

const PRESETS = {
  'sdxl-q4': {
    label: 'SDXL 1.0 base + refiner, 4-bit (13 GB download, 4.7 GB stored)', ...SDXL_1_0, quant: 'q4', sizes: RESOLUTION_BUCKETS, steps: 30,
    note: 'Downloads the official fp16 weights from the Hugging Face hub once, converting them to 4-bit as they stream in; later visits load from this browser, offline too.',
  },
  'sdxl-q8': {
    label: 'SDXL 1.0 base + refiner, 8-bit (13 GB download, 7.3 GB stored)', ...SDXL_1_0, quant: 'q8', sizes: RESOLUTION_BUCKETS, steps: 30,
    note: 'Closer to full precision than 4-bit; needs more storage and GPU memory.',
  },
  'sdxl-gguf': {
    label: 'SDXL 1.0 base, community GGUF Q4_K (one 2.6 GB file, 2.2 GB stored, base only)', base: SDXL_1_0_GGUF, refiner: null, quant: 'q4', sizes: RESOLUTION_BUCKETS, steps: 30,
    note: 'stable-diffusion.cpp\'s 4-bit K-quant file of the base: a third of the fp16 download; its Q4_K blocks are kept as stored, the rest converted to 4-bit.',
  },
  tiny: {
    label: 'Tiny demo model (random weights, served by this site)', base: './models/tiny-sdxl-base', refiner: './models/tiny-sdxl-refiner', quant: 'q8',
    sizes: [[64, 64], [96, 64], [64, 96], [128, 128]], steps: 4,
    previewDecoder: { url: './models/tiny-taesdxl/diffusion_pytorch_model.safetensors', id: 'tiny-taesdxl' },
    note: 'SDXL\'s exact structure at toy width with random weights: it makes noise-like images, fast, and works offline. Tests use it.',
  },
};

let sdxl = null;
let running = null; // the AbortController of the run in progress
let startImage = null; // the Blob generate() starts from (img2img, inpainting, outpainting), or null
const loraWeights = new Map(); // stored LoRA id → the weight its slider shows

function setStatus(state, text, fraction) {
  $('status').dataset.state = state;
  $('status').textContent = text;
  if (fraction !== undefined) $('progress').value = fraction;
}

const mb = (bytes) => `${(bytes / 1e6).toFixed(bytes < 1e7 ? 2 : 0)} MB`;
const duration = (s) => s === null || !isFinite(s) ? '' : s < 90 ? ` · ${Math.ceil(s)} s left` : ` · ${Math.round(s / 60)} min left`;

function showProgress(e) {
  const verbs = { download: 'Downloading', import: 'Importing', verify: 'Checking', upload: 'Loading to GPU' };
  if (e.type in verbs) setStatus('loading', `${verbs[e.type]} ${e.model}: ${mb(e.loaded)} of ${mb(e.total)}${duration(e.etaSeconds)}`, e.fraction);
  else if (e.type === 'encode') setStatus('generating', `Encoding the prompt (${e.stage})…`);
  else if (e.type === 'step') {
    setStatus('generating', `${e.stage === 'base' ? 'Base' : 'Refiner'} step ${e.step} of ${e.steps}${duration(e.etaSeconds)}`, e.fraction);
    $('status').dataset.step = e.step;
  } else if (e.type === 'decode') setStatus('generating', 'Decoding the image…');
}

function showPreview(e) {
  const canvas = $('preview');
  canvas.hidden = false;
  canvas.width = e.preview.width;
  canvas.height = e.preview.height;
  canvas.getContext('2d').putImageData(e.preview, 0, 0);
}

function fillPreset() {
  const preset = PRESETS[$('preset').value];
  $('preset-note').textContent = preset.note;
  $('size').replaceChildren(...preset.sizes.map(([w, h]) => new Option(`${w} × ${h}`, `${w}x${h}`)));
  $('steps').value = preset.steps;
}

/** Says whether this browser has WebGPU and how the engine will run; resolves to the adapter's name. */
async function checkGpu() {
  const status = $('gpu-status');
  const adapter = navigator.gpu && (await navigator.gpu.requestAdapter().catch(() => null));
  if (!adapter) {
    status.dataset.state = 'missing';
    status.textContent = navigator.gpu
      ? 'WebGPU is enabled but no GPU adapter is available (blocklisted driver, or hardware acceleration is off).'
      : 'This browser has no WebGPU: use a recent Chrome or Edge (113+), or Safari 26 / Firefox 141 where WebGPU is on.';
    return null;
  }
  const f16 = adapter.features.has('shader-f16');
  status.dataset.state = f16 ? 'ok' : 'f32';
  status.textContent = f16 ? 'WebGPU ready (f16 kernels).' : 'WebGPU ready, without shader-f16: running in f32, which is slower and needs more GPU memory.';
  const info = adapter.info ?? {};
  return info.description || [info.vendor, info.architecture].filter(Boolean).join(' ') || 'unnamed adapter';
}

/**
 * Loads the preset's preview decoder (TAESD-XL unless it names its own): downloaded once, then
 * from this browser. With `stored`, only one stored already (no download).
 */
async function loadPreviewDecoder({ stored = false } = {}) {
  const ref = PRESETS[$('preset').value].previewDecoder ?? TAESDXL;
  if (stored && !(await sdxl.previewDecoders()).some((d) => d.id === ref.id && d.complete)) return;
  await sdxl.loadPreviewDecoder(ref, { onProgress: showProgress });
  $('preview-decoder-state').textContent = `Previews: ${ref.id}`;
  $('preview-decoder').hidden = true;
  document.body.dataset.previewDecoder = ref.id;
}

/** Loads the chosen preset (a no-op in the engine for models already loaded). */
async function ensureLoaded(signal) {
  const preset = PRESETS[$('preset').value];
  await sdxl.persist().catch(() => false); // asked with the user's click
  await sdxl.load({ base: preset.base, refiner: $('use-refiner').checked && preset.refiner ? preset.refiner : null, quant: preset.quant, signal });
  refreshStorage();
}

async function run(task) {
  running = new AbortController();
  delete $('status').dataset.step;
  setStatus('loading', 'Starting…', 0);
  for (const button of document.querySelectorAll('#generate, #load, button.delete')) button.disabled = true;
  $('cancel').disabled = false;
  try {
    await task(running.signal);
  } catch (e) {
    if (e.name === 'AbortError') setStatus('cancelled', 'Cancelled.', 0);
    else setStatus('error', `${e.message} (${e.name})`, 0);
  } finally {
    running = null;
    for (const button of document.querySelectorAll('#generate, #load, button.delete')) button.disabled = false;
    $('cancel').disabled = true;
  }
}

/** The image options of a run: none for text to image; the image, and the mask or the extension, otherwise. */
function imageOptions() {
  if (!startImage) {
    const [width, height] = $('size').value.split('x').map(Number);
    return { width, height };
  }
  const options = { image: startImage };
  const strength = $('strength').value.trim();
  if (strength !== '') options.strength = Number(strength);
  const extend = ['left', 'top', 'right', 'bottom'].map((side) => Number($(`extend-${side}`).value) || 0);
  if (extend.some((v) => v > 0)) options.outpaint = extend;
  else if (maskPainted()) {
    options.mask = maskPixels();
    const blur = Number($('mask-blur').value) || 0;
    if (blur > 0) options.maskBlur = blur;
    if ($('mask-only').checked) {
      [options.width, options.height] = $('size').value.split('x').map(Number);
      options.maskPadding = Number($('mask-padding').value) || 0;
    }
  }
  return options;
}

/** Whether any pixel of the mask is painted. */
function maskPainted() {
  const canvas = $('edit-mask');
  const alpha = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i] !== 0) return true;
  return false;
}

/** The painted mask as opaque grey pixels: its coverage over black (half-covered edge pixels are grey). */
function maskPixels() {
  const canvas = $('edit-mask');
  const flat = new OffscreenCanvas(canvas.width, canvas.height).getContext('2d');
  flat.fillStyle = 'black';
  flat.fillRect(0, 0, canvas.width, canvas.height);
  flat.drawImage(canvas, 0, 0);
  return flat.getImageData(0, 0, canvas.width, canvas.height);
}

/** Opens `blob` in the editor: its pixels under an empty mask the size of the image. */
async function editImage(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: 'none' });
  for (const id of ['edit-image', 'edit-mask']) Object.assign($(id), { width: bitmap.width, height: bitmap.height });
  $('edit-image').getContext('2d').drawImage(bitmap, 0, 0);
  startImage = blob;
  $('editor').hidden = false;
  $('clear-image').disabled = false;
  $('size').disabled = !$('mask-only').checked;
}

function clearImage() {
  startImage = null;
  $('editor').hidden = true;
  $('clear-image').disabled = true;
  $('size').disabled = false;
}

/** Painting on the mask canvas with the pointer: white strokes, or erasing. */
function paintMask() {
  const canvas = $('edit-mask');
  const context = canvas.getContext('2d');
  let last = null;
  const at = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
  };
  const stroke = (e) => {
    const point = at(e);
    Object.assign(context, { lineCap: 'round', lineJoin: 'round', lineWidth: Number($('brush').value), strokeStyle: 'white',
      globalCompositeOperation: $('eraser').checked ? 'destination-out' : 'source-over' });
    context.beginPath();
    context.moveTo(...(last ?? point));
    context.lineTo(...point);
    context.stroke();
    last = point;
  };
  canvas.onpointerdown = (e) => { canvas.setPointerCapture(e.pointerId); last = null; stroke(e); };
  canvas.onpointermove = (e) => { if (e.buttons & 1) stroke(e); };
  canvas.onpointerup = () => { last = null; };
  $('clear-mask').onclick = () => context.clearRect(0, 0, canvas.width, canvas.height);
}

async function generate(signal) {
  await ensureLoaded(signal);
  if (!$('lock-seed').checked) randomSeed();
  const negative = $('negative').value.trim();
  const result = await sdxl.generate({
    prompt: $('prompt').value,
    negativePrompt: negative === '' ? undefined : negative,
    ...imageOptions(),
    steps: Number($('steps').value),
    guidance: Number($('guidance').value),
    seed: Number($('seed').value),
    scheduler: $('scheduler').value || null,
    refinerStart: sdxl.loaded.refiner ? Number($('refiner-start').value) : null,
    promptWeighting: $('prompt-weighting').checked,
    loras: [...loraWeights].filter(([, weight]) => weight !== 0).map(([model, weight]) => ({ model, weight })),
    signal,
    onStep: showPreview,
  });
  addToGallery(result);
  setStatus('done', `Done in ${(result.timings.total / 1000).toFixed(1)} s (seed ${result.seed}).`, 1);
}

function addToGallery(result) {
  const url = URL.createObjectURL(result.blob);
  const figure = document.createElement('figure');
  const img = Object.assign(document.createElement('img'), { src: url, alt: result.parameters.split('\n')[0], width: result.width, height: result.height });
  const link = Object.assign(document.createElement('a'), { href: url, download: `sdxl-${result.seed}.png`, textContent: 'Download PNG' });
  const caption = document.createElement('figcaption');
  const edit = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Edit', className: 'edit', title: 'Start from this image: rework it, paint a mask, or extend it' });
  edit.onclick = () => editImage(result.blob).catch((e) => setStatus('error', `${e.message} (${e.name})`));
  caption.append(`seed ${result.seed} · ${result.width}×${result.height} · ${(result.timings.total / 1000).toFixed(1)} s · `, link, edit);
  figure.dataset.seed = result.seed;
  figure.append(img, caption);
  $('gallery').prepend(figure);
}

function randomSeed() {
  $('seed').value = crypto.getRandomValues(new Uint32Array(1))[0];
}

function refreshStorage() {
  showStorage().catch((e) => { $('storage-usage').textContent = `The model store could not be read: ${e.message} (${e.name})`; });
  showLoras().catch((e) => setStatus('error', `The LoRAs could not be listed: ${e.message} (${e.name})`));
}

async function showStorage() {
  const [models, storage] = await Promise.all([sdxl.models(), sdxl.storage()]);
  $('storage-usage').textContent = `${mb(storage.usage)} used of ${mb(storage.quota)} available to this site` +
    (storage.persisted ? ' · kept under storage pressure' : '');
  $('persist').hidden = storage.persisted;
  $('models').replaceChildren(...models.map((m) => {
    const row = document.createElement('tr');
    row.dataset.id = m.id;
    const state = m.complete ? 'ready' : `incomplete (${m.totalBytes ? Math.floor(100 * m.storedBytes / m.totalBytes) : 0}%)`;
    for (const text of [m.id, m.quant ?? '?', mb(m.storedBytes), state]) row.insertCell().textContent = text;
    const remove = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Delete' });
    remove.className = 'delete';
    remove.disabled = Boolean(running);
    remove.onclick = () => sdxl.deleteModel(m.id).catch((e) => setStatus('error', `${e.message} (${e.name})`)).finally(refreshStorage);
    row.insertCell().append(remove);
    return row;
  }));
}

/** The stored LoRAs, each with its weight slider (0: off) and a delete button. */
async function showLoras() {
  const loras = (await sdxl.loras()).filter((l) => l.complete);
  for (const id of loraWeights.keys()) if (!loras.some((l) => l.id === id)) loraWeights.delete(id);
  $('loras').replaceChildren(...loras.map((l) => {
    const row = document.createElement('tr');
    row.dataset.id = l.id;
    row.insertCell().textContent = l.id;
    row.cells[0].title = `${l.file} · ${mb(l.storedBytes)} · hash ${l.hash}`;
    const weight = Object.assign(document.createElement('input'), { type: 'range', min: -2, max: 2, step: 0.05, value: loraWeights.get(l.id) ?? 0, className: 'weight' });
    const shown = Object.assign(document.createElement('output'), { value: Number(weight.value).toFixed(2) });
    weight.oninput = () => { loraWeights.set(l.id, Number(weight.value)); shown.value = Number(weight.value).toFixed(2); };
    loraWeights.set(l.id, Number(weight.value));
    row.insertCell().append(weight, shown);
    const remove = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Delete', className: 'delete' });
    remove.disabled = Boolean(running);
    remove.onclick = () => sdxl.deleteLora(l.id).catch((e) => setStatus('error', `${e.message} (${e.name})`)).finally(refreshStorage);
    row.insertCell().append(remove);
    return row;
  }));
}

/** Stores a picked LoRA file in this browser, its slider at 1. */
function addLora(file) {
  if (!file || !sdxl || running) return;
  run(async (signal) => {
    const stored = await sdxl.storeLora(file, { signal });
    loraWeights.set(stored.id, 1);
    refreshStorage();
    setStatus('ready', `LoRA ${stored.id} stored.`, 1);
  });
}

/** Makes a picked or dropped .safetensors / .gguf file the model (base only), and loads it. */
function openFile(file) {
  if (!file) return;
  PRESETS.file = {
    label: `File: ${file.name}`, base: file, refiner: null, quant: 'q4', sizes: RESOLUTION_BUCKETS, steps: 30,
    note: 'A single-file SDXL checkpoint from this computer, imported into this browser at 4-bit (its configs read off its tensors). The file itself is not uploaded anywhere.',
  };
  const option = [...$('preset').options].find((o) => o.value === 'file') ?? $('preset').appendChild(new Option('', 'file'));
  option.text = PRESETS.file.label;
  $('preset').value = 'file';
  fillPreset();
  if (sdxl && !running) $('load').click();
}

/**
 * Registers the service worker (sw.js: the app offline, one build at a time). A new build waits
 * until no page of this one is open; "Reload" hands over at once (a run in progress is lost).
 */
async function offline() {
  // Checked on every visit, past the HTTP cache: sw.js and the build manifest it imports.
  const registration = await navigator.serviceWorker.register('sw.js', { updateViaCache: 'none' });
  const offerUpdate = () => {
    if (!registration.waiting || !navigator.serviceWorker.controller) return;
    $('update').hidden = false;
    $('reload').onclick = () => {
      navigator.serviceWorker.addEventListener('controllerchange', () => location.reload());
      registration.waiting.postMessage('skipWaiting');
    };
  };
  offerUpdate();
  registration.addEventListener('updatefound', () => registration.installing.addEventListener('statechange', offerUpdate));
  await navigator.serviceWorker.ready;
  document.body.dataset.offline = 'ready';
}

async function main() {
  for (const [key, preset] of Object.entries(PRESETS)) $('preset').add(new Option(preset.label, key));
  const params = new URLSearchParams(location.search);
  $('preset').value = params.get('preset') in PRESETS ? params.get('preset') : 'sdxl-q4';
  fillPreset();
  randomSeed();
  $('preset').onchange = fillPreset;
  $('refiner-start').oninput = () => { $('refiner-start-value').value = Number($('refiner-start').value).toFixed(2); };
  $('random-seed').onclick = randomSeed;
  $('cancel').onclick = () => running?.abort();
  $('persist').onclick = async () => { await sdxl.persist(); refreshStorage(); };
  // Cleared after each pick, so that picking the same file again (after a failed import) fires.
  $('model-file').onchange = () => { openFile($('model-file').files[0]); $('model-file').value = ''; };
  $('lora-file').onchange = () => { addLora($('lora-file').files[0]); $('lora-file').value = ''; };
  $('image-file').onchange = () => {
    const file = $('image-file').files[0];
    if (file) editImage(file).catch((e) => setStatus('error', `${file.name} is not an image this browser opens (${e.message})`));
    $('image-file').value = '';
  };
  $('clear-image').onclick = clearImage;
  // A crop around the mask runs at the chosen size; the whole image runs at its own.
  $('mask-only').onchange = () => { $('size').disabled = Boolean(startImage) && !$('mask-only').checked; };
  $('preview-decoder').onclick = () => run(async () => {
    await loadPreviewDecoder();
    setStatus('ready', 'Preview decoder loaded.', 1);
  });
  paintMask();
  document.addEventListener('dragover', (e) => { e.preventDefault(); document.body.dataset.drop = 'over'; });
  document.addEventListener('dragleave', () => { delete document.body.dataset.drop; });
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    delete document.body.dataset.drop;
    const file = e.dataTransfer?.files?.[0];
    if (file?.type.startsWith('image/')) editImage(file).catch((error) => setStatus('error', `${file.name}: ${error.message}`));
    else openFile(file);
  });
  $('load').onclick = () => run(async (signal) => {
    await ensureLoaded(signal);
    setStatus('ready', 'Model loaded.', 1);
  });
  $('controls').onsubmit = (e) => {
    e.preventDefault();
    if (!running) run(generate);
  };

  if ('serviceWorker' in navigator) offline();
  $('generate').disabled = $('load').disabled = true;
  const adapterName = await checkGpu();
  if (!adapterName) return;
  try {
    sdxl = await Sdxl.create({ onProgress: showProgress });
  } catch (e) {
    $('gpu-status').dataset.state = 'missing';
    $('gpu-status').textContent = `The engine could not start: ${e.name}: ${e.message}`;
    return;
  }
  $('gpu-status').textContent += ` Adapter: ${adapterName}.`;
  $('generate').disabled = $('load').disabled = false;
  document.body.dataset.ready = 'true';
  refreshStorage();
  loadPreviewDecoder({ stored: true }).catch((e) => { $('preview-decoder-state').textContent = `Previews: ${e.message}`; });
}

main();
