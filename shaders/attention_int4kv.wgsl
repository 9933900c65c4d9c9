// Decode attention of one new query position over the KV cache (kv_quant.wgsl's layout: int4
// codes, or f32 bits when `raw`), with grouped-query heads: query head h reads KV head
// h / group.
//
// Layout: q f32 [nq, hd]; K and V codes u32 [max_seq, nkv, hd/8] with f32 scales and zeros
// [max_seq, nkv]; scores f32 [nq, max_seq] scratch; out f32 [nq, hd]. Positions 0..len-1.
// Workgroup plan: one workgroup of 64 threads per query head, three passes over the positions:
// (1) threads take positions t, t + 64, … and write q·k_t/√hd to the scratch row, keeping a
// running max; (2) exp(s − max) in place and its sum, both reduced in shared memory;
// (3) thread d (and d + 64, …) sums p_t·v_t[d] over all positions and divides by the sum.
// K and V are dequantized on the fly: (code − zero)·scale.

struct Params {
    nq: u32,
    nkv: u32,
    hd: u32,
    len: u32,
    max_seq: u32,
    scale: f32,
    raw: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_codes: array<u32>;
@group(0) @binding(3) var<storage, read> k_scales: array<f32>;
@group(0) @binding(4) var<storage, read> k_zeros: array<f32>;
@group(0) @binding(5) var<storage, read> v_codes: array<u32>;
@group(0) @binding(6) var<storage, read> v_scales: array<f32>;
@group(0) @binding(7) var<storage, read> v_zeros: array<f32>;
@group(0) @binding(8) var<storage, read_write> scores: array<f32>;
@group(0) @binding(9) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 64>;

fn code(word: u32, j: u32) -> f32 {
    return f32((word >> (4u * j)) & 0xFu);
}

// Element d of the key at cache slot `slot` (position · nkv + head).
fn key(slot: u32, d: u32) -> f32 {
    if (p.raw != 0u) {
        return bitcast<f32>(k_codes[slot * p.hd + d]);
    }
    let word = k_codes[slot * (p.hd / 8u) + d / 8u];
    return (code(word, d % 8u) - k_zeros[slot]) * k_scales[slot];
}

fn value(slot: u32, d: u32) -> f32 {
    if (p.raw != 0u) {
        return bitcast<f32>(v_codes[slot * p.hd + d]);
    }
    let word = v_codes[slot * (p.hd / 8u) + d / 8u];
    return (code(word, d % 8u) - v_zeros[slot]) * v_scales[slot];
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let h = wid.x;
    let kv = h / (p.nq / p.nkv);
    let row = h * p.max_seq;
    // (1) scores and their max
    var mx = -3.0e38;
    for (var s = t; s < p.len; s = s + 64u) {
        let slot = s * p.nkv + kv;
        var dot_qk = 0.0;
        for (var d = 0u; d < p.hd; d = d + 1u) {
            dot_qk = dot_qk + q[h * p.hd + d] * key(slot, d);
        }
        let v = dot_qk * p.scale;
        scores[row + s] = v;
        mx = max(mx, v);
    }
    red[t] = mx;
    workgroupBarrier();
    for (var r = 32u; r > 0u; r = r >> 1u) {
        if (t < r) {
            red[t] = max(red[t], red[t + r]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    // (2) exponentials and their sum
    var sum = 0.0;
    for (var s = t; s < p.len; s = s + 64u) {
        let e = exp(scores[row + s] - m);
        scores[row + s] = e;
        sum = sum + e;
    }
    red[t] = sum;
    workgroupBarrier();
    for (var r = 32u; r > 0u; r = r >> 1u) {
        if (t < r) {
            red[t] = red[t] + red[t + r];
        }
        workgroupBarrier();
    }
    let total = red[0];
    storageBarrier();
    workgroupBarrier();
    // (3) weighted sum of the values
    for (var d = t; d < p.hd; d = d + 64u) {
        var acc = 0.0;
        for (var s = 0u; s < p.len; s = s + 1u) {
            acc = acc + scores[row + s] * value(s * p.nkv + kv, d);
        }
        out[h * p.hd + d] = acc / total;
    }
}
