//! The decode loop on the GPU: every kernel of one token's forward recorded into one command
//! buffer, logits read back at the end — or, when streaming, the next token picked on the GPU
//! and the following token's work submitted before the host reads it ([`GpuModel::stream`]).
//!
//! Runs int4 model folders (4-bit weights; a 4-bit asymmetric or 16-bit KV cache; activations
//! fake-quantized on the GPU exactly where the folder's header says), unquantized models with
//! f16 weights, and synthetic models of any LLaMA shape for the benchmarks (all read into a
//! [`HostModel`] first).

use std::path::Path;

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::attention::{Attend, Attention, Fresh, KvCache};
use super::hadamard::GpuHadamard;
use super::host::{HostLinear, HostModel};
use super::kernel::{Bind, Dispatch, record_all};
use super::linear::{ActCodes, Input, Linear, Products, Rope};
use super::ops::{Ops, Pick, RopeShape, SampleParams};
use crate::error::{Error, Result};
use crate::model::checkpoint::LlamaWeights;
use crate::model::config::LlamaConfig;
use crate::model::qformat::ForwardSpec;

struct GpuLayer {
    attn_norm: wgpu::Buffer,
    ffn_norm: wgpu::Buffer,
    qkv: Qkv,
    o: Linear,
    gate_up: GateUp,
    down: Linear,
    k_cache: KvCache,
    v_cache: KvCache,
}

/// The q, k and v projections: one matrix of their rows stacked, whose product is q, k and v
/// one after the other in one buffer (each [tokens, width]; the kernels after it bind its
/// ranges), where those ranges fall on the device's binding alignment; else three matrices.
/// `paired`: the stacked matrix is int4 and q's and k's rows are in RoPE pairs
/// ([`HostLinear::pair_rope_halves`]), so decode's GEMV applies RoPE in its epilogue (one
/// launch fewer per layer) and q and k keep that order of each head's dimensions throughout:
/// attention's dot products and the KV cache's per-head grids do not depend on it. An online
/// Q/K Hadamard, which does, reads the heads back into natural order.
enum Qkv {
    Fused { w: Linear, paired: bool },
    Separate(Box<[Linear; 3]>),
}

/// Which products the upload may fuse where the model allows.
#[derive(Debug, Clone, Copy)]
pub struct Fusion {
    pub qkv: bool,
    pub gate_up: bool,
    /// RoPE in the stacked q, k and v GEMV's epilogue (with `qkv`, int4).
    pub rope: bool,
}

impl Fusion {
    pub const ALL: Fusion = Fusion {
        qkv: true,
        gate_up: true,
        rope: true,
    };
    pub const NONE: Fusion = Fusion {
        qkv: false,
        gate_up: false,
        rope: false,
    };
}

/// The gated MLP's gate and up projections: both int4, one matrix of their rows interleaved
/// (decode computes SiLU(gate)·up in the GEMV's epilogue: one launch instead of three); else
/// two matrices.
enum GateUp {
    Fused(Linear),
    Separate(Linear, Linear),
}

impl GpuLayer {
    fn all_linears(&self) -> impl Iterator<Item = &Linear> {
        let qkv = match &self.qkv {
            Qkv::Fused { w, .. } => [Some(w), None, None],
            Qkv::Separate(w) => [Some(&w[0]), Some(&w[1]), Some(&w[2])],
        };
        let gate_up = match &self.gate_up {
            GateUp::Fused(w) => [Some(w), None],
            GateUp::Separate(g, u) => [Some(g), Some(u)],
        };
        let rest = [Some(&self.o), Some(&self.down)];
        qkv.into_iter().chain(gate_up).chain(rest).flatten()
    }
}

/// One layer's weights on their way to the GPU: norms and the linears.
struct LayerParts {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    qkv: Qkv,
    o: Linear,
    gate_up: GateUp,
    down: Linear,
}

/// Scratch buffers of one forward over up to `tokens` positions, [tokens, width] each.
struct Scratch {
    h: wgpu::Buffer,
    n: wgpu::Buffer,
    /// q, k and v one after the other (room for a fused product), or only q.
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    a: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    m: wgpu::Buffer,
    m_h: wgpu::Buffer,
    q_h: wgpu::Buffer,
    k_h: wgpu::Buffer,
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
    /// The last position's hidden state (prefill plans only: the head runs on it alone).
    last: wgpu::Buffer,
    logits: wgpu::Buffer,
    token: wgpu::Buffer,
}

impl Scratch {
    /// The buffers for `t` positions of `layers`: q with room for k and v where q, k and v
    /// are one product (separate k and v only where they are not), gate with room for the
    /// (gate, up) pairs of a fused gate/up product (a separate up only where it is not).
    fn new(gpu: &Gpu, c: &LlamaConfig, t: usize, layers: &[GpuLayer]) -> Self {
        let (d, hd, nq, nkv, dff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.n_kv_heads(),
            c.intermediate_size,
        );
        // Room for what any layer needs (every layer has the same shapes in practice).
        let any = |f: fn(&GpuLayer) -> bool| layers.iter().any(f);
        let fused_qkv = any(|l| matches!(l.qkv, Qkv::Fused { .. }));
        let separate_qkv = any(|l| matches!(l.qkv, Qkv::Separate(_)));
        let fused_gate_up = any(|l| matches!(l.gate_up, GateUp::Fused(_)));
        let separate_gate_up = any(|l| matches!(l.gate_up, GateUp::Separate(..)));
        let (q, kv) = (t * nq * hd, t * nkv * hd);
        let when = |cond: bool, n: usize| if cond { n } else { 0 };
        Scratch {
            h: gpu.output("h", t * d),
            n: gpu.output("n", t * d),
            q: gpu.output("q (k, v)", q + when(fused_qkv, 2 * kv)),
            k: gpu.output("k", when(separate_qkv, kv)),
            v: gpu.output("v", when(separate_qkv, kv)),
            a: gpu.output("a", t * nq * hd),
            gate: gpu.output("gate", t * dff + when(fused_gate_up, t * dff)),
            up: gpu.output("up", when(separate_gate_up, t * dff)),
            m: gpu.output("m", t * dff),
            m_h: gpu.output("m_h", t * dff),
            // Room for k after q (one Hadamard launch over both, when they are fused).
            q_h: gpu.output("q_h", q + when(fused_qkv, kv)),
            k_h: gpu.output("k_h", when(separate_qkv, kv)),
            cos: gpu.output("cos", t * hd / 2),
            sin: gpu.output("sin", t * hd / 2),
            last: gpu.output("last", if t > 1 { d } else { 1 }),
            logits: gpu.output("logits", c.vocab_size),
            token: gpu.output("token", 1),
        }
    }
}

