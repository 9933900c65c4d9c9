// f16 GEMM for prefill of unquantized models (and the f16 side of the prefill benchmarks):
// Y = X·Wᵀ for `tokens` rows at once, W f16 as gemv_f16.wgsl (two halves per u32, rows padded
// to `stride` vec4<u32> of 8 columns), X f32 [tokens, cols], Y f32 [tokens, rows]
// (overwritten, or added to when `accumulate` is set).
//
// Workgroup plan: as gemm_w4a16.wgsl — 256 threads, a 64-row × 32-token tile, 32 columns per
// step: 64 threads unpack 32 halves of one row each (four vec4 loads) into shared memory, all
// 256 load the 32 × 32 block of X, then each thread accumulates 4 rows × 2 tokens.

struct Params {
    rows: u32,
    cols: u32,
    tokens: u32,
    stride: u32,
    accumulate: u32,
    split1: u32,
    split2: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

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
    let xrow = p.cols / 4u; // vec4s per token
    // Rows 4·tn..4·tn+3 of token 2·tm (acc0) and of token 2·tm + 1 (acc1), in named vectors
    // rather than an array (an array indexed in a loop may live in memory).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    let blocks = (p.stride + 3u) / 4u; // 32-column steps
    for (var kb = 0u; kb < blocks; kb = kb + 1u) {
        if (t < TN) {
            let r = row0 + t;
            for (var j = 0u; j < 4u; j = j + 1u) {
                let v = kb * 4u + j; // vec4 of 8 columns
                var q = vec4<u32>(0u);
                if (r < p.rows && v < p.stride) {
                    q = words[r * p.stride + v];
                }
                let a = unpack2x16float(q.x);
                let b = unpack2x16float(q.y);
                let c = unpack2x16float(q.z);
                let d = unpack2x16float(q.w);
                let base = (j * 8u) * TN + t;
                ws[base] = a.x;
                ws[base + TN] = a.y;
                ws[base + 2u * TN] = b.x;
                ws[base + 3u * TN] = b.y;
                ws[base + 4u * TN] = c.x;
                ws[base + 5u * TN] = c.y;
                ws[base + 6u * TN] = d.x;
                ws[base + 7u * TN] = d.y;
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
