//! The decode loop on the CPU, for machines without a GPU: the int4 folder's packed weights
//! multiplied in place (see [`kernels`]), the same forward as the GPU runtime's plan —
//! activation fake quantization, online Hadamards and an int4 (or f32) KV cache exactly
//! where the folder's header says.

pub mod kernels;

use rayon::prelude::*;

use super::host::HostModel;
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

/// Scratch vectors of one decode step.
#[derive(Default)]
struct Scratch {
    h: Vec<f32>,
    n: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    m: Vec<f32>,
}

pub struct CpuModel {
    pub model: HostModel,
    caches: Vec<(KvCache, KvCache)>,
    inv_freq: Vec<f64>,
    down_hadamard: Option<Hadamard>,
    qk_hadamard: Option<Hadamard>,
    s: Scratch,
    max_seq: usize,
    /// Positions in the cache.
    pub len: usize,
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
        let (d, dff, nq) = (c.hidden_size, c.intermediate_size, c.num_attention_heads);
        let s = Scratch {
            h: vec![0.0; d],
            n: vec![0.0; d],
            q: vec![0.0; nq * hd],
            k: vec![0.0; nkv * hd],
            v: vec![0.0; nkv * hd],
            a: vec![0.0; nq * hd],
            o: vec![0.0; d],
            gate: vec![0.0; dff],
            up: vec![0.0; dff],
            m: vec![0.0; dff],
        };
        Ok(CpuModel {
            inv_freq: c.rope_inv_freq(),
            max_seq: max_seq.min(c.max_position_embeddings),
            model,
            caches,
            down_hadamard,
            qk_hadamard,
            s,
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
        let CpuModel {
            model,
            caches,
            inv_freq,
            down_hadamard,
            qk_hadamard,
            s,
            ..
        } = self;
        let c = &model.config;
        let (d, hd, nq, nkv) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.n_kv_heads(),
        );
        let pos = self.len;
        if pos >= self.max_seq {
            return Err(Error::other("the context is full"));
        }
        let t = token as usize;
        if t >= c.vocab_size {
            return Err(Error::other(format!(
                "token {token} is outside the vocabulary"
            )));
        }
        let eps = c.rms_norm_eps as f32;
        let act = model.forward.act;
        let quant = |x: &mut [f32], group: usize| {
            if let Some(a) = act {
                kernels::act_quant(x, group, a.bits);
            }
        };
        // Angles in f64: at far positions they reach thousands of radians.
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| {
                let a = pos as f64 * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        s.h.copy_from_slice(&model.embed[t * d..(t + 1) * d]);
        for (l, (kc, vc)) in model.layers.iter().zip(caches.iter_mut()) {
            let [wq, wk, wv, wo, wg, wu, wd] = &l.linears;
            kernels::rms_norm(&s.h, &l.attn_norm, eps, &mut s.n);
            quant(&mut s.n, d);
            kernels::gemv(wq, &s.n, &mut s.q);
            kernels::gemv(wk, &s.n, &mut s.k);
            kernels::gemv(wv, &s.n, &mut s.v);
            kernels::rope(&mut s.q, hd, &cos, &sin);
            kernels::rope(&mut s.k, hd, &cos, &sin);
            if let Some(h) = qk_hadamard {
                h.apply_rows_f32(&mut s.q);
                h.apply_rows_f32(&mut s.k);
            }
            kc.push(&s.k);
            vc.push(&s.v);
            attend(&s.q, kc, vc, pos + 1, nq / nkv, &mut s.a);
            quant(&mut s.a, hd);
            kernels::gemv(wo, &s.a, &mut s.o);
            s.h.iter_mut().zip(&s.o).for_each(|(h, o)| *h += o);

            kernels::rms_norm(&s.h, &l.ffn_norm, eps, &mut s.n);
            quant(&mut s.n, d);
            kernels::gemv(wg, &s.n, &mut s.gate);
            kernels::gemv(wu, &s.n, &mut s.up);
            kernels::silu_mul(&s.gate, &s.up, &mut s.m);
            if let Some(h) = down_hadamard {
                h.apply_rows_f32(&mut s.m);
            }
            let dff = s.m.len();
            quant(&mut s.m, dff);
            kernels::gemv(wd, &s.m, &mut s.o);
            s.h.iter_mut().zip(&s.o).for_each(|(h, o)| *h += o);
        }
        kernels::rms_norm(&s.h, &model.norm, eps, &mut s.n);
        let mut logits = vec![0f32; c.vocab_size];
        kernels::gemv(&model.lm_head, &s.n, &mut logits);
        self.len += 1;
        Ok(logits)
    }
}

/// Decode attention of one query position over `len` cached positions, query heads in
/// parallel; query head h reads KV head h / `group`.
fn attend(q: &[f32], k: &KvCache, v: &KvCache, len: usize, group: usize, out: &mut [f32]) {
    let hd = k.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(h, o)| {
        let kv = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let q_sum: f32 = qh.iter().sum();
        let mut p: Vec<f32> = (0..len).map(|t| k.dot(t, kv, qh, q_sum) * scale).collect();
        let mx = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut total = 0f32;
        for x in &mut p {
            *x = (*x - mx).exp();
            total += *x;
        }
        o.iter_mut().for_each(|x| *x = 0.0);
        for (t, &pt) in p.iter().enumerate() {
            v.add_scaled(t, kv, pt / total, o);
        }
    });
}