/// One launch of a forward; the attention launches move with the positions.
enum Launch {
    Fixed(Dispatch),
    /// A linear layer's product (fixed too; told apart for [`GpuModel::breakdown`]).
    Product(Dispatch),
    /// K and V into the layer's caches (prefill; decode's attention appends its own).
    Append {
        d: Dispatch,
        layer: usize,
    },
    Attend {
        a: Attend,
        layer: usize,
    },
}

impl Launch {
    fn dispatch(&self) -> &Dispatch {
        match self {
            Launch::Fixed(d) | Launch::Product(d) | Launch::Append { d, .. } => d,
            Launch::Attend { a, .. } => &a.d,
        }
    }
}

/// Every launch of one forward over up to `tokens` consecutive positions, bound once at load
/// time to its own scratch buffers: `tokens` = 1 for decode (GEMVs), a chunk for prefill
/// (GEMMs: int4, W4A4 or f16).
struct Plan {
    tokens: usize,
    s: Scratch,
    /// The layers.
    body: Vec<Launch>,
    /// The final norm and the head, on the last position (after `s.last` is filled when
    /// `tokens` > 1).
    tail: Vec<Launch>,
    /// The linears run on integer activation codes (the W4A4 kernels).
    integer_activations: bool,
    /// The next token from `s.logits` into `s.token` (parameters set per call).
    sample: Dispatch,
    /// The final norm and the head on every position, into the buffer of [tokens, vocab]
    /// logits (prefill plans; built on the first [`GpuModel::forward_all`]).
    score: Option<(Vec<Dispatch>, wgpu::Buffer)>,
}

/// What a forward returns.
#[derive(Clone, Copy)]
enum Out {
    /// The last position's logits.
    Last,
    /// The next token, picked on the GPU (its u32 bits in the one returned value).
    Pick(Pick),
    /// Every position's logits, [tokens, vocab].
    All,
}

/// Seconds per token of a replayed plan, whole and split (see [`GpuModel::breakdown`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Breakdown {
    pub all: f64,
    pub gemv: f64,
    pub rest: f64,
    pub launches: usize,
    pub gemv_launches: usize,
    /// The launches other than the GEMVs by kernel: (name, launches, seconds per token of
    /// replaying those alone), slowest first.
    pub kernels: Vec<(&'static str, usize, f64)>,
}

/// Positions of the prefill plans: long prompts run in chunks of 128, the rest in chunks of 16
/// (a plan computes all its rows, so a short prompt in a long plan would waste most of them).
const PREFILL_CHUNKS: [usize; 2] = [16, 128];

/// What decoding with a token in flight needs on the GPU ([`GpuModel::stream`]); built on first
/// use, since the embedding table costs vocab × d values of GPU memory.
struct Streaming {
    /// The token embeddings (shaders/embed_gather.wgsl's table; kept with the launch that binds
    /// it) and that launch, which copies the sampled token's row into the decode plan's input.
    _table: wgpu::Buffer,
    gather: Dispatch,
    /// cos and sin of every position's RoPE angles, [max_seq, head_dim / 2]: a step copies its
    /// position's row into the decode plan's buffers.
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
    /// Where each step's token is copied for the host to map, one per step in flight.
    readback: [wgpu::Buffer; 2],
}

pub struct GpuModel {
    pub config: LlamaConfig,
    pub forward: ForwardSpec,
    gpu: Gpu,
    embed: Vec<f32>,
    layers: Vec<GpuLayer>,
    lm_head: Linear,
    attn: Attention,
    inv_freq: Vec<f64>,
    /// One token at a time.
    decode: Plan,
    /// Many tokens at a time, by increasing size ([`PREFILL_CHUNKS`] that fit the cache).
    prefill: Vec<Plan>,
    /// The linears run on integer activation codes (the W4A4 kernels).
    pub integer_activations: bool,
    /// Positions in the cache.
    pub len: usize,
    kernels: (Ops, Products),
    norm: wgpu::Buffer,
    streaming: Option<Streaming>,
}

impl GpuModel {
    /// Load the model folder `dir` onto `gpu`, with room for `max_seq` positions: an int4
    /// folder as its packed codes, any other model with f16 weights and a 16-bit KV cache.
    pub fn load(dir: &Path, gpu: Gpu, max_seq: usize) -> Result<Self> {
        let host = HostModel::load(dir)?;
        Self::upload(&host, gpu, max_seq)
            .map_err(|e| Error::other(format!("{}: {e}", dir.display())))
    }

    /// An unquantized model on the GPU: f16 weights, 16-bit (f32) KV cache.
    pub fn from_weights(w: &LlamaWeights, gpu: Gpu, max_seq: usize) -> Result<Self> {
        Self::upload(&HostModel::from_weights(w)?, gpu, max_seq)
    }

    /// Upload a model read into host memory; a device out of memory (or a matrix over its
    /// limits) is an error, not a panic.
    pub fn upload(m: &HostModel, gpu: Gpu, max_seq: usize) -> Result<Self> {
        Self::upload_with(m, gpu, max_seq, Fusion::ALL)
    }

