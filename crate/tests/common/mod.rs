//! Shared test support: GPUs for every precision the adapter offers, deterministic data, CPU
//! references, tolerances, and `gpu_tests!` / `async_tests!` which run each async test natively
//! (pollster) and in the browser (wasm-bindgen-test).
#![allow(dead_code)]

use sdxl::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sdxl::models::vae::{AutoencoderKL, VaeConfig};
use sdxl::quant::QuantPolicy;
use sdxl::weights::{ModelSource, Source, Vars};
use sdxl::{DType, Gpu, Precision};

#[cfg(not(target_arch = "wasm32"))]
mod files;
pub mod sgm;
#[cfg(not(target_arch = "wasm32"))]
#[allow(unused_imports)] // each test binary uses some
pub use files::{copy_tree, read_all, sdxl, Case, TempDir};

/// An f32 device, plus an f16 one where the adapter has shader-f16.
pub async fn gpus() -> Vec<Gpu> {
    let f32_gpu = Gpu::new(Precision::F32).await.expect("a GPU adapter (lavapipe natively, SwiftShader in Chromium)");
    let has_f16 = f32_gpu.has_shader_f16;
    let mut all = vec![f32_gpu];
    if has_f16 {
        all.push(Gpu::new(Precision::F16).await.expect("an f16 device"));
    }
    all
}

/// Runs `test` on each of `gpus()`.
pub async fn on_every_gpu(test: impl AsyncFn(&Gpu)) {
    for gpu in gpus().await {
        test(&gpu).await;
    }
}

/// tests/fixtures/`dir` on disk (the browser's tests embed theirs: `fixtures!`).
#[cfg(not(target_arch = "wasm32"))]
pub fn fixture(dir: &str) -> sdxl::weights::DirSource {
    sdxl::weights::DirSource::new(format!("{}/../tests/fixtures/{dir}", env!("CARGO_MANIFEST_DIR")))
}

/// A diffusers folder as a model, its `.fp16` weights preferred on f16 devices.
pub fn folder<'a>(gpu: &Gpu, source: impl Source + 'a) -> ModelSource<'a> {
    ModelSource::folder(source, gpu.dtype == DType::F16)
}

/// The UNet of `model`, dense.
pub async fn unet(gpu: &Gpu, model: &ModelSource<'_>) -> sdxl::Result<UNet2DConditionModel> {
    let (config, tensors) = model.component::<UNet2DConditionConfig>("unet").await?;
    UNet2DConditionModel::load(&Vars::new(gpu, &*tensors, "unet", &QuantPolicy::default()), config).await.map_err(model.config_error("unet"))
}

/// The VAE of `model`.
pub async fn vae(gpu: &Gpu, model: &ModelSource<'_>) -> sdxl::Result<AutoencoderKL> {
    let (config, tensors) = model.component::<VaeConfig>("vae").await?;
    AutoencoderKL::load(&Vars::new(gpu, &*tensors, "vae", &QuantPolicy::default()), config).await.map_err(model.config_error("vae"))
}

/// Largest |a − b| (infinite where either side is NaN).
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { m.max((x - y).abs()) })
}

/// The library's PSNR of images in 0..1, refusing images of different sizes.
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    sdxl::pipeline::quality::psnr(a, b)
}

/// Relative tolerance of a kernel result: f32 storage keeps ~1e-6 per op; f16 storage rounds every
/// input and output to 11 bits.
pub fn tolerance(gpu: &Gpu) -> f32 {
    match gpu.dtype {
        DType::F16 => 1e-2,
        _ => 1e-5,
    }
}

/// Max |got - want| relative to max(1, max |want|); panics with the position of the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let (worst, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| if g.is_nan() { f32::INFINITY } else { (g - w).abs() })
        .enumerate()
        .fold((0, 0f32), |acc, (i, e)| if e > acc.1 { (i, e) } else { acc });
    assert!(err / scale <= tol, "{what}: max |Δ| {err} (relative {}) at {worst}: got {} want {}; tolerance {tol}", err / scale, got[worst], want[worst]);
}

/// Direct convolution with zero padding [top, bottom, left, right], f64 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn cpu_conv(x: &[f32], w: &[f32], b: Option<&[f32]>, (n, cin, h, wd): (usize, usize, usize, usize), cout: usize, k: usize, stride: usize, pad: [usize; 4]) -> (Vec<f32>, usize, usize) {
    let [top, bottom, left, right] = pad;
    let oh = (h + top + bottom - k) / stride + 1;
    let ow = (wd + left + right - k) / stride + 1;
    let mut y = vec![0.0; n * cout * oh * ow];
    for bi in 0..n {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = ((oy * stride + ky) as isize - top as isize, (ox * stride + kx) as isize - left as isize);
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    acc += x[((bi * cin + ci) * h + iy as usize) * wd + ix as usize] as f64 * w[((co * cin + ci) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                    }
                    y[((bi * cout + co) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    (y, oh, ow)
}

/// Deterministic values in [-1, 1) (xorshift).
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Values as the GPU stores them (f16 rounding on f16 devices), so references see the same inputs.
pub fn stored(gpu: &Gpu, v: &[f32]) -> Vec<f32> {
    match gpu.dtype {
        DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// `async_tests!(runner, harness; a, b, ...)` makes a test of each `async fn a` that awaits
/// `harness(a)`: natively under pollster, in wasm under wasm-bindgen-test's `runner`
/// (`run_in_browser` or `run_in_dedicated_worker`). `harness` is a path from the crate root.
#[macro_export]
macro_rules! async_tests {
    ($runner:ident, $harness:path; $($name:ident),* $(,)?) => {
        #[cfg(target_arch = "wasm32")]
        wasm_bindgen_test::wasm_bindgen_test_configure!($runner);
        mod run {
            $(
                #[cfg(not(target_arch = "wasm32"))]
                #[test]
                fn $name() {
                    pollster::block_on($harness(super::$name))
                }
                #[cfg(target_arch = "wasm32")]
                #[wasm_bindgen_test::wasm_bindgen_test]
                async fn $name() {
                    $harness(super::$name).await
                }
            )*
        }
    };
}

/// `gpu_tests!(a, b, ...)`: a test of each `async fn a(gpu: &Gpu)` that runs it on every GPU, on a
/// browser page in wasm.
#[macro_export]
macro_rules! gpu_tests {
    ($($name:ident),* $(,)?) => {
        $crate::async_tests!(run_in_browser, $crate::common::on_every_gpu; $($name),*);
    };
}

/// `fixtures! { "dir" => ["file", ...], ... }` defines `fixture(dir)`, a `Source` over
/// tests/fixtures/dir: the folder on disk natively; in the browser, which has no file system, the
/// listed files compiled into the test module.
#[macro_export]
macro_rules! fixtures {
    ($($dir:literal => [$($file:literal),* $(,)?]),* $(,)?) => {
        #[cfg(not(target_arch = "wasm32"))]
        use $crate::common::fixture;

        #[cfg(target_arch = "wasm32")]
        fn fixture(dir: &str) -> sdxl::weights::MemorySource {
            let mut source = sdxl::weights::MemorySource::default();
            match dir {
                $($dir => {
                    $(source.insert($file, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/", $dir, "/", $file)).to_vec());)*
                })*
                other => panic!("no embedded fixture {other}"),
            }
            source
        }
    };
}
