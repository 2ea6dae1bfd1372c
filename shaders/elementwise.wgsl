// Elementwise arithmetic. `binary` broadcasts b with one rule that covers every case the models
// need: out[i] = a[i] op b[(i / b_inner) % b_len] (same shape: inner 1, len n; bias over the last
// dim: inner 1, len C; per-channel over NCHW: inner HW, len C; per-sample-channel: inner HW, len B*C).

// Params and OP_*: generated from crate/src/ops.rs (ElementwiseParams, BinaryOp).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n) {
        return;
    }
    let u = f32(a[i]);
    let v = f32(b[(i / p.b_inner) % p.b_len]);
    if (p.op == OP_ADD) {
        y[i] = T(u + v);
    } else {
        y[i] = T(u * v);
    }
}

// out = alpha * a + beta * b, same shapes (classifier-free guidance, residual scaling).
@compute @workgroup_size(256)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        y[i] = T(p.alpha * f32(a[i]) + p.beta * f32(b[i]));
    }
}

// Concatenation of a [outer, a_width] and b [outer, b_width] into [outer, a_width + b_width]:
// any axis of a row-major tensor, with the widths folding in every later axis.
@compute @workgroup_size(256)
fn concat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n) {
        return;
    }
    let width = p.a_width + p.b_width;
    let o = i / width;
    let j = i % width;
    if (j < p.a_width) {
        y[i] = a[o * p.a_width + j];
    } else {
        y[i] = b[o * p.b_width + j - p.a_width];
    }
}
