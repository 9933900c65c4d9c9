//! The KV cache and causal attention over it (shaders/kv_quant.wgsl,
//! shaders/attention_int4kv.wgsl): keys and values stored as 4-bit asymmetric codes per
//! position and head, as the W?A?KV4 models were evaluated, or as f32 for 16-bit KV. Launches
//! are bound for up to `tokens` positions at once (1 for decode, a chunk for prefill) and
//! pointed at the positions of each step. Decode appends the step's K and V in the
//! attention's own launch ([`Attention::attend_fresh`]).

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::{Bind, Dispatch, Kernel};
use super::linear::ActCodes;
use crate::error::{Error, Result};

/// One layer's cache of K or V: int4 codes [max_seq, heads, hd/8] with (scale, zero) pairs
/// [max_seq, heads, 2], or (`int4` false) the f32 bits themselves [max_seq, heads, hd].
pub struct KvCache {
    pub int4: bool,
    pub codes: wgpu::Buffer,
    pub grid: wgpu::Buffer,
}

impl KvCache {
    pub fn new(gpu: &Gpu, max_seq: usize, heads: usize, hd: usize, int4: bool) -> Self {
        let words = max_seq * heads * hd / if int4 { 8 } else { 1 };
        let slots = if int4 { max_seq * heads } else { 1 };
        KvCache {
            int4,
            codes: gpu.output("kv codes", words),
            grid: gpu.output("kv grid", 2 * slots),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantParams {
    heads: u32,
    hd: u32,
    pos: u32,
    raw: u32,
    tokens: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    nq: u32,
    nkv: u32,
    hd: u32,
    pos0: u32,
    tokens: u32,
    scale: f32,
    raw: u32,
    qmax: f32,
    fresh: u32,
    k_off: u32,
    v_off: u32,
    hadamard: u32,
}

/// Shapes of the attention and its compiled kernels.
pub struct Attention {
    pub nq: usize,
    pub nkv: usize,
    pub hd: usize,
    pub max_seq: usize,
    quant: Kernel,
    attend: Kernel,
    /// Bound in place of the o_proj input's codes and scales where the attention writes none.
    no_codes: [wgpu::Buffer; 2],
}

impl Attention {
    pub fn new(gpu: &Gpu, nq: usize, nkv: usize, hd: usize, max_seq: usize) -> Result<Self> {
        if !(hd.is_multiple_of(8) && hd <= 256 && nkv > 0 && nq.is_multiple_of(nkv)) {
            return Err(Error::other(format!(
                "the GPU attention needs a head dimension that is a multiple of 8 up to 256 and \
                 query heads a multiple of the KV heads, not head dim {hd} with {nq} query and \
                 {nkv} KV heads (--device cpu runs it)"
            )));
        }
        Ok(Attention {
            nq,
            nkv,
            hd,
            max_seq,
            quant: Kernel::new(
                gpu,
                "kv_quant",
                concat!(
                    include_str!("../../../shaders/kv_pack.wgsl"),
                    include_str!("../../../shaders/kv_quant.wgsl")
                ),
            ),
            attend: Kernel::specialized(
                gpu,
                "attention_int4kv",
                concat!(
                    include_str!("../../../shaders/act_pack.wgsl"),
                    include_str!("../../../shaders/kv_pack.wgsl"),
                    include_str!("../../../shaders/attention_int4kv.wgsl")
                ),
                "main",
                &[("HD", hd as f64)],
            ),
            no_codes: [gpu.output("no codes", 1), gpu.output("no scales", 1)],
        })
    }

    fn quant_params(&self, cache: &KvCache, pos: usize, tokens: usize) -> QuantParams {
        assert!(pos + tokens <= self.max_seq, "KV cache full");
        QuantParams {
            heads: self.nkv as u32,
            hd: self.hd as u32,
            pos: pos as u32,
            raw: !cache.int4 as u32,
            tokens: tokens as u32,
            _pad: [0; 3],
        }
    }

    fn attn_params(
        &self,
        cache: &KvCache,
        (pos0, tokens): (usize, usize),
        qmax: f32,
        fresh: Option<Fresh>,
    ) -> AttnParams {
        assert!(
            fresh.is_none() || tokens == 1,
            "the fresh position is one token"
        );
        assert!(pos0 + tokens <= self.max_seq, "KV cache full");
        AttnParams {
            nq: self.nq as u32,
            nkv: self.nkv as u32,
            hd: self.hd as u32,
            pos0: pos0 as u32,
            tokens: tokens as u32,
            scale: 1.0 / (self.hd as f32).sqrt(),
            raw: !cache.int4 as u32,
            qmax,
            fresh: fresh.is_some() as u32,
            k_off: fresh.map_or(0, |f| f.k_off) as u32,
            v_off: fresh.map_or(0, |f| f.v_off) as u32,
            hadamard: fresh.is_some_and(|f| f.hadamard) as u32,
        }
    }

    /// The launch that writes `k` and `v` [tokens, nkv, hd] into positions pos.. of their
    /// caches (quantized when they are int4; both the same kind), bound for up to
    /// `max_tokens` positions.
    pub fn append<'b>(
        &self,
        gpu: &Gpu,
        k: impl Into<Bind<'b>>,
        v: impl Into<Bind<'b>>,
        k_cache: &KvCache,
        v_cache: &KvCache,
        max_tokens: usize,
    ) -> Dispatch {
        assert_eq!(k_cache.int4, v_cache.int4, "K and V caches of one kind");
        let p = self.quant_params(k_cache, 0, max_tokens);
        let bufs = [
            k.into(),
            v.into(),
            (&k_cache.codes).into(),
            (&k_cache.grid).into(),
            (&v_cache.codes).into(),
            (&v_cache.grid).into(),
        ];
        let grid = (self.nkv as u32, max_tokens as u32, 2);
        self.quant.dispatch(gpu, &p, &bufs, grid)
    }

    /// Point an [`Attention::append`] launch (with caches of `cache`'s kind) at `tokens`
    /// positions from `pos` on.
    pub fn set_append(&self, gpu: &Gpu, d: &Dispatch, cache: &KvCache, pos: usize, tokens: usize) {
        d.set_params(gpu, &self.quant_params(cache, pos, tokens));
    }

    /// The launch of out [tokens, nq, hd] = softmax(q·Kᵀ/√hd)·V, query i at position pos0 + i
    /// attending to positions 0..=pos0 + i (already in the caches), bound for up to
    /// `max_tokens` queries; with `codes`, each head's output also quantized into them as the
    /// W4A4 o_proj takes its input (one group per head: act_codes.wgsl's arithmetic).
    #[allow(clippy::too_many_arguments)]
    pub fn attend<'b>(
        &self,
        gpu: &Gpu,
        q: impl Into<Bind<'b>>,
        k: &KvCache,
        v: &KvCache,
        out: &wgpu::Buffer,
        codes: Option<&ActCodes>,
        max_tokens: usize,
    ) -> Result<Attend> {
        self.bind(gpu, q.into(), k, v, out, codes, max_tokens, None)
    }

    /// Decode's attention of one position that also appends that position's K and V to the
    /// caches (quantized as [`Attention::append`] does; no launch of its own): `qkv` holds q
    /// [nq, hd], then k [nkv, hd] at `fresh.k_off` and v [nkv, hd] at `fresh.v_off` (in f32s).
    /// With `fresh.hadamard`, q and k are heads in RoPE pairs that the launch turns by the
    /// per-head Hadamard H/√hd first (the online Q/K Hadamard; hd a power of two).
    #[allow(clippy::too_many_arguments)]
    pub fn attend_fresh<'b>(
        &self,
        gpu: &Gpu,
        qkv: impl Into<Bind<'b>>,
        fresh: Fresh,
        k: &KvCache,
        v: &KvCache,
        out: &wgpu::Buffer,
        codes: Option<&ActCodes>,
    ) -> Result<Attend> {
        assert_eq!(k.int4, v.int4, "K and V caches of one kind");
        let qkv: Bind = qkv.into();
        let (q_len, kv_len) = (self.nq * self.hd, self.nkv * self.hd);
        let bytes = qkv.size.map_or(qkv.buffer.size() - qkv.offset, |s| s.get());
        if fresh.k_off < q_len
            || fresh.v_off < fresh.k_off + kv_len
            || bytes < 4 * (fresh.v_off + kv_len) as u64
        {
            return Err(Error::other(format!(
                "the current position's k and v must follow q ({q_len} values) and each other \
                 ({kv_len} values each) within the binding ({} values), not start at {} and {}",
                bytes / 4,
                fresh.k_off,
                fresh.v_off
            )));
        }
        if fresh.hadamard && !self.hd.is_power_of_two() {
            return Err(Error::other(format!(
                "the attention's Q/K Hadamard needs a head dimension that is a power of two, \
                 not {}",
                self.hd
            )));
        }
        self.bind(gpu, qkv, k, v, out, codes, 1, Some(fresh))
    }

