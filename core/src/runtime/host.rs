//! A model folder read into host memory in the form the runtimes execute: packed int4 codes
//! with f32 scales (and zeros) per linear, f16 for everything that stays 16-bit, f32 norms and
//! embeddings. The GPU runtime uploads it; the CPU runtime runs it where it lies.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::checkpoint::{HostTensor, LlamaWeights, layer_tensor_names};
use crate::model::config::LlamaConfig;
use crate::model::qformat::{self, ForwardSpec};
use crate::quant::quantizer::QuantSpec;

/// The weights of a synthetic benchmark model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticWeights {
    /// 4-bit symmetric codes, one scale per output channel.
    Int4,
    /// f16.
    Half,
}

/// A linear layer's weight [rows, cols] as the runtimes store it.
#[derive(Debug, Clone)]
pub enum HostLinear {
    /// The model folder's packing: `cols / 8` words per row, column 8w + j of a row in bits
    /// 4j..4j+3 of word w; a code c means (c + qmin − zero)·scale, with one scale (and zero)
    /// per group of columns, row-major [rows, cols / group].
    Int4 {
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        words: Vec<u32>,
        scales: Vec<f32>,
        zeros: Option<Vec<f32>>,
    },
    /// f16 bit patterns, row-major.
    Half {
        rows: usize,
        cols: usize,
        halves: Vec<u16>,
    },
}

impl HostLinear {
    /// Check that codes, scales and zeros fit the shape (a corrupt folder must not reach a
    /// kernel).
    pub fn int4(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        words: Vec<u32>,
        scales: Vec<f32>,
        zeros: Option<Vec<f32>>,
    ) -> Result<Self> {
        let group = spec.group.unwrap_or(cols);
        let ok = spec.bits == 4
            && group > 0
            && cols.is_multiple_of(8)
            && group.is_multiple_of(8)
            && cols.is_multiple_of(group)
            && words.len() == rows * cols / 8
            && scales.len() == rows * (cols / group)
            && zeros.as_ref().is_none_or(|z| z.len() == scales.len())
            && zeros.is_some() != spec.sym;
        if !ok {
            return Err(Error::other(format!(
                "int4 matrix {rows}×{cols} (group {group}): codes, scales or zeros do not match the shape"
            )));
        }
        Ok(HostLinear::Int4 {
            rows,
            cols,
            spec,
            words,
            scales,
            zeros,
        })
    }

    /// Round f32 values to f16; `cols` must be divisible by 8 (the kernels' vector width).
    pub fn half_from_f32(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        if !cols.is_multiple_of(8) || w.len() != rows * cols {
            return Err(Error::other(format!(
                "f16 matrix {rows}×{cols}: {} values, or columns not divisible by 8",
                w.len()
            )));
        }
        Ok(HostLinear::Half {
            rows,
            cols,
            halves: w
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect(),
        })
    }

