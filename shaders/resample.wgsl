// Resampling and layout moves: nearest-neighbour upsampling by 2 of x [planes, h, w] -> y [planes, 2h, 2w],
// and the swap of the last two axes.

struct Params { n: u32, h: u32, w: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn upsample_nearest2x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n) {
        return;
    }
    let ow = 2u * p.w;
    let plane = i / (4u * p.h * p.w);
    let r = i % (4u * p.h * p.w);
    let oy = r / ow;
    let ox = r % ow;
    y[i] = x[(plane * p.h + oy / 2u) * p.w + ox / 2u];
}

// Swap of the last two axes: x [batch, h, w] -> y [batch, w, h] (NCHW planes <-> [B, HW, C] tokens).
@compute @workgroup_size(256)
fn transpose(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n) {
        return;
    }
    let plane = p.h * p.w;
    let b = i / plane;
    let r = i % plane;
    let col = r / p.h;
    let row = r % p.h;
    y[i] = x[b * plane + row * p.w + col];
}
