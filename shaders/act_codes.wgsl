// Dynamic activation quantization to integer codes, for the W4A4 integer GEMV: each group of
// `group` consecutive values (a whole token, or one head of the o_proj input) gets the same
// asymmetric quantizer as act_quant.wgsl — range [min(x, 0), max(x, 0)], s = max(max − min,
// 1e-6)/qmax, z = round(−min/s), q = clamp(round(x/s) + z, 0, qmax): act_pack.wgsl, prepended
// — and is stored as the signed integers q − z (|q − z| ≤ qmax ≤ 127, one byte each) with its scale s: the product
// (q − z)·s is exactly the fake-quantized value the float path would use.
//
// Layout: x f32 [groups · group] (group divisible by 8). codes u32, two words per 8 columns in
// the weights' nibble order: word 2k holds columns 8k, 8k+2, 8k+4, 8k+6 (bytes 0..3) and word
// 2k+1 columns 8k+1, 8k+3, 8k+5, 8k+7 — the order in which `w & 0x0F0F0F0F` and
// `(w >> 4) & 0x0F0F0F0F` expose a packed weight word's nibbles, so the GEMV pairs them with
// dot4I8Packed and no shuffles. scales f32 [groups].
// With `norm` set, x is the residual stream and each group (a whole token) is first RMS-
// normalized, y = x / sqrt(mean(x²) + eps) · w (rms_norm.wgsl's arithmetic, in the same order),
// and y is quantized: the norm and the quantization of a linear's input in one launch.
// Workgroup plan: one workgroup of 256 threads per group (2-D grid past 65535 groups); x read
// as vec4 (a whole token is one group: the loads must be many and wide, or one workgroup's
// latency dominates the decode step); min/max by a shared-memory reduction, then each thread
// packs the two words of a strided set of 8-column blocks.

struct Params {
    groups: u32,
    group: u32,
    qmax: f32,
    grid_x: u32,
    norm: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> codes: array<u32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;
// The norm's weight [group] (bound to x, unread, without `norm`).
@group(0) @binding(4) var<storage, read> nw: array<vec4<f32>>;

const WG: u32 = 256u;
var<workgroup> lo: array<f32, 256>;
var<workgroup> hi: array<f32, 256>;

// Value i (a vec4) of the group starting at vec4 `base4`: x, or its RMS-normalized value.
fn value(base4: u32, i: u32, inv: f32) -> vec4<f32> {
    if (p.norm != 0u) {
        return x[base4 + i] * inv * nw[i];
    }
    return x[base4 + i];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = wid.y * p.grid_x + wid.x;
    if (g >= p.groups) {
        return;
    }
    let base4 = g * p.group / 4u;
    let n4 = p.group / 4u;
    var inv = 1.0;
    if (p.norm != 0u) {
        // Σx² in rms_norm.wgsl's order: per thread over the strided columns, then the tree.
        var acc = 0.0;
        for (var i = t; i < p.group; i = i + WG) {
            let v = x[base4 + i / 4u][i % 4u];
            acc = acc + v * v;
        }
        lo[t] = acc;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s = s >> 1u) {
            if (t < s) {
                lo[t] = lo[t] + lo[t + s];
            }
            workgroupBarrier();
        }
        inv = inverseSqrt(lo[0] / f32(p.group) + p.eps);
        workgroupBarrier();
    }
    var mn = vec4<f32>(0.0);
    var mx = vec4<f32>(0.0);
    for (var i = t; i < n4; i = i + WG) {
        let v = value(base4, i, inv);
        mn = min(mn, v);
        mx = max(mx, v);
    }
    lo[t] = min(min(mn.x, mn.y), min(mn.z, mn.w));
    hi[t] = max(max(mx.x, mx.y), max(mx.z, mx.w));
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            lo[t] = min(lo[t], lo[t + s]);
            hi[t] = max(hi[t], hi[t + s]);
        }
        workgroupBarrier();
    }
    let grid = act_grid(lo[0], hi[0], p.qmax);
    if (t == 0u) {
        scales[g] = grid.x;
    }
    // Block k (columns 8k..8k+7) gives word 2k (even columns) and word 2k+1 (odd columns).
    for (var k = t; k < p.group / 8u; k = k + WG) {
        let a = value(base4, 2u * k, inv);
        let b = value(base4, 2u * k + 1u, inv);
        let w = base4 + 2u * k;
        codes[w] = act_pack(a.x, a.z, b.x, b.z, grid, p.qmax);
        codes[w + 1u] = act_pack(a.y, a.w, b.y, b.w, grid, p.qmax);
    }
}
