// Append `tokens` consecutive positions' K and V (from position `pos` on) to their int4
// caches, both in one launch: per head, asymmetric 4-bit over the head's hd values (the
// reference's per-token per-head KV quantizer, kv_pack.wgsl, prepended). Prefill's appends;
// decode appends in the attention's launch (attention_int4kv.wgsl's `fresh`) wherever q, k
// and v are one buffer.
//
// Layout: k and v f32 [tokens, heads, hd]; each cache's codes u32 [max_seq, heads, hd/8], 8
// codes per word, dim 8w + j in bits 4j..4j+3; its grid f32 [max_seq, heads, 2], (scale, zero)
// pairs (one binding for both: attention, which reads both caches, has few to spare).
// With `raw` set (a 16-bit KV cache) the position is stored unquantized: codes holds the f32
// bits [max_seq, heads, hd].
// Workgroup plan: one workgroup per (head, token, K or V) (z = 0 for K, 1 for V), 64
// threads, a grid sized for the most tokens the launch is bound for (workgroups past `tokens`
// return); min/max by a shared-memory reduction, then one thread per output word packs 8
// codes. (One launch for both, not one each: a decode step's launches cost ~6 µs apiece on an
// H100 however small, results/bench-h100-run16.txt.)

struct Params {
    heads: u32,
    hd: u32,
    pos: u32,
    raw: u32,
    tokens: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_codes: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_grid: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> v_codes: array<u32>;
@group(0) @binding(6) var<storage, read_write> v_grid: array<vec2<f32>>;

// The workgroup's source and cache (`is_v`: V's, else K's; uniform in a workgroup).
fn load(is_v: bool, i: u32) -> f32 {
    if (is_v) {
        return v[i];
    }
    return k[i];
}
fn put_word(is_v: bool, i: u32, word: u32) {
    if (is_v) {
        v_codes[i] = word;
    } else {
        k_codes[i] = word;
    }
}
fn put_grid(is_v: bool, slot: u32, grid: vec2<f32>) {
    if (is_v) {
        v_grid[slot] = grid;
    } else {
        k_grid[slot] = grid;
    }
}

var<workgroup> lo: array<f32, 64>;
var<workgroup> hi: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let h = wid.x;
    let is_v = wid.z == 1u;
    if (wid.y >= p.tokens) {
        return;
    }
    let pos = p.pos + wid.y;
    let base = (wid.y * p.heads + h) * p.hd;
    if (p.raw != 0u) {
        let slot = (pos * p.heads + h) * p.hd;
        for (var i = t; i < p.hd; i = i + 64u) {
            put_word(is_v, slot + i, bitcast<u32>(load(is_v, base + i)));
        }
        return;
    }
    var mn = 0.0;
    var mx = 0.0;
    for (var i = t; i < p.hd; i = i + 64u) {
        mn = min(mn, load(is_v, base + i));
        mx = max(mx, load(is_v, base + i));
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
    let grid = kv_grid(lo[0], hi[0]);
    let slot = pos * p.heads + h;
    if (t == 0u) {
        put_grid(is_v, slot, grid);
    }
    let words = p.hd / 8u;
    for (var w = t; w < words; w = w + 64u) {
        var word = 0u;
        for (var j = 0u; j < 8u; j = j + 1u) {
            word = word | kv_code(load(is_v, base + 8u * w + j), grid, j);
        }
        put_word(is_v, slot * words + w, word);
    }
}
