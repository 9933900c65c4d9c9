//! Text generation on the burn forward: prefill, then one token at a time through the KV cache,
//! greedy or sampled (temperature, top-p, seed), streaming text to a callback.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::llama::{KvCache, Llama};
use crate::model::tokenizer::{TextStream, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 256,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// `None` when greedy; else the next uniform number in [0, 1) of the seed's stream (the
    /// GPU sampler takes it too, so a seed means the same tokens on every device).
    pub fn draw(&mut self) -> Option<f32> {
        (self.params.temperature > 0.0).then(|| self.rng.random::<f32>())
    }

    /// The next token: greedy, or top-p at the temperature ([`top_p_pick`]).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.draw() {
            None => argmax(logits),
            Some(u) => top_p_pick(logits, self.params.temperature, self.params.top_p, u),
        }
    }
}

/// Top-p sampling with the uniform number `u`: with p_i = exp((l_i − max)/T), the nucleus is
/// the smallest set of most probable tokens whose mass reaches top_p·Σp (at least one token);
/// the token is the one whose interval holds u·(nucleus mass) when the nucleus is laid out in
/// index order (shaders/sample.wgsl follows the same rule).
pub fn top_p_pick(logits: &[f32], temperature: f32, top_p: f32, u: f32) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f32> = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
    let mut kept = vec![false; probs.len()];
    let mut mass = 0.0;
    for &i in &order {
        kept[i as usize] = true;
        mass += probs[i as usize];
        if mass >= top_p * total {
            break;
        }
    }
    let nucleus: f32 = probs.iter().zip(&kept).filter(|k| *k.1).map(|k| k.0).sum();
    let goal = u * nucleus;
    let mut run = 0.0;
    let mut last = order[0];
    for (i, (&p, &k)) in probs.iter().zip(&kept).enumerate() {
        if k {
            last = i as u32;
            run += p;
            if run > goal {
                return last;
            }
        }
    }
    last
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenerationStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed, counting the tokens after the first (whose logits come from the prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// What runs the model for a [`Session`]: the burn forward, or the GPU int4 runtime.
pub trait Decoder {
    /// Forget every position.
    fn reset(&mut self);
    /// Run `ids` after the positions seen so far; the logits of the last one.
    fn last_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
    /// Positions the model can hold.
    fn max_context(&self) -> usize;
    /// Forget every position, run `ids` and return the logits of every position, [ids, vocab]
    /// (scoring text; a decoder that can runs them all at once).
    fn window_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        let mut all = Vec::new();
        for &id in ids {
            all.extend(self.last_logits(&[id])?);
        }
        Ok(all)
    }
    /// Run `ids` and pick the next token with `sampler` (a GPU decoder samples on the device
    /// and returns only the token).
    fn next_token(&mut self, ids: &[u32], sampler: &mut Sampler) -> Result<u32> {
        let logits = self.last_logits(ids)?;
        Ok(sampler.sample(&logits))
    }
    /// Decode from `first` (the token after the positions seen), handing each token `sampler`
    /// picks to `on_token` until it returns `false` or the context is full; afterwards the
    /// positions seen include `first` and every token handed over but the last. (A GPU decoder
    /// keeps the next token's work in flight meanwhile.)
    fn stream(
        &mut self,
        first: u32,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        stream_step_by_step(self, first, sampler, on_token)
    }
}

/// [`Decoder::stream`] one [`Decoder::next_token`] at a time.
pub fn stream_step_by_step<D: Decoder + ?Sized>(
    decoder: &mut D,
    first: u32,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<()> {
    let mut id = first;
    loop {
        id = decoder.next_token(&[id], sampler)?;
        if !on_token(id) {
            return Ok(());
        }
    }
}

/// The burn forward with its KV cache.
pub struct BurnDecoder<'m> {
    model: &'m Llama,
    cache: KvCache,
}

