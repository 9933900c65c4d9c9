// Dynamic activation quantization to integer codes, for the W4A4 integer GEMV: each group of
// `group` consecutive values (a whole token, or one head of the o_proj input) gets the same
// asymmetric quantizer as act_quant.wgsl — range [min(x, 0), max(x, 0)], s = max(max − min,
// 1e-6)/qmax, z = round(−min/s), q = clamp(round(x/s) + z, 0, qmax) — and is stored as the
// signed integers q − z (|q − z| ≤ qmax ≤ 127, one byte each) with its scale s: the product
// (q − z)·s is exactly the fake-quantized value the float path would use.
//
// Layout: x f32 [groups · group] (group divisible by 8). codes u32, two words per 8 columns in
// the weights' nibble order: word 2k holds columns 8k, 8k+2, 8k+4, 8k+6 (bytes 0..3) and word
// 2k+1 columns 8k+1, 8k+3, 8k+5, 8k+7 — the order in which `w & 0x0F0F0F0F` and
// `(w >> 4) & 0x0F0F0F0F` expose a packed weight word's nibbles, so the GEMV pairs them with
// dot4I8Packed and no shuffles. scales f32 [groups].
// Workgroup plan: one workgroup of 64 threads per group (2-D grid past 65535 groups); min/max
// by a shared-memory reduction, then each thread packs a strided set of words.

struct Params {
    groups: u32,
    group: u32,
    qmax: f32,
    grid_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> codes: array<u32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;

var<workgroup> lo: array<f32, 64>;
var<workgroup> hi: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = wid.y * p.grid_x + wid.x;
    if (g >= p.groups) {
        return;
    }
    let base = g * p.group;
    var mn = 0.0;
    var mx = 0.0;
    for (var i = t; i < p.group; i = i + 64u) {
        mn = min(mn, x[base + i]);
        mx = max(mx, x[base + i]);
    }
    lo[t] = mn;
    hi[t] = mx;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (t < s) {
            lo[t] = min(lo[t], lo[t + s]);
            hi[t] = max(hi[t], hi[t + s]);
        }
        workgroupBarrier();
    }
    let scale = max(hi[0] - lo[0], 1e-6) / p.qmax;
    let zero = round(-lo[0] / scale);
    if (t == 0u) {
        scales[g] = scale;
    }
    // Word k2 of the group: columns 8·(k2/2) + (k2 % 2) + 2b, b = 0..3.
    let words = p.group / 4u;
    for (var k2 = t; k2 < words; k2 = k2 + 64u) {
        let first = base + 8u * (k2 / 2u) + k2 % 2u;
        var word = 0u;
        for (var b = 0u; b < 4u; b = b + 1u) {
            let q = clamp(round(x[first + 2u * b] / scale) + zero, 0.0, p.qmax);
            word = word | ((u32(i32(q - zero)) & 0xFFu) << (8u * b));
        }
        codes[base / 4u + k2] = word;
    }
}
