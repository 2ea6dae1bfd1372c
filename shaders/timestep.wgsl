// Sinusoidal timestep embedding, as diffusers' get_timestep_embedding: t [n] (f32) -> y [n, dim].

// Params: generated from crate/src/ops.rs (TimestepParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> t: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

// sin(x) with explicit range reduction: arguments reach ~1000 rad and GPU sin is only
// accurate near zero. 2*pi is split in two parts (Cody-Waite) to keep the reduction exact.
fn reduced(x: f32) -> f32 {
    let k = round(x * 0.15915494309189535);
    return (x - k * 6.28125) - k * 0.0019353071795864769;
}

@compute @workgroup_size(256)
fn timestep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n * p.dim) {
        return;
    }
    let row = i / p.dim;
    let j = i % p.dim;
    let half_dim = p.dim / 2u;
    if (j >= 2u * half_dim) {
        y[i] = T(0.0); // odd dim: zero pad
        return;
    }
    var is_cos = j < half_dim;
    if (p.flip == 0u) {
        is_cos = !is_cos;
    }
    let f = j % half_dim;
    let freq = exp(-p.log_period * f32(f) / (f32(half_dim) - p.shift));
    let arg = reduced(t[row] * freq * p.scale);
    if (is_cos) {
        y[i] = T(cos(arg));
    } else {
        y[i] = T(sin(arg));
    }
}
