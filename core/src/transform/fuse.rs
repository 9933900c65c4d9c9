//! Offline, function-preserving edits of the weights, computed in f64 (SPEC §2.0, §2.3).
//!
//! Conventions: activations are row vectors, a linear layer computes y = x·Wᵀ with W [out, in].
//! Rotating the residual stream by R (x' = x·R) turns every reader W into W·R and every writer
//! W into Rᵀ·W; that is exact only once the RMSNorm weights are folded into the readers, since
//! RMS(x·R) = RMS(x) holds for a weightless norm.

use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::transform::hadamard::Hadamard;

/// Give the output projection its own copy of a tied embedding (they get different transforms).
pub fn untie(w: &mut LlamaWeights) {
    if w.lm_head.is_none() {
        w.lm_head = Some(w.embed.clone());
        w.config.tie_word_embeddings = false;
    }
}

/// W ← W·diag(γ): scale column j of a [rows, cols] matrix by γ_j.
fn scale_columns(w: &mut HostTensor, gamma: &[f32]) {
    let cols = w.shape[1];
    for row in w.data.chunks_mut(cols) {
        for (x, g) in row.iter_mut().zip(gamma) {
            *x = (*x as f64 * *g as f64) as f32;
        }
    }
}

/// The norm's weights, leaving ones in their place.
fn take_norm(norm: &mut HostTensor) -> Vec<f32> {
    let ones = vec![1.0; norm.data.len()];
    std::mem::replace(&mut norm.data, ones)
}

/// Fold each RMSNorm weight into the layers that read its output, then set it to 1. Unties the
/// embedding first.
pub fn fold_norms(w: &mut LlamaWeights) {
    untie(w);
    for l in &mut w.layers {
        let g = take_norm(&mut l.attn_norm);
        for m in [&mut l.wq, &mut l.wk, &mut l.wv] {
            scale_columns(m, &g);
        }
        let g = take_norm(&mut l.ffn_norm);
        for m in [&mut l.w_gate, &mut l.w_up] {
            scale_columns(m, &g);
        }
    }
    let g = take_norm(&mut w.norm);
    scale_columns(w.lm_head.as_mut().expect("untied above"), &g);
}

/// W·R for W [rows, n] and R [n, n] (row-major f64), in f64.
pub fn matmul_right(w: &mut HostTensor, r: &[f64]) {
    let n = w.shape[1];
    assert_eq!(r.len(), n * n, "rotation size");
    let mut acc = vec![0f64; n];
    for row in w.data.chunks_mut(n) {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (k, &x) in row.iter().enumerate() {
            let x = x as f64;
            if x != 0.0 {
                for (a, rv) in acc.iter_mut().zip(&r[k * n..(k + 1) * n]) {
                    *a += x * rv;
                }
            }
        }
        row.iter_mut().zip(&acc).for_each(|(d, a)| *d = *a as f32);
    }
}

/// Rᵀ·W for W [n, cols] and R [n, n], in f64.
pub fn matmul_left_t(w: &mut HostTensor, r: &[f64]) {
    let (n, cols) = (w.shape[0], w.shape[1]);
    assert_eq!(r.len(), n * n, "rotation size");
    let mut out = vec![0f64; n * cols];
    for k in 0..n {
        let src = &w.data[k * cols..(k + 1) * cols];
        for i in 0..n {
            let rki = r[k * n + i]; // (Rᵀ)[i][k]
            if rki != 0.0 {
                for (o, &s) in out[i * cols..(i + 1) * cols].iter_mut().zip(src) {
                    *o += rki * s as f64;
                }
            }
        }
    }
    w.data.iter_mut().zip(out).for_each(|(d, o)| *d = o as f32);
}

/// Rotate the residual stream by the orthogonal R [d, d]: x' = x·R everywhere. The norms must
/// be folded first ([`fold_norms`]).
pub fn rotate_residual(w: &mut LlamaWeights, r: &[f64]) {
    assert!(
        w.lm_head.is_some() && w.norm.data.iter().all(|&g| g == 1.0),
        "fold the norms before rotating"
    );
    matmul_right(&mut w.embed, r);
    for l in &mut w.layers {
        for m in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.w_gate, &mut l.w_up] {
            matmul_right(m, r);
        }
        matmul_left_t(&mut l.wo, r);
        matmul_left_t(&mut l.w_down, r);
    }
    matmul_right(w.lm_head.as_mut().expect("untied"), r);
}

/// Rotate each value head by R [hd, hd]: v' = v·R per head, so W_v's rows of head h become
/// Rᵀ·W_v[h] and W_o's columns of every query head h become W_o[:, h]·R. Exact, because the
/// attention output of a head is a mix of its value vectors.
pub fn rotate_value_heads(w: &mut LlamaWeights, r: &[f64]) {
    let c = w.config.clone();
    let (hd, d) = (c.head_dim(), c.hidden_size);
    assert_eq!(r.len(), hd * hd, "rotation size");
    for l in &mut w.layers {
        for h in 0..c.n_kv_heads() {
            let block = &mut l.wv.data[h * hd * d..(h + 1) * hd * d];
            let mut t = HostTensor::new(vec![hd, d], block.to_vec());
            matmul_left_t(&mut t, r);
            block.copy_from_slice(&t.data);
        }
        let q = c.num_attention_heads * hd;
        for row in l.wo.data.chunks_mut(q) {
            for h in 0..c.num_attention_heads {
                let seg = &mut row[h * hd..(h + 1) * hd];
                let mut t = HostTensor::new(vec![1, hd], seg.to_vec());
                matmul_right(&mut t, r);
                seg.copy_from_slice(&t.data);
            }
        }
    }
}

/// Fuse Hᵀ into W_down's input side (W_down ← W_down·Hᵀ); the forward must then transform the
/// down_proj input online (x ← x·Hᵀ) for the product to stay the same.
pub fn fuse_down_hadamard(w: &mut LlamaWeights, h: &Hadamard) {
    for l in &mut w.layers {
        h.apply_rows_f32(&mut l.w_down.data);
    }
}
