// nn.Linear over a block-quantized weight (layout in crate/src/quant.rs): y[m, n] = Σ_k x[m, k] ·
// W[n, k] (+ bias[n]), x [m, k] of T, W [n, k] as u32 code words + packed f16 block parameters,
// dequantized inside the kernel one block (32 values of k) at a time into workgroup memory;
// accumulation in f32. A 16×16 workgroup computes a 32×32 tile of y, 2×2 outputs per invocation
// (rows ty, ty + 16; cols tx, tx + 16).

struct Params {
    m: u32, n: u32, k: u32, blocks: u32, // blocks per weight row = ceil(k / 32)
    format: u32, _p0: u32, _p1: u32, _p2: u32, // format: see quant_common.wgsl
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;
@group(0) @binding(5) var<storage, read> bias: array<T>;

const TILE: u32 = 32u;
var<workgroup> xs: array<array<f32, 33>, 32>; // [row of x][k]
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
        load_weights(n0, p.n, kb, li);
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
