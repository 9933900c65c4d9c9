//! The linear layers' products on the GPU: decode GEMVs y = W·x with W int4 (the model folder's
//! packing) times an f32 vector (shaders/gemv_w4a16.wgsl) or times integer activation codes
//! (W4A4: shaders/act_codes.wgsl then shaders/gemv_w4a4.wgsl), or W f16 (shaders/gemv_f16.wgsl);
//! and the prefill GEMMs Y = X·Wᵀ over many tokens (shaders/gemm_w4a16.wgsl,
//! shaders/gemm_w4a4.wgsl).

use burn::tensor::wgpu::wgpu;

use super::Gpu;
use super::host::HostLinear;
use super::kernel::{Dispatch, Kernel};
use crate::error::{Error, Result};
use crate::quant::quantizer::QuantSpec;

/// Workgroups per grid row; more use a second grid dimension.
const GRID_X: u32 = 32768;
/// Rows per workgroup of the f16 kernel: 8 teams of 32 lanes, one row each.
const HALF_ROWS: u32 = 8;

/// How an int4 GEMV shares a matrix among its workgroups' 8 teams of 32 lanes (the shaders'
/// RPT and KS; shaders/gemv_w4a16.wgsl).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Tiling {
    /// Rows per team (1, 2 or 4): each x load serves this many rows.
    pub rows: u32,
    /// Teams per set of rows (1, 2, 4 or 8), each walking a slice of the columns.
    pub slices: u32,
}

impl Tiling {
    /// The tilings the tests check and the benchmarks time: every rows-per-team choice alone,
    /// and the column splits that keep 2 or 4 rows' reuse on a grid as large as 1 row's.
    pub const ALL: [Tiling; 7] = [
        Tiling::new(1, 1),
        Tiling::new(2, 1),
        Tiling::new(4, 1),
        Tiling::new(2, 2),
        Tiling::new(2, 4),
        Tiling::new(4, 4),
        Tiling::new(4, 8),
    ];

    pub const fn new(rows: u32, slices: u32) -> Self {
        Tiling { rows, slices }
    }

    /// The runtime's tiling for a matrix of `rows` rows, on f32 activations or on integer
    /// `codes`. On a GPU (an H100, results/bench-h100-run12.txt): the W4A4 GEMV one row per
    /// team at every shape (r2 and r4 were 1.2–1.6× slower at the 7B shapes). The W4A16 GEMV
    /// reuses x across 4 rows from 8192 rows on; from 4096 rows, 2 rows per team with the
    /// columns split between 2 teams (r2k2: 22.6 and 23.9 µs against r2's 28.1 and 27.8 at
    /// 4096×11008, 12.1 and 14.8 against 14.2 and 15.9 at 4096×4096, warm runs 15 and 16);
    /// one row per team below. On a software device (CPU threads, compute-bound) always the
    /// most reuse.
    pub fn for_rows(rows: usize, codes: bool, software: bool) -> Self {
        match rows {
            _ if software => Tiling::new(4, 1),
            _ if codes => Tiling::new(1, 1),
            r if r >= 8192 => Tiling::new(4, 1),
            r if r >= 4096 => Tiling::new(2, 2),
            _ => Tiling::new(1, 1),
        }
    }

    /// Rows a workgroup covers.
    fn rows_per_workgroup(self) -> u32 {
        8 / self.slices * self.rows
    }

    fn check(self) {
        assert!(
            matches!(self.rows, 1 | 2 | 4) && matches!(self.slices, 1 | 2 | 4 | 8),
            "int4 GEMV tiling {self:?}: 1, 2 or 4 rows per team, 1, 2, 4 or 8 slices"
        );
    }
}

impl std::fmt::Display for Tiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}", self.rows)?;
        if self.slices > 1 {
            write!(f, "k{}", self.slices)?;
        }
        Ok(())
    }
}

/// Copy `rows` rows of `row_words` u32 each into rows padded to a whole number of vec4s.
fn pad_rows(words: &[u32], rows: usize, row_words: usize) -> (Vec<u32>, usize) {
    let stride = row_words.div_ceil(4);
    if stride * 4 == row_words {
        return (words.to_vec(), stride);
    }
    let mut out = vec![0u32; rows * stride * 4];
    for (r, row) in words.chunks_exact(row_words).enumerate() {
        out[r * stride * 4..r * stride * 4 + row_words].copy_from_slice(row);
    }
    (out, stride)
}

fn grid(rows: usize, per_group: u32) -> (u32, u32, u32) {
    let groups = (rows as u32).div_ceil(per_group);
    let gx = groups.min(GRID_X);
    (gx, groups.div_ceil(gx), 1)
}

