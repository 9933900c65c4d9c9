// W4A16 GEMV for decode: y = W·x with W int4 [rows, cols] as packed in the model folder.
//
// Layout: `words` holds each row's codes, 8 per u32, column 8·w + j of the row in bits
// 4j..4j+3 of word w (row-major, cols / 8 words per row). A code c means the integer
// c + qmin (qmin = -8 symmetric, 0 asymmetric); the weight is (c + qmin - zero)·scale with one
// scale (and zero) per group of `group` columns: scales/zeros are row-major [rows, cols/group].
// x is f32 [cols], read as vec4; y is f32 [rows].
//
// Workgroup plan: one workgroup of 64 threads per row (2-D grid when rows > 65535). Thread t
// reads words t, t + 64, …: consecutive threads read consecutive words, so a row streams from
// memory once, coalesced. Each thread sums (c + qmin - zero)·x over its word's 8 columns and
// multiplies by the word's group scale (a group spans whole words); the 64 partial sums are
// reduced in shared memory. Decode is memory-bound: the weights are read exactly once.

struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wid.y * p.grid_x + wid.x;
    if (row >= p.rows) {
        return;
    }
    let words_per_row = p.cols / 8u;
    let groups = p.cols / p.group;
    var acc = 0.0;
    for (var w = t; w < words_per_row; w = w + WG) {
        let word = words[row * words_per_row + w];
        let g = row * groups + (w * 8u) / p.group;
        var offset = p.qmin;
        if (p.has_zeros != 0u) {
            offset = offset - zeros[g];
        }
        let lo = x[2u * w];
        let hi = x[2u * w + 1u];
        let q_lo = vec4<f32>(
            f32(word & 0xFu),
            f32((word >> 4u) & 0xFu),
            f32((word >> 8u) & 0xFu),
            f32((word >> 12u) & 0xFu),
        ) + vec4<f32>(offset);
        let q_hi = vec4<f32>(
            f32((word >> 16u) & 0xFu),
            f32((word >> 20u) & 0xFu),
            f32((word >> 24u) & 0xFu),
            f32((word >> 28u) & 0xFu),
        ) + vec4<f32>(offset);
        acc = acc + scales[g] * (dot(q_lo, lo) + dot(q_hi, hi));
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            partial[t] = partial[t] + partial[t + s];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        y[row] = partial[0];
    }
}
