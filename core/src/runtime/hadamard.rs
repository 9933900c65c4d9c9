//! The online Hadamard transform on the GPU (shaders/hadamard.wgsl), for the down_proj input
//! of rotated models: any size K·2^m the host `Hadamard` supports.

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::{Bind, Dispatch, Kernel};
use crate::error::Result;
use crate::transform::hadamard::Hadamard;

const SHADER: &str = include_str!("../../../shaders/hadamard.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    n: u32,
    p: u32,
    k: u32,
    stride: u32,
    grid_x: u32,
    scale: f32,
    _pad: u32,
}

/// Widest row the one-launch kernel holds in shared memory (shaders/hadamard.wgsl's
/// `WHOLE_MAX`).
const WHOLE_MAX: usize = 4096;

/// y = H·x for rows of one size n.
pub struct GpuHadamard {
    n: usize,
    k: usize,
    hk: wgpu::Buffer,
    /// One launch per transform (rows up to [`WHOLE_MAX`]), or the segments' stages (and, past
    /// [`WHOLE_MAX`]-long segments, the later butterfly stages) and the mix.
    whole: Option<Kernel>,
    segments: Kernel,
    butterfly: Kernel,
    mix: Kernel,
}

fn grid(threads: usize) -> (u32, u32, u32) {
    let groups = (threads.div_ceil(256)).max(1) as u32;
    let x = groups.min(65535);
    (x, groups.div_ceil(x), 1)
}

impl GpuHadamard {
    pub fn new(gpu: &Gpu, n: usize) -> Result<Self> {
        let h = Hadamard::new(n)?;
        let hk: Vec<f32> = h.base_matrix().iter().map(|&v| v as f32).collect();
        Ok(GpuHadamard {
            n,
            k: h.k,
            hk: gpu.storage("hadamard base", &hk),
            whole: (n <= WHOLE_MAX).then(|| Kernel::entry(gpu, "hadamard", SHADER, "whole")),
            segments: Kernel::entry(gpu, "hadamard segments", SHADER, "segments"),
            butterfly: Kernel::entry(gpu, "hadamard butterfly", SHADER, "butterfly"),
            mix: Kernel::entry(gpu, "hadamard mix", SHADER, "mix"),
        })
    }

    /// The launches of out = H·x for `rows` rows, in order: one, or for rows wider than
    /// [`WHOLE_MAX`] the butterfly stages in place on `x` (its contents are destroyed) and the
    /// mix: two launches while the segments are at most [`WHOLE_MAX`] long.
    pub fn dispatches<'b>(
        &self,
        gpu: &Gpu,
        x: impl Into<Bind<'b>>,
        out: &wgpu::Buffer,
        rows: usize,
    ) -> Vec<Dispatch> {
        let x = x.into();
        let (n, k) = (self.n, self.k);
        let p = n / k;
        let mut params = Params {
            rows: rows as u32,
            n: n as u32,
            p: p as u32,
            k: k as u32,
            stride: 1,
            grid_x: 0,
            scale: 1.0 / (n as f32).sqrt(),
            _pad: 0,
        };
        if let Some(whole) = &self.whole {
            let groups = rows.max(1) as u32;
            let g = (groups.min(65535), groups.div_ceil(65535), 1);
            params.grid_x = g.0;
            let bufs = [x, (&self.hk).into(), out.into()];
            return vec![whole.dispatch(gpu, &params, &bufs, g)];
        }
        // WHOLE_MAX-long chunks through shared memory: whole segments (P, a power of two,
        // divides WHOLE_MAX and n), or pieces of one segment.
        let chunk = WHOLE_MAX;
        let g = grid(rows * n.div_ceil(chunk) * 256);
        params.grid_x = g.0;
        params.stride = chunk as u32;
        let mut out_d = vec![self.segments.dispatch(gpu, &params, &[x], g)];
        let g = grid(rows * n / 2);
        params.grid_x = g.0;
        let mut stride = chunk;
        while stride < p {
            params.stride = stride as u32;
            out_d.push(self.butterfly.dispatch(gpu, &params, &[x], g));
            stride *= 2;
        }
        let g = grid(rows * n);
        params.grid_x = g.0;
        out_d.push(
            self.mix
                .dispatch(gpu, &params, &[x, (&self.hk).into(), out.into()], g),
        );
        out_d
    }
}
