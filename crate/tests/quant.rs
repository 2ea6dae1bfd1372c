//! Block-quantized weights: CPU round trips of the quantizer, and the kernels that read the
//! quantized planes directly (`linear_q`, `conv2d_q`) against CPU references computed from
//! `dequantize()`, on shapes that are not multiples of the tile or block sizes, f32 and f16.

mod common;

use common::{assert_close, cpu_conv, random, stored, tolerance};
use half::f16;
use sdxl::quant::{dequantize, quantize, QuantFormat, QuantTensor, QuantizedTensor, Weight, BLOCK};
use sdxl::Gpu;

gpu_tests!(
    linear_q_odd_shapes,
    linear_q_subnormal_scales,
    conv2d_q_variants,
    k_quant_kernels_decode_as_ggml,
    quant_ops_reject_mismatches,
);

fn subnormal(d: &f16) -> bool {
    d.to_bits() & 0x7c00 == 0 && d.to_bits() & 0x3ff != 0
}

const FORMATS: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1];

/// Rows of different magnitudes (weights of real layers are far from [-1, 1]).
fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    random(rows * cols, seed).iter().enumerate().map(|(i, v)| v * [0.02, 0.3, 1.0, 4.0, 0.07][(i / cols) % 5]).collect()
}

/// Checks every element of a round trip against its block's stored parameters: error ≤ |d|/2 (plus
/// f32 rounding; |d| for Q4_0's clamped code 15), |d| at most 2⁻¹⁰ above the ideal scale, Q4_1 min
/// ≤ the block's minimum, Q4_0's extreme at code 0. Returns the worst error in units of |d|.
fn check_round_trip(values: &[f32], rows: usize, cols: usize, format: QuantFormat) -> (QuantizedTensor, f32) {
    let q = quantize(values, rows, cols, format).unwrap();
    q.validate().unwrap();
    let nb = cols.div_ceil(BLOCK);
    assert_eq!(q.data.len(), rows * nb * format.words_per_block(), "{format:?} code words");
    let deq = dequantize(&q);
    assert_eq!(deq.len(), rows * cols);
    let smallest = f16::from_bits(1).to_f32();
    let mut worst = 0f32;
    for r in 0..rows {
        for b in 0..nb {
            let blk = r * nb + b;
            let real = &values[r * cols + b * BLOCK..r * cols + ((b + 1) * BLOCK).min(cols)];
            let d = q.scales[blk].to_f32();
            let (lo, hi) = real.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            let ideal = match format {
                QuantFormat::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                QuantFormat::Q4_0 => {
                    let extreme = if hi.abs() > lo.abs() { hi } else { lo };
                    assert!(d == 0.0 || (d < 0.0) == (extreme > 0.0), "Q4_0 block {blk}: d {d} must map the extreme {extreme} to code 0");
                    extreme.abs() / 8.0
                }
                k => {
                    assert_eq!(k, QuantFormat::Q4_1, "32-value formats only");
                    let m = q.mins[blk].to_f32();
                    assert!(m <= lo && m >= lo - lo.abs() / 1024.0 - smallest, "Q4 min {m} vs block minimum {lo}");
                    (hi - lo + lo.abs() / 1024.0) / 15.0
                }
            };
            assert!((format == QuantFormat::Q4_0 || d >= 0.0) && d.abs() <= ideal * (1.0 + 1.0 / 1024.0) + smallest, "{format:?} block {blk}: scale {d} vs ideal {ideal}");
            let d = d.abs();
            for (i, &v) in real.iter().enumerate() {
                let got = deq[r * cols + b * BLOCK + i];
                let err = (got - v).abs();
                let steps = if format == QuantFormat::Q4_0 && q.code(r, b * BLOCK + i) == 15 { 1.0 } else { 0.5 };
                assert!(
                    err <= steps * d * (1.0 + 1e-6) + 2.0 * v.abs() * f32::EPSILON,
                    "{format:?} [{r}, {}]: {v} -> {got}, error {err} > {steps}·|d| = {}",
                    b * BLOCK + i,
                    steps * d
                );
                if d > 0.0 {
                    worst = worst.max(err / d);
                }
            }
            if format == QuantFormat::Q8_0 {
                for c in real.len()..BLOCK {
                    assert_eq!(q.code(r, b * BLOCK + c), 0, "Q8 padding is quantized as 0");
                }
            }
        }
    }
    (q, worst)
}

