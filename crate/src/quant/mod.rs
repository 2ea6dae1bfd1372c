//! Block-quantized weights that the kernels read directly (`Gpu::linear_q`, `Gpu::conv2d_q`).
//!
//! A weight is seen as a 2-D matrix [rows, cols]: nn.Linear [out, in]; a convolution
//! [cout, cin·kh·kw] (torch's layout flattened). Each row is cut into blocks of [`BLOCK`] = 32
//! consecutive values along cols; the last block of a row is padded (cols is rounded up to a
//! multiple of 32; padding is quantized as 0 where the block's grid allows, and never read as a
//! weight: the kernels zero the matching activations).
//!
//! | format  | per block                                    | value       | bits / weight |
//! |---------|----------------------------------------------|-------------|---------------|
//! | `Q8_0`  | f16 scale d, 32 × i8 q in [-127, 127]        | d·q         | 8.5           |
//! | `Q4_0`  | f16 scale d, 32 × u4 q in [0, 15]            | d·(q − 8)   | 4.5           |
//! | `Q4_1`  | f16 scale d, f16 min m, 32 × u4 q in [0, 15] | d·q + m     | 5.0           |
//!
//! (ggml's formats of the same names, so GGUF blocks repack without requantizing.) Scales are
//! rounded *up* in magnitude to f16 (and Q4_1 mins *down*), so every value of the block lies on
//! the grid's range and the error per element is at most d/2, where |d| is at most 2⁻¹⁰ relatively
//! above the ideal max|x|/127, max|x|/8 or (max − min)/15. Q4_0's grid is asymmetric as in ggml:
//! the block's extreme value maps to code 0 (d carries its sign), so values near the opposite
//! extreme clamp to code 15 with an error of up to |d|. Values on the grid round-trip exactly.
//!
//! ## Layout (identical on the GPU and in a file)
//!
//! - `data`: u32 words [rows, blocks, words_per_block]; Q8_0: 8 words, byte j of word w (little
//!   endian, bits 8j..8j+7) is the two's-complement code of value 4w + j; Q4_*: 4 words, nibble j
//!   of word w (bits 4j..4j+3) is the code of value 8w + j. Kernels use aligned u32 loads only.
//! - `scales` (and `mins` for Q4_1): f16 per block, [rows, blocks]. On the GPU they become one u32
//!   plane ([`QuantizedTensor::gpu_scales`]): Q8_0 and Q4_0 pack two consecutive blocks' scales per
//!   word (flat block index b = row·blocks + block: word b/2, low half for even b); Q4_1 packs each
//!   block's (d, m) into one word (d low, m high). f16 is decoded from its bits in the kernel (subnormal
//!   scales included: no reliance on a device's f16 denormal support).
//!
//! Real cost of a [rows, cols] weight: `rows · ceil(cols/32)` blocks of 34 bytes (Q8_0), 18 (Q4_0)
//! or 20 (Q4_1) — 8.5, 4.5 and 5 bits per weight when cols is a multiple of 32 (every SDXL linear, and every conv whose cin is a multiple of 32; a k×k conv has
//! cols = cin·k², so only the few small-cin convs such as conv_in pay for padding, see
//! [`QuantizedTensor::bits_per_weight`]), plus at most 2 bytes to round a scale plane to whole
//! words on the GPU. A file storing the planes verbatim costs the same.
//!
//! ## K-quants
//!
//! ggml's Q2_K … Q6_K ([`kquants`]) are read by the kernels as GGUF stores them: `data` holds
//! each row's 256-value blocks (scales inside, Q3_K and Q6_K padded to whole words), `scales` and
//! `mins` are empty. Rows must be whole blocks (cols a multiple of 256), as in ggml.

pub mod kquants;

use std::ops::Range;

use half::f16;
use strum::{EnumString, IntoStaticStr, VariantNames};

