// Type declarations for sdxl.js, the JS API of Stable Diffusion XL on WebGPU.

// <generated> from crate/src/app/types.rs by crate/tests/typescript.rs: edit those, not this.
export type Quant = 'f16' | 'q8' | 'q4';

export type Scheduler = 'euler' | 'euler_a' | 'dpmpp_2m' | 'dpmpp_2m_karras' | 'ddim';

export type TimestepSpacing = 'leading' | 'trailing' | 'linspace';

export type Stage = "base" | "refiner";

/**
 * The options of a generation (the JS API's `generate()` takes these with its images and callbacks).
 */
export interface GenerateRequest {
    prompt: string;
    negativePrompt?: string;
    /**
     * Multiples of 8 (default 1024; with an image, the image's).
     */
    width?: number;
    height?: number;
    /**
     * Default 30.
     */
    steps?: number;
    /**
     * Classifier-free guidance scale (default 5; at most 1 skips the unconditional pass).
     */
    guidance?: number;
    /**
     * Default: random (reported in the result).
     */
    seed?: number;
    /**
     * Fraction of the schedule after which the refiner takes over (default 0.8 when one is loaded); null: base only.
     */
    refinerStart?: number | null;
    /**
     * The sampler (default: the model's scheduler_config.json; few-step Turbo/Lightning models name theirs).
     */
    scheduler?: Scheduler | null;
    /**
     * How the steps spread over the noise levels (default: the model's config; few-step models use 'trailing').
     */
    timestepSpacing?: TimestepSpacing | null;
    /**
     * Encode prompts past 75 tokens in windows of 75 (lpw_stable_diffusion_xl); default false: truncated as diffusers.
     */
    longPrompt?: boolean;
    /**
     * Read A1111 weights `(word:1.2)`, `(word)`, `[word]` (lpw_stable_diffusion_xl) and `<lora:ID:WEIGHT>` tags naming stored LoRAs; default false: brackets are text.
     */
    promptWeighting?: boolean;
    /**
     * Stored LoRAs (see storeLora) applied to the base, each at its weight (negative subtracts; 0 leaves it out).
     */
    loras?: LoraWeight[];
    /**
     * How much of the schedule img2img and inpainting run, in (0, 1]: default 0.9999 with a mask or outpaint, 0.3 without.
     */
    strength?: number;
    /**
     * Outpainting: pixels added [left, top, right, bottom] around `image` (edges repeated), then inpainted; the new size must stay a multiple of 8.
     */
    outpaint?: [number, number, number, number];
    /**
     * Outpainting: how many pixels into the image the repainted area reaches (default 0).
     */
    outpaintOverlap?: number;
    /**
     * diffusers' padding_mask_crop: inpaint only the region around the mask, padded by this many pixels, at width × height (default the image's), then paste it back into the image (any size) through the mask as given, soft edges blending.
     */
    maskPadding?: number;
    /**
     * diffusers' mask_processor.blur: blur the mask first by this Gaussian radius (PIL's), softening the paste-back of maskPadding runs.
     */
    maskBlur?: number;
    /**
     * What decodes the final image: 'vae' (default) or 'taesd', the loaded preview decoder (fast, approximate; needs loadPreviewDecoder()).
     */
    finalDecoder?: FinalDecoder;
}

/**
 * A LoRA of a generation at its weight.
 */
export interface LoraWeight {
    /**
     * The stored LoRA's id (the CLI: its file).
     */
    model: string;
    weight: number;
}

export type FinalDecoder = "vae" | "taesd";

/**
 * Options of the engine's creation.
 */
export interface CreateRequest {
    /**
     * 'auto' uses f16 where the adapter has shader-f16 (default).
     */
    precision?: 'auto' | 'f16' | 'f32';
    /**
     * The IndexedDB database for models (default 'sdxl-models'; LoRAs and preview decoders in the ones named this + '-loras' / '-decoders').
     */
    storeName?: string;
}

