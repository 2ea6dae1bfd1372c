// Fills a buffer on the GPU without uploading anything: random weights for benchmarks of full-size
// models (crate/src/weights/random.rs) and inputs for the kernel benchmarks. Values come from a
// counter-based hash of (seed, index), so they need no state and any range can be regenerated.

// Params: generated from crate/src/ops.rs (FillParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> values: array<T>;
@group(0) @binding(1) var<storage, read_write> words: array<u32>;

// PCG-style integer hash (Jarzynski and Olano, "Hash Functions for GPU Rendering", 2020).
fn hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// center + scale · uniform(-1, 1).
@compute @workgroup_size(256)
fn fill_uniform(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        let u = f32(hash(i ^ hash(p.seed)) >> 8u) * (2.0 / 16777216.0) - 1.0;
        values[i] = T(p.center + p.scale * u);
    }
}

// Random words, or `constant` everywhere.
@compute @workgroup_size(256)
fn fill_words(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        words[i] = select(hash(i ^ hash(p.seed)), p.constant, p.use_constant == 1u);
    }
}
