// The gated MLP's middle: out = SiLU(gate) · up = gate / (1 + exp(-gate)) · up, elementwise.
//
// Layout: gate, up, out f32 [len]; or, when `interleaved` is set, gate and up one buffer
// [len, 2] of (gate, up) pairs (the output of a GEMM over gate and up rows interleaved, bound
// to both `gate` and `up`). Workgroup plan: 256 threads, one element each, 2-D grid of
// workgroups past 65535·256 elements.

struct Params {
    len: u32,
    grid_x: u32,
    interleaved: u32,
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
    var g: f32;
    var u: f32;
    if (p.interleaved != 0u) {
        g = gate[2u * i];
        u = up[2u * i + 1u];
    } else {
        g = gate[i];
        u = up[i];
    }
    out[i] = g / (1.0 + exp(-g)) * u;
}
