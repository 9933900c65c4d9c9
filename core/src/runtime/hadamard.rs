//! The online Hadamard transform on the GPU (shaders/hadamard.wgsl), for the down_proj input
//! of rotated models: any size K·2^m the host `Hadamard` supports.

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::{Bind, Dispatch, Kernel};
use super::linear::ActCodes;
use crate::error::{Error, Result};
use crate::transform::hadamard::Hadamard;

const SHADER: &str = concat!(
    include_str!("../../../shaders/act_pack.wgsl"),
    include_str!("../../../shaders/hadamard.wgsl")
);

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
    qmax: f32,
    paired: u32,
    _pad: [u32; 3],
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
    /// Bound in place of activation codes and scales where `whole` writes none.
    no_codes: [wgpu::Buffer; 2],
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
            no_codes: [gpu.output("no codes", 1), gpu.output("no scales", 1)],
        })
    }

    /// The one launch of out = H·x for `rows` rows that also quantizes each row of out into
    /// `codes` (one group per row, act_codes.wgsl's arithmetic), as the W4A4 down_proj takes its
    /// input; `None` where the rows are too wide for one launch or `codes` are not one group of
    /// n values per row for `rows` rows.
    pub fn whole_into_codes<'b>(
        &self,
        gpu: &Gpu,
        x: impl Into<Bind<'b>>,
        out: &wgpu::Buffer,
        rows: usize,
        codes: &ActCodes,
    ) -> Option<Dispatch> {
        let whole = self.whole.as_ref()?;
        let fits = codes.cols == self.n && codes.group == self.n && codes.tokens >= rows;
        fits.then(|| self.whole_launch(gpu, whole, x.into(), out, rows, Some(codes), false))
    }

    /// The launch of out = H·x for `rows` heads held in RoPE pairs (x_0, x_h, x_1, x_{h+1}, …
    /// per head, h = n/2), out in natural order: the Q/K Hadamard after decode's RoPE-turning
    /// q, k, v GEMV. Heads over [`WHOLE_MAX`] are refused.
    pub fn unpairing_dispatch<'b>(
        &self,
        gpu: &Gpu,
        x: impl Into<Bind<'b>>,
        out: &wgpu::Buffer,
        rows: usize,
    ) -> Result<Dispatch> {
        match &self.whole {
            Some(whole) => Ok(self.whole_launch(gpu, whole, x.into(), out, rows, None, true)),
            None => Err(Error::other(format!(
                "heads of {} values in RoPE pairs: the GPU Hadamard takes at most {WHOLE_MAX}",
                self.n
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn whole_launch(
        &self,
        gpu: &Gpu,
        whole: &Kernel,
        x: Bind,
        out: &wgpu::Buffer,
        rows: usize,
        codes: Option<&ActCodes>,
        paired: bool,
    ) -> Dispatch {
        let groups = rows.max(1) as u32;
        let g = (groups.min(65535), groups.div_ceil(65535), 1);
        let params = Params {
            grid_x: g.0,
            qmax: codes.map_or(0.0, ActCodes::qmax),
            paired: paired as u32,
            ..self.params(rows)
        };
        let (codes, scales) = match codes {
            Some(c) => c.buffers(),
            None => (&self.no_codes[0], &self.no_codes[1]),
        };
        let bufs = [
            x,
            (&self.hk).into(),
            out.into(),
            codes.into(),
            scales.into(),
        ];
        whole.dispatch(gpu, &params, &bufs, g)
    }

    fn params(&self, rows: usize) -> Params {
        Params {
            rows: rows as u32,
            n: self.n as u32,
            p: (self.n / self.k) as u32,
            k: self.k as u32,
            stride: 1,
            grid_x: 0,
            scale: 1.0 / (self.n as f32).sqrt(),
            qmax: 0.0,
            paired: 0,
            _pad: [0; 3],
        }
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
        if let Some(whole) = &self.whole {
            return vec![self.whole_launch(gpu, whole, x, out, rows, None, false)];
        }
        let (n, p) = (self.n, self.n / self.k);
        let mut params = self.params(rows);
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
