//! The LLaMA forward pass on burn: batched prefill and KV-cache decode, on any burn device.
//!
//! Shapes: B batch, T new tokens, S cached + new positions, d hidden, hd head dim, nq query
//! heads, nkv key/value heads (GQA: each KV head serves nq/nkv query heads).

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::checkpoint::{HostTensor, LayerWeights, LlamaWeights};
use super::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::quant::quantizer::{QuantSpec, fake_quant_tensor};
use crate::transform::hadamard::{Hadamard, RowHadamard, transpose};

/// What the forward does beyond the full-precision model: online Hadamards (which the weights
/// must have been fused for) and dynamic fake quantization of activations and the KV cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardOptions {
    /// x ← x·Hᵀ on the down_proj input (pairs with `fuse_down_hadamard`).
    pub down_hadamard: bool,
    /// Q and K ← ·Hᵀ per head after RoPE (QKᵀ is unchanged; K quantizes better).
    pub qk_hadamard: bool,
    /// Per-token quantizer of every linear layer's input (o_proj's grouped by the head dim).
    pub act: Option<QuantSpec>,
    /// Inputs that `act` leaves in full precision (none in a deployed model; error attribution
    /// switches sites off one at a time).
    pub act_skip: Vec<Site>,
    /// Per-token, per-head quantizer of the K and V cache.
    pub kv: Option<QuantSpec>,
}

/// The inputs of quantized linear layers, where activations are observed and quantized.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Site {
    /// Input of q_proj, k_proj and v_proj (the attention norm's output).
    QkvIn,
    /// Input of o_proj (the heads' outputs).
    OIn,
    /// Input of gate_proj and up_proj.
    UpGateIn,
    /// Input of down_proj (after the online Hadamard, when on).
    DownIn,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::QkvIn, Site::OIn, Site::UpGateIn, Site::DownIn];
    pub fn name(self) -> &'static str {
        match self {
            Site::QkvIn => "qkv_in",
            Site::OIn => "o_in",
            Site::UpGateIn => "upgate_in",
            Site::DownIn => "down_in",
        }
    }
}

/// Receives (layer, site, activations [tokens, features]) before they are quantized.
pub type Tap<'a> = dyn FnMut(usize, Site, Tensor<2>) + 'a;

/// Device-side state of the options: the dense Hᵀ matrices.
struct Online {
    opts: ForwardOptions,
    down_h: Option<RowHadamard>,
    qk_ht: Option<Tensor<2>>,
}

fn dense_ht(n: usize, device: &Device) -> Result<Tensor<2>> {
    let h = Hadamard::new(n)?;
    let ht: Vec<f32> = transpose(&h.matrix(), n)
        .iter()
        .map(|&v| v as f32)
        .collect();
    Ok(Tensor::from_data(TensorData::new(ht, [n, n]), device))
}

/// Upload a host tensor of rank `D`.
pub fn upload<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

/// Upload a linear weight [out, in] transposed to [in, out], so the forward is `x · Wᵀ = x.matmul(w_t)`.
pub fn upload_t(t: &HostTensor, device: &Device) -> Tensor<2> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut data = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            data[c * rows + r] = t.data[r * cols + c];
        }
    }
    Tensor::from_data(TensorData::new(data, [cols, rows]), device)
}

/// RoPE tables and the causal mask of the positions one forward call covers.
struct Positions {
    cos: Tensor<4>,
    sin: Tensor<4>,
    mask: Option<Tensor<4>>,
}

/// One block's weights on the device, linear weights transposed to [in, out]. Calibration
/// builds these from learned transforms every step (see `calib::student`).
#[derive(Clone)]
pub struct Layer {
    pub attn_norm: Tensor<1>,
    pub wq_t: Tensor<2>,
    pub wk_t: Tensor<2>,
    pub wv_t: Tensor<2>,
    pub wo_t: Tensor<2>,
    pub ffn_norm: Tensor<1>,
    pub w_gate_t: Tensor<2>,
    pub w_up_t: Tensor<2>,
    pub w_down_t: Tensor<2>,
}