/// RoPE in the epilogue of the stacked q, k and v product ([`Products::launch_rope`]): the
/// first `rows` rows are q's and k's heads of `head_dim` rows in RoPE pairs
/// ([`super::host::HostLinear::pair_rope_halves`]), turned by the angles of one position.
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    /// cos and sin of the position's angles, f32 [head_dim / 2] each.
    pub cos: &'a wgpu::Buffer,
    pub sin: &'a wgpu::Buffer,
    pub rows: usize,
    pub head_dim: usize,
}

/// What an int4 GEMV does with its results (the shaders' `store`).
#[derive(Clone, Copy)]
enum Store<'a> {
    Write,
    Add,
    /// SiLU(gate)·up of interleaved (gate, up) rows.
    SiluMul,
    /// Rows in RoPE pairs, rotated.
    Rope(Rope<'a>),
}

impl<'a> Store<'a> {
    /// The shaders' STORE_* value.
    fn code(self) -> u32 {
        match self {
            Store::Write => 0,
            Store::Add => 1,
            Store::SiluMul => 2,
            Store::Rope(_) => 3,
        }
    }

    /// The rows RoPE turns, the head dimension, and the cos and sin buffers (with other
    /// stores `stand_in` fills the bindings, which are then never read).
    fn rope(self, stand_in: &'a wgpu::Buffer) -> (u32, u32, &'a wgpu::Buffer, &'a wgpu::Buffer) {
        match self {
            Store::Rope(r) => (r.rows as u32, r.head_dim as u32, r.cos, r.sin),
            _ => (0, 1, stand_in, stand_in),
        }
    }

    /// The tiling for `rows` rows: `tiling` or the shape's choice ([`Tiling::for_rows`]), with
    /// at least 2 rows per team for `SiluMul` and `Rope` (a team holds whole pairs).
    fn tiling(self, tiling: Option<Tiling>, rows: usize, codes: bool, software: bool) -> Tiling {
        let t = tiling.unwrap_or_else(|| Tiling::for_rows(rows, codes, software));
        match self {
            Store::SiluMul | Store::Rope(_) => Tiling {
                rows: t.rows.max(2),
                ..t
            },
            _ => t,
        }
    }
}

/// The input of a product: f32 values, integer codes (the W4A4 kernels), or the residual
/// stream `h` to RMS-normalize with `weight` on the way in (the int4 GEMV only: the RMSNorm
/// launch before the product disappears).
#[derive(Clone, Copy)]
pub enum Input<'a> {
    F32(&'a wgpu::Buffer),
    Codes(&'a ActCodes),
    RmsNormed {
        h: &'a wgpu::Buffer,
        weight: &'a wgpu::Buffer,
        eps: f32,
    },
}

/// An int4 matrix [rows, cols] on the GPU, in the model folder's packing.
pub struct Int4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub spec: QuantSpec,
    stride: usize,
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
        let (padded, stride) = pad_rows(words, rows, cols / 8);
        Ok(Int4Matrix {
            rows,
            cols,
            spec,
            stride,
            words: gpu.storage("int4 words", &padded),
            scales: gpu.storage("int4 scales", scales),
            zeros: gpu.storage("int4 zeros", zeros.unwrap_or(&[])),
        })
    }

    /// Bytes one GEMV reads from this matrix: codes, scales and zeros.
    pub fn bytes(&self) -> usize {
        let groups = self.rows * (self.cols / self.spec.group.unwrap_or(self.cols));
        self.rows * self.cols / 2 + groups * 4 * (1 + !self.spec.sym as usize)
    }
}

/// An f16 matrix [rows, cols] on the GPU (two halves per u32, rows padded to vec4s).
pub struct HalfMatrix {
    pub rows: usize,
    pub cols: usize,
    stride: usize,
    words: wgpu::Buffer,
}

impl HalfMatrix {
    /// Upload f16 bit patterns, row-major [rows, cols], cols divisible by 8.
    pub fn upload(gpu: &Gpu, rows: usize, cols: usize, halves: &[u16]) -> Result<Self> {
        if !cols.is_multiple_of(8) || halves.len() != rows * cols {
            return Err(Error::other(format!(
                "f16 matrix {rows}×{cols}: {} values, or columns not divisible by 8",
                halves.len()
            )));
        }
        let words: Vec<u32> = halves
            .chunks_exact(2)
            .map(|h| h[0] as u32 | (h[1] as u32) << 16)
            .collect();
        let (padded, stride) = pad_rows(&words, rows, cols / 2);
        Ok(HalfMatrix {
            rows,
            cols,
            stride,
            words: gpu.storage("f16 weight", &padded),
        })
    }

