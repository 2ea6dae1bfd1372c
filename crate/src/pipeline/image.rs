//! Images out of a generation: 8-bit RGB as diffusers rounds it, PNG files that carry their recipe
//! (AUTOMATIC1111's `parameters` text, which image viewers and web UIs read back), and the cheap
//! latent → RGB previews shown while a run goes.

use crate::error::{Error, Result};
use crate::pipeline::crop::Pixels;
use crate::pipeline::generate::{GenerateParams, InitImage, Mask, MAX_PIXELS, MAX_SIDE};

/// RGB [1, 3, H, W] in 0..1 to interleaved 8-bit RGB, rounding as diffusers' numpy_to_pil
/// ((x * 255).round(), half to even).
pub fn rgb8(image: &[f32], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    (0..plane).flat_map(|i| (0..3).map(move |c| (image[c * plane + i].clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)).collect()
}

/// RGB [1, 3, H, W] in 0..1 to opaque RGBA bytes (an ImageData's), rounded as [`rgb8`].
pub fn rgba8(image: &[f32], height: usize, width: usize) -> Vec<u8> {
    rgb8(image, height, width).chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect()
}

/// The recipe in AUTOMATIC1111's `parameters` format: the prompt, `Negative prompt: ...`, then
/// `Key: value` pairs. `sampler` is the sampler's A1111 name ([`crate::scheduler::Scheduler::name`]);
/// `model` and `refiner` name the models as the user chose them; each LoRA the run used is a
/// `<lora:name:weight>` tag in the prompt (added after it unless the prompt has it) and an entry
/// of `Lora hashes`, as A1111 writes them.
pub fn parameters(p: &GenerateParams, sampler: &str, model: &str, refiner: Option<&str>, loras: &[LoraRecipe]) -> String {
    let mut text = p.prompt.clone();
    let tagged = |name: &str| p.prompt.contains(&format!("<lora:{name}:")) || p.prompt.contains(&format!("<lora:{name}>"));
    for lora in loras.iter().filter(|l| !tagged(&l.name)) {
        text += &format!(" <lora:{}:{}>", lora.name, lora.weight);
    }
    if let Some(negative) = p.negative.as_deref().filter(|n| !n.is_empty()) {
        text += &format!("\nNegative prompt: {negative}");
    }
    text += &format!(
        "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        p.steps, p.guidance, p.seed, p.width, p.height
    );
    if let Some(spacing) = p.timestep_spacing {
        text += &format!(", Timestep spacing: {}", spacing.name());
    }
    if p.init_image.is_some() {
        text += &format!(", Denoising strength: {}", p.strength);
    }
    if p.mask.is_some() {
        text += ", Inpaint: masked";
    }
    if p.prompt_options.long_prompt {
        text += ", Long prompt: chunked";
    }
    if p.prompt_options.weighting {
        text += ", Prompt weighting: on";
    }
    if let Some(refiner) = refiner {
        text += &format!(", Refiner: {refiner}, Refiner switch at: {}", p.refiner_start);
    }
    if !loras.is_empty() {
        let hashes: Vec<String> = loras.iter().map(|l| format!("{}: {}", l.name, l.hash)).collect();
        text += &format!(", Lora hashes: \"{}\"", hashes.join(", "));
    }
    text + &format!(", Version: sdxl-webgpu {}", env!("CARGO_PKG_VERSION"))
}

/// `recipe` (from [`parameters`]) with an A1111 `Key: value` entry before its closing `Version`:
/// e.g. `VAE: TAESD` when another decoder made the final image, `Masked area padding: 32` for
/// a run on a crop around the mask.
pub fn with_entry(recipe: String, key: &str, value: &str) -> String {
    match recipe.rfind(", Version: ") {
        Some(at) => format!("{}, {key}: {value}{}", &recipe[..at], &recipe[at..]),
        None => format!("{recipe}, {key}: {value}"),
    }
}

/// A LoRA as a recipe names it: its name (the file's stem), weight and A1111 short hash
/// (`LoraFile::short_hash`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRecipe {
    pub name: String,
    pub weight: f32,
    pub hash: String,
}

/// An 8-bit RGB PNG with `parameters` as its `parameters` text chunk: tEXt when the text is
/// Latin-1 (as A1111 writes it), iTXt (UTF-8) otherwise, as PIL does.
pub fn encode_png(rgb: &[u8], width: usize, height: usize, parameters: &str) -> Result<Vec<u8>> {
    let error = |e: png::EncodingError| Error::InvalidParameter(format!("cannot encode a {width}x{height} PNG: {e}"));
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let (key, text) = ("parameters".to_string(), parameters.to_string());
    if parameters.chars().all(|c| (c as u32) < 256) {
        encoder.add_text_chunk(key, text).map_err(error)?;
    } else {
        encoder.add_itxt_chunk(key, text).map_err(error)?;
    }
    let mut writer = encoder.write_header().map_err(error)?;
    writer.write_image_data(rgb).map_err(error)?;
    writer.finish().map_err(error)?;
    Ok(out)
}

