// Type declarations for sdxl.js, the JS API of Stable Diffusion XL on WebGPU.

export type Quant = 'f16' | 'q8' | 'q4';

/**
 * A hub repository ("owner/name", or "owner/name/file.gguf" for one file of it), a URL (of a pack, a
 * diffusers folder, or a single .safetensors / .gguf), a path starting with ./, ../ or / (relative to
 * the page), {url, id} with an explicit store id, a File / Blob the user picked or dropped, or
 * {file, id}. The store id defaults to the last path segment (or the file's name) + "-" + quant.
 */
export type ModelRef = string | { url: string; id?: string } | Blob | { file: Blob; id?: string };

export type ErrorName =
  | 'WebGpuUnavailable' | 'AdapterLimits' | 'DeviceLost' | 'GpuError'
  | 'InvalidParameter' | 'NetworkError' | 'QuotaExceeded' | 'ModelIncomplete' | 'CorruptWeights'
  | 'WrongModel' | 'BadConfig' | 'BadTokenizer' | 'IoError' | 'UnsupportedFormat' | 'AbortError' | 'InternalError';

export class SdxlError extends Error {
  name: ErrorName;
}

export type Stage = 'base' | 'refiner';

interface Timed {
  /** Share done, 0..1. */
  fraction: number;
  /** Seconds left at the rate since this phase began; null until it can be estimated. */
  etaSeconds: number | null;
}

/** Download into IndexedDB (a folder or single file is converted as it streams), import of a picked file, checksum checks of what is stored, upload to the GPU. */
export interface TransferEvent extends Timed {
  type: 'download' | 'import' | 'verify' | 'upload';
  /** The model's (or LoRA's) store id. */
  model: string;
  loaded: number;
  total: number;
  detail?: string;
}

export interface EncodeEvent { type: 'encode'; stage: Stage }

export interface StepEvent extends Timed {
  type: 'step';
  stage: Stage;
  /** 1-based step within the stage. */
  step: number;
  steps: number;
  /** The current estimate of the image (only with onStep): at image size from a loaded preview decoder, else at latent resolution. */
  preview?: ImageData;
  /** 'taesd' when the preview decoder made it. */
  previewDecoder?: 'taesd';
}

export interface DecodeEvent { type: 'decode' }

export type ProgressEvent = TransferEvent | EncodeEvent | StepEvent | DecodeEvent;

export interface CreateOptions {
  /** Every progress event of every call. */
  onProgress?: (event: ProgressEvent) => void;
  /** 'auto' uses f16 where the adapter has shader-f16 (default). */
  precision?: 'auto' | 'f16' | 'f32';
  /** The IndexedDB database for models (default 'sdxl-models'). */
  storeName?: string;
  /** Where worker.js is served (default: beside sdxl.js). */
  workerUrl?: string | URL;
}

export interface AdapterInfo {
  adapter: string;
  precision: 'f16' | 'f32';
  shaderF16: boolean;
  maxBufferBytes: number;
}

export interface LoadOptions {
  base: ModelRef;
  refiner?: ModelRef | null;
  /** Weight format on the GPU and in storage (default 'q4'). */
  quant?: Quant;
  signal?: AbortSignal;
  onProgress?: (event: ProgressEvent) => void;
}