impl<'m> BurnDecoder<'m> {
    pub fn new(model: &'m Llama) -> Self {
        Self::with_cache(model, model.new_cache())
    }

    /// Continue from `cache` (one that [`BurnDecoder::into_cache`] returned for `model`).
    pub fn with_cache(model: &'m Llama, cache: KvCache) -> Self {
        BurnDecoder { model, cache }
    }

    /// The cache, to keep it past this decoder (a chat between messages).
    pub fn into_cache(self) -> KvCache {
        self.cache
    }
}

impl Decoder for BurnDecoder<'_> {
    fn reset(&mut self) {
        self.cache = self.model.new_cache();
    }
    fn last_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.model.forward_hidden(&[ids.to_vec()], &mut self.cache);
        let [_, t, d] = h.dims();
        let last = h.narrow(1, t - 1, 1).reshape([1, 1, d]);
        self.model
            .logits(last)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::other(format!("reading logits: {e:?}")))
    }
    fn max_context(&self) -> usize {
        self.model.config.max_position_embeddings
    }
}

impl Decoder for crate::runtime::Runtime {
    fn reset(&mut self) {
        crate::runtime::Runtime::reset(self)
    }
    fn last_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.prefill(ids)
    }
    fn next_token(&mut self, ids: &[u32], sampler: &mut Sampler) -> Result<u32> {
        self.sample_next(ids, sampler)
    }
    fn stream(
        &mut self,
        first: u32,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        crate::runtime::Runtime::stream(self, first, sampler, on_token)
    }
    fn window_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        crate::runtime::Runtime::reset(self);
        match self {
            crate::runtime::Runtime::Cpu(m) => m.forward_all(ids),
            crate::runtime::Runtime::Gpu(m) => m.forward_all(ids),
        }
    }
    fn max_context(&self) -> usize {
        self.max_seq()
    }
}

/// The int4 runtime for `m` when it is an int4 folder: on the CPU for `--device cpu`, on that
/// wgpu device for `gpu` and `software`, and for `auto` on a real GPU when there is one, else on
/// the CPU. `None` for other folders (they run on the burn forward).
pub fn int4_runtime(
    m: &crate::model::LoadedModel,
    choice: crate::device::DeviceChoice,
) -> Option<Result<crate::runtime::Runtime>> {
    if !crate::model::qformat::is_quantized(&m.dir) {
        return None;
    }
    let max_seq = m.model.config.max_position_embeddings.min(4096);
    Some(crate::runtime::Runtime::load(&m.dir, choice, max_seq))
}

/// The decoder for `m`: [`int4_runtime`] where it applies and loads, else the burn forward on
/// `dev`; with a sentence saying which and why.
pub fn decoder<'m>(
    m: &'m crate::model::LoadedModel,
    choice: crate::device::DeviceChoice,
    dev: &crate::device::ComputeDevice,
) -> (Box<dyn Decoder + 'm>, String) {
    let why = match int4_runtime(m, choice) {
        Some(Ok(rt)) => {
            let what = format!("int4 runtime on {}", rt.device_name());
            return (Box::new(rt), what);
        }
        Some(Err(e)) => format!(" ({e})"),
        None => String::new(),
    };
    (
        Session::burn_decoder(&m.model),
        format!("burn forward on {dev}{why}"),
    )
}

/// A decoder borrowed for one session (e.g. a GPU model kept loaded between chat turns).
impl<D: Decoder + ?Sized> Decoder for &mut D {
    fn reset(&mut self) {
        (**self).reset()
    }
    fn last_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        (**self).last_logits(ids)
    }
    fn max_context(&self) -> usize {
        (**self).max_context()
    }
    fn next_token(&mut self, ids: &[u32], sampler: &mut Sampler) -> Result<u32> {
        (**self).next_token(ids, sampler)
    }
    fn stream(
        &mut self,
        first: u32,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        (**self).stream(first, sampler, on_token)
    }
    fn window_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        (**self).window_logits(ids)
    }
}

