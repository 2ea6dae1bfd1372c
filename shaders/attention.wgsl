// Row softmax for attention scores [rows, cols], with an optional causal mask: in row r, key j is
// kept when j <= r % q_len (CLIP's text encoder). One workgroup per row.

struct Params { rows: u32, cols: u32, causal: u32, q_len: u32 }

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
    var kept = p.cols;
    if (p.causal == 1u) {
        kept = min(p.cols, row % p.q_len + 1u);
    }
    var m = -3.4e38;
    for (var j = lid; j < kept; j = j + REDUCE_SIZE) {
        m = max(m, f32(x[base + j]));
    }
    m = workgroup_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < kept; j = j + REDUCE_SIZE) {
        s = s + exp(f32(x[base + j]) - m);
    }
    s = workgroup_sum(s, lid);
    for (var j = lid; j < p.cols; j = j + REDUCE_SIZE) {
        var v = 0.0;
        if (j < kept) {
            v = exp(f32(x[base + j]) - m) / s;
        }
        x[base + j] = T(v);
    }
}
