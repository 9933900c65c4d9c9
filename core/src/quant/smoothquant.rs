//! SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with a
//! per-channel scale s_j = max|X_j|^α / max|W_j|^(1−α), dividing the RMSNorm weight by s and
//! multiplying the following linear layers' input columns by s. The model's function is
//! unchanged; the activations of q/k/v and up/gate get flatter channels. α balances how much
//! difficulty moves into the weights.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::model::llama::{Llama, Site};

/// The migration strength of the SmoothQuant paper's default.
pub const ALPHA: f64 = 0.5;

/// Per-channel max |x| of the two norm-fed inputs of one block.
#[derive(Debug, Clone)]
pub struct ChannelMax {
    pub qkv_in: Vec<f32>,
    pub upgate_in: Vec<f32>,
}

/// Per-channel max |x| at every block's q/k/v and up/gate inputs over `windows`.
pub fn calibrate(model: &Llama, windows: &[Vec<u32>]) -> Result<Vec<ChannelMax>> {
    let d = model.config.hidden_size;
    let mut maxes = vec![
        ChannelMax {
            qkv_in: vec![0.0; d],
            upgate_in: vec![0.0; d],
        };
        model.config.num_hidden_layers
    ];
    let mut failed = None;
    for w in windows {
        let mut cache = model.new_cache();
        model.forward_tapped(std::slice::from_ref(w), &mut cache, &mut |l, site, x| {
            let target = match site {
                Site::QkvIn => &mut maxes[l].qkv_in,
                Site::UpGateIn => &mut maxes[l].upgate_in,
                _ => return,
            };
            match column_abs_max(x) {
                Ok(m) => {
                    for (t, v) in target.iter_mut().zip(m) {
                        *t = t.max(v);
                    }
                }
                Err(e) => failed = Some(e),
            }
        });
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if maxes
        .iter()
        .any(|m| m.qkv_in.iter().chain(&m.upgate_in).any(|v| !v.is_finite()))
    {
        return Err(Error::other(
            "SmoothQuant: the calibration activations contain NaN or infinity",
        ));
    }
    Ok(maxes)
}

fn column_abs_max(x: Tensor<2>) -> Result<Vec<f32>> {
    x.abs()
        .max_dim(0)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::other(format!("reading activation maxima: {e:?}")))
}

/// Smoothing scales of one norm → linears group: s_j = max|X_j|^α / max_k |W_kj|^(1−α).
pub fn scales(act_max: &[f32], weights: &[&HostTensor], alpha: f64) -> Vec<f64> {
    let n = act_max.len();
    let mut w_max = vec![0f64; n];
    for w in weights {
        for row in w.data.chunks_exact(n) {
            for (m, &v) in w_max.iter_mut().zip(row) {
                *m = m.max(v.abs() as f64);
            }
        }
    }
    act_max
        .iter()
        .zip(w_max)
        .map(|(&a, w)| {
            let s = (a as f64).max(1e-5).powf(alpha) / w.max(1e-5).powf(1.0 - alpha);
            s.max(1e-5)
        })
        .collect()
}

/// Divide `norm` by `s` and multiply the input columns of `weights` by `s`.
fn migrate(norm: &mut HostTensor, weights: &mut [&mut HostTensor], s: &[f64]) {
    for (g, &sj) in norm.data.iter_mut().zip(s) {
        *g = (*g as f64 / sj) as f32;
    }
    for w in weights {
        let n = w.shape[1];
        for row in w.data.chunks_exact_mut(n) {
            for (x, &sj) in row.iter_mut().zip(s) {
                *x = (*x as f64 * sj) as f32;
            }
        }
    }
}

/// Apply SmoothQuant to every block, with activation maxima from [`calibrate`].
pub fn smooth(w: &mut LlamaWeights, maxes: &[ChannelMax], alpha: f64) {
    for (l, m) in w.layers.iter_mut().zip(maxes) {
        let s = scales(&m.qkv_in, &[&l.wq, &l.wk, &l.wv], alpha);
        migrate(&mut l.attn_norm, &mut [&mut l.wq, &mut l.wk, &mut l.wv], &s);
        let s = scales(&m.upgate_in, &[&l.w_gate, &l.w_up], alpha);
        migrate(&mut l.ffn_norm, &mut [&mut l.w_gate, &mut l.w_up], &s);
    }
}
