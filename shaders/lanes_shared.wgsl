// Prepended to the int4 GEMVs on devices without subgroup operations (SG = 1): `lane_xor` is
// never called there, the team sums run in shared memory.

fn lane_xor(v: f32, m: u32) -> f32 {
    return v;
}