impl Layer {
    pub fn upload(l: &LayerWeights, device: &Device) -> Self {
        Layer {
            attn_norm: upload(&l.attn_norm, device),
            wq_t: upload_t(&l.wq, device),
            wk_t: upload_t(&l.wk, device),
            wv_t: upload_t(&l.wv, device),
            wo_t: upload_t(&l.wo, device),
            ffn_norm: upload(&l.ffn_norm, device),
            w_gate_t: upload_t(&l.w_gate, device),
            w_up_t: upload_t(&l.w_up, device),
            w_down_t: upload_t(&l.w_down, device),
        }
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    device: Device,
    embed: Tensor<2>,
    layers: Vec<Layer>,
    norm: Tensor<1>,
    lm_head_t: Tensor<2>,
    inv_freq: Vec<f64>,
    online: Online,
}

/// Keys and values of every layer for the positions seen so far, [B, nkv, S, hd] each.
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            len: 0,
        }
    }
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// This one-row cache repeated for `b` rows, so that several continuations share one
    /// computed prefix.
    pub fn repeat_batch(&self, b: usize) -> KvCache {
        let rep = |x: &Tensor<4>| x.clone().repeat_dim(0, b);
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (rep(k), rep(v))))
                .collect(),
            len: self.len,
        }
    }
}

impl Llama {
    pub fn new(w: &LlamaWeights, device: &Device) -> Self {
        let layers = w.layers.iter().map(|l| Layer::upload(l, device)).collect();
        Llama {
            config: w.config.clone(),
            device: device.clone(),
            embed: upload(&w.embed, device),
            layers,
            norm: upload(&w.norm, device),
            lm_head_t: upload_t(w.lm_head.as_ref().unwrap_or(&w.embed), device),
            inv_freq: w.config.rope_inv_freq(),
            online: Online {
                opts: ForwardOptions::default(),
                down_h: None,
                qk_ht: None,
            },
        }
    }

    /// Switch online Hadamards and activation / KV fake quantization on or off.
    pub fn set_options(&mut self, opts: ForwardOptions) -> Result<()> {
        let c = &self.config;
        // Activation groups split every quantized input: the hidden and FFN widths.
        if let Some(g) = opts.act.and_then(|a| a.group)
            && (g == 0
                || !c.hidden_size.is_multiple_of(g)
                || !c.intermediate_size.is_multiple_of(g))
        {
            return Err(Error::other(format!(
                "activation groups of {g} do not divide the widths {} and {}",
                c.hidden_size, c.intermediate_size
            )));
        }
        self.online.down_h = if opts.down_hadamard {
            Some(RowHadamard::new(c.intermediate_size, &self.device)?)
        } else {
            None
        };
        self.online.qk_ht = if opts.qk_hadamard {
            Some(dense_ht(c.head_dim(), &self.device)?)
        } else {
            None
        };
        self.online.opts = opts;
        Ok(())
    }

    pub fn options(&self) -> &ForwardOptions {
        &self.online.opts
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Logits [B, T, V] for `tokens` (B rows of T ids) following what `cache` holds.
    pub fn forward(&self, tokens: &[Vec<u32>], cache: &mut KvCache) -> Tensor<3> {
        let h = self.forward_hidden(tokens, cache);
        self.logits(h)
    }

    /// Final-norm hidden states [B, T, d]; [`logits`](Self::logits) maps them to the vocabulary.
    /// Kept apart so callers that need few positions' logits skip the large output matmul.
    pub fn forward_hidden(&self, tokens: &[Vec<u32>], cache: &mut KvCache) -> Tensor<3> {
        self.forward_tapped(tokens, cache, &mut |_, _, _| {})
    }

    /// [`forward_hidden`](Self::forward_hidden) that also shows every quantized layer input
    /// to `tap`.
    pub fn forward_tapped(
        &self,
        tokens: &[Vec<u32>],
        cache: &mut KvCache,
        tap: &mut Tap,
    ) -> Tensor<3> {
        let t = tokens[0].len();
        let mut x = self.embed(tokens);
        let start = cache.len;
        let pos = self.positions(start, t);
        for (i, kv) in cache.layers.iter_mut().enumerate() {
            x = self.run_block(i, x, kv, &pos, tap, None);
        }
        cache.len += t;
        self.final_norm(x)
    }

    /// Token embeddings [B, T, d] (every row of `tokens` must have the same length).
    pub fn embed(&self, tokens: &[Vec<u32>]) -> Tensor<3> {
        let (b, t) = (tokens.len(), tokens[0].len());
        assert!(
            tokens.iter().all(|r| r.len() == t),
            "batch rows must have equal length"
        );
        let ids: Vec<i64> = tokens.iter().flatten().map(|&i| i as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [b * t]), &self.device);
        self.embed
            .clone()
            .select(0, ids)
            .reshape([b, t, self.config.hidden_size])
    }

