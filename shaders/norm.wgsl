// Normalisations, one workgroup per normalised set, two passes (mean, then centred variance) in f32.
// layer_norm: x [rows, cols] over cols. group_norm: x [batch, channels, hw]; a group's channels are
// contiguous in NCHW, so group (b, g) is one run of (channels / groups) * hw elements.

struct Params { sets: u32, size: u32, eps: f32, silu: u32, channels: u32, groups: u32, hw: u32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> gamma: array<T>;
@group(0) @binding(3) var<storage, read> beta: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;

// Mean and 1/sqrt(var + eps) of x[base .. base + p.size].
fn moments(base: u32, lid: u32) -> vec2<f32> {
    var s = 0.0;
    for (var i = lid; i < p.size; i = i + REDUCE_SIZE) {
        s = s + f32(x[base + i]);
    }
    let mean = workgroup_sum(s, lid) / f32(p.size);
    var v = 0.0;
    for (var i = lid; i < p.size; i = i + REDUCE_SIZE) {
        let d = f32(x[base + i]) - mean;
        v = v + d * d;
    }
    let var_ = workgroup_sum(v, lid) / f32(p.size);
    return vec2<f32>(mean, inverseSqrt(var_ + p.eps));
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if (row >= p.sets) {
        return;
    }
    let base = row * p.size;
    let mr = moments(base, lid);
    for (var i = lid; i < p.size; i = i + REDUCE_SIZE) {
        y[base + i] = T((f32(x[base + i]) - mr.x) * mr.y * f32(gamma[i]) + f32(beta[i]));
    }
}

@compute @workgroup_size(256)
fn group_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let group_set = flat_group(wid, nwg);
    if (group_set >= p.sets) {
        return;
    }
    let base = group_set * p.size;
    let first_channel = (group_set % p.groups) * (p.channels / p.groups);
    let mr = moments(base, lid);
    for (var i = lid; i < p.size; i = i + REDUCE_SIZE) {
        let ch = first_channel + i / p.hw;
        var v = (f32(x[base + i]) - mr.x) * mr.y * f32(gamma[ch]) + f32(beta[ch]);
        if (p.silu == 1u) {
            v = v / (1.0 + exp(-v));
        }
        y[base + i] = T(v);
    }
}
