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
// With `fresh` (decode, tokens = 1) the launch also appends the current position: `q` then
// holds q [nq, hd], k [nkv, hd] at `k_off` and v [nkv, hd] at `v_off` (the q, k, v product's
// buffer), and each workgroup quantizes its KV head's k and v as kv_quant.wgsl does (the
// same arithmetic), keeps them in shared memory for the current position, and the first
// query head of each KV head writes them into the caches. No workgroup reads a slot another
// writes, so there is no race with grouped-query heads, and decode saves the append's launch.
// With `hadamard` too, q and k are heads in RoPE pairs (x_0, x_h, x_1, x_{h+1}, …) that are
// read in natural order and turned by the per-head Hadamard H/√hd (hd a power of two; the
// butterfly stages of hadamard.wgsl's `whole`, in the same order): the online Q/K Hadamard
// of KV4 folders without a launch of its own.

struct Params {
    nq: u32,
    nkv: u32,
    hd: u32, // = HD
    pos0: u32,
    tokens: u32,
    scale: f32,
    raw: u32,
    qmax: f32, // the o_proj input's codes: 2^bits − 1, or 0 for none
    fresh: u32, // append the current position (decode), see above
    k_off: u32,
    v_off: u32,
    hadamard: u32, // with `fresh`: q and k in RoPE pairs, turned by the per-head Hadamard
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
// Written only with `fresh`, at the current position.
@group(0) @binding(2) var<storage, read_write> k_codes: array<u32>;
@group(0) @binding(3) var<storage, read_write> k_grid: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> v_codes: array<u32>;
@group(0) @binding(5) var<storage, read_write> v_grid: array<vec2<f32>>;
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
// With `fresh`: the current position's K and V as the cache holds them (int4: hd/8 words of
// codes; raw: hd f32 bits) and their (scale, zero), read in place of the cache's slot
// `fresh_slot` (none: 0xFFFFFFFF).
var<workgroup> fresh_k: array<u32, 256>;
var<workgroup> fresh_v: array<u32, 256>;
var<workgroup> fresh_grid: array<vec2<f32>, 2>;
var<private> fresh_slot: u32 = 0xFFFFFFFFu;

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

// Word i of the key or value at cache slot `slot` (int4: words of codes; raw: f32 bits),
// and the key's or value's (scale, zero).
fn key_word(slot: u32, i: u32) -> u32 {
    if (slot == fresh_slot) {
        return fresh_k[i];
    }
    return k_codes[slot * select(HD / 8u, HD, p.raw != 0u) + i];
}
fn value_word(slot: u32, i: u32) -> u32 {
    if (slot == fresh_slot) {
        return fresh_v[i];
    }
    return v_codes[slot * select(HD / 8u, HD, p.raw != 0u) + i];
}
fn key_grid(slot: u32) -> vec2<f32> {
    if (slot == fresh_slot) {
        return fresh_grid[0];
    }
    return k_grid[slot];
}
fn value_grid(slot: u32) -> vec2<f32> {
    if (slot == fresh_slot) {
        return fresh_grid[1];
    }
    return v_grid[slot];
}

// q·k for the key at cache slot `slot` (position · nkv + head); `q_sum` = Σ q. With codes c,
// k = (c − zero)·scale, so q·k = (Σ q·c − zero·Σ q)·scale.
fn q_dot_key(slot: u32, q_sum: f32) -> f32 {
    if (p.raw != 0u) {
        var raw = 0.0;
        for (var d = 0u; d < HD; d = d + 1u) {
            raw = raw + qs[d] * bitcast<f32>(key_word(slot, d));
        }
        return raw;
    }
    let words = HD / 8u;
    var sum = 0.0;
    for (var w = 0u; w < words; w = w + 1u) {
        // Byte j of the word holds elements 2j (low nibble) and 2j + 1 (high nibble).
        let word = key_word(slot, w);
        let even = vec4<f32>(unpack4xU8(word & 0x0F0F0F0Fu));
        let odd = vec4<f32>(unpack4xU8((word >> 4u) & 0x0F0F0F0Fu));
        let b = 8u * w;
        sum = sum + dot(even, vec4<f32>(qs[b], qs[b + 2u], qs[b + 4u], qs[b + 6u]))
            + dot(odd, vec4<f32>(qs[b + 1u], qs[b + 3u], qs[b + 5u], qs[b + 7u]));
    }
    let grid = key_grid(slot);
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
        let at = 8u * w;
        let even = vec4<f32>(bitcast<f32>(value_word(slot, at)),
            bitcast<f32>(value_word(slot, at + 2u)), bitcast<f32>(value_word(slot, at + 4u)),
            bitcast<f32>(value_word(slot, at + 6u)));
        let odd = vec4<f32>(bitcast<f32>(value_word(slot, at + 1u)),
            bitcast<f32>(value_word(slot, at + 3u)), bitcast<f32>(value_word(slot, at + 5u)),
            bitcast<f32>(value_word(slot, at + 7u)));
        return Dims8(wt * even, wt * odd);
    }
    // Byte j of the word holds dims 2j (low nibble) and 2j + 1 (high nibble).
    let word = value_word(slot, w);
    let grid = value_grid(slot);
    let z = grid.y;
    let f = wt * grid.x;
    let even = (vec4<f32>(unpack4xU8(word & 0x0F0F0F0Fu)) - z) * f;
    let odd = (vec4<f32>(unpack4xU8((word >> 4u) & 0x0F0F0F0Fu)) - z) * f;
    return Dims8(even, odd);
}

