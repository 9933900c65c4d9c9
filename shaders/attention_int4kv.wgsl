// Causal attention of `tokens` consecutive query positions (pos0, pos0 + 1, …) over the KV
// cache (kv_quant.wgsl's layout: int4 codes, or f32 bits when `raw`), with grouped-query heads:
// query head h reads KV head h / (nq / nkv); query i attends to positions 0..=pos0 + i. Decode
// is the case tokens = 1; prefill chunks use the same kernel.
//
// Layout: q f32 [tokens, nq, hd]; K and V codes u32 [max_seq, nkv, hd/8] with f32 (scale,
// zero) pairs [max_seq, nkv, 2]; out f32 [tokens, nq, hd]. hd ≤ 256, a pipeline constant (HD),
// so the loops over a head's words have fixed trip counts the driver can unroll and batch the
// loads of.
// With `qmax` above 0 each head's output is also quantized as the W4A4 o_proj takes it, one
// group per head, into act_codes.wgsl's layout with its quantizer (act_pack.wgsl, prepended):
// codes u32 [tokens, nq·hd/4], scales f32 [tokens, nq]. The attention and the o_proj input's
// quantization in one launch.
// Workgroup plan: one workgroup of 64 threads per (query head, query), a grid sized for the
// most tokens the launch is bound for (workgroups past `tokens` return). The positions are
// taken 64 at a time with an online softmax, so no score buffer is needed: thread t scores
// position base + t (q·k/√hd from the codes a word at a time, against q held in shared memory;
// the key's scale and zero apply once to the sum), the chunk's max is reduced in shared
// memory (as are Σ q and the chunk's sum of weights: trees, not one thread's serial loop), the
// running sum and outputs are rescaled by exp(m_old − m_new), and the values are
// accumulated a word of codes at a time: thread t takes word w = t mod W of each value (dims
// 8w..8w+7, W = hd/8) at the chunk's positions g, g + G, … (g = t div W, G = 64 div W groups),
// one load of codes, scale and zero per 8 dims. The G partial sums of each dim are added at
// the end, in shared memory.

struct Params {
    nq: u32,
    nkv: u32,
    hd: u32, // = HD
    pos0: u32,
    tokens: u32,
    scale: f32,
    raw: u32,
    qmax: f32, // the o_proj input's codes: 2^bits − 1, or 0 for none
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_codes: array<u32>;
@group(0) @binding(3) var<storage, read> k_grid: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> v_codes: array<u32>;
@group(0) @binding(5) var<storage, read> v_grid: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
// Without `qmax`, bound to small unread buffers.
@group(0) @binding(7) var<storage, read_write> codes: array<u32>;
@group(0) @binding(8) var<storage, read_write> code_scales: array<f32>;

const WG: u32 = 64u;
override HD: u32 = 64u; // head dim
var<workgroup> red: array<f32, 64>;
var<workgroup> weight: array<f32, 64>;
var<workgroup> qs: array<f32, 256>; // this workgroup's query
var<workgroup> partial: array<f32, 512>; // [group][dim] value sums (G·hd ≤ 64·8)

// The sum (or, with `take_max`, the max) of every thread's v, in `red`; all threads call it.
fn reduce(t: u32, v: f32, take_max: bool) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var r = WG / 2u; r > 0u; r = r >> 1u) {
        if (t < r) {
            red[t] = select(red[t] + red[t + r], max(red[t], red[t + r]), take_max);
        }
        workgroupBarrier();
    }
    let out = red[0];
    workgroupBarrier(); // red is free again
    return out;
}

// q·k for the key at cache slot `slot` (position · nkv + head); `q_sum` = Σ q. With codes c,
// k = (c − zero)·scale, so q·k = (Σ q·c − zero·Σ q)·scale.
fn q_dot_key(slot: u32, q_sum: f32) -> f32 {
    if (p.raw != 0u) {
        var raw = 0.0;
        for (var d = 0u; d < HD; d = d + 1u) {
            raw = raw + qs[d] * bitcast<f32>(k_codes[slot * HD + d]);
        }
        return raw;
    }
    let words = HD / 8u;
    var sum = 0.0;
    for (var w = 0u; w < words; w = w + 1u) {
        // Byte j of the word holds elements 2j (low nibble) and 2j + 1 (high nibble).
        let word = k_codes[slot * words + w];
        let even = vec4<f32>(unpack4xU8(word & 0x0F0F0F0Fu));
        let odd = vec4<f32>(unpack4xU8((word >> 4u) & 0x0F0F0F0Fu));
        let b = 8u * w;
        sum = sum + dot(even, vec4<f32>(qs[b], qs[b + 2u], qs[b + 4u], qs[b + 6u]))
            + dot(odd, vec4<f32>(qs[b + 1u], qs[b + 3u], qs[b + 5u], qs[b + 7u]));
    }
    let grid = k_grid[slot];
    return (sum - grid.y * q_sum) * grid.x;
}