    #[allow(clippy::too_many_arguments)]
    fn bind(
        &self,
        gpu: &Gpu,
        q: Bind,
        k: &KvCache,
        v: &KvCache,
        out: &wgpu::Buffer,
        codes: Option<&ActCodes>,
        max_tokens: usize,
        fresh: Option<Fresh>,
    ) -> Result<Attend> {
        let qmax = match codes {
            None => 0.0,
            Some(c)
                if c.cols == self.nq * self.hd && c.group == self.hd && c.tokens >= max_tokens =>
            {
                c.qmax()
            }
            Some(c) => {
                return Err(Error::other(format!(
                    "attention into activation codes needs {max_tokens} tokens of {} values in \
                     groups of one head ({}), not {} of {} in groups of {}",
                    self.nq * self.hd,
                    self.hd,
                    c.tokens,
                    c.cols,
                    c.group
                )));
            }
        };
        let p = self.attn_params(k, (0, max_tokens), qmax, fresh);
        let (codes, scales) = match codes {
            Some(c) => c.buffers(),
            None => (&self.no_codes[0], &self.no_codes[1]),
        };
        let bufs: [Bind; 8] = [
            q,
            (&k.codes).into(),
            (&k.grid).into(),
            (&v.codes).into(),
            (&v.grid).into(),
            out.into(),
            codes.into(),
            scales.into(),
        ];
        let grid = (self.nq as u32, max_tokens as u32, 1);
        Ok(Attend {
            d: self.attend.dispatch(gpu, &p, &bufs, grid),
            qmax,
            fresh,
        })
    }

    /// Point an attention launch at `tokens` queries from position `pos0` on (one, appended
    /// there, for [`Attention::attend_fresh`]'s).
    pub fn set_attend(&self, gpu: &Gpu, a: &Attend, k: &KvCache, pos0: usize, tokens: usize) {
        let p = self.attn_params(k, (pos0, tokens), a.qmax, a.fresh);
        a.d.set_params(gpu, &p);
    }
}

/// Where [`Attention::attend_fresh`] finds the current position's k and v in its `qkv`
/// binding (offsets in f32s), and whether it turns q and k by the Q/K Hadamard.
#[derive(Debug, Clone, Copy)]
pub struct Fresh {
    pub k_off: usize,
    pub v_off: usize,
    pub hadamard: bool,
}

/// An attention launch, whether it writes activation codes (their 2^bits − 1, or 0), and
/// whether it appends the current position.
pub struct Attend {
    pub d: Dispatch,
    qmax: f32,
    fresh: Option<Fresh>,
}