    /// Round f32 values to f16 and upload them.
    pub fn from_f32(gpu: &Gpu, rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        let halves: Vec<u16> = w
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        Self::upload(gpu, rows, cols, &halves)
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.cols * 2
    }
}

/// A vector of activations as signed integer codes with one scale per group of columns
/// (shaders/act_codes.wgsl's layout), the input of the W4A4 GEMV.
pub struct ActCodes {
    /// Vectors (tokens) held.
    pub tokens: usize,
    pub cols: usize,
    pub group: usize,
    pub bits: u32,
    codes: wgpu::Buffer,
    scales: wgpu::Buffer,
}

impl ActCodes {
    /// Whether a vector of `cols` values quantized per `group` at `bits` bits fits the integer
    /// kernels: codes q − z in one signed byte, groups of whole 32-column blocks.
    pub fn fits(cols: usize, group: usize, bits: u32) -> bool {
        (1..=7).contains(&bits)
            && group > 0
            && group.is_multiple_of(32)
            && cols.is_multiple_of(group)
    }

    /// Room for `tokens` vectors of `cols` values.
    pub fn new(gpu: &Gpu, tokens: usize, cols: usize, group: usize, bits: u32) -> Result<Self> {
        if !Self::fits(cols, group, bits) {
            return Err(Error::other(format!(
                "integer activation codes: {cols} values in groups of {group} at {bits} bits do not fit the W4A4 kernels (groups of 32·k, at most 7 bits)"
            )));
        }
        Ok(ActCodes {
            tokens,
            cols,
            group,
            bits,
            // Two words per 8 columns: cols / 4 words per token (cols is a multiple of 32).
            codes: gpu.output("activation codes", tokens * cols / 4),
            scales: gpu.output("activation scales", tokens * cols / group),
        })
    }

