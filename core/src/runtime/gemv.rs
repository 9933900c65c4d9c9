//! W4A16 GEMV (shaders/gemv_w4a16.wgsl): one int4 weight matrix on the GPU times an f32 vector.

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::kernel::Kernel;
use crate::error::{Error, Result};
use crate::quant::quantizer::QuantSpec;

const SHADER: &str = include_str!("../../../shaders/gemv_w4a16.wgsl");
/// Workgroups per grid row; larger row counts use a second grid dimension.
const GRID_X: u32 = 32768;

/// An int4 matrix [rows, cols] on the GPU, in the model folder's packing.
pub struct Int4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub spec: QuantSpec,
    words: wgpu::Buffer,
    scales: wgpu::Buffer,
    zeros: wgpu::Buffer,
}

impl Int4Matrix {
    /// Upload packed codes (`cols / 8` words per row) with f32 scales (and zeros for
    /// asymmetric specs), row-major [rows, cols / group].
    pub fn upload(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        words: &[u32],
        scales: &[f32],
        zeros: Option<&[f32]>,
    ) -> Result<Self> {
        let group = spec.group.unwrap_or(cols);
        let groups = cols / group.max(1);
        let ok = spec.bits == 4
            && cols.is_multiple_of(8)
            && group.is_multiple_of(8)
            && cols.is_multiple_of(group)
            && words.len() == rows * cols / 8
            && scales.len() == rows * groups
            && zeros.is_none_or(|z| z.len() == rows * groups)
            && zeros.is_some() != spec.sym;
        if !ok {
            return Err(Error::other(format!(
                "int4 matrix {rows}×{cols} (group {group}): codes, scales or zeros do not match the shape"
            )));
        }
        Ok(Int4Matrix {
            rows,
            cols,
            spec,
            words: gpu.storage("int4 words", words),
            scales: gpu.storage("int4 scales", scales),
            zeros: gpu.storage("int4 zeros", zeros.unwrap_or(&[])),
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
    _pad: [u32; 2],
}

/// The compiled GEMV kernel.
pub struct Gemv {
    kernel: Kernel,
}

impl Gemv {
    pub fn new(gpu: &Gpu) -> Self {
        Gemv {
            kernel: Kernel::new(gpu, "gemv_w4a16", SHADER),
        }
    }

    /// Record y = W·x into `enc` (x: `cols` f32, y: `rows` f32, both on the GPU).
    pub fn record(
        &self,
        gpu: &Gpu,
        enc: &mut wgpu::CommandEncoder,
        w: &Int4Matrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) {
        let rows = w.rows as u32;
        let grid_x = rows.min(GRID_X);
        let params = Params {
            rows,
            cols: w.cols as u32,
            group: w.spec.group.unwrap_or(w.cols) as u32,
            qmin: w.spec.qmin(),
            has_zeros: (!w.spec.sym) as u32,
            grid_x,
            _pad: [0; 2],
        };
        self.kernel.record(
            gpu,
            enc,
            &params,
            &[&w.words, &w.scales, &w.zeros, x, y],
            (grid_x, rows.div_ceil(grid_x), 1),
        );
    }

    /// y = W·x, from and to the host (for tests and benchmarks of a single call).
    pub fn run(&self, gpu: &Gpu, w: &Int4Matrix, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != w.cols {
            return Err(Error::other(format!(
                "GEMV: x has {} values, the matrix {} columns",
                x.len(),
                w.cols
            )));
        }
        let xb = gpu.storage("x", x);
        let y = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("y"),
            size: (w.rows * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        self.record(gpu, &mut enc, w, &xb, &y);
        gpu.queue.submit([enc.finish()]);
        gpu.read_f32(&y, w.rows)
    }
}