    /// [`GpuModel::upload`] with only the fused products `fusion` allows (tests compare the
    /// fused and the separate paths).
    pub fn upload_with(m: &HostModel, gpu: Gpu, max_seq: usize, fusion: Fusion) -> Result<Self> {
        let (device, name) = (gpu.device.clone(), gpu.info.name.clone());
        let what = "loading the model onto the GPU";
        super::checked(&device, &name, what, || {
            Self::upload_unchecked(m, gpu, max_seq, fusion)
        })?
    }

    fn upload_unchecked(m: &HostModel, gpu: Gpu, max_seq: usize, fusion: Fusion) -> Result<Self> {
        // q, k and v share one output buffer where k's and v's ranges start on the binding
        // alignment for one position (then for any number of them).
        let c = &m.config;
        let align = gpu.device.limits().min_storage_buffer_offset_alignment as usize;
        let q_bytes = c.num_attention_heads * c.head_dim() * 4;
        let kv_bytes = c.n_kv_heads() * c.head_dim() * 4;
        let qkv_fits =
            fusion.qkv && q_bytes.is_multiple_of(align) && kv_bytes.is_multiple_of(align);
        // An online Hadamard on q and k after RoPE reads the paired order back into natural.
        let pair_rope = fusion.rope;
        let hd = c.head_dim();
        let layers = m
            .layers
            .iter()
            .map(|l| {
                let [q, k, v, o, gate, up, down] = &l.linears;
                let put = |w: &HostLinear| Linear::upload(&gpu, w);
                let pairs = |w: &HostLinear| pair_rope.then(|| w.pair_rope_halves(hd)).flatten();
                let stacked = qkv_fits
                    .then(|| match (pairs(q), pairs(k)) {
                        (Some(q), Some(k)) => {
                            HostLinear::stack_rows(&[&q, &k, v]).map(|w| (w, true))
                        }
                        _ => HostLinear::stack_rows(&[q, k, v]).map(|w| (w, false)),
                    })
                    .flatten();
                let qkv = match stacked {
                    Some((w, paired)) => Qkv::Fused {
                        w: put(&w)?,
                        paired,
                    },
                    None => Qkv::Separate(Box::new([put(q)?, put(k)?, put(v)?])),
                };
                let interleaved = fusion
                    .gate_up
                    .then(|| HostLinear::interleave_rows(gate, up))
                    .flatten();
                let gate_up = match interleaved {
                    Some(w) => GateUp::Fused(put(&w)?),
                    None => GateUp::Separate(put(gate)?, put(up)?),
                };
                Ok(LayerParts {
                    attn_norm: l.attn_norm.clone(),
                    ffn_norm: l.ffn_norm.clone(),
                    qkv,
                    o: put(o)?,
                    gate_up,
                    down: put(down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = Linear::upload(&gpu, &m.lm_head)?;
        Self::assemble(
            m.config.clone(),
            m.forward.clone(),
            gpu,
            max_seq,
            layers,
            m.embed.clone(),
            m.norm.clone(),
            lm_head,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: LlamaConfig,
        forward: ForwardSpec,
        gpu: Gpu,
        max_seq: usize,
        parts: Vec<LayerParts>,
        embed: Vec<f32>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Result<Self> {
        let c = &config;
        let (hd, nq, nkv) = (c.head_dim(), c.num_attention_heads, c.n_kv_heads());
        let kv4 = forward.kv.is_some();
        let layers: Vec<GpuLayer> = parts
            .into_iter()
            .map(|p| GpuLayer {
                attn_norm: gpu.storage("attn norm", &p.attn_norm),
                ffn_norm: gpu.storage("ffn norm", &p.ffn_norm),
                qkv: p.qkv,
                o: p.o,
                gate_up: p.gate_up,
                down: p.down,
                k_cache: KvCache::new(&gpu, max_seq, nkv, hd, kv4),
                v_cache: KvCache::new(&gpu, max_seq, nkv, hd, kv4),
            })
            .collect();
        let attn = Attention::new(&gpu, nq, nkv, hd, max_seq)?;
        let norm = gpu.storage("norm", &norm);
        let kernels = (Ops::new(&gpu), Products::new(&gpu));
        let plan = |tokens| {
            Self::plan(
                &gpu, c, &forward, &layers, &norm, &lm_head, &attn, &kernels, tokens,
            )
        };
        let decode = plan(1)?;
        let prefill = PREFILL_CHUNKS
            .iter()
            .filter(|&&n| n <= max_seq)
            .map(|&n| plan(n))
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuModel {
            inv_freq: c.rope_inv_freq(),
            integer_activations: decode.integer_activations,
            config,
            forward,
            embed,
            layers,
            lm_head,
            attn,
            decode,
            prefill,
            gpu,
            len: 0,
            kernels,
            norm,
            streaming: None,
        })
    }

    /// Bind every launch of one forward over up to `t` positions, in order.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        gpu: &Gpu,
        c: &LlamaConfig,
        f: &ForwardSpec,
        layers: &[GpuLayer],
        norm: &wgpu::Buffer,
        lm_head: &Linear,
        attn: &Attention,
        (ops, products): &(Ops, Products),
        t: usize,
    ) -> Result<Plan> {
        let (d, hd, nq, nkv, dff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.n_kv_heads(),
            c.intermediate_size,
        );
        let eps = c.rms_norm_eps as f32;
        let s = Scratch::new(gpu, c, t, layers);
        let down_h = f
            .down_hadamard
            .then(|| GpuHadamard::new(gpu, dff))
            .transpose()?;
        let qk_h = f
            .qk_hadamard
            .then(|| GpuHadamard::new(gpu, hd))
            .transpose()?;
        let mut plan: Vec<Launch> = Vec::new();
        let fixed = Launch::Fixed;
        // W?A≤7 folders whose shapes allow it run their linears on integer activation codes
        // (inputs: the attention/FFN norm output, the attention output, the down_proj input);
        // other folders fake-quantize the f32 input in place, where they quantize at all.
        let int_weights = layers
            .iter()
            .flat_map(|l| l.all_linears())
            .all(|w| match w {
                Linear::Int4(m) => m.spec.group.is_none_or(|g| g.is_multiple_of(32)),
                Linear::Half(_) => false,
            });
        let inputs = [(d, d), (nq * hd, hd), (dff, dff)];
        let codes = match f.act {
            Some(a) if int_weights && inputs.iter().all(|&(n, g)| ActCodes::fits(n, g, a.bits)) => {
                Some(
                    inputs
                        .iter()
                        .map(|&(n, g)| ActCodes::new(gpu, t, n, g, a.bits))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
            _ => None,
        };
        // The launch preparing input `i` (of `inputs`) held in `x`, for all t positions.
        let quantize = |x: &wgpu::Buffer, i: usize| match (&codes, f.act) {
            (Some(c), _) => Some(fixed(products.quantize(gpu, x, &c[i]))),
            (None, Some(a)) => {
                let (len, group) = inputs[i];
                Some(fixed(ops.act_quant(gpu, x, t * len, group, a.bits)))
            }
            (None, None) => None,
        };
        // A one-position float forward of int4 linears (W4A16) normalizes each linear's input
        // inside its GEMV (Input::RmsNormed): two launches fewer per layer.
        let fuse_norm = t == 1
            && f.act.is_none()
            && layers
                .iter()
                .flat_map(|l| l.all_linears())
                .all(|w| matches!(w, Linear::Int4(_)));
        // y (+)= W·(input `i`, as `x`): GEMVs for one position, GEMMs for several.
        let product = |w: &Linear, x: Input, i: usize, y: &wgpu::Buffer, add: bool| {
            let launch = match (&codes, w, t, x) {
                (Some(c), Linear::Int4(_), 1, _) => {
                    products.launch(gpu, w, Input::Codes(&c[i]), y, add, None)?
                }
                (Some(c), Linear::Int4(m), _, _) => products.gemm_w4a4(gpu, m, &c[i], y, add)?,
                (_, w, 1, x) => products.launch(gpu, w, x, y, add, None)?,
                (_, w, _, Input::F32(x)) => products.gemm(gpu, w, x, y, t, add),
                (_, _, _, _) => {
                    return Err(Error::other("prefill products take f32 input"));
                }
            };
            Ok(Launch::Product(launch))
        };
        // RMSNorm of the residual stream into the input of the next linears: inside their
        // GEMVs (no launch), with integer activations straight into their codes (one launch),
        // else into s.n, then the float path's fake quantization where the folder has one.
        let norm_input = |w: &wgpu::Buffer| -> Result<Vec<Launch>> {
            Ok(match &codes {
                _ if fuse_norm => Vec::new(),
                Some(c) => vec![fixed(products.norm_quantize(gpu, &s.h, w, eps, &c[0])?)],
                None => std::iter::once(fixed(ops.rms_norm(gpu, &s.h, w, &s.n, t, d, eps)))
                    .chain(quantize(&s.n, 0))
                    .collect(),
            })
        };
        for (layer, l) in layers.iter().enumerate() {
            plan.extend(norm_input(&l.attn_norm)?);
            let n = normed_input(fuse_norm, &s, &l.attn_norm, eps);
            let (nq_t, nkv_t) = (t * nq * hd, t * nkv * hd);
            let (q, k, v): (Bind, Bind, Bind) = match &l.qkv {
                Qkv::Fused { w, paired } => {
                    // One product; q, k and v are consecutive ranges of s.q.
                    let launch = match (t, &codes, w) {
                        (1, _, Linear::Int4(m)) if *paired => {
                            let rope = Rope {
                                cos: &s.cos,
                                sin: &s.sin,
                                rows: (nq + nkv) * hd,
                                head_dim: hd,
                            };
                            let x = match &codes {
                                Some(c) => Input::Codes(&c[0]),
                                None => n,
                            };
                            Launch::Product(products.launch_rope(gpu, m, x, &s.q, rope, None)?)
                        }
                        (1, _, _) => product(w, n, 0, &s.q, false)?,
                        (_, Some(c), _) => Launch::Product(products.gemm_stacked(
                            gpu,
                            w,
                            Input::Codes(&c[0]),
                            &s.q,
                            t,
                            [nq * hd, (nq + nkv) * hd],
                        )?),
                        (_, None, _) => Launch::Product(products.gemm_stacked(
                            gpu,
                            w,
                            Input::F32(&s.n),
                            &s.q,
                            t,
                            [nq * hd, (nq + nkv) * hd],
                        )?),
                    };
                    plan.push(launch);
                    (
                        Bind::f32_range(&s.q, 0, nq_t),
                        Bind::f32_range(&s.q, nq_t, nkv_t),
                        Bind::f32_range(&s.q, nq_t + nkv_t, nkv_t),
                    )
                }
                Qkv::Separate(w) => {
                    let [wq, wk, wv] = &**w;
                    plan.push(product(wq, n, 0, &s.q, false)?);
                    plan.push(product(wk, n, 0, &s.k, false)?);
                    plan.push(product(wv, n, 0, &s.v, false)?);
                    ((&s.q).into(), (&s.k).into(), (&s.v).into())
                }
            };
            // Where q and k are consecutive ranges of one buffer, per-head kernels take both
            // in one launch: RoPE for one position ([1, nq + nkv, hd]; for more, the token
            // index would need the parts' layout) and the Hadamard at any length (per row).
            // With q and k in RoPE pairs, decode's product has turned them already.
            let fused = matches!(l.qkv, Qkv::Fused { .. });
            let paired = matches!(l.qkv, Qkv::Fused { paired: true, .. });
            let shape = |tokens, heads| RopeShape {
                tokens,
                heads,
                head_dim: hd,
                paired,
            };
            if paired && t == 1 {
                // Turned in the product's epilogue.
            } else if fused && t == 1 {
                let qk = Bind::f32_range(&s.q, 0, nq_t + nkv_t);
                plan.push(fixed(ops.rope(gpu, qk, &s.cos, &s.sin, shape(1, nq + nkv))));
            } else {
                plan.push(fixed(ops.rope(gpu, q, &s.cos, &s.sin, shape(t, nq))));
                plan.push(fixed(ops.rope(gpu, k, &s.cos, &s.sin, shape(t, nkv))));
            }
            // With integer activations the attention also writes the o_proj input's codes.
            let a_codes = codes.as_ref().map(|c| &c[1]);
            // Decode with q, k and v in one buffer: the attention appends k and v to the
            // caches itself, and applies the Q/K Hadamard where q and k are in RoPE pairs.
            let fresh = match &qk_h {
                _ if !(fused && t == 1) => None,
                None => Some(false),
                Some(_) => (paired && hd.is_power_of_two()).then_some(true),
            };
            if let Some(hadamard) = fresh {
                let qkv = Bind::f32_range(&s.q, 0, nq_t + 2 * nkv_t);
                let f = Fresh {
                    k_off: nq_t,
                    v_off: nq_t + nkv_t,
                    hadamard,
                };
                let a = attn.attend_fresh(gpu, qkv, f, &l.k_cache, &l.v_cache, &s.a, a_codes)?;
                plan.push(Launch::Attend { a, layer });
            } else {
                let (q, k): (Bind, Bind) = match &qk_h {
                    Some(h) if fused => {
                        let qk = Bind::f32_range(&s.q, 0, nq_t + nkv_t);
                        let rows = t * (nq + nkv);
                        if paired {
                            plan.push(fixed(h.unpairing_dispatch(gpu, qk, &s.q_h, rows)?));
                        } else {
                            plan.extend(h.dispatches(gpu, qk, &s.q_h, rows).into_iter().map(fixed));
                        }
                        (
                            Bind::f32_range(&s.q_h, 0, nq_t),
                            Bind::f32_range(&s.q_h, nq_t, nkv_t),
                        )
                    }
                    Some(h) => {
                        let (q_rows, k_rows) = (t * nq, t * nkv);
                        plan.extend(h.dispatches(gpu, q, &s.q_h, q_rows).into_iter().map(fixed));
                        plan.extend(h.dispatches(gpu, k, &s.k_h, k_rows).into_iter().map(fixed));
                        ((&s.q_h).into(), (&s.k_h).into())
                    }
                    None => (q, k),
                };
                let d_kv = attn.append(gpu, k, v, &l.k_cache, &l.v_cache, t);
                let a = attn.attend(gpu, q, &l.k_cache, &l.v_cache, &s.a, a_codes, t)?;
                plan.push(Launch::Append { d: d_kv, layer });
                plan.push(Launch::Attend { a, layer });
            }
            if codes.is_none() {
                plan.extend(quantize(&s.a, 1));
            }
            plan.push(product(&l.o, Input::F32(&s.a), 1, &s.h, true)?);
            plan.extend(norm_input(&l.ffn_norm)?);
            let n = normed_input(fuse_norm, &s, &l.ffn_norm, eps);
            match (&l.gate_up, t) {
                (GateUp::Fused(Linear::Int4(w)), 1) => {
                    let x = match &codes {
                        Some(c) => Input::Codes(&c[0]),
                        None => n,
                    };
                    let d = products.launch_silu_mul(gpu, w, x, &s.m, None)?;
                    plan.push(Launch::Product(d));
                }
                (GateUp::Fused(w), _) => {
                    // [t, 2·dff] of (gate, up) pairs, then SiLU·mul over the pairs.
                    plan.push(product(w, n, 0, &s.gate, false)?);
                    plan.push(fixed(ops.silu_mul_pairs(gpu, &s.gate, &s.m, t * dff)));
                }
                (GateUp::Separate(wg, wu), _) => {
                    plan.push(product(wg, n, 0, &s.gate, false)?);
                    plan.push(product(wu, n, 0, &s.up, false)?);
                    plan.push(fixed(ops.silu_mul(gpu, &s.gate, &s.up, &s.m, t * dff)));
                }
            }
            // Rows narrow enough for one Hadamard launch get their codes from that launch.
            let mut quantized = false;
            let m = match &down_h {
                Some(h) => {
                    let c = codes.as_ref().map(|c| &c[2]);
                    match c.and_then(|c| h.whole_into_codes(gpu, &s.m, &s.m_h, t, c)) {
                        Some(d) => {
                            plan.push(fixed(d));
                            quantized = true;
                        }
                        None => {
                            let d = h.dispatches(gpu, &s.m, &s.m_h, t);
                            plan.extend(d.into_iter().map(fixed));
                        }
                    }
                    &s.m_h
                }
                None => &s.m,
            };
            if !quantized {
                plan.extend(quantize(m, 2));
            }
            plan.push(product(&l.down, Input::F32(m), 2, &s.h, true)?);
        }
        let last = if t > 1 { &s.last } else { &s.h };
        let tail = match lm_head {
            Linear::Int4(_) if fuse_norm => {
                let x = Input::RmsNormed {
                    h: last,
                    weight: norm,
                    eps,
                };
                let logits = products.launch(gpu, lm_head, x, &s.logits, false, None)?;
                vec![Launch::Product(logits)]
            }
            _ => vec![
                fixed(ops.rms_norm(gpu, last, norm, &s.n, 1, d, eps)),
                Launch::Product(products.dispatch(gpu, lm_head, &s.n, &s.logits)),
            ],
        };
        let sample = ops.sample(
            gpu,
            &SampleParams::new(c.vocab_size, Pick::Greedy),
            &s.logits,
            &s.token,
        );
        Ok(Plan {
            tokens: t,
            s,
            body: plan,
            tail,
            integer_activations: codes.is_some(),
            sample,
            score: None,
        })
    }

    /// Bytes of weights one decode step reads: every linear and the head.
    pub fn weight_bytes_per_token(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .flat_map(|l| l.all_linears())
            .map(Linear::bytes)
            .sum();
        linears + self.lm_head.bytes()
    }

    /// GPU memory allocated for the model: weights, caches, scratch of both plans.
    pub fn gpu_bytes(&self) -> usize {
        self.gpu.allocated_bytes()
    }

    /// Name of the adapter the model runs on.
    pub fn device_name(&self) -> &str {
        &self.gpu.info.name
    }

    /// Positions the cache holds.
    pub fn max_seq(&self) -> usize {
        self.attn.max_seq
    }

    /// Launches per decoded token (the sampler's excepted).
    pub fn decode_launches(&self) -> usize {
        self.decode.body.len() + self.decode.tail.len()
    }

    /// Where a token's time goes: seconds per token of replaying the decode plan's launches
    /// `reps` times in one command buffer — all of them, only the GEMVs, only the rest, and
    /// the rest kernel by kernel — and the number of launches (all, GEMVs). The replays repeat
    /// the last position; only for timing.
    pub fn breakdown(&self, reps: usize) -> Result<Breakdown> {
        let plan = &self.decode;
        let all: Vec<&Launch> = plan.body.iter().chain(&plan.tail).collect();
        let time = |keep: &dyn Fn(&Launch) -> bool| -> Result<f64> {
            let launches: Vec<&Dispatch> = all
                .iter()
                .filter(|l| keep(l))
                .map(|l| l.dispatch())
                .collect();
            let replay = |n: usize| {
                let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                for _ in 0..n {
                    record_all(&mut enc, launches.iter().copied());
                }
                self.gpu.finish_f32(enc, &plan.s.logits, 1)
            };
            replay(1)?;
            let t0 = std::time::Instant::now();
            replay(reps)?;
            Ok(t0.elapsed().as_secs_f64() / reps as f64)
        };
        let is_gemv = |l: &Launch| matches!(l, Launch::Product(_));
        let mut names: Vec<&'static str> = all
            .iter()
            .filter(|l| !is_gemv(l))
            .map(|l| l.dispatch().name)
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut kernels = names
            .into_iter()
            .map(|name| {
                let of = |l: &Launch| !is_gemv(l) && l.dispatch().name == name;
                let count = all.iter().filter(|l| of(l)).count();
                Ok((name, count, time(&of)?))
            })
            .collect::<Result<Vec<_>>>()?;
        kernels.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(Breakdown {
            all: time(&|_| true)?,
            gemv: time(&is_gemv)?,
            rest: time(&|l| !is_gemv(l))?,
            launches: all.len(),
            gemv_launches: all.iter().filter(|l| is_gemv(l)).count(),
            kernels,
        })
    }

    /// Run one token at the next position and return its logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.run(None, &[token], Out::Last)
    }

    /// Run `tokens` at the next positions (in chunks of many positions at once) and return the
    /// logits of the last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, Out::Last)
    }

    /// Run `tokens` as [`GpuModel::prefill`] does and return every position's logits,
    /// [tokens, vocab] (scoring a text: the head runs as one GEMM per chunk).
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, Out::All)
    }

    /// Run `tokens` as [`GpuModel::prefill`] does and pick the next token on the GPU: only the
    /// token is read back.
    pub fn next_token(&mut self, tokens: &[u32], pick: Pick) -> Result<u32> {
        let out = self.forward(tokens, Out::Pick(pick))?;
        Ok(out[0].to_bits())
    }

    /// All of `tokens` in chunks: each chunk through the largest plan it fills, the remainder
    /// through the smallest plan that holds it (the decode plan for single tokens); the last
    /// chunk returns `out` (with [`Out::All`] every chunk adds its positions).
    fn forward(&mut self, tokens: &[u32], out: Out) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::other("no tokens to run"));
        }
        let mut rest = tokens;
        let mut all = Vec::new();
        loop {
            let r = rest.len();
            let plan = if r == 1 {
                None
            } else {
                let fills = self.prefill.iter().rposition(|p| p.tokens <= r);
                let holds = self.prefill.iter().position(|p| p.tokens >= r);
                fills.or(holds)
            };
            let n = plan.map_or(1, |i| self.prefill[i].tokens.min(r));
            let (now, later) = rest.split_at(n);
            if let Out::All = out {
                all.extend(self.run(plan, now, out)?);
                if later.is_empty() {
                    return Ok(all);
                }
            } else if later.is_empty() {
                return self.run(plan, now, out);
            } else {
                self.run(plan, now, Out::Last)?;
            }
            rest = later;
        }
    }