// Where dim d of a head lies in q's and k's rows: in RoPE pairs with `hadamard`.
fn unpaired(d: u32) -> u32 {
    if (p.hadamard == 0u) {
        return d;
    }
    return select(2u * (d - HD / 2u) + 1u, 2u * d, d < HD / 2u);
}

// `fresh`: query head h into qs, and KV head kv's current k and v, as the cache stores them,
// into fresh_k, fresh_v and fresh_grid (with `hadamard`, q and k turned first), then into the
// caches by the KV head's first query head; from here on the cache's slot is read from those.
// Called by every thread of the workgroup.
fn append_fresh(t: u32, h: u32, kv: u32) {
    let ko = p.k_off + kv * HD;
    let vo = p.v_off + kv * HD;
    // k in partial[0..HD], v in partial[256..256 + HD] (partial is free until the end).
    for (var d = t; d < HD; d = d + WG) {
        let src = unpaired(d);
        qs[d] = q[h * HD + src];
        partial[d] = q[ko + src];
        partial[256u + d] = q[vo + d];
    }
    workgroupBarrier();
    if (p.hadamard != 0u) {
        // hadamard.wgsl's butterfly stages, q's pairs (j < HD/2) and k's side by side.
        for (var s = 1u; s < HD; s = s * 2u) {
            for (var j = t; j < HD; j = j + WG) {
                let pair = j % (HD / 2u);
                let a = (pair / s) * 2u * s + pair % s;
                if (j < HD / 2u) {
                    let x = qs[a];
                    let y = qs[a + s];
                    qs[a] = x + y;
                    qs[a + s] = x - y;
                } else {
                    let x = partial[a];
                    let y = partial[a + s];
                    partial[a] = x + y;
                    partial[a + s] = x - y;
                }
            }
            workgroupBarrier();
        }
        for (var d = t; d < HD; d = d + WG) {
            qs[d] = qs[d] * p.scale; // p.scale = 1/√hd, the Hadamard's scale too
            partial[d] = partial[d] * p.scale;
        }
        workgroupBarrier();
    }
    let raw = p.raw != 0u;
    if (raw) {
        for (var d = t; d < HD; d = d + WG) {
            fresh_k[d] = bitcast<u32>(partial[d]);
            fresh_v[d] = bitcast<u32>(partial[256u + d]);
        }
    } else {
        var k_lo = 0.0;
        var k_hi = 0.0;
        var v_lo = 0.0;
        var v_hi = 0.0;
        for (var d = t; d < HD; d = d + WG) {
            k_lo = min(k_lo, partial[d]);
            k_hi = max(k_hi, partial[d]);
            v_lo = min(v_lo, partial[256u + d]);
            v_hi = max(v_hi, partial[256u + d]);
        }
        let kg = kv_grid(-reduce(t, -k_lo, true), reduce(t, k_hi, true));
        let vg = kv_grid(-reduce(t, -v_lo, true), reduce(t, v_hi, true));
        for (var w = t; w < HD / 8u; w = w + WG) {
            var kw = 0u;
            var vw = 0u;
            for (var j = 0u; j < 8u; j = j + 1u) {
                kw = kw | kv_code(partial[8u * w + j], kg, j);
                vw = vw | kv_code(partial[256u + 8u * w + j], vg, j);
            }
            fresh_k[w] = kw;
            fresh_v[w] = vw;
        }
        if (t == 0u) {
            fresh_grid[0] = kg;
            fresh_grid[1] = vg;
        }
    }
    workgroupBarrier();
    let slot = p.pos0 * p.nkv + kv;
    if (h % (p.nq / p.nkv) == 0u) {
        let n = select(HD / 8u, HD, raw);
        for (var i = t; i < n; i = i + WG) {
            k_codes[slot * n + i] = fresh_k[i];
            v_codes[slot * n + i] = fresh_v[i];
        }
        if (t == 0u && !raw) {
            k_grid[slot] = fresh_grid[0];
            v_grid[slot] = fresh_grid[1];
        }
    }
    fresh_slot = slot;
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
    if (p.fresh != 0u) {
        append_fresh(t, h, kv);
    } else {
        for (var d = t; d < HD; d = d + WG) {
            qs[d] = q[qo + d];
        }
    }
    var part = 0.0;
    for (var d = t; d < HD; d = d + WG) {
        part = part + qs[d]; // each thread's own values, or published by append_fresh
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
