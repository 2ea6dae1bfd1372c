// Embedding lookup: y[i, :] = table[ids[i] - row0, :] for the ids that fall in this table chunk (tables larger
// than one binding are split into chunks of rows and gathered chunk by chunk).

// Params: generated from crate/src/ops.rs (EmbeddingParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i >= p.n * p.dim) {
        return;
    }
    let id = ids[i / p.dim];
    if (id >= p.row0 && id < p.row0 + p.rows) {
        y[i] = table[(id - p.row0) * p.dim + i % p.dim];
    }
}
