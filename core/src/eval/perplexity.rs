//! Perplexity as the quantization papers measure it: tokenize the whole text once, cut it into
//! non-overlapping windows of the context length, BOS first where the model uses one, score
//! every predicted token, exp of the mean negative log-likelihood.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::model::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub ppl: f64,
    pub mean_nll: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
}

/// Rows of the output projection computed at once (bounds the [rows, vocab] logits buffer).
const LOGIT_ROWS: usize = 256;

/// The windows of `ids` for context `ctx`: (input ids, index of the first scored target).
pub fn windows(ids: &[u32], ctx: usize, bos: Option<u32>) -> Vec<Vec<u32>> {
    match bos {
        Some(b) => ids
            .chunks_exact(ctx - 1)
            .map(|c| std::iter::once(b).chain(c.iter().copied()).collect())
            .collect(),
        None => ids.chunks_exact(ctx).map(<[u32]>::to_vec).collect(),
    }
}

pub fn perplexity(
    model: &Llama,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
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
        wins.truncate(n.max(1));
    }
    let total = wins.len();
    let (mut nll, mut count) = (0f64, 0usize);
    for (i, w) in wins.iter().enumerate() {
        let (s, n) = window_nll(model, w)?;
        nll += s;
        count += n;
        progress(i + 1, total);
    }
    let mean_nll = nll / count as f64;
    Ok(Perplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens_scored: count,
        windows: total,
        ctx,
    })
}

/// Sum of -log p(w[t+1] | w[..=t]) over the window, and how many tokens that is.
pub fn window_nll(model: &Llama, w: &[u32]) -> Result<(f64, usize)> {
    let mut cache = model.new_cache();
    let h = model.forward_hidden(&[w.to_vec()], &mut cache);
    let [_, t, d] = h.dims();
    let h = h.reshape([t, d]);
    let device = model.device();
    let mut sum = 0f64;
    let n = t - 1;
    for start in (0..n).step_by(LOGIT_ROWS) {
        let rows = LOGIT_ROWS.min(n - start);
        let hc = h.clone().narrow(0, start, rows).reshape([1, rows, d]);
        let logits = model.logits(hc).reshape([rows, model.config.vocab_size]);
        let targets: Vec<i64> = w[start + 1..start + 1 + rows]
            .iter()
            .map(|&x| x as i64)
            .collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, 1]), device);
        let lp: Tensor<2> = log_softmax(logits, 1).gather(1, targets);
        let v = lp
            .sum()
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::other(format!("reading log-probs: {e:?}")))?;
        sum -= v[0] as f64;
    }
    if !sum.is_finite() {
        return Err(Error::other(
            "the model produced non-finite log-probabilities",
        ));
    }
    Ok((sum, n))
}
