//! Kernel benchmarks: achieved memory bandwidth of the W4A16 GEMV on LLaMA shapes.

use std::time::Instant;

use burn::tensor::wgpu::wgpu;
use rand::{Rng, SeedableRng};

use super::Gpu;
use super::gemv::{Gemv, Int4Matrix};
use crate::error::Result;
use crate::quant::quantizer::QuantSpec;

/// One measured GEMV shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemvFigure {
    pub rows: usize,
    pub cols: usize,
    /// Bytes the kernel must read per call: packed codes, scales, the input vector.
    pub bytes: usize,
    pub micros: f64,
    pub gb_per_s: f64,
}

/// Shapes of SmolLM2-135M, LLaMA-2-7B and LLaMA-3-8B linear layers (out, in).
pub const SHAPES: [(usize, usize); 7] = [
    (576, 576),
    (1536, 576),
    (576, 1536),
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (14336, 4096),
];

/// Time `iters` GEMVs per shape (recorded in one command buffer, after a warm-up call).
pub fn gemv(gpu: &Gpu, shapes: &[(usize, usize)], iters: usize) -> Result<Vec<GemvFigure>> {
    let kernel = Gemv::new(gpu);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut out = Vec::new();
    for &(rows, cols) in shapes {
        let spec = QuantSpec::sym(4);
        let words: Vec<u32> = (0..rows * cols / 8).map(|_| rng.random()).collect();
        let scales = vec![0.01f32; rows];
        let m = Int4Matrix::upload(gpu, rows, cols, spec, &words, &scales, None)?;
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        kernel.run(gpu, &m, &x)?; // warm-up: pipeline and buffers
        let xb = gpu.storage("x", &x);
        let y = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("y"),
            size: (rows * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for _ in 0..iters {
            kernel.record(gpu, &mut enc, &m, &xb, &y);
        }
        let t0 = Instant::now();
        gpu.queue.submit([enc.finish()]);
        gpu.read_f32(&y, 1)?;
        let micros = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
        let bytes = rows * cols / 2 + rows * 4 + cols * 4;
        out.push(GemvFigure {
            rows,
            cols,
            bytes,
            micros,
            gb_per_s: bytes as f64 / micros / 1e3,
        });
    }
    Ok(out)
}
