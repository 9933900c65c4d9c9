// Prepended by the host to the three prefill GEMMs (gemm_w4a16.wgsl, gemm_w4a4.wgsl,
// gemm_f16.wgsl), whose Params all have rows, tokens, accumulate, split1 and split2, and whose
// output is `y`.

// Where row r of token tok goes: Y [tokens, rows] row-major; or, with split1 ≤ split2 < rows
// (the rows of q, k and v stacked), part by part: rows [0, split1) as [tokens, split1], then
// rows [split1, split2) as [tokens, split2 − split1], then the rest — each part contiguous for
// the kernels that read it (split1 = split2 = rows: the plain layout).
fn out_index(tok: u32, r: u32) -> u32 {
    if (r < p.split1) {
        return tok * p.split1 + r;
    }
    if (r < p.split2) {
        return p.tokens * p.split1 + tok * (p.split2 - p.split1) + (r - p.split1);
    }
    return p.tokens * p.split2 + tok * (p.rows - p.split2) + (r - p.split2);
}

// Y[tok, r] (+)= v, inside the matrix only.
fn put(r: u32, tok: u32, v: f32) {
    if (r < p.rows && tok < p.tokens) {
        let o = out_index(tok, r);
        var sum = v;
        if (p.accumulate != 0u) {
            sum = sum + y[o];
        }
        y[o] = sum;
    }
}

// A thread's tile: rows r..r+3 of token tok (a) and of token tok + 1 (b).
fn put_tile(r: u32, tok: u32, a: vec4<f32>, b: vec4<f32>) {
    put(r, tok, a.x);
    put(r + 1u, tok, a.y);
    put(r + 2u, tok, a.z);
    put(r + 3u, tok, a.w);
    put(r, tok + 1u, b.x);
    put(r + 1u, tok + 1u, b.y);
    put(r + 2u, tok + 1u, b.z);
    put(r + 3u, tok + 1u, b.w);
}