macro_rules! cpu_tests {
    ($($name:ident),* $(,)?) => {
        mod cpu {
            $(
                #[cfg_attr(not(target_arch = "wasm32"), test)]
                #[cfg_attr(target_arch = "wasm32", wasm_bindgen_test::wasm_bindgen_test)]
                fn $name() {
                    super::$name();
                }
            )*
        }
    };
}

cpu_tests!(
    round_trip_random,
    round_trip_grid_values_exact,
    round_trip_zero_blocks,
    round_trip_constant_blocks,
    round_trip_cols_not_multiple_of_32,
    round_trip_q4_negative_only_blocks,
    round_trip_tiny_values_subnormal_scales,
    quantize_rejects_bad_input,
    bits_per_weight,
    k_quants_round_trip,
    dequantize_values_cuts_any_range,
);

/// Our K-quant quantizer (for test files) keeps rows to their format's usual error, and K-quants
/// refuse rows that are not whole 256-value blocks.
fn k_quants_round_trip() {
    let (rows, cols) = (4, 512);
    let w = weights(rows, cols, 9);
    let rms = |v: &[f32]| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    // Bounds about 1.3x what was measured (2.85e-1, 1.37e-1, 6.4e-2, 3.0e-2, 1.46e-2).
    for (format, bound) in [(QuantFormat::Q2_K, 0.37), (QuantFormat::Q3_K, 0.18), (QuantFormat::Q4_K, 0.085), (QuantFormat::Q5_K, 0.04), (QuantFormat::Q6_K, 0.02)] {
        let q = quantize(&w, rows, cols, format).unwrap();
        assert_eq!(q.bytes() as u64, format.matrix_bytes(rows, cols), "{format:?} bytes");
        let deq = dequantize(&q);
        let err: Vec<f32> = w.iter().zip(&deq).map(|(a, b)| a - b).collect();
        let rel = rms(&err) / rms(&w);
        eprintln!("{format:?}: rms error / rms weight {rel:.2e} ({} bits per weight)", format.bits_per_weight());
        assert!(rel < bound, "{format:?}: relative rms error {rel}");
        assert!(quantize(&w[..rows * 320], rows, 320, format).is_err(), "{format:?}: rows of 320");
    }
}

/// `dequantize_values` (what uploads decode a slice at a time) gives any range of `dequantize`'s
/// values, across row and block boundaries, for every format.
fn dequantize_values_cuts_any_range() {
    let formats = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q2_K, QuantFormat::Q3_K, QuantFormat::Q4_K, QuantFormat::Q5_K, QuantFormat::Q6_K];
    for format in formats {
        let (rows, cols) = if format.is_k() { (5, 512) } else { (7, 80) };
        let q = quantize(&weights(rows, cols, 3), rows, cols, format).unwrap();
        let all = dequantize(&q);
        let n = rows * cols;
        for range in [0..n, 0..0, 5..123, cols - 1..cols + 1, n - 3..n, cols..3 * cols] {
            assert_eq!(q.dequantize_values(range.clone()), all[range.clone()], "{format:?} {range:?}");
        }
        let pieces: Vec<f32> = (0..n).step_by(97).flat_map(|s| q.dequantize_values(s..(s + 97).min(n))).collect();
        assert_eq!(pieces, all, "{format:?} in pieces of 97");
    }
}

fn round_trip_random() {
    let (rows, cols) = (10, 320);
    let w = weights(rows, cols, 1);
    for format in FORMATS {
        let (_, worst) = check_round_trip(&w, rows, cols, format);
        let deq = dequantize(&quantize(&w, rows, cols, format).unwrap());
        let rms = |v: &mut dyn Iterator<Item = f32>| (v.map(|x| (x as f64).powi(2)).sum::<f64>() / (rows * cols) as f64).sqrt();
        let rel = rms(&mut w.iter().zip(&deq).map(|(a, b)| a - b)) / rms(&mut w.iter().copied());
        eprintln!("{format:?}: worst error {worst:.4} d, rms error / rms weight {rel:.2e}");
        assert!(worst <= if format == QuantFormat::Q4_0 { 1.0 } else { 0.5 } + 1e-5);
    }
}

