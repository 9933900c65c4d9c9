// W4A16 GEMV for decode: y = W·x with W int4 [rows, cols] as packed in the model folder.
//
// Layout: each row's codes, 8 per u32, column 8·w + j of the row in bits 4j..4j+3 of word w.
// On the GPU every row is padded to a whole number of vec4<u32> (`stride` vec4s, 32 columns
// each; padding words are never read). A code c means the integer c + qmin (qmin = -8
// symmetric, 0 asymmetric); the weight is (c + qmin - zero)·scale with one scale (and zero) per
// group of `group` columns (a multiple of 8): scales/zeros are row-major [rows, cols/group].
// x is f32 [cols] read as vec4; y is f32 [rows], overwritten or added to, or [rows / 2] with
// SiLU(gate)·up of interleaved rows (see `store`).
//
// Workgroup plan: 256 threads = 8 teams of 32 lanes; a workgroup covers 8·RPT rows, each team
// RPT of them (a 2-D grid past `grid_x` workgroups). Lane l walks the words l, l + 32, … of its
// rows, four per step: consecutive lanes on consecutive words, so the weights stream from
// memory once, coalesced (4 × 128 bytes per team and row per step). A word spans 8 columns,
// i.e. 32 bytes of x (two vec4 loads): each lane loads them once and applies them to its
// team's RPT rows, which divides the x traffic from cache by RPT; a team's x load covers 1 KB
// in 8 cache lines (lanes taking 16-byte vec4s of words would read 128 contiguous bytes of x
// each, 32 lines per load). On an H100 the two layouts measure about the same, near a quarter
// of the read roofline inside a 7B decode (results/bench-h100.md, runs 7–10); what bounds the
// kernel there is not yet settled. RPT (1, 2 or 4, a pipeline constant) trades reuse against
// the number of workgroups: the host picks it per shape. The RPT rows' partial sums of a team
// are reduced with subgroup shuffles where the adapter has them, and in shared memory across
// subgroups (or entirely, where it has none).

struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
    stride: u32,
    store: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TEAM: u32 = 32u;
override RPT: u32 = 4u; // rows per team, at most 4
// The team sums and the store: shaders/gemv_store.wgsl (`team_store`), prepended by the host.

// The x values of columns 8w .. 8w+3 (a) and 8w+4 .. 8w+7 (b), and their sum.
struct Chunk {
    a: vec4<f32>,
    b: vec4<f32>,
    sum: f32,
}

fn chunk(w: u32) -> Chunk {
    let a = x[2u * w];
    let b = x[2u * w + 1u];
    return Chunk(a, b, dot(a + b, vec4<f32>(1.0)));
}

// Σ code·x over one packed word: code j (column 8w + j) sits in bits 4j..4j+3, so byte k holds
// columns 2k (low nibble) and 2k + 1 (high nibble): the masked bytes are the even columns, the
// shifted ones the odd.
fn nibbles(word: u32, c: Chunk) -> f32 {
    let even = vec4<f32>(unpack4xU8(word & 0x0F0F0F0Fu));
    let odd = vec4<f32>(unpack4xU8((word >> 4u) & 0x0F0F0F0Fu));
    return dot(even, vec4<f32>(c.a.x, c.a.z, c.b.x, c.b.z))
        + dot(odd, vec4<f32>(c.a.y, c.a.w, c.b.y, c.b.w));
}

// The integer offset of group g: codes c mean c + qmin − zero.
fn offset(g: u32) -> f32 {
    if (p.has_zeros != 0u) {
        return p.qmin - zeros[g];
    }
    return p.qmin;
}

// Word w of `row` (codes `word`, x values `c`) dequantized and multiplied: Σ weight·x.
fn term(row: u32, groups: u32, w: u32, word: u32, c: Chunk) -> f32 {
    let g = row * groups + (8u * w) / p.group;
    return scales[g] * (nibbles(word, c) + offset(g) * c.sum);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let lane = t % TEAM;
    let row0 = ((wid.y * p.grid_x + wid.x) * 8u + t / TEAM) * RPT;
    let words_per_row = p.cols / 8u;
    let row_words = 4u * p.stride;
    let groups = p.cols / p.group;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    // Four words per lane per step (w, w + 32, w + 64, w + 96): all their loads are issued
    // before any is used, so a step has as many bytes in flight as a 16-byte load would.
    var w = lane;
    for (; w + 3u * TEAM < words_per_row; w = w + 4u * TEAM) {
        let c0 = chunk(w);
        let c1 = chunk(w + TEAM);
        let c2 = chunk(w + 2u * TEAM);
        let c3 = chunk(w + 3u * TEAM);
        for (var r = 0u; r < RPT; r = r + 1u) {
            let row = row0 + r;
            if (row < p.rows) {
                let at = row * row_words + w;
                let q = vec4<u32>(words[at], words[at + TEAM], words[at + 2u * TEAM],
                    words[at + 3u * TEAM]);
                acc[r] = acc[r] + term(row, groups, w, q.x, c0)
                    + term(row, groups, w + TEAM, q.y, c1)
                    + term(row, groups, w + 2u * TEAM, q.z, c2)
                    + term(row, groups, w + 3u * TEAM, q.w, c3);
            }
        }
    }
    for (; w < words_per_row; w = w + TEAM) {
        let c = chunk(w);
        for (var r = 0u; r < RPT; r = r + 1u) {
            let row = row0 + r;
            if (row < p.rows) {
                acc[r] = acc[r] + term(row, groups, w, words[row * row_words + w], c);
            }
        }
    }
    team_store(t, lane, row0, acc);
}
