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
// RPT of them (a 2-D grid past `grid_x` workgroups). Lane l walks the vec4s l, l + 32, … of its
// rows: 16-byte loads, consecutive lanes on consecutive addresses, so the weights stream from
// memory once, coalesced. One vec4 of codes spans 32 columns, i.e. 128 bytes of x for 16
// bytes of weights: each lane loads its 32 x values once and applies them to its team's RPT
// rows, which divides the x traffic from cache by RPT. RPT (1, 2 or 4, a pipeline constant)
// trades that reuse against the number of workgroups: the host picks it per shape. Nibbles
// unpack with two masks and two byte unpacks per word; the RPT rows' partial sums of a team
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
@group(0) @binding(1) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TEAM: u32 = 32u;

// What the results become (`store`): y = W·x, y += W·x (a residual connection folded into the
// product), or, for a gate and an up projection interleaved row by row (gate_0, up_0, gate_1,
// …), y_i = SiLU(gate_i·x)·(up_i·x) — the gated MLP's middle in the epilogue, y [rows / 2].
const STORE_WRITE: u32 = 0u;
const STORE_ADD: u32 = 1u;
const STORE_SILU_MUL: u32 = 2u;
override RPT: u32 = 4u; // rows per team, at most 4
// Lanes per subgroup used in the team sums: the adapter's smallest subgroup size up to 32 where
// it has subgroup operations (the host then prepends shaders/lanes_subgroup.wgsl), else 1
// (shaders/lanes_shared.wgsl). Either file defines `lane_xor`.
override SG: u32 = 1u;
var<workgroup> partial: array<f32, 1024>; // [thread][row of the team]

// The x values of columns 8w .. 8w+7, split by column parity (see `nibbles`).
struct Chunk {
    even: vec4<f32>,
    odd: vec4<f32>,
    sum: f32,
}

fn chunk(w: u32) -> Chunk {
    let a = x[2u * w];
    let b = x[2u * w + 1u];
    return Chunk(
        vec4<f32>(a.x, a.z, b.x, b.z),
        vec4<f32>(a.y, a.w, b.y, b.w),
        dot(a + b, vec4<f32>(1.0)),
    );
}

// Σ code·x over one packed word. Byte k of the word holds columns 2k (low nibble) and 2k+1
// (high nibble): masking the low nibbles and unpacking the bytes gives the even columns, the
// shifted word the odd ones.
fn nibbles(word: u32, c: Chunk) -> f32 {
    let even = vec4<f32>(unpack4xU8(word & 0x0F0F0F0Fu));
    let odd = vec4<f32>(unpack4xU8((word >> 4u) & 0x0F0F0F0Fu));
    return dot(even, c.even) + dot(odd, c.odd);
}

// The integer offset of group g: codes c mean c + qmin − zero.
fn offset(g: u32) -> f32 {
    if (p.has_zeros != 0u) {
        return p.qmin - zeros[g];
    }
    return p.qmin;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let lane = t % TEAM;
    let row0 = ((wid.y * p.grid_x + wid.x) * 8u + t / TEAM) * RPT;
    let words_per_row = p.cols / 8u;
    let groups = p.cols / p.group;
    // Groups of a multiple of 32 columns never split a vec4: one scale per load.
    let whole = p.group % 32u == 0u;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var v = lane; v < p.stride; v = v + TEAM) {
        let base = 4u * v;
        if (whole && base + 3u < words_per_row) {
            let c0 = chunk(base);
            let c1 = chunk(base + 1u);
            let c2 = chunk(base + 2u);
            let c3 = chunk(base + 3u);
            let sum_x = c0.sum + c1.sum + c2.sum + c3.sum;
            for (var r = 0u; r < RPT; r = r + 1u) {
                let row = row0 + r;
                if (row < p.rows) {
                    let q = words[row * p.stride + v];
                    let g = row * groups + (base * 8u) / p.group;
                    let d = nibbles(q.x, c0) + nibbles(q.y, c1) + nibbles(q.z, c2)
                        + nibbles(q.w, c3);
                    acc[r] = acc[r] + scales[g] * (d + offset(g) * sum_x);
                }
            }
        } else {
            // Odd shapes: word by word, each with its own group.
            for (var j = 0u; j < 4u; j = j + 1u) {
                let w = base + j;
                if (w < words_per_row) {
                    let c = chunk(w);
                    for (var r = 0u; r < RPT; r = r + 1u) {
                        let row = row0 + r;
                        if (row < p.rows) {
                            let q = words[row * p.stride + v];
                            let g = row * groups + (w * 8u) / p.group;
                            acc[r] = acc[r] + scales[g] * (nibbles(q[j], c) + offset(g) * c.sum);
                        }
                    }
                }
            }
        }
    }
    // Team sums: a butterfly of subgroup shuffles within each subgroup of SG lanes (none when
    // SG = 1), then a tree in shared memory across the team's 32 / SG subgroups (none when
    // SG = 32). After the butterfly every lane holds its subgroup's sum, so the tree steps of
    // stride ≥ SG add whole subgroups. (Assumes subgroups are aligned runs of consecutive
    // local invocation indices, as every current driver lays out a 1-D workgroup; the
    // rows-per-team tests check it on the device they run on.)
    for (var m = SG / 2u; m > 0u; m = m >> 1u) {
        for (var r = 0u; r < RPT; r = r + 1u) {
            acc[r] = acc[r] + lane_xor(acc[r], m);
        }
    }
    if (SG < TEAM) {
        for (var r = 0u; r < RPT; r = r + 1u) {
            partial[t * RPT + r] = acc[r];
        }
        workgroupBarrier();
        for (var s = TEAM / 2u; s >= SG; s = s >> 1u) {
            if (lane < s) {
                for (var r = 0u; r < RPT; r = r + 1u) {
                    partial[t * RPT + r] = partial[t * RPT + r] + partial[(t + s) * RPT + r];
                }
            }
            workgroupBarrier();
        }
        for (var r = 0u; r < RPT; r = r + 1u) {
            acc[r] = partial[t * RPT + r];
        }
    }
    if (lane == 0u) {
        if (p.store == STORE_SILU_MUL) {
            // Rows come in (gate, up) pairs, a pair never split between teams (RPT even).
            for (var r = 0u; r + 1u < RPT; r = r + 2u) {
                if (row0 + r + 1u < p.rows) {
                    let g = acc[r];
                    y[(row0 + r) / 2u] = g / (1.0 + exp(-g)) * acc[r + 1u];
                }
            }
        } else {
            for (var r = 0u; r < RPT; r = r + 1u) {
                if (row0 + r < p.rows) {
                    var sum = acc[r];
                    if (p.store == STORE_ADD) {
                        sum = sum + y[row0 + r];
                    }
                    y[row0 + r] = sum;
                }
            }
        }
    }
}