export interface GenerateOptions {
  prompt: string;
  negativePrompt?: string;
  /** Multiples of 8 (default 1024). */
  width?: number;
  height?: number;
  /** Default 30. */
  steps?: number;
  /** Classifier-free guidance scale (default 5; at most 1 skips the unconditional pass). */
  guidance?: number;
  /** Default: random (reported in the result). */
  seed?: number;
  /** Fraction of the schedule after which the refiner takes over (default 0.8 when one is loaded); null: base only. */
  refinerStart?: number | null;
  /** The sampler (default: the model's scheduler_config.json; few-step Turbo/Lightning models name theirs). */
  scheduler?: 'euler' | 'euler_a' | 'dpmpp_2m' | 'dpmpp_2m_karras' | 'ddim' | null;
  /** How the steps spread over the noise levels (default: the model's config; few-step models use 'trailing'). */
  timestepSpacing?: 'leading' | 'trailing' | 'linspace' | null;
  /** Encode prompts past 75 tokens in windows of 75 (lpw_stable_diffusion_xl); default false: truncated as diffusers. */
  longPrompt?: boolean;
  /** Read A1111 weights `(word:1.2)`, `(word)`, `[word]` (lpw_stable_diffusion_xl) and `<lora:ID:WEIGHT>` tags naming stored LoRAs; default false: brackets are text. */
  promptWeighting?: boolean;
  /** Stored LoRAs (see storeLora) applied to the base, each at its weight (negative subtracts; 0 leaves it out). */
  loras?: LoraWeight[];
  /** img2img: start from this image (PNG blobs are decoded exactly; the run takes its size unless width/height say otherwise). */
  image?: ImageInput | null;
  /** Inpainting: white repaints, black (or transparent) keeps; grey binarized at 0.5; the image's size. */
  mask?: ImageInput | null;
  /** How much of the schedule img2img and inpainting run, in (0, 1]: default 0.9999 with a mask or outpaint, 0.3 without. */
  strength?: number;
  /** Outpainting: pixels added [left, top, right, bottom] around `image` (edges repeated), then inpainted; the new size must stay a multiple of 8. */
  outpaint?: [number, number, number, number];
  /** Outpainting: how many pixels into the image the repainted area reaches (default 0). */
  outpaintOverlap?: number;
  /** diffusers' padding_mask_crop: inpaint only the region around the mask, padded by this many pixels, at width × height (default the image's), then paste it back into the image (any size) through the mask as given, soft edges blending. */
  maskPadding?: number;
  /** diffusers' mask_processor.blur: blur the mask first by this Gaussian radius (PIL's), softening the paste-back of maskPadding runs. */
  maskBlur?: number;
  /** What decodes the final image: 'vae' (default) or 'taesd', the loaded preview decoder (fast, approximate; needs loadPreviewDecoder()). */
  finalDecoder?: 'vae' | 'taesd';
  signal?: AbortSignal;
  onStep?: (event: StepEvent) => void;
  onProgress?: (event: ProgressEvent) => void;
}

/** An image given to generate(): an image file (Blob), a decoded image, a canvas or its pixels. */
export type ImageInput = Blob | ImageBitmap | ImageData | HTMLCanvasElement | OffscreenCanvas | HTMLImageElement;

export interface GenerateResult {
  /** PNG with the recipe in its `parameters` text chunk (AUTOMATIC1111 format). */
  blob: Blob;
  bitmap: ImageBitmap;
  seed: number;
  width: number;
  height: number;
  parameters: string;
  /** Milliseconds: base and refiner (each with its prompt encoding), decode, total. */
  timings: { base: number; refiner?: number; decode: number; total: number };
}

export interface LoadedModel {
  id: string;
  url?: string;
  /** The picked file's name. */
  file?: string;
}

export interface StoredModel {
  id: string;
  /** Where it came from: a URL, or `file:NAME (BYTES bytes, modified MS)` for a picked file. */
  url: string | null;
  quant: Quant | null;
  model: 'sdxl-base' | 'sdxl-refiner' | null;
  storedBytes: number;
  totalBytes: number | null;
  complete: boolean;
}

export interface LoraWeight {
  /** The stored LoRA's id. */
  model: string;
  weight: number;
}

/** A LoRA file: a File / Blob, a URL or hub `owner/name/file.safetensors`, or either with an explicit id. */
export type LoraRef = string | { url: string; id?: string } | Blob | { file: Blob; id?: string };

export interface StoredLora {
  id: string;
  /** The file's name. */
  file: string | null;
  /** Where it came from: a URL, or `file:NAME (BYTES bytes, modified MS)` for a picked file. */
  origin: string | null;
  storedBytes: number;
  /** AUTOMATIC1111's short hash (the PNG recipe's `Lora hashes`). */
  hash: string | null;
  /** False for an interrupted store (store it again, or delete it). */
  complete: boolean;
}