use crate::error::{mib, Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::named::Named;

/// Values per quantization block (along cols).
pub const BLOCK: usize = 32;

#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EnumString, IntoStaticStr, VariantNames)]
#[strum(serialize_all = "lowercase", parse_err_ty = Error, parse_err_fn = crate::named::unknown::<Self>)]
pub enum QuantFormat {
    /// f16 scale + 32 × u4 per block (symmetric): 4.5 bits per weight.
    Q4_0,
    /// f16 scale + f16 min + 32 × u4 per block (affine): 5 bits per weight.
    Q4_1,
    /// f16 scale + 32 × i8 per block (symmetric): 8.5 bits per weight.
    Q8_0,
    /// ggml's K-quants, blocks of 256 as GGUF stores them (see [`kquants`]).
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 8] = [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q2_K,
        QuantFormat::Q3_K,
        QuantFormat::Q4_K,
        QuantFormat::Q5_K,
        QuantFormat::Q6_K,
    ];

    /// ggml's K-quants: self-contained blocks of 256 values, no separate scale planes.
    pub fn is_k(self) -> bool {
        !matches!(self, QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1)
    }

    /// Values per block along a row: 32, or 256 for the K-quants (whose rows must be whole blocks).
    pub fn block_values(self) -> usize {
        if self.is_k() {
            kquants::SUPER
        } else {
            BLOCK
        }
    }

    /// u32 words of codes per block (a K-quant block, scales included, padded to whole words).
    pub fn words_per_block(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 8,
            QuantFormat::Q4_0 | QuantFormat::Q4_1 => 4,
            k => kquants::ggml_bytes(k).div_ceil(4),
        }
    }

    /// f16 parameters per block kept beside the codes (scale, and min for Q4_1; none for K-quants).
    pub fn params_per_block(self) -> usize {
        match self {
            QuantFormat::Q4_1 => 2,
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => 1,
            _ => 0,
        }
    }

    /// Bytes of one block as stored: codes and parameters.
    pub fn block_bytes(self) -> usize {
        self.words_per_block() * 4 + self.params_per_block() * 2
    }

    /// Bits per weight of a full block, codes and parameters together (8.5, 4.5, 5.0; K-quants
    /// 2.625, 3.5, 4.5, 5.5, 6.625).
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / self.block_values() as f64
    }

    /// Bytes of a [rows, cols] matrix in this format (codes and block parameters; the last block
    /// of each row padded).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u64 {
        // In u64: shapes come from file headers, and wasm32's usize is 32 bits.
        rows as u64 * cols.div_ceil(self.block_values()) as u64 * self.block_bytes() as u64
    }

    /// Whether a matrix with rows of `cols` values can be stored in this format: the K-quants
    /// need whole 256-value blocks, as ggml does.
    pub fn fits(self, cols: usize) -> bool {
        cols >= BLOCK && (!self.is_k() || cols.is_multiple_of(kquants::SUPER))
    }

    /// The name files and the CLI use (ggml's, lower case).
    pub fn name(self) -> &'static str {
        self.into()
    }
}

impl Named for QuantFormat {
    const WHAT: &'static str = "quantization format";
}

/// A quantized [rows, cols] weight on the CPU, in the GPU's layout (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// Codes, [rows, blocks, words_per_block] u32 words.
    pub data: Vec<u32>,
    /// Scale d per block, [rows, blocks].
    pub scales: Vec<f16>,
    /// Min m per block, [rows, blocks] for Q4_1; empty otherwise.
    pub mins: Vec<f16>,
}

fn bad(msg: String) -> Error {
    Error::InvalidParameter(msg)
}

/// Smallest f16 >= v (v finite, non-negative or not); infinity when v exceeds f16's range.
fn f16_up(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() >= v {
        return h;
    }
    let bits = h.to_bits();
    if bits & 0x7fff == 0 {
        f16::from_bits(0x0001)
    } else if bits & 0x8000 == 0 {
        f16::from_bits(bits + 1)
    } else {
        f16::from_bits(bits - 1)
    }
}

