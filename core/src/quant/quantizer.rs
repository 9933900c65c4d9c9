//! Uniform fake quantizers (SPEC §6): symmetric [-2^(b-1), 2^(b-1)-1] and asymmetric [0, 2^b-1],
//! per row or per group, with the MSE clip search used for weights.
//!
//! Both forms force the range to contain zero (xmin ≤ 0 ≤ xmax), as the reference does.

use serde::{Deserialize, Serialize};

/// How one tensor is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantSpec {
    pub bits: u32,
    pub sym: bool,
    /// Elements sharing one scale; `None` means a whole row (per channel / per token).
    pub group: Option<usize>,
}

impl QuantSpec {
    pub fn sym(bits: u32) -> Self {
        QuantSpec {
            bits,
            sym: true,
            group: None,
        }
    }
    pub fn asym(bits: u32) -> Self {
        QuantSpec {
            bits,
            sym: false,
            group: None,
        }
    }
    pub fn with_group(self, group: usize) -> Self {
        QuantSpec {
            group: Some(group),
            ..self
        }
    }
    pub fn qmax(&self) -> f32 {
        if self.sym {
            ((1u32 << (self.bits - 1)) - 1) as f32
        } else {
            ((1u32 << self.bits) - 1) as f32
        }
    }
    pub fn qmin(&self) -> f32 {
        if self.sym {
            -((1u32 << (self.bits - 1)) as f32)
        } else {
            0.0
        }
    }
}

/// The quantization grid of one group: x̂ = (q − zero)·scale for integer codes q.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub scale: f32,
    pub zero: f32,
}

impl Grid {
    /// The integer code of a value already on this grid.
    pub fn code(&self, spec: &QuantSpec, x: f32) -> i32 {
        ((x / self.scale).round() + self.zero).clamp(spec.qmin(), spec.qmax()) as i32
    }
    pub fn value(&self, q: i32) -> f32 {
        (q as f32 - self.zero) * self.scale
    }
}

/// The grids of one layer's seven linear weights (q, k, v, o, gate, up, down), each row-major
/// [rows, groups].
pub type LayerGrids = [Vec<Grid>; 7];

/// Scale and zero point of a group whose values lie in [xmin, xmax].
pub fn params(spec: &QuantSpec, xmin: f32, xmax: f32) -> (f32, f32) {
    let (xmin, xmax) = (xmin.min(0.0), xmax.max(0.0));
    if spec.sym {
        // s = max(xmax/qmax, xmin/qmin): [-8, 7] for 4 bits, not absmax/7.
        let xmax = xmax.max(1e-6);
        ((xmax / spec.qmax()).max(xmin / spec.qmin()), 0.0)
    } else {
        let s = (xmax - xmin).max(1e-6) / spec.qmax();
        (s, (-xmin / s).round())
    }
}

/// x̂ = (clamp(round(x/s) + z, qmin, qmax) − z)·s
#[inline]
pub fn fake_quant_value(x: f32, spec: &QuantSpec, scale: f32, zero: f32) -> f32 {
    (((x / scale).round() + zero).clamp(spec.qmin(), spec.qmax()) - zero) * scale
}

