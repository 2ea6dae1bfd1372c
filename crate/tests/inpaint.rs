//! Inpainting and outpainting against diffusers' StableDiffusionXLInpaintPipeline
//! (reference/inpaint.safetensors, written by tests/fixtures/ref_inpaint.py): a 9-channel
//! inpainting UNet and the ordinary 4-channel base (blended with the noised original each step),
//! at diffusers' default strength, a lower one and 1 (pure noise), outpainted canvases, and the
//! refiner taking over; the mask is a grey PNG with soft edges that both sides binarize. Then the
//! bad inputs: masks of another size, coloured or non-binary, and UNets that do not fit.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{fixture, max_abs, psnr};
use sdxl::pipeline::generate::{generate, outpaint_canvas, GenerateParams, InitImage, Mask, SdxlModel, INPAINT_STRENGTH};
use sdxl::pipeline::crop::{crop_for_run, gaussian_blur, resize, Pixels};
use sdxl::pipeline::image::{decode_mask_png, decode_png, decode_png_pixels, mask_from_pixels};
use sdxl::quant::QuantPreset;
use sdxl::weights::{FileTensors, Source};
use sdxl::{DType, Error, Gpu};
use serde::Deserialize;

gpu_tests!(inpainting_matches_diffusers, padding_mask_crop_matches_diffusers, bad_masks_and_models_are_refused);

/// A run of ref_inpaint.py: `unet` "inpaint" (9 channels) or "base"; the rest as its CASES and
/// CROP_CASES name them.
#[derive(Deserialize)]
struct Case {
    name: String,
    unet: String,
    sampler: String,
    seed: u64,
    steps: usize,
    guidance: f32,
    strength: Option<f64>,
    outpaint: Option<[usize; 4]>,
    refiner_start: Option<f64>,
    /// Crop runs: the run's size and the padding around the mask.
    width: Option<usize>,
    height: Option<usize>,
    padding: Option<usize>,
}

impl Case {
    fn params(&self, image: InitImage, mask: Mask) -> GenerateParams {
        GenerateParams {
            prompt: "a lighthouse on a cliff at dawn".into(),
            negative: Some("blurry".into()),
            width: image.width,
            height: image.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            refiner_start: self.refiner_start.unwrap_or(0.8),
            scheduler: Some(self.sampler.parse().unwrap()),
            init_image: Some(image),
            mask: Some(mask),
            strength: self.strength.unwrap_or(INPAINT_STRENGTH),
            ..Default::default()
        }
    }

    fn model(&self) -> &'static str {
        if self.unet == "inpaint" { "tiny-sdxl-inpaint" } else { "tiny-sdxl-base" }
    }
}

#[derive(Deserialize)]
struct Cases {
    runs: Vec<Case>,
    crops: Vec<Case>,
    /// (source "rgb" | "gray", width, height, box).
    resizes: Vec<(String, usize, usize, Option<[f64; 4]>)>,
    /// PIL GaussianBlur radii, applied to the grey init image and to the mask.
    blurs: Vec<f32>,
}

async fn load(gpu: &Gpu, dir: &str) -> SdxlModel {
    SdxlModel::load(gpu, &common::folder(gpu, fixture(dir)), &QuantPreset::F16.policy()).await.unwrap()
}

/// ref_inpaint.py's cases and the tensors it wrote.
async fn references() -> (Cases, FileTensors<'static>) {
    let files = fixture("reference");
    let cases = serde_json::from_slice(&files.read("inpaint_cases.json").await.unwrap()).unwrap();
    (cases, FileTensors::open(files, vec!["inpaint.safetensors".into()]).await.unwrap())
}

