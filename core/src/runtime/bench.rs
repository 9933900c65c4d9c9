//! Runtime benchmarks: achieved memory bandwidth of the decode GEMVs (int4 and f16) against
//! the device's measured read bandwidth, and decode speed of whole models — on a wgpu device
//! (the WGSL kernels) or on the CPU (the CPU runtime's kernels).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::tensor::wgpu::wgpu;
use rand::{Rng, SeedableRng};

use super::host::{HostLinear, HostModel, SyntheticWeights};
use super::kernel::{Dispatch, Kernel, record_all};
use super::linear::{ActCodes, Input, Linear, Probe, Products, Tiling};
use super::model::GpuModel;
use super::{Gpu, Runtime, cpu};
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::qformat::ForwardSpec;
use crate::quant::quantizer::QuantSpec;

/// Bytes of weight copies a GPU GEMV timing cycles over: more than a GPU's last-level cache.
const L2_DEFEAT_BYTES: usize = 128_000_000;

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
    /// "int4" or "f16"; on a GPU "int4 rNkM" names the kernel's tiling ([`Tiling`]).
    pub weights: String,
    /// Bytes the kernel must read per call: weights, scales, the input vector.
    pub bytes: usize,
    pub micros: f64,
    pub gb_per_s: f64,
    /// Largest |GPU − f64 reference| / Σ|w·x| over the rows: the figure is of a correct kernel.
    pub max_rel_err: f64,
}

/// Untimed load before a kernel's first timing. An idle GPU's clocks rise with load over
/// this order of time: after one untimed pass of 100 launches (~10 ms) instead, the H100
/// timed its 7B-shape GEMVs ~3× slower per byte than a decode running the same kernels
/// (results/bench-h100-run14.txt).
const WARM_UP: Duration = Duration::from_millis(300);

/// Time `iters` launches cycling over `ds` recorded in one compute pass, after untimed passes
/// of the same launches for at least `warm_up` (one at least), then read `sync` back:
/// seconds per launch.
fn time(
    gpu: &Gpu,
    iters: usize,
    sync: &wgpu::Buffer,
    ds: &[Dispatch],
    warm_up: Duration,
) -> Result<f64> {
    let pass = || {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        record_all(&mut enc, ds.iter().cycle().take(iters));
        enc
    };
    let t0 = Instant::now();
    loop {
        gpu.finish_f32(pass(), sync, 1)?;
        if t0.elapsed() >= warm_up {
            break;
        }
    }
    let enc = pass();
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
    let secs = read_seconds(gpu, n4, 4096, iters)?;
    Ok((n4 * 16) as f64 / secs / 1e9)
}

/// The time of a launch that does next to nothing (one workgroup reading 1 KB), in a pass of
/// `iters` of them each waiting for the one before, as a decode's launches do: the floor under
/// every kernel's time, in µs.
pub fn launch_floor_us(gpu: &Gpu, iters: usize) -> Result<f64> {
    Ok(read_seconds(gpu, 64, 1, iters)? * 1e6)
}

/// Seconds per launch of shaders/read_bandwidth.wgsl over `n4` vec4s with `groups` workgroups.
fn read_seconds(gpu: &Gpu, n4: usize, groups: u32, iters: usize) -> Result<f64> {
    let data = gpu.output("bandwidth data", n4 * 4);
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
    time(gpu, iters, &out, &[d], WARM_UP)
}

