//! Inpainting a crop around the mask (diffusers' `padding_mask_crop`): the masked region, padded
//! and widened to the run's aspect ratio, is cut out of a larger image, resized to the run's size,
//! inpainted, resized back and pasted over the original, which the (possibly soft) mask blends
//! in. Each step is the PIL operation diffusers' image processor uses, in PIL's integer arithmetic:
//! Lanczos resampling (Resample.c), Gaussian blur (BoxBlur.c), masked paste, premultiplied-alpha
//! conversion and alpha compositing (AlphaComposite.c).

use crate::error::{Error, Result};
use crate::pipeline::generate::{InitImage, Mask, MAX_PIXELS, MAX_SIDE};

/// An 8-bit image, channels interleaved (1: grey, 3: RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Pixels> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE || width * height > MAX_PIXELS || !matches!(channels, 1 | 3) {
            return Err(Error::InvalidParameter(format!("a {width}x{height} image of {channels} channels: images are 1 to {MAX_SIDE} on a side, grey or RGB")));
        }
        if data.len() != width * height * channels {
            return Err(Error::InvalidParameter(format!("{} bytes for a {width}x{height} image of {channels} channels", data.len())));
        }
        Ok(Pixels { width, height, channels, data })
    }

    fn at(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }

    /// PIL's `crop((x1, y1, x2, y2))` within the image.
    fn crop(&self, [x1, y1, x2, y2]: [usize; 4]) -> Pixels {
        let data = (y1..y2).flat_map(|y| self.data[(y * self.width + x1) * self.channels..(y * self.width + x2) * self.channels].iter().copied()).collect();
        Pixels { width: x2 - x1, height: y2 - y1, channels: self.channels, data }
    }

    /// PIL's `paste(tile, (x, y))`: the tile's pixels replace ours where they overlap.
    fn paste(&mut self, tile: &Pixels, x: usize, y: usize) {
        for ty in 0..tile.height.min(self.height.saturating_sub(y)) {
            let n = tile.width.min(self.width.saturating_sub(x)) * self.channels;
            let to = ((y + ty) * self.width + x) * self.channels;
            let from = ty * tile.width * self.channels;
            self.data[to..to + n].copy_from_slice(&tile.data[from..from + n]);
        }
    }

    /// RGB planes in 0..1, as an init image.
    pub fn to_init_image(&self) -> InitImage {
        let plane = self.width * self.height;
        let rgb = (0..3 * plane).map(|k| self.data[(k % plane) * self.channels + if self.channels == 3 { k / plane } else { 0 }] as f32 / 255.0).collect();
        InitImage { width: self.width, height: self.height, rgb }
    }
}

/// PIL's Lanczos-3 kernel.
fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
    if (-3.0..3.0).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

