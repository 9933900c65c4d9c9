//! The decode loop on the CPU, for machines without a GPU: the int4 folder's packed weights
//! multiplied in place (see [`kernels`]), the same forward as the GPU runtime's plan —
//! activation fake quantization, online Hadamards and an int4 (or f32) KV cache exactly
//! where the folder's header says.

pub mod kernels;

use rayon::prelude::*;

use super::host::{HostLinear, HostModel};
use crate::error::{Error, Result};
use crate::transform::hadamard::Hadamard;

/// One layer's K or V cache: per position and KV head, hd/8 words of 4-bit codes with a scale
/// and zero (the GPU's kv_quant.wgsl quantizer), or the raw f32 values for a 16-bit cache.
struct KvCache {
    heads: usize,
    hd: usize,
    int4: bool,
    codes: Vec<u32>,
    scales: Vec<f32>,
    zeros: Vec<f32>,
    raw: Vec<f32>,
}

impl KvCache {
    fn new(heads: usize, hd: usize, int4: bool) -> Self {
        KvCache {
            heads,
            hd,
            int4,
            codes: Vec::new(),
            scales: Vec::new(),
            zeros: Vec::new(),
            raw: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.codes.clear();
        self.scales.clear();
        self.zeros.clear();
        self.raw.clear();
    }

    /// Append one position, `x` [heads, hd].
    fn push(&mut self, x: &[f32]) {
        if !self.int4 {
            self.raw.extend_from_slice(x);
            return;
        }
        for head in x.chunks_exact(self.hd) {
            let (scale, zero) = kernels::asym_range(head, 15.0);
            self.scales.push(scale);
            self.zeros.push(zero);
            for eight in head.chunks_exact(8) {
                let word = eight.iter().enumerate().fold(0u32, |w, (j, &v)| {
                    w | (kernels::asym_code(v, scale, zero, 15.0) as u32) << (4 * j)
                });
                self.codes.push(word);
            }
        }
    }

    /// q · (the key of KV head `head` at `pos`); `q_sum` = Σq.
    fn dot(&self, pos: usize, head: usize, q: &[f32], q_sum: f32) -> f32 {
        let slot = pos * self.heads + head;
        if !self.int4 {
            return q
                .iter()
                .zip(&self.raw[slot * self.hd..(slot + 1) * self.hd])
                .map(|(a, b)| a * b)
                .sum();
        }
        let words = &self.codes[slot * self.hd / 8..(slot + 1) * self.hd / 8];
        self.scales[slot] * (kernels::dot_int4(words, q) - self.zeros[slot] * q_sum)
    }

    /// out += p · (the value of KV head `head` at `pos`).
    fn add_scaled(&self, pos: usize, head: usize, p: f32, out: &mut [f32]) {
        let slot = pos * self.heads + head;
        if !self.int4 {
            let v = &self.raw[slot * self.hd..(slot + 1) * self.hd];
            out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
            return;
        }
        let (ps, z) = (p * self.scales[slot], self.zeros[slot]);
        let words = &self.codes[slot * self.hd / 8..(slot + 1) * self.hd / 8];
        for (&w, o8) in words.iter().zip(out.chunks_exact_mut(8)) {
            for (j, o) in o8.iter_mut().enumerate() {
                *o += ps * (((w >> (4 * j)) & 0xF) as f32 - z);
            }
        }
    }
}

pub struct CpuModel {
    pub model: HostModel,
    caches: Vec<(KvCache, KvCache)>,
    inv_freq: Vec<f64>,
    down_hadamard: Option<Hadamard>,
    qk_hadamard: Option<Hadamard>,
    max_seq: usize,
    /// Positions in the cache (the caches grow with it: [`CpuModel::reset`] clears both).
    len: usize,
}

impl CpuModel {
    /// Prepare `model` to decode up to `max_seq` positions.
    pub fn new(model: HostModel, max_seq: usize) -> Result<Self> {
        let c = &model.config;
        let (hd, nkv) = (c.head_dim(), c.n_kv_heads());
        if !hd.is_multiple_of(8) {
            return Err(Error::other(format!(
                "the CPU runtime needs a head dimension divisible by 8 (this model's is {hd})"
            )));
        }
        let f = &model.forward;
        let down_hadamard = f
            .down_hadamard
            .then(|| Hadamard::new(c.intermediate_size))
            .transpose()?;
        let qk_hadamard = f.qk_hadamard.then(|| Hadamard::new(hd)).transpose()?;
        let int4 = f.kv.is_some();
        let caches = (0..c.num_hidden_layers)
            .map(|_| (KvCache::new(nkv, hd, int4), KvCache::new(nkv, hd, int4)))
            .collect();
        Ok(CpuModel {
            inv_freq: c.rope_inv_freq(),
            max_seq: max_seq.min(c.max_position_embeddings),
            model,
            caches,
            down_hadamard,
            qk_hadamard,
            len: 0,
        })
    }

