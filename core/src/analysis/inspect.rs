//! Per-layer quantizability of a (possibly transformed) model: QSUR, eigenvalue spectrum and
//! per-channel max |x| of every quantized linear input (from calibration text) and of every
//! linear weight (its rows, which share one quantization range each).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::qsur::{Moments, Qsur, qsur_of};
use crate::error::{Error, Result};
use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::model::llama::{Llama, Site};

/// The tensors an inspection measures per layer, in display order: the four quantized inputs,
/// then the seven weights.
pub const TENSOR_NAMES: [&str; 11] = [
    "qkv_in",
    "o_in",
    "upgate_in",
    "down_in",
    "q",
    "k",
    "v",
    "o",
    "gate",
    "up",
    "down",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorStats {
    pub layer: usize,
    /// `qkv_in`, `o_in`, `upgate_in`, `down_in` for activations; `q`, `k`, `v`, `o`, `gate`,
    /// `up`, `down` for weights.
    pub name: String,
    pub is_weight: bool,
    pub dim: usize,
    pub samples: usize,
    /// `None` when there are no more samples than dimensions: the covariance is singular and
    /// the Gaussian volume is zero (e.g. the 192 rows of a 576-wide k_proj).
    pub qsur: Option<Qsur>,
    /// Covariance eigenvalues, decreasing.
    pub eigenvalues: Vec<f64>,
    pub max_abs: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspection {
    pub method: String,
    pub tokens: usize,
    pub stats: Vec<TensorStats>,
}

impl Inspection {
    pub fn get(&self, layer: usize, name: &str) -> Option<&TensorStats> {
        self.stats
            .iter()
            .find(|s| s.layer == layer && s.name == name)
    }

    /// Mean per-dimension QSUR ratio of each tensor name over the layers.
    pub fn mean_by_name(&self) -> BTreeMap<String, f64> {
        let mut acc: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for s in &self.stats {
            if let Some(q) = s.qsur {
                let e = acc.entry(s.name.clone()).or_default();
                e.0 += q.rel;
                e.1 += 1;
            }
        }
        acc.into_iter()
            .map(|(k, (sum, n))| (k, sum / n as f64))
            .collect()
    }
}

fn download(t: Tensor<2>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::other(format!("reading statistics: {e:?}")))
}

/// Run `windows` through `model` (already set up with the method's transforms and online
/// Hadamards, quantizers off) and measure every quantized input, and the weights `w`.
/// Progress counts the windows, then each layer's inputs and each layer's weights (their
/// eigendecompositions); `cancel` stops it between any two with `Error::Cancelled`.
pub fn inspect(
    model: &Llama,
    w: &LlamaWeights,
    method: &str,
    windows: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<Inspection> {
    let n_layers = w.layers.len();
    let mut moments: BTreeMap<(usize, Site), Moments> = BTreeMap::new();
    let mut err: Option<Error> = None;
    let steps = windows.len() + 2 * n_layers;
    let check = || match cancel.load(Ordering::Relaxed) {
        true => Err(Error::Cancelled),
        false => Ok(()),
    };
    let mut tokens = 0;
    for (i, win) in windows.iter().enumerate() {
        check()?;
        let mut cache = model.new_cache();
        let mut tap = |layer: usize, site: Site, x: Tensor<2>| {
            if err.is_some() {
                return;
            }
            let [n, d] = x.dims();
            // Sums, Gram matrix and max |x| on the device; only d² numbers come back.
            let sum = x.clone().sum_dim(0);
            let gram = x.clone().transpose().matmul(x.clone());
            let max = x.abs().max_dim(0);
            match (download(sum), download(gram), download(max)) {
                (Ok(s), Ok(g), Ok(m)) => moments
                    .entry((layer, site))
                    .or_insert_with(|| Moments::new(d))
                    .add_summary(n, &s, &g, &m),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => err = Some(e),
            }
        };
        let _ = model.forward_tapped(std::slice::from_ref(win), &mut cache, &mut tap);
        tokens += win.len();
        progress(i + 1, steps);
    }
    if let Some(e) = err {
        return Err(e);
    }
    let mut stats = Vec::new();
    for ((layer, site), m) in &moments {
        check()?;
        stats.push(stats_of(*layer, site.name(), false, m)?);
        progress(windows.len() + layer + 1, steps);
    }
    for (i, l) in w.layers.iter().enumerate() {
        check()?;
        let weights: [(&str, &HostTensor); 7] = [
            ("q", &l.wq),
            ("k", &l.wk),
            ("v", &l.wv),
            ("o", &l.wo),
            ("gate", &l.w_gate),
            ("up", &l.w_up),
            ("down", &l.w_down),
        ];
        for (name, t) in weights {
            let mut m = Moments::new(t.shape[1]);
            m.add_rows(&t.data);
            stats.push(stats_of(i, name, true, &m)?);
        }
        progress(windows.len() + n_layers + i + 1, steps);
    }
    stats.sort_by(|a, b| (a.layer, a.is_weight, &a.name).cmp(&(b.layer, b.is_weight, &b.name)));
    Ok(Inspection {
        method: method.to_string(),
        tokens,
        stats,
    })
}

fn stats_of(layer: usize, name: &str, is_weight: bool, m: &Moments) -> Result<TensorStats> {
    let (qsur, eigenvalues) = qsur_of(m)?;
    let qsur = (m.n > m.d).then_some(qsur);
    Ok(TensorStats {
        layer,
        name: name.to_string(),
        is_weight,
        dim: m.d,
        samples: m.n,
        qsur,
        eigenvalues,
        max_abs: m.max_abs.clone(),
    })
}