/// Largest f16 <= v.
fn f16_down(v: f32) -> f16 {
    -f16_up(-v)
}

impl QuantizedTensor {
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(self.format.block_values())
    }

    /// Values `range` of the row-major [rows, cols] tensor (rows are decoded whole, then cut).
    pub fn dequantize_values(&self, range: Range<usize>) -> Vec<f32> {
        let cols = self.cols.max(1);
        let (first, last) = (range.start / cols, range.end.div_ceil(cols).min(self.rows));
        let skip = range.start - first * cols;
        let rows: Vec<f32> = if self.format.is_k() {
            let row_bytes = self.blocks_per_row() * self.format.words_per_block() * 4;
            let bytes: &[u8] = bytemuck::cast_slice(&self.data);
            let bytes = bytes.get(first * row_bytes..last * row_bytes).unwrap_or_default();
            bytes.chunks(self.format.words_per_block() * 4).flat_map(|b| kquants::dequantize_block(self.format, b)).collect()
        } else {
            let nb = self.blocks_per_row();
            let value = |r: usize, c: usize| {
                let blk = r * nb + c / BLOCK;
                let (d, code) = (self.scales[blk].to_f32(), self.code(r, c) as f32);
                match self.format {
                    QuantFormat::Q8_0 => d * code,
                    QuantFormat::Q4_0 => d * (code - 8.0),
                    _ => d * code + self.mins[blk].to_f32(), // Q4_1
                }
            };
            (first..last).flat_map(|r| (0..self.cols).map(move |c| value(r, c))).collect()
        };
        rows.into_iter().skip(skip).take(range.len()).collect()
    }

    /// Bytes of codes and block parameters (the file size of the planes; the GPU adds at most 2).
    pub fn bytes(&self) -> usize {
        self.data.len() * 4 + (self.scales.len() + self.mins.len()) * 2
    }

    /// Bits per original weight, padding of the last block of each row included.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes() as f64 * 8.0 / (self.rows * self.cols).max(1) as f64
    }

    /// Checks that the planes have the sizes the format and shape call for.
    pub fn validate(&self) -> Result<()> {
        if self.format.is_k() {
            return self.validate_k();
        }
        let blocks = self.rows * self.blocks_per_row();
        let mins = if self.format == QuantFormat::Q4_1 { blocks } else { 0 };
        if self.data.len() != blocks * self.format.words_per_block() || self.scales.len() != blocks || self.mins.len() != mins {
            return Err(bad(format!(
                "{:?} [{}, {}]: {} code words, {} scales, {} mins; expected {}, {blocks}, {mins}",
                self.format,
                self.rows,
                self.cols,
                self.data.len(),
                self.scales.len(),
                self.mins.len(),
                blocks * self.format.words_per_block()
            )));
        }
        if self.scales.iter().chain(&self.mins).any(|v| !v.is_finite()) {
            return Err(bad(format!("{:?} [{}, {}]: non-finite block scale or min", self.format, self.rows, self.cols)));
        }
        Ok(())
    }

    fn validate_k(&self) -> Result<()> {
        let (format, rows, cols) = (self.format, self.rows, self.cols);
        if !format.fits(cols) || self.data.len() != rows * self.blocks_per_row() * format.words_per_block() || !self.scales.is_empty() || !self.mins.is_empty() {
            return Err(bad(format!(
                "{format:?} [{rows}, {cols}]: {} code words for rows of whole {}-value blocks",
                self.data.len(),
                kquants::SUPER
            )));
        }
        let bytes: &[u8] = bytemuck::cast_slice(&self.data);
        let bad_scale = bytes.chunks(format.words_per_block() * 4).any(|b| kquants::scales(format, b).iter().any(|d| !d.is_finite()));
        if bad_scale {
            return Err(bad(format!("{format:?} [{rows}, {cols}]: non-finite block scale")));
        }
        Ok(())
    }

    /// The block parameters as the kernels read them: Q8_0 and Q4_0 two f16 scales per u32 (even
    /// flat block index in the low half), Q4_1 one u32 per block (d low, m high); none for the
    /// K-quants, whose blocks hold their scales.
    pub fn gpu_scales(&self) -> Vec<u32> {
        match self.format {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => self
                .scales
                .chunks(2)
                .map(|p| p[0].to_bits() as u32 | (p.get(1).map_or(0, |s| s.to_bits()) as u32) << 16)
                .collect(),
            QuantFormat::Q4_1 => self.scales.iter().zip(&self.mins).map(|(d, m)| d.to_bits() as u32 | (m.to_bits() as u32) << 16).collect(),
            _ => Vec::new(),
        }
    }

    /// Rows `r0..r1` alone (blocks never straddle rows).
    pub fn rows(&self, r0: usize, r1: usize) -> QuantizedTensor {
        let (blocks, words) = (self.blocks_per_row(), self.format.words_per_block());
        let mins = if self.mins.is_empty() { Vec::new() } else { self.mins[r0 * blocks..r1 * blocks].to_vec() };
        let scales = if self.scales.is_empty() { Vec::new() } else { self.scales[r0 * blocks..r1 * blocks].to_vec() };
        QuantizedTensor { rows: r1 - r0, data: self.data[r0 * blocks * words..r1 * blocks * words].to_vec(), scales, mins, ..*self }
    }

    /// The integer code of element (row, col) of a 32-value-block format (col may index the padding).
    pub fn code(&self, row: usize, col: usize) -> i32 {
        let words = self.format.words_per_block();
        let base = (row * self.blocks_per_row() + col / BLOCK) * words;
        let i = col % BLOCK;
        match self.format {
            QuantFormat::Q8_0 => (self.data[base + i / 4] >> (8 * (i % 4))) as u8 as i8 as i32,
            QuantFormat::Q4_0 | QuantFormat::Q4_1 => ((self.data[base + i / 8] >> (4 * (i % 8))) & 15) as i32,
            k => unreachable!("{k:?} codes are read through kquants::dequantize_block"),
        }
    }
}

