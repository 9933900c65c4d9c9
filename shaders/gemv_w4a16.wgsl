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
override RPT: u32 = 4u; // rows per team, at most 4
// The team sums and the store: shaders/gemv_store.wgsl (`team_store`), prepended by the host.

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
    team_store(t, lane, row0, acc);
}