    /// Build prefill plan `i`'s all-position head (once): the final norm over its rows, then
    /// the head as a GEMM into [tokens, vocab] logits.
    fn score_tail(&mut self, i: usize) {
        let c = &self.config;
        let plan = &mut self.prefill[i];
        if plan.score.is_some() {
            return;
        }
        let (gpu, (ops, products), t) = (&self.gpu, &self.kernels, plan.tokens);
        let logits = gpu.output("all logits", t * c.vocab_size);
        let d = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let launches = vec![
            ops.rms_norm(gpu, &plan.s.h, &self.norm, &plan.s.n, t, d, eps),
            products.gemm(gpu, &self.lm_head, &plan.s.n, &logits, t, false),
        ];
        plan.score = Some((launches, logits));
    }

    /// Point `plan`'s KV-cache launches at `t` positions from `pos` on (written before the next
    /// submission, so work already submitted keeps its positions).
    fn set_positions(&self, plan: &Plan, pos: usize, t: usize) {
        for launch in &plan.body {
            match launch {
                Launch::Fixed(_) | Launch::Product(_) => {}
                Launch::Append { d, layer } => {
                    let k = &self.layers[*layer].k_cache;
                    self.attn.set_append(&self.gpu, d, k, pos, t);
                }
                Launch::Attend { a, layer } => {
                    let k = &self.layers[*layer].k_cache;
                    self.attn.set_attend(&self.gpu, a, k, pos, t);
                }
            }
        }
    }

