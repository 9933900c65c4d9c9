// Prepended to the int4 GEMVs on devices with subgroup operations: `lane_xor(v, m)` is v of
// the lane whose index differs from this one's in the bits of m (m < the subgroup size).
// Called in uniform control flow only (loops bounded by pipeline constants). (WGSL's
// `enable subgroups;` is not needed, and not yet accepted, by wgpu 30: the device feature
// SUBGROUP admits the builtins.)

fn lane_xor(v: f32, m: u32) -> f32 {
    return subgroupShuffleXor(v, m);
}
