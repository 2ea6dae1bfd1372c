// Register-blocked GEMM behind nn.Linear and nn.Conv2d, for every weight format: dense T (f16 or
// f32) and the block-quantized formats of crate/src/quant.rs, dequantized as tiles are loaded.
//
// out[row, col] = Σ_k A[row, k] · B[k, col]; a WX × WY workgroup computes a BM × BN tile, each
// invocation an RM × RN block of it (rows ty·RM.., cols tx·RN..) in registers, stepping k by BK
// through workgroup memory held as vec4s so that one load feeds four multiply-adds.
//   linear: A = x [m, k], B = Wᵀ (W [n, k]), out [m, n]; optionally fused with GEGLU.
//   conv2d (implicit GEMM): A = W [cout, cin·ks·ks], B = im2col(x) with every image's oh·ow pixels
//   side by side as columns (each weight loaded once per batch), out [n, cout, oh·ow].
// The prelude (ops_gemm.rs, `Tiling`) defines the workgroup shape WX × WY and RM, RN (4 or 8; bigger
// blocks reuse each loaded value more, smaller ones leave fewer idle invocations on small problems,
// narrow workgroups fit outputs with few rows or columns) and, unrolled, the accumulators
// (private vec4s, never a dynamically indexed array, which GPU compilers may leave in slow local
// memory), `multiply_tiles(tx, ty)`, the BK-slice product of the workgroup's tiles (between barriers, so
// the tiles are complete before and free to overwrite after), and
// `acc_at(r, c)`, the invocation's output (row r, col c) of its block. Accumulation is f32.
// The epilogue adds a bias (BIAS_CHANNEL: a vector over output rows / channels; BIAS_IMAGE_CHANNEL,
// convolutions: one per image and channel, a resnet's time embedding folded with its bias) and,
// with p.residual, a whole tensor shaped as the output before GEGLU: a skip connection, or a
// LoRA's low-rank term computed beforehand (crate/src/adapt.rs) with the bias and skip in it.

// Params and FORMAT_* / BIAS_*: generated from crate/src/ops_gemm.rs (GemmParams, WeightFormat,
// BiasKind).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> wq: array<u32>; // weight codes, or dense values
@group(0) @binding(3) var<storage, read> wscale: array<u32>; // block parameters (unused dense)
@group(0) @binding(4) var<storage, read_write> out: array<T>;
@group(0) @binding(5) var<storage, read> bias: array<T>;
@group(0) @binding(6) var<storage, read> residual: array<T>;

const BM: u32 = WY * RM;
const BN: u32 = WX * RN;
const BK: u32 = 16u;
const THREADS: u32 = WX * WY;

var<workgroup> sa: array<vec4<f32>, BK * BM / 4u>; // [k][row / 4]
var<workgroup> sb: array<vec4<f32>, BK * BN / 4u>; // [k][col / 4]

// f16 bits to f32, subnormals included (no reliance on the device's f16 denormal handling).
fn half_to_f32(h: u32) -> f32 {
    let e = (h >> 10u) & 0x1fu;
    let mant = h & 0x3ffu;
    var v = f32(mant) * 5.9604645e-8; // 2^-24
    if (e != 0u) {
        v = bitcast<f32>(((e + 112u) << 23u) | (mant << 13u));
    }
    return select(v, -v, (h & 0x8000u) != 0u);
}

// Scale of block `blk` where two blocks share a word (Q8_0, Q4_0).
fn paired_scale(blk: u32) -> f32 {
    return half_to_f32((wscale[blk / 2u] >> (16u * (blk % 2u))) & 0xffffu);
}