    /// Decoder block `i` alone on residual states [B, T, d] at positions 0..T, without a
    /// cache: layer-wise calibration (GPTQ) runs the model one block at a time.
    pub fn block(&self, i: usize, x: Tensor<3>, tap: &mut Tap) -> Tensor<3> {
        let t = x.dims()[1];
        let pos = self.positions(0, t);
        self.run_block(i, x, &mut None, &pos, tap, None)
    }

    /// The input of `site` in block `i` (as [`block`](Self::block) shows it to its tap, before
    /// any activation quantization), computing only what comes before it: layer-wise GPTQ
    /// needs one site's inputs at a time.
    pub fn site_input(&self, i: usize, x: Tensor<3>, site: Site) -> Tensor<3> {
        let t = x.dims()[1];
        let pos = self.positions(0, t);
        self.run_block(i, x, &mut None, &pos, &mut |_, _, _| {}, Some(site))
    }

    /// Replace block `i`'s weights (after quantizing them, say).
    pub fn set_layer(&mut self, i: usize, w: &LayerWeights) {
        self.layers[i] = Layer::upload(w, &self.device);
    }

    /// Replace block `i`'s device weights.
    pub fn set_layer_tensors(&mut self, i: usize, layer: Layer) {
        self.layers[i] = layer;
    }

    /// The final norm of residual states [B, T, d].
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    fn positions(&self, start: usize, t: usize) -> Positions {
        let (cos, sin) = self.rope_tables(start, t);
        Positions {
            cos,
            sin,
            mask: (t > 1).then(|| causal_mask(t, start, &self.device)),
        }
    }

    /// Decoder block `i` on residual states [B, T, d]; with `until`, it stops at that site and
    /// returns the site's input instead.
    fn run_block(
        &self,
        i: usize,
        x: Tensor<3>,
        kv: &mut Option<(Tensor<4>, Tensor<4>)>,
        pos: &Positions,
        tap: &mut Tap,
        until: Option<Site>,
    ) -> Tensor<3> {
        let (layer, eps) = (&self.layers[i], self.config.rms_norm_eps);
        let mut tap = |site: Site, x: &Tensor<3>| {
            let [b, t, n] = x.dims();
            tap(i, site, x.clone().reshape([b * t, n]));
        };
        let h = rms_norm(x.clone(), &layer.attn_norm, eps);
        if until == Some(Site::QkvIn) {
            return h;
        }
        tap(Site::QkvIn, &h);
        let heads = self.attention_heads(layer, h, kv, pos);
        if until == Some(Site::OIn) {
            return heads;
        }
        tap(Site::OIn, &heads);
        let hd = self.config.head_dim();
        let x = x + linear(self.quant_act(Site::OIn, heads, Some(hd)), &layer.wo_t);
        let h = rms_norm(x.clone(), &layer.ffn_norm, eps);
        if until == Some(Site::UpGateIn) {
            return h;
        }
        tap(Site::UpGateIn, &h);
        let m = self.mlp_hidden(layer, h);
        if until == Some(Site::DownIn) {
            return m;
        }
        tap(Site::DownIn, &m);
        x + linear(self.quant_act(Site::DownIn, m, None), &layer.w_down_t)
    }

    /// Vocabulary logits [B, T, V] of hidden states [B, T, d].
    pub fn logits(&self, h: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = h.dims();
        h.reshape([b * t, d])
            .matmul(self.lm_head_t.clone())
            .reshape([b, t, self.config.vocab_size])
    }