async fn inpainting_matches_diffusers(gpu: &Gpu) {
    let files = fixture("reference");
    let (cases, refs) = references().await;
    let get = |key: String| {
        let refs = &refs;
        async move {
            let shape = refs.shape(&key).unwrap_or_else(|_| panic!("{key} missing (rerun ref_inpaint.py)")).to_vec();
            refs.host(&key, &shape).await.unwrap()
        }
    };
    let image = decode_png(&files.read("init_96x64.png").await.unwrap()).unwrap();
    let mask = decode_mask_png(&files.read("mask_96x64.png").await.unwrap()).unwrap();
    let repainted = mask.values.iter().filter(|&&v| v == 1.0).count();
    assert!(repainted > 500 && repainted < 96 * 64 / 2, "the fixture mask repaints {repainted} pixels");
    let base = load(gpu, "tiny-sdxl-base").await;
    let inpaint = load(gpu, "tiny-sdxl-inpaint").await;
    let refiner = load(gpu, "tiny-sdxl-refiner").await;
    // f32 as the issue states; f16 storage rounds every activation.
    let (latent_tol, min_psnr) = if gpu.dtype == DType::F32 { (1e-3, 45.0) } else { (2e-2, 40.0) };
    for case in &cases.runs {
        let (image, mask) = match case.outpaint {
            Some(pad) => {
                let (canvas, mask) = outpaint_canvas(&image, pad, 0).unwrap();
                assert_eq!(canvas.rgb, get(format!("{}.canvas", case.name)).await, "{}: outpainting canvas", case.name);
                assert_eq!(mask.values, get(format!("{}.canvas_mask", case.name)).await, "{}: outpainting mask", case.name);
                (canvas, mask)
            }
            None => (image.clone(), mask.clone()),
        };
        let params = case.params(image, mask);
        let first = if case.unet == "inpaint" { &inpaint } else { &base };
        let second = case.refiner_start.map(|_| &refiner);
        let out = generate(gpu, first, second, &params, |_| {}).await.unwrap();
        let want = get(format!("{}.latents", case.name)).await;
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let latent_err = max_abs(&gpu.read(&out.latents).await.unwrap(), &want) / scale;
        let db = psnr(&gpu.read(&out.image).await.unwrap(), &get(format!("{}.image", case.name)).await);
        eprintln!("{} {:?}: final latents rel err {latent_err:.2e}, image PSNR {db:.1} dB", case.name, gpu.dtype);
        assert!(latent_err <= latent_tol, "{}: latents relative error {latent_err} ({:?})", case.name, gpu.dtype);
        assert!(db >= min_psnr, "{}: image PSNR {db:.1} dB < {min_psnr} ({:?})", case.name, gpu.dtype);
    }
}

/// tests/fixtures/reference/`name` decoded, as a mask (one channel) or RGB.
async fn reference_png(name: &str, mask: bool) -> Pixels {
    decode_png_pixels(&fixture("reference").read(name).await.unwrap(), mask).unwrap()
}

/// init_96x64.png as RGB and as PIL's grey (`convert("L")`).
async fn init_rgb_and_gray() -> (Pixels, Pixels) {
    let image = reference_png("init_96x64.png", false).await;
    let gray = image.data.chunks_exact(3).map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8).collect();
    let gray = Pixels::new(96, 64, 1, gray).unwrap();
    (image, gray)
}

/// PIL's Lanczos resize (what diffusers' image processor crops and pastes with), byte for byte.
#[test]
fn resize_is_pils() {
    pollster::block_on(async {
        let (cases, refs) = references().await;
        let (image, gray) = init_rgb_and_gray().await;
        for (i, (kind, width, height, area)) in cases.resizes.iter().enumerate() {
            let source = if kind == "gray" { &gray } else { &image };
            let area = area.unwrap_or([0.0, 0.0, 96.0, 64.0]);
            let got = resize(source, *width, *height, area);
            let key = format!("resize.{i}");
            let shape = refs.shape(&key).unwrap().to_vec();
            let want: Vec<u8> = refs.host(&key, &shape).await.unwrap().iter().map(|&v| v as u8).collect();
            let off = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(got.data.len(), want.len(), "{key}: size");
            assert_eq!(off, 0, "{key}: {kind} to {width}x{height} box {area:?}: {off} bytes differ from PIL's");
        }
    })
}

