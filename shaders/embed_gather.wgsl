// The embedding row of the token the sampler just picked (sample.wgsl's `out`), looked up on the
// GPU: the next token's work can then be recorded and submitted before the host has read the
// token back (the decode loop keeps one token in flight).
//
// Layout: token u32 [1]; table [vocab, d] as f32 bits, or as f16 pairs (two per u32, element
// 2i in the low half) when `HALF` (used where every value of the model's embedding is exactly
// an f16, so the rows are the same either way); h f32 [d].
// Workgroup plan: one workgroup of 256 threads, thread t copying elements t, t + 256, …
// A token outside the vocabulary (the sampler's "none" when no logit is finite; the host
// reports it) reads the last row.

struct Params {
    d: u32,
    vocab: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> token: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> h: array<f32>;

override HALF: bool = false;
const WG: u32 = 256u;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) t: u32) {
    let row = min(token[0], p.vocab - 1u) * p.d;
    for (var i = t; i < p.d; i = i + WG) {
        let at = row + i;
        if (HALF) {
            h[i] = unpack2x16float(table[at / 2u])[at % 2u];
        } else {
            h[i] = bitcast<f32>(table[at]);
        }
    }
}
