// The gated MLP's middle: out = SiLU(gate) · up = gate / (1 + exp(-gate)) · up, elementwise.
//
// Layout: gate, up, out f32 [len]. Workgroup plan: 256 threads, one element each, 2-D grid of
// workgroups past 65535·256 elements.

struct Params {
    len: u32,
    grid_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = (wid.y * p.grid_x + wid.x) * 256u + t;
    if (i >= p.len) {
        return;
    }
    let g = gate[i];
    out[i] = g / (1.0 + exp(-g)) * up[i];
}