/// Quantizes a row-major [rows, cols] matrix. Errors on a length mismatch, a non-finite value, or
/// a block whose scale or min does not fit f16 (|x| beyond ~8·10⁶ for Q8_0, ~5·10⁵ for Q4_0,
/// ~65504 for Q4_1).
pub fn quantize(values: &[f32], rows: usize, cols: usize, format: QuantFormat) -> Result<QuantizedTensor> {
    if values.len() != rows * cols {
        return Err(bad(format!("quantize: {} values do not fill [{rows}, {cols}]", values.len())));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("quantize: non-finite value {} at [{}, {}]", values[i], i / cols.max(1), i % cols.max(1))));
    }
    if format.is_k() {
        if !format.fits(cols) {
            return Err(bad(format!("quantize: {format:?} needs rows of whole {}-value blocks, not {cols}", kquants::SUPER)));
        }
        let mut bytes = Vec::with_capacity(rows * cols / kquants::SUPER * format.words_per_block() * 4);
        for block in values.chunks(kquants::SUPER) {
            kquants::quantize_block(format, block, &mut bytes);
            bytes.resize(bytes.len().next_multiple_of(4), 0);
        }
        let q = QuantizedTensor { format, rows, cols, data: bytemuck::pod_collect_to_vec(&bytes), scales: Vec::new(), mins: Vec::new() };
        q.validate()?;
        return Ok(q);
    }
    let nb = cols.div_ceil(BLOCK);
    let mut q = QuantizedTensor {
        format,
        rows,
        cols,
        data: Vec::with_capacity(rows * nb * format.words_per_block()),
        scales: Vec::with_capacity(rows * nb),
        mins: Vec::with_capacity(if format == QuantFormat::Q4_1 { rows * nb } else { 0 }),
    };
    let mut codes = [0u8; BLOCK];
    for (r, row) in values.chunks(cols.max(1)).take(rows).enumerate() {
        for (b, block) in row.chunks(BLOCK).enumerate() {
            codes.fill(0);
            let too_large = || bad(format!("quantize: block [{r}, {}..] exceeds f16's range for a {format:?} scale", b * BLOCK));
            match format {
                QuantFormat::Q8_0 => {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = f16_up(amax / 127.0);
                    if !d.is_finite() {
                        return Err(too_large());
                    }
                    let df = d.to_f32();
                    if df > 0.0 {
                        for (c, &v) in codes.iter_mut().zip(block) {
                            *c = (v / df).round().clamp(-127.0, 127.0) as i32 as i8 as u8;
                        }
                    }
                    q.scales.push(d);
                }
                QuantFormat::Q4_0 => {
                    // The extreme value maps to code 0: d = extreme / −8, magnitude rounded up.
                    let extreme = block.iter().fold(0f32, |e, &v| if v.abs() > e.abs() { v } else { e });
                    let magnitude = f16_up(extreme.abs() / 8.0);
                    if !magnitude.is_finite() {
                        return Err(too_large());
                    }
                    let d = if extreme > 0.0 { -magnitude } else { magnitude };
                    let df = d.to_f32();
                    for (i, c) in codes.iter_mut().enumerate() {
                        let v = block.get(i).copied().unwrap_or(0.0);
                        *c = if df != 0.0 { (v / df + 8.0).round().clamp(0.0, 15.0) as u8 } else { 8 };
                    }
                    q.scales.push(d);
                }
                QuantFormat::Q4_1 => {
                    let (lo, hi) = block.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                    let m = f16_down(lo);
                    let d = f16_up((hi - m.to_f32()) / 15.0);
                    if !m.is_finite() || !d.is_finite() {
                        return Err(too_large());
                    }
                    let (df, mf) = (d.to_f32(), m.to_f32());
                    let code = |v: f32| if df > 0.0 { ((v - mf) / df).round().clamp(0.0, 15.0) as u8 } else { 0 };
                    for (i, c) in codes.iter_mut().enumerate() {
                        *c = code(block.get(i).copied().unwrap_or(0.0));
                    }
                    q.scales.push(d);
                    q.mins.push(m);
                }
                k => unreachable!("{k:?} is quantized above"),
            }
            push_codes(&mut q.data, format, &codes);
        }
    }
    Ok(q)
}