fn round_trip_grid_values_exact() {
    let (rows, cols) = (4, 96);
    let codes = random(rows * cols, 2);
    // Q8: d·q with an f16 d per block and |q| = 127 reached in every block.
    let d8 = [0.0078125f32, f16::from_f32(0.0123).to_f32(), 3.5, f16::from_f32(1.7e-3).to_f32()];
    let v8: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let q = if i % BLOCK == 5 { if i % 2 == 0 { 127.0 } else { -127.0 } } else { (codes[i] * 127.0).round() };
            d8[(i / BLOCK) % 4] * q
        })
        .collect();
    let (q, _) = check_round_trip(&v8, rows, cols, QuantFormat::Q8_0);
    assert_eq!(dequantize(&q), v8, "Q8 grid values round-trip exactly");
    // Q4: d·q + m with f16 d and m, q = 0 and 15 reached in every block.
    let dm = [(0.015625f32, -0.25f32), (f16::from_f32(0.0377).to_f32(), f16::from_f32(0.61).to_f32()), (0.5, -7.0)];
    let v4: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let q = match i % BLOCK {
                3 => 0.0,
                17 => 15.0,
                _ => ((codes[i] + 1.0) * 7.5).round().min(15.0),
            };
            let (d, m) = dm[(i / BLOCK) % 3];
            d * q + m
        })
        .collect();
    let (q, _) = check_round_trip(&v4, rows, cols, QuantFormat::Q4_1);
    assert_eq!(dequantize(&q), v4, "Q4_1 grid values round-trip exactly");
    // Q4_0: d·(q − 8) with f16 d of either sign, the extreme (code 0) reached in every block.
    let d40 = [0.015625f32, -f16::from_f32(0.0377).to_f32(), 0.5];
    let v40: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let q = if i % BLOCK == 9 { 0.0 } else { ((codes[i] + 1.0) * 7.5).round().clamp(1.0, 15.0) };
            d40[(i / BLOCK) % 3] * (q - 8.0)
        })
        .collect();
    let (q, _) = check_round_trip(&v40, rows, cols, QuantFormat::Q4_0);
    assert_eq!(dequantize(&q), v40, "Q4_0 grid values round-trip exactly");
}

fn round_trip_zero_blocks() {
    let (rows, cols) = (3, 64 + 7);
    let mut w = weights(rows, cols, 3);
    w[..cols].fill(0.0); // a whole row
    w[cols + 32..cols + 64].fill(0.0); // one block of the second row
    w[2 * cols + 64..].fill(0.0); // the short last block of the last row
    for format in FORMATS {
        let (q, _) = check_round_trip(&w, rows, cols, format);
        let deq = dequantize(&q);
        for (i, (&a, &b)) in w.iter().zip(&deq).enumerate() {
            if a == 0.0 {
                assert_eq!(b, 0.0, "{format:?}: zero at {i} must stay exactly zero");
            }
        }
        assert_eq!(q.scales[0].to_f32(), 0.0, "{format:?}: zero block has scale 0");
    }
}

fn round_trip_constant_blocks() {
    let cols = 32;
    for c in [0.5f32, -3.25, 0.3, -0.1234567, 1e-3, 1000.0] {
        let w = vec![c; cols];
        for format in FORMATS {
            let (q, _) = check_round_trip(&w, 1, cols, format);
            let deq = dequantize(&q);
            let err = deq.iter().map(|v| (v - c).abs()).fold(0f32, f32::max);
            // Q8: d = |c|/127 rounded up to f16, so c is within 2⁻¹⁰ relatively (or 127 steps of a
            // subnormal f16 for a tiny c); Q4 keeps m ≈ c.
            let bound = (c.abs() / 1024.0).max(127.0 * f16::from_bits(1).to_f32());
            assert!(err <= bound, "{format:?} constant {c}: error {err}");
            if f16::from_f32(c).to_f32() == c && format == QuantFormat::Q4_1 {
                assert_eq!(deq, w, "Q4: an f16-exact constant block is exact");
            }
        }
    }
}

fn round_trip_cols_not_multiple_of_32() {
    for cols in [1, 5, 31, 33, 45, 70, 100] {
        let rows = 3;
        let w = weights(rows, cols, cols as u64);
        for format in FORMATS {
            let (q, _) = check_round_trip(&w, rows, cols, format);
            assert_eq!(q.blocks_per_row(), cols.div_ceil(32));
            assert_eq!(q.scales.len(), rows * cols.div_ceil(32));
        }
    }
}

