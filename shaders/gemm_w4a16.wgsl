// W4A16 GEMM for prefill: Y = X·Wᵀ for `tokens` rows of activations at once, W int4 in the
// model folder's packing (as gemv_w4a16.wgsl), X f32 [tokens, cols], Y f32 [tokens, rows]
// (overwritten, or added to when `accumulate` is set).
//
// Layout: W rows padded to `stride` vec4<u32> (32 columns each); scales/zeros [rows, groups].
// Workgroup plan: 256 threads compute a 64-row × 32-token tile of Y, walking the columns 32 at
// a time. Per step, 64 threads load one vec4 of codes each (one row's 32 columns) and
// dequantize it into shared memory as f32, all 256 threads load the 32 × 32 block of X
// (one vec4 each), then thread (tn, tm) accumulates rows 4·tn..4·tn+3 × tokens 2·tm, 2·tm+1
// from shared memory: every weight is read from memory once per 32 tokens instead of once per
// token (the decode GEMV's cost), and every x value once per 64 rows. Tiles past the last row or
// token are computed on zeros and not written.

struct Params {
    rows: u32,
    cols: u32,
    tokens: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    stride: u32,
    accumulate: u32,
    split1: u32,
    split2: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TN: u32 = 64u; // rows per tile
const TM: u32 = 32u; // tokens per tile
var<workgroup> ws: array<f32, 2048>; // [32 columns][64 rows]
var<workgroup> xs: array<f32, 1024>; // [32 columns][32 tokens]

// out_index and put_tile (Y[token, row] (+)= v): shaders/gemm_out.wgsl, prepended by the host.
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row0 = wid.x * TN;
    let tok0 = wid.y * TM;
    let tn = t % 16u;
    let tm = t / 16u;
    let wpr = p.cols / 8u;
    let groups = p.cols / p.group;
    let xrow = p.cols / 4u; // vec4s per token
    // Rows 4·tn..4·tn+3 of token 2·tm (acc0) and of token 2·tm + 1 (acc1), in named vectors
    // rather than an array (an array indexed in a loop may live in memory).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    for (var kb = 0u; kb < p.stride; kb = kb + 1u) {
        if (t < TN) {
            let r = row0 + t;
            var q = vec4<u32>(0u);
            if (r < p.rows) {
                q = words[r * p.stride + kb];
            }
            for (var j = 0u; j < 4u; j = j + 1u) {
                let w = kb * 4u + j;
                var s = 0.0;
                var off = 0.0;
                if (r < p.rows && w < wpr) {
                    let g = r * groups + (w * 8u) / p.group;
                    s = scales[g];
                    off = p.qmin;
                    if (p.has_zeros != 0u) {
                        off = p.qmin - zeros[g];
                    }
                }
                for (var n = 0u; n < 8u; n = n + 1u) {
                    let c = f32((q[j] >> (4u * n)) & 0xFu);
                    ws[(j * 8u + n) * TN + t] = (c + off) * s;
                }
            }
        }
        let m = t / 8u;
        let c4 = t % 8u;
        let tok = tok0 + m;
        let col4 = kb * 8u + c4;
        var v = vec4<f32>(0.0);
        if (tok < p.tokens && col4 < xrow) {
            v = x[tok * xrow + col4];
        }
        xs[(c4 * 4u) * TM + m] = v.x;
        xs[(c4 * 4u + 1u) * TM + m] = v.y;
        xs[(c4 * 4u + 2u) * TM + m] = v.z;
        xs[(c4 * 4u + 3u) * TM + m] = v.w;
        workgroupBarrier();
        for (var k = 0u; k < 32u; k = k + 1u) {
            let w0 = ws[k * TN + tn * 4u];
            let w1 = ws[k * TN + tn * 4u + 1u];
            let w2 = ws[k * TN + tn * 4u + 2u];
            let w3 = ws[k * TN + tn * 4u + 3u];
            let x0 = xs[k * TM + tm * 2u];
            let x1 = xs[k * TM + tm * 2u + 1u];
            let w4 = vec4<f32>(w0, w1, w2, w3);
            acc0 = acc0 + w4 * x0;
            acc1 = acc1 + w4 * x1;
        }
        workgroupBarrier();
    }
    put_tile(row0 + tn * 4u, tok0 + tm * 2u, acc0, acc1);
}
