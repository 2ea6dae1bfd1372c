// In-place row softmax of scale · x over x [rows, cols], one workgroup per row: the middle step of
// attention computed in chunks of queries (heads too wide for the flash kernel's registers).

// Params: generated from crate/src/ops.rs (SoftmaxParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<T>;

@compute @workgroup_size(256)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var m = -3.4e38;
    for (var j = lid; j < p.cols; j = j + REDUCE_SIZE) {
        m = max(m, p.scale * f32(x[base + j]));
    }
    m = workgroup_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < p.cols; j = j + REDUCE_SIZE) {
        s = s + exp(p.scale * f32(x[base + j]) - m);
    }
    s = workgroup_sum(s, lid);
    for (var j = lid; j < p.cols; j = j + REDUCE_SIZE) {
        x[base + j] = T(exp(p.scale * f32(x[base + j]) - m) / s);
    }
}
