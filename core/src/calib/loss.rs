//! Calibration losses (SPEC §5.5) between the full-precision teacher's logits and the
//! student's, over every position of the batch.

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

/// The loss the transforms are trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Σ over the teacher's top-k tokens of p·(log p − log q), full-vocabulary softmaxes, no
    /// renormalisation (OSTQuant's loss; k = 1000 in the paper).
    KlTop(usize),
    /// Full-vocabulary KL(p‖q).
    Kl,
    /// Next-token cross-entropy on the text itself (the paper's "CE"; SpinQuant's loss).
    Ce,
    /// Mean squared error between the logits.
    Mse,
}

impl Loss {
    pub fn name(&self) -> String {
        match self {
            Loss::KlTop(k) => format!("kl-top{k}"),
            Loss::Kl => "kl".into(),
            Loss::Ce => "ce".into(),
            Loss::Mse => "mse".into(),
        }
    }

    /// `kl-top` (k = 1000), `kl-top:K`, `kl`, `ce` or `mse`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "kl-top" => Ok(Loss::KlTop(1000)),
            "kl" => Ok(Loss::Kl),
            "ce" => Ok(Loss::Ce),
            "mse" => Ok(Loss::Mse),
            _ => s
                .strip_prefix("kl-top:")
                .and_then(|k| k.parse().ok())
                .filter(|&k: &usize| k > 0)
                .map(Loss::KlTop)
                .ok_or_else(|| {
                    format!("unknown loss '{s}' (expected kl-top, kl-top:K, kl, ce or mse)")
                }),
        }
    }

    /// The loss (a one-element tensor) of student logits `z_q` against teacher logits `z_fp`,
    /// both [B, T, V], for the token rows `tokens` (used by CE only).
    pub fn compute(&self, z_fp: Tensor<3>, z_q: Tensor<3>, tokens: &[Vec<u32>]) -> Tensor<1> {
        let [b, t, v] = z_q.dims();
        let n = b * t;
        // The teacher may live on the plain device: move it beside the student, as a constant.
        let z_fp = z_fp.reshape([n, v]).autodiff().detach();
        let z_q = z_q.reshape([n, v]);
        match *self {
            Loss::KlTop(k) => {
                let k = k.min(v);
                let lp = log_softmax(z_fp.clone(), 1);
                let (_, idx) = z_fp.topk_with_indices(k, 1);
                let lp_k = lp.gather(1, idx.clone());
                let lq_k = log_softmax(z_q, 1).gather(1, idx);
                (lp_k.clone().exp() * (lp_k - lq_k))
                    .sum()
                    .div_scalar(n as f64)
            }
            Loss::Kl => {
                let lp = log_softmax(z_fp, 1);
                let lq = log_softmax(z_q, 1);
                (lp.clone().exp() * (lp - lq)).sum().div_scalar(n as f64)
            }
            Loss::Mse => (z_q - z_fp).powi_scalar(2).mean(),
            Loss::Ce => {
                // Position i predicts token i + 1 of the same row.
                let lq = log_softmax(z_q, 1).reshape([b, t, v]).narrow(1, 0, t - 1);
                let next: Vec<i64> = tokens
                    .iter()
                    .flat_map(|r| r[1..].iter().map(|&x| x as i64))
                    .collect();
                let device = lq.device();
                let idx = Tensor::<1, burn::tensor::Int>::from_data(
                    burn::tensor::TensorData::new(next, [b * (t - 1)]),
                    &device,
                )
                .reshape([b * (t - 1), 1]);
                lq.reshape([b * (t - 1), v])
                    .gather(1, idx)
                    .sum()
                    .neg()
                    .div_scalar((b * (t - 1)) as f64)
            }
        }
    }
}