    /// Positions the cache holds.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Forget every position.
    pub fn reset(&mut self) {
        self.len = 0;
        for (k, v) in &mut self.caches {
            k.clear();
            v.clear();
        }
    }

    /// What runs the model, for logs: the instruction set of the products.
    pub fn device_name(&self) -> String {
        format!(
            "CPU, {} threads, {}",
            rayon::current_num_threads(),
            kernels::instruction_set()
        )
    }

    /// Run one token at the next position and return its logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.forward(&[token])
    }

    /// Run `tokens` at the next positions, all at once (the products as GEMMs: each weight row
    /// unpacked once per 8 tokens), and return the logits of the last one.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_heads(tokens, false)
    }

    /// As [`CpuModel::forward`], with the logits of every position, [tokens, vocab] (for
    /// scoring text).
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_heads(tokens, true)
    }

    fn forward_heads(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        let CpuModel {
            model,
            caches,
            inv_freq,
            down_hadamard,
            qk_hadamard,
            ..
        } = self;
        let c = &model.config;
        let (d, hd, nq, nkv, dff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.n_kv_heads(),
            c.intermediate_size,
        );
        let (pos, t) = (self.len, tokens.len());
        if t == 0 {
            return Err(Error::other("no tokens to run"));
        }
        if pos + t > self.max_seq {
            return Err(Error::other(format!(
                "the context is full ({} positions)",
                self.max_seq
            )));
        }
        let eps = c.rms_norm_eps as f32;
        let act = model.forward.act;
        let quant = |x: &mut [f32], group: usize| {
            if let Some(a) = act {
                kernels::act_quant(x, group, a.bits);
            }
        };
        // y = W·x for one position, Y = X·Wᵀ for several.
        let product = |w: &HostLinear, x: &[f32], y: &mut [f32]| {
            if t == 1 {
                kernels::gemv(w, x, y)
            } else {
                kernels::gemm(w, x, t, y)
            }
        };
        let norm_rows = |x: &[f32], w: &[f32], y: &mut [f32]| {
            for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                kernels::rms_norm(xr, w, eps, yr);
            }
        };
        let mut h = Vec::with_capacity(t * d);
        for &token in tokens {
            let i = token as usize;
            if i >= c.vocab_size {
                return Err(Error::other(format!(
                    "token {token} is outside the vocabulary"
                )));
            }
            h.extend_from_slice(&model.embed[i * d..(i + 1) * d]);
        }
        // Angles in f64: at far positions they reach thousands of radians.
        let angles: Vec<(Vec<f32>, Vec<f32>)> = (pos..pos + t)
            .map(|p| {
                inv_freq
                    .iter()
                    .map(|f| {
                        let a = p as f64 * f;
                        (a.cos() as f32, a.sin() as f32)
                    })
                    .unzip()
            })
            .collect();
        let zeros = |n: usize| vec![0f32; t * n];
        let (mut n, mut q, mut k, mut v) =
            (zeros(d), zeros(nq * hd), zeros(nkv * hd), zeros(nkv * hd));
        let (mut a, mut o) = (zeros(nq * hd), zeros(d));
        let (mut gate, mut up, mut m) = (zeros(dff), zeros(dff), zeros(dff));
        for (l, (kc, vc)) in model.layers.iter().zip(caches.iter_mut()) {
            let [wq, wk, wv, wo, wg, wu, wd] = &l.linears;
            norm_rows(&h, &l.attn_norm, &mut n);
            quant(&mut n, d);
            product(wq, &n, &mut q);
            product(wk, &n, &mut k);
            product(wv, &n, &mut v);
            for (i, (cos, sin)) in angles.iter().enumerate() {
                kernels::rope(&mut q[i * nq * hd..(i + 1) * nq * hd], hd, cos, sin);
                kernels::rope(&mut k[i * nkv * hd..(i + 1) * nkv * hd], hd, cos, sin);
            }
            if let Some(hq) = qk_hadamard {
                hq.apply_rows_f32(&mut q);
                hq.apply_rows_f32(&mut k);
            }
            for i in 0..t {
                kc.push(&k[i * nkv * hd..(i + 1) * nkv * hd]);
                vc.push(&v[i * nkv * hd..(i + 1) * nkv * hd]);
            }
            attend(&q, kc, vc, pos, nq / nkv, &mut a);
            quant(&mut a, hd);
            product(wo, &a, &mut o);
            h.iter_mut().zip(&o).for_each(|(h, o)| *h += o);

            norm_rows(&h, &l.ffn_norm, &mut n);
            quant(&mut n, d);
            product(wg, &n, &mut gate);
            product(wu, &n, &mut up);
            kernels::silu_mul(&gate, &up, &mut m);
            if let Some(hd_) = down_hadamard {
                hd_.apply_rows_f32(&mut m);
            }
            quant(&mut m, dff);
            product(wd, &m, &mut o);
            h.iter_mut().zip(&o).for_each(|(h, o)| *h += o);
        }
        // The head on the last position, or on all of them.
        let rows = if all { &h[..] } else { &h[(t - 1) * d..] };
        let nt = rows.len() / d;
        let mut last = vec![0f32; nt * d];
        norm_rows(rows, &model.norm, &mut last);
        let mut logits = vec![0f32; nt * c.vocab_size];
        if nt == 1 {
            kernels::gemv(&model.lm_head, &last, &mut logits);
        } else {
            kernels::gemm(&model.lm_head, &last, nt, &mut logits);
        }
        self.len += t;
        Ok(logits)
    }
}

/// Causal attention of the positions pos0, pos0 + 1, … (one row of `q` [t, nq, hd] each) over
/// the cache, (query, head) pairs in parallel; query head h reads KV head h / `group`.
fn attend(q: &[f32], k: &KvCache, v: &KvCache, pos0: usize, group: usize, out: &mut [f32]) {
    let hd = k.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let heads_per_row = k.heads * group;
    out.par_chunks_mut(hd).enumerate().for_each(|(row, o)| {
        let (i, h) = (row / heads_per_row, row % heads_per_row);
        let len = pos0 + i + 1;
        let kv = h / group;
        let qh = &q[row * hd..(row + 1) * hd];
        let q_sum: f32 = qh.iter().sum();
        let mut p: Vec<f32> = (0..len).map(|s| k.dot(s, kv, qh, q_sum) * scale).collect();
        let mx = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut total = 0f32;
        for x in &mut p {
            *x = (*x - mx).exp();
            total += *x;
        }
        o.iter_mut().for_each(|x| *x = 0.0);
        for (s, &ps) in p.iter().enumerate() {
            v.add_scaled(s, kv, ps / total, o);
        }
    });
}
