//! ggml's K-quants (ggml-common.h, `QK_K` = 256), kept as GGUF files store them: each row is cut
//! into super-blocks of 256 values, each block self-contained (codes and scales together).
//!
//! | format | block bytes (GPU) | layout (byte offsets)                                   | value                          |
//! |--------|-------------------|---------------------------------------------------------|--------------------------------|
//! | Q2_K   | 84                | scales[16] @0, qs[64] @16, d @80, dmin @82              | d·(sc&15)·q − dmin·(sc>>4)     |
//! | Q3_K   | 110 (+2 → 112)    | hmask[32] @0, qs[64] @32, scales[12] @96, d @108        | d·(sc−32)·(q − 4·!hbit)        |
//! | Q4_K   | 144               | d @0, dmin @2, scales[12] @4, qs[128] @16               | d·sc·q − dmin·m                |
//! | Q5_K   | 176               | d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48   | d·sc·q − dmin·m                |
//! | Q6_K   | 210 (+2 → 212)    | ql[128] @0, qh[64] @128, scales[16] (i8) @192, d @208   | d·sc·(q − 32)                  |
//!
//! (d, dmin f16.) Q2_K, Q3_K and Q6_K scale sub-blocks of 16 values, Q4_K and Q5_K sub-blocks
//! of 32 with 6-bit scales and mins. Q3_K's and Q6_K's blocks are padded with two zero bytes to
//! whole u32 words, the kernels' unit of reading (+1.8 % and +1.0 %); the others are stored
//! byte for byte. Bits per weight on the GPU: 2.625, 3.5, 4.5, 5.5, 6.625.
//!
//! [`dequantize_block`] is ggml's `dequantize_row_*_K` (same f32 operations in the same order,
//! so bit-identical to ggml and gguf-py); shaders/gemm.wgsl decodes the same way.
//! [`quantize_block`] is a plain reference quantizer (scales from each sub-block's range, no
//! search): what tests write files with, not ggml's `quantize_row_*_K_ref`.

use half::f16;

use super::QuantFormat;

/// Values per K-quant block.
pub const SUPER: usize = 256;

/// Bytes of one block as GGUF stores it.
pub(crate) fn ggml_bytes(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q2_K => 84,
        QuantFormat::Q3_K => 110,
        QuantFormat::Q4_K => 144,
        QuantFormat::Q5_K => 176,
        QuantFormat::Q6_K => 210,
        _ => unreachable!("{format:?} is not a K-quant"),
    }
}