    /// The attention heads' outputs [B, T, nq·hd] of normed states `x`: the input of o_proj.
    fn attention_heads(
        &self,
        l: &Layer,
        x: Tensor<3>,
        kv: &mut Option<(Tensor<4>, Tensor<4>)>,
        pos: &Positions,
    ) -> Tensor<3> {
        let c = &self.config;
        let [b, t, _] = x.dims();
        let (hd, nq, nkv) = (c.head_dim(), c.num_attention_heads, c.n_kv_heads());
        let x = self.quant_act(Site::QkvIn, x, None);
        let heads =
            |w: &Tensor<2>, n: usize| linear(x.clone(), w).reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = self.qk_rotate(rope(heads(&l.wq_t, nq), &pos.cos, &pos.sin));
        let k = self.quant_kv(self.qk_rotate(rope(heads(&l.wk_t, nkv), &pos.cos, &pos.sin)));
        let v = self.quant_kv(heads(&l.wv_t, nkv));
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let s = k.dims()[2];
        let g = nq / nkv;
        let expand = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .repeat_dim(2, g)
                .reshape([b, nq, s, hd])
        };
        let (k, v) = (expand(k), expand(v));
        let mut scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt());
        if let Some(m) = &pos.mask {
            scores = scores + m.clone();
        }
        let out = softmax(scores, 3).matmul(v); // [B, nq, T, hd]
        out.swap_dims(1, 2).reshape([b, t, nq * hd])
    }

    /// gate·up of normed states `x` [B, T, d] (Hadamard-rotated when the online down_proj
    /// Hadamard is on): the input of down_proj.
    fn mlp_hidden(&self, l: &Layer, x: Tensor<3>) -> Tensor<3> {
        let x = self.quant_act(Site::UpGateIn, x, None);
        let gate = silu(linear(x.clone(), &l.w_gate_t));
        let mut h = gate * linear(x, &l.w_up_t);
        if let Some(had) = &self.online.down_h {
            let [b, t, n] = h.dims();
            h = had.apply(h.reshape([b * t, n])).reshape([b, t, n]);
        }
        h
    }

    /// Per-token fake quantization of a linear layer's input [B, T, n] at `site` (groups of
    /// `group` when given, else the configured group or the whole token).
    fn quant_act(&self, site: Site, x: Tensor<3>, group: Option<usize>) -> Tensor<3> {
        let opts = &self.online.opts;
        let Some(spec) = opts.act.filter(|_| !opts.act_skip.contains(&site)) else {
            return x;
        };
        let spec = match group {
            Some(g) => spec.with_group(g),
            None => spec,
        };
        let [b, t, n] = x.dims();
        fake_quant_tensor(x.reshape([b * t, n]), &spec).reshape([b, t, n])
    }

    /// Per-token, per-head fake quantization of new K or V entries [B, h, T, hd].
    fn quant_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let Some(spec) = self.online.opts.kv else {
            return x;
        };
        let [b, h, t, hd] = x.dims();
        fake_quant_tensor(x.reshape([b * h * t, hd]), &spec.with_group(hd)).reshape([b, h, t, hd])
    }

    fn qk_rotate(&self, x: Tensor<4>) -> Tensor<4> {
        let Some(ht) = &self.online.qk_ht else {
            return x;
        };
        let [b, h, t, hd] = x.dims();
        x.reshape([b * h * t, hd])
            .matmul(ht.clone())
            .reshape([b, h, t, hd])
    }

    /// cos and sin [1, 1, T, hd] for positions start..start+T, in Hugging Face's half-split
    /// layout (frequency i at dims i and i + hd/2). Computed in f64 on the host.
    fn rope_tables(&self, start: usize, t: usize) -> (Tensor<4>, Tensor<4>) {
        let hd = self.config.head_dim();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for p in start..start + t {
            for _half in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let up = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [1, 1, t, hd]), &self.device);
        (up(cos), up(sin))
    }
}

fn linear(x: Tensor<3>, w_t: &Tensor<2>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let out = w_t.dims()[1];
    x.reshape([b * t, d])
        .matmul(w_t.clone())
        .reshape([b, t, out])
}

fn rms_norm(x: Tensor<3>, w: &Tensor<1>, eps: f64) -> Tensor<3> {
    let ms = x.clone().powi_scalar(2).mean_dim(2);
    x * ms.add_scalar(eps).sqrt().recip() * w.clone().unsqueeze::<3>()
}

/// x·cos + rotate_half(x)·sin, with rotate_half([x1, x2]) = [-x2, x1] over the head dim.
fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, hd / 2);
    let x2 = x.clone().narrow(3, hd / 2, hd / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Additive mask [1, 1, T, S]: query i (absolute position start + i) sees keys 0..=start + i.
fn causal_mask(t: usize, start: usize, device: &Device) -> Tensor<4> {
    let s = start + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= start + i { 0.0 } else { -1e9 }))
        .collect();
    Tensor::from_data(TensorData::new(data, [1, 1, t, s]), device)
}