/// PIL's `GaussianBlur` (diffusers' `VaeImageProcessor.blur`, for soft mask edges), byte for byte,
/// on a grey photo-like image and a mask, from a fraction of a pixel to wider than the image.
#[test]
fn blur_is_pils() {
    pollster::block_on(async {
        let (cases, refs) = references().await;
        let (_, gray) = init_rgb_and_gray().await;
        let mask = reference_png("mask_96x64.png", true).await;
        assert_eq!((mask.width, mask.height, mask.channels), (96, 64, 1));
        assert!(!cases.blurs.is_empty());
        let mut failures = vec![];
        for (i, &radius) in cases.blurs.iter().enumerate() {
            for (kind, source) in [("gray", &gray), ("mask", &mask)] {
                let key = format!("blur.{i}.{kind}");
                let want: Vec<u8> = refs.host(&key, &[64, 96]).await.unwrap_or_else(|_| panic!("{key} missing (rerun ref_inpaint.py)")).iter().map(|&v| v as u8).collect();
                let got = gaussian_blur(source, radius).unwrap();
                assert_eq!((got.width, got.height, got.channels), (96, 64, 1), "{key}: shape");
                let off = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
                let worst = got.data.iter().zip(&want).map(|(&a, &b)| a.abs_diff(b)).max().unwrap();
                eprintln!("{key}: radius {radius}: {off} bytes differ from PIL's (at most by {worst})");
                if off != 0 {
                    failures.push(format!("{key} (radius {radius}): {off} bytes differ, at most by {worst}"));
                }
            }
        }
        // The padding-crop fixture's mask is diffusers' blur(mask, 4) of a box.
        let blurred = reference_png("mask_blurred_150x110.png", true).await;
        let boxed = Pixels::new(150, 110, 1, (0..150 * 110).map(|i| if (84..110).contains(&(i % 150)) && (30..52).contains(&(i / 150)) { 255 } else { 0 }).collect()).unwrap();
        let off = gaussian_blur(&boxed, 4.0).unwrap().data.iter().zip(&blurred.data).filter(|(a, b)| a != b).count();
        if off != 0 {
            failures.push(format!("mask_blurred_150x110.png: {off} bytes differ"));
        }
        assert!(failures.is_empty(), "not PIL's GaussianBlur: {failures:#?}");
    })
}

/// diffusers' `padding_mask_crop`: the crop around a blurred mask of a larger image, inpainted at
/// the run's size and pasted back through the soft mask.
async fn padding_mask_crop_matches_diffusers(gpu: &Gpu) {
    let (cases, refs) = references().await;
    let original = reference_png("init_150x110.png", false).await;
    let mask = reference_png("mask_blurred_150x110.png", true).await;
    assert!(mask.data.iter().any(|&v| v > 0 && v < 255), "the fixture mask is soft");
    for case in &cases.crops {
        let model = load(gpu, case.model()).await;
        let (width, height, padding) = (case.width.unwrap(), case.height.unwrap(), case.padding.unwrap());
        let run = crop_for_run(&original, &mask, width, height, padding).unwrap();
        let region = refs.host(&format!("{}.region", case.name), &[4]).await.unwrap();
        assert_eq!(run.region.map(|v| v as f32).to_vec(), region, "{}: crop region", case.name);
        let [x1, y1, x2, y2] = run.region;
        let params = case.params(run.image.clone(), run.mask.clone());
        let out = generate(gpu, &model, None, &params, |_| {}).await.unwrap();
        let pasted = run.paste_back(&gpu.read(&out.image).await.unwrap());
        let want = refs.host(&format!("{}.image", case.name), &[3, 110, 150]).await.unwrap();
        let got = pasted.to_init_image().rgb;
        let db = psnr(&got, &want);
        // Outside the region the original comes back exactly.
        let outside = (0..110 * 150).filter(|i| !((x1..x2).contains(&(i % 150)) && (y1..y2).contains(&(i / 150))));
        assert!(outside.clone().all(|i| (0..3).all(|c| got[c * 110 * 150 + i] == want[c * 110 * 150 + i])), "{}: outside the crop", case.name);
        eprintln!("{} {:?}: region {:?}, image PSNR {db:.1} dB", case.name, gpu.dtype, run.region);
        let min = if gpu.dtype == DType::F32 { 45.0 } else { 40.0 };
        assert!(db >= min, "{}: image PSNR {db:.1} dB < {min}", case.name);
    }
}