    /// Decode from `first`, the token after the positions held: each step runs a token, picks
    /// the next one on the GPU (`pick` gives each step's rule, in step order) and hands it to
    /// `on_token`, until that returns `false` or the cache is full. The next step's token never
    /// goes through the host: it is looked up on the GPU, so step k + 1 is recorded and submitted
    /// while step k runs, and the GPU does not wait for the host between tokens. A step
    /// submitted past a stop is dropped: afterwards the cache holds `first` and every token
    /// handed over but the last, as with [`GpuModel::next_token`] called step by step, and the
    /// tokens are the same.
    ///
    /// On a software device (lavapipe) no step is submitted ahead: its worker threads share the
    /// CPU with the host, and recording the next step beside a running one slowed SmolLM2
    /// decode from 232 to 260 ms per token on 2 cores (`bench`'s "streamed" line).
    pub fn stream(
        &mut self,
        first: u32,
        pick: &mut dyn FnMut() -> Pick,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        let software = matches!(self.gpu.info.device_type, wgpu::DeviceType::Cpu);
        self.stream_ahead(if software { 1 } else { 2 }, first, pick, on_token)
    }

    /// [`GpuModel::stream`] with up to `in_flight` steps submitted at once (1: none ahead).
    pub fn stream_ahead(
        &mut self,
        in_flight: usize,
        first: u32,
        pick: &mut dyn FnMut() -> Pick,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        assert!(
            (1..=2).contains(&in_flight),
            "one readback buffer per step in flight"
        );
        if first as usize >= self.config.vocab_size {
            return Err(Error::other(format!(
                "token {first} is outside the vocabulary"
            )));
        }
        self.prepare_streaming()?;
        let token = &self.decode.s.token;
        self.gpu
            .queue
            .write_buffer(token, 0, bytemuck::bytes_of(&first));
        let mut submitted = std::collections::VecDeque::new();
        let mut step = 0;
        loop {
            while submitted.len() < in_flight && self.len < self.attn.max_seq {
                let slot = step % 2;
                submitted.push_back((slot, self.submit_step(slot, pick())));
                step += 1;
            }
            let Some((slot, oldest)) = submitted.pop_front() else {
                return Ok(());
            };
            let next = self.read_token(slot, oldest)?;
            if next as usize >= self.config.vocab_size {
                // The sampler found no finite logit (a model whose numbers overflowed).
                return Err(Error::other(format!(
                    "{}: the sampler picked no token (are the logits NaN?)",
                    self.gpu.info.name
                )));
            }
            if !on_token(next) {
                for (_, submitted) in submitted {
                    self.wait(submitted)?;
                    self.len -= 1;
                }
                return Ok(());
            }
        }
    }

