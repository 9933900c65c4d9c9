//! The int4 KV cache and decode attention over it (shaders/kv_quant.wgsl,
//! shaders/attention_int4kv.wgsl): keys and values stored as 4-bit asymmetric codes per
//! position and head, as the W?A?KV4 models were evaluated.

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::Kernel;

/// One layer's cache of K or V: codes [max_seq, heads, hd/8], scales and zeros [max_seq, heads].
pub struct Int4Cache {
    pub codes: wgpu::Buffer,
    pub scales: wgpu::Buffer,
    pub zeros: wgpu::Buffer,
}

impl Int4Cache {
    pub fn new(gpu: &Gpu, max_seq: usize, heads: usize, hd: usize) -> Self {
        let words = max_seq * heads * hd / 8;
        Int4Cache {
            codes: gpu.output("kv codes", words),
            scales: gpu.output("kv scales", max_seq * heads),
            zeros: gpu.output("kv zeros", max_seq * heads),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantParams {
    heads: u32,
    hd: u32,
    pos: u32,
    _pad: u32,
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
    _pad: [u32; 2],
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

    /// Quantize `src` [nkv, hd] into position `pos` of `cache`.
    pub fn append(
        &self,
        gpu: &Gpu,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        cache: &Int4Cache,
        pos: usize,
    ) {
        assert!(pos < self.max_seq, "KV cache full");
        let p = QuantParams {
            heads: self.nkv as u32,
            hd: self.hd as u32,
            pos: pos as u32,
            _pad: 0,
        };
        self.quant.record(
            gpu,
            enc,
            &p,
            &[src, &cache.codes, &cache.scales, &cache.zeros],
            (self.nkv as u32, 1, 1),
        );
    }

    /// out [nq, hd] = softmax(q·Kᵀ/√hd)·V over positions 0..len of the caches.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        gpu: &Gpu,
        enc: &mut wgpu::CommandEncoder,
        q: &wgpu::Buffer,
        k: &Int4Cache,
        v: &Int4Cache,
        out: &wgpu::Buffer,
        len: usize,
    ) {
        let p = AttnParams {
            nq: self.nq as u32,
            nkv: self.nkv as u32,
            hd: self.hd as u32,
            len: len as u32,
            max_seq: self.max_seq as u32,
            scale: 1.0 / (self.hd as f32).sqrt(),
            _pad: [0; 2],
        };
        self.attend.record(
            gpu,
            enc,
            &p,
            &[
                q,
                &k.codes,
                &k.scales,
                &k.zeros,
                &v.codes,
                &v.scales,
                &v.zeros,
                &self.scores,
                out,
            ],
            (self.nq as u32, 1, 1),
        );
    }
}