fn round_trip_q4_negative_only_blocks() {
    let (rows, cols) = (2, 80);
    let w: Vec<f32> = random(rows * cols, 4).iter().map(|v| -2.0 + v).collect(); // in [-3, -1)
    let (q, worst) = check_round_trip(&w, rows, cols, QuantFormat::Q4_1);
    assert!(q.mins.iter().all(|m| m.to_f32() < -2.5), "mins are the (negative) block minima");
    assert!(worst <= 0.5 + 1e-5);
    // Codes span the grid: 0 at the block minimum, 15 at its maximum.
    let codes: Vec<i32> = (0..cols).map(|c| q.code(0, c)).collect();
    assert!(codes.contains(&0) && codes.contains(&15), "codes {codes:?}");
    let w: Vec<f32> = vec![-5.0, -1.25].into_iter().cycle().take(32).collect();
    let (q, _) = check_round_trip(&w, 1, 32, QuantFormat::Q4_1);
    assert_eq!(dequantize(&q), w, "two negative levels are exact");
}

fn round_trip_tiny_values_subnormal_scales() {
    let (rows, cols) = (2, 64);
    let w: Vec<f32> = random(rows * cols, 5).iter().map(|v| v * 1e-4).collect();
    for format in FORMATS {
        let (q, _) = check_round_trip(&w, rows, cols, format);
        assert!(q.scales.iter().all(subnormal), "{format:?}: scales {:?}", &q.scales[..2]);
    }
}

fn quantize_rejects_bad_input() {
    for format in FORMATS {
        assert!(quantize(&[0.0; 10], 3, 4, format).is_err(), "length mismatch");
        let mut w = vec![0.5; 40];
        w[33] = f32::NAN;
        let e = quantize(&w, 1, 40, format).unwrap_err().to_string();
        assert!(e.contains("[0, 33]"), "{e}");
        w[33] = f32::INFINITY;
        assert!(quantize(&w, 1, 40, format).is_err());
    }
    assert!(quantize(&[1e7, 0.0], 1, 2, QuantFormat::Q8_0).is_err(), "Q8 scale beyond f16");
    assert!(quantize(&[-1e5, 0.0], 1, 2, QuantFormat::Q4_1).is_err(), "Q4 min beyond f16");
    assert!(quantize(&[-6e4, 1e6], 1, 2, QuantFormat::Q4_1).is_err(), "Q4 scale beyond f16");
    assert!(quantize(&[1e5, 0.0], 1, 2, QuantFormat::Q4_1).is_ok(), "Q4 reaches m + 15·d");
    assert!(quantize(&[60000.0, -60000.0], 1, 2, QuantFormat::Q8_0).is_ok());
    assert!(quantize(&[6e5, 0.0], 1, 2, QuantFormat::Q4_0).is_err(), "Q4_0 scale beyond f16");
    assert!(quantize(&[-5e5, 1.0], 1, 2, QuantFormat::Q4_0).is_ok(), "Q4_0 reaches 8·65504");
    let mut q = quantize(&weights(2, 40, 6), 2, 40, QuantFormat::Q4_1).unwrap();
    q.mins.pop();
    assert!(q.validate().is_err(), "a missing min must fail validation");
}

fn bits_per_weight() {
    assert_eq!(QuantFormat::Q8_0.bits_per_weight(), 8.5);
    assert_eq!(QuantFormat::Q4_1.bits_per_weight(), 5.0);
    assert_eq!(QuantFormat::Q4_0.bits_per_weight(), 4.5);
    for format in FORMATS {
        let q = quantize(&weights(64, 320, 7), 64, 320, format).unwrap();
        assert_eq!(q.bits_per_weight(), format.bits_per_weight());
        assert_eq!(q.bytes(), 64 * 10 * (format.words_per_block() * 4 + format.params_per_block() * 2));
        assert_eq!(q.bytes() as u64, format.matrix_bytes(64, 320));
        // conv_in's [320, 4·3·3]: 36 columns pad to 64.
        let q = quantize(&weights(320, 36, 8), 320, 36, format).unwrap();
        assert!((q.bits_per_weight() - format.bits_per_weight() * 64.0 / 36.0).abs() < 1e-9);
    }
}

// ---- kernels ----

fn cpu_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>();
            y[i * n + j] = (dot + b.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
    y
}

