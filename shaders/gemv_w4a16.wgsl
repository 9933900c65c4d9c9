// W4A16 GEMV for decode: y = W·x with W int4 [rows, cols] as packed in the model folder.
//
// Layout: each row's codes, 8 per u32, column 8·w + j of the row in bits 4j..4j+3 of word w.
// On the GPU every row is padded to a whole number of vec4<u32> (`stride` vec4s, 32 columns
// each; padding words are never read). A code c means the integer c + qmin (qmin = -8
// symmetric, 0 asymmetric); the weight is (c + qmin - zero)·scale with one scale (and zero) per
// group of `group` columns (a multiple of 8): scales/zeros are row-major [rows, cols/group].
// x is f32 [cols] read as vec4; y is f32 [rows].
//
// Workgroup plan: 256 threads = 8 teams of 32, one team per row (8 rows per workgroup, a 2-D
// grid past `grid_x` workgroups). Lane l of a team loads vec4s l, l + 32, … of its row: 16-byte
// loads, consecutive lanes on consecutive addresses, so the weights stream from memory once,
// coalesced. Decode is memory-bound; the team's 32 partial sums are reduced in shared memory
// (every adapter has it; no subgroup operations needed).

struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
    stride: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TEAM: u32 = 32u;
const ROWS: u32 = 8u;
var<workgroup> partial: array<f32, 256>;

// The dot product of one packed word (8 columns starting at 8·w) with x, in integer units.
fn word_dot(word: u32, w: u32, offset: f32) -> f32 {
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
    return dot(q_lo, x[2u * w]) + dot(q_hi, x[2u * w + 1u]);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let lane = t % TEAM;
    let row = (wid.y * p.grid_x + wid.x) * ROWS + t / TEAM;
    var acc = 0.0;
    if (row < p.rows) {
        let words_per_row = p.cols / 8u;
        let groups = p.cols / p.group;
        for (var v = lane; v < p.stride; v = v + TEAM) {
            let q = words[row * p.stride + v];
            for (var j = 0u; j < 4u; j = j + 1u) {
                let w = 4u * v + j;
                if (w < words_per_row) {
                    let g = row * groups + (w * 8u) / p.group;
                    var offset = p.qmin;
                    if (p.has_zeros != 0u) {
                        offset = offset - zeros[g];
                    }
                    acc = acc + scales[g] * word_dot(q[j], w, offset);
                }
            }
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
        y[row] = partial[t];
    }
}
