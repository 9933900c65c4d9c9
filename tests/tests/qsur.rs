//! QSUR against its closed form on synthetic Gaussians, and the rotation-only optimum of
//! SPEC §1.2 reached by Q·H.

use ostquant_core::analysis::qsur::{Moments, eigenvalues, ln_gamma, qsur, qsur_of};
use ostquant_core::transform::hadamard::Hadamard;
use rand::{Rng, SeedableRng};

fn diag(v: &[f64]) -> Vec<f64> {
    let d = v.len();
    let mut m = vec![0f64; d * d];
    for i in 0..d {
        m[i * d + i] = v[i];
    }
    m
}

/// ln(V_d / 2^d), the largest possible ln QSUR, written out from Γ.
fn log_best(d: usize) -> f64 {
    let d = d as f64;
    0.5 * d * std::f64::consts::PI.ln() - ln_gamma(0.5 * d + 1.0) - d * 2f64.ln()
}

#[test]
fn ln_gamma_matches_known_values() {
    assert!((ln_gamma(1.0)).abs() < 1e-12);
    assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    assert!((ln_gamma(11.0) - (3_628_800f64).ln()).abs() < 1e-10);
    assert!((ln_gamma(2.5) - (0.75 * std::f64::consts::PI.sqrt()).ln()).abs() < 1e-12);
}

#[test]
fn isotropic_gaussian_is_optimal() {
    let d = 64;
    let cov = diag(&vec![2.0; d]);
    let eig = eigenvalues(&cov, d).unwrap();
    let q = qsur(&vec![0.0; d], &cov, &eig);
    assert!((q.log - log_best(d)).abs() < 1e-9);
    assert!((q.rel - 1.0).abs() < 1e-12);
    // In 2-D the best is a disc in a square: π/4.
    let cov2 = diag(&[1.0, 1.0]);
    let q2 = qsur(&[0.0, 0.0], &cov2, &eigenvalues(&cov2, 2).unwrap());
    assert!((q2.log.exp() - std::f64::consts::PI / 4.0).abs() < 1e-12);
}

#[test]
fn one_dominant_axis_matches_the_closed_form() {
    // Σ = diag(a, 1, …, 1), zero mean: QSUR = (V_d/2^d)·√a / a^{d/2}.
    let (d, a) = (32, 50.0f64);
    let mut v = vec![1.0; d];
    v[0] = a;
    let cov = diag(&v);
    let q = qsur(&vec![0.0; d], &cov, &eigenvalues(&cov, d).unwrap());
    let want = log_best(d) + 0.5 * a.ln() - 0.5 * d as f64 * a.ln();
    assert!((q.log - want).abs() < 1e-9, "{} vs {want}", q.log);
}

/// A random orthogonal matrix by Gram–Schmidt.
fn random_orthogonal(d: usize, rng: &mut impl Rng) -> Vec<f64> {
    let mut q: Vec<Vec<f64>> = Vec::new();
    while q.len() < d {
        let mut v: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        for u in &q {
            let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-6 {
            q.push(v.into_iter().map(|x| x / n).collect());
        }
    }
    // Columns are the basis vectors.
    let mut m = vec![0f64; d * d];
    for (j, col) in q.iter().enumerate() {
        for i in 0..d {
            m[i * d + j] = col[i];
        }
    }
    m
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut c = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            for j in 0..d {
                c[i * d + j] += a[i * d + k] * b[k * d + j];
            }
        }
    }
    c
}

fn t(a: &[f64], d: usize) -> Vec<f64> {
    let mut b = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            b[j * d + i] = a[i * d + j];
        }
    }
    b
}

#[test]
fn rotation_by_q_times_hadamard_reaches_the_rotation_only_optimum() {
    let d = 48; // 12·4
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let lam: Vec<f64> = (0..d)
        .map(|i| 0.1 + 10.0 * (-(i as f64) / 8.0).exp() + rng.random_range(0.0..0.5))
        .collect();
    let q = random_orthogonal(d, &mut rng);
    let sigma = matmul(&matmul(&q, &diag(&lam), d), &t(&q, d), d); // QΛQᵀ
    let eig = eigenvalues(&sigma, d).unwrap();
    let before = qsur(&vec![0.0; d], &sigma, &eig);
    // T = Q·H, Σ' = Tᵀ Σ T = Hᵀ Λ H.
    let h = Hadamard::new(d).unwrap().matrix();
    let tm = matmul(&q, &h, d);
    let sigma2 = matmul(&matmul(&t(&tm, d), &sigma, d), &tm, d);
    let after = qsur(&vec![0.0; d], &sigma2, &eigenvalues(&sigma2, d).unwrap());
    let gm = (lam.iter().map(|l| l.ln()).sum::<f64>() / d as f64).exp();
    let am = lam.iter().sum::<f64>() / d as f64;
    let optimum = log_best(d) + 0.5 * d as f64 * (gm / am).ln();
    assert!(
        (after.log - optimum).abs() < 1e-6,
        "{} vs {optimum}",
        after.log
    );
    assert!((after.rel - (gm / am).sqrt()).abs() < 1e-9);
    assert!(
        after.log > before.log,
        "the rotation must help: {} → {}",
        before.log,
        after.log
    );
}

#[test]
fn moments_from_samples_approach_the_true_covariance() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let d = 4;
    let scales = [3.0, 1.0, 0.5, 0.25];
    let mut m = Moments::new(d);
    let rows: Vec<f32> = (0..20000 * d)
        .map(|i| {
            // Sum of uniforms ≈ Gaussian with variance scale²·(12·1/12)=scale².
            let s: f64 = (0..12).map(|_| rng.random_range(-0.5..0.5)).sum();
            (s * scales[i % d] + 1.0) as f32
        })
        .collect();
    m.add_rows(&rows);
    let cov = m.covariance();
    for j in 0..d {
        assert!(
            (cov[j * d + j] - scales[j] * scales[j]).abs() < 0.05 * scales[j] * scales[j] + 0.01
        );
        assert!((m.mean()[j] - 1.0).abs() < 0.05);
    }
    let (q, eig) = qsur_of(&m).unwrap();
    assert!(
        eig.windows(2).all(|w| w[0] >= w[1]),
        "eigenvalues sorted decreasing"
    );
    assert!(q.rel > 0.0 && q.rel < 1.0);
}