    /// An int4 matrix of heads of `head_dim` rows (q or k) with each head's rows in RoPE pairs:
    /// x_0, x_h, x_1, x_{h+1}, … (h = head_dim / 2), the pairs the half-split RoPE turns
    /// together, so that the GEMV that stores q and k rotated holds whole pairs per team
    /// ([`super::linear::Products::launch_rope`]). None for an f16 matrix or rows that are not
    /// whole heads of an even size.
    pub fn pair_rope_halves(&self, head_dim: usize) -> Option<HostLinear> {
        let HostLinear::Int4 {
            rows,
            cols,
            spec,
            words,
            scales,
            zeros,
        } = self
        else {
            return None;
        };
        if !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
            return None;
        }
        let half = head_dim / 2;
        // order[r]: the row that goes to row r.
        let order: Vec<usize> = (0..*rows)
            .map(|r| r - r % head_dim + (r % head_dim) / 2 + (r % 2) * half)
            .collect();
        fn permute<T: Copy>(v: &[T], order: &[usize]) -> Vec<T> {
            let per_row = v.len() / order.len();
            order
                .iter()
                .flat_map(|&r| &v[r * per_row..(r + 1) * per_row])
                .copied()
                .collect()
        }
        Some(HostLinear::Int4 {
            rows: *rows,
            cols: *cols,
            spec: *spec,
            words: permute(words, &order),
            scales: permute(scales, &order),
            zeros: zeros.as_ref().map(|z| permute(z, &order)),
        })
    }

    /// Two int4 matrices of one shape and spec as one, their rows interleaved (a_0, b_0, a_1,
    /// b_1, …): the gate and up projections for the GEMV that computes SiLU(gate)·up in its
    /// epilogue. None for any other pair.
    pub fn interleave_rows(a: &HostLinear, b: &HostLinear) -> Option<HostLinear> {
        let (
            HostLinear::Int4 {
                rows,
                cols,
                spec,
                words: wa,
                scales: sa,
                zeros: za,
            },
            HostLinear::Int4 {
                rows: rb,
                cols: cb,
                spec: sb,
                words: wb,
                scales: sb_,
                zeros: zb,
            },
        ) = (a, b)
        else {
            return None;
        };
        if (rows, cols, spec) != (rb, cb, sb) {
            return None;
        }
        fn zip<T: Copy>(a: &[T], b: &[T], rows: usize) -> Vec<T> {
            let n = a.len() / rows.max(1);
            a.chunks_exact(n.max(1))
                .zip(b.chunks_exact(n.max(1)))
                .flat_map(|(x, y)| x.iter().chain(y).copied())
                .collect()
        }
        Some(HostLinear::Int4 {
            rows: 2 * rows,
            cols: *cols,
            spec: *spec,
            words: zip(wa, wb, *rows),
            scales: zip(sa, sb_, *rows),
            zeros: za.as_ref().zip(zb.as_ref()).map(|(x, y)| zip(x, y, *rows)),
        })
    }

    /// Matrices of one width (and spec) as one, their rows one after the other: q, k and v
    /// for one product. None for mixed or mismatched matrices.
    pub fn stack_rows(parts: &[&HostLinear]) -> Option<HostLinear> {
        match parts.first()? {
            HostLinear::Int4 { cols, spec, .. } => {
                let (mut rows, mut words, mut scales, mut zeros) =
                    (0, Vec::new(), Vec::new(), (!spec.sym).then(Vec::new));
                for p in parts {
                    let HostLinear::Int4 {
                        rows: r,
                        cols: c,
                        spec: s,
                        words: w,
                        scales: sc,
                        zeros: z,
                    } = p
                    else {
                        return None;
                    };
                    if (c, s) != (cols, spec) {
                        return None;
                    }
                    rows += r;
                    words.extend_from_slice(w);
                    scales.extend_from_slice(sc);
                    if let (Some(all), Some(z)) = (zeros.as_mut(), z) {
                        all.extend_from_slice(z);
                    }
                }
                Some(HostLinear::Int4 {
                    rows,
                    cols: *cols,
                    spec: *spec,
                    words,
                    scales,
                    zeros,
                })
            }
            HostLinear::Half { cols, .. } => {
                let (mut rows, mut halves) = (0, Vec::new());
                for p in parts {
                    let HostLinear::Half {
                        rows: r,
                        cols: c,
                        halves: h,
                    } = p
                    else {
                        return None;
                    };
                    if c != cols {
                        return None;
                    }
                    rows += r;
                    halves.extend_from_slice(h);
                }
                Some(HostLinear::Half {
                    rows,
                    cols: *cols,
                    halves,
                })
            }
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            HostLinear::Int4 { rows, .. } | HostLinear::Half { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            HostLinear::Int4 { cols, .. } | HostLinear::Half { cols, .. } => *cols,
        }
    }

    /// Bytes one matrix-vector product reads: codes, scales and zeros, or the halves.
    pub fn bytes(&self) -> usize {
        match self {
            HostLinear::Int4 {
                words,
                scales,
                zeros,
                ..
            } => words.len() * 4 + (scales.len() + zeros.as_ref().map_or(0, Vec::len)) * 4,
            HostLinear::Half { halves, .. } => halves.len() * 2,
        }
    }
}

/// One decoder layer: the two norms and the seven linears (q, k, v, o, gate, up, down).
#[derive(Debug, Clone)]
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub linears: [HostLinear; 7],
}

