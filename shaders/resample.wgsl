// Resampling and layout moves: nearest-neighbour resizing of x [planes, h, w] -> y [planes, oh, ow]
// with torch's index rule (F.interpolate(mode="nearest")), and the swap of the last two axes.

// Params: generated from crate/src/ops.rs (ResampleParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

// torch: src = min(floor(dst * (in / out)), in - 1), the scale rounded to f32 on the CPU.
fn nearest_source(dst: u32, scale: f32, size: u32) -> u32 {
    return min(u32(floor(f32(dst) * scale)), size - 1u);
}

@compute @workgroup_size(256)
fn upsample_nearest(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n) {
        return;
    }
    let plane = i / (p.oh * p.ow);
    let r = i % (p.oh * p.ow);
    let sy = nearest_source(r / p.ow, p.scale_y, p.h);
    let sx = nearest_source(r % p.ow, p.scale_x, p.w);
    y[i] = x[(plane * p.h + sy) * p.w + sx];
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
