// 2-D convolution over a block-quantized weight (layout in crate/src/quant.rs): NCHW input,
// weight rows = cout, cols = cin·k·k in torch's order (ci, ky, kx), square stride, zero padding
// (pad_y rows above, pad_x columns left; padding below / right only sizes the output).
// Implicit GEMM: per image, y[co, pixel] = Σ_kidx W[co, kidx] · im2col(x)[kidx, pixel]; a 16×16
// workgroup computes 32 pixels × 32 output channels, one weight block (32 values of kidx)
// dequantized into workgroup memory per step; accumulation in f32. Invocation (tx, ty) owns
// pixels tx, tx + 16 and channels ty, ty + 16, so stores are contiguous along pixels.

struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, oh: u32, ow: u32, k: u32,
    stride: u32, pad_y: u32, pad_x: u32, format: u32, // format: see quant_common.wgsl
    blocks: u32, kdim: u32, _p0: u32, _p1: u32, // blocks per weight row = ceil(kdim / 32), kdim = cin·k·k
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;
@group(0) @binding(5) var<storage, read> bias: array<T>;

const TILE: u32 = 32u;
var<workgroup> xs: array<array<f32, 32>, 32>; // [kidx][pixel]

// Accumulators (pixel tx, channel ty), (tx + 16, ty), (tx, ty + 16), (tx + 16, ty + 16).
fn tile_product(b: u32, p0: u32, c0: u32, tx: u32, ty: u32, li: u32) -> vec4<f32> {
    // The im2col element this invocation loads: pixel r, kidx rows li / 32 + 8i.
    let r = li % TILE;
    let pix = p0 + r;
    let valid = pix < p.oh * p.ow;
    let iy0 = i32((pix / p.ow) * p.stride) - i32(p.pad_y);
    let ix0 = i32((pix % p.ow) * p.stride) - i32(p.pad_x);
    let kk2 = p.k * p.k;
    let x0 = b * p.cin * p.h * p.w;
    var acc = vec4<f32>(0.0);
    for (var kb = 0u; kb < p.blocks; kb = kb + 1u) {
        for (var i = 0u; i < 4u; i = i + 1u) {
            let c = li / TILE + i * 8u;
            let kidx = kb * TILE + c;
            var v = 0.0;
            if (valid && kidx < p.kdim) {
                let ci = kidx / kk2;
                let rem = kidx % kk2;
                let iy = iy0 + i32(rem / p.k);
                let ix = ix0 + i32(rem % p.k);
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    v = f32(x[x0 + (ci * p.h + u32(iy)) * p.w + u32(ix)]);
                }
            }
            xs[c][r] = v;
        }
        load_weights(c0, p.cout, kb, li);
        workgroupBarrier();
        for (var kk = 0u; kk < TILE; kk = kk + 1u) {
            let a0 = xs[kk][tx];
            let a1 = xs[kk][tx + 16u];
            let w0 = ws[ty][kk];
            let w1 = ws[ty + 16u][kk];
            acc = acc + vec4<f32>(a0 * w0, a1 * w0, a0 * w1, a1 * w1);
        }
        workgroupBarrier();
    }
    return acc;
}

fn put(b: u32, co: u32, pix: u32, v: f32) {
    let ohw = p.oh * p.ow;
    if (co < p.cout && pix < ohw) {
        y[(b * p.cout + co) * ohw + pix] = T(v);
    }
}

@compute @workgroup_size(16, 16)
fn conv2d_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let p0 = wid.x * TILE;
    let c0 = wid.y * TILE;
    let acc = tile_product(wid.z, p0, c0, lid.x, lid.y, li);
    put(wid.z, c0 + lid.y, p0 + lid.x, acc.x);
    put(wid.z, c0 + lid.y, p0 + lid.x + 16u, acc.y);
    put(wid.z, c0 + lid.y + 16u, p0 + lid.x, acc.z);
    put(wid.z, c0 + lid.y + 16u, p0 + lid.x + 16u, acc.w);
}

@compute @workgroup_size(16, 16)
fn conv2d_q_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let p0 = wid.x * TILE;
    let c0 = wid.y * TILE;
    let acc = tile_product(wid.z, p0, c0, lid.x, lid.y, li);
    let co0 = c0 + lid.y;
    let co1 = co0 + 16u;
    var b0 = 0.0;
    var b1 = 0.0;
    if (co0 < p.cout) {
        b0 = f32(bias[co0]);
    }
    if (co1 < p.cout) {
        b1 = f32(bias[co1]);
    }
    put(wid.z, co0, p0 + lid.x, acc.x + b0);
    put(wid.z, co0, p0 + lid.x + 16u, acc.y + b0);
    put(wid.z, co1, p0 + lid.x, acc.z + b1);
    put(wid.z, co1, p0 + lid.x + 16u, acc.w + b1);
}
