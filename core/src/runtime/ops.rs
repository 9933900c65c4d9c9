//! The forward's small kernels: RMSNorm, SiLU·mul, RoPE, activation fake quantization, and the
//! next token's pick (shaders/*.wgsl).

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::{Bind, Dispatch, Kernel};

const MAX_GROUPS: u32 = 65535;

/// A grid of `n` workgroups: (x, y) with x ≤ 65535.
fn grid(n: u32) -> (u32, u32, u32) {
    let x = n.clamp(1, MAX_GROUPS);
    (x, n.div_ceil(x).max(1), 1)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Four {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    tokens: u32,
    heads: u32,
    half: u32,
    grid_x: u32,
    paired: u32,
    _pad: [u32; 3],
}

/// What [`Ops::rope`] turns: `tokens` × `heads` heads of `head_dim` values, each head in the
/// half-split layout or, `paired`, in RoPE pairs (shaders/rope.wgsl).
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub paired: bool,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    n: u32,
    eps: f32,
    grid_x: u32,
}

/// A launch of an element-wise kernel over `len` values: 256 threads a workgroup, parameters
/// (len, grid width).
fn elementwise(kernel: &Kernel, gpu: &Gpu, len: usize, buffers: &[&wgpu::Buffer]) -> Dispatch {
    let g = grid((len as u32).div_ceil(256));
    let p = Four {
        a: len as u32,
        b: g.0,
        c: 0,
        d: 0,
    };
    kernel.dispatch(gpu, &p, buffers, g)
}

/// How the next token is picked (shaders/sample.wgsl).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    Greedy,
    /// Top-p at `temperature` with the uniform number `u` ([`crate::generate::top_p_pick`]).
    TopP {
        temperature: f32,
        top_p: f32,
        u: f32,
    },
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SampleParams {
    vocab: u32,
    greedy: u32,
    temperature: f32,
    top_p: f32,
    u: f32,
    _pad: [u32; 3],
}

impl SampleParams {
    pub fn new(vocab: usize, pick: Pick) -> Self {
        let (greedy, temperature, top_p, u) = match pick {
            Pick::Greedy => (1, 1.0, 1.0, 0.0),
            Pick::TopP {
                temperature,
                top_p,
                u,
            } => (0, temperature, top_p, u),
        };
        SampleParams {
            vocab: vocab as u32,
            greedy,
            temperature,
            top_p,
            u,
            _pad: [0; 3],
        }
    }
}

/// The compiled small kernels.
pub struct Ops {
    rms_norm: Kernel,
    silu_mul: Kernel,
    rope: Kernel,
    act_quant: Kernel,
    sample: Kernel,
}

impl Ops {
    pub fn new(gpu: &Gpu) -> Self {
        Ops {
            rms_norm: Kernel::new(
                gpu,
                "rms_norm",
                include_str!("../../../shaders/rms_norm.wgsl"),
            ),
            silu_mul: Kernel::new(
                gpu,
                "silu_mul",
                include_str!("../../../shaders/silu_mul.wgsl"),
            ),
            rope: Kernel::new(gpu, "rope", include_str!("../../../shaders/rope.wgsl")),
            act_quant: Kernel::new(
                gpu,
                "act_quant",
                include_str!("../../../shaders/act_quant.wgsl"),
            ),
            sample: Kernel::new(gpu, "sample", include_str!("../../../shaders/sample.wgsl")),
        }
    }

    /// Asymmetric `bits`-bit fake quantization in place of `len / group` groups of `x`.
    pub fn act_quant(
        &self,
        gpu: &Gpu,
        x: &wgpu::Buffer,
        len: usize,
        group: usize,
        bits: u32,
    ) -> Dispatch {
        let groups = (len / group) as u32;
        let g = grid(groups);
        let p = NormParams {
            rows: groups,
            n: group as u32,
            eps: ((1u32 << bits) - 1) as f32,
            grid_x: g.0,
        };
        self.act_quant.dispatch(gpu, &p, &[x], g)
    }

    /// The launch that picks the next token from `logits` into `token` (one workgroup; the
    /// parameters are replaced per call with [`SampleParams::new`]).
    pub fn sample(
        &self,
        gpu: &Gpu,
        params: &SampleParams,
        logits: &wgpu::Buffer,
        token: &wgpu::Buffer,
    ) -> Dispatch {
        self.sample
            .dispatch(gpu, params, &[logits, token], (1, 1, 1))
    }

    /// y = RMSNorm(x)·w for each of `rows` rows of length `n`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        gpu: &Gpu,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Dispatch {
        let g = grid(rows as u32);
        let p = NormParams {
            rows: rows as u32,
            n: n as u32,
            eps,
            grid_x: g.0,
        };
        self.rms_norm.dispatch(gpu, &p, &[x, w, y], g)
    }

    /// out = SiLU(gate)·up over `len` elements.
    pub fn silu_mul(
        &self,
        gpu: &Gpu,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        len: usize,
    ) -> Dispatch {
        elementwise(&self.silu_mul, gpu, len, &[gate, up, out])
    }

    /// out = SiLU(gate)·up over `len` elements from one buffer of (gate, up) pairs [len, 2].
    pub fn silu_mul_pairs(
        &self,
        gpu: &Gpu,
        pairs: &wgpu::Buffer,
        out: &wgpu::Buffer,
        len: usize,
    ) -> Dispatch {
        let g = grid((len as u32).div_ceil(256));
        let p = Four {
            a: len as u32,
            b: g.0,
            c: 1, // interleaved
            d: 0,
        };
        self.silu_mul.dispatch(gpu, &p, &[pairs, pairs, out], g)
    }

    /// RoPE in place on x [tokens, heads, head_dim] with cos/sin tables [tokens, head_dim/2].
    pub fn rope<'b>(
        &self,
        gpu: &Gpu,
        x: impl Into<Bind<'b>>,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
        shape: RopeShape,
    ) -> Dispatch {
        let RopeShape {
            tokens,
            heads,
            head_dim,
            paired,
        } = shape;
        let pairs = (tokens * heads * head_dim / 2) as u32;
        let g = grid(pairs.div_ceil(64));
        let p = RopeParams {
            tokens: tokens as u32,
            heads: heads as u32,
            half: (head_dim / 2) as u32,
            grid_x: g.0,
            paired: paired as u32,
            _pad: [0; 3],
        };
        self.rope
            .dispatch(gpu, &p, &[x.into(), cos.into(), sin.into()], g)
    }
}
