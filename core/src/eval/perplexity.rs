//! Perplexity as the quantization papers measure it: tokenize the whole text once, cut it into
//! non-overlapping windows of the context length, BOS first where the model uses one, score
//! every predicted token, exp of the mean negative log-likelihood. Against a reference model on
//! the same windows it also measures KL(reference ‖ model) and top-1 agreement per token.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::model::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TextScores {
    pub ppl: f64,
    pub mean_nll: f64,
    /// Mean KL(reference ‖ model) per predicted token, in nats (when a reference was given).
    pub kl: Option<f64>,
    /// Fraction of positions where the model's top-1 token equals the reference's.
    pub top1: Option<f64>,
    /// The reference's own perplexity on the same positions ([`score_decoder`] only).
    #[serde(default)]
    pub reference_ppl: Option<f64>,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    /// Wall time of the measurement (0 in results cached before it was recorded).
    #[serde(default)]
    pub seconds: f64,
}

/// Rows of the output projection computed at once (bounds the [rows, vocab] logits buffer).
const LOGIT_ROWS: usize = 256;

/// The windows of `ids` for context `ctx`, BOS first when given.
pub fn windows(ids: &[u32], ctx: usize, bos: Option<u32>) -> Vec<Vec<u32>> {
    match bos {
        Some(b) => ids
            .chunks_exact(ctx - 1)
            .map(|c| std::iter::once(b).chain(c.iter().copied()).collect())
            .collect(),
        None => ids.chunks_exact(ctx).map(<[u32]>::to_vec).collect(),
    }
}