fn min_max(g: &[f32]) -> (f32, f32) {
    g.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Fake-quantize one group in place with its min/max range shrunk by `clip` (1.0 = none).
pub fn fake_quant_group(g: &mut [f32], spec: &QuantSpec, clip: f32) {
    let (lo, hi) = min_max(g);
    let (s, z) = params(spec, lo * clip, hi * clip);
    for x in g.iter_mut() {
        *x = fake_quant_value(*x, spec, s, z);
    }
}

/// Error power of the weights' clip search (RTN, GPTQ and the weights seen in calibration):
/// Σ|x − q(x)|^2.4, as the reference's `w_clip`.
pub const CLIP_POWER: f32 = 2.4;

/// The shrink factors of the clip search: 1.00, 0.99, …, 0.21 (80 values).
pub fn clip_candidates() -> impl Iterator<Item = f32> {
    (0..80).map(|i| 1.0 - i as f32 / 100.0)
}

/// Σ |x − q(x)|^p of a group quantized with shrink factor `clip`.
pub fn clip_error(g: &[f32], spec: &QuantSpec, clip: f32, p: f32) -> f64 {
    clip_error_below(g, spec, clip, p, f64::INFINITY)
}

/// [`clip_error`], but it may stop and return any value above `bound` once the partial sum
/// exceeds it (the search only needs to know that a candidate loses).
///
/// The inner loop has no libm call and no branch, so it vectorizes: libm's `powf` and
/// `roundf` were two thirds of GPTQ's time.
fn clip_error_below(g: &[f32], spec: &QuantSpec, clip: f32, p: f32, bound: f64) -> f64 {
    let (lo, hi) = min_max(g);
    let (s, z) = params(spec, lo * clip, hi * clip);
    let (qmin, qmax) = (spec.qmin(), spec.qmax());
    let mut sum = 0.0f64;
    for chunk in g.chunks(64) {
        sum += quant_error_sum(chunk, s, z, qmin, qmax, p);
        if sum > bound {
            break;
        }
    }
    sum
}

/// Σ |x − q(x)|^p over `xs`, in eight f32 lanes; on x86 with AVX2 in 256-bit registers.
#[inline(never)]
fn quant_error_sum(xs: &[f32], s: f32, z: f32, qmin: f32, qmax: f32, p: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { quant_error_sum_avx2(xs, s, z, qmin, qmax, p) };
    }
    quant_error_sum_portable(xs, s, z, qmin, qmax, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quant_error_sum_avx2(xs: &[f32], s: f32, z: f32, qmin: f32, qmax: f32, p: f32) -> f64 {
    quant_error_sum_portable(xs, s, z, qmin, qmax, p)
}

// Inlined into both copies above (which stay out of line: inlined into the search, the loop
// stays scalar).
#[inline(always)]
fn quant_error_sum_portable(xs: &[f32], s: f32, z: f32, qmin: f32, qmax: f32, p: f32) -> f64 {
    // fake_quant_value with the vectorizable rounding (the same q for every finite x).
    let err = |x: f32| {
        let q = ((round_half_away(x / s) + z).max(qmin).min(qmax) - z) * s;
        pow_abs(x - q, p)
    };
    let mut lanes = [0.0f32; 8];
    let mut eights = xs.chunks_exact(8);
    for c in &mut eights {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += err(x);
        }
    }
    for (l, &x) in lanes.iter_mut().zip(eights.remainder()) {
        *l += err(x);
    }
    lanes.iter().map(|&l| l as f64).sum()
}

/// Adding 1.5·2²³ to an f32 below 2²² in magnitude leaves no fraction bits: the sum is
/// rounded to an integer (ties to even), and its low mantissa bits hold that integer + 2²².
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `u.round()` (half away from zero) for |u| ≤ 2²², larger magnitudes clamped to 2²² (every
/// quantizer clamps far below that). Plain arithmetic instead of a libm call, so it vectorizes.
#[inline(always)]
pub fn round_half_away(u: f32) -> f32 {
    let a = u.abs().min(4_194_304.0);
    let even = (a + ROUNDING_MAGIC) - ROUNDING_MAGIC;
    // A tie rounded down to even goes up instead (a − even is exact).
    let r = even + if a - even == 0.5 { 1.0 } else { 0.0 };
    r.copysign(u)
}

/// |x|^p for p > 0 as exp2(p·log2|x|) with short polynomials: relative error below 1e-5
/// (mostly the f32 rounding of p·log2|x|) wherever the result is at least 2⁻¹²⁶; smaller
/// results (and |x| = 0) give about 1e-38.
/// Plain arithmetic instead of libm's `powf`, so it vectorizes.
#[inline(always)]
pub fn pow_abs(x: f32, p: f32) -> f32 {
    exp2(p * log2(x.abs().max(1e-30)))
}

/// log2 of a positive normal x.
#[inline(always)]
fn log2(x: f32) -> f32 {
    let bits = x.to_bits();
    // Wrapping integer ops: overflow checks (debug builds) would keep the loops scalar.
    let e = ((bits >> 23) as i32).wrapping_sub(127) as f32;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // x = m·2^e, m in [1, 2)
    // Fold m into [√½, √2) so the series below converges fast (|t| ≤ 0.172).
    let big = m > std::f32::consts::SQRT_2;
    let (m, e) = if big { (m * 0.5, e + 1.0) } else { (m, e) };
    // ln m = 2·atanh t = 2(t + t³/3 + t⁵/5 + t⁷/7 + t⁹/9 + …), t = (m − 1)/(m + 1).
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let ln_m = t * (2.0 + t2 * (2.0 / 3.0 + t2 * (0.4 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0)))));
    e + ln_m * std::f32::consts::LOG2_E
}

