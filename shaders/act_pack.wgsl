// Prepended to the kernels that write the W4A4 GEMVs' activation codes (act_codes.wgsl, and
// the epilogues of attention_int4kv.wgsl and hadamard.wgsl): one quantizer, so that their codes
// agree bit for bit. A group with range [lo, hi] (lo ≤ 0 ≤ hi) at qmax = 2^bits − 1 has
// s = max(hi − lo, 1e-6)/qmax and z = round(−lo/s); value v is stored as the signed byte
// q − z with q = clamp(round(v/s) + z, 0, qmax).

// (s, z) of the group [lo, hi].
fn act_grid(lo: f32, hi: f32, qmax: f32) -> vec2<f32> {
    let scale = max(hi - lo, 1e-6) / qmax;
    return vec2<f32>(scale, round(-lo / scale));
}

fn act_code(v: f32, grid: vec2<f32>, qmax: f32) -> u32 {
    let q = clamp(round(v / grid.x) + grid.y, 0.0, qmax);
    return u32(i32(q - grid.y)) & 0xFFu;
}

// Four values' codes in one word, the first in the low byte.
fn act_pack(a: f32, b: f32, c: f32, d: f32, grid: vec2<f32>, qmax: f32) -> u32 {
    return act_code(a, grid, qmax) | (act_code(b, grid, qmax) << 8u)
        | (act_code(c, grid, qmax) << 16u) | (act_code(d, grid, qmax) << 24u);
}
