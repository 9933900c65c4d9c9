// RMSNorm of each row: y = x / sqrt(mean(x²) + eps) · w.
//
// Layout: x and y f32 [rows, n] row-major, w f32 [n]. Workgroup plan: one workgroup of 256
// threads per row (2-D grid past 65535 rows); each thread sums the squares of a strided slice,
// a shared-memory tree reduces them, then every thread scales its slice.

struct Params {
    rows: u32,
    n: u32,
    eps: f32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wid.y * p.grid_x + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var acc = 0.0;
    for (var i = t; i < p.n; i = i + WG) {
        let v = x[base + i];
        acc = acc + v * v;
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            partial[t] = partial[t] + partial[t + s];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(p.n) + p.eps);
    for (var i = t; i < p.n; i = i + WG) {
        y[base + i] = x[base + i] * inv * w[i];
    }
}
