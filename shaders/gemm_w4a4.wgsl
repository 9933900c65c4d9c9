// W4A4 GEMM for prefill: Y = X·Wᵀ for `tokens` rows of activation codes at once (act_codes.wgsl:
// signed bytes, two words per 8 columns in the weights' nibble order, one f32 scale per group
// of `agroup` columns), W int4 as gemv_w4a4.wgsl, Y f32 [tokens, rows] (overwritten, or added
// to when `accumulate` is set). Integer accumulation per 32-column block (dot4I8Packed), the
// dequant epilogue scale_w·scale_x·(d + offset_w·Σcode_x) per block, as in the GEMV.
//
// Layout: W rows padded to `stride` vec4<u32>; codes [tokens, cols/4] words (cols a multiple of
// 32); sx [tokens, cols/agroup]. Weight groups are whole rows or multiples of 32 columns.
// Workgroup plan: 256 threads compute a 64-row × 32-token tile of Y, 32 columns per step: 64
// threads stage one row's 4 code words and its block scale and offset, all 256 threads stage
// one word of the 32 tokens' 8 code words, 32 threads a token's block scale and code sum; then
// thread (tn, tm) accumulates rows 4·tn..4·tn+3 × tokens 2·tm, 2·tm+1 from shared memory.

// The GEMV's parameter block, with the token count in place of its grid width.
struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    agroup: u32,
    qmin: f32,
    has_zeros: u32,
    tokens: u32,
    stride: u32,
    accumulate: u32,
    split1: u32,
    split2: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> words: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> zeros: array<f32>;
@group(0) @binding(4) var<storage, read> codes: array<u32>;
@group(0) @binding(5) var<storage, read> sx: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

const TN: u32 = 64u;
const TM: u32 = 32u;
const LOW: u32 = 0x0F0F0F0Fu;
const ONES: u32 = 0x01010101u;
var<workgroup> wq: array<u32, 256>; // [64 rows][4 words]
var<workgroup> wscale: array<f32, 64>;
var<workgroup> woff: array<f32, 64>;
var<workgroup> xq: array<u32, 256>; // [32 tokens][8 words]
var<workgroup> xscale: array<f32, 32>;
var<workgroup> xsum: array<f32, 32>;

fn word_dot(w: u32, even: u32, odd: u32) -> i32 {
    return dot4I8Packed(w & LOW, even) + dot4I8Packed((w >> 4u) & LOW, odd);
}

// Tile row r's share of token mm's 32 columns in shared memory: the integer dot product of
// their codes and its dequant epilogue.
fn cell(r: u32, mm: u32) -> f32 {
    let d = word_dot(wq[r * 4u], xq[mm * 8u], xq[mm * 8u + 1u])
        + word_dot(wq[r * 4u + 1u], xq[mm * 8u + 2u], xq[mm * 8u + 3u])
        + word_dot(wq[r * 4u + 2u], xq[mm * 8u + 4u], xq[mm * 8u + 5u])
        + word_dot(wq[r * 4u + 3u], xq[mm * 8u + 6u], xq[mm * 8u + 7u]);
    return wscale[r] * xscale[mm] * (f32(d) + woff[r] * xsum[mm]);
}

// out_index and put_tile (Y[token, row] (+)= v): shaders/gemm_out.wgsl, prepended by the host.
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row0 = wid.x * TN;
    let tok0 = wid.y * TM;
    let tn = t % 16u;
    let tm = t / 16u;
    let groups = p.cols / p.group;
    let agroups = p.cols / p.agroup;
    let xwords = p.cols / 4u; // code words per token
    // Rows 4·tn..4·tn+3 of token 2·tm (acc0) and of token 2·tm + 1 (acc1), in named vectors
    // rather than an array (an array indexed in a loop may live in memory).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    for (var kb = 0u; kb < p.stride; kb = kb + 1u) {
        if (t < TN) {
            let r = row0 + t;
            var q = vec4<u32>(0u);
            var s = 0.0;
            var off = 0.0;
            if (r < p.rows) {
                q = words[r * p.stride + kb];
                let g = r * groups + min((32u * kb) / p.group, groups - 1u);
                s = scales[g];
                off = p.qmin;
                if (p.has_zeros != 0u) {
                    off = p.qmin - zeros[g];
                }
            }
            wq[t * 4u] = q.x;
            wq[t * 4u + 1u] = q.y;
            wq[t * 4u + 2u] = q.z;
            wq[t * 4u + 3u] = q.w;
            wscale[t] = s;
            woff[t] = off;
        }
        let m = t / 8u;
        let c = t % 8u;
        let tok = tok0 + m;
        var word = 0u;
        if (tok < p.tokens) {
            word = codes[tok * xwords + kb * 8u + c];
        }
        xq[m * 8u + c] = word;
        workgroupBarrier();
        if (t < TM) {
            var n = 0;
            for (var j = 0u; j < 8u; j = j + 1u) {
                n = n + dot4I8Packed(xq[t * 8u + j], ONES);
            }
            xsum[t] = f32(n);
            var s = 0.0;
            if (tok0 + t < p.tokens) {
                s = sx[(tok0 + t) * agroups + (32u * kb) / p.agroup];
            }
            xscale[t] = s;
        }
        workgroupBarrier();
        let r = tn * 4u;
        let mm = tm * 2u;
        acc0 = acc0 + vec4<f32>(cell(r, mm), cell(r + 1u, mm), cell(r + 2u, mm), cell(r + 3u, mm));
        acc1 = acc1 + vec4<f32>(cell(r, mm + 1u), cell(r + 1u, mm + 1u), cell(r + 2u, mm + 1u),
            cell(r + 3u, mm + 1u));
        workgroupBarrier();
    }
    put_tile(row0 + tn * 4u, tok0 + tm * 2u, acc0, acc1);
}