/// Decodes a PNG (any bit depth and colour type) to an img2img [`InitImage`] (see
/// [`image_from_pixels`]). Its size is checked against what a run takes ([`MAX_SIDE`],
/// [`MAX_PIXELS`]) before anything is decoded: a few hundred bytes of PNG can claim gigapixels.
pub fn decode_png(bytes: &[u8]) -> Result<InitImage> {
    let (width, height, channels, pixels) = decode_pixels(bytes)?;
    image_from_pixels(width, height, channels, &pixels)
}

/// Decodes an inpainting mask PNG (see [`mask_from_pixels`]).
pub fn decode_mask_png(bytes: &[u8]) -> Result<Mask> {
    let (width, height, channels, pixels) = decode_pixels(bytes)?;
    mask_from_pixels(width, height, channels, &pixels)
}

/// Interleaved 8-bit pixels (grey, grey + alpha, RGB or RGBA: `channels` 1 to 4) to an
/// [`InitImage`]: grey is replicated to RGB and alpha dropped (what PIL's `convert("RGB")` gives
/// diffusers), values v / 255.
pub fn image_from_pixels(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<InitImage> {
    let plane = check_pixels(width, height, channels, pixels, "image")?;
    let mut rgb = vec![0f32; 3 * plane];
    for (i, pixel) in pixels.chunks_exact(channels).enumerate() {
        for c in 0..3 {
            rgb[c * plane + i] = pixel[if channels < 3 { 0 } else { c }] as f32 / 255.0;
        }
    }
    Ok(InitImage { width, height, rgb })
}

/// Interleaved 8-bit pixels to an inpainting [`Mask`]: white repaints, black keeps. Grey levels
/// are binarized at 0.5 and alpha is dropped, as diffusers' mask processor does (PIL's
/// `convert("L")`, then `>= 0.5`).
pub fn mask_from_pixels(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<Mask> {
    let gray = gray_pixels(width, height, channels, pixels)?;
    Ok(Mask::from_gray(width, height, gray.data.iter().map(|&v| v as f32 / 255.0)))
}

/// Interleaved 8-bit pixels as one grey channel (PIL's `convert("L")`, alpha dropped): what a
/// mask is before it is binarized. A coloured pixel is refused: a mask is black and white, and
/// a colour photo given as the mask is a mistake worth naming.
pub fn gray_pixels(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<Pixels> {
    check_pixels(width, height, channels, pixels, "mask")?;
    let mut gray = Vec::with_capacity(width * height);
    for (i, pixel) in pixels.chunks_exact(channels).enumerate() {
        let level = match channels {
            1 | 2 => pixel[0],
            _ => {
                let (r, g, b) = (pixel[0] as u32, pixel[1] as u32, pixel[2] as u32);
                if r.max(g).max(b) - r.min(g).min(b) > 32 {
                    return Err(Error::InvalidParameter(format!(
                        "the mask must be black and white (grey): pixel ({}, {}) is the colour ({r}, {g}, {b})",
                        i % width,
                        i / width
                    )));
                }
                ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
            }
        };
        gray.push(level);
    }
    Pixels::new(width, height, 1, gray)
}

/// Interleaved 8-bit pixels as RGB (grey replicated, alpha dropped).
pub fn rgb_pixels(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<Pixels> {
    check_pixels(width, height, channels, pixels, "image")?;
    let rgb = pixels.chunks_exact(channels).flat_map(|p| if channels < 3 { [p[0]; 3] } else { [p[0], p[1], p[2]] }).collect();
    Pixels::new(width, height, 3, rgb)
}

/// A PNG's pixels as RGB ([`rgb_pixels`]), or as a grey mask ([`gray_pixels`]).
pub fn decode_png_pixels(bytes: &[u8], gray: bool) -> Result<Pixels> {
    let (width, height, channels, pixels) = decode_pixels(bytes)?;
    match gray {
        true => gray_pixels(width, height, channels, &pixels),
        false => rgb_pixels(width, height, channels, &pixels),
    }
}

/// Checks a pixel buffer's size; its pixel count.
fn check_pixels(width: usize, height: usize, channels: usize, pixels: &[u8], what: &str) -> Result<usize> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS {
        return Err(Error::InvalidParameter(format!("the {what} is {width}x{height}: images are 1 to {MAX_SIDE} on a side and at most {} megapixels", MAX_PIXELS >> 20)));
    }
    if !(1..=4).contains(&channels) || pixels.len() != width * height * channels {
        return Err(Error::InvalidParameter(format!("the {what} has {} bytes, not {width} x {height} x {channels} channels (1 to 4)", pixels.len())));
    }
    Ok(width * height)
}

/// A PNG's 8-bit pixels: (width, height, channels, interleaved samples); 16-bit samples keep
/// their top 8 bits, palettes are expanded.
fn decode_pixels(bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    let error = |e: png::DecodingError| Error::InvalidParameter(format!("not a readable PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(error)?;
    let (width, height) = (reader.info().width as usize, reader.info().height as usize);
    if width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS {
        return Err(Error::InvalidParameter(format!("the PNG is {width}x{height}: images are at most {MAX_SIDE} on a side and {} megapixels", MAX_PIXELS >> 20)));
    }
    // Deflate inflates a byte to at most 1032: pixels the image data cannot hold are refused
    // before their buffer is allocated (a 100-byte PNG may claim 16 megapixels).
    let stored = (width * height) as u64 * reader.info().bits_per_pixel() as u64;
    let compressed = idat_bytes(bytes);
    if stored.div_ceil(8) > 1032 * compressed {
        return Err(Error::InvalidParameter(format!("the PNG claims {width}x{height} pixels, more than its {compressed} bytes of image data can hold (truncated?)")));
    }
    let mut buffer = vec![0; reader.output_buffer_size().ok_or_else(|| Error::InvalidParameter("PNG too large".into()))?];
    let frame = reader.next_frame(&mut buffer).map_err(error)?;
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(Error::InvalidParameter("PNG palette was not expanded".into())),
    };
    buffer.truncate(frame.buffer_size());
    Ok((frame.width as usize, frame.height as usize, channels, buffer))
}

/// Bytes of compressed image data (IDAT chunks) in a PNG, as its chunk lengths give them, at most
/// the file's length.
fn idat_bytes(png: &[u8]) -> u64 {
    let mut total = 0u64;
    let mut at = 8usize; // the signature
    while let Some(chunk) = at.checked_add(8).and_then(|end| png.get(at..end)) {
        let length = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
        if &chunk[4..] == b"IDAT" {
            total += length as u64;
        }
        at = at.saturating_add(12).saturating_add(length);
    }
    total.min(png.len() as u64)
}

/// SDXL's latent channels → RGB: the linear fit ComfyUI uses for its SDXL previews (rows are the
/// 4 latent channels; then the bias).
const SDXL_LATENT_RGB: [[f32; 3]; 4] = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]];
const SDXL_LATENT_RGB_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// A preview of latents [1, C, h, w] as RGBA bytes at latent resolution (h × w): SDXL's linear
/// latent → RGB map for 4 channels, the channel mean as grey for other latent spaces.
pub fn latent_preview(latents: &[f32], channels: usize, height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    let byte = |v: f32| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
    (0..plane)
        .flat_map(|i| {
            let channel = |c: usize| latents[c * plane + i];
            let rgb = if channels == 4 {
                std::array::from_fn(|k| SDXL_LATENT_RGB_BIAS[k] + (0..4).map(|c| channel(c) * SDXL_LATENT_RGB[c][k]).sum::<f32>())
            } else {
                [(0..channels).map(channel).sum::<f32>() / channels.max(1) as f32; 3]
            };
            [byte(rgb[0]), byte(rgb[1]), byte(rgb[2]), 255]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::prompt::PromptOptions;
    use crate::scheduler::TimestepSpacing;

    fn decode(png_bytes: &[u8]) -> (Vec<u8>, png::Info<'static>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes.to_vec())).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut buf).unwrap();
        buf.truncate(frame.buffer_size());
        (buf, reader.info().clone())
    }

    /// A PNG whose header claims `width` × `height` RGB pixels, with 16 bytes of data.
    fn claimed(width: u32, height: u32) -> Vec<u8> {
        let crc = |bytes: &[u8]| {
            let mut c = !0u32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        };
        let mut out = vec![137, 80, 78, 71, 13, 10, 26, 10];
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let body = [kind, data].concat();
            out.extend(&body);
            out.extend(crc(&body).to_be_bytes());
        };
        chunk(b"IHDR", &[&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat());
        chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        chunk(b"IEND", &[]);
        out
    }

    #[test]
    fn huge_pngs_are_refused_before_decoding() {
        for (w, h) in [(60_000, 60_000), (8200, 8), (8192, 4104)] {
            let bytes = claimed(w, h);
            assert!(bytes.len() < 100_000);
            let err = decode_png(&bytes).unwrap_err();
            assert!(err.to_string().contains(&format!("{w}x{h}")) && err.to_string().contains("at most"), "{err}");
        }
        let mut small = Vec::new();
        let mut encoder = png::Encoder::new(&mut small, 64, 64);
        encoder.set_color(png::ColorType::Rgb);
        encoder.write_header().unwrap().write_image_data(&[0; 3 * 64 * 64]).unwrap();
        assert_eq!(decode_png(&small).unwrap().rgb, vec![0.0; 3 * 64 * 64], "a small image decodes");
    }

    #[test]
    fn recipe_is_a1111_parameters() {
        let p = GenerateParams { prompt: "a fox".into(), negative: Some("blurry".into()), width: 1152, height: 896, steps: 30, guidance: 7.5, seed: 42, ..Default::default() };
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            parameters(&p, "Euler", "base-q4", Some("refiner-q4"), &[]),
            format!("a fox\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 1152x896, Model: base-q4, Refiner: refiner-q4, Refiner switch at: 0.8, Version: sdxl-webgpu {version}")
        );
        let p = GenerateParams { prompt: "x".into(), negative: Some(String::new()), guidance: 5.0, ..Default::default() };
        assert_eq!(parameters(&p, "Euler", "m", None, &[]), format!("x\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 0, Size: 1024x1024, Model: m, Version: sdxl-webgpu {version}"));
        let loras = [LoraRecipe { name: "ink".into(), weight: 0.8, hash: "0123456789ab".into() }, LoraRecipe { name: "fox".into(), weight: -0.5, hash: "ba9876543210".into() }];
        assert_eq!(
            parameters(&p, "Euler", "m", None, &loras),
            format!("x <lora:ink:0.8> <lora:fox:-0.5>\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 0, Size: 1024x1024, Model: m, Lora hashes: \"ink: 0123456789ab, fox: ba9876543210\", Version: sdxl-webgpu {version}")
        );
        let p = GenerateParams {
            prompt: "x".into(),
            timestep_spacing: Some(TimestepSpacing::Trailing),
            guidance: 0.0,
            steps: 4,
            prompt_options: PromptOptions { long_prompt: true, weighting: true },
            ..Default::default()
        };
        assert_eq!(
            parameters(&p, "Euler a", "turbo", None, &[]),
            format!(
                "x\nSteps: 4, Sampler: Euler a, CFG scale: 0, Seed: 0, Size: 1024x1024, Model: turbo, Timestep spacing: trailing, \
                 Long prompt: chunked, Prompt weighting: on, Version: sdxl-webgpu {version}"
            )
        );
        let plain = GenerateParams { prompt: "x, Version: 1".into(), ..Default::default() };
        assert_eq!(
            with_entry(parameters(&plain, "Euler", "m", None, &[]), "VAE", "TAESD"),
            format!("x, Version: 1\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 0, Size: 1024x1024, Model: m, VAE: TAESD, Version: sdxl-webgpu {version}")
        );
    }

    #[test]
    fn png_keeps_pixels_and_recipe() {
        let rgb: Vec<u8> = (0..3 * 5 * 3).map(|i| (i * 17 % 256) as u8).collect();
        for recipe in ["plain latin-1: café", "unicode: 狐 🦊"] {
            let (pixels, info) = decode(&encode_png(&rgb, 5, 3, recipe).unwrap());
            assert_eq!(pixels, rgb);
            let latin1: Vec<_> = info.uncompressed_latin1_text.iter().map(|t| (t.keyword.as_str(), t.text.as_str())).collect();
            let utf8: Vec<_> = info.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap())).collect();
            if recipe.starts_with("plain") {
                assert_eq!((latin1, utf8.len()), (vec![("parameters", recipe)], 0));
            } else {
                assert_eq!((latin1.len(), utf8), (0, vec![("parameters".to_string(), recipe.to_string())]));
            }
        }
    }

    #[test]
    fn rgb8_rounds_like_diffusers() {
        // [1, 3, 1, 2]: planes to interleaved, clamped, half to even as numpy's round.
        let image = [0.0, 1.5, 0.5 / 255.0, 1.5 / 255.0, -1.0, 254.5 / 255.0];
        assert_eq!(rgb8(&image, 1, 2), vec![0, 0, 0, 255, 2, 254]);
    }

    #[test]
    fn preview_maps_latents_to_rgb() {
        // One pixel: zero latents give the bias; channel 0 = 1 adds its row.
        let rgba = latent_preview(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 4, 1, 2);
        let byte = |v: f32| (((v + 1.0) / 2.0) * 255.0).round() as u8;
        assert_eq!(&rgba[..4], &[byte(0.1084), byte(-0.0175), byte(-0.0011), 255]);
        assert_eq!(&rgba[4..], &[byte(0.1084 + 0.3651), byte(-0.0175 + 0.4232), byte(-0.0011 + 0.4341), 255]);
        // Two channels (not SDXL's latent space): their mean as grey.
        assert_eq!(latent_preview(&[0.5, -0.5, 1.0, 1.0], 2, 1, 2), vec![223, 223, 223, 255, 159, 159, 159, 255]);
    }
}
