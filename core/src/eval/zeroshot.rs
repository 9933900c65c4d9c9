//! Zero-shot scoring as lm-eval-harness does it: the sum of the log-probabilities of each
//! choice's continuation after its context; `acc` picks the largest sum, `acc_norm` the largest
//! sum per byte of the choice, LAMBADA counts whole last words that greedy decoding reproduces.
//!
//! All requests of one item run as one batch. Their common token prefix (the question, for
//! most tasks) is computed once and its KV cache shared by the rows, which differ only in the
//! tokens after it.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::journal::Journal;
use crate::data::tasks::{Item, Request, Task, TaskName};
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::model::tokenizer::Tokenizer;

/// Longest input lm-eval gives a model (its default max_length; less if the model has fewer
/// positions).
pub const MAX_LENGTH: usize = 2048;

/// One request's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// Σ log p(continuation token | everything before it).
    pub loglik: f64,
    /// Whether every continuation token is the model's top-1 prediction.
    pub greedy: bool,
}

/// A task's scores over the items evaluated, as fractions (not percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScores {
    pub task: TaskName,
    pub items: usize,
    pub acc: f64,
    pub acc_norm: Option<f64>,
    /// LAMBADA: perplexity of the last word, exp(−mean log-likelihood).
    pub ppl: Option<f64>,
    /// Share of the items whose counted answer (acc_norm's where the task has it) is each choice,
    /// by position (empty for LAMBADA). Beside `golds` it shows a bias toward one answer, which
    /// on two-choice tasks such as BoolQ moves the accuracy by tens of points.
    #[serde(default)]
    pub picks: Vec<f64>,
    /// Share of the items whose gold answer is each choice, by position.
    #[serde(default)]
    pub golds: Vec<f64>,
    /// Whether each item's counted answer (the one `percent` counts) is right, in item order:
    /// two rows scored on the same items compare item by item (a paired difference, whose
    /// standard error is far smaller than that of either accuracy). Empty in cells written
    /// before it was kept.
    #[serde(default)]
    pub hits: Vec<bool>,
    pub seconds: f64,
}

impl TaskScores {
    /// The paper's per-task number in percent: acc_norm where the task has it, else acc.
    pub fn percent(&self) -> f64 {
        100.0 * self.acc_norm.unwrap_or(self.acc)
    }

    /// Variance of `percent` as an estimate of the accuracy on the whole task, from the items
    /// scored (binomial, p(1 − p)/n, in percent²).
    pub fn variance(&self) -> f64 {
        let p = self.percent() / 100.0;
        1e4 * p * (1.0 - p) / self.items.max(1) as f64
    }
}

/// Index of the first maximum (numpy's argmax).
fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Aggregate the judgements of `items` (one list per item, one judgement per request).
pub fn aggregate(task: TaskName, items: &[&Item], judged: &[Vec<Judgement>]) -> TaskScores {
    let n = items.len().max(1) as f64;
    let (mut acc, mut acc_norm, mut ll) = (0.0, 0.0, 0.0);
    let (mut picks, mut golds) = (Vec::new(), Vec::new());
    let mut hits = Vec::with_capacity(items.len());
    // Both lists as long as the most choices an item has, so that they line up.
    let count = |shares: &mut Vec<f64>, choices: usize, choice: usize| {
        if shares.len() < choices {
            shares.resize(choices, 0.0);
        }
        shares[choice] += 1.0 / n;
    };
    for (item, j) in items.iter().zip(judged) {
        if task.is_last_word() {
            acc += j[0].greedy as u8 as f64;
            ll += j[0].loglik;
            hits.push(j[0].greedy);
            continue;
        }
        let pick = argmax(j.iter().map(|x| x.loglik));
        acc += (pick == item.gold) as u8 as f64;
        let per_byte = j
            .iter()
            .zip(&item.choice_bytes)
            .map(|(x, &b)| x.loglik / b.max(1) as f64);
        let pick_norm = argmax(per_byte);
        acc_norm += (pick_norm == item.gold) as u8 as f64;
        let counted = if task.has_acc_norm() { pick_norm } else { pick };
        hits.push(counted == item.gold);
        count(&mut picks, j.len(), counted);
        count(&mut golds, j.len(), item.gold);
    }
    TaskScores {
        task,
        items: items.len(),
        acc: acc / n,
        acc_norm: task.has_acc_norm().then_some(acc_norm / n),
        ppl: task.is_last_word().then(|| (-ll / n).exp()),
        picks,
        golds,
        hits,
        seconds: 0.0,
    }
}

