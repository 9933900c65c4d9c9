// Rotary position embedding in Hugging Face's half-split layout, in place:
// for i < hd/2, (x_i, x_{i+hd/2}) ← (x_i·cos − x_{i+hd/2}·sin, x_{i+hd/2}·cos + x_i·sin).
// With `paired`, each head holds its dimensions in RoPE pairs instead (x_0, x_{hd/2}, x_1, …:
// the layout of q and k when their product's epilogue applies RoPE in decode,
// shaders/gemv_store.wgsl), and pair i is at 2i, 2i + 1.
//
// Layout: x f32 [tokens, heads, hd]; cos and sin f32 [tokens, hd/2], computed on the host in
// f64 for each token's position (angles reach thousands of radians, too many for f32 sin).
// Workgroup plan: one thread per (token, head, i < hd/2) pair, 64 threads per workgroup.

struct Params {
    tokens: u32,
    heads: u32,
    half: u32,
    grid_x: u32,
    paired: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let k = (wid.y * p.grid_x + wid.x) * 64u + t;
    if (k >= p.tokens * p.heads * p.half) {
        return;
    }
    let i = k % p.half;
    let token = k / (p.heads * p.half);
    let base = (k / p.half) * 2u * p.half;
    let c = cos_t[token * p.half + i];
    let s = sin_t[token * p.half + i];
    var ia = base + i;
    var ib = base + i + p.half;
    if (p.paired != 0u) {
        ia = base + 2u * i;
        ib = ia + 1u;
    }
    let a = x[ia];
    let b = x[ib];
    x[ia] = a * c - b * s;
    x[ib] = b * c + a * s;
}
