// Prepended by the host to the three prefill GEMMs (gemm_w4a16.wgsl, gemm_w4a4.wgsl,
// gemm_f16.wgsl), whose Params all have rows, tokens, split1 and split2.

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