    /// Build what [`GpuModel::stream`] needs on the device, once; an error where it does not
    /// fit (the embedding table over the device's memory or largest binding).
    pub fn prepare_streaming(&mut self) -> Result<()> {
        if self.streaming.is_none() {
            self.streaming = Some(self.streaming_parts()?);
        }
        Ok(())
    }

    /// The embedding table, the RoPE tables and the readback buffers of [`GpuModel::stream`].
    fn streaming_parts(&self) -> Result<Streaming> {
        let (gpu, c) = (&self.gpu, &self.config);
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        // f16 where every value is one exactly (half the memory, the same rows), else f32.
        // Subnormal halves are left out: some drivers flush them to zero when unpacking.
        let exact = self.embed.iter().all(|&v| {
            let h = half::f16::from_f32(v);
            h.to_f32().to_bits() == v.to_bits() && (h.is_normal() || v == 0.0)
        });
        let words: Vec<u32> = if exact && d % 2 == 0 {
            self.embed
                .chunks_exact(2)
                .map(|p| {
                    let h = |v: f32| half::f16::from_f32(v).to_bits() as u32;
                    h(p[0]) | h(p[1]) << 16
                })
                .collect()
        } else {
            self.embed.iter().map(|v| v.to_bits()).collect()
        };
        let half = words.len() < self.embed.len();
        let limit = gpu.device.limits().max_storage_buffer_binding_size as usize;
        if words.len() * 4 > limit {
            return Err(Error::other(format!(
                "{}: the embedding table ({:.2} GB) is larger than the device's largest binding ({:.2} GB)",
                gpu.info.name,
                (words.len() * 4) as f64 / 1e9,
                limit as f64 / 1e9
            )));
        }
        let name = gpu.info.name.clone();
        super::checked(&gpu.device, &name, "preparing the decode loop", || {
            let table = gpu.storage("embedding table", &words);
            let kernel = super::kernel::Kernel::specialized(
                gpu,
                "embed_gather",
                include_str!("../../../shaders/embed_gather.wgsl"),
                "main",
                &[("HALF", half as u32 as f64)],
            );
            let params = [d as u32, vocab as u32, 0, 0];
            let gather = kernel.dispatch(
                gpu,
                &params,
                &[&self.decode.s.token, &table, &self.decode.s.h],
                (1, 1, 1),
            );
            // The same angles as a step computes on the host (f64, then f32).
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for p in 0..self.attn.max_seq {
                for f in &self.inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
            let readback = || {
                gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("token readback"),
                    size: 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            };
            Streaming {
                _table: table,
                gather,
                cos: gpu.storage("rope cos", &cos),
                sin: gpu.storage("rope sin", &sin),
                readback: [readback(), readback()],
            }
        })
    }

    /// Submit one step of [`GpuModel::stream`] at the next position: the token in the decode
    /// plan's token buffer is looked up, run, and the next one picked into the same buffer and
    /// copied to readback buffer `slot`.
    fn submit_step(&mut self, slot: usize, pick: Pick) -> wgpu::SubmissionIndex {
        let (pos, plan) = (self.len, &self.decode);
        let st = self.streaming.as_ref().expect("streaming parts built");
        self.set_positions(plan, pos, 1);
        plan.sample
            .set_params(&self.gpu, &SampleParams::new(self.config.vocab_size, pick));
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        let row = (self.inv_freq.len() * 4) as u64;
        enc.copy_buffer_to_buffer(&st.cos, pos as u64 * row, &plan.s.cos, 0, row);
        enc.copy_buffer_to_buffer(&st.sin, pos as u64 * row, &plan.s.sin, 0, row);
        let launches = std::iter::once(&st.gather)
            .chain(plan.body.iter().chain(&plan.tail).map(Launch::dispatch))
            .chain([&plan.sample]);
        record_all(&mut enc, launches);
        enc.copy_buffer_to_buffer(&plan.s.token, 0, &st.readback[slot], 0, 4);
        self.len += 1;
        self.gpu.queue.submit([enc.finish()])
    }

    /// Wait for `submitted` (and what was submitted before it).
    fn wait(&self, submitted: wgpu::SubmissionIndex) -> Result<()> {
        self.gpu
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submitted),
                timeout: None,
            })
            .map(drop)
            .map_err(|e| Error::other(format!("{}: {e}", self.gpu.info.name)))
    }

    /// The token that step `submitted` copied to readback buffer `slot`.
    fn read_token(&self, slot: usize, submitted: wgpu::SubmissionIndex) -> Result<u32> {
        let buf = &self
            .streaming
            .as_ref()
            .expect("streaming parts built")
            .readback[slot];
        let slice = buf.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait(submitted)?;
        let name = &self.gpu.info.name;
        rx.recv()
            .map_err(|e| Error::other(e.to_string()))?
            .map_err(|e| Error::other(format!("{name}: reading the token back: {e}")))?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::other(format!("{name}: mapping the token: {e}")))?;
        let token = bytemuck::pod_read_unaligned::<u32>(&view[..4]);
        drop(view);
        buf.unmap();
        Ok(token)
    }

    /// One forward over `tokens` at the next positions with the decode plan (`None`, one
    /// token) or prefill plan `plan`, returning `out`.
    fn run(&mut self, plan: Option<usize>, tokens: &[u32], out: Out) -> Result<Vec<f32>> {
        if let (Out::All, Some(i)) = (out, plan) {
            self.score_tail(i);
        }
        let c = &self.config;
        let (d, half) = (c.hidden_size, c.head_dim() / 2);
        let plan = plan.map_or(&self.decode, |i| &self.prefill[i]);
        let (pos, t) = (self.len, tokens.len());
        assert!(t >= 1 && t <= plan.tokens, "tokens fit the plan");
        if pos + t > self.attn.max_seq {
            return Err(Error::other(format!(
                "the context is full ({} positions)",
                self.attn.max_seq
            )));
        }
        let mut h = Vec::with_capacity(t * d);
        for &token in tokens {
            let i = token as usize;
            if i >= c.vocab_size {
                return Err(Error::other(format!(
                    "token {token} is outside the vocabulary"
                )));
            }
            h.extend_from_slice(&self.embed[i * d..(i + 1) * d]);
        }
        // Angles in f64: at far positions they reach thousands of radians.
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for p in pos..pos + t {
            for f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let (gpu, s) = (&self.gpu, &plan.s);
        gpu.queue.write_buffer(&s.h, 0, bytemuck::cast_slice(&h));
        gpu.queue
            .write_buffer(&s.cos, 0, bytemuck::cast_slice(&cos));
        gpu.queue
            .write_buffer(&s.sin, 0, bytemuck::cast_slice(&sin));
        self.set_positions(plan, pos, t);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        record_all(&mut enc, plan.body.iter().map(Launch::dispatch));
        if plan.tokens > 1 && !matches!(out, Out::All) {
            let row = (d * 4) as u64;
            enc.copy_buffer_to_buffer(&s.h, (t as u64 - 1) * row, &s.last, 0, row);
        }
        let tail = plan.tail.iter().map(Launch::dispatch);
        let result = match (out, &plan.score) {
            (Out::All, Some((launches, logits))) => {
                record_all(&mut enc, launches.iter());
                gpu.finish_f32(enc, logits, t * c.vocab_size)?
            }
            (Out::Last | Out::All, _) => {
                record_all(&mut enc, tail);
                gpu.finish_f32(enc, &s.logits, c.vocab_size)?
            }
            (Out::Pick(pick), _) => {
                plan.sample
                    .set_params(gpu, &SampleParams::new(c.vocab_size, pick));
                record_all(&mut enc, tail.chain([&plan.sample]));
                gpu.finish_f32(enc, &s.token, 1)?
            }
        };
        self.len += t;
        Ok(result)
    }
}

/// The input of the linears after the norm with weight `w`: the residual stream, normalized
/// inside their GEMVs where `fused`, else the norm's output s.n.
fn normed_input<'a>(fused: bool, s: &'a Scratch, w: &'a wgpu::Buffer, eps: f32) -> Input<'a> {
    if fused {
        Input::RmsNormed {
            h: &s.h,
            weight: w,
            eps,
        }
    } else {
        Input::F32(&s.n)
    }
}