export interface StoreLoraOptions {
  signal?: AbortSignal;
  onProgress?: (event: ProgressEvent) => void;
}

export interface BenchOptions {
  /** Square image sizes, multiples of 8 (default [512, 1024]); the kernels use the largest. */
  sizes?: number[];
  /** Weight formats of the UNet steps (default all). */
  quants?: Quant[];
  /** LoRA ranks whose per-step cost is measured on the UNet (default [32, 128]; [] for none). */
  loras?: number[];
  /** Which parts to run (default all). */
  only?: Array<'kernels' | 'unet' | 'vae'>;
  /** A diffusers folder URL whose unet/ and vae/ config.json give the shapes (default: SDXL 1.0 base). */
  model?: string;
  signal?: AbortSignal;
  onProgress?: (event: { type: 'bench'; what: string }) => void;
}

export interface BenchReport {
  adapter: string;
  dtype: 'f16' | 'f32';
  model: string;
  /** f32 multiply-add GFLOP/s and copy GB/s of best-case kernels on this adapter. */
  peak: { gflops: number; gbps: number };
  kernels: Array<{ kernel: string; shape: string; weights: string; ms: number; rate: number; unit: 'GFLOP/s' | 'GB/s'; percentOfPeak: number }>;
  /** `loraRank`: a LoRA of that rank on every transformer Linear; null: the base alone. */
  unet: Array<{ size: number; quant: string; loraRank: number | null; secondsPerStep: number; tflops: number; weightBytes: number; peakBytes: number }>;
  vae: Array<{ size: number; tiled: boolean; seconds: number; peakBytes: number }>;
  /** TAESD-XL decodes (taesdxl's widths, random weights): what a live preview costs per step. */
  taesd: Array<{ size: number; seconds: number; peakBytes: number }>;
  /** Measurements that could not run here (e.g. over the adapter's limits), with the error. */
  skipped: Array<{ what: string; error: string }>;
}

export declare const SDXL_1_0: { base: string; refiner: string };
/** SDXL 1.0 base as one stable-diffusion.cpp GGUF file (Q4_K) on the hub. */
export declare const SDXL_1_0_GGUF: string;
/** TAESD-XL on the hub (madebyollin/taesdxl), the default of loadPreviewDecoder. */
export declare const TAESDXL: { url: string; id: string };
export declare const RESOLUTION_BUCKETS: ReadonlyArray<readonly [number, number]>;

export declare class Sdxl {
  static create(options?: CreateOptions): Promise<Sdxl>;
  readonly info: AdapterInfo;
  /** What load() made the loaded models: each with its store id and its URL or picked file's name. */
  readonly loaded: { base: LoadedModel; refiner: LoadedModel | null; quant: Quant } | null;
  load(options: LoadOptions): Promise<void>;
  generate(options: GenerateOptions): Promise<GenerateResult>;
  models(): Promise<StoredModel[]>;
  deleteModel(id: string): Promise<number>;
  verify(id: string): Promise<string[]>;
  storeLora(lora: LoraRef, options?: StoreLoraOptions): Promise<StoredLora>;
  loras(): Promise<StoredLora[]>;
  deleteLora(id: string): Promise<number>;
  /** Stores (unless stored) and loads a TAESD-XL preview decoder (default TAESDXL); null unloads it. */
  loadPreviewDecoder(ref?: LoraRef | null, options?: StoreLoraOptions): Promise<StoredLora | null>;
  previewDecoders(): Promise<StoredLora[]>;
  deletePreviewDecoder(id: string): Promise<number>;
  bench(options?: BenchOptions): Promise<{ report: BenchReport; table: string }>;
  storage(): Promise<{ usage: number; quota: number; persisted: boolean }>;
  persist(): Promise<boolean>;
  terminate(): void;
}
