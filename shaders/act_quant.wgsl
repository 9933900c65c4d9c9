// Dynamic activation fake quantization in place, as the evaluated W?A4 models see it: each group
// of `group` consecutive values (a whole token, or one head of the o_proj input) is quantized
// asymmetrically to `bits` bits over [min(x, 0), max(x, 0)] and dequantized:
// s = max(max − min, 1e-6)/qmax, z = round(−min/s), x ← (clamp(round(x/s) + z, 0, qmax) − z)·s.
//
// Layout: x f32 [groups · group]. Workgroup plan: one workgroup of 256 threads per group
// (2-D grid past 65535 groups; a whole token is one group, so the loads must be many);
// min/max by a shared-memory reduction, then each thread rewrites a strided slice.

struct Params {
    groups: u32,
    group: u32,
    qmax: f32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

const WG: u32 = 256u;
var<workgroup> lo: array<f32, 256>;
var<workgroup> hi: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = wid.y * p.grid_x + wid.x;
    if (g >= p.groups) {
        return;
    }
    let base = g * p.group;
    var mn = 0.0;
    var mx = 0.0;
    for (var i = t; i < p.group; i = i + WG) {
        mn = min(mn, x[base + i]);
        mx = max(mx, x[base + i]);
    }
    lo[t] = mn;
    hi[t] = mx;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            lo[t] = min(lo[t], lo[t + s]);
            hi[t] = max(hi[t], hi[t + s]);
        }
        workgroupBarrier();
    }
    let scale = max(hi[0] - lo[0], 1e-6) / p.qmax;
    let zero = round(-lo[0] / scale);
    for (var i = t; i < p.group; i = i + WG) {
        let q = clamp(round(x[base + i] / scale) + zero, 0.0, p.qmax);
        x[base + i] = (q - zero) * scale;
    }
}