/**
 * A model (or LoRA, or preview decoder) as the engine gets it: where it comes from when it is
 * not stored, a URL (a pack, a diffusers folder, a single .safetensors / .gguf) or, with `file`
 * (its name), the picked File passed beside the options; and its store id.
 */
export interface ModelSpec {
    /**
     * Default: the URL's last part (or the file's name) with characters outside `A-Za-z0-9._-`
     * as `-`, then for a model `-` and the preset (`stable-diffusion-xl-base-1.0-q4`), for a LoRA
     * or decoder without `.safetensors` (what `<lora:NAME:WEIGHT>` tags name).
     */
    id?: string;
    url?: string;
    /**
     * The picked file's name.
     */
    file?: string;
}

/**
 * A model as loaded or stored: its store id, and its URL or picked file's name (neither: loaded
 * by id alone).
 */
export interface LoadedModel {
    id: string;
    url?: string;
    /**
     * The picked file's name.
     */
    file?: string;
}

/**
 * The models to load.
 */
export interface LoadRequest {
    base: ModelSpec;
    refiner?: ModelSpec | null;
    /**
     * Weight format on the GPU and in storage (default 'q4').
     */
    quant?: Quant;
}

/**
 * What load() made the loaded models.
 */
export interface LoadedModels {
    base: LoadedModel;
    refiner: LoadedModel | null;
    quant: Quant;
}

/**
 * A part of `sdxl bench`.
 */
export type BenchPart = "kernels" | "unet" | "vae";

/**
 * What `sdxl bench` measures.
 */
export interface BenchRequest {
    /**
     * Square image sizes, multiples of 8 (default [512, 1024]); the kernels use the largest.
     */
    sizes?: number[];
    /**
     * Weight formats of the UNet steps (default all).
     */
    quants?: Quant[];
    /**
     * LoRA ranks whose per-step cost is measured on the UNet (default [32, 128]; [] for none).
     */
    loras?: number[];
    /**
     * Which parts to run (default all).
     */
    only?: BenchPart[];
    /**
     * The model's name, and its unet/config.json and vae/config.json texts (default: SDXL 1.0 base).
     */
    model?: string;
    unetConfig?: string;
    vaeConfig?: string;
}

/**
 * Bytes moving: a download into the store (a folder or single file converted as it streams), an
 * import of a picked file, checksum checks of what is stored, an upload to the GPU.
 */
export interface Transfer {
    /**
     * The model's (or LoRA's) store id.
     */
    model: string;
    loaded: number;
    total: number;
    detail?: string;
}

/**
 * A step of a generation.
 */
export interface StepProgressEvent {
    stage: Stage;
    /**
     * 1-based step within the stage.
     */
    step: number;
    steps: number;
    /**
     * The preview's size, when the step carries one.
     */
    previewWidth?: number;
    previewHeight?: number;
    /**
     * 'taesd' when the preview decoder made the preview.
     */
    previewDecoder?: 'taesd';
}

/**
 * What the engine reports while it works.
 */
export type EngineEvent = ({ type: "download" } & Transfer) | ({ type: "import" } & Transfer) | ({ type: "verify" } & Transfer) | ({ type: "upload" } & Transfer) | { type: "encode"; stage: Stage } | ({ type: "step" } & StepProgressEvent) | { type: "decode" } | { type: "bench"; what: string };

/**
 * Milliseconds per phase; each stage's time includes its prompt encoding.
 */
export interface Timings {
    base?: number;
    refiner?: number;
    decode?: number;
    total: number;
}

/**
 * A generated image as the engine describes it (its PNG crosses beside this, as bytes).
 */
export interface GenerateOutput {
    /**
     * The recipe, as the PNG's `parameters` text chunk holds it (AUTOMATIC1111 format).
     */
    parameters: string;
    seed: number;
    width: number;
    height: number;
    timings: Timings;
}

/**
 * The GPU adapter the engine runs on.
 */