/// Bits of PIL's fixed-point resampling weights (8-bit images).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: for each output position, the first
/// input index and the fixed-point weights of the inputs it reads.
fn coefficients(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = (in1 - in0) / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = in0 + (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax).map(|x| lanczos((x as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    (w * (1u64 << PRECISION_BITS) as f64 + if w < 0.0 { -0.5 } else { 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `resize((width, height), Image.LANCZOS, box=(x0, y0, x1, y1))` of an 8-bit image:
/// horizontal pass then vertical, each rounded to 8 bits, a pass skipped when its axis keeps
/// its size and box.
pub fn resize(image: &Pixels, width: usize, height: usize, [x0, y0, x1, y1]: [f64; 4]) -> Pixels {
    let c = image.channels;
    let horizontal = width != image.width || x0 != 0.0 || x1 != width as f64;
    let vertical = height != image.height || y0 != 0.0 || y1 != height as f64;
    let mut out = image.clone();
    if horizontal {
        let coeffs = coefficients(image.width, x0, x1, width);
        let mut data = Vec::with_capacity(width * out.height * c);
        for y in 0..out.height {
            for (xmin, k) in &coeffs {
                for ch in 0..c {
                    let sum = k.iter().enumerate().fold(1i64 << (PRECISION_BITS - 1), |s, (i, &w)| s + out.at(xmin + i, y)[ch] as i64 * w as i64);
                    data.push(clip8(sum));
                }
            }
        }
        out = Pixels { width, height: out.height, channels: c, data };
    }
    if vertical {
        let coeffs = coefficients(image.height, y0, y1, height);
        let mut data = Vec::with_capacity(width * height * c);
        for (ymin, k) in &coeffs {
            for x in 0..out.width {
                for ch in 0..c {
                    let sum = k.iter().enumerate().fold(1i64 << (PRECISION_BITS - 1), |s, (i, &w)| s + out.at(x, ymin + i)[ch] as i64 * w as i64);
                    data.push(clip8(sum));
                }
            }
        }
        out = Pixels { width: out.width, height, channels: c, data };
    }
    out
}

fn resize_whole(image: &Pixels, width: usize, height: usize) -> Pixels {
    resize(image, width, height, [0.0, 0.0, image.width as f64, image.height as f64])
}

/// diffusers' `get_crop_region(mask, width, height, pad)`: the box (x1, y1, x2, y2) around the
/// mask's non-zero pixels, padded by `pad`, then widened (or heightened) to the run's aspect ratio
/// within the image. An empty mask gives the whole image.
pub fn crop_region(mask: &Pixels, width: usize, height: usize, pad: usize) -> [usize; 4] {
    let (w, h) = (mask.width as i64, mask.height as i64);
    let set = |x: i64, y: i64| mask.at(x as usize, y as usize)[0] != 0;
    let column = |x: i64| (0..h).any(|y| set(x, y));
    let row = |y: i64| (0..w).any(|x| set(x, y));
    let left = (0..w).take_while(|&x| !column(x)).count() as i64;
    let right = (0..w).rev().take_while(|&x| !column(x)).count() as i64;
    let top = (0..h).take_while(|&y| !row(y)).count() as i64;
    let bottom = (0..h).rev().take_while(|&y| !row(y)).count() as i64;
    let pad = pad.min(MAX_SIDE) as i64;
    let (mut x1, mut y1, mut x2, mut y2) = ((left - pad).max(0), (top - pad).max(0), (w - right + pad).min(w), (h - bottom + pad).min(h));
    if x2 <= x1 || y2 <= y1 {
        // No pixel set: diffusers divides by zero here; the whole image is the region.
        (x1, y1, x2, y2) = (0, 0, w, h);
    }
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio = width as f64 / height as f64;
    // Python's // floors.
    let grow = |(mut lo, mut hi): (i64, i64), diff: i64, size: i64| {
        lo -= diff.div_euclid(2);
        hi += diff - diff.div_euclid(2);
        if hi >= size {
            let over = hi - size;
            (lo, hi) = (lo - over, hi - over);
        }
        if lo < 0 {
            (lo, hi) = (0, hi - lo);
        }
        (lo, hi.min(size))
    };
    if ratio_crop > ratio {
        let desired = (x2 - x1) as f64 / ratio;
        (y1, y2) = grow((y1, y2), (desired - (y2 - y1) as f64) as i64, h);
    } else {
        let desired = (y2 - y1) as f64 * ratio;
        (x1, x2) = grow((x1, x2), (desired - (x2 - x1) as f64) as i64, w);
    }
    [x1, y1, x2, y2].map(|v| v.max(0) as usize)
}

/// diffusers' `_resize_and_fill`: resized to fit width × height keeping the aspect ratio,
/// centred, the uncovered bands filled from the resized image's edge rows or columns.
fn resize_and_fill(image: &Pixels, width: usize, height: usize) -> Pixels {
    let (ratio, src_ratio) = (width as f64 / height as f64, image.width as f64 / image.height as f64);
    let src_w = if ratio < src_ratio { width } else { image.width * height / image.height };
    let src_h = if ratio >= src_ratio { height } else { image.height * width / image.width };
    let resized = resize_whole(image, src_w.max(1), src_h.max(1));
    let mut out = Pixels { width, height, channels: image.channels, data: vec![0; width * height * image.channels] };
    let (px, py) = ((width / 2).saturating_sub(src_w / 2), (height / 2).saturating_sub(src_h / 2));
    out.paste(&resized, px, py);
    let (rw, rh) = (resized.width as f64, resized.height as f64);
    if ratio < src_ratio {
        let fill = (height / 2).saturating_sub(src_h / 2);
        if fill > 0 {
            out.paste(&resize(&resized, width, fill, [0.0, 0.0, width as f64, 0.0]), 0, 0);
            out.paste(&resize(&resized, width, fill, [0.0, rh, width as f64, rh]), 0, fill + src_h);
        }
    } else if ratio > src_ratio {
        let fill = (width / 2).saturating_sub(src_w / 2);
        if fill > 0 {
            out.paste(&resize(&resized, fill, height, [0.0, 0.0, 0.0, height as f64]), 0, 0);
            out.paste(&resize(&resized, fill, height, [rw, 0.0, rw, height as f64]), fill + src_w, 0);
        }
    }
    out
}

/// diffusers' `_resize_and_crop`: resized to cover width × height keeping the aspect ratio, centred.
fn resize_and_crop(image: &Pixels, width: usize, height: usize) -> Pixels {
    let (ratio, src_ratio) = (width as f64 / height as f64, image.width as f64 / image.height as f64);
    let src_w = if ratio > src_ratio { width } else { image.width * height / image.height };
    let src_h = if ratio <= src_ratio { height } else { image.height * width / image.width };
    let resized = resize_whole(image, src_w.max(1), src_h.max(1));
    let mut out = Pixels { width, height, channels: image.channels, data: vec![0; width * height * image.channels] };
    // PIL pastes at a negative offset by clipping the tile; these offsets are at most 0.
    let (ox, oy) = ((src_w / 2).saturating_sub(width / 2), (src_h / 2).saturating_sub(height / 2));
    let visible = resized.crop([ox, oy, (ox + width).min(src_w), (oy + height).min(src_h)]);
    out.paste(&visible, (width / 2).saturating_sub(src_w / 2), (height / 2).saturating_sub(src_h / 2));
    out
}

/// What a padding-crop run generates from: the crop box in the original, the crop as the run's
/// init image and its binarized mask, both width × height; and what the result is pasted into.
pub struct CropRun {
    pub region: [usize; 4],
    /// The padding asked for (for the recipe).
    pub padding: usize,
    pub image: InitImage,
    pub mask: Mask,
    original: Pixels,
    soft_mask: Pixels,
}

impl CropRun {
    /// The run's image (RGB planes in 0..1, width × height) pasted back into the original
    /// through the mask as given ([`overlay`]): 8-bit RGB at the original's size.
    pub fn paste_back(&self, image: &[f32]) -> Pixels {
        let (width, height) = (self.image.width, self.image.height);
        let generated = Pixels { width, height, channels: 3, data: crate::pipeline::image::rgb8(image, height, width) };
        overlay(&self.soft_mask, &self.original, &generated, self.region)
    }
}

/// diffusers' preprocessing with `padding_mask_crop=pad`: the crop region of `mask` (grey, the
/// original's size), the image and mask cropped to it and resized to width × height ("fill"),
/// the mask binarized at 0.5.
pub fn crop_for_run(image: &Pixels, mask: &Pixels, width: usize, height: usize, pad: usize) -> Result<CropRun> {
    if (image.width, image.height) != (mask.width, mask.height) || mask.channels != 1 {
        return Err(Error::InvalidParameter(format!("the mask is {}x{} but the image is {}x{}: they must be the same size", mask.width, mask.height, image.width, image.height)));
    }
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::InvalidParameter(format!("a {width}x{height} run: sizes are 1 to {MAX_SIDE} on a side")));
    }
    let region = crop_region(mask, width, height, pad);
    let cropped = resize_and_fill(&image.crop(region), width, height).to_init_image();
    let small = resize_and_fill(&mask.crop(region), width, height);
    let binary = Mask::from_gray(width, height, small.data.iter().map(|&v| v as f32 / 255.0));
    Ok(CropRun { region, padding: pad, image: cropped, mask: binary, original: image.clone(), soft_mask: mask.clone() })
}

/// PIL's integer division by 255, rounded (`DIV255`).
fn div255(v: u32) -> u32 {
    let t = v + 128;
    ((t >> 8) + t) >> 8
}

/// diffusers' `apply_overlay(mask, original, generated, region)`: the generated image (RGB, the
/// run's size) resized into the crop region of a black canvas of the original's size, with the
/// original composited over it where the mask keeps it (a grey mask pixel blends both).
pub fn overlay(mask: &Pixels, original: &Pixels, generated: &Pixels, region: [usize; 4]) -> Pixels {
    let [x, y, x2, y2] = region;
    let mut canvas = Pixels { width: original.width, height: original.height, channels: 3, data: vec![0; original.width * original.height * 3] };
    canvas.paste(&resize_and_crop(generated, x2 - x, y2 - y), x, y);
    let mut out = canvas.clone();
    for (i, pixel) in out.data.chunks_exact_mut(3).enumerate() {
        // The original pasted through the inverted mask into a transparent RGBa image, then
        // converted to RGBA (un-premultiplied), then alpha-composited over the canvas (opaque).
        let keep = 255 - mask.data[i] as u32;
        let alpha = div255(255 * keep);
        if alpha == 0 {
            continue;
        }
        let rgb = original.at(i % original.width, i / original.width);
        let straight = |c: u8| {
            let premultiplied = div255(c as u32 * keep);
            if alpha == 255 { premultiplied } else { (255 * premultiplied / alpha).min(255) }
        };
        // AlphaComposite.c with 7 bits of precision; the canvas's alpha is 255.
        let blend = 255 * (255 - alpha);
        let out_a255 = alpha * 255 + blend;
        let coef1 = alpha * 255 * 255 * (1 << 7) / out_a255;
        let coef2 = 255 * (1 << 7) - coef1;
        let shift = |a: u32| ((a >> 8) + a) >> 8;
        for ch in 0..3 {
            let v = straight(rgb[ch]) * coef1 + pixel[ch] as u32 * coef2;
            pixel[ch] = (shift(v + (0x80 << 7)) >> 7) as u8;
        }
    }
    out
}

/// The largest radius [`gaussian_blur`] takes: far wider than any image, and well within the
/// range where PIL's 32-bit fixed-point sums are exact (box radii below 2^23).
pub const MAX_BLUR_RADIUS: f32 = 1.0e6;

/// Passes of the box blur that approximate PIL's Gaussian.
const BLUR_PASSES: usize = 3;

/// PIL's `_gaussian_blur_radius(radius, 3)` (BoxBlur.c, after Gwosdek et al.): the fractional
/// radius of the extended box filter whose 3 passes approximate a Gaussian of standard deviation
/// `radius`, in C's mix of float and double arithmetic.
fn box_radius(radius: f32) -> f32 {
    let sigma2 = radius * radius / BLUR_PASSES as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One row of PIL's `ImagingHorizontalBoxBlur` (`ImagingLineBoxBlur8`): a box of `2 radius + 1`
/// pixels plus the two next ones weighted by the fraction, the edge pixels repeated outwards, in
/// 8.24 fixed point with C's wrapping `UINT32` arithmetic.
struct LineBlur {
    radius: usize,
    ww: u32,
    fw: u32,
    edge_a: usize,
    edge_b: usize,
}

impl LineBlur {
    fn new(float_radius: f32, size: usize) -> LineBlur {
        // C's (int) and (UINT32) truncate; the radius is below 2^23 here.
        let radius = float_radius as i64;
        let ww = (16_777_216f32 / (float_radius * 2.0 + 1.0)) as u32;
        let fw = (1u32 << 24).wrapping_sub(((radius * 2 + 1) as u32).wrapping_mul(ww)) / 2;
        let edge_a = (radius + 1).min(size as i64) as usize;
        let edge_b = (size as i64 - radius - 1).max(0) as usize;
        LineBlur { radius: radius as usize, ww, fw, edge_a, edge_b }
    }

    fn run(&self, out: &mut [u8], line: &[u8]) {
        let LineBlur { radius, ww, fw, edge_a, edge_b } = *self;
        let last = line.len() - 1;
        let px = |i: usize| line[i] as u32;
        let mut acc = px(0).wrapping_mul(radius as u32 + 1);
        for x in 0..edge_a.saturating_sub(1) {
            acc = acc.wrapping_add(px(x));
        }
        acc = acc.wrapping_add(px(last).wrapping_mul((radius + 1 - edge_a) as u32));
        let mut step = |x: usize, subtract: usize, add: usize, left: usize, right: usize| {
            acc = acc.wrapping_add(px(add)).wrapping_sub(px(subtract));
            let bulk = acc.wrapping_mul(ww).wrapping_add((px(left) + px(right)).wrapping_mul(fw));
            out[x] = (bulk.wrapping_add(1 << 23) >> 24) as u8;
        };
        if edge_a <= edge_b {
            for x in 0..edge_a {
                step(x, 0, x + radius, 0, x + radius + 1);
            }
            for x in edge_a..edge_b {
                step(x, x - radius - 1, x + radius, x - radius - 1, x + radius + 1);
            }
            for x in edge_b..=last {
                step(x, x - radius - 1, last, x - radius - 1, last);
            }
        } else {
            for x in 0..edge_b {
                step(x, 0, x + radius, 0, x + radius + 1);
            }
            for x in edge_b..edge_a {
                step(x, 0, last, 0, last);
            }
            for x in edge_a..=last {
                step(x, x - radius - 1, last, x - radius - 1, last);
            }
        }
    }
}

/// 3 passes of PIL's horizontal box blur over each row of a `width`-wide plane.
fn blur_rows(plane: &mut [u8], width: usize, float_radius: f32) {
    let blur = LineBlur::new(float_radius, width);
    let mut line = vec![0; width];
    for row in plane.chunks_exact_mut(width) {
        for _ in 0..BLUR_PASSES {
            blur.run(&mut line, row);
            row.copy_from_slice(&line);
        }
    }
}

fn transpose(plane: &[u8], width: usize, height: usize) -> Vec<u8> {
    (0..width * height).map(|i| plane[(i % height) * width + i / height]).collect()
}

/// PIL's `filter(ImageFilter.GaussianBlur(radius))` (what diffusers' `VaeImageProcessor.blur`
/// does to masks), byte for byte with Pillow 13.0 (BoxBlur.c): 3 passes of an extended box
/// filter along the rows, then 3 along the columns, each rounded to 8 bits; each channel on its
/// own. Radius 0 returns the image; a radius must be finite, 0 to [`MAX_BLUR_RADIUS`] (PIL
/// takes a negative one as its absolute value).
pub fn gaussian_blur(image: &Pixels, radius: f32) -> Result<Pixels> {
    if !(0.0..=MAX_BLUR_RADIUS).contains(&radius) {
        return Err(Error::InvalidParameter(format!("a blur radius of {radius}: radii are 0 to {MAX_BLUR_RADIUS}")));
    }
    let (w, h, c) = (image.width, image.height, image.channels);
    if image.data.len() != w * h * c {
        return Err(Error::InvalidParameter(format!("{} bytes for a {w}x{h} image of {c} channels", image.data.len())));
    }
    let box_radius = box_radius(radius);
    if box_radius == 0.0 || image.data.is_empty() {
        return Ok(image.clone());
    }
    let mut out = image.clone();
    for ch in 0..c {
        let mut plane: Vec<u8> = image.data.iter().skip(ch).step_by(c).copied().collect();
        blur_rows(&mut plane, w, box_radius);
        let mut columns = transpose(&plane, w, h);
        blur_rows(&mut columns, h, box_radius);
        for (o, v) in out.data.iter_mut().skip(ch).step_by(c).zip(transpose(&columns, h, w)) {
            *o = v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(width: usize, height: usize, f: impl Fn(usize, usize) -> u8) -> Pixels {
        Pixels::new(width, height, 1, (0..width * height).map(|i| f(i % width, i / width)).collect()).unwrap()
    }

    #[test]
    fn crop_region_widens_to_the_run_ratio() {
        // A 10x4 box at (20, 30) in a 100x80 mask; a square run widens its height to 10.
        let mask = gray(100, 80, |x, y| ((20..30).contains(&x) && (30..34).contains(&y)) as u8 * 255);
        assert_eq!(crop_region(&mask, 64, 64, 0), [20, 27, 30, 37]);
        // Padding, clamped at the image's edges, then widened within the image.
        assert_eq!(crop_region(&mask, 64, 64, 25), [0, 5, 55, 60]);
        // An empty mask: the whole image.
        assert_eq!(crop_region(&gray(16, 8, |_, _| 0), 8, 8, 0), [0, 0, 16, 8]);
    }

    #[test]
    fn resize_keeps_constant_images_and_identity() {
        let flat = gray(13, 7, |_, _| 77);
        assert!(resize_whole(&flat, 5, 11).data.iter().all(|&v| v == 77));
        let ramp = gray(9, 9, |x, y| (x * 20 + y) as u8);
        assert_eq!(resize_whole(&ramp, 9, 9), ramp);
    }

    #[test]
    fn gaussian_blur_keeps_identity_and_constants() {
        let ramp = gray(11, 7, |x, y| (x * 23 + y * 5) as u8);
        assert_eq!(gaussian_blur(&ramp, 0.0).unwrap(), ramp);
        assert_eq!(gaussian_blur(&ramp, -0.0).unwrap(), ramp);
        for radius in [0.3, 1.5, 4.0, 33.0, 5000.0, MAX_BLUR_RADIUS] {
            let flat = gray(13, 6, |_, _| 201);
            assert_eq!(gaussian_blur(&flat, radius).unwrap(), flat, "radius {radius}");
            let rgb = Pixels::new(5, 9, 3, (0..5 * 9).flat_map(|_| [0, 128, 255]).collect()).unwrap();
            assert_eq!(gaussian_blur(&rgb, radius).unwrap(), rgb, "radius {radius}");
        }
        // A blur spreads a dot; a 1x1 image keeps its pixel.
        let dot = gray(9, 9, |x, y| if (x, y) == (4, 4) { 255 } else { 0 });
        let blurred = gaussian_blur(&dot, 1.0).unwrap();
        assert!(blurred.data[4 * 9 + 4] < 255 && blurred.data[4 * 9 + 3] > 0 && blurred.data[3 * 9 + 4] > 0);
        assert_eq!(gaussian_blur(&gray(1, 1, |_, _| 9), 2.0).unwrap().data, [9]);
        // RGB: each channel as its grey image.
        let rgb = Pixels::new(9, 9, 3, dot.data.iter().flat_map(|&v| [v, 255 - v, v / 2]).collect()).unwrap();
        let out = gaussian_blur(&rgb, 2.5).unwrap();
        for (ch, f) in [|v: u8| v, |v: u8| 255 - v, |v: u8| v / 2].iter().enumerate() {
            let plane = Pixels::new(9, 9, 1, dot.data.iter().map(|&v| f(v)).collect()).unwrap();
            let want = gaussian_blur(&plane, 2.5).unwrap().data;
            assert_eq!(out.data.iter().skip(ch).step_by(3).copied().collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn gaussian_blur_refuses_bad_radii() {
        let image = gray(4, 4, |x, _| x as u8);
        for radius in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, -1e-9, 1.01e6, f32::MAX] {
            assert!(matches!(gaussian_blur(&image, radius), Err(Error::InvalidParameter(_))), "radius {radius}");
        }
    }
}
