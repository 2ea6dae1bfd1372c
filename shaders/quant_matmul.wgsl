// nn.Linear over a block-quantized weight (layout in crate/src/quant.rs): y[m, n] = Σ_k x[m, k] ·
// W[n, k] (+ bias[n]), x [m, k] of T, W [n, k] as u32 code words + packed f16 block parameters,
// dequantized inside the kernel one block (32 values of k) at a time into workgroup memory;
// accumulation in f32. A 16×16 workgroup computes a 32×32 tile of y, 2×2 outputs per invocation
// (rows ty, ty + 16; cols tx, tx + 16).

struct Params {
    m: u32, n: u32, k: u32, blocks: u32, // blocks per weight row = ceil(k / 32)
    format: u32, _p0: u32, _p1: u32, _p2: u32, // format 0: Q8, 1: Q4
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> wq: array<u32>;
@group(0) @binding(3) var<storage, read> wscale: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;
@group(0) @binding(5) var<storage, read> bias: array<T>;

const TILE: u32 = 32u;
var<workgroup> xs: array<array<f32, 33>, 32>; // [row of x][k]
var<workgroup> ws: array<array<f32, 33>, 32>; // [weight row][k]

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

// Values 4·part .. 4·part + 3 of block `blk` (flat index row · blocks + block).
fn dequant4(blk: u32, part: u32) -> vec4<f32> {
    if (p.format == 0u) {
        let word = wq[blk * 8u + part];
        let d = half_to_f32((wscale[blk / 2u] >> (16u * (blk % 2u))) & 0xffffu);
        let q = bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
        return d * vec4<f32>(q);
    }
    let word = wq[blk * 4u + part / 2u] >> (16u * (part % 2u));
    let dm = wscale[blk];
    let q = (vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u);
    return half_to_f32(dm & 0xffffu) * vec4<f32>(q) + half_to_f32(dm >> 16u);
}

// Block kb of weight rows n0 .. n0 + 32 into ws: 8 invocations per row, 4 values each.
fn load_weights(n0: u32, kb: u32, li: u32) {
    let r = li / 8u;
    let part = li % 8u;
    var v = vec4<f32>(0.0);
    if (n0 + r < p.n) {
        v = dequant4((n0 + r) * p.blocks + kb, part);
    }
    ws[r][part * 4u] = v.x;
    ws[r][part * 4u + 1u] = v.y;
    ws[r][part * 4u + 2u] = v.z;
    ws[r][part * 4u + 3u] = v.w;
}

// Accumulators (row ty, col tx), (ty, tx + 16), (ty + 16, tx), (ty + 16, tx + 16).
fn tile_product(m0: u32, n0: u32, tx: u32, ty: u32, li: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var kb = 0u; kb < p.blocks; kb = kb + 1u) {
        let k0 = kb * TILE;
        for (var i = 0u; i < 4u; i = i + 1u) {
            let e = li + i * 256u;
            let r = e / TILE;
            let c = e % TILE;
            var v = 0.0;
            if (m0 + r < p.m && k0 + c < p.k) {
                v = f32(x[(m0 + r) * p.k + k0 + c]);
            }
            xs[r][c] = v;
        }
        load_weights(n0, kb, li);
        workgroupBarrier();
        for (var kk = 0u; kk < TILE; kk = kk + 1u) {
            let a0 = xs[ty][kk];
            let a1 = xs[ty + 16u][kk];
            let b0 = ws[tx][kk];
            let b1 = ws[tx + 16u][kk];
            acc = acc + vec4<f32>(a0 * b0, a0 * b1, a1 * b0, a1 * b1);
        }
        workgroupBarrier();
    }
    return acc;
}

fn put(row: u32, col: u32, v: f32) {
    if (row < p.m && col < p.n) {
        y[row * p.n + col] = T(v);
    }
}

@compute @workgroup_size(16, 16)
fn linear_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let acc = tile_product(m0, n0, lid.x, lid.y, li);
    put(m0 + lid.y, n0 + lid.x, acc.x);
    put(m0 + lid.y, n0 + lid.x + 16u, acc.y);
    put(m0 + lid.y + 16u, n0 + lid.x, acc.z);
    put(m0 + lid.y + 16u, n0 + lid.x + 16u, acc.w);
}

@compute @workgroup_size(16, 16)
fn linear_q_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let acc = tile_product(m0, n0, lid.x, lid.y, li);
    let c0 = n0 + lid.x;
    let c1 = c0 + 16u;
    var b0 = 0.0;
    var b1 = 0.0;
    if (c0 < p.n) {
        b0 = f32(bias[c0]);
    }
    if (c1 < p.n) {
        b1 = f32(bias[c1]);
    }
    put(m0 + lid.y, c0, acc.x + b0);
    put(m0 + lid.y, c1, acc.y + b1);
    put(m0 + lid.y + 16u, c0, acc.z + b0);
    put(m0 + lid.y + 16u, c1, acc.w + b1);
}
