//! The training-time model (SPEC §2.5): frozen, norm-folded weights and the current transforms
//! as device tensors with gradients; every forward recomputes the fused weights of §2.3 from
//! them, so the loss is differentiable in R and S. The online Hadamards and the fake quantizers
//! (straight-through) are those of the deployed model.

use burn::tensor::{Device, Gradients, Tensor, TensorData};

use super::transforms::{LayerTransforms, Shapes, Transforms};
use crate::error::Result;
use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::model::llama::{ForwardOptions, Layer, Llama, upload_t};
use crate::quant::quantizer::{QuantSpec, fake_quant_weight_t};
use crate::transform::fuse::fold_norms;
use crate::transform::hadamard::RowHadamard;

/// Which transforms receive gradients (the others stay at their initial values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Trainable {
    pub rotations: bool,
    pub scales: bool,
}

/// One block's frozen weights, norms folded, transposed to [in, out].
struct Frozen {
    wq_t: Tensor<2>,
    wk_t: Tensor<2>,
    wv_t: Tensor<2>,
    wo_t: Tensor<2>,
    w_gate_t: Tensor<2>,
    w_up_t: Tensor<2>,
    w_down_t: Tensor<2>,
}

/// The transforms on the device; the trainable ones are autodiff leaves.
pub struct Params {
    r_res: Tensor<2>,
    layers: Vec<LayerParams>,
}

struct LayerParams {
    s_attn: Tensor<1>,
    s_ffn: Tensor<1>,
    /// [nkv·hd/2], tied per RoPE pair.
    s_qk: Tensor<1>,
    s_ov: Tensor<1>,
    /// [nkv, hd, hd]
    r_ov: Tensor<3>,
    s_ud: Tensor<1>,
}

fn leaf<const D: usize>(v: &[f64], shape: [usize; D], device: &Device, grad: bool) -> Tensor<D> {
    let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let t = Tensor::from_data(TensorData::new(data, shape), device);
    if grad { t.require_grad() } else { t }
}

fn host<const D: usize>(t: &Tensor<D>, grads: &Gradients, out: &mut Vec<f64>, n: usize) {
    match t.grad(grads) {
        Some(g) => out.extend(
            g.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 gradient")
                .into_iter()
                .map(|x| x as f64),
        ),
        None => out.extend(std::iter::repeat_n(0.0, n)),
    }
}

impl Params {
    /// Upload `t` to the autodiff `device`, as leaves where `trainable` says so.
    pub fn upload(t: &Transforms, device: &Device, trainable: Trainable) -> Self {
        let s = t.shapes;
        let (rot, sc) = (trainable.rotations, trainable.scales);
        Params {
            r_res: leaf(&t.r_res, [s.d, s.d], device, rot),
            layers: t
                .layers
                .iter()
                .map(|l| LayerParams {
                    s_attn: leaf(&l.s_attn, [s.d], device, sc),
                    s_ffn: leaf(&l.s_ffn, [s.d], device, sc),
                    s_qk: leaf(&l.s_qk, [s.nkv * s.hd / 2], device, sc),
                    s_ov: leaf(&l.s_ov, [s.nkv * s.hd], device, sc),
                    r_ov: leaf(&l.r_ov, [s.nkv, s.hd, s.hd], device, rot),
                    s_ud: leaf(&l.s_ud, [s.dff], device, sc),
                })
                .collect(),
        }
    }

    /// The Euclidean gradient of every value, flat in `Transforms::named` order (zeros for
    /// frozen transforms).
    pub fn gradients(&self, grads: &Gradients, like: &Transforms) -> Vec<f64> {
        let mut out = Vec::with_capacity(like.len());
        host(&self.r_res, grads, &mut out, like.r_res.len());
        for (p, l) in self.layers.iter().zip(&like.layers) {
            let LayerTransforms {
                s_attn,
                s_ffn,
                s_qk,
                s_ov,
                r_ov,
                s_ud,
            } = l;
            host(&p.s_attn, grads, &mut out, s_attn.len());
            host(&p.s_ffn, grads, &mut out, s_ffn.len());
            host(&p.s_qk, grads, &mut out, s_qk.len());
            host(&p.s_ov, grads, &mut out, s_ov.len());
            host(&p.r_ov, grads, &mut out, r_ov.len());
            host(&p.s_ud, grads, &mut out, s_ud.len());
        }
        out
    }
}

/// The student network.
pub struct Student {
    model: Llama,
    frozen: Vec<Frozen>,
    down_h: RowHadamard,
    shapes: Shapes,
    /// Fake quantizer of the fused weights (per output channel), when training with it.
    weight: Option<QuantSpec>,
}

