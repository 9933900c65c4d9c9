//! The decode loop on the GPU for int4 model folders: every kernel of the forward recorded into
//! one command buffer per token, logits read back at the end.
//!
//! Supported so far: folders with 4-bit weights and a 4-bit KV cache (W4A4KV4, W4A16KV4, …);
//! activations are fake-quantized on the GPU exactly where the folder's header says.

use std::path::Path;

use burn::tensor::wgpu::wgpu;
use safetensors::{Dtype, SafeTensors};

use super::Gpu;
use super::attention::{Attention, Int4Cache};
use super::gemv::{Gemv, Int4Matrix};
use super::hadamard::GpuHadamard;
use super::ops::Ops;
use crate::error::{Error, Result};
use crate::model::checkpoint::layer_tensor_names;
use crate::model::config::LlamaConfig;
use crate::model::qformat::{self, Header};
use crate::quant::quantizer::QuantSpec;

struct GpuLayer {
    attn_norm: wgpu::Buffer,
    ffn_norm: wgpu::Buffer,
    /// q, k, v, o, gate, up, down
    linears: Vec<Int4Matrix>,
    k_cache: Int4Cache,
    v_cache: Int4Cache,
}

/// Scratch buffers of one decode step.
struct Scratch {
    h: wgpu::Buffer,
    n: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    a: wgpu::Buffer,
    o: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    m: wgpu::Buffer,
    m_h: wgpu::Buffer,
    qk_tmp: wgpu::Buffer,
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
    logits: wgpu::Buffer,
}

pub struct GpuModel {
    pub config: LlamaConfig,
    pub header: Header,
    gpu: Gpu,
    embed: Vec<f32>,
    layers: Vec<GpuLayer>,
    norm: wgpu::Buffer,
    lm_head: wgpu::Buffer,
    ops: Ops,
    gemv: Gemv,
    attn: Attention,
    down_h: Option<GpuHadamard>,
    qk_h: Option<GpuHadamard>,
    act: Option<QuantSpec>,
    s: Scratch,
    inv_freq: Vec<f64>,
    /// Positions in the cache.
    pub len: usize,
}

fn tensor_f32(st: &SafeTensors, path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::format(path, format!("tensor {name} is missing")))?;
    let data = match t.dtype() {
        Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(t.data()),
        Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::format(
                path,
                format!("{name}: unexpected dtype {other:?}"),
            ));
        }
    };
    Ok((t.shape().to_vec(), data))
}