/// 2^y, y clamped to [−126, 127].
#[inline(always)]
fn exp2(y: f32) -> f32 {
    let y = y.clamp(-126.0, 127.0);
    let shifted = y + ROUNDING_MAGIC;
    let n = shifted - ROUNDING_MAGIC; // round(y)
    let f = (y - n) * std::f32::consts::LN_2; // 2^(y − n) = e^f, |f| ≤ ln2/2
    // Taylor series of e^f to f⁷/7! (next term below 3e-9 for |f| ≤ 0.347).
    let ef = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f / 5040.0))))));
    // The low bits of `shifted` are n + 2²² (as an integer): build 2^n from them.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(0x4b40_0000);
    ef * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// The shrink factor with the smallest Σ|x − q(x)|^p (ties: the larger factor).
///
/// Every candidate is scored, but a coarse pass (every 8th factor) runs first: its best is
/// usually close to the optimum, so most of the remaining candidates lose within their first
/// chunk of values and stop there. The answer is the full scan's: a candidate stops only once
/// its error exceeds the best so far.
pub fn search_clip(g: &[f32], spec: &QuantSpec, p: f32) -> f32 {
    const COARSE: usize = 8;
    let candidates: Vec<f32> = clip_candidates().collect();
    let coarse = candidates.iter().step_by(COARSE);
    let fine = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| i % COARSE != 0)
        .map(|(_, c)| c);
    let mut best = (f64::INFINITY, 1.0f32);
    for &c in coarse.chain(fine) {
        let e = clip_error_below(g, spec, c, p, best.0);
        if e < best.0 || (e == best.0 && c > best.1) {
            best = (e, c);
        }
    }
    best.1
}

/// Scale and zero point of a group after the clip search of error power `p` (none: min/max).
pub fn search_params(g: &[f32], spec: &QuantSpec, clip_power: Option<f32>) -> (f32, f32) {
    let clip = clip_power.map_or(1.0, |p| search_clip(g, spec, p));
    let (lo, hi) = min_max(g);
    params(spec, lo * clip, hi * clip)
}

/// Fake-quantize a row-major [rows, cols] matrix row by row (groups along the row), optionally
/// with the per-group clip search of error power `p` (2.4 for GPTQ/RTN weights). Returns the
/// grid of every group, row-major [rows, cols / group].
pub fn fake_quant_matrix(
    data: &mut [f32],
    cols: usize,
    spec: &QuantSpec,
    clip_power: Option<f32>,
) -> Vec<Grid> {
    let group = spec.group.unwrap_or(cols);
    assert!(
        cols.is_multiple_of(group),
        "group {group} does not divide {cols} columns"
    );
    use rayon::prelude::*;
    data.par_chunks_mut(group)
        .map(|g| {
            let (scale, zero) = search_params(g, spec, clip_power);
            for x in g.iter_mut() {
                *x = fake_quant_value(*x, spec, scale, zero);
            }
            Grid { scale, zero }
        })
        .collect()
}