/// Read bandwidth of the CPU: every thread folds its share of a 256 MB buffer with integer
/// adds (which vectorise, unlike a float sum's dependency chain), best of 5.
pub fn cpu_read_gb_per_s() -> f64 {
    use rayon::prelude::*;
    let data = vec![1u64; 32 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let sum = data
            .par_chunks(1 << 15)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        best = best.min(t0.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    (data.len() * 8) as f64 / best / 1e9
}

/// Where the GEMVs run.
enum Target<'g> {
    /// The runtime's kernels, and where they sum with subgroup shuffles, the same kernels
    /// summing in shared memory only (for comparison).
    Gpu(&'g Gpu, Box<Products>, Option<Box<Products>>),
    Cpu,
}

/// One timed kernel: its input (f32, or the W4A4 path's integer codes), its int4 tiling,
/// whether it sums in shared memory only, which W4A16 probe it is, and whether consecutive
/// launches write separate outputs (`free`).
#[derive(Clone, Copy)]
struct Variant {
    codes: bool,
    tiling: Option<Tiling>,
    shared: bool,
    probe: Probe,
    /// Launches cycle over [`FREE_OUTPUTS`] outputs, so wgpu needs no barrier between most
    /// of them and the GPU may overlap one's tail with the next one's start; otherwise every
    /// launch rewrites the same output and waits for the one before, as in decode.
    free: bool,
}

/// Outputs a `free` timing cycles over: a barrier (a drain of the GPU) every this many
/// launches at most.
const FREE_OUTPUTS: usize = 16;

impl Target<'_> {
    /// The kernel variants to time for `w`: on a GPU every int4 tiling of [`Tiling::ALL`]
    /// (on the software device, compute-bound, only the unsplit ones), with f32
    /// activations and with 4-bit integer activation codes; the runtime's choice again with
    /// shared-memory sums where the runtime's use subgroups; and with f32 activations, the
    /// runtime's choice as every [`Probe`]; and the runtime's choices (and the f16 GEMV) again
    /// with launches `free` of each other. The probes and free launches on a GPU only, not on
    /// the software device.
    fn variants(&self, w: &HostLinear) -> Vec<Variant> {
        let plain = Variant {
            codes: false,
            tiling: None,
            shared: false,
            probe: Probe::None,
            free: false,
        };
        match (self, w) {
            (Target::Gpu(_, k, shared), HostLinear::Int4 { .. }) => [false, true]
                .iter()
                .flat_map(|&codes| {
                    let software = k.software;
                    let picked = Some(Tiling::for_rows(w.rows(), codes, software));
                    let tilings = Tiling::ALL.into_iter();
                    let tilings = tilings.filter(move |t| !software || t.slices == 1);
                    let all = tilings.map(move |t| Variant {
                        codes,
                        tiling: Some(t),
                        ..plain
                    });
                    let smem = shared.as_ref().map(|_| Variant {
                        codes,
                        tiling: picked,
                        shared: true,
                        ..plain
                    });
                    // Probes and unchained launches say something of GPUs only.
                    let probes = Probe::ALL.into_iter().filter(move |_| !codes && !software);
                    let probes = probes.map(move |probe| Variant {
                        tiling: picked,
                        probe,
                        ..plain
                    });
                    let free = Variant {
                        codes,
                        tiling: picked,
                        free: true,
                        ..plain
                    };
                    let free = (!software).then_some(free);
                    all.chain(smem).chain(probes).chain(free)
                })
                .collect(),
            (Target::Gpu(_, k, _), _) if !k.software => vec![
                plain,
                Variant {
                    free: true,
                    ..plain
                },
            ],
            _ => vec![plain],
        }
    }

    /// The copies of `w` a GPU timing cycles over, uploaded once for all its variants (none
    /// on the CPU). Consecutive launches read different copies, so that the last-level cache
    /// (50 MB on an H100) cannot serve them: the figure is of memory, as in decode, where
    /// every matrix is read once per token.
    fn upload(&self, w: &HostLinear, iters: usize) -> Result<Vec<Linear>> {
        let Target::Gpu(gpu, kernel, _) = self else {
            return Ok(Vec::new());
        };
        let copies = match kernel.software {
            true => 1,
            false => L2_DEFEAT_BYTES.div_ceil(w.bytes()).clamp(1, iters),
        };
        (0..copies).map(|_| Linear::upload(gpu, w)).collect()
    }

    /// y = W·x once (for the correctness check), then seconds per call, the median of three
    /// rounds: `iters` launches in one compute pass on a GPU (cycling over `ms`, the copies
    /// of `w` from [`Target::upload`]), calls repeated for at least 0.1 s on the CPU. With
    /// integer codes, x is quantized once before the timed launches.
    fn run(
        &self,
        w: &HostLinear,
        ms: &[Linear],
        x: &[f32],
        iters: usize,
        v: Variant,
    ) -> Result<(Vec<f32>, f64)> {
        let mut rounds = Vec::new();
        let got = match self {
            Target::Gpu(gpu, kernel, shared) => {
                let kernel = match shared {
                    Some(k) if v.shared => k,
                    _ => kernel,
                };
                let xb = match v.probe {
                    Probe::XHalf => gpu.storage("x", &half_pairs(x)),
                    _ => gpu.storage("x", x),
                };
                let launches = if v.free {
                    ms.len().max(FREE_OUTPUTS)
                } else {
                    ms.len()
                };
                let outputs = if v.free { FREE_OUTPUTS } else { 1 };
                let ys: Vec<_> = (0..outputs).map(|_| gpu.output("y", w.rows())).collect();
                let y = &ys[0];
                // The codes path quantizes x once, before the timed launches.
                let codes = match v.codes {
                    true => Some(ActCodes::new(gpu, 1, w.cols(), w.cols(), 4)?),
                    false => None,
                };
                let x = match &codes {
                    Some(codes) => {
                        let mut enc = gpu.device.create_command_encoder(&Default::default());
                        kernel.quantize(gpu, &xb, codes).record(&mut enc);
                        gpu.queue.submit([enc.finish()]);
                        Input::Codes(codes)
                    }
                    None => Input::F32(&xb),
                };
                let ds = (0..launches)
                    .map(|i| {
                        let (m, y) = (&ms[i % ms.len()], &ys[i % outputs]);
                        match (m, v.probe, v.tiling) {
                            (Linear::Int4(m), probe, Some(t)) if probe != Probe::None => {
                                Ok(kernel.launch_probe(gpu, m, &xb, y, t, probe))
                            }
                            _ => kernel.launch(gpu, m, x, y, false, v.tiling),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                for round in 0..3 {
                    // A CPU adapter has no GPU clocks to bring up.
                    let warm_up = match round == 0 && !kernel.software {
                        true => WARM_UP,
                        false => Duration::ZERO,
                    };
                    rounds.push(time(gpu, iters, y, &ds, warm_up)?);
                }
                gpu.read_f32(y, w.rows())?
            }
            Target::Cpu => {
                let mut y = vec![0f32; w.rows()];
                cpu::kernels::gemv(w, x, &mut y);
                for _ in 0..3 {
                    let (t0, mut calls) = (Instant::now(), 0);
                    while calls < 3 || t0.elapsed().as_secs_f64() < 0.1 {
                        cpu::kernels::gemv(w, x, &mut y);
                        calls += 1;
                    }
                    rounds.push(t0.elapsed().as_secs_f64() / calls as f64);
                }
                y
            }
        };
        rounds.sort_by(f64::total_cmp);
        Ok((got, rounds[1]))
    }
}

/// Time GEMVs per shape, int4 (symmetric, per channel; on a GPU also on 4-bit integer
/// activations, "w4a4") and f16, each checked against an f64 reference on the same weights
/// (and the same fake-quantized activations).
fn gemv(target: &Target, shapes: &[(usize, usize)], iters: usize) -> Result<Vec<GemvFigure>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut out = Vec::new();
    for &(rows, cols) in shapes {
        let words: Vec<u32> = (0..rows * cols / 8).map(|_| rng.random()).collect();
        let spec = QuantSpec::sym(4);
        let scales = vec![0.01; rows];
        let w4 = crate::model::qformat::unpack(&words, &scales, None, rows, cols, &spec);
        let int4 = HostLinear::int4(rows, cols, spec, words, scales, None)?;
        let halves: Vec<u16> = (0..rows * cols)
            .map(|_| rng.random::<u16>() & 0x37FF)
            .collect();
        let w16: Vec<f32> = halves
            .iter()
            .map(|&h| half::f16::from_bits(h).to_f32())
            .collect();
        let f16 = HostLinear::Half { rows, cols, halves };
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut x4 = x.clone();
        cpu::kernels::act_quant(&mut x4, cols, 4);
        let x16: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        for (name, m, w) in [("int4", int4, w4), ("f16", f16, w16)] {
            let copies = target.upload(&m, iters)?;
            for v in target.variants(&m) {
                let (got, secs) = target.run(&m, &copies, &x, iters, v)?;
                let x = match (v.codes, v.probe) {
                    (true, _) => &x4,
                    (false, Probe::XHalf) => &x16,
                    _ => &x,
                };
                // The probes that leave out a read or the arithmetic compute nothing to check.
                let checked = v.probe.is_whole();
                let max_rel_err = (0..rows)
                    .map(|r| {
                        let row = &w[r * cols..(r + 1) * cols];
                        let dot = |f: fn(f64) -> f64| -> f64 {
                            row.iter()
                                .zip(x)
                                .map(|(&a, &b)| f(a as f64 * b as f64))
                                .sum()
                        };
                        (got[r] as f64 - dot(|v| v)).abs() / dot(f64::abs).max(1e-12)
                    })
                    .fold(0.0, f64::max);
                let max_rel_err = if checked { max_rel_err } else { f64::NAN };
                // Codes are one byte per column, f16 activations two, f32 four.
                let x_bytes = cols
                    * match (v.codes, v.probe) {
                        (true, _) => 1,
                        (false, Probe::XHalf) => 2,
                        _ => 4,
                    };
                let bytes = match v.probe {
                    Probe::NoX => m.bytes(),
                    Probe::NoWeights => x_bytes,
                    _ => m.bytes() + x_bytes,
                };
                let software = matches!(target, Target::Gpu(_, g, _) if g.software);
                let picked = if v.tiling == Some(Tiling::for_rows(rows, v.codes, software)) {
                    "*"
                } else {
                    ""
                };
                let name = if v.codes { "w4a4" } else { name };
                let picked = match (v.shared, v.probe, v.free) {
                    (true, ..) => format!("{picked} smem"),
                    (false, Probe::None, false) => picked.to_string(),
                    (false, Probe::None, true) => format!("{picked} free"),
                    (false, probe, _) => format!("{picked} {}", probe.name()),
                };
                out.push(GemvFigure {
                    rows,
                    cols,
                    weights: match v.tiling {
                        Some(t) => format!("{name} {t}{picked}"),
                        None => format!("{name}{picked}").trim_end().to_string(),
                    },
                    bytes,
                    micros: secs * 1e6,
                    gb_per_s: bytes as f64 / secs / 1e9,
                    max_rel_err,
                });
            }
        }
    }
    Ok(out)
}

/// f32 values as f16 pairs, two per word (low half first): x for [`Probe::XHalf`].
fn half_pairs(x: &[f32]) -> Vec<u32> {
    x.chunks(2)
        .map(|p| {
            let h = |i: usize| {
                p.get(i)
                    .map_or(0, |&v| half::f16::from_f32(v).to_bits() as u32)
            };
            h(0) | h(1) << 16
        })
        .collect()
}

/// A GEMV's relative error in the table: "-" for a probe that computes nothing to check.
struct RelErr(f64);

impl std::fmt::Display for RelErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.is_nan() {
            true => f.pad("-"),
            false => f.pad(&format!("{:.1e}", self.0)),
        }
    }
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
    /// Memory the model holds on its device: GPU memory allocated (weights, caches, scratch),
    /// or the host bytes of the weights on the CPU.
    pub device_bytes: usize,
    /// On a GPU, ms per token of the streaming decode loop (greedy; each token picked on the
    /// GPU) with one step in flight and with the next step submitted before the host reads
    /// the token ([`GpuModel::stream_ahead`] 1 and 2).
    pub streamed_ms_per_token: Option<[f64; 2]>,
}

/// Decode `tokens` tokens (after `warmup` more) from position 0 and time them.
pub fn decode(model: &mut Runtime, warmup: usize, tokens: usize) -> Result<DecodeFigure> {
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
        device_bytes: model.device_bytes(),
        streamed_ms_per_token: streamed(model, warmup, tokens)?,
    })
}

