// GroupNorm over x [batch, channels, h, w] in two kernels, each spread over many workgroups (one
// workgroup per normalised set would leave most of a GPU idle: SDXL has 32 groups):
//   group_partials: per (chunk, set), the count, mean and M2 (sum of squared deviations) of the
//     chunk's share of the set's elements inside the region rows y0..y1, cols x0..x1, written to
//     partials[set · stride + slot0 + chunk];
//   group_apply: per (chunk, set), merges the set's `stride` partials (Chan et al.'s parallel
//     variance) and normalises the chunk's share of the whole set, then gamma, beta and SiLU.
// Statistics of the whole input use one slot per chunk; the tiled VAE decode records the
// statistics of each tile's own region into slots of one accumulator per layer and normalises
// every tile with the merged whole-image statistics (crate/src/models/vae.rs). f32 throughout.

// Params: generated from crate/src/ops.rs (GroupNormParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>; // (count, mean, M2, -)
@group(0) @binding(3) var<storage, read> gamma: array<T>;
@group(0) @binding(4) var<storage, read> beta: array<T>;
@group(0) @binding(5) var<storage, read_write> y: array<T>;

var<workgroup> wn: array<f32, 256>;
var<workgroup> wmean: array<f32, 256>;
var<workgroup> wm2: array<f32, 256>;

// Chan's merge of two (count, mean, M2) summaries.
fn merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let n = a.x + b.x;
    if (n == 0.0) {
        return a;
    }
    let d = b.y - a.y;
    return vec3<f32>(n, a.y + d * b.x / n, a.z + b.z + d * d * a.x * b.x / n);
}

// The workgroup's merged summary of each invocation's `own`.
fn merge_workgroup(own: vec3<f32>, lid: u32) -> vec3<f32> {
    wn[lid] = own.x;
    wmean[lid] = own.y;
    wm2[lid] = own.z;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (lid < s) {
            let m = merge(vec3<f32>(wn[lid], wmean[lid], wm2[lid]), vec3<f32>(wn[lid + s], wmean[lid + s], wm2[lid + s]));
            wn[lid] = m.x;
            wmean[lid] = m.y;
            wm2[lid] = m.z;
        }
        workgroupBarrier();
    }
    let r = vec3<f32>(wn[0], wmean[0], wm2[0]);
    workgroupBarrier();
    return r;
}

fn set_len() -> u32 {
    return (p.channels / p.groups) * p.h * p.w;
}

@compute @workgroup_size(256)
fn group_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group_set = wid.y;
    let rw = p.x1 - p.x0;
    let region = (p.channels / p.groups) * (p.y1 - p.y0) * rw;
    let per_chunk = (region + p.chunks - 1u) / p.chunks;
    let start = wid.x * per_chunk;
    let end = min(region, start + per_chunk);
    let plane = (p.y1 - p.y0) * rw;
    var own = vec3<f32>(0.0);
    for (var e = start + lid; e < end; e = e + 256u) {
        let ch = e / plane;
        let r = e % plane;
        let v = f32(x[group_set * set_len() + (ch * p.h + p.y0 + r / rw) * p.w + p.x0 + r % rw]);
        // Welford's update.
        own.x = own.x + 1.0;
        let d = v - own.y;
        own.y = own.y + d / own.x;
        own.z = own.z + d * (v - own.y);
    }
    let m = merge_workgroup(own, lid);
    if (lid == 0u) {
        partials[group_set * p.stride + p.slot0 + wid.x] = vec4<f32>(m, 0.0);
    }
}

@compute @workgroup_size(256)
fn group_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group_set = wid.y;
    var own = vec3<f32>(0.0);
    for (var i = lid; i < p.stride; i = i + 256u) {
        own = merge(own, partials[group_set * p.stride + i].xyz);
    }
    let m = merge_workgroup(own, lid);
    let mean = m.y;
    let rstd = inverseSqrt(m.z / max(m.x, 1.0) + p.eps);
    let len = set_len();
    let per_chunk = (len + p.chunks - 1u) / p.chunks;
    let start = wid.x * per_chunk;
    let end = min(len, start + per_chunk);
    let hw = p.h * p.w;
    let first_channel = (group_set % p.groups) * (p.channels / p.groups);
    for (var e = start + lid; e < end; e = e + 256u) {
        let ch = first_channel + e / hw;
        var v = (f32(x[group_set * len + e]) - mean) * rstd * f32(gamma[ch]) + f32(beta[ch]);
        if (p.silu == 1u) {
            v = v / (1.0 + exp(-v));
        }
        y[group_set * len + e] = T(v);
    }
}
