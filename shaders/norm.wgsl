// Layer norm of x [rows, cols] over cols, one workgroup per row, two passes (mean, then centred
// variance) in f32. (GroupNorm: group_norm.wgsl.)

// Params: generated from crate/src/ops.rs (NormParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> gamma: array<T>;
@group(0) @binding(3) var<storage, read> beta: array<T>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;

// Mean and 1/sqrt(var + eps) of x[base .. base + p.cols].
fn moments(base: u32, lid: u32) -> vec2<f32> {
    var s = 0.0;
    for (var i = lid; i < p.cols; i = i + REDUCE_SIZE) {
        s = s + f32(x[base + i]);
    }
    let mean = workgroup_sum(s, lid) / f32(p.cols);
    var v = 0.0;
    for (var i = lid; i < p.cols; i = i + REDUCE_SIZE) {
        let d = f32(x[base + i]) - mean;
        v = v + d * d;
    }
    let var_ = workgroup_sum(v, lid) / f32(p.cols);
    return vec2<f32>(mean, inverseSqrt(var_ + p.eps));
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let mr = moments(base, lid);
    for (var i = lid; i < p.cols; i = i + REDUCE_SIZE) {
        y[base + i] = T((f32(x[base + i]) - mr.x) * mr.y * f32(gamma[i]) + f32(beta[i]));
    }
}