/// Ms per token of the GPU's streaming decode (greedy, from position 0) with 1 and 2 steps in
/// flight, timed after `warmup` tokens; `None` on the CPU, which steps.
fn streamed(model: &mut Runtime, warmup: usize, tokens: usize) -> Result<Option<[f64; 2]>> {
    let Runtime::Gpu(m) = model else {
        return Ok(None);
    };
    if tokens == 0 || m.prepare_streaming().is_err() {
        return Ok(None);
    }
    let mut ms = [0.0; 2];
    for (in_flight, ms) in [1, 2].into_iter().zip(&mut ms) {
        m.len = 0;
        let (mut seen, mut t0) = (0, Instant::now());
        m.stream_ahead(in_flight, 1, &mut || super::ops::Pick::Greedy, &mut |_| {
            seen += 1;
            if seen == warmup {
                t0 = Instant::now();
            }
            seen < warmup + tokens
        })?;
        *ms = t0.elapsed().as_secs_f64() * 1e3 / tokens as f64;
    }
    Ok(Some(ms))
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
    /// Prompt lengths whose prefill is timed on the synthetic models (none: no prefill).
    pub prefill: Vec<usize>,
}

/// Run the benchmarks of `o`, printing a table to `out` as figures arrive; return them all.
/// `--device cpu` measures the CPU runtime; any other choice the WGSL kernels on that device.
pub fn run(o: &Options, out: &mut dyn Write) -> Result<serde_json::Value> {
    let io = |e: std::io::Error| Error::other(format!("writing the report: {e}"));
    let on_cpu = o.device == DeviceChoice::Cpu;
    let gpu = if on_cpu {
        None
    } else {
        Some(Gpu::open(o.device)?)
    };
    let (device, peak, target) = match &gpu {
        Some(gpu) => (
            format!(
                "{} ({:?}, {:?}; {})",
                gpu.info.name,
                gpu.info.backend,
                gpu.info.device_type,
                match gpu.subgroup_lanes {
                    1 => "no subgroup operations: int4 GEMV sums in shared memory".to_string(),
                    n => format!("int4 GEMV sums over subgroups of {n} lanes"),
                }
            ),
            read_gb_per_s(gpu, 1024, o.iters)?,
            Target::Gpu(
                gpu,
                Box::new(Products::new(gpu)),
                (gpu.subgroup_lanes > 1).then(|| Box::new(Products::with_lanes(gpu, 1))),
            ),
        ),
        None => (
            format!("{} ({})", cpu_name(), cpu::kernels::instruction_set()),
            cpu_read_gb_per_s(),
            Target::Cpu,
        ),
    };
    writeln!(out, "device: {device}").map_err(io)?;
    let (probe, calls) = if on_cpu {
        (
            format!("{} threads summing 256 MB", rayon::current_num_threads()),
            "calls repeated for 0.1 s, median of 3 rounds".to_string(),
        )
    } else {
        (
            "streaming kernel, up to 1 GB".to_string(),
            format!(
                "{} launches per shape in one pass cycling over copies of the weights (128 MB of them, at most one per launch: the last-level cache does not serve the large shapes), median of 3 rounds after {} ms of untimed launches; int4 rNkM: N rows per team, M teams per row set splitting the columns, * the one the runtime picks, smem: summed in shared memory only; probes of the W4A16 GEMV at the runtime's tiling, to find what bounds it: x16 (x as f16 pairs, a whole kernel), no-x (x never read), no-w (weights never read), no-math (one add per word for the arithmetic), ahead (each step's weights loaded a step early), in-place (codes decoded where they lie in the word), ahead+in-place (both), staged (16-byte weight loads per lane, x tiled through shared memory; these four whole kernels); free: launches writing {FREE_OUTPUTS} outputs in turn, so that most need not wait for the one before (elsewhere every launch rewrites one output and waits, as in decode)",
                o.iters,
                WARM_UP.as_millis()
            ),
        )
    };
    writeln!(out, "read bandwidth ({probe}): {peak:.1} GB/s").map_err(io)?;
    let floor = gpu
        .as_ref()
        .map(|gpu| launch_floor_us(gpu, o.iters))
        .transpose()?;
    if let Some(us) = floor {
        writeln!(
            out,
            "launch floor (one workgroup reading 1 KB, {} launches in one pass, each waiting for the one before): {us:.1} µs",
            o.iters
        )
        .map_err(io)?;
    }
    writeln!(out, "\nGEMV, {calls} (GB/s: bytes read per call / time):").map_err(io)?;
    writeln!(
        out,
        "{:>6} {:>6} {:>23} {:>9} {:>9} {:>8} {:>7} {:>9}",
        "out", "in", "W", "MB read", "µs/call", "GB/s", "of read", "rel err"
    )
    .map_err(io)?;
    if on_cpu {
        writeln!(
            out,
            "(repeated calls find the smaller matrices in the CPU's caches: above 100% means cache)"
        )
        .map_err(io)?;
    }
    let gemv = gemv(&target, &SHAPES, o.iters)?;
    for f in &gemv {
        writeln!(
            out,
            "{:>6} {:>6} {:>23} {:>9.2} {:>9.1} {:>8.1} {:>6.0}% {:>9}",
            f.rows,
            f.cols,
            f.weights,
            f.bytes as f64 / 1e6,
            f.micros,
            f.gb_per_s,
            100.0 * f.gb_per_s / peak,
            RelErr(f.max_rel_err)
        )
        .map_err(io)?;
        if f.max_rel_err > 1e-4 {
            return Err(Error::other(format!(
                "{device}: the {} GEMV {}×{} is wrong (relative error {:.1e} against the f64 reference)",
                f.weights, f.rows, f.cols, f.max_rel_err
            )));
        }
    }
    drop(target);
    drop(gpu);
    // A fresh device per model, so each one's memory figure is its own; room for the longest
    // prompt timed.
    let max_seq = o.prefill.iter().copied().max().unwrap_or(0).max(64);
    let on = |host: &HostModel| -> Result<Runtime> {
        Ok(if on_cpu {
            Runtime::Cpu(Box::new(cpu::CpuModel::new(host.clone(), max_seq)?))
        } else {
            Runtime::Gpu(Box::new(GpuModel::upload(
                host,
                Gpu::open(o.device)?,
                max_seq,
            )?))
        })
    };
    let mut prefill_rows: Vec<(String, &str, usize, f64)> = Vec::new();
    let configs = synthetic_configs();
    let wanted: Vec<&str> = match o.synthetic.as_str() {
        "none" => vec![],
        "all" => configs.iter().map(|(n, _)| *n).collect(),
        list => list.split(',').map(str::trim).collect(),
    };
    let per_token = if on_cpu {
        "logits returned"
    } else {
        "one command buffer per token, logits read back"
    };
    writeln!(
        out,
        "\ndecode ({} tokens after 4 warm-up, {per_token}; as OSTQuant folders run: int4 = W4A16KV16 with the online down_proj Hadamard, w4a4 = W4A4KV4 with per-token 4-bit activations, a 4-bit KV cache and the online Hadamards of the down_proj input and of Q/K per head; f16 = the original model; 16-bit KV caches held as f32):",
        o.tokens
    )
    .map_err(io)?;
    let mem = if on_cpu { "host MB" } else { "GPU MB" };
    writeln!(
        out,
        "{:<22} {:>6} {:>8} {:>8} {:>10} {:>8} {:>9}",
        "model", "W", "ms/tok", "tok/s", "weights MB", "GB/s", mem
    )
    .map_err(io)?;
    let mut decode_rows = Vec::new();
    let mut breakdowns = Vec::new();
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
            f.device_bytes as f64 / 1e6
        )?;
        match f.streamed_ms_per_token {
            Some([one, two]) => writeln!(
                out,
                "{:<22} streamed (next token picked on the GPU): {one:.2} ms/tok one step at a time, {two:.2} ms/tok with the next step submitted before the host reads the token",
                ""
            ),
            None => Ok(()),
        }
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
        for (w, kind, act4) in [
            ("int4", SyntheticWeights::Int4, false),
            ("w4a4", SyntheticWeights::Int4, true),
            ("f16", SyntheticWeights::Half, false),
        ] {
            // As an OSTQuant folder runs them: W4A16KV16 with the online down_proj Hadamard,
            // W4A4KV4 with it and the Q/K Hadamard; f16 is the original model.
            let rotated = matches!(kind, SyntheticWeights::Int4);
            let forward = ForwardSpec {
                down_hadamard: rotated,
                qk_hadamard: act4,
                act: act4.then(|| QuantSpec::asym(4)),
                kv: act4.then(|| QuantSpec::asym(4)),
            };
            let mut m = on(&HostModel::synthetic(config.clone(), kind, forward)?)?;
            let f = decode(&mut m, 4, o.tokens)?;
            speed.push(f.tokens_per_s);
            row(out, name, w, &f).map_err(io)?;
            if let Some(b) = breakdown(out, &m, o.tokens)? {
                breakdowns.push(serde_json::json!({"model": name, "weights": w, "breakdown": b}));
            }
            for &len in &o.prefill {
                let prompt: Vec<u32> = (0..len as u32).map(|i| 1 + i % 1000).collect();
                m.reset();
                let t0 = Instant::now();
                m.prefill(&prompt)?;
                prefill_rows.push((name.to_string(), w, len, t0.elapsed().as_secs_f64()));
            }
        }
        writeln!(
            out,
            "{:<22} decode speed over f16: int4 {:.2}×, w4a4 {:.2}×",
            "",
            speed[0] / speed[2],
            speed[1] / speed[2]
        )
        .map_err(io)?;
    }
    if !prefill_rows.is_empty() {
        let how = if on_cpu {
            "position by position"
        } else {
            "GEMMs over chunks of 128 (and 16) positions"
        };
        writeln!(
            out,
            "\nprefill (the whole prompt in one call, {how}, last logits read back):"
        )
        .map_err(io)?;
        writeln!(
            out,
            "{:<22} {:>6} {:>7} {:>10} {:>9}",
            "model", "W", "tokens", "ms", "tok/s"
        )
        .map_err(io)?;
        for (name, w, len, secs) in &prefill_rows {
            writeln!(
                out,
                "{:<22} {:>6} {:>7} {:>10.1} {:>9.0}",
                name,
                w,
                len,
                secs * 1e3,
                *len as f64 / secs
            )
            .map_err(io)?;
        }
        for (name, _, len, _) in prefill_rows.iter().filter(|r| r.1 == "f16") {
            let time = |w: &str| {
                prefill_rows
                    .iter()
                    .find(|r| &r.0 == name && r.1 == w && r.2 == *len)
                    .map_or(f64::NAN, |r| r.3)
            };
            writeln!(
                out,
                "{:<22} prefill speed over f16 at {len} tokens: int4 {:.2}×, w4a4 {:.2}×",
                name,
                time("f16") / time("int4"),
                time("f16") / time("w4a4")
            )
            .map_err(io)?;
        }
    }
    if let Some(dir) = &o.model {
        let host = HostModel::load(dir)?;
        let w = if crate::model::qformat::is_quantized(dir) {
            "int4"
        } else {
            "f16"
        };
        let mut m = on(&host).map_err(|e| Error::other(format!("{}: {e}", dir.display())))?;
        let f = decode(&mut m, 4, o.tokens)?;
        let name = dir.display().to_string();
        row(out, &name, w, &f).map_err(io)?;
        if let Some(b) = breakdown(out, &m, o.tokens)? {
            breakdowns.push(serde_json::json!({"model": name, "weights": w, "breakdown": b}));
        }
    }
    Ok(serde_json::json!({
        "device": device,
        "read_gb_per_s": peak,
        "launch_floor_us": floor,
        "gemv": gemv,
        "decode": decode_rows,
        "breakdown": breakdowns,
        "prefill": prefill_rows
            .iter()
            .map(|(m, w, t, secs)| serde_json::json!({"model": m, "weights": w, "tokens": t, "seconds": secs}))
            .collect::<Vec<_>>(),
    }))
}