export interface AdapterInfo {
    adapter: string;
    precision: 'f16' | 'f32';
    shaderF16: boolean;
    maxBufferBytes: number;
}

export type ModelKind = "sdxl-base" | "sdxl-refiner";

/**
 * A model in the store, complete or not (the JS API lists these).
 */
export interface StoredModel {
    id: string;
    url: string | null;
    quant: string | null;
    model: ModelKind | null;
    /**
     * Bytes of the records stored.
     */
    storedBytes: number;
    /**
     * Bytes of the complete model (for an unfinished conversion: the planned size).
     */
    totalBytes: number | null;
    complete: boolean;
}

/**
 * A stored file (a LoRA or a preview decoder) as the JS API lists it.
 */
export interface StoredFile {
    id: string;
    /**
     * The file's name.
     */
    file: string | null;
    /**
     * Where it came from: its URL, or a picked file's name, size and date.
     */
    origin: string | null;
    storedBytes: number;
    /**
     * AUTOMATIC1111's short hash (the PNG recipe's `Lora hashes`).
     */
    hash: string | null;
    /**
     * False for a store that was interrupted (store it again, or delete it).
     */
    complete: boolean;
}

export interface Peak {
    /**
     * f32 multiply-adds in registers, GFLOP/s.
     */
    gflops: number;
    /**
     * Device-memory copy, GB/s (bytes read plus written).
     */
    gbps: number;
}

export interface KernelResult {
    kernel: string;
    shape: string;
    /**
     * Weight format (linear and conv), else "-".
     */
    weights: string;
    ms: number;
    /**
     * Useful GFLOP/s (compute-bound kernels) or GB/s (memory-bound ones).
     */
    rate: number;
    unit: string;
    /**
     * `rate` as a share of the measured peak, in percent.
     */
    percentOfPeak: number;
}

export interface UnetResult {
    size: number;
    quant: string;
    /**
     * The rank of a LoRA on every transformer Linear (kohya's default targets), run beside the
     * weights; None: the base alone.
     */
    loraRank: number | null;
    /**
     * One UNet evaluation with classifier-free guidance (batch 2), steady (pipelines compiled).
     */
    secondsPerStep: number;
    /**
     * The first evaluation at this size in this process: the steady step plus compiling the
     * pipelines it is the first to use.
     */
    firstStepSeconds: number;
    /**
     * Pipelines compiled by the first step.
     */
    pipelinesCompiled: number;
    /**
     * Kernel launches of one step.
     */
    dispatchesPerStep: number;
    tflops: number;
    /**
     * GPU memory of the weights, and the peak of everything during the steps.
     */
    weightBytes: number;
    peakBytes: number;
}

export interface VaeResult {
    size: number;
    tiled: boolean;
    seconds: number;
    peakBytes: number;
}

/**
 * One TAESD-XL preview decode ([`TaesdDecoder::decode`] of a [1, 4, size/8, size/8] latent with
 * taesdxl's shapes, [`TaesdConfig::default`]): the cost of one live preview per denoising step.
 */
export interface TaesdResult {
    size: number;
    seconds: number;
    peakBytes: number;
}

/**
 * A measurement that could not run (e.g. a buffer over this adapter's limits).
 */
export interface Skipped {
    what: string;
    error: string;
}

export interface BenchReport {
    adapter: string;
    dtype: string;
    model: string;
    peak: Peak;
    kernels: KernelResult[];
    unet: UnetResult[];
    vae: VaeResult[];
    taesd: TaesdResult[];
    skipped: Skipped[];
}
// </generated>

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

interface Timed {
  /** Share done, 0..1. */
  fraction: number;
  /** Seconds left at the rate since this phase began; null until it can be estimated. */
  etaSeconds: number | null;
}

/** Download into IndexedDB (a folder or single file is converted as it streams), import of a picked file, checksum checks of what is stored, upload to the GPU. */
export type TransferEvent = Extract<EngineEvent, { type: 'download' | 'import' | 'verify' | 'upload' }> & Timed;