fn dense_at(e: u32) -> f32 {
    if (p.format == FORMAT_F32) {
        return bitcast<f32>(wq[e]);
    }
    let pair = unpack2x16float(wq[e / 2u]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
}

// Byte `b` of the K-quant block starting at word `w0`.
fn kbyte(w0: u32, b: u32) -> u32 {
    return (wq[w0 + b / 4u] >> (8u * (b % 4u))) & 0xffu;
}

// The f16 at byte `b` (even) of the block at word `w0`.
fn khalf(w0: u32, b: u32) -> f32 {
    return half_to_f32((wq[w0 + b / 4u] >> (8u * (b % 4u))) & 0xffffu);
}

// The four bytes of word `b / 4` (b a multiple of 4) of the block at `w0`, one per lane.
fn kbytes4(w0: u32, b: u32) -> vec4<u32> {
    return (vec4<u32>(wq[w0 + b / 4u]) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
}

// Values i .. i + 3 (i a multiple of 4) of a K-quant block (crate/src/quant/kquants.rs, ggml's
// dequantize_row_*_K; the four share a sub-block and a code byte).
fn kquant4(w0: u32, i: u32) -> vec4<f32> {
    if (p.format == FORMAT_Q4_K || p.format == FORMAT_Q5_K) {
        let chunk = i / 64u;
        let l = i % 64u;
        let sub = 2u * chunk + l / 32u;
        var sc: u32;
        var m: u32;
        if (sub < 4u) {
            sc = kbyte(w0, 4u + sub) & 63u;
            m = kbyte(w0, 8u + sub) & 63u;
        } else {
            sc = (kbyte(w0, 8u + sub) & 15u) | ((kbyte(w0, sub) >> 6u) << 4u);
            m = (kbyte(w0, 8u + sub) >> 4u) | ((kbyte(w0, 4u + sub) >> 6u) << 4u);
        }
        var qs = 16u;
        if (p.format == FORMAT_Q5_K) {
            qs = 48u;
        }
        var q = (kbytes4(w0, qs + 32u * chunk + l % 32u) >> vec4<u32>(select(0u, 4u, l >= 32u))) & vec4<u32>(15u);
        if (p.format == FORMAT_Q5_K) {
            q = q | (((kbytes4(w0, 16u + l % 32u) >> vec4<u32>(sub)) & vec4<u32>(1u)) << vec4<u32>(4u));
        }
        let d1 = khalf(w0, 0u) * f32(sc);
        let m1 = khalf(w0, 2u) * f32(m);
        return d1 * vec4<f32>(q) - m1;
    }
    if (p.format == FORMAT_Q6_K) {
        let n = i / 128u;
        let part = (i % 128u) / 32u;
        let l = i % 32u;
        let low = (kbytes4(w0, 64u * n + l + 32u * (part % 2u)) >> vec4<u32>(4u * (part / 2u))) & vec4<u32>(15u);
        let high = (kbytes4(w0, 128u + 32u * n + l) >> vec4<u32>(2u * part)) & vec4<u32>(3u);
        let q = vec4<i32>(low | (high << vec4<u32>(4u))) - vec4<i32>(32);
        let sc = f32(bitcast<i32>(kbyte(w0, 192u + 8u * n + l / 16u + 2u * part) << 24u) >> 24u);
        return (khalf(w0, 208u) * sc) * vec4<f32>(q);
    }
    // Q2_K, Q3_K: sub-blocks of 16, codes in 2-bit planes.
    let n = i / 128u;
    let j = (i % 128u) / 32u;
    let half = (i % 32u) / 16u;
    let l = i % 16u + 16u * half;
    let s = 8u * n + 2u * j + half;
    if (p.format == FORMAT_Q2_K) {
        let sc = kbyte(w0, s);
        let q = (kbytes4(w0, 16u + 32u * n + l) >> vec4<u32>(2u * j)) & vec4<u32>(3u);
        let dl = khalf(w0, 80u) * f32(sc & 15u);
        let ml = khalf(w0, 82u) * f32(sc >> 4u);
        return dl * vec4<f32>(q) - ml;
    }
    var low: u32;
    if (s < 8u) {
        low = kbyte(w0, 96u + s) & 15u;
    } else {
        low = kbyte(w0, 96u + s - 8u) >> 4u;
    }
    let high = (kbyte(w0, 104u + s % 4u) >> (2u * (s / 4u))) & 3u;
    let dl = khalf(w0, 108u) * f32(i32(low | (high << 4u)) - 32);
    let q = vec4<i32>((kbytes4(w0, 32u + 32u * n + l) >> vec4<u32>(2u * j)) & vec4<u32>(3u));
    let h = (kbytes4(w0, l) >> vec4<u32>(4u * n + j)) & vec4<u32>(1u);
    return dl * vec4<f32>(q - select(vec4<i32>(4), vec4<i32>(0), h == vec4<u32>(1u)));
}

// u32 words of one K-quant block (crate/src/quant/kquants.rs: Q3_K and Q6_K padded).
fn kwords() -> u32 {
    switch (p.format) {
        case 5u: { return 21u; }
        case 6u: { return 28u; }
        case 7u: { return 36u; }
        case 8u: { return 44u; }
        default: { return 53u; }
    }
}

// Weight values kk .. kk + 3 of row `row` (kk a multiple of 4; zero past the matrix).
fn weight4(row: u32, kk: u32, rows: u32) -> vec4<f32> {
    if (row >= rows || kk >= p.k) {
        return vec4<f32>(0.0);
    }
    if (p.format >= FORMAT_Q2_K) {
        return kquant4((row * (p.k / 256u) + kk / 256u) * kwords(), kk % 256u);
    }
    if (p.format >= FORMAT_F16) {
        let e = row * p.k + kk;
        let n = p.k - kk; // > 0
        return vec4<f32>(dense_at(e), select(0.0, dense_at(e + 1u), n > 1u), select(0.0, dense_at(e + 2u), n > 2u),
                         select(0.0, dense_at(e + 3u), n > 3u));
    }
    let blk = row * p.blocks + kk / 32u;
    let part = (kk % 32u) / 4u;
    if (p.format == FORMAT_Q8_0) {
        let word = wq[blk * 8u + part];
        let q = bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
        return paired_scale(blk) * vec4<f32>(q);
    }
    let word = wq[blk * 4u + part / 2u] >> (16u * (part % 2u));
    let q = vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
    if (p.format == FORMAT_Q4_0) {
        return paired_scale(blk) * (q - 8.0);
    }
    let dm = wscale[blk];
    return half_to_f32(dm & 0xffffu) * q + half_to_f32(dm >> 16u);
}

// What linear output (row, weight row) adds to its product.
fn linear_addend(row: u32, wrow: u32) -> f32 {
    var v = 0.0;
    if (p.bias == BIAS_CHANNEL) {
        v = f32(bias[wrow]);
    }
    if (p.residual != 0u) {
        v = v + f32(residual[row * p.n + wrow]);
    }
    return v;
}

// Weight row of tile column `col` (tile origin n0): with GEGLU, even columns are value rows and
// odd columns the matching gate rows of the second half, so each invocation holds both.
fn linear_weight_row(n0: u32, col: u32) -> u32 {
    if (p.geglu == 0u) {
        return n0 + col;
    }
    let pair = n0 / 2u + col / 2u;
    return select(pair, p.n / 2u + pair, (col % 2u) == 1u);
}

@compute @workgroup_size(WX, WY)
fn linear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        for (var e = li; e < BM * BK; e = e + THREADS) {
            let r = e / BK;
            let c = e % BK;
            var v = 0.0;
            if (m0 + r < p.m && k0 + c < p.k) {
                v = f32(x[(m0 + r) * p.k + k0 + c]);
            }
            sa[c * (BM / 4u) + r / 4u][r % 4u] = v;
        }
        for (var e = li; e < BN * BK / 4u; e = e + THREADS) {
            let col = e / (BK / 4u);
            let part = e % (BK / 4u);
            let v = weight4(linear_weight_row(n0, col), k0 + part * 4u, p.n);
            let at = part * 4u * (BN / 4u) + col / 4u;
            sb[at][col % 4u] = v.x;
            sb[at + BN / 4u][col % 4u] = v.y;
            sb[at + 2u * (BN / 4u)][col % 4u] = v.z;
            sb[at + 3u * (BN / 4u)][col % 4u] = v.w;
        }
        multiply_tiles(lid.x, lid.y);
    }
    for (var r = 0u; r < RM; r = r + 1u) {
        let row = m0 + lid.y * RM + r;
        if (row >= p.m) {
            break;
        }
        for (var c = 0u; c < RN; c = c + 1u) {
            let col = lid.x * RN + c;
            var v = acc_at(r, c);
            let wrow = linear_weight_row(n0, col);
            if (wrow >= p.n) {
                continue;
            }
            v = v + linear_addend(row, wrow);
            if (p.geglu == 0u) {
                out[row * p.n + wrow] = T(v);
            } else if (c % 2u == 1u) {
                // v is the gate, the previous column its value.
                let value = acc_at(r, c - 1u) + linear_addend(row, wrow - p.n / 2u);
                out[row * (p.n / 2u) + (wrow - p.n / 2u)] = T(value * gelu(v));
            }
        }
    }
}

