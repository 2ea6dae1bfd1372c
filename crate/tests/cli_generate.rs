#![cfg(not(target_arch = "wasm32"))]
//! `sdxl generate` end to end on the second, differently-sized tiny pipeline
//! (tests/fixtures/generate_alt.py: other text widths and head dims, other UNet widths / heads /
//! depths / group counts, a 3-level VAE with a latent downscale of 4), against diffusers' runs with
//! the same seeds; and the errors it prints for bad parameters.

mod common;

use common::{copy_tree, max_abs, psnr, read_all, sdxl, Case, TempDir};
use std::path::Path;
use std::process::Output;
use std::time::Instant;

use sdxl::weights::{DirSource, FileTensors};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-alt-base");
const REFINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-alt-refiner");
const INIT_IMAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference/init_96x64.png");

fn case(name: &str) -> Case {
    Case::load("alt_pipeline_cases.json").into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name} in alt_pipeline_cases.json"))
}

/// diffusers' tensor `key` of reference/alt_pipeline.safetensors, checked to have `shape`.
fn reference(key: &str, shape: &[usize]) -> Vec<f32> {
    let source = DirSource::new(format!("{FIXTURES}/reference"));
    pollster::block_on(async {
        let weights = FileTensors::open(&source, vec!["alt_pipeline.safetensors".into()]).await.unwrap();
        weights.host(key, shape).await.unwrap_or_else(|e| panic!("reference {key} with shape {shape:?}: {e}"))
    })
}


/// The PNG as (width, height, RGB8 bytes, its `parameters` text).
fn read_png(path: &str) -> (u32, u32, Vec<u8>, Option<String>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}")));
    let mut reader = png::Decoder::new(file).read_info().unwrap_or_else(|e| panic!("{path} does not decode: {e}"));
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG buffer size")];
    let info = reader.next_frame(&mut buf).unwrap_or_else(|e| panic!("{path} does not decode: {e}"));
    assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight), "{path}: pixel format");
    buf.truncate(info.buffer_size());
    let text = reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone());
    (info.width, info.height, buf, text)
}

