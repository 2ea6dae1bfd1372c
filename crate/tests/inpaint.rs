//! Inpainting and outpainting against diffusers' StableDiffusionXLInpaintPipeline
//! (reference/inpaint.safetensors, written by tests/fixtures/ref_inpaint.py): a 9-channel
//! inpainting UNet and the ordinary 4-channel base (blended with the noised original each step),
//! at diffusers' default strength, a lower one and 1 (pure noise), outpainted canvases, and the
//! refiner taking over; the mask is a grey PNG with soft edges that both sides binarize. Then the
//! bad inputs: masks of another size, coloured or non-binary, and UNets that do not fit.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{max_abs, psnr};
use sdxl::pipeline::generate::{generate, outpaint_canvas, GenerateParams, Mask, SdxlModel, INPAINT_STRENGTH};
use sdxl::pipeline::image::{decode_mask_png, decode_png, mask_from_pixels};
use sdxl::quant::QuantPreset;
use sdxl::weights::{DirSource, FileTensors, Source};
use sdxl::{DType, Error, Gpu};
use serde::Deserialize;

gpu_tests!(inpainting_matches_diffusers, bad_masks_and_models_are_refused);

fn fixture(dir: &str) -> DirSource {
    DirSource::new(format!("{}/../tests/fixtures/{dir}", env!("CARGO_MANIFEST_DIR")))
}

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
}

async fn load(gpu: &Gpu, dir: &str) -> SdxlModel {
    SdxlModel::load(gpu, &common::folder(gpu, fixture(dir)), &QuantPreset::F16.policy()).await.unwrap()
}

async fn inpainting_matches_diffusers(gpu: &Gpu) {
    let files = fixture("reference");
    let refs = FileTensors::open(&files, vec!["inpaint.safetensors".into()]).await.unwrap();
    let get = |key: String| {
        let refs = &refs;
        async move {
            let shape = refs.shape(&key).unwrap_or_else(|_| panic!("{key} missing (rerun ref_inpaint.py)")).to_vec();
            refs.host(&key, &shape).await.unwrap()
        }
    };
    let cases: Vec<Case> = serde_json::from_slice(&files.read("inpaint_cases.json").await.unwrap()).unwrap();
    let image = decode_png(&files.read("init_96x64.png").await.unwrap()).unwrap();
    let mask = decode_mask_png(&files.read("mask_96x64.png").await.unwrap()).unwrap();
    let repainted = mask.values.iter().filter(|&&v| v == 1.0).count();
    assert!(repainted > 500 && repainted < 96 * 64 / 2, "the fixture mask repaints {repainted} pixels");
    let base = load(gpu, "tiny-sdxl-base").await;
    let inpaint = load(gpu, "tiny-sdxl-inpaint").await;
    let refiner = load(gpu, "tiny-sdxl-refiner").await;
    // f32 as the issue states; f16 storage rounds every activation.
    let (latent_tol, min_psnr) = if gpu.dtype == DType::F32 { (1e-3, 45.0) } else { (2e-2, 40.0) };
    for case in &cases {
        let (image, mask) = match case.outpaint {
            Some(pad) => {
                let (canvas, mask) = outpaint_canvas(&image, pad, 0).unwrap();
                assert_eq!(canvas.rgb, get(format!("{}.canvas", case.name)).await, "{}: outpainting canvas", case.name);
                assert_eq!(mask.values, get(format!("{}.canvas_mask", case.name)).await, "{}: outpainting mask", case.name);
                (canvas, mask)
            }
            None => (image.clone(), mask.clone()),
        };
        let params = GenerateParams {
            prompt: "a lighthouse on a cliff at dawn".into(),
            negative: Some("blurry".into()),
            width: image.width,
            height: image.height,
            steps: case.steps,
            guidance: case.guidance,
            seed: case.seed,
            refiner_start: case.refiner_start.unwrap_or(0.8),
            scheduler: Some(case.sampler.parse().unwrap()),
            init_image: Some(image),
            mask: Some(mask),
            strength: case.strength.unwrap_or(INPAINT_STRENGTH),
            ..Default::default()
        };
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
        steps: 2,
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
    let image = sdxl::pipeline::generate::InitImage { width: 4, height: 2, rgb: (0..24).map(|v| v as f32 / 24.0).collect() };
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
