// f32 GEMV: y = W·x for an unquantized weight (lm_head, and linears of 16-bit-weight folders).
//
// Layout: w f32 [rows, cols] row-major read as vec4 (cols divisible by 4), x f32 [cols], y f32
// [rows]. Workgroup plan: one workgroup of 64 threads per row (2-D grid past 32768 rows);
// thread t reads vec4s t, t + 64, … of the row (coalesced), shared-memory reduction.

struct Params {
    rows: u32,
    cols: u32,
    grid_x: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wid.y * p.grid_x + wid.x;
    if (row >= p.rows) {
        return;
    }
    let n4 = p.cols / 4u;
    var acc = 0.0;
    for (var i = t; i < n4; i = i + 64u) {
        acc = acc + dot(w[row * n4 + i], x[i]);
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (t < s) {
            partial[t] = partial[t] + partial[t + s];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        y[row] = partial[0];
    }
}