async fn bad_masks_and_models_are_refused(gpu: &Gpu) {
    let files = fixture("reference");
    let image = decode_png(&files.read("init_96x64.png").await.unwrap()).unwrap();
    let mask = decode_mask_png(&files.read("mask_96x64.png").await.unwrap()).unwrap();
    let base = load(gpu, "tiny-sdxl-base").await;
    let inpaint = load(gpu, "tiny-sdxl-inpaint").await;
    let refiner = load(gpu, "tiny-sdxl-refiner").await;
    let params = GenerateParams {
        prompt: "a lighthouse".into(),
        width: 96,
        height: 64,
        steps: 4,
        init_image: Some(image.clone()),
        mask: Some(mask.clone()),
        strength: INPAINT_STRENGTH,
        ..Default::default()
    };
    let refused = |result: sdxl::Result<_>, what: &str, needle: &str| match result {
        Err(Error::InvalidParameter(m)) => assert!(m.contains(needle), "{what}: {m}"),
        Err(e) => panic!("{what}: {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    let other_size = Mask { width: 64, height: 64, values: vec![1.0; 64 * 64] };
    refused(generate(gpu, &base, None, &GenerateParams { mask: Some(other_size), ..params.clone() }, |_| {}).await.map(|_| ()), "mask size", "same size");
    let soft = Mask { values: mask.values.iter().map(|v| v * 0.7).collect(), ..mask.clone() };
    refused(generate(gpu, &base, None, &GenerateParams { mask: Some(soft), ..params.clone() }, |_| {}).await.map(|_| ()), "non-binary mask", "binary");
    refused(generate(gpu, &base, None, &GenerateParams { init_image: None, ..params.clone() }, |_| {}).await.map(|_| ()), "mask alone", "init image");
    // An inpainting UNet needs the mask; a refiner must be an ordinary UNet.
    let text = GenerateParams { init_image: None, mask: None, ..params.clone() };
    refused(generate(gpu, &inpaint, None, &text, |_| {}).await.map(|_| ()), "inpainting UNet without a mask", "inpainting UNet");
    refused(generate(gpu, &base, Some(&inpaint), &params, |_| {}).await.map(|_| ()), "inpainting UNet as the refiner", "refiner");
    // A coloured mask, a mask buffer of the wrong length or channel count.
    let red: Vec<u8> = (0..96 * 64).flat_map(|_| [200, 10, 10]).collect();
    refused(mask_from_pixels(96, 64, 3, &red).map(|_| ()), "coloured mask", "black and white");
    refused(mask_from_pixels(96, 64, 3, &red[..100]).map(|_| ()), "short mask", "bytes");
    refused(mask_from_pixels(96, 64, 5, &red).map(|_| ()), "5-channel mask", "channels");
    refused(outpaint_canvas(&image, [9000, 0, 0, 0], 0).map(|_| ()), "huge outpainting", "too large");
    // Refused before any GPU work: the next valid run still works.
    let out = generate(gpu, &base, Some(&refiner), &params, |_| {}).await.unwrap();
    assert_eq!(out.image.shape(), [1, 3, 64, 96]);
}

#[test]
fn outpainting_canvas_overlaps_the_seam() {
    let image = InitImage { width: 4, height: 2, rgb: (0..24).map(|v| v as f32 / 24.0).collect() };
    let (canvas, mask) = outpaint_canvas(&image, [2, 0, 0, 1], 1).unwrap();
    assert_eq!((canvas.width, canvas.height), (6, 3));
    // The new columns repeat the first column, the new row the last row.
    assert_eq!(&canvas.rgb[..6], &[0.0, 0.0, 0.0, 1.0 / 24.0, 2.0 / 24.0, 3.0 / 24.0]);
    assert_eq!(&canvas.rgb[12..18], &canvas.rgb[6..12]);
    #[rustfmt::skip]
    assert_eq!(mask.values, [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    ]);
}
