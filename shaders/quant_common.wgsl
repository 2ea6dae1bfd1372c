// Shared by the block-quantized kernels (quant_matmul, quant_conv): the weight planes (layout in
// crate/src/quant.rs) and their dequantization into workgroup memory. Each kernel's `Params` has
// `format` (0: Q8_0, 1: Q4_1, 2: Q4_0) and `blocks` (blocks per weight row).

@group(0) @binding(2) var<storage, read> wq: array<u32>;
@group(0) @binding(3) var<storage, read> wscale: array<u32>;

var<workgroup> ws: array<array<f32, 33>, 32>; // [weight row][k within the block]

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

// Values 4·part .. 4·part + 3 of block `blk` (flat index row · blocks + block).
fn dequant4(blk: u32, part: u32) -> vec4<f32> {
    if (p.format == 0u) {
        let word = wq[blk * 8u + part];
        let q = bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
        return paired_scale(blk) * vec4<f32>(q);
    }
    let word = wq[blk * 4u + part / 2u] >> (16u * (part % 2u));
    let q = vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
    if (p.format == 2u) {
        return paired_scale(blk) * (q - 8.0);
    }
    let dm = wscale[blk];
    return half_to_f32(dm & 0xffffu) * q + half_to_f32(dm >> 16u);
}

// Block kb of weight rows n0 .. n0 + 32 (of `rows`) into ws: 8 invocations per row, 4 values each.
fn load_weights(n0: u32, rows: u32, kb: u32, li: u32) {
    let r = li / 8u;
    let part = li % 8u;
    var v = vec4<f32>(0.0);
    if (n0 + r < rows) {
        v = dequant4((n0 + r) * p.blocks + kb, part);
    }
    ws[r][part * 4u] = v.x;
    ws[r][part * 4u + 1u] = v.y;
    ws[r][part * 4u + 2u] = v.z;
    ws[r][part * 4u + 3u] = v.w;
}