/// Worst |Δ| relative to max(1, max |want|), as `assert_close` measures it.
fn rel_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max) / scale
}

async fn linear_q_odd_shapes(gpu: &Gpu) {
    for format in FORMATS {
        check_linear_q(gpu, format).await;
    }
}

async fn check_linear_q(gpu: &Gpu, format: QuantFormat) {
    for (lead, k, n, seed) in [(vec![37], 45, 29, 10u64), (vec![2, 19], 320, 70, 11), (vec![1], 1, 3, 12), (vec![3, 1], 64, 33, 13)] {
        let m: usize = lead.iter().product();
        let x = stored(gpu, &random(m * k, seed));
        let q = quantize(&weights(n, k, seed + 100), n, k, format).unwrap();
        let w = dequantize(&q);
        let b = stored(gpu, &random(n, seed + 200));
        let qt = QuantTensor::upload(gpu, &q, "test.weight").unwrap();
        let mut shape = lead.clone();
        shape.push(k);
        let tx = gpu.upload(&x, &shape).unwrap();
        let y = gpu.linear(&tx, &Weight::Quant(qt.clone()), Some(&gpu.upload(&b, &[n]).unwrap())).unwrap();
        let mut want_shape = lead.clone();
        want_shape.push(n);
        assert_eq!(y.shape(), want_shape.as_slice());
        let want = cpu_linear(&x, &w, Some(&b), m, n, k);
        let got = gpu.read(&y).await.unwrap();
        let what = format!("linear_q {format:?} {:?} m={m} k={k} n={n}", gpu.dtype);
        eprintln!("{what}: relative error {:.2e}", rel_error(&got, &want));
        assert_close(&what, &got, &want, tolerance(gpu));
        let y = gpu.linear(&tx, &Weight::Quant(qt.clone()), None).unwrap();
        assert_close(&format!("{what} without bias"), &gpu.read(&y).await.unwrap(), &cpu_linear(&x, &w, None, m, n, k), tolerance(gpu));
    }
}

/// Blocks of |w| ~ 1e-4 have subnormal f16 scales: the kernels must decode them, not flush them.
async fn linear_q_subnormal_scales(gpu: &Gpu) {
    let (m, k, n) = (3, 64, 5);
    let x = stored(gpu, &random(m * k, 14).iter().map(|v| v + 2.0).collect::<Vec<_>>());
    for format in FORMATS {
        let q = quantize(&random(n * k, 15).iter().map(|v| v * 1e-4).collect::<Vec<_>>(), n, k, format).unwrap();
        assert!(q.scales.iter().all(subnormal));
        let y = gpu.linear(&gpu.upload(&x, &[m, k]).unwrap(), &Weight::Quant(QuantTensor::upload(gpu, &q, "tiny").unwrap()), None).unwrap();
        let scale = |v: Vec<f32>| v.into_iter().map(|e| e * 1e3).collect::<Vec<_>>();
        let want = scale(cpu_linear(&x, &dequantize(&q), None, m, n, k));
        assert!(want.iter().any(|v| v.abs() > 0.5), "outputs of order 1e-3");
        assert_close(&format!("linear_q {format:?} subnormal scales"), &scale(gpu.read(&y).await.unwrap()), &want, tolerance(gpu));
    }
}

async fn conv2d_q_variants(gpu: &Gpu) {
    for format in FORMATS {
        check_conv2d_q(gpu, format).await;
    }
}

