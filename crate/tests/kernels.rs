//! Every kernel against a CPU reference, on shapes that are not multiples of the tile sizes, in f32
//! and (where the adapter has shader-f16) f16.

mod common;

use common::{assert_close, cpu_conv, random, stored, tolerance};
use sdxl::ops::{Activation, Addend};
use sdxl::quant::Weight;
use sdxl::{DType, Error, Gpu};

gpu_tests!(
    linear_with_bias,
    attention_cross,
    attention_causal,
    attention_long_and_wide,
    layer_norm_rows,
    group_norm_with_and_without_silu,
    activations,
    linear_geglu_fused,
    linear_big_tiles,
    gemm_every_tiling,
    gemm_epilogue_addends,
    elementwise_and_broadcast,
    concat_axes,
    embedding_chunked,
    conv2d_variants,
    upsample_nearest,
    timestep_embedding,
    narrow_first_axis,
    transpose_last_axes,
    resize_nearest_like_torch,
    conv2d_asymmetric_padding,
    affine_clamp_exp,
    cast_between_float_types,
    mixed_float_types_are_refused,
);

fn cpu_matmul_bt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).sum::<f64>() as f32;
        }
    }
    c
}

async fn linear_with_bias(gpu: &Gpu) {
    let (m, k, n) = (2 * 37, 53, 29);
    let (x, w, b) = (stored(gpu, &random(m * k, 1)), stored(gpu, &random(n * k, 2)), stored(gpu, &random(n, 3)));
    let y = gpu
        .linear(&gpu.upload(&x, &[2, 37, k]).unwrap(), &dense(gpu, &w, &[n, k]), Some(&gpu.upload(&b, &[n]).unwrap()))
        .unwrap();
    assert_eq!(y.shape(), [2, 37, n]);
    let mut want = cpu_matmul_bt(&x, &w, m, n, k);
    want.iter_mut().enumerate().for_each(|(i, v)| *v += b[i % n]);
    assert_close("linear", &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    let no_bias = gpu.linear(&gpu.upload(&x, &[m, k]).unwrap(), &dense(gpu, &w, &[n, k]), None).unwrap();
    assert_close("linear without bias", &gpu.read(&no_bias).await.unwrap(), &cpu_matmul_bt(&x, &w, m, n, k), tolerance(gpu));
    assert!(gpu.linear(&gpu.upload(&x, &[m, k]).unwrap(), &dense(gpu, &w, &[k, n]), None).is_err(), "shape mismatch must be an error");
}

fn dense(gpu: &Gpu, values: &[f32], shape: &[usize]) -> Weight {
    Weight::Dense(gpu.upload(values, shape).unwrap())
}

/// A product big enough for the 128 × 128 tiles, with partial tiles on both edges.
async fn linear_big_tiles(gpu: &Gpu) {
    let (m, k, n) = (1030, 19, 3600);
    let (x, w, b) = (stored(gpu, &random(m * k, 61)), stored(gpu, &random(n * k, 62)), stored(gpu, &random(n, 63)));
    let y = gpu.linear(&gpu.upload(&x, &[m, k]).unwrap(), &dense(gpu, &w, &[n, k]), Some(&gpu.upload(&b, &[n]).unwrap())).unwrap();
    let mut want = cpu_matmul_bt(&x, &w, m, n, k);
    want.iter_mut().enumerate().for_each(|(i, v)| *v += b[i % n]);
    assert_close("linear, big tiles", &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
}

/// Every tiling of the GEMM (ops_gemm.rs `Tiling`) with partial tiles on its edges: narrow rows
/// (4 to 32 tokens, a small image's deep levels; plain and fused with GEGLU), narrow columns (few
/// output features; a convolution's few pixels), square 64 × 64 (128 × 128: `linear_big_tiles`).
async fn gemm_every_tiling(gpu: &Gpu) {
    for (m, k, n) in [(3, 40, 300), (7, 40, 260), (13, 33, 130), (29, 17, 200), (150, 21, 3), (150, 21, 7), (130, 21, 13), (300, 19, 31), (70, 23, 90)] {
        let (x, w, b) = (stored(gpu, &random(m * k, 64)), stored(gpu, &random(n * k, 65)), stored(gpu, &random(n, 66)));
        let (tx, tw, tb) = (gpu.upload(&x, &[m, k]).unwrap(), dense(gpu, &w, &[n, k]), gpu.upload(&b, &[n]).unwrap());
        let mut proj = cpu_matmul_bt(&x, &w, m, n, k);
        proj.iter_mut().enumerate().for_each(|(i, v)| *v += b[i % n]);
        let y = gpu.linear(&tx, &tw, Some(&tb)).unwrap();
        assert_close(&format!("linear {m}x{k}->{n}"), &gpu.read(&y).await.unwrap(), &proj, tolerance(gpu));
        let half = n / 2;
        if m < n && n % 2 == 0 {
            let want: Vec<f32> = proj.chunks(n).flat_map(|r| (0..half).map(move |j| r[j] * cpu_gelu(r[half + j]))).collect();
            let y = gpu.linear_geglu(&tx, &tw, Addend::bias(Some(&tb))).unwrap();
            assert_close(&format!("linear_geglu {m}x{k}->{half}"), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
        }
    }
    for (n, side, cin, cout) in [(2, 2, 7, 150), (1, 3, 7, 140), (2, 4, 5, 70), (1, 5, 5, 131), (1, 6, 3, 9)] {
        let x = stored(gpu, &random(n * cin * side * side, 67));
        let (wt, b) = (stored(gpu, &random(cout * cin * 9, 68)), stored(gpu, &random(cout, 69)));
        let y = gpu.conv2d(&gpu.upload(&x, &[n, cin, side, side]).unwrap(), &dense(gpu, &wt, &[cout, cin, 3, 3]), 3, Some(&gpu.upload(&b, &[cout]).unwrap()), 1, [1; 4]).unwrap();
        let (want, _, _) = cpu_conv(&x, &wt, Some(&b), (n, cin, side, side), cout, 3, 1, [1; 4]);
        assert_close(&format!("conv {n}x{cin}x{side}x{side} -> {cout}"), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    }
}

/// What the GEMM adds in its epilogue: a bias and a residual together (a skip connection), a
/// convolution's bias per image and channel (a resnet's time embedding); mismatched shapes refused.
async fn gemm_epilogue_addends(gpu: &Gpu) {
    let (m, k, n) = (37, 19, 70);
    let (x, w, b, r) = (stored(gpu, &random(m * k, 71)), stored(gpu, &random(n * k, 72)), stored(gpu, &random(n, 73)), stored(gpu, &random(m * n, 74)));
    let (tx, tw, tb, tr) = (gpu.upload(&x, &[m, k]).unwrap(), dense(gpu, &w, &[n, k]), gpu.upload(&b, &[n]).unwrap(), gpu.upload(&r, &[m, n]).unwrap());
    let y = gpu.linear_add(&tx, &tw, Addend { bias: Some(&tb), residual: Some(&tr) }).unwrap();
    let want: Vec<f32> = cpu_matmul_bt(&x, &w, m, n, k).iter().enumerate().map(|(i, v)| v + b[i % n] + r[i]).collect();
    assert_close("linear + bias + residual", &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    assert!(gpu.linear_add(&tx, &tw, Addend::residual(&tb)).is_err(), "a residual must be shaped as the output");
    assert!(gpu.linear_add(&tx, &tw, Addend::bias(Some(&tr))).is_err(), "a linear's bias is a vector");

    let (images, cin, side, cout) = (2, 5, 6, 9);
    let x = stored(gpu, &random(images * cin * side * side, 75));
    let (wt, per_image) = (stored(gpu, &random(cout * cin * 9, 76)), stored(gpu, &random(images * cout, 77)));
    let r = stored(gpu, &random(images * cout * side * side, 78));
    let tx = gpu.upload(&x, &[images, cin, side, side]).unwrap();
    let (tw, tb, tr) = (dense(gpu, &wt, &[cout, cin, 3, 3]), gpu.upload(&per_image, &[images, cout]).unwrap(), gpu.upload(&r, &[images, cout, side, side]).unwrap());
    let y = gpu.conv2d_add(&tx, &tw, 3, Addend { bias: Some(&tb), residual: Some(&tr) }, 1, [1; 4]).unwrap();
    let (conv, _, _) = cpu_conv(&x, &wt, None, (images, cin, side, side), cout, 3, 1, [1; 4]);
    let want: Vec<f32> = conv.iter().enumerate().map(|(i, v)| v + per_image[i / (side * side)] + r[i]).collect();
    assert_close("conv + bias per image and channel + residual", &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    assert!(gpu.conv2d_add(&tx, &tw, 3, Addend::bias(Some(&tr)), 1, [1; 4]).is_err(), "a convolution's bias is [cout] or [images, cout]");
}

/// softmax(q kᵀ / sqrt(d)) v per batch and head over [batch, tokens, heads * d].
#[allow(clippy::too_many_arguments)]
fn cpu_attention(q: &[f32], k: &[f32], v: &[f32], b: usize, lq: usize, lk: usize, heads: usize, d: usize, causal: bool) -> Vec<f32> {
    let w = heads * d;
    let mut out = vec![0.0; b * lq * w];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..lq {
                let kept = if causal { i + 1 } else { lk };
                let scores: Vec<f64> = (0..kept)
                    .map(|j| (0..d).map(|e| q[(bi * lq + i) * w + h * d + e] as f64 * k[(bi * lk + j) * w + h * d + e] as f64).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                for e in 0..d {
                    out[(bi * lq + i) * w + h * d + e] =
                        (0..kept).map(|j| (scores[j] - mx).exp() / z * v[(bi * lk + j) * w + h * d + e] as f64).sum::<f64>() as f32;
                }
            }
        }
    }
    out
}

async fn check_attention(gpu: &Gpu, b: usize, lq: usize, lk: usize, heads: usize, d: usize, causal: bool) {
    let w = heads * d;
    let q = stored(gpu, &random(b * lq * w, 6).iter().map(|x| x * 3.0).collect::<Vec<_>>());
    let k = stored(gpu, &random(b * lk * w, 7));
    let v = stored(gpu, &random(b * lk * w, 8));
    let y = gpu
        .attention(&gpu.upload(&q, &[b, lq, w]).unwrap(), &gpu.upload(&k, &[b, lk, w]).unwrap(), &gpu.upload(&v, &[b, lk, w]).unwrap(), heads, causal)
        .unwrap();
    assert_close("attention", &gpu.read(&y).await.unwrap(), &cpu_attention(&q, &k, &v, b, lq, lk, heads, d, causal), 2.0 * tolerance(gpu));
}

async fn attention_cross(gpu: &Gpu) {
    check_attention(gpu, 2, 13, 21, 3, 5, false).await;
    check_attention(gpu, 1, 33, 17, 2, 24, false).await;
}

async fn attention_causal(gpu: &Gpu) {
    check_attention(gpu, 2, 17, 17, 3, 7, true).await;
}

/// Several key tiles, a partial last tile, SDXL's head size, the widest head of the flash kernel
/// (fewer keys per tile), and a wider single head (the VAE's case: chunked through the GEMM).
async fn attention_long_and_wide(gpu: &Gpu) {
    check_attention(gpu, 1, 70, 300, 2, 64, false).await;
    check_attention(gpu, 1, 9, 40, 1, 128, false).await;
    check_attention(gpu, 2, 21, 40, 1, 130, false).await;
    check_attention(gpu, 1, 130, 130, 2, 64, true).await;
}

fn cpu_normalize(x: &[f32], eps: f32) -> Vec<f32> {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    x.iter().map(|&v| ((v as f64 - mean) / (var + eps as f64).sqrt()) as f32).collect()
}

async fn layer_norm_rows(gpu: &Gpu) {
    let (rows, cols) = (5, 300);
    let x: Vec<f32> = stored(gpu, &random(rows * cols, 10).iter().map(|v| v * 4.0 + 2.0).collect::<Vec<_>>());
    let (g, b) = (stored(gpu, &random(cols, 11)), stored(gpu, &random(cols, 12)));
    let y = gpu.layer_norm(&gpu.upload(&x, &[rows, cols]).unwrap(), &gpu.upload(&g, &[cols]).unwrap(), &gpu.upload(&b, &[cols]).unwrap(), 1e-5).unwrap();
    let want: Vec<f32> = x.chunks(cols).flat_map(|r| cpu_normalize(r, 1e-5).into_iter().enumerate().map(|(i, v)| v * g[i] + b[i])).collect();
    assert_close("layer_norm", &gpu.read(&y).await.unwrap(), &want, 2.0 * tolerance(gpu));
}

async fn group_norm_with_and_without_silu(gpu: &Gpu) {
    let (n, c, h, w, groups) = (2, 12, 7, 5, 4);
    let hw = h * w;
    let x: Vec<f32> = stored(gpu, &random(n * c * hw, 13).iter().map(|v| v * 3.0 - 1.0).collect::<Vec<_>>());
    let (g, b) = (stored(gpu, &random(c, 14)), stored(gpu, &random(c, 15)));
    for silu in [false, true] {
        let y = gpu
            .group_norm(&gpu.upload(&x, &[n, c, h, w]).unwrap(), groups, &gpu.upload(&g, &[c]).unwrap(), &gpu.upload(&b, &[c]).unwrap(), 1e-6, silu)
            .unwrap();
        let per = c / groups * hw;
        let want: Vec<f32> = x
            .chunks(per)
            .enumerate()
            .flat_map(|(set, chunk)| {
                let c0 = (set % groups) * (c / groups);
                cpu_normalize(chunk, 1e-6).into_iter().enumerate().map(move |(i, v)| (c0 + i / hw, v))
            })
            .map(|(ch, v)| v * g[ch] + b[ch])
            .map(|v| if silu { v / (1.0 + (-v).exp()) } else { v })
            .collect();
        assert_close("group_norm", &gpu.read(&y).await.unwrap(), &want, 2.0 * tolerance(gpu));
    }
}

/// erf by its Maclaurin series (converges fast for |x| <= 6 in f64).
fn erf(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn cpu_gelu(v: f32) -> f32 {
    (0.5 * v as f64 * (1.0 + erf(v as f64 / 2f64.sqrt()))) as f32
}

async fn activations(gpu: &Gpu) {
    let x = stored(gpu, &random(1001, 16).iter().map(|v| v * 6.0).collect::<Vec<_>>());
    let t = gpu.upload(&x, &[7, 143]).unwrap();
    let cases: [(Activation, fn(f32) -> f32); 4] = [
        (Activation::Silu, |v| v / (1.0 + (-v).exp())),
        (Activation::Gelu, cpu_gelu),
        (Activation::QuickGelu, |v| v / (1.0 + (-1.702 * v).exp())),
        (Activation::Relu, |v| v.max(0.0)),
    ];
    for (act, f) in cases {
        let y = gpu.activation(&t, act).unwrap();
        assert_close(&format!("{act:?}"), &gpu.read(&y).await.unwrap(), &x.iter().map(|&v| f(v)).collect::<Vec<_>>(), tolerance(gpu));
    }
    // TAESD's tanh(x / 3) * 3 of latents / 0.5, far into saturation (no NaN where tanh's exp overflows).
    let big = gpu.upload(&stored(gpu, &x.iter().map(|v| v * 40.0).collect::<Vec<_>>()), &[7, 143]).unwrap();
    let want: Vec<f32> = gpu.read(&big).await.unwrap().iter().map(|&v| 3.0 * (2.0 * v / 3.0).tanh()).collect();
    assert_close("soft_clamp", &gpu.read(&gpu.soft_clamp(&big, 2.0, 3.0).unwrap()).await.unwrap(), &want, tolerance(gpu));
}

/// The projection fused with diffusers' GEGLU (value · gelu(gate), halves of the projection), on
/// both tile shapes.
async fn linear_geglu_fused(gpu: &Gpu) {
    for (rows, k, half) in [(3, 21, 37), (1030, 9, 1800)] {
        let x = stored(gpu, &random(rows * k, 17));
        let (w, b) = (stored(gpu, &random(2 * half * k, 18)), stored(gpu, &random(2 * half, 19)));
        let y = gpu.linear_geglu(&gpu.upload(&x, &[1, rows, k]).unwrap(), &dense(gpu, &w, &[2 * half, k]), Addend::bias(Some(&gpu.upload(&b, &[2 * half]).unwrap()))).unwrap();
        assert_eq!(y.shape(), [1, rows, half]);
        let mut proj = cpu_matmul_bt(&x, &w, rows, 2 * half, k);
        proj.iter_mut().enumerate().for_each(|(i, v)| *v += b[i % (2 * half)]);
        let want: Vec<f32> = proj.chunks(2 * half).flat_map(|r| (0..half).map(move |j| r[j] * cpu_gelu(r[half + j]))).collect();
        assert_close("linear_geglu", &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    }
}

async fn elementwise_and_broadcast(gpu: &Gpu) {
    let (n, c, hw) = (2, 5, 9);
    let a = stored(gpu, &random(n * c * hw, 18));
    let b = stored(gpu, &random(n * c * hw, 19));
    let ta = gpu.upload(&a, &[n, c, 3, 3]).unwrap();
    let tb = gpu.upload(&b, &[n, c, 3, 3]).unwrap();
    let read = |t| async move { gpu.read(&t).await.unwrap() };
    let tol = tolerance(gpu);
    assert_close("add", &read(gpu.add(&ta, &tb).unwrap()).await, &a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>(), tol);
    assert_close("mul", &read(gpu.mul(&ta, &tb).unwrap()).await, &a.iter().zip(&b).map(|(x, y)| x * y).collect::<Vec<_>>(), tol);
    assert_close("axpby", &read(gpu.axpby(1.5, &ta, -2.0, &tb).unwrap()).await, &a.iter().zip(&b).map(|(x, y)| 1.5 * x - 2.0 * y).collect::<Vec<_>>(), tol);
    assert_close("scale", &read(gpu.scale(&ta, 0.25).unwrap()).await, &a.iter().map(|x| x * 0.25).collect::<Vec<_>>(), tol);
    let row = stored(gpu, &random(3, 20));
    let want: Vec<f32> = a.iter().enumerate().map(|(i, x)| x + row[i % 3]).collect();
    assert_close("add suffix", &read(gpu.add(&ta, &gpu.upload(&row, &[3]).unwrap()).unwrap()).await, &want, tol);
    let per_c = stored(gpu, &random(c, 21));
    assert!(gpu.add(&ta, &gpu.upload(&per_c, &[c]).unwrap()).is_err(), "a non-suffix shape must not broadcast");
}

async fn concat_axes(gpu: &Gpu) {
    let (a, b) = (stored(gpu, &random(2 * 3 * 4, 23)), stored(gpu, &random(2 * 5 * 4, 24)));
    let y = gpu.concat(&gpu.upload(&a, &[2, 3, 4]).unwrap(), &gpu.upload(&b, &[2, 5, 4]).unwrap(), 1).unwrap();
    assert_eq!(y.shape(), [2, 8, 4]);
    let want: Vec<f32> = (0..2).flat_map(|o| a[o * 12..o * 12 + 12].iter().chain(&b[o * 20..o * 20 + 20]).copied().collect::<Vec<_>>()).collect();
    assert_close("concat axis 1", &gpu.read(&y).await.unwrap(), &want, 0.0);
    let (c, d) = (stored(gpu, &random(3 * 2, 25)), stored(gpu, &random(3 * 7, 26)));
    let y = gpu.concat(&gpu.upload(&c, &[1, 3, 2]).unwrap(), &gpu.upload(&d, &[1, 3, 7]).unwrap(), 2).unwrap();
    let want: Vec<f32> = (0..3).flat_map(|o| c[o * 2..o * 2 + 2].iter().chain(&d[o * 7..o * 7 + 7]).copied().collect::<Vec<_>>()).collect();
    assert_close("concat last axis", &gpu.read(&y).await.unwrap(), &want, 0.0);
    let y = gpu.concat(&gpu.upload(&c, &[3, 2]).unwrap(), &gpu.upload(&c, &[3, 2]).unwrap(), 0).unwrap();
    assert_close("concat axis 0", &gpu.read(&y).await.unwrap(), &[c.clone(), c.clone()].concat(), 0.0);
}

async fn embedding_chunked(gpu: &Gpu) {
    let (rows, dim) = (50, 7);
    let table = stored(gpu, &random(rows * dim, 27));
    let chunks: Vec<_> = [(0, 20), (20, 40), (40, 50)]
        .iter()
        .map(|&(r0, r1)| gpu.upload(&table[r0 * dim..r1 * dim], &[r1 - r0, dim]).unwrap())
        .collect();
    let ids = [49u32, 0, 19, 20, 33, 40, 7, 49, 21];
    let y = gpu.embedding(&gpu.upload_u32(&ids, &[ids.len()]).unwrap(), &chunks).unwrap();
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
    assert_close("embedding", &gpu.read(&y).await.unwrap(), &want, 0.0);
}

async fn conv2d_variants(gpu: &Gpu) {
    let (n, cin, h, w, cout) = (2, 5, 9, 7, 6);
    let x = stored(gpu, &random(n * cin * h * w, 28));
    let tx = gpu.upload(&x, &[n, cin, h, w]).unwrap();
    for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
        let wt = stored(gpu, &random(cout * cin * k * k, 29 + k as u64));
        let b = stored(gpu, &random(cout, 31));
        let y = gpu.conv2d(&tx, &dense(gpu, &wt, &[cout, cin, k, k]), k, Some(&gpu.upload(&b, &[cout]).unwrap()), stride, [pad; 4]).unwrap();
        let (want, oh, ow) = cpu_conv(&x, &wt, Some(&b), (n, cin, h, w), cout, k, stride, [pad; 4]);
        assert_eq!(y.shape(), [n, cout, oh, ow], "conv {k}x{k} stride {stride}");
        assert_close(&format!("conv {k}x{k} stride {stride}"), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    }
}

async fn upsample_nearest(gpu: &Gpu) {
    let (p, h, w) = (6, 5, 4);
    let x = stored(gpu, &random(p * h * w, 32));
    let y = gpu.upsample_nearest2x(&gpu.upload(&x, &[2, 3, h, w]).unwrap()).unwrap();
    assert_eq!(y.shape(), [2, 3, 2 * h, 2 * w]);
    let want: Vec<f32> = (0..p * 4 * h * w)
        .map(|i| {
            let (pl, r) = (i / (4 * h * w), i % (4 * h * w));
            x[(pl * h + r / (2 * w) / 2) * w + (r % (2 * w)) / 2]
        })
        .collect();
    assert_close("upsample", &gpu.read(&y).await.unwrap(), &want, 0.0);
}

async fn timestep_embedding(gpu: &Gpu) {
    let t = [0.0f32, 1.0, 500.5, 999.0];
    for (dim, flip, shift) in [(32usize, true, 0.0f32), (33, false, 1.0)] {
        let y = gpu.timestep_embedding(&gpu.upload_f32(&t, &[4]).unwrap(), dim, flip, shift, 1.0, 10000.0).unwrap();
        let half = dim / 2;
        let mut want = vec![0.0; 4 * dim];
        for (r, &tv) in t.iter().enumerate() {
            for f in 0..half {
                // torch computes the argument in f32; only sin/cos of it are exact here.
                let freq = (-(10000f32.ln()) * f as f32 / (half as f32 - shift)).exp();
                let arg = (tv * freq) as f64;
                let (first, second) = if flip { (arg.cos(), arg.sin()) } else { (arg.sin(), arg.cos()) };
                want[r * dim + f] = first as f32;
                want[r * dim + half + f] = second as f32;
            }
        }
        let tol = if gpu.dtype == sdxl::DType::F32 { 2e-4 } else { 2e-3 };
        assert_close(&format!("timestep dim {dim}"), &gpu.read(&y).await.unwrap(), &want, tol);
    }
}

async fn narrow_first_axis(gpu: &Gpu) {
    let x = stored(gpu, &random(3 * 4 * 2, 40));
    let t = gpu.upload(&x, &[3, 4, 2]).unwrap();
    let y = gpu.narrow(&t, 1, 2).unwrap();
    assert_eq!(y.shape(), [2, 4, 2]);
    assert_close("narrow", &gpu.read(&y).await.unwrap(), &x[8..], 0.0);
    assert!(gpu.narrow(&t, 2, 2).is_err(), "out-of-range narrow must be an error");
}

async fn conv2d_asymmetric_padding(gpu: &Gpu) {
    // diffusers' Downsample2D with padding 0: F.pad(x, (0, 1, 0, 1)) then a 3x3 stride-2 conv; and
    // a general [top, bottom, left, right], checked against the CPU conv of the explicitly padded input.
    let (n, cin, h, w, cout, k) = (2, 3, 7, 10, 4, 3);
    let x = stored(gpu, &random(n * cin * h * w, 41));
    let wt = stored(gpu, &random(cout * cin * k * k, 42));
    let b = stored(gpu, &random(cout, 43));
    let (tx, tw, tb) = (gpu.upload(&x, &[n, cin, h, w]).unwrap(), dense(gpu, &wt, &[cout, cin, k, k]), gpu.upload(&b, &[cout]).unwrap());
    for (stride, [top, bottom, left, right]) in [(2, [0, 1, 0, 1]), (1, [2, 0, 1, 3])] {
        let (ph, pw) = (h + top + bottom, w + left + right);
        let mut padded = vec![0.0; n * cin * ph * pw];
        for plane in 0..n * cin {
            for y in 0..h {
                for xx in 0..w {
                    padded[(plane * ph + y + top) * pw + xx + left] = x[(plane * h + y) * w + xx];
                }
            }
        }
        let (want, oh, ow) = cpu_conv(&padded, &wt, Some(&b), (n, cin, ph, pw), cout, k, stride, [0; 4]);
        let y = gpu.conv2d(&tx, &tw, k, Some(&tb), stride, [top, bottom, left, right]).unwrap();
        assert_eq!(y.shape(), [n, cout, oh, ow], "conv pad {top} {bottom} {left} {right}");
        assert_close(&format!("conv pad {top} {bottom} {left} {right}"), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    }
}

async fn affine_clamp_exp(gpu: &Gpu) {
    let x: Vec<f32> = stored(gpu, &random(1000, 44)).iter().map(|v| v * 3.0).collect();
    let t = gpu.upload(&x, &[10, 100]).unwrap();
    let inf = f32::INFINITY;
    for (scale, shift, exp, (lo, hi)) in [(0.5, 0.5, false, (0.0, 1.0)), (1.0, 0.0, false, (-1.5, 2.0)), (0.5, -0.25, true, (-inf, inf))] {
        let y = gpu.affine(&t, scale, shift, exp, (lo, hi)).unwrap();
        assert_eq!(y.shape(), [10, 100]);
        let want: Vec<f32> = x
            .iter()
            .map(|&v| {
                let a = scale * v + shift;
                (if exp { a.exp() } else { a }).clamp(lo, hi)
            })
            .collect();
        assert_close(&format!("affine {scale} {shift} {exp} {lo}..{hi}"), &gpu.read(&y).await.unwrap(), &want, tolerance(gpu));
    }
    assert!(gpu.affine(&t, 1.0, 0.0, false, (1.0, 0.0)).is_err(), "inverted clamp bounds must be an error");
}

async fn transpose_last_axes(gpu: &Gpu) {
    let (b, rows, cols) = (2, 5, 7);
    let x = stored(gpu, &random(b * rows * cols, 41));
    let y = gpu.transpose(&gpu.upload(&x, &[b, rows, cols]).unwrap()).unwrap();
    assert_eq!(y.shape(), [b, cols, rows]);
    let want: Vec<f32> = (0..b * rows * cols).map(|i| x[(i / (rows * cols)) * rows * cols + (i % rows) * cols + (i / rows) % cols]).collect();
    assert_close("transpose", &gpu.read(&y).await.unwrap(), &want, 0.0);
}

/// F.interpolate(mode="nearest", size=...): src = min(floor(dst * (in / out)), in - 1), scale in f32.
async fn resize_nearest_like_torch(gpu: &Gpu) {
    for (h, w, oh, ow) in [(3, 5, 5, 9), (5, 3, 9, 6), (4, 4, 7, 8), (2, 3, 2, 3)] {
        let x = stored(gpu, &random(2 * h * w, 42));
        let y = gpu.upsample_nearest(&gpu.upload(&x, &[2, h, w]).unwrap(), oh, ow).unwrap();
        assert_eq!(y.shape(), [2, oh, ow]);
        let src = |d: usize, i: usize, o: usize| ((d as f32 * (i as f32 / o as f32)).floor() as usize).min(i - 1);
        let want: Vec<f32> = (0..2 * oh * ow).map(|k| x[(k / (oh * ow)) * h * w + src((k % (oh * ow)) / ow, h, oh) * w + src(k % ow, w, ow)]).collect();
        assert_close(&format!("resize {h}x{w} -> {oh}x{ow}"), &gpu.read(&y).await.unwrap(), &want, 0.0);
    }
}

/// f16 -> f32 is exact, and f32 -> f16 gives f16 values back bit for bit (subnormals, ±65504 and
/// an odd length included); a cast to a tensor's own type is that tensor. Without shader-f16
/// (SwiftShader) no op takes an f16 tensor, a cast included.
async fn cast_between_float_types(gpu: &Gpu) {
    let mut values: Vec<f32> = random(1001, 43).iter().map(|v| half::f16::from_f32(300.0 * v).to_f32()).collect();
    values[..6].copy_from_slice(&[0.0, -0.0, 5.960_464_5e-8, -6.097_555e-5, 65504.0, -65504.0]);
    let wide = gpu.upload_f32(&values, &[7, 11, 13]).unwrap();
    let narrow = gpu.upload_as(&values, &[7, 11, 13], DType::F16, "f16 values").unwrap();
    assert_eq!(gpu.read(&gpu.cast(&wide, DType::F32).unwrap()).await.unwrap(), values, "f32 -> f32");
    if !gpu.has_shader_f16 {
        for (x, to) in [(&wide, DType::F16), (&narrow, DType::F32)] {
            match gpu.cast(x, to) {
                Err(Error::InvalidParameter(m)) => assert!(m.contains("shader-f16"), "unclear message: {m}"),
                other => panic!("a cast to {to:?} without shader-f16 gave {other:?}"),
            }
        }
        return;
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (x, to) in [(&narrow, DType::F32), (&wide, DType::F16)] {
        let y = gpu.cast(x, to).unwrap();
        assert_eq!((y.dtype(), y.shape()), (to, &[7, 11, 13][..]));
        assert_eq!(bits(&gpu.read(&y).await.unwrap()), bits(&values), "cast to {to:?}");
    }
    assert!(matches!(gpu.cast(&wide, DType::U32), Err(Error::InvalidParameter(_))), "a cast to u32 was accepted");
}

/// An op's inputs share one float type: an f32 activation with an f16 one (or an f16 bias) is an
/// error naming both, not a kernel reading half of the bytes.
async fn mixed_float_types_are_refused(gpu: &Gpu) {
    if !gpu.has_shader_f16 {
        return;
    }
    let values = stored(gpu, &random(24, 44));
    let (wide, narrow) = (gpu.upload_f32(&values, &[2, 3, 4]).unwrap(), gpu.upload_as(&values, &[2, 3, 4], DType::F16, "x").unwrap());
    let message = |r: sdxl::Result<sdxl::Tensor>| match r {
        Err(Error::InvalidParameter(m)) => m,
        other => panic!("mixed float types gave {other:?}"),
    };
    let m = message(gpu.add(&wide, &narrow));
    assert!(m.contains("add") && m.contains("F16") && m.contains("F32") && m.contains("cast"), "unclear message: {m}");
    let weight = Weight::Dense(gpu.upload_f32(&values[..12], &[3, 4]).unwrap());
    let bias = gpu.upload_as(&values[..3], &[3], DType::F16, "bias").unwrap();
    let m = message(gpu.linear(&wide, &weight, Some(&bias)));
    assert!(m.contains("linear") && m.contains("bias is F16"), "unclear message: {m}");
    // The weight's storage is free: f16 weights with f32 activations compute in f32.
    let y = gpu.linear(&wide, &Weight::Dense(gpu.upload_as(&values[..12], &[3, 4], DType::F16, "w").unwrap()), None).unwrap();
    assert_eq!(y.dtype(), DType::F32);
}
