// Batched, strided C = alpha * A·B (+ bias): serves nn.Linear (B = weight [N, K]) and both
// products of attention (Q·Kᵀ and P·V over [batch, tokens, heads·dim] layouts without copies).
// The batch index z splits into (z / heads, z % heads), each with its own element offset.

struct Params {
    m: u32, n: u32, k: u32, heads: u32,
    lda: u32, ldb: u32, ldc: u32, b_transposed: u32, // 1: B[n, k] at n*ldb + k; 0: B[k, n] at k*ldb + n
    a_batch: u32, a_head: u32, b_batch: u32, b_head: u32,
    c_batch: u32, c_head: u32, alpha: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> c: array<T>;
@group(0) @binding(4) var<storage, read> bias: array<T>;

const TILE: u32 = 16u;
var<workgroup> tile_a: array<array<f32, TILE>, TILE>;
var<workgroup> tile_b: array<array<f32, TILE>, TILE>;

// Dot product of row `row` of A and column `col` of B, one 16x16 tile of K at a time.
fn tile_product(z: u32, row: u32, col: u32, lid: vec2<u32>) -> f32 {
    let a0 = (z / p.heads) * p.a_batch + (z % p.heads) * p.a_head;
    let b0 = (z / p.heads) * p.b_batch + (z % p.heads) * p.b_head;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE) {
        let ka = k0 + lid.x;
        var av = 0.0;
        if (row < p.m && ka < p.k) {
            av = f32(a[a0 + row * p.lda + ka]);
        }
        tile_a[lid.y][lid.x] = av;
        let kb = k0 + lid.y;
        var bv = 0.0;
        if (col < p.n && kb < p.k) {
            if (p.b_transposed == 1u) {
                bv = f32(b[b0 + col * p.ldb + kb]);
            } else {
                bv = f32(b[b0 + kb * p.ldb + col]);
            }
        }
        tile_b[lid.y][lid.x] = bv;
        workgroupBarrier();
        for (var kk = 0u; kk < TILE; kk = kk + 1u) {
            acc = acc + tile_a[lid.y][kk] * tile_b[kk][lid.x];
        }
        workgroupBarrier();
    }
    return acc * p.alpha;
}

fn c_index(z: u32, row: u32, col: u32) -> u32 {
    return (z / p.heads) * p.c_batch + (z % p.heads) * p.c_head + row * p.ldc + col;
}

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.y * TILE + lid.y;
    let col = wid.x * TILE + lid.x;
    let acc = tile_product(wid.z, row, col, lid.xy);
    if (row < p.m && col < p.n) {
        c[c_index(wid.z, row, col)] = T(acc);
    }
}

@compute @workgroup_size(16, 16)
fn linear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.y * TILE + lid.y;
    let col = wid.x * TILE + lid.x;
    let acc = tile_product(wid.z, row, col, lid.xy);
    if (row < p.m && col < p.n) {
        c[c_index(wid.z, row, col)] = T(acc + f32(bias[col]));
    }
}
