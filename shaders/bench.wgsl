// Best-case kernels that measure what the adapter can do, as the yardstick of `sdxl bench`:
// `peak_fma` runs independent vec4 multiply-add chains in registers (f32 arithmetic peak, the type
// every kernel accumulates in), `copy` streams vec4s through memory (bandwidth peak).

// Params: generated from crate/src/bench.rs (BenchParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

// 8 chains × 4 lanes × 2 flops = 64 flops per invocation and iteration.
@compute @workgroup_size(256)
fn peak_fma(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    let seed = src[i % p.n] * 1.0e-9; // one read, so that the result depends on memory
    var a0 = seed; var a1 = seed + 0.1; var a2 = seed + 0.2; var a3 = seed + 0.3;
    var a4 = seed + 0.4; var a5 = seed + 0.5; var a6 = seed + 0.6; var a7 = seed + 0.7;
    let m = vec4<f32>(0.9999);
    let c = vec4<f32>(1.0e-4);
    for (var it = 0u; it < p.iterations; it = it + 1u) {
        a0 = fma(a0, m, c); a1 = fma(a1, m, c); a2 = fma(a2, m, c); a3 = fma(a3, m, c);
        a4 = fma(a4, m, c); a5 = fma(a5, m, c); a6 = fma(a6, m, c); a7 = fma(a7, m, c);
    }
    if (i < p.n) {
        dst[i] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    }
}

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        dst[i] = src[i];
    }
}
