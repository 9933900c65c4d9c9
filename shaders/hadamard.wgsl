// Online Hadamard transform of each row, y = H·x with H = (H_K ⊗ H_P)/√n, n = K·P (the
// down_proj input of a rotated model; per head for Q/K).
//
// Rows of up to 4096 values (heads, SmolLM2's 1536-wide down_proj input): `whole`, one
// workgroup per row, the row in shared memory (16 KB, the WebGPU minimum), every butterfly
// stage and the K-mix in one launch. With `qmax` above 0 it also quantizes each row of out as
// the W4A4 down_proj takes its input (one group per row) into act_codes.wgsl's layout with its
// quantizer (act_pack.wgsl, prepended): codes u32 [rows, n/4], scales f32 [rows]. The
// transform and the quantization in one launch. With `paired` each row is a head held in RoPE pairs (x_0, x_h, x_1, x_{h+1},
// …, h = n/2: the order decode's q, k, v GEMV turns them in) and is read in natural order.
// Wider rows (11008, 14336) take two launches, or more when a segment is longer than 4096,
// recorded back to back, in place on x then into out:
// - `segments`: the butterfly stages of stride below `stride` of chunks of `stride` values
//   (whole segments, or 4096-value pieces of longer ones), one workgroup per chunk, the chunk
//   in shared memory: every stage of a 7B or 8B down_proj input in one launch.
// - `butterfly`: one later stage, (a, b) ← (a + b, a − b) for the pairs `stride` apart in
//   every segment, one thread per pair (rows · n/2 threads): only for segments over 4096.
// - `mix`: out[i·P + j] = Σ_l H_K[i, l] · x[l·P + j] / √n, one thread per output element;
//   H_K is the ±1 base matrix as f32 [K, K] (K = 1: a plain scale).

struct Params {
    rows: u32,
    n: u32,
    p: u32,
    k: u32,
    stride: u32,
    grid_x: u32,
    scale: f32,
    qmax: f32, // `whole`'s codes: 2^bits − 1, or 0 for none
    paired: u32, // `whole`: rows in RoPE pairs
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> hk: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// `whole` without `qmax`: bound to small unread buffers.
@group(0) @binding(4) var<storage, read_write> codes: array<u32>;
@group(0) @binding(5) var<storage, read_write> code_scales: array<f32>;

const WHOLE_MAX: u32 = 4096u;
var<workgroup> buf: array<f32, 4096>;

// The butterfly stages of stride 1, 2, … below `limit` over buf[0..len] in place (len a
// multiple of limit): (a, b) ← (a + b, a − b) for the pairs `stride` apart, as `butterfly`
// does them. Called by every thread of the workgroup.
fn stages(t: u32, len: u32, limit: u32) {
    for (var s = 1u; s < limit; s = s * 2u) {
        for (var q = t; q < len / 2u; q = q + 256u) {
            let a_idx = (q / s) * 2u * s + q % s;
            let a = buf[a_idx];
            let b = buf[a_idx + s];
            buf[a_idx] = a + b;
            buf[a_idx + s] = a - b;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn whole(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wid.y * prm.grid_x + wid.x;
    if (row >= prm.rows) {
        return; // the whole workgroup: control flow stays uniform for the barriers
    }
    let base = row * prm.n;
    let half = prm.n / 2u;
    for (var i = t; i < prm.n; i = i + 256u) {
        var src = i;
        if (prm.paired != 0u) {
            src = select(2u * (i - half) + 1u, 2u * i, i < half);
        }
        buf[i] = x[base + src];
    }
    workgroupBarrier();
    // The length-P transforms of the K segments.
    stages(t, prm.n, prm.p);
    var mn = 0.0;
    var mx = 0.0;
    for (var c = t; c < prm.n; c = c + 256u) {
        let i = c / prm.p;
        let j = c % prm.p;
        var acc = 0.0;
        for (var l = 0u; l < prm.k; l = l + 1u) {
            acc = acc + hk[i * prm.k + l] * buf[l * prm.p + j];
        }
        let y = acc * prm.scale;
        out[base + c] = y;
        mn = min(mn, y);
        mx = max(mx, y);
    }
    if (prm.qmax > 0.0) {
        // act_codes.wgsl's quantizer over the row: range [min(y, 0), max(y, 0)]. The mix has
        // read buf for the last time: its first 512 values hold the min and max reductions
        // (no more shared memory than the transform's 16 KB).
        workgroupBarrier();
        buf[t] = mn;
        buf[256u + t] = mx;
        workgroupBarrier();
        for (var r = 128u; r > 0u; r = r >> 1u) {
            if (t < r) {
                buf[t] = min(buf[t], buf[t + r]);
                buf[256u + t] = max(buf[256u + t], buf[256u + t + r]);
            }
            workgroupBarrier();
        }
        // The row's outputs, written by other threads of this workgroup, are read back.
        storageBarrier();
        let grid = act_grid(buf[0], buf[256u], prm.qmax);
        if (t == 0u) {
            code_scales[row] = grid.x;
        }
        // Block b (columns 8b..8b+7) gives word 2b (even columns) and word 2b + 1 (odd ones).
        for (var b = t; b < prm.n / 8u; b = b + 256u) {
            let c = base + 8u * b;
            let w = base / 4u + 2u * b;
            codes[w] = act_pack(out[c], out[c + 2u], out[c + 4u], out[c + 6u], grid, prm.qmax);
            codes[w + 1u] =
                act_pack(out[c + 1u], out[c + 3u], out[c + 5u], out[c + 7u], grid, prm.qmax);
        }
    }
}

@compute @workgroup_size(256)
fn segments(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let chunks = (prm.n + prm.stride - 1u) / prm.stride;
    let c = wid.y * prm.grid_x + wid.x;
    if (c >= prm.rows * chunks) {
        return; // the whole workgroup: control flow stays uniform for the barriers
    }
    // The last chunk of a row may be shorter: still whole segments (n is a multiple of P).
    let start = (c / chunks) * prm.n + (c % chunks) * prm.stride;
    let len = min(prm.stride, prm.n - (c % chunks) * prm.stride);
    for (var i = t; i < len; i = i + 256u) {
        buf[i] = x[start + i];
    }
    workgroupBarrier();
    stages(t, len, min(prm.p, prm.stride));
    for (var i = t; i < len; i = i + 256u) {
        x[start + i] = buf[i];
    }
}

@compute @workgroup_size(256)
fn butterfly(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let q = (wid.y * prm.grid_x + wid.x) * 256u + t;
    let half = prm.n / 2u;
    if (q >= prm.rows * half) {
        return;
    }
    let row = q / half;
    let r = q % half;
    // Pair r of the row: its block of 2·stride, and the offset inside the block.
    let block = r / prm.stride;
    let off = r % prm.stride;
    let a_idx = row * prm.n + block * 2u * prm.stride + off;
    let b_idx = a_idx + prm.stride;
    let a = x[a_idx];
    let b = x[b_idx];
    x[a_idx] = a + b;
    x[b_idx] = a - b;
}

@compute @workgroup_size(256)
fn mix(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let e = (wid.y * prm.grid_x + wid.x) * 256u + t;
    if (e >= prm.rows * prm.n) {
        return;
    }
    let row = e / prm.n;
    let c = e % prm.n;
    let i = c / prm.p;
    let j = c % prm.p;
    var acc = 0.0;
    for (var l = 0u; l < prm.k; l = l + 1u) {
        acc = acc + hk[i * prm.k + l] * x[row * prm.n + l * prm.p + j];
    }
    out[e] = acc * prm.scale;
}