    /// The largest code magnitude, 2^bits − 1 (the quantizers' qmax).
    pub fn qmax(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// The codes (u32 words) and the scales (f32), for kernels that write them.
    pub(crate) fn buffers(&self) -> (&wgpu::Buffer, &wgpu::Buffer) {
        (&self.codes, &self.scales)
    }

    /// The codes and the scales, read back (for tests).
    pub fn read(&self, gpu: &Gpu) -> Result<(Vec<u32>, Vec<f32>)> {
        let codes = gpu.read_f32(&self.codes, self.tokens * self.cols / 4)?;
        let scales = gpu.read_f32(&self.scales, self.tokens * self.cols / self.group)?;
        Ok((codes.into_iter().map(f32::to_bits).collect(), scales))
    }
}

/// A linear layer's weight on the GPU.
pub enum Linear {
    Int4(Int4Matrix),
    Half(HalfMatrix),
}

/// A borrowed matrix of either kind.
#[derive(Clone, Copy)]
enum Weights<'a> {
    Int4(&'a Int4Matrix),
    Half(&'a HalfMatrix),
}

impl<'a> From<&'a Linear> for Weights<'a> {
    fn from(w: &'a Linear) -> Self {
        match w {
            Linear::Int4(m) => Weights::Int4(m),
            Linear::Half(m) => Weights::Half(m),
        }
    }
}

impl Linear {
    /// Upload a host-side weight.
    pub fn upload(gpu: &Gpu, w: &HostLinear) -> Result<Self> {
        Ok(match w {
            HostLinear::Int4 {
                rows,
                cols,
                spec,
                words,
                scales,
                zeros,
            } => Linear::Int4(Int4Matrix::upload(
                gpu,
                *rows,
                *cols,
                *spec,
                words,
                scales,
                zeros.as_deref(),
            )?),
            HostLinear::Half { rows, cols, halves } => {
                Linear::Half(HalfMatrix::upload(gpu, *rows, *cols, halves)?)
            }
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Linear::Int4(m) => m.rows,
            Linear::Half(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Linear::Int4(m) => m.cols,
            Linear::Half(m) => m.cols,
        }
    }

    /// Bytes one GEMV reads from the weight.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Int4(m) => m.bytes(),
            Linear::Half(m) => m.bytes(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Int4Params {
    rows: u32,
    cols: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
    stride: u32,
    store: u32,
    eps: f32,
    rope_rows: u32,
    head_dim: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct HalfParams {
    rows: u32,
    cols: u32,
    grid_x: u32,
    stride: u32,
    accumulate: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct W4A4Params {
    rows: u32,
    cols: u32,
    group: u32,
    agroup: u32,
    qmin: f32,
    has_zeros: u32,
    grid_x: u32,
    stride: u32,
    store: u32,
    /// The GEMM's part boundaries (unused by the GEMV).
    split: [u32; 2],
    _pad: u32,
    /// The GEMV's RoPE store (unused by the GEMM).
    rope_rows: u32,
    head_dim: u32,
    _pad2: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GemmParams {
    rows: u32,
    cols: u32,
    tokens: u32,
    group: u32,
    qmin: f32,
    has_zeros: u32,
    stride: u32,
    accumulate: u32,
    split: [u32; 2],
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct HalfGemmParams {
    rows: u32,
    cols: u32,
    tokens: u32,
    stride: u32,
    accumulate: u32,
    split: [u32; 2],
    _pad: u32,
}

/// The weight group of `m` when the W4A4 kernels can take it with `x`: whole rows or blocks of
/// 32·k columns, one per activation code vector of the matrix's width.
fn w4a4_group(m: &Int4Matrix, x: &ActCodes) -> Result<usize> {
    let group = m.spec.group.unwrap_or(m.cols);
    if x.cols != m.cols || !(group == m.cols || group.is_multiple_of(32)) {
        return Err(Error::other(format!(
            "W4A4 product: {} activation codes for a {}×{} matrix with weight groups of {group} (groups must be whole rows or 32·k columns)",
            x.cols, m.rows, m.cols
        )));
    }
    Ok(group)
}

/// A GEMM's grid: 64-row × 32-token tiles.
fn gemm_grid(rows: usize, tokens: usize) -> (u32, u32, u32) {
    (rows.div_ceil(64) as u32, tokens.div_ceil(32) as u32, 1)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CodesParams {
    groups: u32,
    group: u32,
    qmax: f32,
    grid_x: u32,
    norm: u32,
    eps: f32,
    _pad: [u32; 2],
}

/// Variants of the W4A16 GEMV that the benchmark times beside it to find what bounds it
/// (PROBE in shaders/gemv_w4a16.wgsl). The runtime runs [`Probe::None`] only.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Probe {
    /// The kernel itself.
    None = 0,
    /// The whole kernel on x given as f16 pairs: half the x traffic.
    XHalf = 1,
    /// Weights read and unpacked, x never read.
    NoX = 2,
    /// x read, weights never read.
    NoWeights = 3,
    /// Weights and x read, one add per word in place of the arithmetic.
    NoMath = 4,
    /// The whole kernel with each step's weight words loaded a step ahead, in flight during
    /// the step before's arithmetic.
    Ahead = 5,
    /// The whole kernel decoding each code where it lies in its word: one and+or per code
    /// and one shift per word instead of a shift and an and+or per code.
    InPlace = 6,
    /// [`Probe::Ahead`] and [`Probe::InPlace`] together.
    AheadInPlace = 7,
    /// A walk of its own (the entry point `staged`): 16-byte weight loads per lane, x copied
    /// tile by tile into shared memory. Without RMSNorm only.
    Staged = 8,
}

impl Probe {
    /// The probes, the kernel itself excepted.
    pub const ALL: [Probe; 8] = [
        Probe::XHalf,
        Probe::NoX,
        Probe::NoWeights,
        Probe::NoMath,
        Probe::Ahead,
        Probe::InPlace,
        Probe::AheadInPlace,
        Probe::Staged,
    ];

    /// Whether the probe computes y = W·x (with [`Probe::XHalf`]'s x rounded to f16).
    pub fn is_whole(self) -> bool {
        !matches!(self, Probe::NoX | Probe::NoWeights | Probe::NoMath)
    }

    /// The benchmark table's name.
    pub fn name(self) -> &'static str {
        match self {
            Probe::None => "",
            Probe::XHalf => "x16",
            Probe::NoX => "no-x",
            Probe::NoWeights => "no-w",
            Probe::NoMath => "no-math",
            Probe::Ahead => "ahead",
            Probe::InPlace => "in-place",
            Probe::AheadInPlace => "ahead+in-place",
            Probe::Staged => "staged",
        }
    }
}

/// The two int4 GEMVs, compiled per tiling on first use.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Gemv {
    /// f32 x (gemv_w4a16.wgsl), `bool`: x RMS-normalized on the way in.
    W4A16(bool, Probe),
    /// Integer activation codes (gemv_w4a4.wgsl).
    W4A4,
}

/// The compiled GEMV kernels.
pub struct Products {
    /// The int4 GEMVs' sources (the lane exchange and store prepended) and their pipelines,
    /// one per kind and tiling, compiled when first launched.
    w4a16_source: String,
    w4a4_source: String,
    int4: std::sync::Mutex<std::collections::HashMap<(Gemv, Tiling), Kernel>>,
    act_codes: Kernel,
    gemm_w4a16: Kernel,
    gemm_w4a4: Kernel,
    gemm_f16: Kernel,
    half: Kernel,
    /// The device is a CPU adapter (lavapipe): see [`Tiling::for_rows`].
    pub software: bool,
    /// Lanes per subgroup in the int4 GEMVs' team sums (1: shared memory only).
    pub subgroup_lanes: u32,
}

impl Products {
    /// The kernels, the int4 GEMVs summing with subgroup shuffles where `gpu` has them.
    pub fn new(gpu: &Gpu) -> Self {
        Self::with_lanes(gpu, gpu.subgroup_lanes)
    }

    /// The kernels with `lanes` lanes per subgroup in the int4 GEMVs' team sums: 1 sums in
    /// shared memory only; more needs a device with subgroup operations whose subgroups are
    /// at least that wide (a power of two up to 32).
    pub fn with_lanes(gpu: &Gpu, lanes: u32) -> Self {
        assert!(
            lanes.is_power_of_two() && lanes <= 32 && (lanes == 1 || lanes <= gpu.subgroup_lanes),
            "{lanes} lanes per subgroup on a device with {}",
            gpu.subgroup_lanes
        );
        let prefix = if lanes > 1 {
            include_str!("../../../shaders/lanes_subgroup.wgsl")
        } else {
            include_str!("../../../shaders/lanes_shared.wgsl")
        };
        let store = include_str!("../../../shaders/gemv_store.wgsl");
        let gemm_out = include_str!("../../../shaders/gemm_out.wgsl");
        let gemm =
            |name: &'static str, body: &str| Kernel::new(gpu, name, &format!("{gemm_out}\n{body}"));
        Products {
            w4a16_source: format!(
                "{prefix}\n{store}\n{}",
                include_str!("../../../shaders/gemv_w4a16.wgsl")
            ),
            w4a4_source: format!(
                "{prefix}\n{store}\n{}",
                include_str!("../../../shaders/gemv_w4a4.wgsl")
            ),
            int4: Default::default(),
            subgroup_lanes: lanes,
            act_codes: Kernel::new(
                gpu,
                "act_codes",
                concat!(
                    include_str!("../../../shaders/act_pack.wgsl"),
                    include_str!("../../../shaders/act_codes.wgsl")
                ),
            ),
            gemm_w4a16: gemm(
                "gemm_w4a16",
                include_str!("../../../shaders/gemm_w4a16.wgsl"),
            ),
            gemm_w4a4: gemm("gemm_w4a4", include_str!("../../../shaders/gemm_w4a4.wgsl")),
            gemm_f16: gemm("gemm_f16", include_str!("../../../shaders/gemm_f16.wgsl")),
            half: Kernel::new(
                gpu,
                "gemv_f16",
                include_str!("../../../shaders/gemv_f16.wgsl"),
            ),
            software: matches!(gpu.info.device_type, wgpu::DeviceType::Cpu),
        }
    }

    /// The int4 GEMV `kind` for `tiling`, compiled on first use.
    fn int4_kernel(&self, gpu: &Gpu, kind: Gemv, tiling: Tiling) -> Kernel {
        tiling.check();
        let mut kernels = self.int4.lock().unwrap_or_else(|e| e.into_inner());
        kernels
            .entry((kind, tiling))
            .or_insert_with(|| {
                let constants = [
                    ("RPT", tiling.rows as f64),
                    ("KS", tiling.slices as f64),
                    ("SG", self.subgroup_lanes as f64),
                ];
                match kind {
                    Gemv::W4A16(norm, probe) => {
                        let more = [("NORM", norm as u32 as f64), ("PROBE", probe as u32 as f64)];
                        let constants = [&constants[..], &more].concat();
                        let entry = if probe == Probe::Staged {
                            assert!(!norm, "the staged W4A16 GEMV has no RMSNorm");
                            "staged"
                        } else {
                            "main"
                        };
                        Kernel::specialized(
                            gpu,
                            "gemv_w4a16",
                            &self.w4a16_source,
                            entry,
                            &constants,
                        )
                    }
                    Gemv::W4A4 => {
                        Kernel::specialized(gpu, "gemv_w4a4", &self.w4a4_source, "main", &constants)
                    }
                }
            })
            .clone()
    }

    /// The launch of y = W·x (x: `cols` f32, y: `rows` f32, both on the GPU).
    pub fn dispatch(&self, gpu: &Gpu, w: &Linear, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Dispatch {
        match w {
            Linear::Int4(m) => self.int4_f32(gpu, m, x, None, y, Store::Write, None, Probe::None),
            Linear::Half(m) => self.half_f32(gpu, m, x, y, false),
        }
    }

    /// The launch of y (+)= W·x (`accumulate`: a residual connection folded into the
    /// product), x any [`Input`] the matrix has a GEMV for; `tiling` overrides
    /// [`Tiling::for_rows`] for the int4 kernels (tests and benchmarks).
    pub fn launch(
        &self,
        gpu: &Gpu,
        w: &Linear,
        x: Input,
        y: &wgpu::Buffer,
        accumulate: bool,
        tiling: Option<Tiling>,
    ) -> Result<Dispatch> {
        let store = if accumulate { Store::Add } else { Store::Write };
        match (w, x) {
            (Linear::Int4(m), x) => self.int4(gpu, m, x, y, store, tiling),
            (Linear::Half(m), Input::F32(x)) => Ok(self.half_f32(gpu, m, x, y, accumulate)),
            (Linear::Half(_), _) => Err(Error::other(
                "an f16 matrix's GEMV takes f32 activations only (no codes, no RMSNorm on the way in)",
            )),
        }
    }

    /// The gated MLP's middle in one GEMV: y [rows / 2] = SiLU(gate·x)·(up·x) for the gate
    /// and up rows of `m` interleaved row by row
    /// ([`super::host::HostLinear::interleave_rows`]).
    pub fn launch_silu_mul(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: Input,
        y: &wgpu::Buffer,
        tiling: Option<Tiling>,
    ) -> Result<Dispatch> {
        self.int4(gpu, m, x, y, Store::SiluMul, tiling)
    }

    /// q, k and v in one GEMV with RoPE in its epilogue: `m` is the three stacked, q's and
    /// k's rows (the first `rope.rows`) in RoPE pairs, and y gets q and k turned by the
    /// position's angles, still paired, then v.
    pub fn launch_rope(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: Input,
        y: &wgpu::Buffer,
        rope: Rope,
        tiling: Option<Tiling>,
    ) -> Result<Dispatch> {
        if !rope.head_dim.is_multiple_of(2)
            || !rope.rows.is_multiple_of(rope.head_dim)
            || rope.rows > m.rows
        {
            return Err(Error::other(format!(
                "RoPE over {} of {} rows in heads of {}: expected whole heads of an even size",
                rope.rows, m.rows, rope.head_dim
            )));
        }
        self.int4(gpu, m, x, y, Store::Rope(rope), tiling)
    }

    fn half_f32(
        &self,
        gpu: &Gpu,
        m: &HalfMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        accumulate: bool,
    ) -> Dispatch {
        let g = grid(m.rows, HALF_ROWS);
        let params = HalfParams {
            rows: m.rows as u32,
            cols: m.cols as u32,
            grid_x: g.0,
            stride: m.stride as u32,
            accumulate: accumulate as u32,
            _pad: [0; 3],
        };
        self.half.dispatch(gpu, &params, &[&m.words, x, y], g)
    }

    /// The launch that quantizes `x` [tokens, cols] into `codes` (dynamic, per group;
    /// act_codes.wgsl).
    pub fn quantize(&self, gpu: &Gpu, x: &wgpu::Buffer, codes: &ActCodes) -> Dispatch {
        self.codes(gpu, x, None, codes)
    }

    /// The launch that RMS-normalizes each token of the residual stream `h` [tokens, cols]
    /// with the norm weight `w` and quantizes the result into `codes` (one group per token):
    /// the norm and the quantization of a linear's input in one launch.
    pub fn norm_quantize(
        &self,
        gpu: &Gpu,
        h: &wgpu::Buffer,
        w: &wgpu::Buffer,
        eps: f32,
        codes: &ActCodes,
    ) -> Result<Dispatch> {
        if codes.group != codes.cols {
            return Err(Error::other(format!(
                "RMSNorm into codes needs one group per token, not groups of {} in {}",
                codes.group, codes.cols
            )));
        }
        Ok(self.codes(gpu, h, Some((w, eps)), codes))
    }

    fn codes(
        &self,
        gpu: &Gpu,
        x: &wgpu::Buffer,
        norm: Option<(&wgpu::Buffer, f32)>,
        codes: &ActCodes,
    ) -> Dispatch {
        let groups = (codes.tokens * codes.cols / codes.group) as u32;
        let g = (groups.min(65535), groups.div_ceil(65535), 1);
        let params = CodesParams {
            groups,
            group: codes.group as u32,
            qmax: codes.qmax(),
            grid_x: g.0,
            norm: norm.is_some() as u32,
            eps: norm.map_or(0.0, |n| n.1),
            _pad: [0; 2],
        };
        let w = norm.map_or(x, |n| n.0);
        self.act_codes
            .dispatch(gpu, &params, &[x, &codes.codes, &codes.scales, w], g)
    }

    /// An int4 GEMV on any input, storing as `store` says.
    fn int4(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: Input,
        y: &wgpu::Buffer,
        store: Store,
        tiling: Option<Tiling>,
    ) -> Result<Dispatch> {
        match x {
            Input::F32(x) => Ok(self.int4_f32(gpu, m, x, None, y, store, tiling, Probe::None)),
            Input::RmsNormed { h, weight, eps } => Ok(self.int4_f32(
                gpu,
                m,
                h,
                Some((weight, eps)),
                y,
                store,
                tiling,
                Probe::None,
            )),
            Input::Codes(x) => self.int4_codes(gpu, m, x, y, store, tiling),
        }
    }

    /// The W4A16 GEMV on f32 x, RMS-normalized on the way in with `norm` (weight, eps).
    #[allow(clippy::too_many_arguments)]
    fn int4_f32(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: &wgpu::Buffer,
        norm: Option<(&wgpu::Buffer, f32)>,
        y: &wgpu::Buffer,
        store: Store,
        tiling: Option<Tiling>,
        probe: Probe,
    ) -> Dispatch {
        let tiling = store.tiling(tiling, m.rows, false, self.software);
        let g = grid(m.rows, tiling.rows_per_workgroup());
        let (rope_rows, head_dim, cos, sin) = store.rope(x);
        let params = Int4Params {
            rows: m.rows as u32,
            cols: m.cols as u32,
            group: m.spec.group.unwrap_or(m.cols) as u32,
            qmin: m.spec.qmin(),
            has_zeros: (!m.spec.sym) as u32,
            grid_x: g.0,
            stride: m.stride as u32,
            store: store.code(),
            eps: norm.map_or(0.0, |n| n.1),
            rope_rows,
            head_dim,
            _pad: 0,
        };
        // Without a norm the weight binding is unused: x stands in for it.
        let gamma = norm.map_or(x, |n| n.0);
        self.int4_kernel(gpu, Gemv::W4A16(norm.is_some(), probe), tiling)
            .dispatch(
                gpu,
                &params,
                &[&m.words, &m.scales, &m.zeros, x, y, gamma, cos, sin],
                g,
            )
    }

    /// y = W·x through the W4A16 GEMV's `probe` variant (x as f16 pairs for
    /// [`Probe::XHalf`]): the benchmark's diagnostic launches.
    pub fn launch_probe(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tiling: Tiling,
        probe: Probe,
    ) -> Dispatch {
        self.int4_f32(gpu, m, x, None, y, Store::Write, Some(tiling), probe)
    }

    /// The W4A4 GEMV (integer accumulation, dequant epilogue per 32-column block), storing
    /// as `store` says.
    fn int4_codes(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: &ActCodes,
        y: &wgpu::Buffer,
        store: Store,
        tiling: Option<Tiling>,
    ) -> Result<Dispatch> {
        let group = w4a4_group(m, x)?;
        let tiling = store.tiling(tiling, m.rows, true, self.software);
        let g = grid(m.rows, tiling.rows_per_workgroup());
        let (rope_rows, head_dim, cos, sin) = store.rope(&x.scales);
        let params = W4A4Params {
            rows: m.rows as u32,
            cols: m.cols as u32,
            group: group as u32,
            agroup: x.group as u32,
            qmin: m.spec.qmin(),
            has_zeros: (!m.spec.sym) as u32,
            grid_x: g.0,
            stride: m.stride as u32,
            store: store.code(),
            split: [0; 2],
            _pad: 0,
            rope_rows,
            head_dim,
            _pad2: [0; 2],
        };
        Ok(self.int4_kernel(gpu, Gemv::W4A4, tiling).dispatch(
            gpu,
            &params,
            &[
                &m.words, &m.scales, &m.zeros, &x.codes, &x.scales, y, cos, sin,
            ],
            g,
        ))
    }

    /// The launch of Y [tokens, rows] (+)= X [tokens, cols]·Wᵀ with X f32 (prefill).
    pub fn gemm(
        &self,
        gpu: &Gpu,
        w: &Linear,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tokens: usize,
        accumulate: bool,
    ) -> Dispatch {
        let plain = [w.rows(); 2];
        self.gemm_parts(gpu, w.into(), Input::F32(x), y, tokens, accumulate, plain)
            .expect("every matrix takes f32 input")
    }

    /// The launch of Y [tokens, rows] (+)= X·Wᵀ with X given as integer codes for all its
    /// tokens (W4A4 prefill).
    pub fn gemm_w4a4(
        &self,
        gpu: &Gpu,
        m: &Int4Matrix,
        x: &ActCodes,
        y: &wgpu::Buffer,
        accumulate: bool,
    ) -> Result<Dispatch> {
        let plain = [m.rows; 2];
        self.gemm_parts(
            gpu,
            Weights::Int4(m),
            Input::Codes(x),
            y,
            x.tokens,
            accumulate,
            plain,
        )
    }

    /// The launch of Y = X·Wᵀ for W the rows of several matrices stacked (q, k and v), split
    /// at rows `splits` into parts stored one after the other, each [tokens, its rows].
    pub fn gemm_stacked(
        &self,
        gpu: &Gpu,
        w: &Linear,
        x: Input,
        y: &wgpu::Buffer,
        tokens: usize,
        splits: [usize; 2],
    ) -> Result<Dispatch> {
        self.gemm_parts(gpu, w.into(), x, y, tokens, false, splits)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_parts(
        &self,
        gpu: &Gpu,
        w: Weights,
        x: Input,
        y: &wgpu::Buffer,
        tokens: usize,
        accumulate: bool,
        splits: [usize; 2],
    ) -> Result<Dispatch> {
        let rows = match w {
            Weights::Int4(m) => m.rows,
            Weights::Half(m) => m.rows,
        };
        let g = gemm_grid(rows, tokens);
        let split = splits.map(|s| s as u32);
        Ok(match (w, x) {
            (Weights::Int4(m), Input::F32(x)) => {
                let params = GemmParams {
                    rows: m.rows as u32,
                    cols: m.cols as u32,
                    tokens: tokens as u32,
                    group: m.spec.group.unwrap_or(m.cols) as u32,
                    qmin: m.spec.qmin(),
                    has_zeros: (!m.spec.sym) as u32,
                    stride: m.stride as u32,
                    accumulate: accumulate as u32,
                    split,
                    _pad: [0; 2],
                };
                self.gemm_w4a16
                    .dispatch(gpu, &params, &[&m.words, &m.scales, &m.zeros, x, y], g)
            }
            (Weights::Int4(m), Input::Codes(x)) => {
                let group = w4a4_group(m, x)?;
                if x.tokens < tokens {
                    return Err(Error::other(format!(
                        "W4A4 GEMM: codes of {} tokens for a product over {tokens}",
                        x.tokens
                    )));
                }
                let params = W4A4Params {
                    rows: m.rows as u32,
                    cols: m.cols as u32,
                    group: group as u32,
                    agroup: x.group as u32,
                    qmin: m.spec.qmin(),
                    has_zeros: (!m.spec.sym) as u32,
                    grid_x: tokens as u32, // the GEMM's token count
                    stride: m.stride as u32,
                    store: accumulate as u32, // the GEMM's `accumulate`
                    split,
                    _pad: 0,
                    rope_rows: 0,
                    head_dim: 1,
                    _pad2: [0; 2],
                };
                self.gemm_w4a4.dispatch(
                    gpu,
                    &params,
                    &[&m.words, &m.scales, &m.zeros, &x.codes, &x.scales, y],
                    g,
                )
            }
            (Weights::Half(m), Input::F32(x)) => {
                let params = HalfGemmParams {
                    rows: m.rows as u32,
                    cols: m.cols as u32,
                    tokens: tokens as u32,
                    stride: m.stride as u32,
                    accumulate: accumulate as u32,
                    split,
                    _pad: 0,
                };
                self.gemm_f16.dispatch(gpu, &params, &[&m.words, x, y], g)
            }
            (Weights::Half(_), Input::Codes(_)) => {
                return Err(Error::other(
                    "an f16 matrix has no integer-activation kernel",
                ));
            }
            (_, Input::RmsNormed { .. }) => {
                return Err(Error::other(
                    "the prefill GEMMs take their input normalized (an RMSNorm launch first)",
                ));
            }
        })
    }

    /// y = W·x, from and to the host (for tests and benchmarks of a single call).
    pub fn run(&self, gpu: &Gpu, w: &Linear, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != w.cols() {
            return Err(Error::other(format!(
                "GEMV: x has {} values, the matrix {} columns",
                x.len(),
                w.cols()
            )));
        }
        let xb = gpu.storage("x", x);
        let y = gpu.output("y", w.rows());
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        self.dispatch(gpu, w, &xb, &y).record(&mut enc);
        gpu.finish_f32(enc, &y, w.rows())
    }
}
