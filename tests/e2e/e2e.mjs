// End-to-end tests of the page (web/index.html) and the JS API in headless Chromium (WebGPU; on
// SwiftShader without a GPU), against tests/server.py serving web/ and the tiny demo model:
//   1. the page loads the tiny base + refiner from the server into IndexedDB and generates; the PNG
//      equals the native CLI's image of the same q8 packs and seed (PSNR >= 40 dB) and carries its
//      recipe in a `parameters` text chunk;
//   2. a run cancelled mid-way stops at that step, and the next run gives the same image again;
//   3. the JS API's typed errors, and a download cancelled by its AbortSignal, then resumed;
//   4. with the server gone, a reload is served by the service worker and generates from the
//      models stored in IndexedDB; the storage panel deletes a model;
//   5. web/examples/embed.html (at most 20 lines) generates the same image;
//   6. web/bench.html measures the tiny model's UNet step and VAE decode;
//   7. without WebGPU the page says so and offers no generate button;
//   8. a single-file checkpoint (tests/fixtures/single-file/tiny-sdxl-std.gguf, configs inferred):
//      picked with the page's "Open a model file…", by URL and as a File through the API, each
//      imported into IndexedDB and generating the CLI's image of the same file; a pickle is refused;
//   9. LoRAs: a kohya LoRA picked with the page's "Add a LoRA file…" at weight 0.7 gives the CLI's
//      image with --lora (and its Lora hashes); through the API, one stored from a File and one
//      from a URL, the `loras` option and <lora:...> tags, typed errors, delete;
//  10. API calls: option values that cannot be sent to the worker (a function, a DOM node, a symbol,
//      a BigInt, a Proxy) and bad signals / callbacks are InvalidParameter; aborting a running load()
//      lets the calls queued behind it run on the fresh worker, aborting a queued one skips only it;
//  11. faults in the engine's worker: a Rust panic is an InternalError carrying the panic's message,
//      a destroyed GPU device a DeviceLost; each restarts the worker (the calls queued behind fail
//      with it), and the next load() and generate() give the image of before;
//  12. the service worker serves one build: with a newer build on the server the page still gets the
//      cached build's glue and wasm; a half-deployed build (new glue, old wasm) is refused; a complete
//      one waits, is offered by the page's Reload, then replaces the old build and deletes its cache.
//  13. a stored record damaged in IndexedDB (same size, other bytes) fails its sha256 as load() reads
//      it; load() rebuilds it from the model's URL and loads, and the image is the one of before.
//  14. inpainting: an image opened in the page's editor, a mask painted on it with the pointer, then
//      generate: the CLI's image with that mask (PSNR >= 40 dB); through the API, the same run with
//      the mask as ImageData, outpainting to a larger canvas, and typed errors for bad masks; the
//      TAESD-XL preview decoder (the page's button, then the API): previews at image size.
//  15. the npm package: `npm pack` of web/ holds exactly the API, its worker and the wasm build; its
//      tarball installed offline into a fresh page dir resolves (node's exports, tsc's types), and a
//      plain page importing ./node_modules/sdxl-webgpu/sdxl.js generates the PNG web/sdxl.js gives.
// Usage: SDXL=target/debug/sdxl node tests/e2e/e2e.mjs [OUT_DIR]   (writes OUT_DIR/page.png, a screenshot)
//        E2E_STEPS=10,11 ... runs only those steps (steps 1-9 build on each other: any of them runs all nine).
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { spawn, execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { inflateSync } from 'node:zlib';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(import.meta.dirname, '../..');
const out = path.resolve(process.argv[2] ?? path.join(root, 'target/e2e'));
const sdxlCli = process.env.SDXL ?? path.join(root, 'target/debug/sdxl');
const PROMPT = 'a red fox in the snow';
const RUN = { width: 64, height: 64, steps: 4, guidance: 5, seed: 7, refinerStart: 0.8 };
const MIN_PSNR = 40;
const MINUTE = 60_000;
const STEPS = process.env.E2E_STEPS?.split(',').map(Number);
const selected = (...steps) => !STEPS || steps.some((step) => STEPS.includes(step));
let server; // tests/server.py, serving web/ and the fixtures

function log(...args) {
  console.log(`[e2e ${new Date().toISOString().slice(11, 19)}]`, ...args);
}

/** Decodes an 8-bit RGB/RGBA, non-interlaced PNG: {width, height, rgb, text: {keyword: value}}. */
function decodePng(bytes) {
  assert.deepEqual([...bytes.subarray(0, 8)], [137, 80, 78, 71, 13, 10, 26, 10], 'PNG signature');
  const idat = [];
  const text = {};
  let width, height, channels;
  for (let at = 8; at < bytes.length;) {
    const length = bytes.readUInt32BE(at);
    const type = bytes.toString('latin1', at + 4, at + 8);
    const data = bytes.subarray(at + 8, at + 8 + length);
    at += 12 + length;
    if (type === 'IHDR') {
      [width, height] = [data.readUInt32BE(0), data.readUInt32BE(4)];
      assert.equal(data[8], 8, 'bit depth 8');
      channels = { 2: 3, 6: 4 }[data[9]];
      assert.ok(channels && data[12] === 0, 'RGB or RGBA, not interlaced');
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'tEXt') {
      const nul = data.indexOf(0);
      text[data.toString('latin1', 0, nul)] = data.toString('latin1', nul + 1);
    } else if (type === 'iTXt') {
      const nul = data.indexOf(0);
      assert.equal(data[nul + 1], 0, 'uncompressed iTXt');
      const lang = data.indexOf(0, nul + 3);
      const translated = data.indexOf(0, lang + 1);
      text[data.toString('latin1', 0, nul)] = data.toString('utf8', translated + 1);
    }
  }
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const pixels = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    for (let x = 0; x < stride; x++) {
      const v = raw[y * (stride + 1) + 1 + x];
      const a = x >= channels ? pixels[y * stride + x - channels] : 0;
      const b = y > 0 ? pixels[(y - 1) * stride + x] : 0;
      const c = x >= channels && y > 0 ? pixels[(y - 1) * stride + x - channels] : 0;
      const p = a + b - c;
      const paeth = Math.abs(p - a) <= Math.abs(p - b) && Math.abs(p - a) <= Math.abs(p - c) ? a : Math.abs(p - b) <= Math.abs(p - c) ? b : c;
      pixels[y * stride + x] = (v + [0, a, b, (a + b) >> 1, paeth][filter]) & 255;
    }
  }
  const rgb = channels === 3 ? pixels : Buffer.from(pixels.filter((_, i) => i % 4 !== 3));
  return { width, height, rgb, text };
}

function psnr(a, b) {
  assert.equal(a.length, b.length, 'same image size');
  let se = 0;
  for (let i = 0; i < a.length; i++) se += (a[i] - b[i]) ** 2;
  return se === 0 ? Infinity : 10 * Math.log10((255 * 255) / (se / a.length));
}

/** The CLI's image of the tiny base + refiner as q8 packs: what the page must reproduce. */
function expectedImage() {
  for (const model of ['base', 'refiner']) {
    execFileSync(sdxlCli, ['convert', '--from', `${root}/tests/fixtures/tiny-sdxl-${model}`, '--quant', 'q8', '--out', `${out}/${model}-q8`, '--force'], { stdio: 'inherit' });
  }
  const png = `${out}/expected.png`;
  execFileSync(sdxlCli, ['generate', '--model', `${out}/base-q8`, '--refiner', `${out}/refiner-q8`, '--prompt', PROMPT,
    '--width', `${RUN.width}`, '--height', `${RUN.height}`, '--steps', `${RUN.steps}`, '--guidance', `${RUN.guidance}`,
    '--seed', `${RUN.seed}`, '--refiner-start', `${RUN.refinerStart}`, '--precision', 'f32', '--out', png], { stdio: 'inherit' });
  return decodePng(readFileSync(png));
}

const SINGLE_FILE = `${root}/tests/fixtures/single-file/tiny-sdxl-std.gguf`;
const LORAS = `${root}/tests/fixtures/lora`;
const LORA_WEIGHT = 0.7;

/** The CLI's images with the kohya LoRA at LORA_WEIGHT: base + refiner q8 packs (the page's), and the base alone. */
function expectedLoraImages() {
  const run = (name, refiner) => {
    const png = `${out}/${name}.png`;
    execFileSync(sdxlCli, ['generate', '--model', `${out}/base-q8`, ...refiner, '--lora', `${LORAS}/kohya.safetensors:${LORA_WEIGHT}`,
      '--prompt', PROMPT, '--width', `${RUN.width}`, '--height', `${RUN.height}`, '--steps', `${RUN.steps}`, '--guidance', `${RUN.guidance}`,
      '--seed', `${RUN.seed}`, '--precision', 'f32', '--out', png], { stdio: 'inherit' });
    return decodePng(readFileSync(png));
  };
  return { refined: run('expected-lora', ['--refiner', `${out}/refiner-q8`, '--refiner-start', `${RUN.refinerStart}`]), base: run('expected-lora-base', []) };
}

