// Type-checks web/sdxl.d.ts against the documented usage (README, docs/browser.md) (tsc --noEmit in tests/run.sh).
import { Sdxl, SdxlError, SDXL_1_0, RESOLUTION_BUCKETS, type ProgressEvent, type StepEvent, type GenerateResult, type StoredFile } from '../../web/sdxl.js';

function describe(e: ProgressEvent): string {
  switch (e.type) {
    case 'download':
    case 'import':
    case 'verify':
    case 'upload':
      return `${e.type} ${e.model}: ${e.loaded}/${e.total}, ${e.etaSeconds ?? '?'} s left (${e.fraction})`;
    case 'encode':
      return `encoding for the ${e.stage}`;
    case 'step':
      return `${e.stage} step ${e.step}/${e.steps}`;
    case 'decode':
      return 'decoding';
  }
}

export async function example(canvas: HTMLCanvasElement, picked: File): Promise<GenerateResult | null> {
  const sdxl = await Sdxl.create({ onProgress: (e) => console.log(describe(e)), precision: 'auto' });
  const adapter: string = sdxl.info.adapter;
  await sdxl.load({ base: SDXL_1_0.base, refiner: SDXL_1_0.refiner, quant: 'q4' });
  const style: StoredFile = await sdxl.storeLora(picked, { onProgress: (e) => console.log(describe(e)) });
  await sdxl.storeLora({ url: 'owner/name/detail.safetensors', id: 'detail' });
  console.log((await sdxl.loras()).map((l) => `${l.id} ${l.hash} ${l.storedBytes} ${l.complete}`), style.file);
  const [width, height] = RESOLUTION_BUCKETS[1];
  const controller = new AbortController();
  try {
    const result = await sdxl.generate({
      prompt: `a red fox in the snow, ${adapter}`,
      negativePrompt: 'blurry',
      width, height, steps: 30, guidance: 5, seed: 7, refinerStart: 0.8,
      loras: [{ model: style.id, weight: 0.8 }, { model: 'detail', weight: -0.5 }], promptWeighting: true,
      signal: controller.signal,
      onStep: (e: StepEvent) => e.preview && canvas.getContext('2d')?.putImageData(e.preview, 0, 0),
    });
    const seconds: number = result.timings.total / 1000;
    console.log(result.parameters, result.seed, seconds, result.blob.type, result.bitmap.width);
    return result;
  } catch (e) {
    if (e instanceof SdxlError && (e.name === 'AbortError' || e.name === 'QuotaExceeded')) return null;
    throw e;
  } finally {
    const stored = await sdxl.models();
    console.log(stored.filter((m) => m.complete).map((m) => `${m.id} ${m.quant} ${m.storedBytes}`));
    const { usage, quota, persisted } = await sdxl.storage();
    console.log(usage / quota, persisted, await sdxl.verify(stored[0].id), await sdxl.deleteModel(stored[0].id));
    console.log(await sdxl.deleteLora(style.id));
    const { report, table } = await sdxl.bench({ sizes: [64], quants: ['q4'], loras: [32], only: ['unet', 'vae'], model: './models/tiny-sdxl-base', onProgress: (e) => console.log(e.what) });
    const step: number = report.unet[0].secondsPerStep;
    const rank: number | null = report.unet[1].loraRank;
    console.log(table, step, rank, report.peak.gflops, report.kernels.map((k) => k.percentOfPeak), report.skipped.length);
    sdxl.terminate();
  }
}
