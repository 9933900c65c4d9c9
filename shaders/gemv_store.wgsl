// The end of the int4 GEMVs (gemv_w4a16.wgsl, gemv_w4a4.wgsl), prepended to both by the host
// after shaders/lanes_subgroup.wgsl or lanes_shared.wgsl: each team's partial sums `acc` of its
// RPT rows from row0 on are summed over the team's 32 lanes, then over the KS teams that
// share those rows (each walked a slice of the columns), and stored. Uses the GEMV's TEAM,
// `p.rows`, `p.cols`, `p.store` and `y`.

// What the results become (`store`): y = W·x, y += W·x (a residual connection folded into the
// product), or, for a gate and an up projection interleaved row by row (gate_0, up_0, gate_1,
// …), y_i = SiLU(gate_i·x)·(up_i·x) — the gated MLP's middle in the epilogue, y [rows / 2].
const STORE_WRITE: u32 = 0u;
const STORE_ADD: u32 = 1u;
const STORE_SILU_MUL: u32 = 2u;
// Lanes per subgroup used in the team sums: the adapter's smallest subgroup size up to 32 where
// it has subgroup operations (with lanes_subgroup.wgsl), else 1 (lanes_shared.wgsl).
override SG: u32 = 1u;
override RPT: u32 = 4u; // rows per team, at most 4
// Teams per set of RPT rows (1, 2, 4 or 8): the columns are split between them, so a matrix
// of few rows still fills the device, and each team still reuses its x loads over RPT rows.
override KS: u32 = 1u;
// x is the residual stream, RMS-normalized by the GEMV: acc[SQ] carries the lanes' partial
// sums of x², summed like the rows, and the results are scaled by 1 / rms(x).
override NORM: bool = false;
const SQ: u32 = 4u;
const SLOTS: u32 = 5u;
var<workgroup> partial: array<f32, 1280>; // [thread][slot]

// The i-th summed slot: the RPT rows, then x² where the GEMV normalizes.
fn slot(i: u32) -> u32 {
    return select(SQ, i, i < RPT);
}

fn slot_count() -> u32 {
    return RPT + select(0u, 1u, NORM);
}

// Called by every thread of the workgroup, in uniform control flow; `eps` is the RMSNorm's
// (unused without NORM).
fn team_store(t: u32, lane: u32, row0: u32, partial_sums: array<f32, 5>, eps: f32) {
    var acc = partial_sums;
    let team = t / TEAM;
    let n = slot_count();
    // Team sums: a butterfly of subgroup shuffles within each subgroup of SG lanes (none when
    // SG = 1), then a tree in shared memory across the team's 32 / SG subgroups (none when
    // SG = 32). After the butterfly every lane holds its subgroup's sum, so the tree steps of
    // stride ≥ SG add whole subgroups. (Assumes subgroups are aligned runs of consecutive
    // local invocation indices, as every current driver lays out a 1-D workgroup; the
    // rows-per-team tests check it on the device they run on.)
    for (var m = SG / 2u; m > 0u; m = m >> 1u) {
        for (var i = 0u; i < n; i = i + 1u) {
            let r = slot(i);
            acc[r] = acc[r] + lane_xor(acc[r], m);
        }
    }
    if (SG < TEAM) {
        for (var i = 0u; i < n; i = i + 1u) {
            partial[t * SLOTS + slot(i)] = acc[slot(i)];
        }
        workgroupBarrier();
        for (var s = TEAM / 2u; s >= SG; s = s >> 1u) {
            if (lane < s) {
                for (var i = 0u; i < n; i = i + 1u) {
                    let at = t * SLOTS + slot(i);
                    partial[at] = partial[at] + partial[at + s * SLOTS];
                }
            }
            workgroupBarrier();
        }
        for (var i = 0u; i < n; i = i + 1u) {
            acc[slot(i)] = partial[t * SLOTS + slot(i)];
        }
    }
    // Slice sums: lane 0 of each team posts its sums, the first team of each row set adds
    // the others' in order (the same order on every run).
    if (KS > 1u) {
        workgroupBarrier();
        if (lane == 0u) {
            for (var i = 0u; i < n; i = i + 1u) {
                partial[team * SLOTS + slot(i)] = acc[slot(i)];
            }
        }
        workgroupBarrier();
        if (lane == 0u && team % KS == 0u) {
            for (var j = 1u; j < KS; j = j + 1u) {
                for (var i = 0u; i < n; i = i + 1u) {
                    acc[slot(i)] = acc[slot(i)] + partial[(team + j) * SLOTS + slot(i)];
                }
            }
        }
    }
    if (lane != 0u || team % KS != 0u) {
        return;
    }
    if (NORM) {
        let inv = inverseSqrt(acc[SQ] / f32(p.cols) + eps);
        for (var r = 0u; r < RPT; r = r + 1u) {
            acc[r] = acc[r] * inv;
        }
    }
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