/// A conversation with a model: keeps the KV cache between turns, so a prompt that extends
/// the previous one only runs its new tokens.
pub struct Session<'m> {
    decoder: Box<dyn Decoder + 'm>,
    tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Llama) -> Self {
        Self::with_decoder(Self::burn_decoder(model))
    }

    /// The burn forward as a decoder.
    pub fn burn_decoder(model: &'m Llama) -> Box<dyn Decoder + 'm> {
        Box::new(BurnDecoder::new(model))
    }

    pub fn with_decoder(decoder: Box<dyn Decoder + 'm>) -> Self {
        Self::resume(decoder, Vec::new())
    }

    /// A session on a decoder whose cache already holds `tokens` (from an earlier session's
    /// [`Session::into_tokens`]): a prompt that extends them runs only its new tokens.
    pub fn resume(decoder: Box<dyn Decoder + 'm>, tokens: Vec<u32>) -> Self {
        Session { decoder, tokens }
    }

    /// The positions the decoder's cache holds, to [`Session::resume`] it later.
    pub fn into_tokens(self) -> Vec<u32> {
        self.tokens
    }

    /// Feed `prompt` (the whole conversation so far, as token ids) and generate a reply.
    /// `on_text` receives each printable piece; returning `false` stops the generation.
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats)> {
        if prompt.is_empty() {
            return Err(Error::other("the prompt is empty"));
        }
        let max_ctx = self.decoder.max_context();
        if prompt.len() >= max_ctx {
            return Err(Error::other(format!(
                "the prompt has {} tokens, the model's context is {max_ctx}",
                prompt.len()
            )));
        }
        // Reuse the cache when the new prompt extends what it holds; else (and when it holds
        // nothing we know of) start over.
        let extends = prompt.len() > self.tokens.len() && prompt.starts_with(&self.tokens);
        if self.tokens.is_empty() || !extends {
            self.decoder.reset();
            self.tokens.clear();
        }
        let new = prompt[self.tokens.len()..].to_vec();
        let mut stats = GenerationStats {
            prompt_tokens: new.len(),
            ..Default::default()
        };
        let mut sampler = Sampler::new(params);
        let mut stream = TextStream::default();
        let mut out = Vec::new();

        let t0 = Instant::now();
        let first = self.decoder.next_token(&new, &mut sampler)?;
        self.tokens.extend_from_slice(&new);
        stats.prefill_secs = t0.elapsed().as_secs_f64();

        // Whether to go on after `id` (counted, streamed as text), given whether the context
        // has room to run it.
        let mut failed = None;
        let mut accept = |id: u32, room: bool| -> bool {
            out.push(id);
            stats.new_tokens += 1;
            if tok.eos_ids.contains(&id) {
                return false;
            }
            match stream.push(tok, id) {
                Ok(piece) if !piece.is_empty() && !on_text(&piece) => return false,
                Ok(_) => {}
                Err(e) => {
                    failed = Some(e);
                    return false;
                }
            }
            out.len() < params.max_new_tokens && room
        };
        let t1 = Instant::now();
        let held = self.tokens.len();
        // The tokens run after the prompt: each one handed over means the one before it ran.
        let mut ran = Vec::new();
        if params.max_new_tokens > 0 && accept(first, held < max_ctx) {
            let mut last = first;
            let streamed = self.decoder.stream(first, &mut sampler, &mut |next| {
                ran.push(last);
                last = next;
                accept(next, held + ran.len() < max_ctx)
            });
            if let Err(e) = streamed {
                // What the cache holds is unknown: the next prompt starts over.
                self.tokens.clear();
                return Err(e);
            }
        }
        self.tokens.extend(ran);
        if let Some(e) = failed {
            return Err(e);
        }
        stats.decode_secs = t1.elapsed().as_secs_f64();
        Ok((out, stats))
    }
}
