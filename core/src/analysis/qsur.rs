//! QSUR, the quantization space utilization rate (SPEC §1): the volume of the data's Gaussian
//! ellipsoid over the volume of the hypercube one quantization range spans.
//!
//! QSUR = V_d·c^d·Πλ_i^{1/2} / (max_j(μ_j + c√Σ_jj) − min_j(μ_j − c√Σ_jj))^d
//!
//! For d in the hundreds QSUR itself underflows, so it is reported as its logarithm and as the
//! per-dimension ratio to the best possible value V_d/2^d (a whitened, centred distribution):
//! `rel = exp((ln QSUR − ln(V_d/2^d)) / d)`, 1 for an isotropic Gaussian, GM(λ)/AM(λ) to the ½
//! after the best rotation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Running mean and second moment of d-dimensional samples, in f64.
#[derive(Debug, Clone)]
pub struct Moments {
    pub d: usize,
    pub n: usize,
    sum: Vec<f64>,
    /// Σ xᵀx, row-major d × d.
    gram: Vec<f64>,
    /// max |x_j| per channel.
    pub max_abs: Vec<f64>,
}

impl Moments {
    pub fn new(d: usize) -> Self {
        Moments {
            d,
            n: 0,
            sum: vec![0.0; d],
            gram: vec![0.0; d * d],
            max_abs: vec![0.0; d],
        }
    }

    /// Add rows of a row-major [n, d] matrix.
    pub fn add_rows(&mut self, x: &[f32]) {
        let d = self.d;
        for row in x.chunks_exact(d) {
            for (j, &v) in row.iter().enumerate() {
                let v = v as f64;
                self.sum[j] += v;
                self.max_abs[j] = self.max_abs[j].max(v.abs());
                if v != 0.0 {
                    let g = &mut self.gram[j * d..(j + 1) * d];
                    g.iter_mut().zip(row).for_each(|(a, &b)| *a += v * b as f64);
                }
            }
            self.n += 1;
        }
    }

    /// Add n rows whose per-channel sums, Gram matrix Σxᵀx and max |x| were computed elsewhere
    /// (on the device).
    pub fn add_summary(&mut self, n: usize, sum: &[f32], gram: &[f32], max_abs: &[f32]) {
        self.n += n;
        self.sum
            .iter_mut()
            .zip(sum)
            .for_each(|(a, &b)| *a += b as f64);
        self.gram
            .iter_mut()
            .zip(gram)
            .for_each(|(a, &b)| *a += b as f64);
        self.max_abs
            .iter_mut()
            .zip(max_abs)
            .for_each(|(a, &b)| *a = a.max(b as f64));
    }

    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.n.max(1) as f64).collect()
    }

    /// Sample covariance (divided by n), row-major d × d.
    pub fn covariance(&self) -> Vec<f64> {
        let (d, n) = (self.d, self.n.max(1) as f64);
        let mu = self.mean();
        let mut c = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] = self.gram[i * d + j] / n - mu[i] * mu[j];
            }
        }
        c
    }
}

/// Eigenvalues of a symmetric d × d matrix, in decreasing order.
pub fn eigenvalues(sym: &[f64], d: usize) -> Result<Vec<f64>> {
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| sym[i * d + j]);
    let mut ev = m
        .self_adjoint_eigenvalues(faer::Side::Lower)
        .map_err(|e| Error::other(format!("eigendecomposition failed: {e:?}")))?;
    ev.reverse();
    Ok(ev)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Qsur {
    /// ln QSUR.
    pub log: f64,
    /// Per-dimension ratio to the best value, in (0, 1].
    pub rel: f64,
}

/// Smallest eigenvalue kept, relative to the largest (rank-deficient samples would give −∞).
const EIG_FLOOR: f64 = 1e-12;
/// Confidence level of the ellipsoid (cancels for centred data).
const ALPHA_Z: f64 = 2.326_347_874; // z of 0.99

/// QSUR of a Gaussian with mean `mu`, covariance `cov` (d × d) and its eigenvalues `eig`.
pub fn qsur(mu: &[f64], cov: &[f64], eig: &[f64]) -> Qsur {
    let d = mu.len();
    let df = d as f64;
    let top = eig
        .iter()
        .cloned()
        .fold(0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let log_det_half: f64 = eig.iter().map(|&l| 0.5 * l.max(top * EIG_FLOOR).ln()).sum();
    let c = chi2_quantile(df).sqrt();
    let (mut hi, mut lo) = (f64::NEG_INFINITY, f64::INFINITY);
    for j in 0..d {
        let sd = cov[j * d + j].max(0.0).sqrt();
        hi = hi.max(mu[j] + c * sd);
        lo = lo.min(mu[j] - c * sd);
    }
    let log_vd = 0.5 * df * std::f64::consts::PI.ln() - ln_gamma(0.5 * df + 1.0);
    let log = log_vd + df * c.ln() + log_det_half - df * (hi - lo).ln();
    let best = log_vd - df * 2f64.ln();
    Qsur {
        log,
        rel: ((log - best) / df).exp(),
    }
}

/// QSUR of samples summarised by `m`, with the eigenvalues it computes (decreasing).
pub fn qsur_of(m: &Moments) -> Result<(Qsur, Vec<f64>)> {
    let cov = m.covariance();
    let eig = eigenvalues(&cov, m.d)?;
    Ok((qsur(&m.mean(), &cov, &eig), eig))
}

/// χ²_d quantile at 0.99 (Wilson–Hilferty; accurate to well under 1% for d ≥ 2).
fn chi2_quantile(d: f64) -> f64 {
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + ALPHA_Z * a.sqrt()).powi(3)
}

/// ln Γ(x) for x > 0: shift up to x ≥ 15, then Stirling's series (error below 1e-13).
pub fn ln_gamma(mut x: f64) -> f64 {
    let mut shift = 0.0;
    while x < 15.0 {
        shift -= x.ln();
        x += 1.0;
    }
    let x2 = x * x;
    shift + (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x * x2)
        + 1.0 / (1260.0 * x * x2 * x2)
        - 1.0 / (1680.0 * x * x2 * x2 * x2)
}
