// Tiles of images [planes, h, w] (tiled VAE decode): `crop` copies the th × tw window at (y0, x0)
// of src into dst; `paste` writes a tile src [planes, th, tw] into dst at (y0, x0), blended with
// what dst holds near its top and left edges (the overlap with the tiles pasted before it): the
// tile's weight rises linearly from 0 to 1 over `ramp_y` rows from row `skip_y` (and likewise
// over columns), so the rows nearest its edge, which saw zero padding instead of their
// neighbours, are not used at all.

// Params: generated from crate/src/ops.rs (TileParams).

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<T>;
@group(0) @binding(2) var<storage, read_write> dst: array<T>;

// Index into the full image of element i of a tile.
fn image_index(i: u32) -> u32 {
    let plane = i / (p.th * p.tw);
    let r = i % (p.th * p.tw);
    return (plane * p.h + p.y0 + r / p.tw) * p.w + p.x0 + r % p.tw;
}

fn ramp(i: u32, skip: u32, width: u32) -> f32 {
    if (width == 0u) {
        return select(1.0, 0.0, i < skip);
    }
    return clamp((f32(i) - f32(skip) + 0.5) / f32(width), 0.0, 1.0);
}

@compute @workgroup_size(256)
fn crop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        dst[i] = src[image_index(i)];
    }
}

@compute @workgroup_size(256)
fn paste(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid, 256u);
    if (i < p.n) {
        let r = i % (p.th * p.tw);
        let a = ramp(r / p.tw, p.skip_y, p.ramp_y) * ramp(r % p.tw, p.skip_x, p.ramp_x);
        let j = image_index(i);
        dst[j] = T(a * f32(src[i]) + (1.0 - a) * f32(dst[j]));
    }
}
