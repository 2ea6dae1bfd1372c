// Pointwise functions: activations, an affine map with clamp, and a tanh soft clamp.

// Params and OP_*: generated from crate/src/ops.rs (ActivationParams, Activation).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

fn activate(v: f32, op: u32) -> f32 {
    switch op {
        case OP_SILU: { return v / (1.0 + exp(-v)); }
        case OP_GELU: { return gelu(v); }
        case OP_RELU: { return max(v, 0.0); }
        default: { return v / (1.0 + exp(-1.702 * v)); }
    }
}

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        y[i] = T(activate(f32(x[i]), p.op));
    }
}

// y = clamp(f(scale * x + shift), lo, hi) with f = exp when op == 1, else identity: the pipeline's
// image post-processing (x / 2 + 0.5 clamped to 0..1), a VAE posterior's logvar clamp and
// std = exp(logvar / 2).
@compute @workgroup_size(256)
fn affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n) {
        return;
    }
    var v = p.scale * f32(x[i]) + p.shift;
    if (p.op == 1u) {
        v = exp(v);
    }
    y[i] = T(clamp(v, p.lo, p.hi));
}

// y = hi * tanh(scale * x / hi): TAESD's decoder input clamp tanh(x / 3) * 3. tanh's argument is
// limited to ±10 (where f32 tanh is already ±1) as some drivers compute tanh through exp, which
// overflows to inf / inf = NaN.
@compute @workgroup_size(256)
fn soft_clamp(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        y[i] = T(p.hi * tanh(clamp(p.scale * f32(x[i]) / p.hi, -10.0, 10.0)));
    }
}
