//! The KV cache and decode attention over it (shaders/kv_quant.wgsl,
//! shaders/attention_int4kv.wgsl): keys and values stored as 4-bit asymmetric codes per
//! position and head, as the W?A?KV4 models were evaluated, or as f32 for 16-bit KV.

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::{Dispatch, Kernel};

/// One layer's cache of K or V: int4 codes [max_seq, heads, hd/8] with scales and zeros
/// [max_seq, heads], or (`int4` false) the f32 bits themselves [max_seq, heads, hd].
pub struct KvCache {
    pub int4: bool,
    pub codes: wgpu::Buffer,
    pub scales: wgpu::Buffer,
    pub zeros: wgpu::Buffer,
}

impl KvCache {
    pub fn new(gpu: &Gpu, max_seq: usize, heads: usize, hd: usize, int4: bool) -> Self {
        let words = max_seq * heads * hd / if int4 { 8 } else { 1 };
        let per_slot = if int4 { max_seq * heads } else { 1 };
        KvCache {
            int4,
            codes: gpu.output("kv codes", words),
            scales: gpu.output("kv scales", per_slot),
            zeros: gpu.output("kv zeros", per_slot),
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
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    nq: u32,
    nkv: u32,
    hd: u32,
    len: u32,
    max_seq: u32,
    scale: f32,
    raw: u32,
    _pad: u32,
}

/// Shapes of the attention and its compiled kernels.
pub struct Attention {
    pub nq: usize,
    pub nkv: usize,
    pub hd: usize,
    pub max_seq: usize,
    quant: Kernel,
    attend: Kernel,
    scores: wgpu::Buffer,
}

impl Attention {
    pub fn new(gpu: &Gpu, nq: usize, nkv: usize, hd: usize, max_seq: usize) -> Self {
        assert!(
            hd.is_multiple_of(8) && nq.is_multiple_of(nkv),
            "head shapes"
        );
        Attention {
            nq,
            nkv,
            hd,
            max_seq,
            quant: Kernel::new(
                gpu,
                "kv_quant",
                include_str!("../../../shaders/kv_quant.wgsl"),
            ),
            attend: Kernel::new(
                gpu,
                "attention_int4kv",
                include_str!("../../../shaders/attention_int4kv.wgsl"),
            ),
            scores: gpu.output("attention scores", nq * max_seq),
        }
    }

    fn quant_params(&self, cache: &KvCache, pos: usize) -> QuantParams {
        assert!(pos < self.max_seq, "KV cache full");
        QuantParams {
            heads: self.nkv as u32,
            hd: self.hd as u32,
            pos: pos as u32,
            raw: !cache.int4 as u32,
        }
    }

    fn attn_params(&self, cache: &KvCache, len: usize) -> AttnParams {
        AttnParams {
            nq: self.nq as u32,
            nkv: self.nkv as u32,
            hd: self.hd as u32,
            len: len as u32,
            max_seq: self.max_seq as u32,
            scale: 1.0 / (self.hd as f32).sqrt(),
            raw: !cache.int4 as u32,
            _pad: 0,
        }
    }

    /// The launch that writes `src` [nkv, hd] into position `pos` of `cache` (quantized when
    /// it is int4).
    pub fn append(&self, gpu: &Gpu, src: &wgpu::Buffer, cache: &KvCache, pos: usize) -> Dispatch {
        let p = self.quant_params(cache, pos);
        let bufs = [src, &cache.codes, &cache.scales, &cache.zeros];
        self.quant.dispatch(gpu, &p, &bufs, (self.nkv as u32, 1, 1))
    }

    /// Point an [`Attention::append`] launch at position `pos`.
    pub fn set_append_pos(&self, gpu: &Gpu, d: &Dispatch, cache: &KvCache, pos: usize) {
        d.set_params(gpu, &self.quant_params(cache, pos));
    }

    /// The launch of out [nq, hd] = softmax(q·Kᵀ/√hd)·V over positions 0..len of the caches.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        gpu: &Gpu,
        q: &wgpu::Buffer,
        k: &KvCache,
        v: &KvCache,
        out: &wgpu::Buffer,
        len: usize,
    ) -> Dispatch {
        let p = self.attn_params(k, len);
        let bufs = [
            q,
            &k.codes,
            &k.scales,
            &k.zeros,
            &v.codes,
            &v.scales,
            &v.zeros,
            &self.scores,
            out,
        ];
        self.attend.dispatch(gpu, &p, &bufs, (self.nq as u32, 1, 1))
    }

    /// Point an [`Attention::attend`] launch at positions 0..len.
    pub fn set_attend_len(&self, gpu: &Gpu, d: &Dispatch, k: &KvCache, len: usize) {
        d.set_params(gpu, &self.attn_params(k, len));
    }
}