async fn check_conv2d_q(gpu: &Gpu, format: QuantFormat) {
    type Case = ((usize, usize, usize, usize), usize, usize, usize, [usize; 4]);
    let cases: [Case; 6] = [
        ((2, 5, 9, 7), 37, 3, 1, [1; 4]),       // 3×3 stride 1 pad 1; cols 45 (padded), 2×2 tiles
        ((2, 5, 9, 7), 37, 3, 2, [1; 4]),       // 3×3 stride 2
        ((2, 5, 9, 7), 6, 1, 1, [0; 4]),        // 1×1
        ((2, 3, 7, 10), 4, 3, 2, [0, 1, 0, 1]), // Downsample2D's asymmetric pad
        ((1, 3, 7, 10), 4, 3, 1, [2, 0, 1, 3]), // general asymmetric pad
        ((1, 32, 6, 5), 8, 3, 1, [1; 4]),       // cols 288: whole blocks
    ];
    for (i, (dims, cout, k, stride, pad)) in cases.into_iter().enumerate() {
        let (n, cin, h, w) = dims;
        let x = stored(gpu, &random(n * cin * h * w, 20 + i as u64));
        let q = quantize(&weights(cout, cin * k * k, 30 + i as u64), cout, cin * k * k, format).unwrap();
        let wt = dequantize(&q);
        let b = stored(gpu, &random(cout, 40 + i as u64));
        let qt = QuantTensor::upload(gpu, &q, "conv.weight").unwrap();
        let tx = gpu.upload(&x, &[n, cin, h, w]).unwrap();
        let what = format!("conv2d_q {format:?} {:?} {k}x{k} stride {stride} pad {pad:?} cin {cin} cout {cout}", gpu.dtype);
        let (want, oh, ow) = cpu_conv(&x, &wt, Some(&b), dims, cout, k, stride, pad);
        let y = gpu.conv2d(&tx, &Weight::Quant(qt.clone()), k, Some(&gpu.upload(&b, &[cout]).unwrap()), stride, pad).unwrap();
        assert_eq!(y.shape(), [n, cout, oh, ow], "{what}");
        let got = gpu.read(&y).await.unwrap();
        eprintln!("{what}: relative error {:.2e}", rel_error(&got, &want));
        assert_close(&what, &got, &want, tolerance(gpu));
        let y = gpu.conv2d(&tx, &Weight::Quant(qt.clone()), k, None, stride, pad).unwrap();
        let (want, _, _) = cpu_conv(&x, &wt, None, dims, cout, k, stride, pad);
        assert_close(&format!("{what} without bias"), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    }
}

const K_FORMATS: [QuantFormat; 5] = [QuantFormat::Q2_K, QuantFormat::Q3_K, QuantFormat::Q4_K, QuantFormat::Q5_K, QuantFormat::Q6_K];

/// K-quant blocks with random codes and scales (every bit pattern the kernels must decode), and
/// f16 super-scales of both signs around `scale`.
fn random_k_blocks(format: QuantFormat, rows: usize, cols: usize, seed: u64, scale: f32) -> QuantizedTensor {
    let words = rows * cols / 256 * format.words_per_block();
    let bits = random(words * 2, seed);
    let mut data: Vec<u32> = bits.chunks(2).map(|p| ((p[0] + 1.0) * 32767.5) as u32 | (((p[1] + 1.0) * 32767.5) as u32) << 16).collect();
    let supers: &[usize] = match format {
        QuantFormat::Q2_K => &[80, 82],
        QuantFormat::Q3_K => &[108],
        QuantFormat::Q6_K => &[208],
        _ => &[0, 2],
    };
    let block = format.words_per_block() * 4;
    let d = random(data.len(), seed + 1);
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut data);
    for (b, chunk) in bytes.chunks_mut(block).enumerate() {
        for (i, &at) in supers.iter().enumerate() {
            chunk[at..at + 2].copy_from_slice(&f16::from_f32(d[2 * b + i] * scale).to_le_bytes());
        }
        chunk[kquants_bytes(format)..].fill(0); // padding
    }
    let q = QuantizedTensor { format, rows, cols, data, scales: Vec::new(), mins: Vec::new() };
    q.validate().unwrap();
    q
}

/// Bytes of a K-quant block as GGUF stores it (before the padding to whole words).
fn kquants_bytes(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q2_K => 84,
        QuantFormat::Q3_K => 110,
        QuantFormat::Q4_K => 144,
        QuantFormat::Q5_K => 176,
        _ => 210,
    }
}