/** The CLI's image of the config-less single file, quantized to q4 as it loads (as the browser stores it). */
function expectedSingleFileImage() {
  const png = `${out}/expected-single-file.png`;
  execFileSync(sdxlCli, ['generate', '--model', SINGLE_FILE, '--quant', 'q4', '--prompt', PROMPT, '--width', `${RUN.width}`, '--height', `${RUN.height}`,
    '--steps', `${RUN.steps}`, '--guidance', `${RUN.guidance}`, '--seed', `${RUN.seed}`, '--precision', 'f32', '--out', png], { stdio: 'inherit' });
  return decodePng(readFileSync(png));
}

async function startServer(port = 0, web = `${root}/web`) {
  const server = spawn('python3', [`${root}/tests/server.py`, '--port', `${port}`, '--mount', `/=${web}`,
    '--mount', `/models/tiny-sdxl-base=${root}/tests/fixtures/tiny-sdxl-base`,
    '--mount', `/models/tiny-sdxl-refiner=${root}/tests/fixtures/tiny-sdxl-refiner`,
    '--mount', `/models/single-file=${root}/tests/fixtures/single-file`, '--mount', `/loras=${LORAS}`,
    '--mount', `/models/tiny-taesdxl=${root}/tests/fixtures/tiny-taesdxl`, '--mount', `/_e2e=${root}/tests/fixtures/reference`], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [url] = await createInterface({ input: server.stdout })[Symbol.asyncIterator]().next().then((r) => [r.value]);
  return { server, url };
}

async function imageBytes(page, selector) {
  const bytes = await page.evaluate(async (sel) => {
    const response = await fetch(document.querySelector(sel).src);
    return Array.from(new Uint8Array(await response.arrayBuffer()));
  }, selector);
  return Buffer.from(bytes);
}

/** Waits for the page's status to leave "loading"/"generating"; fails with its text on an error. */
async function finished(page, state, timeout = 20 * MINUTE) {
  const status = page.locator('#status');
  await page.waitForFunction(() => !['loading', 'generating', 'idle'].includes(document.getElementById('status').dataset.state), null, { timeout });
  assert.equal(await status.getAttribute('data-state'), state, `status: ${await status.textContent()}`);
}

async function setForm(page, steps) {
  await page.fill('#prompt', PROMPT);
  await page.fill('#negative', '');
  await page.selectOption('#size', `${RUN.width}x${RUN.height}`);
  await page.fill('#steps', `${steps}`);
  await page.fill('#guidance', `${RUN.guidance}`);
  await page.fill('#seed', `${RUN.seed}`);
  await page.check('#lock-seed');
  await page.check('#use-refiner');
  await page.locator('#refiner-start').fill(`${RUN.refinerStart}`);
}

/** Generates with the form's settings; checks the newest gallery image against the CLI's. */
async function generateAndCompare(page, expected, what) {
  const before = await page.locator('#gallery figure').count();
  await setForm(page, RUN.steps);
  await page.click('#generate');
  await finished(page, 'done');
  assert.equal(await page.locator('#gallery figure').count(), before + 1, `${what}: one new image`);
  log(`${what}: ${await page.locator('#status').textContent()}`);
  const png = await imageBytes(page, '#gallery figure:first-child img');
  const image = decodePng(png);
  assert.deepEqual([image.width, image.height], [RUN.width, RUN.height], `${what}: size`);
  const db = psnr(image.rgb, expected.rgb);
  log(`${what}: PSNR against the native CLI ${db.toFixed(1)} dB`);
  assert.ok(db >= MIN_PSNR, `${what}: PSNR ${db.toFixed(1)} dB < ${MIN_PSNR} dB`);
  return { png, image };
}

function watch(page, name) {
  page.on('pageerror', (e) => log(`${name}: page error: ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && log(`${name}: console: ${m.text()}`));
}

/** Steps 1-9: the page and the API on the tiny model; each builds on the ones before. */
async function pageSteps(browser, url) {
  const expected = expectedImage();
  const expectedSingle = expectedSingleFileImage();
  const expectedLora = expectedLoraImages();
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  watch(page, 'page');

  log('1. load the tiny model into IndexedDB and generate');
  await page.goto(`${url}/?preset=tiny`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 2 * MINUTE });
  assert.match(await page.locator('#gpu-status').getAttribute('data-state'), /^(ok|f32)$/, 'WebGPU found');
  await page.waitForSelector('body[data-offline="ready"]', { timeout: MINUTE });
  const first = await generateAndCompare(page, expected, 'page');
  const recipe = first.image.text.parameters;
  assert.ok(recipe, 'the PNG has a parameters text chunk');
  const settings = `Steps: ${RUN.steps}, Sampler: Euler, CFG scale: ${RUN.guidance}, Seed: ${RUN.seed}, Size: ${RUN.width}x${RUN.height}, ` +
    `Model: tiny-sdxl-base-q8, Refiner: tiny-sdxl-refiner-q8, Refiner switch at: ${RUN.refinerStart}, Version: sdxl-webgpu `;
  assert.ok(recipe.startsWith(`${PROMPT}\n${settings}`), `A1111 parameters, got:\n${recipe}`);
  assert.equal(await page.getAttribute('#gallery figure:first-child a', 'download'), `sdxl-${RUN.seed}.png`);
  for (const id of ['tiny-sdxl-base-q8', 'tiny-sdxl-refiner-q8']) {
    await page.waitForSelector(`#models tr[data-id="${id}"]`);
    assert.equal(await page.locator(`#models tr[data-id="${id}"] td:nth-child(4)`).textContent(), 'ready', `${id} stored complete`);
  }
  await page.screenshot({ path: `${out}/page.png`, fullPage: true });
  writeFileSync(`${out}/page-image.png`, first.png);

  log('2. cancel a run mid-way, then generate again');
  await setForm(page, 150);
  await page.click('#generate');
  await page.waitForFunction(() => Number(document.getElementById('status').dataset.step) >= 2, null, { timeout: 5 * MINUTE });
  await page.click('#cancel');
  await finished(page, 'cancelled');
  const stoppedAt = Number(await page.locator('#status').getAttribute('data-step'));
  assert.ok(stoppedAt < 150, `the run stopped at step ${stoppedAt} of 150`);
  assert.equal(await page.locator('#gallery figure').count(), 1, 'a cancelled run adds no image');
  await generateAndCompare(page, expected, 'after cancel');

  log('3. the JS API: typed errors, a download cancelled by its AbortSignal and resumed');
  const api = await context.newPage();
  watch(api, 'api');
  await api.goto(`${url}/?preset=tiny`);
  const got = await api.evaluate(async () => {
    const { Sdxl } = await import('/sdxl.js');
    const outcome = (promise) => promise.then(() => 'resolved', (e) => `${e.name}: ${e.message}`);
    const sdxl = await Sdxl.create({ storeName: 'e2e-api' });
    const tiny = { base: './models/tiny-sdxl-base', quant: 'q8' };
    const r = { beforeLoad: await outcome(sdxl.generate({ prompt: 'x' })) };
    r.badQuant = await outcome(sdxl.load({ ...tiny, quant: 'q3' }));
    r.badLoadOption = await outcome(sdxl.load({ base: tiny.base, quantization: 'q8' }));
    r.missing = await outcome(sdxl.load({ ...tiny, base: './models/none' }));
    const controller = new AbortController();
    const onProgress = (e) => e.type === 'download' && controller.abort();
    r.aborted = await outcome(sdxl.load({ ...tiny, signal: controller.signal, onProgress }));
    r.afterAbort = (await sdxl.models()).map((m) => `${m.id} ${m.complete}`);
    const types = new Set();
    await sdxl.load({ ...tiny, onProgress: (e) => types.add(e.type) });
    r.progress = [...types].sort();
    r.afterLoad = (await sdxl.models()).map((m) => `${m.id} ${m.complete}`);
    r.badSize = await outcome(sdxl.generate({ prompt: 'x', width: 60, height: 64, steps: 1 }));
    r.noRefiner = await outcome(sdxl.generate({ prompt: 'x', width: 64, height: 64, steps: 1, refinerStart: 0.5 }));
    r.unknownOption = await outcome(sdxl.generate({ prompt: 'x', steps: 1, seeed: 3 }));
    r.nanSteps = await outcome(sdxl.generate({ prompt: 'x', steps: NaN }));
    // The engine checks every option (crate/src/app/de.rs): each bad value is named with what it must be.
    r.infiniteWidth = await outcome(sdxl.generate({ prompt: 'x', width: Infinity, steps: 1 }));
    r.stringSteps = await outcome(sdxl.generate({ prompt: 'x', steps: '30' }));
    r.negativeSize = await outcome(sdxl.generate({ prompt: 'x', width: -64, steps: 1 }));
    r.fractionalSeed = await outcome(sdxl.generate({ prompt: 'x', seed: 1.5, steps: 1 }));
    r.badScheduler = await outcome(sdxl.generate({ prompt: 'x', scheduler: 'euler_b', steps: 1 }));
    r.promptNumber = await outcome(sdxl.generate({ prompt: 7, steps: 1 }));
    r.badLoraWeight = await outcome(sdxl.generate({ prompt: 'x', steps: 1, loras: [{ model: 'a', weight: NaN }] }));
    r.badPrecision = await outcome(Sdxl.create({ precision: 'f8' }));
    r.hugeSize = await outcome(sdxl.generate({ prompt: 'x', width: 1e9, height: 1e9, steps: 1 }));
    const one = await sdxl.generate({ prompt: 'x', width: 64, height: 64, steps: 1, seed: 3 });
    [r.seed, r.timings] = [one.seed, one.timings];
    r.freed = await sdxl.deleteModel('tiny-sdxl-base-q8');
    r.afterDelete = (await sdxl.models()).length;
    sdxl.terminate();
    return r;
  });
  log('API:', JSON.stringify(got));
  assert.match(got.beforeLoad, /^ModelIncomplete: .*load\(\)/);
  assert.match(got.badQuant, /^InvalidParameter: quant must be/);
  assert.match(got.badLoadOption, /^InvalidParameter: load: unknown option `quantization`/);
  assert.match(got.missing, /^NetworkError: .*models\/none.*neither a model pack/);
  assert.match(got.aborted, /^AbortError/);
  assert.ok(got.afterAbort.every((m) => m.endsWith('false')), `nothing complete after the abort: ${got.afterAbort}`);
  assert.deepEqual(got.afterLoad, ['tiny-sdxl-base-q8 true']);
  // verify: the folder's files had the sha256 the server states (X-Linked-Etag), checked as they streamed.
  assert.deepEqual(got.progress, ['download', 'upload', 'verify']);
  assert.match(got.badSize, /^InvalidParameter: .*width and height must be positive multiples of 8/);
  assert.match(got.noRefiner, /^InvalidParameter: .*refinerStart is set but no refiner is loaded/);
  assert.match(got.unknownOption, /^InvalidParameter: generate: unknown option `seeed`/);
  assert.match(got.nanSteps, /^InvalidParameter: steps must be a finite number, not NaN/);
  assert.match(got.infiniteWidth, /^InvalidParameter: width must be a finite number, not Infinity/);
  assert.match(got.stringSteps, /^InvalidParameter: steps must be a finite number, not the string "30"/);
  assert.match(got.negativeSize, /^InvalidParameter: width must be a whole number from 0 to 2\^53, not -64/);
  assert.match(got.fractionalSeed, /^InvalidParameter: seed must be a whole number from 0 to 2\^53, not 1.5/);
  assert.match(got.badScheduler, /^InvalidParameter: scheduler must be one of 'euler', 'euler_a', .*not "euler_b"/);
  assert.match(got.promptNumber, /^InvalidParameter: prompt: invalid type/);
  assert.match(got.badLoraWeight, /^InvalidParameter: loras\[0\]\.weight must be a finite number, not NaN/);
  assert.match(got.badPrecision, /^InvalidParameter: precision must be one of 'auto', 'f32', 'f16', not "f8"/);
  assert.match(got.hugeSize, /^InvalidParameter: .*1000000000x1000000000 is too large/);
  assert.equal(got.seed, 3);
  assert.ok(got.timings.base > 0 && got.timings.decode > 0 && got.timings.total >= got.timings.base + got.timings.decode, 'timings');
  assert.ok(got.freed > 0 && got.afterDelete === 0, 'deleteModel frees the records');
  await api.close();

  log('4. reload with the server gone: the app shell from the service worker, the models from IndexedDB');
  server.kill();
  await new Promise((resolve) => server.once('exit', resolve));
  await page.reload();
  await page.waitForSelector('body[data-ready="true"]', { timeout: 2 * MINUTE });
  await generateAndCompare(page, expected, 'offline');
  await page.click('#models tr[data-id="tiny-sdxl-refiner-q8"] button.delete');
  await page.waitForSelector('#models tr[data-id="tiny-sdxl-refiner-q8"]', { state: 'detached', timeout: MINUTE });
  assert.equal(await page.locator('#models tr').count(), 1, 'the storage panel deletes a model');
  ({ server } = await startServer(new URL(url).port)); // same origin: same IndexedDB

  log('5. the embedding example');
  const source = readFileSync(`${root}/web/examples/embed.html`, 'utf8');
  assert.ok(source.trimEnd().split('\n').length <= 20, 'embed.html is at most 20 lines');
  const embed = await context.newPage();
  watch(embed, 'embed');
  await embed.goto(`${url}/examples/embed.html`);
  await embed.waitForFunction(() => document.getElementById('image').src.startsWith('blob:'), null, { timeout: 10 * MINUTE });
  const embedded = decodePng(await imageBytes(embed, '#image'));
  const db = psnr(embedded.rgb, expected.rgb);
  log(`embed: PSNR against the native CLI ${db.toFixed(1)} dB`);
  assert.ok(db >= MIN_PSNR, `embed.html: PSNR ${db.toFixed(1)} dB`);
  assert.ok(embedded.text.parameters?.startsWith(PROMPT), 'embed.html image carries its recipe');

  log('6. the benchmark page on the tiny model');
  const bench = await context.newPage();
  watch(bench, 'bench');
  await bench.goto(`${url}/bench.html?model=./models/tiny-sdxl-base&sizes=64&quants=q4&loras=32&only=unet,vae&run`);
  await bench.waitForSelector('#status:is([data-state="done"], [data-state="error"])', { timeout: 10 * MINUTE });
  assert.equal(await bench.getAttribute('#status', 'data-state'), 'done', await bench.locator('#status').textContent());
  const report = await bench.evaluate(() => window.benchReport);
  assert.deepEqual(report.skipped, [], 'every measurement ran');
  assert.ok(report.peak.gflops > 0 && report.peak.gbps > 0, 'peaks measured');
  assert.deepEqual(report.unet.map((u) => u.loraRank), [null, 32], 'a step without and with a rank-32 LoRA');
  assert.ok(report.unet.every((u) => u.secondsPerStep > 0 && u.peakBytes > u.weightBytes), 'UNet steps measured');
  assert.ok(report.unet.every((u) => u.firstStepSeconds > 0 && u.dispatchesPerStep > 0), 'first steps and launches counted');
  assert.ok(report.unet[1].dispatchesPerStep > report.unet[0].dispatchesPerStep, 'a LoRA adds launches');
  assert.deepEqual(report.vae.map((v) => v.tiled), [false, true]);
  assert.match(await bench.locator('#table').textContent(), /s\/step/);
  log(`bench page: tiny UNet step ${(report.unet[0].secondsPerStep * 1e3).toFixed(0)} ms at 64², VAE decode ${(report.vae[0].seconds * 1e3).toFixed(0)} ms`);

  log('7. without WebGPU');
  const bare = await browser.newContext();
  await bare.addInitScript(() => Object.defineProperty(Navigator.prototype, 'gpu', { get: () => undefined }));
  const noGpu = await bare.newPage();
  await noGpu.goto(`${url}/?preset=tiny`);
  await noGpu.waitForSelector('#gpu-status[data-state="missing"]', { timeout: MINUTE });
  assert.match(await noGpu.locator('#gpu-status').textContent(), /WebGPU/);
  assert.ok(await noGpu.locator('#generate').isDisabled(), 'no generate button without WebGPU');

  log('8. single files: picked on the page, by URL and as a File through the API');
  const files = await context.newPage();
  watch(files, 'files');
  await files.goto(`${url}/?preset=tiny`);
  await files.waitForSelector('body[data-ready="true"]', { timeout: 2 * MINUTE });
  await files.setInputFiles('#model-file', SINGLE_FILE);
  await finished(files, 'ready', 10 * MINUTE);
  assert.equal(await files.locator('#preset').inputValue(), 'file');
  await files.evaluate(() => document.getElementById('size').add(new Option('64 × 64', '64x64')));
  await generateAndCompare(files, expectedSingle, 'picked file');
  await files.waitForSelector('#models tr[data-id="tiny-sdxl-std.gguf-q4"]');
  const viaApi = await files.evaluate(async (run) => {
    const { Sdxl } = await import('/sdxl.js');
    const outcome = (promise) => promise.then(() => 'resolved', (e) => `${e.name}: ${e.message}`);
    const sdxl = await Sdxl.create({ storeName: 'e2e-single-file' });
    const bytes = async (blob) => Array.from(new Uint8Array(await blob.arrayBuffer()));
    const r = {};
    const types = new Set();
    await sdxl.load({ base: './models/single-file/tiny-sdxl-std.gguf', quant: 'q4', onProgress: (e) => types.add(e.type) });
    r.urlEvents = [...types].sort();
    r.url = await bytes((await sdxl.generate({ ...run, prompt: run.prompt, refinerStart: null })).blob);
    const file = new File([await (await fetch('./models/single-file/tiny-sdxl-std.gguf')).blob()], 'tiny-sdxl-std.gguf');
    types.clear();
    await sdxl.load({ base: { file, id: 'picked' }, quant: 'q4', onProgress: (e) => types.add(e.type) });
    r.fileEvents = [...types].sort();
    r.loaded = sdxl.loaded.base;
    r.file = await bytes((await sdxl.generate({ ...run, refinerStart: null })).blob);
    r.stored = (await sdxl.models()).map((m) => `${m.id} ${m.complete}`).sort();
    // Another file under the same id (same name, other bytes) must not load the stored one.
    r.sameId = await outcome(sdxl.load({ base: { file: new File([new Uint8Array(64)], 'tiny-sdxl-std.gguf'), id: 'picked' }, quant: 'q4' }));
    r.pickle = await outcome(sdxl.load({ base: new File([new Uint8Array([0x80, 2, 0x7d, 0x71])], 'model.ckpt'), quant: 'q4' }));
    r.unrelated = await outcome(sdxl.load({ base: new File([await (await fetch('./models/tiny-sdxl-base/vae/diffusion_pytorch_model.safetensors')).blob()], 'vae.safetensors'), quant: 'q4' }));
    sdxl.terminate();
    return r;
  }, { prompt: PROMPT, width: RUN.width, height: RUN.height, steps: RUN.steps, guidance: RUN.guidance, seed: RUN.seed });
  log('single files via the API:', JSON.stringify({ ...viaApi, url: viaApi.url.length, file: viaApi.file.length }));
  // verify: the file had the sha256 the server states, checked as it streamed.
  assert.deepEqual(viaApi.urlEvents, ['download', 'upload', 'verify']);
  assert.deepEqual(viaApi.fileEvents, ['import', 'upload']);
  assert.deepEqual(viaApi.loaded, { file: 'tiny-sdxl-std.gguf', id: 'picked' });
  assert.deepEqual(viaApi.stored, ['picked true', 'tiny-sdxl-std.gguf-q4 true']);
  for (const what of ['url', 'file']) {
    const db = psnr(decodePng(Buffer.from(viaApi[what])).rgb, expectedSingle.rgb);
    log(`single file by ${what}: PSNR against the native CLI ${db.toFixed(1)} dB`);
    assert.ok(db >= MIN_PSNR, `single file by ${what}: PSNR ${db.toFixed(1)} dB`);
  }
  assert.match(viaApi.sameId, /^InvalidParameter: .*'picked' already holds file:tiny-sdxl-std\.gguf \(\d+ bytes/);
  assert.match(viaApi.pickle, /^UnsupportedFormat: .*pickle.*safetensors/);
  assert.match(viaApi.unrelated, /^WrongModel: .*not an SDXL model: it holds a VAE alone/);
  log('9. LoRAs: picked on the page, and through the API from a File and a URL');
  const lp = await context.newPage();
  watch(lp, 'loras');
  await lp.goto(`${url}/?preset=tiny`);
  await lp.waitForSelector('body[data-ready="true"]', { timeout: 2 * MINUTE });
  await lp.setInputFiles('#lora-file', `${LORAS}/kohya.safetensors`);
  await finished(lp, 'ready', 5 * MINUTE);
  await lp.locator('#loras tr[data-id="kohya"] input.weight').fill(`${LORA_WEIGHT}`);
  const paged = await generateAndCompare(lp, expectedLora.refined, 'page with a LoRA');
  const hashes = (recipe) => recipe.match(/Lora hashes: "[^"]*"/)?.[0];
  assert.ok(paged.image.text.parameters.startsWith(`${PROMPT} <lora:kohya:${LORA_WEIGHT}>\n`), `the recipe names the LoRA: ${paged.image.text.parameters}`);
  assert.equal(hashes(paged.image.text.parameters), hashes(expectedLora.refined.text.parameters), 'the CLI\'s Lora hashes');
  assert.match(hashes(paged.image.text.parameters), /^Lora hashes: "kohya: [0-9a-f]{12}"$/);
  const loraApi = await lp.evaluate(async ({ run, weight }) => {
    const { Sdxl } = await import('/sdxl.js');
    const outcome = (promise) => promise.then(() => 'resolved', (e) => `${e.name}: ${e.message}`);
    const bytes = async (result) => Array.from(new Uint8Array(await result.blob.arrayBuffer()));
    const sdxl = await Sdxl.create({ storeName: 'e2e-loras' });
    await sdxl.load({ base: './models/tiny-sdxl-base', quant: 'q8' });
    const r = {};
    const types = new Set();
    const file = new File([await (await fetch('./loras/kohya.safetensors')).blob()], 'kohya.safetensors');
    r.stored = await sdxl.storeLora(file, { onProgress: (e) => types.add(e.type) });
    r.events = [...types];
    const base = { ...run, refinerStart: null };
    r.option = await bytes(await sdxl.generate({ ...base, loras: [{ model: 'kohya', weight }] }));
    r.tag = await bytes(await sdxl.generate({ ...base, prompt: `${run.prompt} <lora:kohya:${weight}>`, promptWeighting: true }));
    r.tagOption = await bytes(await sdxl.generate({ ...base, promptWeighting: true, loras: [{ model: 'kohya', weight }] }));
    r.none = await bytes(await sdxl.generate(base));
    r.unknown = await outcome(sdxl.generate({ ...base, loras: [{ model: 'nope', weight: 1 }] }));
    r.badWeight = await outcome(sdxl.generate({ ...base, loras: [{ model: 'kohya', weight: NaN }] }));
    r.notLora = await outcome(sdxl.storeLora(new File([await (await fetch('./models/tiny-sdxl-base/vae/diffusion_pytorch_model.safetensors')).blob()], 'vae.safetensors')));
    r.url = (await sdxl.storeLora('./loras/peft.safetensors')).id;
    r.listed = (await sdxl.loras()).map((l) => `${l.id} ${l.complete}`);
    r.freed = await sdxl.deleteLora('kohya');
    r.deleted = await outcome(sdxl.generate({ ...base, loras: [{ model: 'kohya', weight }] }));
    r.left = (await sdxl.loras()).map((l) => l.id);
    sdxl.terminate();
    return r;
  }, { run: { prompt: PROMPT, width: RUN.width, height: RUN.height, steps: RUN.steps, guidance: RUN.guidance, seed: RUN.seed }, weight: LORA_WEIGHT });
  const image = (name) => decodePng(Buffer.from(loraApi[name]));
  log('LoRAs via the API:', JSON.stringify({ ...loraApi, option: undefined, tag: undefined, tagOption: undefined, none: undefined }));
  assert.equal(loraApi.stored.id, 'kohya');
  assert.ok(loraApi.stored.complete && /^[0-9a-f]{12}$/.test(loraApi.stored.hash), 'stored complete with its hash');
  assert.deepEqual(loraApi.events, ['import']);
  const viaOption = psnr(image('option').rgb, expectedLora.base.rgb);
  log(`LoRA through the API: PSNR against the native CLI ${viaOption.toFixed(1)} dB`);
  assert.ok(viaOption >= MIN_PSNR, `LoRA through the API: PSNR ${viaOption.toFixed(1)} dB`);
  assert.ok(image('tag').rgb.equals(image('tagOption').rgb), 'a <lora:...> tag is the loras option');
  assert.ok(psnr(image('none').rgb, image('option').rgb) < 35, 'leaving the LoRA out changes the image');
  assert.match(loraApi.unknown, /^ModelIncomplete: .*no LoRA 'nope' is stored \(stored: \["kohya"\]\)/);
  assert.match(loraApi.badWeight, /^InvalidParameter: .*finite number/);
  assert.match(loraApi.notLora, /^UnsupportedFormat: .*no LoRA factor/);
  assert.equal(loraApi.url, 'peft');
  assert.deepEqual(loraApi.listed, ['kohya true', 'peft true']);
  assert.ok(loraApi.freed > 0, 'deleteLora frees its records');
  assert.match(loraApi.deleted, /^ModelIncomplete: .*no LoRA 'kohya' is stored/);
  assert.deepEqual(loraApi.left, ['peft']);
}

/** A fresh browser context with the page open on the tiny preset, its console watched as `name`. */
async function openPage(browser, url, name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  watch(page, name);
  await page.goto(`${url}/?preset=tiny`);
  return { context, page };
}

/** Step 10: values the worker cannot be sent, and aborts that leave the other calls alone. */
async function apiCallSteps(browser, url) {
  log('10. API calls: unsendable option values, an aborted load() among queued calls');
  const { context, page } = await openPage(browser, url, 'calls');
  const got = await page.evaluate(async () => {
    const { Sdxl } = await import('/sdxl.js');
    // A call that neither resolves nor rejects within a minute is a hang.
    const outcome = (promise) => Promise.race([promise.then(() => 'resolved', (e) => `${e.name}: ${e.message}`),
      new Promise((resolve) => setTimeout(resolve, 60_000, 'hung'))]);
    const r = { create: await outcome(Sdxl.create({ storeName: Symbol('db') })) };
    const sdxl = await Sdxl.create({ storeName: 'e2e-calls' });
    const tiny = { base: './models/tiny-sdxl-base', quant: 'q8' };
    r.function = await outcome(sdxl.generate({ prompt: 'x', negativePrompt: () => 'blurry' }));
    r.node = await outcome(sdxl.generate({ prompt: 'x', scheduler: document.body }));
    r.symbol = await outcome(sdxl.load({ base: { url: tiny.base, id: Symbol('id') }, quant: 'q8' }));
    r.bigint = await outcome(sdxl.bench({ sizes: [64, 128n] }));
    r.proxy = await outcome(sdxl.generate({ prompt: 'x', loras: [new Proxy({ model: 'a', weight: 1 }, {})] }));
    r.argument = await outcome(sdxl.deleteModel(() => 'id'));
    r.signal = await outcome(sdxl.load({ ...tiny, signal: { aborted: false } }));
    r.callback = await outcome(sdxl.generate({ prompt: 'x', onStep: 'show' }));
    r.stillWorks = await outcome(sdxl.models());

    // A running load aborted: the calls queued behind it run on the fresh worker.
    const controller = new AbortController();
    const onProgress = (e) => e.type === 'download' && controller.abort();
    const aborted = outcome(sdxl.load({ ...tiny, signal: controller.signal, onProgress }));
    const queued = [outcome(sdxl.models()), outcome(sdxl.loras()), outcome(sdxl.load(tiny))];
    r.aborted = await aborted;
    r.queued = await Promise.all(queued);
    r.loaded = sdxl.loaded?.base.id;
    // A queued load aborted: skipped, the running call and the next one unharmed.
    const later = new AbortController();
    const running = outcome(sdxl.generate({ prompt: 'x', width: 64, height: 64, steps: 2, seed: 1, refinerStart: null }));
    const skipped = outcome(sdxl.load({ ...tiny, base: './models/tiny-sdxl-refiner', signal: later.signal }));
    const next = sdxl.models().then((models) => models.map((m) => `${m.id} ${m.complete}`), (e) => `${e.name}: ${e.message}`);
    later.abort();
    r.running = await running;
    r.skipped = await skipped;
    r.next = await next;
    sdxl.terminate();
    return r;
  });
  log('API calls:', JSON.stringify(got));
  const kinds = 'options are strings, numbers, booleans, null, arrays and plain objects';
  assert.equal(got.create, `InvalidParameter: Sdxl.create: storeName is a symbol: ${kinds}`);
  assert.equal(got.function, `InvalidParameter: generate: negativePrompt is a function: ${kinds}`);
  assert.equal(got.node, `InvalidParameter: generate: scheduler is a HTMLBodyElement: ${kinds}`);
  assert.equal(got.symbol, `InvalidParameter: load: base.id is a symbol: ${kinds}`);
  assert.equal(got.bigint, `InvalidParameter: bench: sizes[1] is a BigInt: ${kinds}`);
  assert.match(got.proxy, /^InvalidParameter: generate: an option cannot be sent to the engine: .*could not be cloned/);
  assert.equal(got.argument, `InvalidParameter: deleteModel: the argument is a function: ${kinds}`);
  assert.equal(got.signal, 'InvalidParameter: load: signal must be an AbortSignal');
  assert.equal(got.callback, 'InvalidParameter: generate: onStep must be a function');
  assert.equal(got.stillWorks, 'resolved');
  assert.match(got.aborted, /^AbortError/);
  assert.deepEqual(got.queued, ['resolved', 'resolved', 'resolved'], 'the calls queued behind the aborted load ran');
  assert.equal(got.loaded, 'tiny-sdxl-base-q8');
  assert.equal(got.running, 'resolved', 'the running generation is not touched');
  assert.match(got.skipped, /^AbortError/);
  assert.deepEqual(got.next, ['tiny-sdxl-base-q8 true'], 'the aborted load stored nothing, the next call ran');
  await context.close();
}

/**
 * A module worker around web/worker.js for step 11 (Sdxl.create's `workerUrl`), driven over a
 * BroadcastChannel: it keeps the GPU device the engine asks for ('destroy' destroys it), and
 * 'arm-panic' makes the engine panic when it sets the `png` field of a generation's result (a
 * setter on Object.prototype fails its `Reflect::set`; the engine has no panic reachable from the
 * API). It announces each start ('started') and answers 'ping' while alive.
 */
const FAULTY_WORKER = (origin) => `
  import '${origin}/worker.js';
  const channel = new BroadcastChannel('e2e-faults');
  const requestDevice = GPUAdapter.prototype.requestDevice;
  let device = null;
  GPUAdapter.prototype.requestDevice = async function (...args) {
    device = await requestDevice.apply(this, args);
    return device;
  };
  channel.onmessage = ({ data }) => {
    if (data === 'destroy') device.destroy();
    if (data === 'arm-panic') Object.defineProperty(Object.prototype, 'png', { set() { throw new Error('e2e: no png here'); } });
    if (data === 'arm-panic' || data === 'ping') channel.postMessage(data === 'ping' ? 'pong' : 'armed');
  };
  channel.postMessage('started');
`;

/** Step 11: a panic and a lost GPU device restart the worker; the next calls give the same image. */
async function faultSteps(browser, url) {
  log('11. faults in the worker: a Rust panic, a destroyed GPU device');
  const { context, page } = await openPage(browser, url, 'faults');
  const got = await page.evaluate(async ({ source, run }) => {
    const { Sdxl } = await import('/sdxl.js');
    const outcome = (promise) => promise.then(() => 'resolved', (e) => `${e.name}: ${e.message}`);
    const bytes = async (result) => Array.from(new Uint8Array(await result.blob.arrayBuffer()));
    const channel = new BroadcastChannel('e2e-faults');
    const heard = [];
    channel.onmessage = ({ data }) => heard.push(data);
    const reply = (what) => new Promise((resolve) => {
      const listener = ({ data }) => {
        if (data !== what) return;
        channel.removeEventListener('message', listener);
        resolve();
      };
      channel.addEventListener('message', listener);
    });
    const workerUrl = URL.createObjectURL(new Blob([source], { type: 'text/javascript' }));
    const sdxl = await Sdxl.create({ storeName: 'e2e-faults', workerUrl });
    const tiny = { base: './models/tiny-sdxl-base', quant: 'q8' };
    await sdxl.load(tiny);
    const r = { before: await bytes(await sdxl.generate(run)) };

    const armed = reply('armed');
    channel.postMessage('arm-panic');
    await armed;
    const panicked = outcome(sdxl.generate(run));
    const behindPanic = outcome(sdxl.models());
    [r.panic, r.behindPanic] = await Promise.all([panicked, behindPanic]);
    r.loadedAfterPanic = sdxl.loaded;
    await sdxl.load(tiny);
    r.afterPanic = await bytes(await sdxl.generate(run));

    let destroyed = false;
    const onStep = () => {
      if (!destroyed) channel.postMessage('destroy');
      destroyed = true;
    };
    r.lost = await outcome(sdxl.generate({ ...run, steps: 30, onStep }));
    await sdxl.load(tiny);
    r.afterLoss = await bytes(await sdxl.generate(run));
    r.started = heard.filter((m) => m === 'started').length;
    heard.length = 0;
    channel.postMessage('ping');
    await new Promise((resolve) => setTimeout(resolve, 1000));
    r.alive = heard.filter((m) => m === 'pong').length;
    sdxl.terminate();
    return r;
  }, { source: FAULTY_WORKER(url), run: { prompt: PROMPT, width: RUN.width, height: RUN.height, steps: RUN.steps, guidance: RUN.guidance, seed: RUN.seed, refinerStart: null } });
  log('faults:', JSON.stringify({ ...got, before: undefined, afterPanic: undefined, afterLoss: undefined }));
  assert.match(got.panic, /^InternalError: the engine panicked: panicked at .*web\.rs.*setting a field of a new object.*e2e: no png here.*\(the engine restarted/s);
  assert.match(got.behindPanic, /^InternalError: the engine stopped: the engine panicked/);
  assert.equal(got.loadedAfterPanic, null, 'nothing is loaded in the fresh worker');
  assert.match(got.lost, /^DeviceLost: .*\(the engine restarted/s);
  const before = Buffer.from(got.before);
  assert.ok(Buffer.from(got.afterPanic).equals(before), 'after the panic: the same image');
  assert.ok(Buffer.from(got.afterLoss).equals(before), 'after the device loss: the same image');
  assert.equal(got.started, 3, 'a fresh worker after the panic and after the loss');
  assert.equal(got.alive, 1, 'one worker left: the panicked and the lost ones are gone');
  await context.close();
}

/** A copy of the built web/ as another build: `change(dir)` edits files, then the manifest is rewritten. */
function otherBuild(from, to, change) {
  rmSync(to, { recursive: true, force: true });
  cpSync(from, to, { recursive: true });
  change(to);
  const manifest = `${to}/pkg/build.js`;
  const { files } = JSON.parse(readFileSync(manifest, 'utf8').replace(/^[^]*?self\.BUILD = /, '').replace(/;\s*$/, ''));
  const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');
  for (const file of Object.keys(files)) files[file] = sha256(readFileSync(`${to}/${file === './' ? 'index.html' : file}`));
  const id = sha256(JSON.stringify(files)).slice(0, 16);
  writeFileSync(manifest, `self.BUILD = ${JSON.stringify({ id, files })};\n`);
  return id;
}

/** Step 12: the service worker keeps one build together and replaces it whole. */
async function serviceWorkerSteps(browser) {
  log('12. the service worker: one build at a time');
  const builds = `${out}/builds`;
  const idA = otherBuild(`${root}/web`, `${builds}/a`, () => {});
  // Build b: other glue and other wasm bytes (a custom section appended: the same module).
  const idB = otherBuild(`${builds}/a`, `${builds}/b`, (dir) => {
    writeFileSync(`${dir}/pkg/sdxl.js`, `${readFileSync(`${dir}/pkg/sdxl.js`, 'utf8')}// e2e build b\n`);
    const name = Buffer.from('e2e-build-b');
    writeFileSync(`${dir}/pkg/sdxl_bg.wasm`, Buffer.concat([readFileSync(`${dir}/pkg/sdxl_bg.wasm`), Buffer.from([0, name.length + 2, name.length]), name, Buffer.from('b')]));
  });
  // Half deployed: b's manifest and glue beside a's wasm.
  cpSync(`${builds}/b`, `${builds}/mixed`, { recursive: true });
  cpSync(`${builds}/a/pkg/sdxl_bg.wasm`, `${builds}/mixed/pkg/sdxl_bg.wasm`);

  let own = await startServer(0, `${builds}/a`);
  const port = new URL(own.url).port;
  const serve = async (build) => {
    own.server.kill();
    await new Promise((resolve) => own.server.once('exit', resolve));
    own = await startServer(port, `${builds}/${build}`);
  };
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    watch(page, 'sw');
    const opened = async () => {
      await page.waitForSelector('body[data-ready="true"]', { timeout: 2 * MINUTE });
      await page.waitForFunction(() => navigator.serviceWorker.controller, null, { timeout: MINUTE });
    };
    // What the page gets: the caches, whether the glue and the wasm are b's, and whether its engine started.
    const state = () => page.evaluate(async () => {
      const glue = await (await fetch('pkg/sdxl.js')).text();
      const wasm = new Uint8Array(await (await fetch('pkg/sdxl_bg.wasm')).arrayBuffer());
      return { caches: await caches.keys(), glueB: glue.endsWith('// e2e build b\n'), wasmB: new TextDecoder().decode(wasm.subarray(-12)).endsWith('e2e-build-bb'),
        engine: document.body.dataset.ready === 'true', update: !document.getElementById('update').hidden };
    });
    // Asks the browser to look for a new build; resolves to the new service worker's state once installed or refused.
    const update = () => page.evaluate(async () => {
      const registration = await navigator.serviceWorker.getRegistration();
      const found = new Promise((resolve) => registration.addEventListener('updatefound', () => resolve(registration.installing), { once: true }));
      registration.update().catch(() => {});
      const worker = await Promise.race([found, new Promise((resolve) => setTimeout(resolve, 60_000, null))]);
      while (worker && !['installed', 'redundant'].includes(worker.state)) await new Promise((resolve) => worker.addEventListener('statechange', resolve, { once: true }));
      return worker?.state ?? 'no new build found';
    });

    await page.goto(`${own.url}/?preset=tiny`);
    await opened();
    assert.deepEqual(await state(), { caches: [`sdxl-app-${idA}`], glueB: false, wasmB: false, engine: true, update: false }, 'build a cached');

    await serve('mixed');
    assert.equal(await update(), 'redundant', 'a half-deployed build is not installed');
    await page.reload();
    await opened();
    assert.deepEqual(await state(), { caches: [`sdxl-app-${idA}`], glueB: false, wasmB: false, engine: true, update: false }, 'build a still, whole');

    await serve('b');
    assert.equal(await update(), 'installed', 'build b installed beside a');
    await page.waitForSelector('#update:not([hidden])', { timeout: MINUTE });
    const waiting = await state();
    assert.deepEqual({ ...waiting, caches: waiting.caches.sort() }, { caches: [`sdxl-app-${idA}`, `sdxl-app-${idB}`].sort(), glueB: false, wasmB: false, engine: true, update: true },
      'b waits while a page of a is open');
    const reloaded = page.waitForEvent('load');
    await page.click('#reload');
    await reloaded;
    await opened();
    assert.deepEqual(await state(), { caches: [`sdxl-app-${idB}`], glueB: true, wasmB: true, engine: true, update: false }, 'build b whole, a deleted');
  } finally {
    await context.close();
    own.server.kill();
  }
}

/** Step 13: load() repairs a damaged stored record and loads the model of before. */
async function repairSteps(browser, url) {
  log('13. a damaged stored record: load() repairs it');
  const { context, page } = await openPage(browser, url, 'repair');
  const got = await page.evaluate(async () => {
    const { Sdxl } = await import('/sdxl.js');
    const tiny = { base: './models/tiny-sdxl-base', quant: 'q8' };
    const image = async (sdxl) => {
      const result = await sdxl.generate({ prompt: 'a red fox', width: 64, height: 64, steps: 2, seed: 5, refinerStart: null });
      return Array.from(new Uint8Array(await result.blob.arrayBuffer()));
    };
    let sdxl = await Sdxl.create({ storeName: 'e2e-repair' });
    await sdxl.load(tiny);
    const before = await image(sdxl);
    sdxl.terminate();

    // Same size, other bytes: still "complete" by the records' sizes.
    const request = (q) => new Promise((resolve, reject) => { q.onsuccess = () => resolve(q.result); q.onerror = () => reject(q.error); });
    const db = await request(indexedDB.open('e2e-repair'));
    const records = db.transaction('records', 'readonly').objectStore('records');
    const key = (await request(records.getAllKeys())).find((k) => k.startsWith('tiny-sdxl-base-q8/shards/'));
    const bytes = new Uint8Array(await request(records.get(key)));
    for (let i = 0; i < bytes.length; i += 97) bytes[i] ^= 0x5a;
    const tx = db.transaction('records', 'readwrite');
    tx.objectStore('records').put(bytes.buffer, key);
    await new Promise((resolve) => { tx.oncomplete = resolve; });
    db.close();

    sdxl = await Sdxl.create({ storeName: 'e2e-repair' });
    const complete = (await sdxl.models()).map((m) => m.complete);
    const events = new Set();
    await sdxl.load({ ...tiny, onProgress: (e) => events.add(e.type) });
    const after = await image(sdxl);
    sdxl.terminate();
    return { key, complete, events: [...events], same: before.length > 0 && before.every((b, i) => b === after[i]) && before.length === after.length };
  });
  log('repair:', JSON.stringify(got));
  assert.deepEqual(got.complete, [true], 'a same-size damaged record leaves the model complete by sizes');
  assert.ok(got.events.includes('verify') && got.events.includes('download'), `the load verified and rebuilt: ${got.events}`);
  assert.ok(got.same, 'the repaired model gives the image of before, byte for byte');
  await context.close();
}

const INIT_IMAGE = `${root}/tests/fixtures/reference/init_96x64.png`;

/** Step 14: a mask painted in the page's editor inpaints as the CLI does with it. */
async function inpaintSteps(browser, url) {
  log('14. inpainting: paint a mask in the page, generate, compare with the CLI');
  execFileSync(sdxlCli, ['convert', '--from', `${root}/tests/fixtures/tiny-sdxl-base`, '--quant', 'q8', '--out', `${out}/inpaint-base-q8`, '--force'], { stdio: 'inherit' });
  const { context, page } = await openPage(browser, url, 'inpaint');
  await page.waitForSelector('body[data-ready="true"]', { timeout: 2 * MINUTE });
  await setForm(page, RUN.steps);
  await page.uncheck('#use-refiner');
  await page.setInputFiles('#image-file', INIT_IMAGE);
  await page.waitForSelector('#editor:not([hidden])');
  // A stroke across the image, then a dot, with a brush of 20 image pixels.
  await page.locator('#brush').fill('20');
  const box = await page.locator('#edit-mask').boundingBox();
  const to = (x, y) => [box.x + (x / 96) * box.width, box.y + (y / 64) * box.height];
  await page.mouse.move(...to(10, 15));
  await page.mouse.down();
  for (const [x, y] of [[30, 25], [50, 40], [70, 45]]) await page.mouse.move(...to(x, y), { steps: 4 });
  await page.mouse.up();
  await page.mouse.click(...to(80, 12));
  const before = await page.locator('#gallery figure').count();
  await page.click('#generate');
  await finished(page, 'done');
  assert.equal(await page.locator('#gallery figure').count(), before + 1, 'inpainting: one new image');
  const pagePng = await imageBytes(page, '#gallery figure:first-child img');
  const mask = await page.evaluate(async () => {
    const canvas = document.getElementById('edit-mask');
    const flat = new OffscreenCanvas(canvas.width, canvas.height).getContext('2d');
    flat.fillStyle = 'black';
    flat.fillRect(0, 0, canvas.width, canvas.height);
    flat.drawImage(canvas, 0, 0);
    const blob = await flat.canvas.convertToBlob({ type: 'image/png' });
    return Array.from(new Uint8Array(await blob.arrayBuffer()));
  });
  const maskPath = `${out}/painted-mask.png`;
  writeFileSync(maskPath, Buffer.from(mask));
  const painted = decodePng(Buffer.from(mask)).rgb.filter((v, i) => i % 3 === 0 && v >= 128).length;
  log(`inpainting: the painted mask repaints ${painted} of ${96 * 64} pixels`);
  assert.ok(painted > 300 && painted < 96 * 64 / 2, `the painted mask repaints ${painted} pixels`);
  const cliPng = `${out}/expected-inpaint.png`;
  execFileSync(sdxlCli, ['generate', '--model', `${out}/inpaint-base-q8`, '--init-image', INIT_IMAGE, '--mask', maskPath, '--prompt', PROMPT,
    '--steps', `${RUN.steps}`, '--guidance', `${RUN.guidance}`, '--seed', `${RUN.seed}`, '--precision', 'f32', '--out', cliPng], { stdio: 'inherit' });
  const pageImage = decodePng(pagePng);
  const expected = decodePng(readFileSync(cliPng));
  assert.deepEqual([pageImage.width, pageImage.height], [96, 64], 'inpainting runs at the image size');
  const db = psnr(pageImage.rgb, expected.rgb);
  log(`inpainting: page against the CLI ${db.toFixed(1)} dB`);
  assert.ok(db >= MIN_PSNR, `inpainting: PSNR ${db.toFixed(1)} dB < ${MIN_PSNR}`);
  assert.match(pageImage.text.parameters, /Denoising strength: 0\.9999, Inpaint: masked/);

  // TAESD previews: the page's button stores and loads the preset's decoder; the next run's
  // previews are at image size.
  await page.click('#preview-decoder');
  await finished(page, 'ready', 2 * MINUTE);
  assert.equal(await page.getAttribute('body', 'data-preview-decoder'), 'tiny-taesdxl');
  await page.click('#generate');
  await finished(page, 'done');
  const previewSize = await page.evaluate(() => [document.getElementById('preview').width, document.getElementById('preview').height]);
  assert.deepEqual(previewSize, [96, 64], 'TAESD previews are at image size');

  const api = await page.evaluate(async ({ maskBytes, steps, seed, guidance, prompt }) => {
    const { Sdxl } = await import('/sdxl.js');
    const sdxl = await Sdxl.create();
    await sdxl.load({ base: './models/tiny-sdxl-base', quant: 'q8' });
    const image = await (await fetch('/_e2e/init_96x64.png')).blob();
    const maskBitmap = await createImageBitmap(new Blob([new Uint8Array(maskBytes)], { type: 'image/png' }));
    const canvas = new OffscreenCanvas(maskBitmap.width, maskBitmap.height).getContext('2d');
    canvas.drawImage(maskBitmap, 0, 0);
    const maskData = canvas.getImageData(0, 0, maskBitmap.width, maskBitmap.height);
    const common = { prompt, steps, seed, guidance, refinerStart: null };
    const bytes = async (result) => Array.from(new Uint8Array(await result.blob.arrayBuffer()));
    const error = (promise) => promise.then(() => 'resolved', (e) => `${e.name}: ${e.message}`);
    const viaImageData = await bytes(await sdxl.generate({ ...common, image, mask: maskData }));
    const outpainted = await sdxl.generate({ ...common, image: await createImageBitmap(image), outpaint: [16, 8, 16, 8] });
    const smallMask = new ImageData(new Uint8ClampedArray(64 * 64 * 4).fill(255), 64, 64);
    const red = new ImageData(new Uint8ClampedArray(96 * 64 * 4).map((_, i) => (i % 4 === 0 || i % 4 === 3 ? 255 : 0)), 96, 64);
    const errors = {
      otherSize: await error(sdxl.generate({ ...common, image, mask: smallMask })),
      coloured: await error(sdxl.generate({ ...common, image, mask: red })),
      maskAlone: await error(sdxl.generate({ ...common, mask: maskData })),
      notImage: await error(sdxl.generate({ ...common, image: 'init.png' })),
      badOutpaint: await error(sdxl.generate({ ...common, image, outpaint: [8, -8, 0, 0] })),
      badStrength: await error(sdxl.generate({ ...common, image, strength: NaN })),
    };
    const after = await bytes(await sdxl.generate({ ...common, image, mask: maskData }));
    // A crop around a soft mask of a larger image, pasted back (diffusers' padding_mask_crop).
    const blob = async (name) => (await fetch(`/_e2e/${name}`)).blob();
    const cropped = await sdxl.generate({ prompt: 'a lighthouse on a cliff at dawn', negativePrompt: 'blurry', steps: 4, seed: 22, guidance: 5,
      refinerStart: null, image: await blob('init_150x110.png'), mask: await blob('mask_blurred_150x110.png'), maskPadding: 8, width: 64, height: 64 });
    // The same from the sharp box, blurred by maskBlur (the fixture's mask is PIL's blur of it, radius 4).
    const box = new ImageData(new Uint8ClampedArray(150 * 110 * 4).map((_, i) => {
      const [x, y] = [(i >> 2) % 150, Math.floor((i >> 2) / 150)];
      return i % 4 === 3 || (x >= 84 && x < 110 && y >= 30 && y < 52) ? 255 : 0;
    }), 150, 110);
    const blurred = await sdxl.generate({ prompt: 'a lighthouse on a cliff at dawn', negativePrompt: 'blurry', steps: 4, seed: 22, guidance: 5,
      refinerStart: null, image: await blob('init_150x110.png'), mask: box, maskBlur: 4, maskPadding: 8, width: 64, height: 64 });
    const crop = { bytes: await bytes(cropped), size: [cropped.width, cropped.height], parameters: cropped.parameters, blurred: await bytes(blurred) };
    // The preview decoder: stored once (the page stored it too), previews at image size; a LoRA is not one.
    const decoder = await sdxl.loadPreviewDecoder({ url: './models/tiny-taesdxl/diffusion_pytorch_model.safetensors', id: 'tiny-taesdxl' });
    const previews = [];
    await sdxl.generate({ ...common, width: 64, height: 64, onStep: (e) => previews.push([e.preview.width, e.preview.height, e.previewDecoder ?? null]) });
    const fast = await sdxl.generate({ ...common, width: 64, height: 64, steps: 1, finalDecoder: 'taesd' });
    errors.notDecoder = await error(sdxl.loadPreviewDecoder({ url: '/loras/kohya.safetensors', id: 'kohya' }));
    await sdxl.loadPreviewDecoder(null);
    errors.noFinalDecoder = await error(sdxl.generate({ ...common, width: 64, height: 64, steps: 1, finalDecoder: 'taesd' }));
    await sdxl.generate({ ...common, width: 64, height: 64, steps: 1, onStep: (e) => previews.push([e.preview.width, e.preview.height, e.previewDecoder ?? null]) });
    const listed = (await sdxl.previewDecoders()).map((d) => `${d.id} ${d.complete}`);
    sdxl.terminate();
    return { viaImageData, outpainted: [outpainted.width, outpainted.height, outpainted.parameters], errors, after, decoder: decoder.id, previews, listed, crop, fast: [fast.width, fast.parameters] };
  }, { maskBytes: mask, steps: RUN.steps, seed: RUN.seed, guidance: RUN.guidance, prompt: PROMPT });
  log('inpainting API:', JSON.stringify({ outpainted: api.outpainted, errors: api.errors }));
  const viaApi = psnr(decodePng(Buffer.from(api.viaImageData)).rgb, expected.rgb);
  log(`inpainting: API with an ImageData mask against the CLI ${viaApi.toFixed(1)} dB`);
  assert.ok(viaApi >= MIN_PSNR, `inpainting through the API: PSNR ${viaApi.toFixed(1)} dB`);
  assert.deepEqual(api.outpainted.slice(0, 2), [128, 80], 'outpainting grows the canvas');
  assert.match(api.errors.otherSize, /^InvalidParameter: .*mask is 64x64 but the image is 96x64/);
  assert.match(api.errors.coloured, /^InvalidParameter: .*black and white/);
  assert.match(api.errors.maskAlone, /^InvalidParameter: .*mask needs an image/);
  assert.match(api.errors.notImage, /^InvalidParameter: image must be a Blob/);
  assert.match(api.errors.badOutpaint, /^InvalidParameter: outpaint must be/);
  assert.match(api.errors.badStrength, /^InvalidParameter: strength must be a finite number/);
  assert.deepEqual(api.after, api.viaImageData, 'after the refused calls, the same run gives the same PNG');
  const cropPng = `${out}/expected-crop.png`;
  execFileSync(sdxlCli, ['generate', '--model', `${out}/inpaint-base-q8`, '--init-image', `${root}/tests/fixtures/reference/init_150x110.png`,
    '--mask', `${root}/tests/fixtures/reference/mask_blurred_150x110.png`, '--mask-padding', '8', '--width', '64', '--height', '64',
    '--prompt', 'a lighthouse on a cliff at dawn', '--negative', 'blurry', '--steps', '4', '--seed', '22', '--guidance', '5', '--precision', 'f32', '--out', cropPng], { stdio: 'inherit' });
  assert.deepEqual(api.crop.size, [150, 110], 'a crop run gives the whole image back');
  assert.match(api.crop.parameters, /Masked area padding: 8/);
  assert.ok(decodePng(Buffer.from(api.crop.blurred)).rgb.equals(decodePng(Buffer.from(api.crop.bytes)).rgb), 'maskBlur 4 of the box is the fixture\'s blurred mask');
  const viaCrop = psnr(decodePng(Buffer.from(api.crop.bytes)).rgb, decodePng(readFileSync(cropPng)).rgb);
  log(`inpainting a crop around the mask: API against the CLI ${viaCrop.toFixed(1)} dB`);
  assert.ok(viaCrop >= MIN_PSNR, `crop around the mask: PSNR ${viaCrop.toFixed(1)} dB`);
  log('preview decoder:', JSON.stringify({ decoder: api.decoder, previews: api.previews, listed: api.listed, error: api.errors.notDecoder }));
  assert.equal(api.decoder, 'tiny-taesdxl');
  assert.deepEqual(api.previews, [...Array(RUN.steps)].map(() => [64, 64, 'taesd']).concat([[8, 8, null]]), 'TAESD previews at image size, the latent map once unloaded');
  assert.match(api.errors.notDecoder, /^UnsupportedFormat: .*not a TAESD-XL decoder/);
  assert.deepEqual(api.listed, ['tiny-taesdxl true']);
  assert.equal(api.fast[0], 64);
  assert.match(api.fast[1], /, VAE: TAESD, Version/, 'the final decode by TAESD is in the recipe');
  assert.match(api.errors.noFinalDecoder, /^InvalidParameter: .*call loadPreviewDecoder\(\) first/);
  await context.close();
}

/** The run the npm package's page and web/sdxl.js each make: the tiny base alone, few steps. */
const NPM_RUN = { prompt: PROMPT, width: RUN.width, height: RUN.height, steps: RUN.steps, guidance: RUN.guidance, seed: RUN.seed };

/** Step 15: web/ packed as the npm package, installed from its tarball into a fresh page that generates. */
async function npmPackageSteps(browser, url) {
  log('15. the npm package: pack web/, install the tarball into a fresh page, generate');
  const dir = `${out}/npm`;
  const pageDir = `${dir}/page`;
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(pageDir, { recursive: true });
  const [packed] = JSON.parse(execFileSync('npm', ['pack', '--json', '--silent', '--pack-destination', dir], { cwd: `${root}/web`, encoding: 'utf8' }));
  const pkg = `${root}/web/pkg`;
  const built = readdirSync(pkg, { recursive: true }).filter((file) => statSync(`${pkg}/${file}`).isFile() && file !== 'build.js');
  const expectedFiles = ['package.json', 'sdxl.d.ts', 'sdxl.js', 'worker.js', ...built.map((file) => `pkg/${file}`)].sort();
  log('npm pack:', packed.filename, packed.files.map((f) => f.path).join(' '));
  assert.deepEqual(packed.files.map((f) => f.path).sort(), expectedFiles, 'the tarball holds the API, its worker and the wasm build, nothing else');
  assert.ok(expectedFiles.includes('pkg/sdxl_bg.wasm'), 'the wasm is packed');
  assert.equal(packed.version, JSON.parse(readFileSync(`${root}/crate/Cargo.toml`, 'utf8').match(/^version = (".*")$/m)[1]), 'the package has the crate\'s version');

  writeFileSync(`${pageDir}/package.json`, JSON.stringify({ name: 'sdxl-webgpu-e2e-page', private: true, type: 'module' }));
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', `../${packed.filename}`], { cwd: pageDir, stdio: 'inherit' });
  const installed = `${pageDir}/node_modules/sdxl-webgpu`;
  const resolve = (specifier) => execFileSync('node', ['--input-type=module', '-e', `console.log(import.meta.resolve(${JSON.stringify(specifier)}))`], { cwd: pageDir, encoding: 'utf8' }).trim();
  assert.equal(resolve('sdxl-webgpu'), pathToFileURL(`${installed}/sdxl.js`).href, 'the package\'s main export');
  assert.equal(resolve('sdxl-webgpu/worker.js'), pathToFileURL(`${installed}/worker.js`).href, 'the worker export');
  // The declarations through the package's exports, as a bundler-based app sees them.
  writeFileSync(`${pageDir}/check.ts`, "import { Sdxl, type GenerateResult } from 'sdxl-webgpu';\n" +
    'export async function run(): Promise<GenerateResult> { return (await Sdxl.create()).generate({ prompt: "x", seed: 1 }); }\n');
  writeFileSync(`${pageDir}/tsconfig.json`, JSON.stringify({ compilerOptions: { target: 'es2022', module: 'es2022', moduleResolution: 'bundler',
    lib: ['es2022', 'dom'], strict: true, noEmit: true }, files: ['check.ts'] }));
  execFileSync(`${root}/tests/e2e/node_modules/.bin/tsc`, ['-p', `${pageDir}/tsconfig.json`], { stdio: 'inherit' });

  // A plain page beside node_modules on a server that serves no web/: worker and wasm can only come from the package.
  writeFileSync(`${pageDir}/index.html`, `<!doctype html>
<meta charset="utf-8">
<title>sdxl-webgpu installed from npm</title>
<link rel="icon" href="data:,">
<script type="module">
  import { Sdxl } from './node_modules/sdxl-webgpu/sdxl.js';
  try {
    const sdxl = await Sdxl.create({ storeName: 'e2e-npm' });
    await sdxl.load({ base: './models/tiny-sdxl-base', quant: 'q8' });
    const { blob } = await sdxl.generate(${JSON.stringify(NPM_RUN)});
    window.generated = Array.from(new Uint8Array(await blob.arrayBuffer()));
  } catch (e) {
    window.failed = \`\${e.name}: \${e.message}\`;
  }
</script>
`);
  const own = await startServer(0, pageDir);
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    watch(page, 'npm');
    await page.goto(`${own.url}/`);
    await page.waitForFunction(() => window.generated || window.failed, null, { timeout: 10 * MINUTE });
    assert.equal(await page.evaluate(() => window.failed ?? null), null, 'the page using the installed package generates');
    const viaPackage = Buffer.from(await page.evaluate(() => window.generated));
    const served = (await (await fetch(`${own.url}/_control/log`)).json()).map((request) => request.path);
    for (const file of ['sdxl.js', 'worker.js', 'pkg/sdxl.js', 'pkg/sdxl_bg.wasm']) {
      assert.ok(served.includes(`/node_modules/sdxl-webgpu/${file}`), `${file} served from node_modules (served: ${served.join(' ')})`);
    }

    const reference = await context.newPage();
    watch(reference, 'npm-reference');
    await reference.goto(`${url}/?preset=tiny`);
    const viaWeb = Buffer.from(await reference.evaluate(async (run) => {
      const { Sdxl } = await import('/sdxl.js');
      const sdxl = await Sdxl.create({ storeName: 'e2e-npm-reference' });
      await sdxl.load({ base: './models/tiny-sdxl-base', quant: 'q8' });
      const { blob } = await sdxl.generate(run);
      sdxl.terminate();
      return Array.from(new Uint8Array(await blob.arrayBuffer()));
    }, NPM_RUN));
    const image = decodePng(viaPackage);
    assert.deepEqual([image.width, image.height], [NPM_RUN.width, NPM_RUN.height], 'the package\'s image size');
    log(`npm package: ${viaPackage.length} B PNG; PSNR against web/sdxl.js ${psnr(image.rgb, decodePng(viaWeb).rgb).toFixed(1)} dB`);
    assert.ok(viaPackage.equals(viaWeb), 'the installed package gives web/sdxl.js\'s PNG, byte for byte');
    await context.close();
  } finally {
    own.server.kill();
  }
}

async function main() {
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });
  let url;
  ({ server, url } = await startServer());
  log(`server ${url}`);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--no-sandbox', '--enable-unsafe-webgpu', '--enable-unsafe-swiftshader', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic', '--disable-dev-shm-usage'],
  });
  try {
    if (selected(1, 2, 3, 4, 5, 6, 7, 8, 9)) await pageSteps(browser, url);
    if (selected(10)) await apiCallSteps(browser, url);
    if (selected(11)) await faultSteps(browser, url);
    if (selected(12)) await serviceWorkerSteps(browser);
    if (selected(13)) await repairSteps(browser, url);
    if (selected(14)) await inpaintSteps(browser, url);
    if (selected(15)) await npmPackageSteps(browser, url);
    log(STEPS ? `end-to-end steps ${STEPS.join(', ')} passed` : 'all end-to-end tests passed');
  } finally {
    await browser.close();
    server.kill();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