/// Evaluate `model` on `limit` items of `task` (spread evenly; all when None): the items in
/// `journal` from there, the others judged and recorded in it. Stops with `Error::Cancelled`
/// between items once `cancel` is set (the items judged so far stay in the journal). Also
/// returns the builds that judged the items, each once, this one last where it judged any.
/// `seconds` counts this call only.
pub fn evaluate(
    model: &Llama,
    tok: &Tokenizer,
    task: &Task,
    limit: Option<usize>,
    journal: &mut Journal,
    progress: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<(TaskScores, Vec<String>)> {
    let t0 = std::time::Instant::now();
    let indices = task.subset_indices(limit);
    let mut judged = Vec::with_capacity(indices.len());
    let mut builds: Vec<String> = Vec::new();
    let mut note = |by: &str| {
        if !builds.iter().any(|b| b == by) {
            builds.push(by.to_string());
        }
    };
    let mut fresh = false;
    for (k, &i) in indices.iter().enumerate() {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        match journal.get(i) {
            Some((j, by)) => {
                note(by);
                judged.push(j.to_vec());
            }
            None => {
                let j = judge(model, tok, &task.items[i].requests)?;
                journal.record(i, &j)?;
                fresh = true;
                judged.push(j);
            }
        }
        progress(k + 1, indices.len());
    }
    if fresh {
        builds.retain(|b| b != crate::BUILD);
        builds.push(crate::BUILD.to_string());
    }
    let items: Vec<&Item> = indices.iter().map(|&i| &task.items[i]).collect();
    let mut s = aggregate(task.name, &items, &judged);
    s.seconds = t0.elapsed().as_secs_f64();
    Ok((s, builds))
}

/// Tokens of one request: the input sequence (context + continuation, cut from the left to
/// `max_len` + 1 tokens) and how many of its last tokens are the continuation.
fn encode(tok: &Tokenizer, r: &Request, max_len: usize) -> Result<(Vec<u32>, usize)> {
    // lm-eval moves the context's trailing spaces to the continuation, then splits the
    // tokens of the whole string at the length of the context's own tokens.
    let trimmed = r.context.trim_end_matches(' ');
    let moved = &r.context[trimmed.len()..];
    let continuation = format!("{moved}{}", r.continuation);
    let mut context = tok.encode_with_bos(trimmed)?;
    if context.is_empty() {
        let start = tok.bos_id.or(tok.eos_ids.first().copied());
        context.extend(start);
    }
    let whole = tok.encode_with_bos(&format!("{trimmed}{continuation}"))?;
    let n_cont = whole.len().saturating_sub(context.len());
    if n_cont == 0 {
        return Err(Error::other(format!(
            "the continuation {:?} has no tokens",
            r.continuation
        )));
    }
    let mut seq = context;
    seq.extend_from_slice(&whole[whole.len() - n_cont..]);
    if seq.len() > max_len + 1 {
        seq.drain(..seq.len() - max_len - 1);
    }
    Ok((seq, n_cont.min(max_len)))
}

fn to_f32(t: Tensor<1>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::other(format!("reading log-probabilities: {e:?}")))
}

/// Judge the requests of one item in one batch, sharing their common prefix.
pub fn judge(model: &Llama, tok: &Tokenizer, requests: &[Request]) -> Result<Vec<Judgement>> {
    let max_len = MAX_LENGTH.min(model.config.max_position_embeddings);
    let encoded = requests
        .iter()
        .map(|r| encode(tok, r, max_len))
        .collect::<Result<Vec<_>>>()?;
    let seqs: Vec<&[u32]> = encoded.iter().map(|(s, _)| s.as_slice()).collect();
    // First scored token of each row; the shared prefix stops before every one of them.
    let first: Vec<usize> = encoded.iter().map(|(s, n)| s.len() - n).collect();
    let common = (0..seqs[0].len())
        .take_while(|&i| seqs.iter().all(|s| s.get(i) == seqs[0].get(i)))
        .count();
    let p = common.min(*first.iter().min().expect("an item has requests"));
    let b = seqs.len();

    // The prefix once; its last position predicts token p of every row.
    let (mut cache, prefix_logp) = if p > 0 {
        let mut cache = model.new_cache();
        let h = model.forward_hidden(&[seqs[0][..p].to_vec()], &mut cache);
        let d = h.dims()[2];
        let last = h.slice([0..1, p - 1..p, 0..d]);
        let logp = log_softmax(model.logits(last), 2).reshape([-1]);
        (cache.repeat_batch(b), Some(to_f32(logp)?))
    } else {
        (model.new_cache(), None)
    };

    // The rest of each row, padded on the right (causal attention keeps padding out of the
    // positions that matter). Suffix position k predicts token p + k + 1.
    let suffix_len = seqs.iter().map(|s| s.len() - 1 - p).max().unwrap_or(0);
    let (mut pick, mut top) = (Vec::new(), Vec::new());
    if suffix_len > 0 {
        let rows: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| {
                let mut r = s[p..s.len() - 1].to_vec();
                r.resize(suffix_len, 0);
                r
            })
            .collect();
        let targets: Vec<i64> = seqs
            .iter()
            .flat_map(|s| (0..suffix_len).map(move |k| s.get(p + k + 1).map_or(0, |&t| t as i64)))
            .collect();
        let h = model.forward_hidden(&rows, &mut cache);
        let logp = log_softmax(model.logits(h), 2);
        let idx = Tensor::<3, Int>::from_data(
            TensorData::new(targets, [b, suffix_len, 1]),
            model.device(),
        );
        pick = to_f32(logp.clone().gather(2, idx).reshape([-1]))?;
        top = logp
            .argmax(2)
            .reshape([-1])
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| Error::other(format!("reading predictions: {e:?}")))?;
    }

    let mut out = Vec::with_capacity(b);
    for (r, s) in seqs.iter().enumerate() {
        let (mut loglik, mut greedy) = (0.0, true);
        for j in first[r]..s.len() {
            let (lp, best) = if j == p {
                let lp = prefix_logp
                    .as_ref()
                    .expect("token p is predicted by the prefix");
                (
                    lp[s[j] as usize],
                    argmax(lp.iter().map(|&x| x as f64)) as u32,
                )
            } else {
                let k = r * suffix_len + (j - 1 - p);
                (pick[k], top[k] as u32)
            };
            loglik += lp as f64;
            greedy &= best == s[j];
        }
        if !loglik.is_finite() {
            return Err(Error::other(
                "the model produced non-finite log-probabilities",
            ));
        }
        out.push(Judgement { loglik, greedy });
    }
    Ok(out)
}
