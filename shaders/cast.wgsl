// Float conversion between f16 and f32 (Gpu::cast): the VAE computes in f32 on an f16 device and
// converts its inputs and outputs at its boundary. Specialised with T = f16; the defines set SRC
// and DST to T and f32 in the direction wanted.

// Params: generated from crate/src/ops.rs (CastParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<SRC>;
@group(0) @binding(2) var<storage, read_write> y: array<DST>;

@compute @workgroup_size(256)
fn convert(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        y[i] = DST(x[i]);
    }
}