/// Appends one block's codes (in value order; Q8_0's as two's complement) in the layout above.
pub(crate) fn push_codes(data: &mut Vec<u32>, format: QuantFormat, codes: &[u8; BLOCK]) {
    match format {
        QuantFormat::Q8_0 => data.extend(codes.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => data.extend(codes.chunks(8).map(|c| c.iter().rev().fold(0u32, |w, &n| (w << 4) | n as u32))),
        k => unreachable!("{k:?} blocks are not 32 codes"),
    }
}

/// The values a quantized matrix stands for, [rows, cols] row-major (padding dropped), computed
/// as the kernels do: d·q (Q8_0), d·(q − 8) (Q4_0) or d·q + m (Q4_1) in f32; the K-quants as
/// ggml does ([`kquants::dequantize_block`]).
pub fn dequantize(q: &QuantizedTensor) -> Vec<f32> {
    q.dequantize_values(0..q.rows * q.cols)
}

/// A quantized weight uploaded for the kernels: two u32 planes, each within one binding.
#[derive(Clone, Debug)]
pub struct QuantTensor {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// Codes, U32 [rows, blocks · words_per_block].
    pub data: Tensor,
    /// Block parameters, U32 (see [`QuantizedTensor::gpu_scales`]); None for the K-quants.
    pub scales: Option<Tensor>,
}

impl QuantTensor {
    /// Uploads `q`; `name` identifies the weight in errors (e.g. when its codes exceed the largest
    /// buffer one kernel binding can address).
    pub fn upload(gpu: &Gpu, q: &QuantizedTensor, name: &str) -> Result<QuantTensor> {
        q.validate().map_err(|e| bad(format!("quantized weight '{name}': {e}")))?;
        let scales = q.gpu_scales();
        let limit = gpu.max_binding_bytes();
        for (plane, words) in [("codes", q.data.len()), ("scales", scales.len())] {
            let bytes = words as u64 * 4;
            if bytes > limit {
                return Err(Error::AdapterLimits(format!(
                    "quantized weight '{name}' ({:?} [{}, {}]) needs {} of {plane} in one binding; this adapter allows {}",
                    q.format,
                    q.rows,
                    q.cols,
                    mib(bytes),
                    mib(limit)
                )));
            }
        }
        let row_words = q.blocks_per_row() * q.format.words_per_block();
        Ok(QuantTensor {
            format: q.format,
            rows: q.rows,
            cols: q.cols,
            data: gpu.upload_u32(&q.data, &[q.rows, row_words])?,
            scales: if scales.is_empty() { None } else { Some(gpu.upload_u32(&scales, &[scales.len()])?) },
        })
    }

    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(self.format.block_values())
    }

    /// Bytes held on the GPU (both planes).
    pub fn gpu_bytes(&self) -> usize {
        (self.data.len() + self.scales.as_ref().map_or(0, Tensor::len)) * DType::U32.size()
    }
}

