// Direct 2-D convolution, NCHW, weight [cout, cin, kh, kw], square stride and zero padding
// (pad_y rows above and pad_x columns left; padding below / right only sizes the output).
// One invocation per output element. (Implicit-GEMM tiling comes with the performance work.)

struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, oh: u32, ow: u32, k: u32,
    stride: u32, pad_y: u32, pad_x: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> weight: array<T>;
@group(0) @binding(3) var<storage, read> bias: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n * p.cout * p.oh * p.ow) {
        return;
    }
    let ox = i % p.ow;
    let oy = (i / p.ow) % p.oh;
    let co = (i / (p.ow * p.oh)) % p.cout;
    let b = i / (p.ow * p.oh * p.cout);
    var acc = f32(bias[co]);
    for (var ci = 0u; ci < p.cin; ci = ci + 1u) {
        let x_plane = (b * p.cin + ci) * p.h;
        let w_base = (co * p.cin + ci) * p.k * p.k;
        for (var ky = 0u; ky < p.k; ky = ky + 1u) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad_y);
            if (iy < 0 || iy >= i32(p.h)) {
                continue;
            }
            for (var kx = 0u; kx < p.k; kx = kx + 1u) {
                let ix = i32(ox * p.stride + kx) - i32(p.pad_x);
                if (ix < 0 || ix >= i32(p.w)) {
                    continue;
                }
                acc = acc + f32(x[(x_plane + u32(iy)) * p.w + u32(ix)]) * f32(weight[w_base + ky * p.k + kx]);
            }
        }
    }
    y[i] = T(acc);
}