// Where output column `at` (image at / n, pixel at % n) reads its input: the image's first element
// and the top-left corner of its window, padding included.
struct Window {
    base: u32,
    y: i32,
    x: i32,
    inside: bool,
}

fn column_window(at: u32) -> Window {
    if (at >= p.n * p.images) {
        return Window(0u, 0, 0, false);
    }
    let pix = at % p.n;
    let y = i32((pix / p.ow) * p.stride) - i32(p.pad_y);
    let x = i32((pix % p.ow) * p.stride) - i32(p.pad_x);
    return Window(at / p.n * p.cin * p.h * p.w, y, x, true);
}

@compute @workgroup_size(WX, WY)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let c0 = wid.y * BM; // output channels
    let p0 = wid.x * BN; // output pixels, image after image
    let cols = p.n * p.images;
    // With THREADS a multiple of BN an invocation loads the same column at every k step: its
    // window is found once (integer division is slow, and scalarised on CPU drivers). KS, the
    // kernel size, is a constant of the pipeline for the same reason.
    let fixed_column = THREADS % BN == 0u;
    let own_window = column_window(p0 + li % BN);
    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        for (var e = li; e < BM * BK / 4u; e = e + THREADS) {
            let row = e / (BK / 4u);
            let part = e % (BK / 4u);
            let v = weight4(c0 + row, k0 + part * 4u, p.m);
            let at = part * 4u * (BM / 4u) + row / 4u;
            sa[at][row % 4u] = v.x;
            sa[at + BM / 4u][row % 4u] = v.y;
            sa[at + 2u * (BM / 4u)][row % 4u] = v.z;
            sa[at + 3u * (BM / 4u)][row % 4u] = v.w;
        }
        for (var e = li; e < BN * BK; e = e + THREADS) {
            let col = e % BN;
            let kidx = k0 + e / BN;
            var window = own_window;
            if (!fixed_column) {
                window = column_window(p0 + col);
            }
            var v = 0.0;
            if (window.inside && kidx < p.k) {
                let ci = kidx / (KS * KS);
                let rem = kidx % (KS * KS);
                let iy = window.y + i32(rem / KS);
                let ix = window.x + i32(rem % KS);
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    v = f32(x[window.base + (ci * p.h + u32(iy)) * p.w + u32(ix)]);
                }
            }
            sb[(e / BN) * (BN / 4u) + col / 4u][col % 4u] = v;
        }
        multiply_tiles(lid.x, lid.y);
    }
    for (var r = 0u; r < RM; r = r + 1u) {
        let co = c0 + lid.y * RM + r;
        if (co >= p.m) {
            break;
        }
        for (var c = 0u; c < RN; c = c + 1u) {
            let col = p0 + lid.x * RN + c;
            if (col >= cols) {
                break;
            }
            let img = col / p.n;
            var v = acc_at(r, c);
            if (p.bias == BIAS_CHANNEL) {
                v = v + f32(bias[co]);
            } else if (p.bias == BIAS_IMAGE_CHANNEL) {
                v = v + f32(bias[img * p.m + co]);
            }
            let at = (img * p.m + co) * p.n + col % p.n;
            if (p.residual != 0u) {
                v = v + f32(residual[at]);
            }
            out[at] = T(v);
        }
    }
}
