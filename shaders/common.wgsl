// Prepended to every kernel, after the prelude that defines `T` (the storage float type: f16 or
// f32). Arithmetic and accumulation are always f32.

// Flat index of an item when a 1-D grid was folded into (x, y) to respect the per-dimension limit.
fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, per_group: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * per_group + lid;
}

fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

const REDUCE_SIZE: u32 = 256u;
var<workgroup> reduce_buf: array<f32, REDUCE_SIZE>;

// Sum of `v` over a workgroup of REDUCE_SIZE invocations; every invocation gets the result.
fn workgroup_sum(v: f32, lid: u32) -> f32 {
    reduce_buf[lid] = v;
    workgroupBarrier();
    for (var s = REDUCE_SIZE / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            reduce_buf[lid] = reduce_buf[lid] + reduce_buf[lid + s];
        }
        workgroupBarrier();
    }
    let r = reduce_buf[0];
    workgroupBarrier();
    return r;
}

fn workgroup_max(v: f32, lid: u32) -> f32 {
    reduce_buf[lid] = v;
    workgroupBarrier();
    for (var s = REDUCE_SIZE / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            reduce_buf[lid] = max(reduce_buf[lid], reduce_buf[lid + s]);
        }
        workgroupBarrier();
    }
    let r = reduce_buf[0];
    workgroupBarrier();
    return r;
}

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