/// A GPU weight matrix as the models hold it: dense in the working float type, or block-quantized.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    Quant(QuantTensor),
}

/// The quantization presets users pick (`--quant`); each stands for a [`QuantPolicy`].
///
/// `Q8` stores every candidate matrix as Q8_0. `Q4` stores them as Q4_0 except the roles in
/// [`Q4_EXCEPTIONS`], which `sdxl quality --sensitivity` chose by measurement (see there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, EnumString, IntoStaticStr, VariantNames)]
#[strum(serialize_all = "lowercase", parse_err_ty = Error, parse_err_fn = crate::named::unknown::<Self>)]
pub enum QuantPreset {
    /// All weights dense (f16 on shader-f16 adapters).
    #[default]
    #[strum(to_string = "f16", serialize = "none")]
    F16,
    Q8,
    Q4,
}

impl Named for QuantPreset {
    const WHAT: &'static str = "quantization";
}

/// The q4 preset's exceptions to Q4_0, by role (see [`role`]): the upgrades that remove the most
/// UNet output error per added byte, taken greedily until the real SDXL base UNet reaches its
/// 1.6 GB budget (1.482 GB all Q4_0 → 1.600 GB; summed squared output error 3.8e-2 → 6.5e-3).
/// Output of `sdxl quality --sensitivity tests/fixtures/reference/sdxl_unet_tensors.json --budget
/// 1.6e9` on the random-weight model of tests/fixtures/make_sensitivity_model.py
/// (docs/quantization.md): a method, rerunnable on real weights, rather than a claim about trained
/// SDXL.
pub const Q4_EXCEPTIONS: &[(&str, QuantFormat)] = &[
    ("unet/down_blocks.attentions.proj_in", QuantFormat::Q8_0),
    ("unet/down_blocks.attentions.proj_out", QuantFormat::Q8_0),
    ("unet/down_blocks.attentions.transformer_blocks.attn1.to_out", QuantFormat::Q4_1),
    ("unet/down_blocks.attentions.transformer_blocks.attn1.to_v", QuantFormat::Q4_1),
    ("unet/down_blocks.attentions.transformer_blocks.attn2.to_out", QuantFormat::Q4_1),
    ("unet/down_blocks.downsamplers.conv", QuantFormat::Q8_0),
    ("unet/down_blocks.resnets.conv1", QuantFormat::Q4_1),
    ("unet/down_blocks.resnets.conv_shortcut", QuantFormat::Q8_0),
    ("unet/mid_block.attentions.proj_out", QuantFormat::Q8_0),
    ("unet/up_blocks.attentions.proj_in", QuantFormat::Q8_0),
    ("unet/up_blocks.attentions.proj_out", QuantFormat::Q8_0),
    ("unet/up_blocks.attentions.transformer_blocks.attn1.to_v", QuantFormat::Q4_1),
    ("unet/up_blocks.resnets.conv1", QuantFormat::Q8_0),
    ("unet/up_blocks.resnets.conv2", QuantFormat::Q8_0),
    ("unet/up_blocks.resnets.conv_shortcut", QuantFormat::Q8_0),
    ("unet/up_blocks.upsamplers.conv", QuantFormat::Q4_1),
];