/// A whole model as the runtimes execute it.
#[derive(Debug, Clone)]
pub struct HostModel {
    pub config: LlamaConfig,
    /// Online transforms and activation / KV quantizers the folder was made with.
    pub forward: ForwardSpec,
    /// f32 [vocab, hidden]: a token's row is copied in, never multiplied.
    pub embed: Vec<f32>,
    pub norm: Vec<f32>,
    pub layers: Vec<HostLayer>,
    /// f16 [vocab, hidden].
    pub lm_head: HostLinear,
}

/// Read tensor `name` of a safetensors file as f32 (f32, f16 or bf16 stored).
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
        Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
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

impl HostModel {
    /// Read the model folder `dir`: an int4 folder as its packed codes, any other model with
    /// f16 linears and no activation or KV quantization.
    pub fn load(dir: &Path) -> Result<Self> {
        if !qformat::is_quantized(dir) {
            return Self::from_weights(&LlamaWeights::load(dir)?)
                .map_err(|e| Error::other(format!("{}: {e}", dir.display())));
        }
        let header = qformat::read_header(dir)?;
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let wspec = header.weight.filter(|w| w.bits == 4);
        let kv_ok = header.forward.kv.is_none_or(|k| k.bits == 4 && !k.sym);
        let (Some(wspec), true) = (wspec, kv_ok) else {
            return Err(Error::unsupported(
                dir.join(qformat::HEADER),
                format!(
                    "the int4 runtime runs 4-bit weights with a 4-bit asymmetric or 16-bit KV cache; this folder is {}",
                    header.bits
                ),
            ));
        };
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = crate::model::checkpoint::parse_safetensors(&path, &bytes)?;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let names = layer_tensor_names(i);
            let linear = |k: usize| -> Result<HostLinear> {
                let base = names[k].trim_end_matches(".weight");
                let qw = st.tensor(&format!("{base}.qweight")).map_err(|_| {
                    Error::format(&path, format!("tensor {base}.qweight is missing"))
                })?;
                if qw.dtype() != Dtype::U32 && qw.dtype() != Dtype::I32 || qw.shape().len() != 2 {
                    return Err(Error::format(
                        &path,
                        format!("{base}.qweight: expected 2-D 32-bit packed codes"),
                    ));
                }
                let (rows, cols) = (qw.shape()[0], qw.shape()[1] * 8);
                let words: Vec<u32> = bytemuck::pod_collect_to_vec(qw.data());
                let (_, scales) = tensor_f32(&st, &path, &format!("{base}.scales"))?;
                let zeros = if wspec.sym {
                    None
                } else {
                    Some(tensor_f32(&st, &path, &format!("{base}.zeros"))?.1)
                };
                HostLinear::int4(rows, cols, wspec, words, scales, zeros)
                    .map_err(|e| Error::format(&path, format!("{base}: {e}")))
            };
            layers.push(HostLayer {
                attn_norm: tensor_f32(&st, &path, &names[0])?.1,
                ffn_norm: tensor_f32(&st, &path, &names[5])?.1,
                linears: [
                    linear(1)?,
                    linear(2)?,
                    linear(3)?,
                    linear(4)?,
                    linear(6)?,
                    linear(7)?,
                    linear(8)?,
                ],
            });
        }
        let (_, embed) = tensor_f32(&st, &path, "model.embed_tokens.weight")?;
        let head_name = if config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let (_, head) = tensor_f32(&st, &path, head_name)?;
        let (v, d) = (config.vocab_size, config.hidden_size);
        let lm_head = HostLinear::half_from_f32(v, d, &head)
            .map_err(|e| Error::format(&path, format!("{head_name}: {e}")))?;
        let (_, norm) = tensor_f32(&st, &path, "model.norm.weight")?;
        let model = HostModel {
            config,
            forward: header.forward,
            embed,
            norm,
            layers,
            lm_head,
        };
        model
            .check()
            .map_err(|e| Error::format(&path, e.to_string()))?;
        Ok(model)
    }

    /// An unquantized model: f16 linears and head, no activation or KV quantization.
    pub fn from_weights(w: &LlamaWeights) -> Result<Self> {
        let half = |t: &HostTensor| HostLinear::half_from_f32(t.shape[0], t.shape[1], &t.data);
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(HostLayer {
                    attn_norm: l.attn_norm.data.clone(),
                    ffn_norm: l.ffn_norm.data.clone(),
                    linears: [
                        half(&l.wq)?,
                        half(&l.wk)?,
                        half(&l.wv)?,
                        half(&l.wo)?,
                        half(&l.w_gate)?,
                        half(&l.w_up)?,
                        half(&l.w_down)?,
                    ],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = HostModel {
            config: w.config.clone(),
            forward: ForwardSpec {
                down_hadamard: false,
                qk_hadamard: false,
                act: None,
                kv: None,
            },
            embed: w.embed.data.clone(),
            norm: w.norm.data.clone(),
            layers,
            lm_head: half(w.lm_head.as_ref().unwrap_or(&w.embed))?,
        };
        model.check()?;
        Ok(model)
    }

    /// A model of `config`'s shapes with random weights (int4 or f16 linears, an f16 head) run
    /// as `forward` says (online Hadamards, activation and KV quantizers), for decode
    /// benchmarks at shapes too large to download: decode speed does not depend on the values.
    pub fn synthetic(
        config: LlamaConfig,
        weights: SyntheticWeights,
        forward: ForwardSpec,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let c = &config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Random bits once per shape, copied into every layer: each layer's weights are read
        // from their own memory, as in a real model.
        let mut per_shape = Vec::new();
        for (r, k) in c.linear_shapes() {
            per_shape.push(match weights {
                SyntheticWeights::Int4 => HostLinear::int4(
                    r,
                    k,
                    QuantSpec::sym(4),
                    (0..r * k / 8).map(|_| rng.random()).collect(),
                    vec![0.01; r],
                    None,
                )?,
                // Halves with small exponents only: finite values below 1.
                SyntheticWeights::Half => HostLinear::Half {
                    rows: r,
                    cols: k,
                    halves: (0..r * k).map(|_| rng.random::<u16>() & 0x37FF).collect(),
                },
            });
        }
        let layers = (0..c.num_hidden_layers)
            .map(|_| HostLayer {
                attn_norm: vec![1.0; d],
                ffn_norm: vec![1.0; d],
                linears: std::array::from_fn(|i| per_shape[i].clone()),
            })
            .collect();
        let model = HostModel {
            forward,
            embed: (0..v * d)
                .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                .collect(),
            norm: vec![1.0; d],
            layers,
            lm_head: HostLinear::Half {
                rows: v,
                cols: d,
                halves: (0..v * d).map(|i| 0x2000 | (i % 1021) as u16).collect(),
            },
            config,
        };
        model.check()?;
        Ok(model)
    }

    /// Every tensor has the shape the config implies.
    fn check(&self) -> Result<()> {
        let c = &self.config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let want = c.linear_shapes();
        const NAMES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];
        for (i, l) in self.layers.iter().enumerate() {
            if l.attn_norm.len() != d || l.ffn_norm.len() != d {
                return Err(Error::other(format!(
                    "layer {i}: norm weights do not have {d} values"
                )));
            }
            for ((m, &(r, k)), name) in l.linears.iter().zip(&want).zip(NAMES) {
                if (m.rows(), m.cols()) != (r, k) {
                    return Err(Error::other(format!(
                        "layer {i} {name}_proj is {}×{}, the config implies {r}×{k}",
                        m.rows(),
                        m.cols()
                    )));
                }
            }
        }
        if self.layers.len() != c.num_hidden_layers
            || self.embed.len() != v * d
            || self.norm.len() != d
            || (self.lm_head.rows(), self.lm_head.cols()) != (v, d)
        {
            return Err(Error::other(format!(
                "layers, embedding, final norm or head do not match the config ({} layers, vocabulary {v}, hidden {d})",
                c.num_hidden_layers
            )));
        }
        Ok(())
    }

    /// Bytes of weights one decode step reads: every linear and the head.
    pub fn weight_bytes_per_token(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .flat_map(|l| &l.linears)
            .map(HostLinear::bytes)
            .sum();
        linears + self.lm_head.bytes()
    }
}