impl GpuModel {
    /// Load the int4 folder `dir` onto `gpu`, with room for `max_seq` positions.
    pub fn load(dir: &Path, gpu: Gpu, max_seq: usize) -> Result<Self> {
        let header = qformat::read_header(dir)?;
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let wspec = header.weight.filter(|w| w.bits == 4);
        let kv_ok = header.forward.kv.is_some_and(|k| k.bits == 4 && !k.sym);
        let (Some(wspec), true) = (wspec, kv_ok) else {
            return Err(Error::unsupported(
                dir.join(qformat::HEADER),
                format!(
                    "the GPU runtime runs 4-bit weights with a 4-bit KV cache so far; this folder is {}",
                    header.bits
                ),
            ));
        };
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
        let c = &config;
        let (d, hd, nq, nkv, dff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.n_kv_heads(),
            c.intermediate_size,
        );
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let names = layer_tensor_names(i);
            let mut linears = Vec::new();
            for k in [1, 2, 3, 4, 6, 7, 8] {
                let base = names[k].trim_end_matches(".weight");
                let qw = st.tensor(&format!("{base}.qweight")).map_err(|_| {
                    Error::format(&path, format!("tensor {base}.qweight is missing"))
                })?;
                let (rows, cols) = (qw.shape()[0], qw.shape()[1] * 8);
                let words: Vec<u32> = bytemuck::pod_collect_to_vec(qw.data());
                let (_, scales) = tensor_f32(&st, &path, &format!("{base}.scales"))?;
                let zeros = if wspec.sym {
                    None
                } else {
                    Some(tensor_f32(&st, &path, &format!("{base}.zeros"))?.1)
                };
                linears.push(
                    Int4Matrix::upload(&gpu, rows, cols, wspec, &words, &scales, zeros.as_deref())
                        .map_err(|e| Error::format(&path, format!("{base}: {e}")))?,
                );
            }
            layers.push(GpuLayer {
                attn_norm: gpu.storage("attn norm", &tensor_f32(&st, &path, &names[0])?.1),
                ffn_norm: gpu.storage("ffn norm", &tensor_f32(&st, &path, &names[5])?.1),
                linears,
                k_cache: Int4Cache::new(&gpu, max_seq, nkv, hd),
                v_cache: Int4Cache::new(&gpu, max_seq, nkv, hd),
            });
        }
        let (_, embed) = tensor_f32(&st, &path, "model.embed_tokens.weight")?;
        let head_name = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = gpu.storage("lm_head", &tensor_f32(&st, &path, head_name)?.1);
        let norm = gpu.storage("norm", &tensor_f32(&st, &path, "model.norm.weight")?.1);
        let f = &header.forward;
        let s = Scratch {
            h: gpu.output("h", d),
            n: gpu.output("n", d),
            q: gpu.output("q", nq * hd),
            k: gpu.output("k", nkv * hd),
            v: gpu.output("v", nkv * hd),
            a: gpu.output("a", nq * hd),
            o: gpu.output("o", d),
            gate: gpu.output("gate", dff),
            up: gpu.output("up", dff),
            m: gpu.output("m", dff),
            m_h: gpu.output("m_h", dff),
            qk_tmp: gpu.output("qk_tmp", nq * hd),
            cos: gpu.output("cos", hd / 2),
            sin: gpu.output("sin", hd / 2),
            logits: gpu.output("logits", c.vocab_size),
        };
        Ok(GpuModel {
            ops: Ops::new(&gpu),
            gemv: Gemv::new(&gpu),
            attn: Attention::new(&gpu, nq, nkv, hd, max_seq),
            down_h: f
                .down_hadamard
                .then(|| GpuHadamard::new(&gpu, dff))
                .transpose()?,
            qk_h: f
                .qk_hadamard
                .then(|| GpuHadamard::new(&gpu, hd))
                .transpose()?,
            act: f.act,
            inv_freq: c.rope_inv_freq(),
            config,
            header,
            embed,
            layers,
            norm,
            lm_head,
            s,
            gpu,
            len: 0,
        })
    }

    /// Positions the cache holds.
    pub fn max_seq(&self) -> usize {
        self.attn.max_seq
    }

    /// Run one token at the next position and return its logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let c = &self.config;
        let (d, hd, nq, nkv, dff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.n_kv_heads(),
            c.intermediate_size,
        );
        let pos = self.len;
        if pos >= self.attn.max_seq {
            return Err(Error::other("the context is full"));
        }
        let t = token as usize;
        if t >= c.vocab_size {
            return Err(Error::other(format!(
                "token {token} is outside the vocabulary"
            )));
        }
        let (gpu, s, ops) = (&self.gpu, &self.s, &self.ops);
        gpu.queue.write_buffer(
            &s.h,
            0,
            bytemuck::cast_slice(&self.embed[t * d..(t + 1) * d]),
        );
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let a = pos as f64 * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        gpu.queue
            .write_buffer(&s.cos, 0, bytemuck::cast_slice(&cos));
        gpu.queue
            .write_buffer(&s.sin, 0, bytemuck::cast_slice(&sin));
        let eps = c.rms_norm_eps as f32;
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let act = |enc: &mut wgpu::CommandEncoder, x: &wgpu::Buffer, len: usize, group: usize| {
            if let Some(a) = self.act {
                ops.act_quant(gpu, enc, x, len, group, a.bits);
            }
        };
        for l in &self.layers {
            let [wq, wk, wv, wo, wg, wu, wd] = [0, 1, 2, 3, 4, 5, 6].map(|i| &l.linears[i]);
            ops.rms_norm(gpu, &mut enc, &s.h, &l.attn_norm, &s.n, 1, d, eps);
            act(&mut enc, &s.n, d, d);
            self.gemv.record(gpu, &mut enc, wq, &s.n, &s.q);
            self.gemv.record(gpu, &mut enc, wk, &s.n, &s.k);
            self.gemv.record(gpu, &mut enc, wv, &s.n, &s.v);
            ops.rope(gpu, &mut enc, &s.q, &s.cos, &s.sin, 1, nq, hd);
            ops.rope(gpu, &mut enc, &s.k, &s.cos, &s.sin, 1, nkv, hd);
            if let Some(h) = &self.qk_h {
                h.record(gpu, &mut enc, &s.q, &s.qk_tmp, nq);
                enc.copy_buffer_to_buffer(&s.qk_tmp, 0, &s.q, 0, (nq * hd * 4) as u64);
                h.record(gpu, &mut enc, &s.k, &s.qk_tmp, nkv);
                enc.copy_buffer_to_buffer(&s.qk_tmp, 0, &s.k, 0, (nkv * hd * 4) as u64);
            }
            self.attn.append(gpu, &mut enc, &s.k, &l.k_cache, pos);
            self.attn.append(gpu, &mut enc, &s.v, &l.v_cache, pos);
            self.attn
                .attend(gpu, &mut enc, &s.q, &l.k_cache, &l.v_cache, &s.a, pos + 1);
            act(&mut enc, &s.a, nq * hd, hd);
            self.gemv.record(gpu, &mut enc, wo, &s.a, &s.o);
            ops.add(gpu, &mut enc, &s.o, &s.h, d);
            ops.rms_norm(gpu, &mut enc, &s.h, &l.ffn_norm, &s.n, 1, d, eps);
            act(&mut enc, &s.n, d, d);
            self.gemv.record(gpu, &mut enc, wg, &s.n, &s.gate);
            self.gemv.record(gpu, &mut enc, wu, &s.n, &s.up);
            ops.silu_mul(gpu, &mut enc, &s.gate, &s.up, &s.m, dff);
            let m = match &self.down_h {
                Some(h) => {
                    h.record(gpu, &mut enc, &s.m, &s.m_h, 1);
                    &s.m_h
                }
                None => &s.m,
            };
            act(&mut enc, m, dff, dff);
            self.gemv.record(gpu, &mut enc, wd, m, &s.o);
            ops.add(gpu, &mut enc, &s.o, &s.h, d);
        }
        ops.rms_norm(gpu, &mut enc, &s.h, &self.norm, &s.n, 1, d, eps);
        ops.gemv_f32(
            gpu,
            &mut enc,
            &self.lm_head,
            &s.n,
            &s.logits,
            c.vocab_size,
            d,
        );
        let logits = gpu.finish_f32(enc, &s.logits, c.vocab_size)?;
        self.len += 1;
        Ok(logits)
    }
}
