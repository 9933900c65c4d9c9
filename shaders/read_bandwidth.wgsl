// Memory read bandwidth probe for the benchmarks: every thread streams vec4<u32> loads over a
// buffer (grid-stride, coalesced) and folds them with xor; one word per workgroup is written
// only if the fold hits a magic value, so the loads cannot be optimised away.
//
// Layout: data vec4<u32> [n4]; out u32 [workgroups]. Workgroup plan: 256 threads, a 1-D grid of
// `groups` workgroups, each thread reading elements i, i + stride, … (stride = all threads).

struct Params {
    n4: u32,
    groups: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> data: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let stride = p.groups * 256u;
    var acc = vec4<u32>(0u);
    for (var i = wid.x * 256u + t; i < p.n4; i = i + stride) {
        acc = acc ^ data[i];
    }
    let folded = acc.x ^ acc.y ^ acc.z ^ acc.w;
    if (folded == 0x9E3779B9u) {
        out[wid.x] = folded;
    }
}
