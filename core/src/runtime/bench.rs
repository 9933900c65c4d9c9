//! Runtime benchmarks: achieved memory bandwidth of the decode GEMVs (int4 and f16) against
//! the device's measured read bandwidth, and decode speed of whole models.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::wgpu::wgpu;
use rand::{Rng, SeedableRng};

use super::Gpu;
use super::gemv::{Gemv, HalfMatrix, Int4Matrix, Linear};
use super::kernel::{Dispatch, Kernel, record_all};
use super::model::{GpuModel, SyntheticWeights};
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::quant::quantizer::QuantSpec;

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

/// One measured GEMV shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemvFigure {
    pub rows: usize,
    pub cols: usize,
    /// "int4" or "f16".
    pub weights: &'static str,
    /// Bytes the kernel must read per call: weights, scales, the input vector.
    pub bytes: usize,
    pub micros: f64,
    pub gb_per_s: f64,
    /// Largest |GPU − f64 reference| / Σ|w·x| over the rows: the figure is of a correct kernel.
    pub max_rel_err: f64,
}

/// Time `iters` launches of `d` recorded in one compute pass (after one warm-up launch), then
/// read `sync` back: seconds per launch.
fn time(gpu: &Gpu, iters: usize, sync: &wgpu::Buffer, d: &Dispatch) -> Result<f64> {
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    d.record(&mut enc);
    gpu.finish_f32(enc, sync, 1)?;
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    record_all(&mut enc, std::iter::repeat_n(d, iters));
    let t0 = Instant::now();
    gpu.finish_f32(enc, sync, 1)?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ReadParams {
    n4: u32,
    groups: u32,
    _pad: [u32; 2],
}

/// Read bandwidth of a streaming kernel over a buffer of up to `mb` MB (the adapter's binding
/// limit caps it; shaders/read_bandwidth.wgsl): the practical memory roofline the GEMVs are
/// compared with.
pub fn read_gb_per_s(gpu: &Gpu, mb: usize, iters: usize) -> Result<f64> {
    let limit = gpu.device.limits().max_storage_buffer_binding_size as usize;
    let n4 = (mb * 1_000_000).min(limit) / 16;
    let data = gpu.output("bandwidth data", n4 * 4);
    let groups = 4096u32;
    let out = gpu.output("bandwidth out", groups as usize);
    let kernel = Kernel::new(
        gpu,
        "read_bandwidth",
        include_str!("../../../shaders/read_bandwidth.wgsl"),
    );
    let params = ReadParams {
        n4: n4 as u32,
        groups,
        _pad: [0; 2],
    };
    let d = kernel.dispatch(gpu, &params, &[&data, &out], (groups, 1, 1));
    let secs = time(gpu, iters, &out, &d)?;
    Ok((n4 * 16) as f64 / secs / 1e9)
}

/// Time `iters` GEMVs per shape, int4 (symmetric, per channel) and f16.
pub fn gemv(gpu: &Gpu, shapes: &[(usize, usize)], iters: usize) -> Result<Vec<GemvFigure>> {
    let kernel = Gemv::new(gpu);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut out = Vec::new();
    for &(rows, cols) in shapes {
        let words: Vec<u32> = (0..rows * cols / 8).map(|_| rng.random()).collect();
        let spec = QuantSpec::sym(4);
        let scales = vec![0.01; rows];
        let int4 = Int4Matrix::upload(gpu, rows, cols, spec, &words, &scales, None)?;
        let w4 = crate::model::qformat::unpack(&words, &scales, None, rows, cols, &spec);
        let halves: Vec<u16> = (0..rows * cols)
            .map(|_| rng.random::<u16>() & 0x37FF)
            .collect();
        let f16 = HalfMatrix::upload(gpu, rows, cols, &halves)?;
        let w16: Vec<f32> = halves
            .iter()
            .map(|&h| half::f16::from_bits(h).to_f32())
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let xb = gpu.storage("x", &x);
        let y = gpu.output("y", rows);
        for (name, m, w) in [
            ("int4", Linear::Int4(int4), w4),
            ("f16", Linear::Half(f16), w16),
        ] {
            let got = kernel.run(gpu, &m, &x)?;
            let max_rel_err = (0..rows)
                .map(|r| {
                    let row = &w[r * cols..(r + 1) * cols];
                    let dot = |f: fn(f64) -> f64| -> f64 {
                        row.iter()
                            .zip(&x)
                            .map(|(&a, &b)| f(a as f64 * b as f64))
                            .sum()
                    };
                    (got[r] as f64 - dot(|v| v)).abs() / dot(f64::abs).max(1e-12)
                })
                .fold(0.0, f64::max);
            let secs = time(gpu, iters, &y, &kernel.dispatch(gpu, &m, &xb, &y))?;
            let bytes = m.bytes() + cols * 4;
            out.push(GemvFigure {
                rows,
                cols,
                weights: name,
                bytes,
                micros: secs * 1e6,
                gb_per_s: bytes as f64 / secs / 1e9,
                max_rel_err,
            });
        }
    }
    Ok(out)
}

/// Shapes of the synthetic decode benchmarks: (name, config).
pub fn synthetic_configs() -> Vec<(&'static str, LlamaConfig)> {
    let cfg = |layers, d, dff, heads, kv, vocab| {
        let json = serde_json::json!({
            "vocab_size": vocab, "hidden_size": d, "intermediate_size": dff,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "tie_word_embeddings": false,
        });
        serde_json::from_value::<LlamaConfig>(json).expect("a valid config")
    };
    vec![
        ("smollm2-135m", cfg(30, 576, 1536, 9, 3, 49152)),
        ("llama2-7b", cfg(32, 4096, 11008, 32, 32, 32000)),
        ("llama3-8b", cfg(32, 4096, 14336, 32, 8, 128256)),
    ]
}

/// Decode speed of one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeFigure {
    pub ms_per_token: f64,
    pub tokens_per_s: f64,
    /// Weight bytes read per token (linears and head).
    pub weight_bytes: usize,
    /// Weight bytes per token divided by the time per token.
    pub gb_per_s: f64,
    /// GPU memory the model allocated (weights, caches, scratch).
    pub gpu_bytes: usize,
}

