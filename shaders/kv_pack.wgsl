// Prepended to the kernels that write the int4 KV cache (kv_quant.wgsl, and attention_int4kv.wgsl
// when it appends the current position): one quantizer, so that their codes agree bit for bit.
// Per token and head, asymmetric 4-bit over the head's values with the range forced to contain
// 0 (the reference's KV quantizer): s = max(hi − lo, 1e-6)/15, z = round(−lo/s),
// code = clamp(round(x/s) + z, 0, 15); 8 codes per word, value 8w + j in bits 4j..4j+3.

// (s, z) of a head with range [lo, hi].
fn kv_grid(lo: f32, hi: f32) -> vec2<f32> {
    let scale = max(hi - lo, 1e-6) / 15.0;
    return vec2<f32>(scale, round(-lo / scale));
}

// Value x's code, already in its place j (0..7) of a word.
fn kv_code(x: f32, grid: vec2<f32>, j: u32) -> u32 {
    return u32(clamp(round(x / grid.x) + grid.y, 0.0, 15.0)) << (4u * j);
}
