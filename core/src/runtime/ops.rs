//! The decode loop's small kernels: RMSNorm, SiLU·mul and RoPE (shaders/*.wgsl).

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::{Dispatch, Kernel};

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

/// The compiled small kernels.
pub struct Ops {
    rms_norm: Kernel,
    silu_mul: Kernel,
    rope: Kernel,
    act_quant: Kernel,
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

    /// RoPE in place on x [tokens, heads, hd] with cos/sin tables [tokens, hd/2].
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        gpu: &Gpu,
        x: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
        tokens: usize,
        heads: usize,
        hd: usize,
    ) -> Dispatch {
        let pairs = (tokens * heads * hd / 2) as u32;
        let g = grid(pairs.div_ceil(64));
        let p = Four {
            a: tokens as u32,
            b: heads as u32,
            c: (hd / 2) as u32,
            d: g.0,
        };
        self.rope.dispatch(gpu, &p, &[x, cos, sin], g)
    }
}