/// Decode `tokens` tokens (after `warmup` more) from position 0 and time them.
pub fn decode(model: &mut GpuModel, warmup: usize, tokens: usize) -> Result<DecodeFigure> {
    let mut next = 1u32;
    for _ in 0..warmup {
        model.step(next)?;
    }
    let t0 = Instant::now();
    for i in 0..tokens {
        let logits = model.step(next)?;
        // Feed back something that depends on the logits, as a real decode loop does.
        next = (i as u32 + logits.len() as u32 / 2) % logits.len() as u32;
    }
    let secs = t0.elapsed().as_secs_f64() / tokens.max(1) as f64;
    let weight_bytes = model.weight_bytes_per_token();
    Ok(DecodeFigure {
        ms_per_token: secs * 1e3,
        tokens_per_s: 1.0 / secs,
        weight_bytes,
        gb_per_s: weight_bytes as f64 / secs / 1e9,
        gpu_bytes: model.gpu_bytes(),
    })
}

/// What `ostquant bench` measures.
#[derive(Debug, Clone)]
pub struct Options {
    pub device: DeviceChoice,
    /// Launches per GEMV shape.
    pub iters: usize,
    /// A model folder to decode with, besides the synthetic models.
    pub model: Option<PathBuf>,
    /// Synthetic models: "none", "all", or a comma-separated list of [`synthetic_configs`].
    pub synthetic: String,
    /// Tokens timed per decode run.
    pub tokens: usize,
}