/// The GEMM kernel reads K-quant blocks as stored: linear and convolution outputs equal CPU
/// products with `dequantize` (ggml's formulas, checked bit-exact against gguf-py in tests/gguf.rs),
/// for random blocks and for our quantizer's.
async fn k_quant_kernels_decode_as_ggml(gpu: &Gpu) {
    for (f, format) in K_FORMATS.into_iter().enumerate() {
        for (m, k, n) in [(7, 256, 5), (33, 512, 70), (2, 768, 3)] {
            let seed = 60 + f as u64;
            let x = stored(gpu, &random(m * k, seed));
            for (label, q) in [("random blocks", random_k_blocks(format, n, k, seed + 1, 0.05)), ("quantized", quantize(&weights(n, k, seed + 2), n, k, format).unwrap())] {
                let w = dequantize(&q);
                let y = gpu.linear(&gpu.upload(&x, &[m, k]).unwrap(), &Weight::Quant(QuantTensor::upload(gpu, &q, "k.weight").unwrap()), None).unwrap();
                let what = format!("linear {format:?} {label} {:?} m={m} k={k} n={n}", gpu.dtype);
                let (got, want) = (gpu.read(&y).await.unwrap(), cpu_linear(&x, &w, None, m, n, k));
                eprintln!("{what}: relative error {:.2e}", rel_error(&got, &want));
                assert_close(&what, &got, &want, tolerance(gpu));
            }
        }
        // Convolutions whose cin·k·k is whole blocks: 1×1 over 256 channels, 3×3 over 256.
        for (i, (cin, cout, kernel)) in [(256, 6, 1), (256, 5, 3)].into_iter().enumerate() {
            let dims = (1, cin, 5, 4);
            let x = stored(gpu, &random(cin * 20, 70 + i as u64));
            let q = random_k_blocks(format, cout, cin * kernel * kernel, 80 + i as u64, 0.02);
            let pad = [kernel / 2; 4];
            let y = gpu.conv2d(&gpu.upload(&x, &[1, cin, 5, 4]).unwrap(), &Weight::Quant(QuantTensor::upload(gpu, &q, "k.conv").unwrap()), kernel, None, 1, pad).unwrap();
            let (want, _, _) = cpu_conv(&x, &dequantize(&q), None, dims, cout, kernel, 1, pad);
            assert_close(&format!("conv2d {format:?} {kernel}x{kernel} {:?}", gpu.dtype), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
        }
    }
}

async fn quant_ops_reject_mismatches(gpu: &Gpu) {
    let (k, n) = (45, 7);
    let q = quantize(&weights(n, k, 50), n, k, QuantFormat::Q8_0).unwrap();
    let qt = QuantTensor::upload(gpu, &q, "w").unwrap();
    let x = gpu.upload(&random(2 * k, 51), &[2, k]).unwrap();
    assert!(gpu.linear(&gpu.upload(&random(2 * 44, 52), &[2, 44]).unwrap(), &Weight::Quant(qt.clone()), None).is_err(), "k mismatch");
    assert!(gpu.linear(&x, &Weight::Quant(qt.clone()), Some(&gpu.upload(&random(n + 1, 53), &[n + 1]).unwrap())).is_err(), "bias length");
    assert!(gpu.linear(&gpu.upload_u32(&[0; 90], &[2, k]).unwrap(), &Weight::Quant(qt.clone()), None).is_err(), "u32 input");
    assert!(gpu.linear(&x, &Weight::Quant(qt.clone()), None).is_ok());
    // conv: weight cols must be cin·k·k (45 = 5·3·3).
    let img = gpu.upload(&random(5 * 4 * 4, 54), &[1, 5, 4, 4]).unwrap();
    assert!(gpu.conv2d(&img, &Weight::Quant(qt.clone()), 3, None, 1, [1; 4]).is_ok());
    assert!(gpu.conv2d(&img, &Weight::Quant(qt.clone()), 1, None, 1, [0; 4]).is_err(), "kernel size mismatch");
    assert!(gpu.conv2d(&gpu.upload(&random(4 * 16, 55), &[1, 4, 4, 4]).unwrap(), &Weight::Quant(qt.clone()), 3, None, 1, [1; 4]).is_err(), "cin mismatch");
    assert!(gpu.conv2d(&img, &Weight::Quant(qt.clone()), 3, None, 0, [1; 4]).is_err(), "stride 0");
    assert!(gpu.conv2d(&gpu.upload(&random(5 * 2 * 2, 56), &[1, 5, 2, 2]).unwrap(), &Weight::Quant(qt.clone()), 3, None, 1, [0; 4]).is_err(), "input smaller than the kernel");
    assert!(gpu.conv2d(&img.reshape(&[5, 4, 4]).unwrap(), &Weight::Quant(qt.clone()), 3, None, 1, [1; 4]).is_err(), "3-D input");
    // Inconsistent planes are refused at upload, naming the weight.
    let mut broken = q.clone();
    broken.data.pop();
    let e = QuantTensor::upload(gpu, &broken, "unet.down.0.proj.weight").unwrap_err().to_string();
    assert!(e.contains("unet.down.0.proj.weight"), "{e}");
}