/// The generate command line of a case, without --out / --tensors-out.
fn case_args(c: &Case) -> Vec<String> {
    let mut args: Vec<String> = ["generate", "--model", BASE, "--prompt", &c.prompt].iter().map(|s| s.to_string()).collect();
    if let Some(negative) = &c.negative {
        args.extend(["--negative".into(), negative.clone()]);
    }
    if let Some(start) = c.refiner_start {
        args.extend(["--refiner".into(), REFINER.into(), "--refiner-start".into(), start.to_string()]);
    }
    for (flag, value) in [
        ("--width", c.width.to_string()),
        ("--height", c.height.to_string()),
        ("--steps", c.steps.to_string()),
        ("--guidance", c.guidance.to_string()),
        ("--seed", c.seed.to_string()),
        ("--precision", "f32".into()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    args
}

/// Runs `sdxl generate` for the case and compares its PNG and tensors with diffusers'.
fn check_case(name: &str) {
    let c = case(name);
    let dir = TempDir::new(name);
    let (png_path, tensors_path) = (dir.file("x.png"), dir.file("x.safetensors"));
    let mut args = case_args(&c);
    args.extend(["--out".into(), png_path.clone(), "--tensors-out".into(), tensors_path.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let run = sdxl(&args);
    let seconds = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "sdxl {args:?} failed ({:?}):\n{stderr}", run.status);
    let steps_reported = stderr.lines().filter(|l| l.contains(" step ")).count();
    assert_eq!(steps_reported, c.steps, "{name}: step lines in stderr:\n{stderr}");

    let got = read_all(&dir.0, "x.safetensors");
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(names, ["image", "latents", "noise"], "{name}: tensors written");
    let latent_shape = [1, 4, c.height / 4, c.width / 4];
    let (noise_shape, noise) = &got["noise"];
    let (latents_shape, latents) = &got["latents"];
    let (image_shape, image) = &got["image"];
    assert_eq!(noise_shape, &latent_shape, "{name}: noise shape (VAE downscale 4)");
    assert_eq!(latents_shape, &latent_shape, "{name}: latents shape");
    assert_eq!(image_shape, &[1, 3, c.height, c.width], "{name}: image shape");

    let noise_err = max_abs(noise, &reference(&format!("{name}.noise"), noise_shape));
    assert!(noise_err <= 1e-5, "{name}: noise max |Δ| {noise_err} > 1e-5");
    let want = reference(&format!("{name}.latents"), latents_shape);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let latent_err = max_abs(latents, &want) / scale;
    assert!(latent_err <= 1e-3, "{name}: latents relative error {latent_err} > 1e-3 (max |ref| {scale})");
    let db = psnr(image, &reference(&format!("{name}.image"), image_shape));
    assert!(db >= 45.0, "{name}: image PSNR {db:.1} dB < 45 dB");

    // The PNG is the tensors' image, rounded as diffusers' numpy_to_pil.
    let (w, h, rgb, recipe) = read_png(&png_path);
    assert_eq!((w as usize, h as usize), (c.width, c.height), "{name}: PNG size");
    let recipe = recipe.unwrap_or_else(|| panic!("{name}: the PNG has no parameters text"));
    let settings = format!("Steps: {}, Sampler: Euler, CFG scale: {}, Seed: {}, Size: {}x{}, Model: tiny-sdxl-alt-base", c.steps, c.guidance, c.seed, c.width, c.height);
    assert!(recipe.starts_with(&c.prompt) && recipe.contains(&settings), "{name}: PNG recipe {recipe:?} lacks {settings:?}");
    if let Some(negative) = &c.negative {
        assert!(recipe.contains(&format!("\nNegative prompt: {negative}\n")), "{name}: PNG recipe {recipe:?} lacks the negative prompt");
    }
    let plane = c.width * c.height;
    let mut worst = 0i32;
    for i in 0..plane {
        for ch in 0..3 {
            let want = (image[ch * plane + i].clamp(0.0, 1.0) * 255.0).round() as i32;
            worst = worst.max((rgb[i * 3 + ch] as i32 - want).abs());
        }
    }
    assert!(worst <= 1, "{name}: PNG pixels differ from round(image * 255) by up to {worst} levels");
    eprintln!(
        "{name} ({}x{}, {} steps): noise max |Δ| {noise_err:.1e}, latents rel err {latent_err:.2e}, image PSNR {db:.1} dB, \
         PNG max level diff {worst}, {seconds:.1} s",
        c.width, c.height, c.steps
    );
}

#[test]
fn alt_base_only_matches_diffusers() {
    check_case("alt_base_only");
}

#[test]
fn alt_base_to_refiner_matches_diffusers() {
    check_case("alt_split");
}

#[test]
fn alt_size_the_unets_do_not_divide_matches_diffusers() {
    check_case("alt_odd_size");
}

#[test]
fn alt_cases_are_the_expected_ones() {
    let cases = Case::load("alt_pipeline_cases.json");
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["alt_base_only", "alt_split", "alt_odd_size"]);
    for c in &cases {
        assert!(c.width % 8 == 0 && c.height % 8 == 0, "{c:?}");
        assert!(c.negative.is_some() && c.steps > 0, "{c:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad parameters: a clean failure (non-zero exit, not a panic), an `error:` line naming the problem,
// and no image written.
// ---------------------------------------------------------------------------------------------

/// `sdxl generate` on the alt base (with the alt refiner when `refiner` is set), 4 steps at 64x64,
/// with `extra` options appended (a later option overrides an earlier one).
fn generate_with(dir: &TempDir, refiner: Option<&str>, extra: &[&str]) -> Output {
    let out = dir.file("x.png");
    let mut args = vec!["generate", "--model", BASE, "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "4"];
    args.extend(["--precision", "f32", "--out", &out]);
    if let Some(r) = refiner {
        args.extend(["--refiner", r]);
    }
    args.extend(extra);
    sdxl(&args)
}

/// Why `run` is not a clean refusal (a non-zero exit, not a panic, an `error:` line containing
/// every needle, and no output image), if it is not one.
fn refusal_problem(dir: &TempDir, run: &Output, needles: &[&str]) -> Option<String> {
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !matches!(run.status.code(), Some(c) if c != 0 && c != 101) {
        return Some(format!("exit status {:?} (0 = success, 101 = panic); stderr:\n{stderr}", run.status));
    }
    if stderr.contains("panicked") {
        return Some(format!("panic:\n{stderr}"));
    }
    let Some(line) = stderr.lines().find(|l| l.starts_with("error:")) else {
        return Some(format!("no 'error:' line in:\n{stderr}"));
    };
    if let Some(needle) = needles.iter().find(|needle| !line.contains(*needle)) {
        return Some(format!("{line:?} does not mention {needle:?}"));
    }
    Path::new(&dir.file("x.png")).exists().then(|| format!("an image was written despite {line:?}"))
}

/// Asserts a clean failure with an `error:` line containing every needle, and no output image.
fn assert_fails_with(dir: &TempDir, run: &Output, needles: &[&str]) {
    if let Some(problem) = refusal_problem(dir, run, needles) {
        panic!("{problem}");
    }
}

/// Bad options given to `generate_with` (with the alt refiner where `refiner`), each refused with an
/// error line mentioning its needles: (name, refiner, options, needles).
const BAD_OPTIONS: &[(&str, bool, &[&str], &[&str])] = &[
    ("zero_steps", false, &["--steps", "0"], &["steps", "at least 1"]),
    ("non_numeric_steps", false, &["--steps", "abc"], &["--steps", "abc"]),
    ("width_not_a_multiple_of_8", false, &["--width", "100"], &["width", "multiples of", "100"]),
    ("height_not_a_multiple_of_8", true, &["--height", "60"], &["height", "multiples of 8", "60"]),
    // Refused before allocating.
    ("huge_size", false, &["--width", "1000000000", "--height", "1000000000"], &["1000000000x1000000000", "too large", "8192"]),
    ("over_16_megapixels", false, &["--width", "8192", "--height", "4104"], &["8192x4104", "16 megapixels"]),
    ("refiner_start_above_1", true, &["--refiner-start", "1.5"], &["refiner start", "1.5", "(0, 1)"]),
    ("refiner_start_0", true, &["--refiner-start", "0"], &["refiner start", "0", "(0, 1)"]),
    ("unknown_scheduler", false, &["--scheduler", "euler_b"], &["scheduler", "euler_b", "dpmpp_2m_karras"]),
    ("unknown_timestep_spacing", false, &["--timestep-spacing", "uniform"], &["spacing", "uniform", "trailing"]),
    ("strength_above_1", false, &["--init-image", INIT_IMAGE, "--width", "96", "--strength", "1.5"], &["strength", "1.5", "(0, 1]"]),
    ("strength_0", false, &["--init-image", INIT_IMAGE, "--width", "96", "--strength", "0"], &["strength", "0", "(0, 1]"]),
    ("strength_negative", false, &["--init-image", INIT_IMAGE, "--width", "96", "--strength", "-0.2"], &["strength", "-0.2", "(0, 1]"]),
    ("strength_without_init_image", false, &["--strength", "0.5"], &["--strength needs --init-image"]),
    // generate_with asks for 64x64; the image is 96x64.
    ("init_image_of_the_wrong_size", false, &["--init-image", INIT_IMAGE], &["init image is 96x64", "64x64"]),
];

#[test]
fn bad_options_are_refused() {
    let mut failures = vec![];
    for &(name, refiner, options, needles) in BAD_OPTIONS {
        let dir = TempDir::new(name);
        let run = generate_with(&dir, refiner.then_some(REFINER), options);
        if let Some(problem) = refusal_problem(&dir, &run, needles) {
            failures.push(format!("{name} ({options:?}): {problem}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}


#[test]
fn refiner_without_unet() {
    let dir = TempDir::new("refiner-no-unet");
    let refiner = dir.0.join("refiner");
    copy_tree(Path::new(REFINER), &refiner, "unet");
    let refiner = refiner.display().to_string();
    let run = generate_with(&dir, Some(&refiner), &["--refiner-start", "0.7"]);
    assert_fails_with(&dir, &run, &[&refiner, "unet"]);
}

#[test]
fn missing_prompt() {
    let dir = TempDir::new("no-prompt");
    let out = dir.file("x.png");
    let run = sdxl(&["generate", "--model", BASE, "--width", "64", "--height", "64", "--steps", "2", "--out", &out]);
    assert_fails_with(&dir, &run, &["--prompt is required"]);
}

// ---------------------------------------------------------------------------------------------
// Samplers and img2img on the command line (the tiny pipeline of tests/fixtures/ref_samplers.py).
// ---------------------------------------------------------------------------------------------

const TINY_REFINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-refiner");

/// The refiner alone refines an image (SDEdit) with DPM++ 2M: the image diffusers' img2img pipeline
/// gives for the same seed, and a recipe naming the sampler and the strength.
#[test]
fn refiner_sdedit_from_png_matches_diffusers() {
    let dir = TempDir::new("sdedit");
    let (png, tensors) = (dir.file("x.png"), dir.file("x.safetensors"));
    let run = sdxl(&[
        "generate", "--refiner", TINY_REFINER, "--init-image", INIT_IMAGE, "--strength", "0.5", "--scheduler", "dpmpp_2m",
        "--steps", "4", "--seed", "10", "--guidance", "5", "--prompt", "a lighthouse on a cliff at dawn", "--negative", "blurry",
        "--precision", "f32", "--out", &png, "--tensors-out", &tensors,
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains(" step ")).count(), 2, "int(4 * 0.5) steps:\n{stderr}");
    let refs = pollster::block_on(async {
        let source = DirSource::new(format!("{FIXTURES}/reference"));
        let weights = FileTensors::open(&source, vec!["samplers.safetensors".into()]).await.unwrap();
        weights.host("sdedit.dpmpp_2m.image", &[1, 3, 64, 96]).await.unwrap()
    });
    let (_, image) = &read_all(&dir.0, "x.safetensors")["image"];
    let db = psnr(image, &refs);
    assert!(db >= 45.0, "SDEdit image PSNR {db:.1} dB");
    let (w, h, _, recipe) = read_png(&png);
    assert_eq!((w, h), (96, 64), "img2img runs at the image's size");
    let recipe = recipe.unwrap();
    assert!(recipe.contains("Sampler: DPM++ 2M,") && recipe.contains("Denoising strength: 0.5"), "{recipe}");
    eprintln!("SDEdit (refiner alone, DPM++ 2M, strength 0.5): image PSNR {db:.1} dB");
}

#[test]
fn init_image_not_a_png() {
    let dir = TempDir::new("init-not-png");
    let fake = dir.file("fake.png");
    std::fs::write(&fake, b"not a png at all").unwrap();
    assert_fails_with(&dir, &generate_with(&dir, None, &["--init-image", &fake]), &["--init-image", "fake.png", "PNG"]);
}

#[test]
fn refiner_alone_without_init_image() {
    let dir = TempDir::new("refiner-alone");
    let out = dir.file("x.png");
    let run = sdxl(&["generate", "--refiner", REFINER, "--prompt", "a cat", "--out", &out]);
    assert_fails_with(&dir, &run, &["--refiner without --model needs --init-image"]);
}

// ---------------------------------------------------------------------------------------------
// Inpainting and outpainting on the command line (tests/fixtures/ref_inpaint.py).
// ---------------------------------------------------------------------------------------------

const TINY_BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-base");
const TINY_INPAINT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-sdxl-inpaint");
const MASK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference/mask_96x64.png");

fn inpaint_reference(key: &str, shape: &[usize]) -> Vec<f32> {
    let source = DirSource::new(format!("{FIXTURES}/reference"));
    pollster::block_on(async {
        let weights = FileTensors::open(&source, vec!["inpaint.safetensors".into()]).await.unwrap();
        weights.host(key, shape).await.unwrap_or_else(|e| panic!("reference {key}: {e}"))
    })
}

/// `sdxl generate` with the prompt and negative of ref_inpaint.py, f32, `args` appended; the image tensor.
fn inpaint_run(dir: &TempDir, args: &[&str]) -> (Vec<f32>, String) {
    let (png, tensors) = (dir.file("x.png"), dir.file("x.safetensors"));
    let mut all = vec!["generate", "--prompt", "a lighthouse on a cliff at dawn", "--negative", "blurry", "--precision", "f32", "--out", &png, "--tensors-out", &tensors];
    all.extend(args);
    let run = sdxl(&all);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (_, _, _, recipe) = read_png(&png);
    (read_all(&dir.0, "x.safetensors")["image"].1.clone(), recipe.unwrap())
}

#[test]
fn inpainting_and_outpainting_from_pngs_match_diffusers() {
    let dir = TempDir::new("inpaint");
    // The inpainting UNet at the default strength (0.9999).
    let (image, recipe) = inpaint_run(&dir, &["--model", TINY_INPAINT, "--init-image", INIT_IMAGE, "--mask", MASK, "--steps", "5", "--seed", "12"]);
    let db = psnr(&image, &inpaint_reference("inpaint9.euler.image", &[1, 3, 64, 96]));
    assert!(db >= 45.0, "inpainting UNet: image PSNR {db:.1} dB");
    assert!(recipe.contains("Denoising strength: 0.9999") && recipe.contains("Inpaint: masked"), "{recipe}");
    // The ordinary base extending the canvas by 16, 8, 16, 8 pixels.
    let (image, _) = inpaint_run(&dir, &["--model", TINY_BASE, "--init-image", INIT_IMAGE, "--outpaint", "16,8,16,8", "--steps", "5", "--seed", "18"]);
    let db2 = psnr(&image, &inpaint_reference("outpaint4.euler.image", &[1, 3, 80, 128]));
    assert!(db2 >= 45.0, "outpainting: image PSNR {db2:.1} dB");
    eprintln!("CLI inpainting {db:.1} dB, outpainting {db2:.1} dB");
}

/// `--mask-padding` (diffusers' padding_mask_crop): the crop around a blurred mask of a 150x110
/// image, run at 64x64, pasted back: the PNG is diffusers' image, at the original's size.
#[test]
fn inpainting_a_crop_around_the_mask_matches_diffusers() {
    let dir = TempDir::new("inpaint-crop");
    let png = dir.file("x.png");
    let image = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference/init_150x110.png");
    let mask = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/reference/mask_blurred_150x110.png");
    let run = sdxl(&[
        "generate", "--model", TINY_BASE, "--init-image", image, "--mask", mask, "--mask-padding", "8", "--width", "64", "--height", "64",
        "--steps", "4", "--seed", "22", "--prompt", "a lighthouse on a cliff at dawn", "--negative", "blurry", "--precision", "f32", "--out", &png,
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (w, h, rgb, recipe) = read_png(&png);
    assert_eq!((w, h), (150, 110), "the result has the original's size");
    let plane = 150 * 110;
    let got: Vec<f32> = (0..3 * plane).map(|k| rgb[(k % plane) * 3 + k / plane] as f32 / 255.0).collect();
    let db = psnr(&got, &inpaint_reference("crop4.euler.image", &[3, 110, 150]));
    assert!(db >= 45.0, "crop around the mask: PSNR {db:.1} dB");
    assert!(recipe.unwrap().contains("Size: 64x64, Model: tiny-sdxl-base, Denoising strength: 0.9999, Inpaint: masked, Masked area padding: 8, Version"));
    // The same run from the sharp box and --mask-blur 4 (the fixture's mask is PIL's blur of it).
    let sharp = dir.file("box.png");
    let mut encoder = png::Encoder::new(std::fs::File::create(&sharp).unwrap(), 150, 110);
    encoder.set_color(png::ColorType::Grayscale);
    let pixels: Vec<u8> = (0..150 * 110).map(|i| if (84..110).contains(&(i % 150)) && (30..52).contains(&(i / 150)) { 255 } else { 0 }).collect();
    encoder.write_header().unwrap().write_image_data(&pixels).unwrap();
    let blurred = dir.file("blurred.png");
    let run = sdxl(&[
        "generate", "--model", TINY_BASE, "--init-image", image, "--mask", &sharp, "--mask-blur", "4", "--mask-padding", "8", "--width", "64", "--height", "64",
        "--steps", "4", "--seed", "22", "--prompt", "a lighthouse on a cliff at dawn", "--negative", "blurry", "--precision", "f32", "--out", &blurred,
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(read_png(&blurred).2, rgb, "--mask-blur 4 of the box is the fixture's blurred mask");
    let dir2 = TempDir::new("inpaint-crop-bad");
    let out = dir2.file("x.png");
    let bad = sdxl(&["generate", "--model", TINY_BASE, "--prompt", "x", "--init-image", image, "--mask-padding", "8", "--out", &out]);
    assert_fails_with(&dir2, &bad, &["--mask-padding needs --init-image and --mask"]);
    let bad = sdxl(&["generate", "--model", TINY_BASE, "--prompt", "x", "--init-image", image, "--mask", mask, "--mask-blur", "-3", "--out", &out]);
    assert_fails_with(&dir2, &bad, &["--mask-blur", "radius"]);
    eprintln!("CLI crop around the mask: {db:.1} dB");
}

#[test]
fn bad_masks_are_refused() {
    let dir = TempDir::new("bad-masks");
    let out = dir.file("x.png");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", TINY_BASE, "--prompt", "a cat", "--steps", "2", "--precision", "f32", "--out", &out];
        args.extend(extra);
        sdxl(&args)
    };
    let write_png = |name: &str, width: u32, height: u32, color: png::ColorType, pixels: &[u8]| {
        let path = dir.file(name);
        let mut encoder = png::Encoder::new(std::fs::File::create(&path).unwrap(), width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(pixels).unwrap();
        path
    };
    let small = write_png("small.png", 64, 64, png::ColorType::Grayscale, &[255; 64 * 64]);
    assert_fails_with(&dir, &run(&["--init-image", INIT_IMAGE, "--mask", &small]), &["mask is 64x64", "96x64", "same size"]);
    let red: Vec<u8> = (0..96 * 64).flat_map(|_| [255, 0, 0]).collect();
    let colored = write_png("red.png", 96, 64, png::ColorType::Rgb, &red);
    assert_fails_with(&dir, &run(&["--init-image", INIT_IMAGE, "--mask", &colored]), &["--mask", "red.png", "black and white"]);
    assert_fails_with(&dir, &run(&["--mask", MASK]), &["--mask needs --init-image"]);
    assert_fails_with(&dir, &run(&["--init-image", INIT_IMAGE, "--mask", MASK, "--outpaint", "8,0,0,0"]), &["--outpaint", "leave out --mask"]);
    assert_fails_with(&dir, &run(&["--init-image", INIT_IMAGE, "--outpaint", "8,0"]), &["--outpaint", "LEFT,TOP,RIGHT,BOTTOM"]);
    assert_fails_with(&dir, &run(&["--init-image", INIT_IMAGE, "--outpaint", "4,0,0,0"]), &["multiples of 8", "100x64"]);
    // An inpainting UNet needs a mask.
    let run = sdxl(&["generate", "--model", TINY_INPAINT, "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--out", &out]);
    assert_fails_with(&dir, &run, &["inpainting UNet", "mask"]);
}

// ---------------------------------------------------------------------------------------------
// TAESD-XL as the final decoder (--taesd; tests/fixtures/tiny-taesdxl, 4 latent channels, 8x).
// ---------------------------------------------------------------------------------------------

const TINY_TAESD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-taesdxl");

/// `sdxl generate` on the tiny base, 64x64, 2 steps, f32, `extra` appended; (image tensor, latents, recipe).
fn taesd_run(dir: &TempDir, extra: &[&str]) -> (Vec<f32>, Vec<f32>, String) {
    let (png, tensors) = (dir.file("x.png"), dir.file("x.safetensors"));
    let mut args = vec!["generate", "--model", TINY_BASE, "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"];
    args.extend(["--precision", "f32", "--out", &png, "--tensors-out", &tensors]);
    args.extend(extra);
    let run = sdxl(&args);
    assert!(run.status.success(), "sdxl {args:?}:\n{}", String::from_utf8_lossy(&run.stderr));
    let (w, h, _, recipe) = read_png(&png);
    assert_eq!((w, h), (64, 64), "PNG size");
    let mut tensors = read_all(&dir.0, "x.safetensors");
    std::fs::remove_file(&png).unwrap();
    (tensors.remove("image").unwrap().1, tensors.remove("latents").unwrap().1, recipe.unwrap())
}

/// --taesd (a diffusers folder or its one safetensors file) decodes the same latents into another
/// image than the VAE's, recorded as `VAE: TAESD`.
#[test]
fn taesd_final_decode_writes_a_png() {
    let dir = TempDir::new("taesd");
    let (vae_image, vae_latents, vae_recipe) = taesd_run(&dir, &[]);
    let (image, latents, recipe) = taesd_run(&dir, &["--taesd", TINY_TAESD]);
    let file = format!("{TINY_TAESD}/diffusion_pytorch_model.safetensors");
    let (file_image, _, _) = taesd_run(&dir, &["--taesd", &file]);
    assert_eq!(latents, vae_latents, "--taesd must not change the latents");
    assert!(max_abs(&image, &vae_image) > 1e-2, "the --taesd image equals the VAE's");
    assert!(max_abs(&image, &file_image) <= 1e-6, "the folder and its safetensors file decode alike");
    assert!(recipe.contains(", VAE: TAESD, Version: ") && !vae_recipe.contains("VAE:"), "recipes: {recipe:?} / {vae_recipe:?}");
}

#[test]
fn taesd_bad_path_is_refused() {
    let dir = TempDir::new("taesd-bad");
    let missing = dir.file("nowhere");
    assert_fails_with(&dir, &taesd_refused(&dir, TINY_BASE, &missing), &[&missing, "no such file or folder"]);
    // A folder without a decoder, a safetensors that is not one.
    let reference = format!("{FIXTURES}/reference");
    assert_fails_with(&dir, &taesd_refused(&dir, TINY_BASE, &reference), &["taesdxl_decoder.safetensors"]);
    let unet = format!("{TINY_BASE}/unet/diffusion_pytorch_model.safetensors");
    assert_fails_with(&dir, &taesd_refused(&dir, TINY_BASE, &unet), &["not a TAESD-XL decoder"]);
    // The alt base's VAE downscales 4x; TAESD-XL upscales 8x.
    assert_fails_with(&dir, &taesd_refused(&dir, BASE, TINY_TAESD), &["TAESD", "upscales 8x", "4x"]);
}

fn taesd_refused(dir: &TempDir, model: &str, taesd: &str) -> Output {
    let out = dir.file("x.png");
    sdxl(&["generate", "--model", model, "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--precision", "f32", "--out", &out, "--taesd", taesd])
}
