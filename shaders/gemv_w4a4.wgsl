// W4A4 GEMV with integer accumulation: y = W·x where W is int4 as in gemv_w4a16.wgsl and x is
// given as signed 8-bit codes with one f32 scale per group of `agroup` columns
// (act_codes.wgsl): x_c = codes_c·sx[c / agroup]. For each 32-column block (one vec4 of
// weight words) the lane computes, in integers,
//   d = Σ code_w·code_x  (8 dot4I8Packed: weight nibbles against the matching x bytes)
//   n = Σ code_x         (8 dot4I8Packed against 0x01010101, shared by the team's rows)
// and adds scale_w·sx·(d + offset·n), offset = qmin − zero_w: the dequant epilogue per block.
// Every product and sum inside a block is exact; only the per-block epilogue rounds.
//
// Layout: words as gemv_w4a16.wgsl (rows padded to `stride` vec4s); xc: the codes as vec4<u32>,
// two per weight vec4 (8 words per 32 columns, zero past `cols`); sx f32 [cols / agroup];
// y f32 [rows], overwritten or accumulated into, SiLU(gate)·up of interleaved rows, or
// q and k rotated by RoPE (`store`). Weight groups and `agroup` are multiples of 32 columns, so each block has one
// weight scale and one activation scale.
// Workgroup plan: as gemv_w4a16.wgsl — 8 teams of 32 lanes, RPT rows and one of KS column
// slices per team (pipeline constants), one 16-byte coalesced weight load per lane per step,
// the same subgroup / shared-memory team sums and slice sums.

struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    agroup: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
    stride: u32,
    store: u32,
    _pad0: u32, // the GEMM's part boundaries sit here (core/runtime/linear.rs's W4A4Params)
    _pad1: u32,
    _pad2: u32,
    rope_rows: u32, // with STORE_ROPE (gemv_store.wgsl)
    head_dim: u32,
    _pad3: u32,
    _pad4: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> xc: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> sx: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

const TEAM: u32 = 32u;
const LOW: u32 = 0x0F0F0F0Fu;
const ONES: u32 = 0x01010101u;
// RPT, KS, the team sums and the store: shaders/gemv_store.wgsl, prepended by the host.

// Σ code_w·code_x over one weight word and its two x words (even, odd columns).
fn word_dot(w: u32, even: u32, odd: u32) -> i32 {
    return dot4I8Packed(w & LOW, even) + dot4I8Packed((w >> 4u) & LOW, odd);
}

// What the rows share of the 32-column block v: the x codes (even-column bytes and odd, by
// word), their sum, the activation scale and the block's weight-group column.
struct XBlock {
    a: vec4<u32>,
    b: vec4<u32>,
    n: i32,
    s: f32,
    gcol: u32,
}

fn x_block(v: u32) -> XBlock {
    let a = xc[2u * v];
    let b = xc[2u * v + 1u];
    let n = dot4I8Packed(a.x, ONES) + dot4I8Packed(a.y, ONES) + dot4I8Packed(a.z, ONES)
        + dot4I8Packed(a.w, ONES) + dot4I8Packed(b.x, ONES) + dot4I8Packed(b.y, ONES)
        + dot4I8Packed(b.z, ONES) + dot4I8Packed(b.w, ONES);
    // Past the last column the codes are 0: any in-range scale gives 0.
    let s = sx[min((32u * v) / p.agroup, p.cols / p.agroup - 1u)];
    let gcol = min((32u * v) / p.group, p.cols / p.group - 1u);
    return XBlock(a, b, n, s, gcol);
}

// Row `row`'s share of Σ weight·x over a block (weight codes `q`, shared part `x`): the
// integer dot product and its dequant epilogue.
fn block(row: u32, q: vec4<u32>, x: XBlock) -> f32 {
    let d = word_dot(q.x, x.a.x, x.a.y) + word_dot(q.y, x.a.z, x.a.w)
        + word_dot(q.z, x.b.x, x.b.y) + word_dot(q.w, x.b.z, x.b.w);
    let g = row * (p.cols / p.group) + x.gcol;
    var offset = p.qmin;
    if (p.has_zeros != 0u) {
        offset = p.qmin - zeros[g];
    }
    return scales[g] * x.s * (f32(d) + offset * f32(x.n));
}

// Row `row`'s share of block v (`block`); 0 past the last row.
fn block_at(row: u32, v: u32, x: XBlock) -> f32 {
    if (row >= p.rows) {
        return 0.0;
    }
    return block(row, words[row * p.stride + v], x);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let lane = t % TEAM;
    let team = t / TEAM;
    let row0 = ((wid.y * p.grid_x + wid.x) * (8u / KS) + team / KS) * RPT;
    var acc = vec4<f32>(0.0); // rows row0 .. row0 + RPT − 1 (gemv_store.wgsl's Sums)
    let step = TEAM * KS; // vec4s between a lane's consecutive vec4s
    for (var v = (team % KS) * TEAM + lane; v < p.stride; v = v + step) {
        let x = x_block(v);
        acc.x = acc.x + block_at(row0, v, x);
        if (RPT > 1u) {
            acc.y = acc.y + block_at(row0 + 1u, v, x);
        }
        if (RPT > 2u) {
            acc.z = acc.z + block_at(row0 + 2u, v, x);
            acc.w = acc.w + block_at(row0 + 3u, v, x);
        }
    }
    team_store(t, lane, row0, Sums(acc, 0.0), 0.0);
}