export type EncodeEvent = Extract<EngineEvent, { type: 'encode' }>;

export type StepEvent = Extract<EngineEvent, { type: 'step' }> & Timed & {
  /** The current estimate of the image (only with onStep): at image size from a loaded preview decoder, else at latent resolution. */
  preview?: ImageData;
};

export type DecodeEvent = Extract<EngineEvent, { type: 'decode' }>;

export type ProgressEvent = TransferEvent | EncodeEvent | StepEvent | DecodeEvent;

export interface CreateOptions extends CreateRequest {
  /** Every progress event of every call. */
  onProgress?: (event: ProgressEvent) => void;
  /** Where worker.js is served (default: beside sdxl.js). */
  workerUrl?: string | URL;
}

export interface LoadOptions {
  base: ModelRef;
  refiner?: ModelRef | null;
  /** Weight format on the GPU and in storage (default 'q4'). */
  quant?: Quant;
  signal?: AbortSignal;
  onProgress?: (event: ProgressEvent) => void;
}

export interface GenerateOptions extends GenerateRequest {
  /** img2img: start from this image (PNG blobs are decoded exactly; the run takes its size unless width/height say otherwise). */
  image?: ImageInput | null;
  /** Inpainting: white repaints, black (or transparent) keeps; grey binarized at 0.5; the image's size. */
  mask?: ImageInput | null;
  signal?: AbortSignal;
  onStep?: (event: StepEvent) => void;
  onProgress?: (event: ProgressEvent) => void;
}

/** An image given to generate(): an image file (Blob), a decoded image, a canvas or its pixels. */
export type ImageInput = Blob | ImageBitmap | ImageData | HTMLCanvasElement | OffscreenCanvas | HTMLImageElement;

export interface GenerateResult extends GenerateOutput {
  /** PNG with the recipe in its `parameters` text chunk (AUTOMATIC1111 format). */
  blob: Blob;
  bitmap: ImageBitmap;
}

/** A LoRA file: a File / Blob, a URL or hub `owner/name/file.safetensors`, or either with an explicit id. */
export type LoraRef = string | { url: string; id?: string } | Blob | { file: Blob; id?: string };

export interface StoreLoraOptions {
  signal?: AbortSignal;
  onProgress?: (event: ProgressEvent) => void;
}

export interface BenchOptions extends Omit<BenchRequest, 'model' | 'unetConfig' | 'vaeConfig'> {
  /** A diffusers folder URL whose unet/ and vae/ config.json give the shapes (default: SDXL 1.0 base). */
  model?: string;
  signal?: AbortSignal;
  onProgress?: (event: Extract<EngineEvent, { type: 'bench' }>) => void;
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
  /** What load() made the loaded models (null until it succeeds). */
  readonly loaded: LoadedModels | null;
  load(options: LoadOptions): Promise<LoadedModels>;
  generate(options: GenerateOptions): Promise<GenerateResult>;
  models(): Promise<StoredModel[]>;
  deleteModel(id: string): Promise<number>;
  verify(id: string): Promise<string[]>;
  storeLora(lora: LoraRef, options?: StoreLoraOptions): Promise<StoredFile>;
  loras(): Promise<StoredFile[]>;
  deleteLora(id: string): Promise<number>;
  /** Stores (unless stored) and loads a TAESD-XL preview decoder (default TAESDXL); null unloads it. */
  loadPreviewDecoder(ref?: LoraRef | null, options?: StoreLoraOptions): Promise<StoredFile | null>;
  previewDecoders(): Promise<StoredFile[]>;
  deletePreviewDecoder(id: string): Promise<number>;
  bench(options?: BenchOptions): Promise<{ report: BenchReport; table: string }>;
  storage(): Promise<{ usage: number; quota: number; persisted: boolean }>;
  persist(): Promise<boolean>;
  terminate(): void;
}
