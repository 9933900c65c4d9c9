// The end of the int4 GEMVs (gemv_w4a16.wgsl, gemv_w4a4.wgsl), prepended to both by the host
// after shaders/lanes_subgroup.wgsl or lanes_shared.wgsl: each team's partial sums (`Sums`) of its
// RPT rows from row0 on are summed over the team's 32 lanes, then over the KS teams that
// share those rows (each walked a slice of the columns), and stored. Uses the GEMV's TEAM,
// `p.rows`, `p.cols`, `p.store`, `p.rope_rows`, `p.head_dim` and `y`; declares bindings 7 and 8
// (RoPE's cos and sin, read with STORE_ROPE only: other launches bind any buffer there).

// What the results become (`store`): y = W·x, y += W·x (a residual connection folded into the
// product), or, for a gate and an up projection interleaved row by row (gate_0, up_0, gate_1,
// …), y_i = SiLU(gate_i·x)·(up_i·x) — the gated MLP's middle in the epilogue, y [rows / 2].
const STORE_WRITE: u32 = 0u;
const STORE_ADD: u32 = 1u;
const STORE_SILU_MUL: u32 = 2u;
// q, k and v stacked, their rows in RoPE pairs: the first `rope_rows` rows (q's and k's heads
// of `head_dim` rows) ordered x_0, x_h, x_1, x_{h+1}, … within each head (h = head_dim / 2),
// so a team holds whole pairs; each pair is stored rotated by the position's angle of
// frequency i, (x_i·cos − x_{i+h}·sin, x_{i+h}·cos + x_i·sin), still paired (attention
// scores are dot products, the same in any order of a head's dimensions as long as q and k
// share it). v's rows are stored as they are.
const STORE_ROPE: u32 = 3u;
@group(0) @binding(7) var<storage, read> rope_cos: array<f32>; // [head_dim / 2]
@group(0) @binding(8) var<storage, read> rope_sin: array<f32>;
// Lanes per subgroup used in the team sums: the adapter's smallest subgroup size up to 32 where
// it has subgroup operations (with lanes_subgroup.wgsl), else 1 (lanes_shared.wgsl).
override SG: u32 = 1u;
override RPT: u32 = 4u; // rows per team, at most 4
// Teams per set of RPT rows (1, 2, 4 or 8): the columns are split between them, so a matrix
// of few rows still fills the device, and each team still reuses its x loads over RPT rows.
override KS: u32 = 1u;
// x is the residual stream, RMS-normalized by the GEMV: the teams also sum x² (`Sums.sq`), and
// the results are scaled by 1 / rms(x).
override NORM: bool = false;

// A lane's partial sums: its team's RPT rows (components 0 .. RPT − 1 of `rows`, the others
// stay 0) and Σ x² with NORM. Named components, not a private array (an array indexed
// in a loop may live in memory: results/bench-h100-run11.txt).
struct Sums {
    rows: vec4<f32>,
    sq: f32,
}

var<workgroup> partial: array<vec4<f32>, 256>; // [thread]
var<workgroup> partial_sq: array<f32, 256>;

// One butterfly step of the subgroup sums, over the components in use.
fn xor_step(s: Sums, m: u32) -> Sums {
    var r = s.rows;
    r.x = r.x + lane_xor(r.x, m);
    if (RPT > 1u) {
        r.y = r.y + lane_xor(r.y, m);
    }
    if (RPT > 2u) {
        r.z = r.z + lane_xor(r.z, m);
        r.w = r.w + lane_xor(r.w, m);
    }
    var sq = s.sq;
    if (NORM) {
        sq = sq + lane_xor(sq, m);
    }
    return Sums(r, sq);
}

// Called by every thread of the workgroup, in uniform control flow; `eps` is the RMSNorm's
// (unused without NORM).
fn team_store(t: u32, lane: u32, row0: u32, lane_sums: Sums, eps: f32) {
    var s = lane_sums;
    let team = t / TEAM;
    // Team sums: a butterfly of subgroup shuffles within each subgroup of SG lanes (none when
    // SG = 1), then a tree in shared memory across the team's 32 / SG subgroups (none when
    // SG = 32). After the butterfly every lane holds its subgroup's sum, so the tree steps of
    // stride ≥ SG add whole subgroups. (Assumes subgroups are aligned runs of consecutive
    // local invocation indices, as every current driver lays out a 1-D workgroup; the
    // rows-per-team tests check it on the device they run on.)
    for (var m = SG / 2u; m > 0u; m = m >> 1u) {
        s = xor_step(s, m);
    }
    if (SG < TEAM) {
        partial[t] = s.rows;
        partial_sq[t] = s.sq;
        workgroupBarrier();
        for (var k = TEAM / 2u; k >= SG; k = k >> 1u) {
            if (lane < k) {
                partial[t] = partial[t] + partial[t + k];
                partial_sq[t] = partial_sq[t] + partial_sq[t + k];
            }
            workgroupBarrier();
        }
        s = Sums(partial[t], partial_sq[t]);
    }
    // Slice sums: lane 0 of each team posts its sums, the first team of each row set adds
    // the others' in order (the same order on every run).
    if (KS > 1u) {
        workgroupBarrier();
        if (lane == 0u) {
            partial[team] = s.rows;
            partial_sq[team] = s.sq;
        }
        workgroupBarrier();
        if (lane == 0u && team % KS == 0u) {
            for (var j = 1u; j < KS; j = j + 1u) {
                s = Sums(s.rows + partial[team + j], s.sq + partial_sq[team + j]);
            }
        }
    }
    if (lane != 0u || team % KS != 0u) {
        return;
    }
    var scaled = s.rows;
    if (NORM) {
        scaled = scaled * inverseSqrt(s.sq / f32(p.cols) + eps);
    }
    let rows = scaled; // a value, indexed below without going through memory
    if (p.store == STORE_ROPE) {
        for (var r = 0u; r + 1u < RPT; r = r + 2u) {
            let row = row0 + r;
            if (row + 1u < p.rows) {
                var a = rows[r];
                var b = rows[r + 1u];
                if (row < p.rope_rows) {
                    let i = (row % p.head_dim) / 2u;
                    let cs = rope_cos[i];
                    let sn = rope_sin[i];
                    let rotated = a * cs - b * sn;
                    b = b * cs + a * sn;
                    a = rotated;
                }
                y[row] = a;
                y[row + 1u] = b;
            }
        }
    } else if (p.store == STORE_SILU_MUL) {
        // Rows come in (gate, up) pairs, a pair never split between teams (RPT even).
        for (var r = 0u; r + 1u < RPT; r = r + 2u) {
            if (row0 + r + 1u < p.rows) {
                let g = rows[r];
                y[(row0 + r) / 2u] = g / (1.0 + exp(-g)) * rows[r + 1u];
            }
        }
    } else {
        for (var r = 0u; r < RPT; r = r + 1u) {
            if (row0 + r < p.rows) {
                var sum = rows[r];
                if (p.store == STORE_ADD) {
                    sum = sum + y[row0 + r];
                }
                y[row0 + r] = sum;
            }
        }
    }
}