/// Run the benchmarks of `o`, printing a table to `out` as figures arrive; return them all.
pub fn run(o: &Options, out: &mut dyn Write) -> Result<serde_json::Value> {
    let io = |e: std::io::Error| Error::other(format!("writing the report: {e}"));
    let open = || Gpu::open(o.device);
    let gpu = open()?;
    let device = format!(
        "{} ({:?}, {:?})",
        gpu.info.name, gpu.info.backend, gpu.info.device_type
    );
    writeln!(out, "device: {device}").map_err(io)?;
    let peak = read_gb_per_s(&gpu, 1024, o.iters)?;
    writeln!(
        out,
        "read bandwidth (streaming kernel, up to 1 GB): {peak:.1} GB/s"
    )
    .map_err(io)?;
    writeln!(
        out,
        "\nGEMV, {} launches per shape in one pass (GB/s: bytes read per launch / time):",
        o.iters
    )
    .map_err(io)?;
    writeln!(
        out,
        "{:>6} {:>6} {:>5} {:>9} {:>9} {:>8} {:>7} {:>9}",
        "out", "in", "W", "MB read", "µs/call", "GB/s", "of read", "rel err"
    )
    .map_err(io)?;
    let gemv = gemv(&gpu, &SHAPES, o.iters)?;
    for f in &gemv {
        writeln!(
            out,
            "{:>6} {:>6} {:>5} {:>9.2} {:>9.1} {:>8.1} {:>6.0}% {:>9.1e}",
            f.rows,
            f.cols,
            f.weights,
            f.bytes as f64 / 1e6,
            f.micros,
            f.gb_per_s,
            100.0 * f.gb_per_s / peak,
            f.max_rel_err
        )
        .map_err(io)?;
        if f.max_rel_err > 1e-4 {
            return Err(Error::other(format!(
                "{device}: the {} GEMV {}×{} is wrong (relative error {:.1e} against the f64 reference)",
                f.weights, f.rows, f.cols, f.max_rel_err
            )));
        }
    }
    drop(gpu);
    let configs = synthetic_configs();
    let wanted: Vec<&str> = match o.synthetic.as_str() {
        "none" => vec![],
        "all" => configs.iter().map(|(n, _)| *n).collect(),
        list => list.split(',').map(str::trim).collect(),
    };
    writeln!(
        out,
        "\ndecode ({} tokens after 4 warm-up, one command buffer per token, logits read back):",
        o.tokens
    )
    .map_err(io)?;
    writeln!(
        out,
        "{:<22} {:>6} {:>8} {:>8} {:>10} {:>8} {:>9}",
        "model", "W", "ms/tok", "tok/s", "weights MB", "GB/s", "GPU MB"
    )
    .map_err(io)?;
    let mut decode_rows = Vec::new();
    let mut row = |out: &mut dyn Write, name: &str, w: &str, f: &DecodeFigure| {
        decode_rows.push(serde_json::json!({"model": name, "weights": w, "figure": f}));
        writeln!(
            out,
            "{:<22} {:>6} {:>8.2} {:>8.1} {:>10.1} {:>8.1} {:>9.1}",
            name,
            w,
            f.ms_per_token,
            f.tokens_per_s,
            f.weight_bytes as f64 / 1e6,
            f.gb_per_s,
            f.gpu_bytes as f64 / 1e6
        )
    };
    for name in wanted {
        let Some((_, config)) = configs.iter().find(|(n, _)| *n == name) else {
            return Err(Error::other(format!(
                "--synthetic: unknown model {name}; choose from {}",
                configs
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let mut speed = Vec::new();
        for (w, kind) in [
            ("int4", SyntheticWeights::Int4),
            ("f16", SyntheticWeights::Half),
        ] {
            let mut m = GpuModel::synthetic(config.clone(), kind, true, open()?, 64)?;
            let f = decode(&mut m, 4, o.tokens)?;
            speed.push(f.tokens_per_s);
            row(out, name, w, &f).map_err(io)?;
        }
        writeln!(
            out,
            "{:<22} int4 / f16 decode speed: {:.2}×",
            "",
            speed[0] / speed[1]
        )
        .map_err(io)?;
    }
    if let Some(dir) = &o.model {
        let mut m = GpuModel::load(dir, open()?, 64)?;
        let w = if crate::model::qformat::is_quantized(dir) {
            "int4"
        } else {
            "f16"
        };
        let f = decode(&mut m, 4, o.tokens)?;
        row(out, &dir.display().to_string(), w, &f).map_err(io)?;
    }
    Ok(serde_json::json!({
        "device": device,
        "read_gb_per_s": peak,
        "gemv": gemv,
        "decode": decode_rows,
    }))
}