/// `n` windows of `len` tokens (BOS first when given) starting at random offsets of `ids`
/// (seeded): the calibration sets of GPTQ and SmoothQuant, as the papers draw them.
pub fn random_windows(
    ids: &[u32],
    n: usize,
    len: usize,
    bos: Option<u32>,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use rand::{Rng, SeedableRng};
    let body = len.saturating_sub(bos.is_some() as usize);
    if body == 0 {
        return Err(Error::other(format!(
            "a calibration window of {len} tokens holds no text"
        )));
    }
    if ids.len() <= body {
        return Err(Error::other(format!(
            "the calibration text has {} tokens, fewer than one window of {len}",
            ids.len()
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok((0..n)
        .map(|_| {
            let start = rng.random_range(0..ids.len() - body);
            bos.into_iter()
                .chain(ids[start..start + body].iter().copied())
                .collect()
        })
        .collect())
}

/// Tokenize `text` and cut it into at most `max_windows` windows of `ctx` tokens.
pub fn text_windows(
    model: &Llama,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    if ctx < 2 {
        return Err(Error::other("the context length must be at least 2"));
    }
    if ctx > model.config.max_position_embeddings {
        return Err(Error::other(format!(
            "context {ctx} exceeds the model's {} positions",
            model.config.max_position_embeddings
        )));
    }
    if text.trim().is_empty() {
        return Err(Error::other("the text is empty"));
    }
    let ids = tok.encode(text)?;
    let bos = if tok.add_bos { tok.bos_id } else { None };
    let mut wins = windows(&ids, ctx, bos);
    if wins.is_empty() {
        return Err(Error::other(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            ids.len()
        )));
    }
    if let Some(n) = max_windows {
        if n == 0 {
            return Err(Error::other("0 windows asked for: score at least 1"));
        }
        wins.truncate(n);
    }
    Ok(wins)
}

/// Perplexity of `model` on `text`.
pub fn perplexity(
    model: &Llama,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TextScores> {
    let wins = text_windows(model, tok, text, ctx, max_windows)?;
    score_windows(model, None, &wins, progress)
}

/// Score `model` on `windows`, and compare it with `reference` on the same windows when given.
pub fn score_windows(
    model: &Llama,
    reference: Option<&Llama>,
    windows: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TextScores> {
    let t0 = std::time::Instant::now();
    let mut acc = Sums::default();
    for (i, w) in windows.iter().enumerate() {
        window_scores(model, reference, w, &mut acc)?;
        progress(i + 1, windows.len());
    }
    acc.scores(reference.is_some(), windows, t0)
}

#[derive(Default)]
struct Sums {
    nll: f64,
    /// The reference's NLL, where one is scored position by position.
    ref_nll: Option<f64>,
    kl: f64,
    agree: usize,
    count: usize,
}

impl Sums {
    /// The means over the scored positions (KL and top-1 only when a reference was scored).
    fn scores(
        &self,
        with_reference: bool,
        windows: &[Vec<u32>],
        t0: std::time::Instant,
    ) -> Result<TextScores> {
        let n = self.count.max(1) as f64;
        let mean_nll = self.nll / n;
        if !mean_nll.is_finite() {
            return Err(Error::other(
                "the model produced non-finite log-probabilities",
            ));
        }
        Ok(TextScores {
            ppl: mean_nll.exp(),
            mean_nll,
            kl: with_reference.then(|| self.kl / n),
            top1: with_reference.then(|| self.agree as f64 / n),
            reference_ppl: self.ref_nll.map(|r| (r / n).exp()),
            tokens_scored: self.count,
            windows: windows.len(),
            ctx: windows.first().map_or(0, Vec::len),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

fn scalar(t: Tensor<1>) -> Result<f64> {
    let v = t
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::other(format!("reading a result: {e:?}")))?;
    Ok(v[0] as f64)
}

fn window_scores(
    model: &Llama,
    reference: Option<&Llama>,
    w: &[u32],
    acc: &mut Sums,
) -> Result<()> {
    let hidden = |m: &Llama| {
        let mut cache = m.new_cache();
        let h = m.forward_hidden(&[w.to_vec()], &mut cache);
        let [_, t, d] = h.dims();
        h.reshape([t, d])
    };
    let h = hidden(model);
    let h_ref = reference.map(hidden);
    let [t, d] = h.dims();
    let device = model.device();
    let v = model.config.vocab_size;
    let n = t - 1;
    for start in (0..n).step_by(LOGIT_ROWS) {
        let rows = LOGIT_ROWS.min(n - start);
        let lp = |m: &Llama, h: &Tensor<2>| {
            let hc = h.clone().narrow(0, start, rows).reshape([1, rows, d]);
            log_softmax(m.logits(hc).reshape([rows, v]), 1)
        };
        let logp = lp(model, &h);
        let targets: Vec<i64> = w[start + 1..start + 1 + rows]
            .iter()
            .map(|&x| x as i64)
            .collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, 1]), device);
        acc.nll -= scalar(logp.clone().gather(1, targets).sum())?;
        if let (Some(r), Some(hr)) = (reference, &h_ref) {
            let logp_ref = lp(r, hr);
            let kl = logp_ref.clone().exp() * (logp_ref.clone() - logp.clone());
            acc.kl += scalar(kl.sum())?;
            let same = logp_ref.argmax(1).equal(logp.argmax(1)).int().sum();
            acc.agree += scalar(same.float())? as usize;
        }
        acc.count += rows;
    }
    Ok(())
}

/// Score `windows` through a decoder (the int4 runtimes' real kernels): the same
/// negative log-likelihood as [`score_windows`], position by position, in f64. With
/// `reference` (the burn forward of the same folder), also the KL and top-1 agreement of the
/// decoder's next-token distribution against it: how far the kernels are from the reference.
pub fn score_decoder(
    decoder: &mut dyn crate::generate::Decoder,
    reference: Option<&Llama>,
    windows: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TextScores> {
    let t0 = std::time::Instant::now();
    let mut acc = Sums::default();
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|&v| v as f64 - z).collect()
    };
    let argmax = |x: &[f64]| {
        (0..x.len())
            .max_by(|&a, &b| x[a].total_cmp(&x[b]))
            .unwrap_or(0)
    };
    for (i, w) in windows.iter().enumerate() {
        let logits = decoder.window_logits(&w[..w.len() - 1])?;
        let vocab = logits.len() / (w.len() - 1).max(1);
        let reference_logits = match reference {
            Some(r) => {
                let logits = r.forward(&[w.to_vec()], &mut r.new_cache());
                Some(
                    logits
                        .into_data()
                        .try_to_vec::<f32>()
                        .map_err(|e| Error::other(format!("reading logits: {e:?}")))?,
                )
            }
            None => None,
        };
        for (pos, pair) in w.windows(2).enumerate() {
            let logp = log_softmax(&logits[pos * vocab..(pos + 1) * vocab]);
            acc.nll -= logp[pair[1] as usize];
            if let Some(all) = &reference_logits {
                let v = logp.len();
                let logp_ref = log_softmax(&all[pos * v..(pos + 1) * v]);
                acc.kl += logp_ref
                    .iter()
                    .zip(&logp)
                    .map(|(r, q)| r.exp() * (r - q))
                    .sum::<f64>();
                acc.agree += (argmax(&logp_ref) == argmax(&logp)) as usize;
                *acc.ref_nll.get_or_insert(0.0) -= logp_ref[pair[1] as usize];
            }
            acc.count += 1;
        }
        progress(i + 1, windows.len());
    }
    acc.scores(reference.is_some(), windows, t0)
}
