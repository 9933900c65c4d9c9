// Residual add in place: y += x over `len` f32 values. One thread per element, 256 per
// workgroup, 2-D grid past 65535 workgroups.

struct Params {
    len: u32,
    grid_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wid.y * p.grid_x + wid.x) * 256u + t;
    if (i < p.len) {
        y[i] = y[i] + x[i];
    }
}
