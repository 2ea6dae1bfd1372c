// Pointwise functions: activations, an affine map with clamp, and GEGLU (diffusers: hidden, gate =
// x.chunk(2, -1); hidden * gelu(gate)).

struct Params { n: u32, op: u32, half_width: u32, _pad: u32, scale: f32, shift: f32, lo: f32, hi: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

const OP_SILU: u32 = 0u;
const OP_GELU: u32 = 1u;
const OP_QUICK_GELU: u32 = 2u;

// erf with |error| < 1.2e-7 (Numerical Recipes erfc, Chebyshev fit): WGSL has no erf.
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return sign(x) * (1.0 - r);
}

// Exact (erf) GELU, as torch.nn.functional.gelu's default.
fn gelu(v: f32) -> f32 {
    return 0.5 * v * (1.0 + erf_(v * 0.7071067811865476));
}

fn activate(v: f32, op: u32) -> f32 {
    switch op {
        case OP_SILU: { return v / (1.0 + exp(-v)); }
        case OP_GELU: { return gelu(v); }
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

// x [rows, 2 * half_width] -> y [rows, half_width]; p.n = rows * half_width.
@compute @workgroup_size(256)
fn geglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        let row = i / p.half_width;
        let col = i % p.half_width;
        let base = row * 2u * p.half_width;
        y[i] = T(f32(x[base + col]) * gelu(f32(x[base + p.half_width + col])));
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