/// Scale and (rounded, constant) zero point on the device of groups whose ranges are
/// [lo, hi] (already forced to contain 0), as [`params`] computes them on the host.
pub fn device_params(
    lo: burn::tensor::Tensor<2>,
    hi: burn::tensor::Tensor<2>,
    spec: &QuantSpec,
) -> (burn::tensor::Tensor<2>, burn::tensor::Tensor<2>) {
    if spec.sym {
        let s = hi
            .clamp_min(1e-6)
            .div_scalar(spec.qmax())
            .max_pair(lo.div_scalar(spec.qmin()));
        let z = s.zeros_like();
        (s, z)
    } else {
        let s = (hi - lo.clone()).clamp_min(1e-6).div_scalar(spec.qmax());
        let z = lo.neg().div(s.clone()).round().detach();
        (s, z)
    }
}

/// Fake-quantize a transposed weight [in, out] per output channel (column) exactly as RTN
/// deploys it ([`fake_quant_matrix`] with the clip search: SPEC §5.3, the reference's
/// `w_clip`), error power [`CLIP_POWER`]: the reference's training quantizer scores with
/// power 2 and deploys with 2.4; this trains on the deployed grid. The grid is a constant to
/// autodiff: the gradient passes straight through where a value lands inside its grid and is
/// zero where it is clamped.
///
/// On burn's CPU backend the search runs on the host over the detached values (vectorized,
/// with early exits: the fastest there); on a GPU it runs on the device
/// ([`device_clip_search`]), so a step does not copy every fused weight to the host and back.
/// There a value exactly halfway between two codes rounds to the even one (burn's `round`),
/// where RTN rounds away from zero: a one-step difference on a vanishing fraction of values,
/// in training only.
pub fn fake_quant_weight_t(
    w_t: burn::tensor::Tensor<2>,
    spec: &QuantSpec,
) -> burn::tensor::Tensor<2> {
    let w = w_t.transpose();
    let host = w.device().without_autodiff() == burn::tensor::Device::flex();
    let (q, inside) = if host {
        weight_codes_host(w.clone().detach(), spec)
    } else {
        weight_codes_device(w.clone().detach(), spec)
    };
    // Forward: q. Backward: the mask.
    (q + (w.clone() - w.detach()) * inside).transpose()
}

/// The fake-quantized weight [rows, cols] and the mask of values inside their grid (1, else 0),
/// the clip search on the host.
fn weight_codes_host(
    w: burn::tensor::Tensor<2>,
    spec: &QuantSpec,
) -> (burn::tensor::Tensor<2>, burn::tensor::Tensor<2>) {
    use burn::tensor::{Tensor, TensorData};
    use rayon::prelude::*;
    let [rows, cols] = w.dims();
    let values = w
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 weights");
    let mut q = values.clone();
    let grids = fake_quant_matrix(&mut q, cols, spec, Some(CLIP_POWER));
    let group = spec.group.unwrap_or(cols);
    // 1 where a value's code on its group's grid needs no clamping.
    let inside: Vec<f32> = values
        .par_chunks(group)
        .zip(grids.par_iter())
        .flat_map_iter(|(g_values, g)| {
            g_values.iter().map(|&x| {
                let code = (x / g.scale).round() + g.zero;
                f32::from(u8::from((spec.qmin()..=spec.qmax()).contains(&code)))
            })
        })
        .collect();
    let device = w.device();
    (
        Tensor::<2>::from_data(TensorData::new(q, [rows, cols]), &device),
        Tensor::<2>::from_data(TensorData::new(inside, [rows, cols]), &device),
    )
}

/// [`weight_codes_host`] with the clip search on the device.
fn weight_codes_device(
    w: burn::tensor::Tensor<2>,
    spec: &QuantSpec,
) -> (burn::tensor::Tensor<2>, burn::tensor::Tensor<2>) {
    let [rows, cols] = w.dims();
    let group = spec.group.unwrap_or(cols);
    assert!(
        cols.is_multiple_of(group),
        "group {group} does not divide {cols} columns"
    );
    let x = w.reshape([rows * cols / group, group]);
    let clip = device_clip_search(x.clone(), spec, CLIP_POWER);
    let (lo, hi) = group_range(&x);
    let (s, z) = device_params(lo * clip.clone(), hi * clip, spec);
    let code = x.div(s.clone()).round() + z.clone();
    let inside = code
        .clone()
        .greater_equal_elem(spec.qmin())
        .bool_and(code.clone().lower_equal_elem(spec.qmax()))
        .float();
    let q = code.clamp(spec.qmin(), spec.qmax()).sub(z).mul(s);
    (q.reshape([rows, cols]), inside.reshape([rows, cols]))
}