impl Student {
    /// `w` are the original weights; `device` must have autodiff enabled. `online` holds the
    /// activation / KV quantizers and whether Q/K get the online Hadamard.
    pub fn new(
        w: &LlamaWeights,
        device: &Device,
        online: &ForwardOptions,
        weight: Option<QuantSpec>,
    ) -> Result<Self> {
        let mut folded = w.clone();
        fold_norms(&mut folded);
        let up = |t: &HostTensor| upload_t(t, device);
        let frozen = folded
            .layers
            .iter()
            .map(|l| Frozen {
                wq_t: up(&l.wq),
                wk_t: up(&l.wk),
                wv_t: up(&l.wv),
                wo_t: up(&l.wo),
                w_gate_t: up(&l.w_gate),
                w_up_t: up(&l.w_up),
                w_down_t: up(&l.w_down),
            })
            .collect();
        let mut model = Llama::new(&folded, device);
        model.set_options(ForwardOptions {
            down_hadamard: true,
            ..online.clone()
        })?;
        Ok(Student {
            model,
            frozen,
            down_h: RowHadamard::new(w.config.intermediate_size, device)?,
            shapes: Shapes::of(&w.config),
            weight,
        })
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// Logits [B, T, V] of the transformed (and fake-quantized) model.
    pub fn forward(&mut self, p: &Params, tokens: &[Vec<u32>]) -> Tensor<3> {
        for i in 0..self.frozen.len() {
            let layer = self.fused_layer(i, p);
            self.model.set_layer_tensors(i, layer);
        }
        let [b, t] = [tokens.len(), tokens[0].len()];
        let d = self.shapes.d;
        let x = self.model.embed(tokens).reshape([b * t, d]);
        let mut x = x.matmul(p.r_res.clone()).reshape([b, t, d]);
        for i in 0..self.frozen.len() {
            x = self.model.block(i, x, &mut |_, _, _| {});
        }
        let x = self.model.final_norm(x).reshape([b * t, d]);
        let x = x.matmul(p.r_res.clone().transpose()).reshape([b, t, d]);
        self.model.logits(x)
    }

    /// Every block's fused weights for `p` (for tests and inspection).
    pub fn fused_layers(&self, p: &Params) -> Vec<Layer> {
        (0..self.frozen.len())
            .map(|i| self.fused_layer(i, p))
            .collect()
    }

    /// Block `i`'s fused weights (SPEC §2.3 in transposed form, W' = Wᵀ [in, out]).
    fn fused_layer(&self, i: usize, p: &Params) -> Layer {
        let s = self.shapes;
        let (f, lp) = (&self.frozen[i], &p.layers[i]);
        let rt = p.r_res.clone().transpose();
        let col = |v: Tensor<1>| v.unsqueeze_dim::<2>(0); // [1, n]: scales output channels
        let row = |v: Tensor<1>| v.unsqueeze_dim::<2>(1); // [n, 1]: scales input channels
        // Readers of the attention norm: diag(s_attn)·Rᵀ·Wᵀ.
        let rt_a = rt.clone() * row(lp.s_attn.clone());
        let qk_kv = tie_pairs(lp.s_qk.clone(), s); // [nkv·hd]
        let qk_q = expand_heads(qk_kv.clone(), s); // [nq·hd]
        let ov_q = expand_heads(lp.s_ov.clone(), s);
        let wq = rt_a.clone().matmul(f.wq_t.clone()) / col(qk_q);
        let wk = rt_a.clone().matmul(f.wk_t.clone()) * col(qk_kv);
        let wv = rt_a.matmul(f.wv_t.clone()) / col(lp.s_ov.clone());
        let wv = rotate_value_columns(wv, lp.r_ov.clone(), s);
        let wo = rotate_output_rows(f.wo_t.clone() * row(ov_q), lp.r_ov.clone(), s)
            .matmul(p.r_res.clone());
        let rt_f = rt * row(lp.s_ffn.clone());
        let wg = rt_f.clone().matmul(f.w_gate_t.clone());
        let wu = rt_f.matmul(f.w_up_t.clone()) / col(lp.s_ud.clone());
        // H·diag(s_ud)·W_downᵀ·R: the rows of (diag(s_ud)·W_downᵀ)ᵀ mapped by H.
        let scaled = (f.w_down_t.clone() * row(lp.s_ud.clone())).transpose();
        let wd = self
            .down_h
            .apply(scaled)
            .transpose()
            .matmul(p.r_res.clone());
        let q = |w: Tensor<2>| match &self.weight {
            Some(spec) => fake_quant_weight_t(w, spec),
            None => w,
        };
        Layer {
            attn_norm: lp.s_attn.clone().recip(),
            wq_t: q(wq),
            wk_t: q(wk),
            wv_t: q(wv),
            wo_t: q(wo),
            ffn_norm: lp.s_ffn.clone().recip(),
            w_gate_t: q(wg),
            w_up_t: q(wu),
            w_down_t: q(wd),
        }
    }
}

/// [nkv·hd/2] → [nkv·hd]: each head's values on dims i and i + hd/2.
fn tie_pairs(s_qk: Tensor<1>, s: Shapes) -> Tensor<1> {
    let half = s_qk.reshape([s.nkv, s.hd / 2]);
    Tensor::cat(vec![half.clone(), half], 1).reshape([s.nkv * s.hd])
}

/// [nkv·hd] → [nq·hd] in repeat_kv order (query head j uses KV head j / group).
fn expand_heads(v: Tensor<1>, s: Shapes) -> Tensor<1> {
    v.reshape([s.nkv, 1, s.hd])
        .repeat_dim(1, s.group())
        .reshape([s.nq * s.hd])
}

/// W_vᵀ [d, nkv·hd]: the columns of KV head h ← columns·R_h.
fn rotate_value_columns(w: Tensor<2>, r_ov: Tensor<3>, s: Shapes) -> Tensor<2> {
    let d = w.dims()[0];
    w.reshape([d, s.nkv, s.hd])
        .swap_dims(0, 1)
        .matmul(r_ov)
        .swap_dims(0, 1)
        .reshape([d, s.nkv * s.hd])
}

/// W_oᵀ [nq·hd, d]: the rows of query head j ← R_{j/group}ᵀ·rows.
fn rotate_output_rows(w: Tensor<2>, r_ov: Tensor<3>, s: Shapes) -> Tensor<2> {
    let (g, hd, d) = (s.group(), s.hd, w.dims()[1]);
    let blocks = w
        .reshape([s.nkv, g, hd, d])
        .swap_dims(1, 2)
        .reshape([s.nkv, hd, g * d]);
    r_ov.swap_dims(1, 2)
        .matmul(blocks)
        .reshape([s.nkv, hd, g, d])
        .swap_dims(1, 2)
        .reshape([s.nq * hd, d])
}
