// f16 GEMV: y = W·x for 16-bit weights (lm_head, embeddings-as-head, the linears of an
// unquantized model, and the f16 side of the benchmarks).
//
// Layout: W f16 [rows, cols] row-major, two halves per u32 (column 2i in the low half), every
// row padded to a whole number of vec4<u32> (`stride` vec4s, 8 columns each; padding never
// read). Halves are unpacked with unpack2x16float, so adapters without shader-f16 run it too.
// x is f32 [cols] read as vec4 (cols divisible by 8); y is f32 [rows], overwritten, or added
// to when `accumulate` is set.
//
// Workgroup plan: as gemv_w4a16.wgsl: 8 teams of 32 lanes, one team per row, 16-byte
// coalesced loads, shared-memory reduction per team.

struct Params {
    rows: u32,
    cols: u32,
    grid_x: u32,
    stride: u32,
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const TEAM: u32 = 32u;
const ROWS: u32 = 8u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let lane = t % TEAM;
    let row = (wid.y * p.grid_x + wid.x) * ROWS + t / TEAM;
    var acc = 0.0;
    if (row < p.rows) {
        let n = p.cols / 8u;
        for (var v = lane; v < n; v = v + TEAM) {
            let q = w[row * p.stride + v];
            let a = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
            let b = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
            acc = acc + dot(a, x[2u * v]) + dot(b, x[2u * v + 1u]);
        }
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = TEAM / 2u; s > 0u; s = s >> 1u) {
        if (lane < s) {
            partial[t] = partial[t] + partial[t + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.rows) {
        var sum = partial[t];
        if (p.accumulate != 0u) {
            sum = sum + y[row];
        }
        y[row] = sum;
    }
}