/// Each group's (row's) range [min(x, 0), max(x, 0)] as [groups, 1] tensors.
fn group_range(x: &burn::tensor::Tensor<2>) -> (burn::tensor::Tensor<2>, burn::tensor::Tensor<2>) {
    (
        x.clone().min_dim(1).clamp_max(0.0),
        x.clone().max_dim(1).clamp_min(0.0),
    )
}

/// [`search_clip`] on the device for every row of `x` [groups, group] at once: the shrink
/// factor [groups, 1] of [`clip_candidates`] with the smallest Σ|x − q(x)|^p (ties: the larger
/// factor). Sums in f32 with burn's `powf` (the host: f64 sums of a polynomial |x|^p good to
/// about 1e-5), so where two candidates' errors agree to about 1e-5 the two may pick either.
pub fn device_clip_search(
    x: burn::tensor::Tensor<2>,
    spec: &QuantSpec,
    p: f32,
) -> burn::tensor::Tensor<2> {
    let (lo, hi) = group_range(&x);
    let mut best: Option<(burn::tensor::Tensor<2>, burn::tensor::Tensor<2>)> = None;
    for c in clip_candidates() {
        let (s, z) = device_params(lo.clone().mul_scalar(c), hi.clone().mul_scalar(c), spec);
        let q = (x.clone().div(s.clone()).round() + z.clone())
            .clamp(spec.qmin(), spec.qmax())
            .sub(z)
            .mul(s);
        let err = (x.clone() - q).abs().powf_scalar(p).sum_dim(1);
        best = Some(match best {
            None => (err.clone(), err.ones_like().mul_scalar(c)),
            // Candidates come in decreasing order: a tie keeps the earlier, larger factor.
            Some((e, f)) => {
                let better = err.clone().lower(e.clone());
                (e.mask_where(better.clone(), err), f.mask_fill(better, c))
            }
        });
    }
    best.expect("80 candidates").1
}

/// Fake-quantize a [rows, cols] tensor on the device, groups along each row (dynamic
/// per-token quantization of activations).
///
/// In a tracked (autodiff) forward the gradient is the reference's (SPEC §5.3): rounding is
/// straight-through and the scale, computed from the group's min and max, is differentiated
/// too, d q = d x + (round(x/s) − x/s)·d s. That second term is what tells a calibration that
/// an outlier widens the range of its whole token.
pub fn fake_quant_tensor(x: burn::tensor::Tensor<2>, spec: &QuantSpec) -> burn::tensor::Tensor<2> {
    let [rows, cols] = x.dims();
    let group = spec.group.unwrap_or(cols);
    assert!(
        cols % group == 0,
        "group {group} does not divide {cols} columns"
    );
    let g = x.clone().reshape([rows * cols / group, group]);
    let lo = g.clone().min_dim(1).clamp_max(0.0);
    let hi = g.clone().max_dim(1).clamp_min(0.0);
    let (scale, zero) = device_params(lo, hi, spec);
    let u = g.div(scale.clone());
    let rounded = u.clone().round();
    let q = (rounded.clone() + zero.clone())
        .clamp(spec.qmin(), spec.qmax())
        .sub(zero)
        .mul(scale.clone());
    if !x.is_tracked() {
        return q.reshape([rows, cols]);
    }
    // Same value as q; gradient d x + (round(u) − u)·d s (u − ū is zero in value).
    let form = (u.clone() - u.detach() + rounded.detach()) * scale;
    (q.detach() + (form.clone() - form.detach())).reshape([rows, cols])
}