/// On a GPU, where a decode token's time goes ([`GpuModel::breakdown`]), printed under its
/// decode row.
fn breakdown(
    out: &mut dyn Write,
    m: &Runtime,
    reps: usize,
) -> Result<Option<super::model::Breakdown>> {
    let Runtime::Gpu(g) = m else {
        return Ok(None);
    };
    let b = g.breakdown(reps)?;
    writeln!(
        out,
        "{:<22} replayed without the host: {:.2} ms/tok; {} GEMV launches alone {:.2} ms, the other {} launches alone {:.2} ms",
        "",
        b.all * 1e3,
        b.gemv_launches,
        b.gemv * 1e3,
        b.launches - b.gemv_launches,
        b.rest * 1e3
    )
    .map_err(|e| Error::other(format!("writing the report: {e}")))?;
    let kernels: Vec<String> = b
        .kernels
        .iter()
        .map(|(name, n, secs)| format!("{name} ×{n} {:.2}", secs * 1e3))
        .collect();
    writeln!(
        out,
        "{:<22} the rest by kernel (ms): {}",
        "",
        kernels.join(", ")
    )
    .map_err(|e| Error::other(format!("writing the report: {e}")))?;
    Ok(Some(b))
}

/// The CPU's model name (Linux), or the architecture.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
        + &format!(", {} threads", rayon::current_num_threads())
}