impl QuantPreset {
    /// The name the CLI, the JS API and pack manifests use.
    pub fn name(self) -> &'static str {
        self.into()
    }

    pub fn policy(self) -> QuantPolicy {
        match self {
            QuantPreset::F16 => QuantPolicy::default(),
            QuantPreset::Q8 => QuantPolicy { default: Some(QuantFormat::Q8_0), exceptions: Vec::new() },
            QuantPreset::Q4 => QuantPolicy {
                default: Some(QuantFormat::Q4_0),
                exceptions: Q4_EXCEPTIONS.iter().map(|&(role, format)| (role.to_string(), Some(format))).collect(),
            },
        }
    }
}

/// Which weight matrices a model keeps quantized on the GPU, and how: the one place where that is
/// decided, for weights quantized as they load ([`crate::weights::Vars`]) and for model packs
/// ([`crate::pack`]).
///
/// Candidates are the `.weight` matrices (2-D or more) of nn.Linear and nn.Conv2d in the text
/// encoders and the UNet. Always dense: the VAE, embedding tables (`embeddings.*`, read by row),
/// the first and last convolutions (`conv_in`, `conv_out`), the time and added-condition
/// embeddings (`time_embedding`, `add_embedding`, each resnet's `time_emb_proj`), the text
/// encoders' `text_projection`, and matrices whose rows the format cannot cut into whole blocks.
/// Every other candidate gets its role's exception if there is one, else `default`. Weights
/// stored quantized (GGUF blocks, packs) are used as stored, whatever the policy says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantPolicy {
    /// Format of the candidates no exception names (None: dense).
    pub default: Option<QuantFormat>,
    /// (role, format) pairs; a None format keeps that role dense.
    pub exceptions: Vec<(String, Option<QuantFormat>)>,
}

impl QuantPolicy {
    /// The format for tensor `name` of `component` (`unet`, `conv_in.weight`) of `shape` (None:
    /// keep it dense).
    pub fn format_for(&self, component: &str, name: &str, shape: &[usize]) -> Option<QuantFormat> {
        const DENSE: [&str; 7] = ["conv_in.", "conv_out.", "time_embedding.", "add_embedding.", "time_emb_proj.", "text_projection.", "embeddings."];
        if component == "vae" || shape.len() < 2 || !name.ends_with(".weight") || DENSE.iter().any(|d| name.starts_with(d) || name.contains(&format!(".{d}"))) {
            return None;
        }
        let cols = shape[1..].iter().product();
        let role = role(&format!("{component}/{name}"));
        let format = self.exceptions.iter().find(|(r, _)| *r == role).map_or(self.default, |&(_, format)| format);
        format.filter(|f| f.fits(cols))
    }
}

/// A weight's role: its component-qualified name without layer indices and without `.weight`,
/// e.g. `unet/down_blocks.attentions.transformer_blocks.attn2.to_k` for every cross-attention key
/// projection of the down path. What the mixed q4 preset decides on.
pub fn role(name: &str) -> String {
    let name = name.strip_suffix(".weight").unwrap_or(name);
    name.split('.').filter(|part| !part.bytes().all(|b| b.is_ascii_digit())).collect::<Vec<_>>().join(".")
}
