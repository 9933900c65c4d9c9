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
fn clip_error_below(g: &[f32], spec: &QuantSpec, clip: f32, p: f32, bound: f64) -> f64 {
    let (lo, hi) = min_max(g);
    let (s, z) = params(spec, lo * clip, hi * clip);
    let mut sum = 0.0f64;
    for chunk in g.chunks(64) {
        for &x in chunk {
            let e = (x - fake_quant_value(x, spec, s, z)).abs();
            if e != 0.0 {
                sum += e.powf(p) as f64;
            }
        }
        if sum > bound {
            break;
        }
    }
    sum
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