/// A block's f16 super-scales (d, and dmin where the format has one).
pub(crate) fn scales(format: QuantFormat, b: &[u8]) -> Vec<f16> {
    let at = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
    match format {
        QuantFormat::Q2_K => vec![at(80), at(82)],
        QuantFormat::Q3_K => vec![at(108)],
        QuantFormat::Q4_K | QuantFormat::Q5_K => vec![at(0), at(2)],
        QuantFormat::Q6_K => vec![at(208)],
        _ => unreachable!("{format:?} is not a K-quant"),
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K's and Q5_K's 6-bit (scale, min) of sub-block j (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q3_K's 6-bit scale s (0..16) from its 12 packed bytes.
fn q3_scale(s: usize, packed: &[u8]) -> i32 {
    let low = if s < 8 { packed[s] & 0xF } else { packed[s - 8] >> 4 };
    let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
    (low | high << 4) as i32 - 32
}

/// The 256 values of one block (`b`: its GGUF bytes, padding allowed after them).
pub fn dequantize_block(format: QuantFormat, b: &[u8]) -> [f32; SUPER] {
    let mut y = [0f32; SUPER];
    match format {
        QuantFormat::Q2_K => {
            let (d, dmin) = (half_at(b, 80), half_at(b, 82));
            for (i, y) in y.iter_mut().enumerate() {
                let (n, r) = (i / 128, i % 128);
                let (j, half) = (r / 32, (r % 32) / 16);
                let l = r % 16 + 16 * half;
                let sc = b[8 * n + 2 * j + half];
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                let q = (b[16 + 32 * n + l] >> (2 * j)) & 3;
                *y = dl * q as f32 - ml;
            }
        }
        QuantFormat::Q3_K => {
            let d = half_at(b, 108);
            for (i, y) in y.iter_mut().enumerate() {
                let (n, r) = (i / 128, i % 128);
                let (j, half) = (r / 32, (r % 32) / 16);
                let l = r % 16 + 16 * half;
                let dl = d * q3_scale(8 * n + 2 * j + half, &b[96..108]) as f32;
                let low = ((b[32 + 32 * n + l] >> (2 * j)) & 3) as i32;
                let high = (b[l] >> (4 * n + j)) & 1;
                *y = dl * (low - if high == 1 { 0 } else { 4 }) as f32;
            }
        }
        QuantFormat::Q4_K | QuantFormat::Q5_K => {
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let qs = if format == QuantFormat::Q4_K { &b[16..144] } else { &b[48..176] };
            for (i, y) in y.iter_mut().enumerate() {
                let (chunk, l) = (i / 64, i % 64);
                let sub = 2 * chunk + l / 32;
                let byte = qs[32 * chunk + l % 32];
                let mut q = if l < 32 { byte & 0xF } else { byte >> 4 };
                if format == QuantFormat::Q5_K {
                    q |= ((b[16 + l % 32] >> sub) & 1) << 4;
                }
                let (sc, m) = scale_min_k4(sub, &b[4..16]);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                *y = d1 * q as f32 - m1;
            }
        }
        QuantFormat::Q6_K => {
            let d = half_at(b, 208);
            for (i, y) in y.iter_mut().enumerate() {
                let (n, r) = (i / 128, i % 128);
                let (part, l) = (r / 32, r % 32);
                let ql = b[64 * n + l + 32 * (part % 2)];
                let low = if part < 2 { ql & 0xF } else { ql >> 4 };
                let high = (b[128 + 32 * n + l] >> (2 * part)) & 3;
                let q = (low | high << 4) as i32 - 32;
                let sc = b[192 + 8 * n + l / 16 + 2 * part] as i8;
                *y = d * sc as f32 * q as f32;
            }
        }
        _ => unreachable!("{format:?} is not a K-quant"),
    }
    y
}

/// Rounds `v / step` to the nearest code in `lo..=hi` (0 where the step is 0).
fn code(v: f32, step: f32, lo: i32, hi: i32) -> i32 {
    if step == 0.0 {
        return 0i32.clamp(lo, hi);
    }
    ((v / step).round() as i32).clamp(lo, hi)
}

/// Sub-block scales and mins of an affine K-quant: per sub-block, step = (max − min)/levels and
/// offset = −min (min ≤ 0), then both quantized to `bits` against the block's d and dmin.
fn affine(x: &[f32], sub: usize, levels: f32, bits: u32) -> (f16, f16, Vec<u8>, Vec<u8>) {
    let top = ((1u32 << bits) - 1) as f32;
    let (steps, offsets): (Vec<f32>, Vec<f32>) = x
        .chunks(sub)
        .map(|c| {
            let lo = c.iter().fold(0f32, |m, &v| m.min(v));
            let hi = c.iter().fold(lo, |m, &v| m.max(v));
            ((hi - lo) / levels, -lo)
        })
        .unzip();
    let d = f16::from_f32(steps.iter().fold(0f32, |m, &v| m.max(v)) / top);
    let dmin = f16::from_f32(offsets.iter().fold(0f32, |m, &v| m.max(v)) / top);
    let sc = steps.iter().map(|&s| code(s, d.to_f32(), 0, top as i32) as u8).collect();
    let m = offsets.iter().map(|&o| code(o, dmin.to_f32(), 0, top as i32) as u8).collect();
    (d, dmin, sc, m)
}

/// Sub-block scales of a symmetric K-quant whose codes span `lo..=hi`: per sub-block the value
/// of largest magnitude maps to `lo`, the scales quantized to `lo_s..=hi_s` against d.
fn symmetric(x: &[f32], sub: usize, lo: i32, (lo_s, hi_s): (i32, i32)) -> (f16, Vec<i32>) {
    let steps: Vec<f32> = x.chunks(sub).map(|c| c.iter().fold(0f32, |e, &v| if v.abs() > e.abs() { v } else { e }) / lo as f32).collect();
    let d = f16::from_f32(steps.iter().fold(0f32, |m, &v| m.max(v.abs())) / hi_s as f32);
    (d, steps.iter().map(|&s| code(s, d.to_f32(), lo_s, hi_s)).collect())
}

/// Appends one block of 256 finite values in `format`'s GGUF bytes (see the module docs: a
/// reference quantizer for tests, not ggml's).
pub fn quantize_block(format: QuantFormat, x: &[f32], out: &mut Vec<u8>) {
    debug_assert_eq!(x.len(), SUPER);
    let start = out.len();
    out.resize(start + ggml_bytes(format), 0);
    let b = &mut out[start..];
    match format {
        QuantFormat::Q2_K => {
            let (d, dmin, sc, m) = affine(x, 16, 3.0, 4);
            for s in 0..16 {
                b[s] = sc[s] | m[s] << 4;
            }
            b[80..82].copy_from_slice(&d.to_le_bytes());
            b[82..84].copy_from_slice(&dmin.to_le_bytes());
            for (i, &v) in x.iter().enumerate() {
                let (n, r) = (i / 128, i % 128);
                let (j, half) = (r / 32, (r % 32) / 16);
                let s = 8 * n + 2 * j + half;
                let q = code(v + dmin.to_f32() * m[s] as f32, d.to_f32() * sc[s] as f32, 0, 3) as u8;
                b[16 + 32 * n + r % 16 + 16 * half] |= q << (2 * j);
            }
        }
        QuantFormat::Q3_K => {
            let (d, sc) = symmetric(x, 16, -4, (-32, 31));
            for (s, &v) in sc.iter().enumerate() {
                let v = (v + 32) as u8;
                b[96 + s % 8] |= (v & 0xF) << if s < 8 { 0 } else { 4 };
                b[96 + 8 + s % 4] |= (v >> 4) << (2 * (s / 4));
            }
            b[108..110].copy_from_slice(&d.to_le_bytes());
            for (i, &v) in x.iter().enumerate() {
                let (n, r) = (i / 128, i % 128);
                let (j, half) = (r / 32, (r % 32) / 16);
                let l = r % 16 + 16 * half;
                let q = code(v, d.to_f32() * sc[8 * n + 2 * j + half] as f32, -4, 3) + 4;
                b[32 + 32 * n + l] |= ((q & 3) as u8) << (2 * j);
                b[l] |= ((q >> 2) as u8) << (4 * n + j);
            }
        }
        QuantFormat::Q4_K | QuantFormat::Q5_K => {
            let five = format == QuantFormat::Q5_K;
            let (d, dmin, sc, m) = affine(x, 32, if five { 31.0 } else { 15.0 }, 6);
            b[0..2].copy_from_slice(&d.to_le_bytes());
            b[2..4].copy_from_slice(&dmin.to_le_bytes());
            for j in 0..8 {
                if j < 4 {
                    b[4 + j] = sc[j];
                    b[8 + j] = m[j];
                } else {
                    b[8 + j] = (sc[j] & 0xF) | (m[j] & 0xF) << 4;
                    b[4 + j - 4] |= (sc[j] >> 4) << 6;
                    b[4 + j] |= (m[j] >> 4) << 6;
                }
            }
            let qs = if five { 48 } else { 16 };
            for (i, &v) in x.iter().enumerate() {
                let (chunk, l) = (i / 64, i % 64);
                let sub = 2 * chunk + l / 32;
                let q = code(v + dmin.to_f32() * m[sub] as f32, d.to_f32() * sc[sub] as f32, 0, if five { 31 } else { 15 }) as u8;
                b[qs + 32 * chunk + l % 32] |= (q & 0xF) << if l < 32 { 0 } else { 4 };
                if five {
                    b[16 + l % 32] |= (q >> 4) << sub;
                }
            }
        }
        QuantFormat::Q6_K => {
            let (d, sc) = symmetric(x, 16, -32, (-127, 127));
            for (s, &v) in sc.iter().enumerate() {
                b[192 + s] = v as i8 as u8;
            }
            b[208..210].copy_from_slice(&d.to_le_bytes());
            for (i, &v) in x.iter().enumerate() {
                let (n, r) = (i / 128, i % 128);
                let (part, l) = (r / 32, r % 32);
                let q = (code(v, d.to_f32() * sc[8 * n + l / 16 + 2 * part] as f32, -32, 31) + 32) as u8;
                b[64 * n + l + 32 * (part % 2)] |= (q & 0xF) << if part < 2 { 0 } else { 4 };
                b[128 + 32 * n + l] |= (q >> 4) << (2 * part);
            }
        }
        _ => unreachable!("{format:?} is not a K-quant"),
    }
}
