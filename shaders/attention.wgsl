// Flash attention: softmax(q·kᵀ · scale) · v over [batch, tokens, heads · D] tensors (the layout of
// the q/k/v projections), with an online softmax, so no score matrix is ever stored: each
// invocation owns one query row (q and its output accumulator in registers), and the workgroup
// streams BKV keys and values at a time through workgroup memory, CH keys per softmax rescale. A
// causal mask keeps key j for query i when j <= i (CLIP's text encoder).
//
// The prelude (ops.rs) defines D (head size), D4 = ceil(D / 4), BKV, CH, and, unrolled over the D4
// vec4s of a row (private vec4s, never a dynamically indexed array, which GPU compilers may leave in
// slow local memory): `load_query(base)`, `dot_query(row)` (q · key row `row` of the tile),
// `rescale(f)`, `accumulate(pj, row)` (o += pj · value row `row`), `store_output(base, l)`, and
// `attend_chunk(row0, key0, qi)`, the online-softmax update over keys key0 .. key0 + CH.

// Params: generated from crate/src/ops.rs (AttentionParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<T>;
@group(0) @binding(2) var<storage, read> k: array<T>;
@group(0) @binding(3) var<storage, read> v: array<T>;
@group(0) @binding(4) var<storage, read_write> out: array<T>;

const QUERIES: u32 = 64u;
const MASKED: f32 = -3.0e38;

var<workgroup> ks: array<vec4<f32>, BKV * D4>;
var<workgroup> vs: array<vec4<f32>, BKV * D4>;

// Running max and normaliser of the query's softmax.
var<private> m_run: f32 = MASKED;
var<private> l_run: f32 = 0.0;

// Elements 4c .. 4c + 3 of a head row starting at `base` (zero past D; no dynamically indexed
// vector, see above).
fn q4(base: u32, c: u32) -> vec4<f32> {
    let i = base + 4u * c;
    let n = D - 4u * c; // > 0
    return vec4<f32>(f32(q[i]), select(0.0, f32(q[i + 1u]), n > 1u), select(0.0, f32(q[i + 2u]), n > 2u),
                     select(0.0, f32(q[i + 3u]), n > 3u));
}

fn k4(base: u32, c: u32) -> vec4<f32> {
    let i = base + 4u * c;
    let n = D - 4u * c; // > 0
    return vec4<f32>(f32(k[i]), select(0.0, f32(k[i + 1u]), n > 1u), select(0.0, f32(k[i + 2u]), n > 2u),
                     select(0.0, f32(k[i + 3u]), n > 3u));
}

fn v4(base: u32, c: u32) -> vec4<f32> {
    let i = base + 4u * c;
    let n = D - 4u * c; // > 0
    return vec4<f32>(f32(v[i]), select(0.0, f32(v[i + 1u]), n > 1u), select(0.0, f32(v[i + 2u]), n > 2u),
                     select(0.0, f32(v[i + 3u]), n > 3u));
}

fn store4(base: u32, c: u32, r: vec4<f32>) {
    let i = base + 4u * c;
    let n = D - 4u * c; // > 0
    out[i] = T(r.x);
    if (n > 1u) { out[i + 1u] = T(r.y); }
    if (n > 2u) { out[i + 2u] = T(r.z); }
    if (n > 3u) { out[i + 3u] = T(r.w); }
}

// Score of key `key` (tile row `row`) for query qi, or MASKED.
fn score(row: u32, key: u32, qi: u32) -> f32 {
    if (key >= p.lk || (p.causal == 1u && key > qi)) {
        return MASKED;
    }
    return dot_query(row);
}

// The weight of a score under the running max `m` (0 for a masked key).
fn weight(s: f32, m: f32) -> f32 {
    return select(exp(s - m), 0.0, s == MASKED);
}

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.y / p.heads;
    let h = wid.y % p.heads;
    let qi = wid.x * QUERIES + lid;
    let has_query = qi < p.lq;
    let row_base = (b * p.lq + qi) * p.width + h * D;
    if (has_query) {
        load_query(row_base);
    }
    var keys = p.lk;
    if (p.causal == 1u) {
        keys = min(p.lk, (wid.x + 1u) * QUERIES);
    }
    for (var t0 = 0u; t0 < keys; t0 = t0 + BKV) {
        for (var e = lid; e < BKV * D4; e = e + QUERIES) {
            let key = t0 + e / D4;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (key < p.lk) {
                let base = (b * p.lk + key) * p.width + h * D;
                kv = k4(base, e % D4);
                vv = v4(base, e % D4);
            }
            ks[e] = kv;
            vs[e] = vv;
        }
        workgroupBarrier();
        if (has_query) {
            for (var j0 = 0u; j0 < BKV; j0 = j0 + CH) {
                attend_chunk(j0, t0 + j0, qi);
            }
        }
        workgroupBarrier();
    }
    if (has_query) {
        store_output(row_base, l_run);
    }
}