// Dims 8w..8w+7 of a value: the even ones (8w, 8w + 2, 8w + 4, 8w + 6) and the odd ones, in
// named vectors rather than an array (an array indexed in a loop may live in memory).
struct Dims8 {
    even: vec4<f32>,
    odd: vec4<f32>,
}

// `wt`·v for dims 8w..8w+7 of the value at cache slot `slot`.
fn value_part(slot: u32, w: u32, wt: f32) -> Dims8 {
    if (p.raw != 0u) {
        let at = slot * HD + 8u * w;
        let even = vec4<f32>(bitcast<f32>(v_codes[at]), bitcast<f32>(v_codes[at + 2u]),
            bitcast<f32>(v_codes[at + 4u]), bitcast<f32>(v_codes[at + 6u]));
        let odd = vec4<f32>(bitcast<f32>(v_codes[at + 1u]), bitcast<f32>(v_codes[at + 3u]),
            bitcast<f32>(v_codes[at + 5u]), bitcast<f32>(v_codes[at + 7u]));
        return Dims8(wt * even, wt * odd);
    }
    // Byte j of the word holds dims 2j (low nibble) and 2j + 1 (high nibble).
    let word = v_codes[slot * (HD / 8u) + w];
    let grid = v_grid[slot];
    let z = grid.y;
    let f = wt * grid.x;
    let even = (vec4<f32>(unpack4xU8(word & 0x0F0F0F0Fu)) - z) * f;
    let odd = (vec4<f32>(unpack4xU8((word >> 4u) & 0x0F0F0F0Fu)) - z) * f;
    return Dims8(even, odd);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let h = wid.x;
    let i = wid.y;
    if (i >= p.tokens) {
        return;
    }
    let kv = h / (p.nq / p.nkv);
    let len = p.pos0 + i + 1u;
    let qo = (i * p.nq + h) * HD;
    var part = 0.0;
    for (var d = t; d < HD; d = d + WG) {
        qs[d] = q[qo + d];
        part = part + qs[d];
    }
    let q_sum = reduce(t, part, false); // its barriers also publish qs
    var m = -3.0e38;
    var total = 0.0;
    let words = HD / 8u;
    let groups = WG / words;
    let w = t % words;
    let g = t / words;
    var acc = Dims8(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var base = 0u; base < len; base = base + WG) {
        let s = base + t;
        var score = -3.0e38;
        if (s < len) {
            score = q_dot_key(s * p.nkv + kv, q_sum) * p.scale;
        }
        let m_new = max(m, reduce(t, score, true));
        let rescale = exp(m - m_new);
        var e = 0.0;
        if (s < len) {
            e = exp(score - m_new);
        }
        weight[t] = e;
        let n = min(WG, len - base);
        total = total * rescale + reduce(t, e, false); // its barriers also publish weight
        acc = Dims8(acc.even * rescale, acc.odd * rescale);
        if (g < groups) {
            for (var u = g; u < n; u = u + groups) {
                let v = value_part((base + u) * p.nkv + kv, w, weight[u]);
                acc = Dims8(acc.even + v.even, acc.odd + v.odd);
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    if (g < groups) {
        let b = g * HD + 8u * w;
        partial[b] = acc.even.x;
        partial[b + 1u] = acc.odd.x;
        partial[b + 2u] = acc.even.y;
        partial[b + 3u] = acc.odd.y;
        partial[b + 4u] = acc.even.z;
        partial[b + 5u] = acc.odd.z;
        partial[b + 6u] = acc.even.w;
        partial[b + 7u] = acc.odd.w;
    }
    workgroupBarrier();
    var mn = 0.0;
    var mx = 0.0;
    for (var d = t; d < HD; d = d + WG) {
        var sum = 0.0;
        for (var k = 0u; k < groups; k = k + 1u) {
            sum = sum + partial[k * HD + d];
        }
        let o = sum / total;
        out[qo + d] = o;
        qs[d] = o; // the query is no longer needed
        mn = min(mn, o);
        mx = max(mx, o);
    }
    if (p.qmax > 0.0) {
        // act_codes.wgsl's quantizer over the head: range [min(o, 0), max(o, 0)].
        let lo = -reduce(t, -mn, true);
        let hi = reduce(t, mx, true); // its barriers also publish qs
        let grid = act_grid(lo, hi, p.qmax);
        if (t == 0u) {
            code_scales[i * p.nq + h] = grid.x;
        }
        // Block b (dims 8b..8b+7) gives word 2b (even dims) and word 2b + 1 (odd dims).
        for (var b = t; b < HD / 8u; b = b + WG) {
            let d = 8u * b;
            let w = qo / 4u + 2u * b;
            codes[w] = act_pack(qs[d], qs[d + 2u], qs[d + 4u], qs[d + 6u], grid, p.qmax);
            codes[w + 1u] = act_pack(qs[d + 1u], qs[d + 3u], qs[d + 5u], qs[d + 7u], grid, p.qmax);
        }
    }
}
