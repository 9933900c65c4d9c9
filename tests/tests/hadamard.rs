//! Hadamard transforms: every base matrix is exactly Hadamard, the fast transform equals the
//! dense Kronecker definition, and H·Hᵀ = I.

use ostquant_core::transform::hadamard::{Hadamard, hadamard_matrix, random_hadamard};
use rand::{Rng, SeedableRng};

/// Sizes of the LLaMA family and friends (SPEC §3), including QuaRot's failures.
const SIZES: [usize; 20] = [
    64, 576, 960, 1536, 2048, 2560, 3072, 4096, 4864, 5120, 5632, 6656, 6912, 8192, 8960, 11008,
    13824, 14336, 17920, 28672,
];

#[test]
fn every_listed_size_has_an_exact_base_matrix() {
    for n in SIZES {
        let h = Hadamard::new(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(n % h.k, 0);
        assert!((n / h.k).is_power_of_two(), "{n} = {}·{}", h.k, n / h.k);
        let k = h.k;
        let base = hadamard_matrix(k).unwrap();
        // H_K·H_Kᵀ = K·I in exact integers.
        for i in 0..k {
            for j in 0..k {
                let dot: i64 = (0..k)
                    .map(|t| base[i * k + t] as i64 * base[j * k + t] as i64)
                    .sum();
                assert_eq!(
                    dot,
                    if i == j { k as i64 } else { 0 },
                    "order {k} rows {i},{j}"
                );
            }
        }
    }
    assert_eq!(Hadamard::new(576).unwrap().k, 36);
    assert_eq!(Hadamard::new(1536).unwrap().k, 12);
    assert_eq!(Hadamard::new(14336).unwrap().k, 28);
    assert_eq!(Hadamard::new(4096).unwrap().k, 1);
}

#[test]
fn unsupported_size_is_an_error() {
    for n in [6, 10, 18, 0] {
        let err = Hadamard::new(n).unwrap_err().to_string();
        assert!(err.contains(&format!("size {n}")), "{err}");
    }
}

/// Dense H from the definition (H_K ⊗ H_{2^m}) / √n, written independently.
fn dense(n: usize, k: usize) -> Vec<f64> {
    let base = hadamard_matrix(k).unwrap();
    let p = n / k;
    let s = 1.0 / (n as f64).sqrt();
    let mut m = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            let walsh = if ((i % p) & (j % p)).count_ones().is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
            m[i * n + j] = base[(i / p) * k + j / p] as f64 * walsh * s;
        }
    }
    m
}

#[test]
fn fast_transform_equals_dense_product_and_is_orthogonal() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for n in [64, 576, 1536] {
        let h = Hadamard::new(n).unwrap();
        let m = dense(n, h.k);
        let x: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut y = x.clone();
        h.apply_rows(&mut y);
        for i in 0..n {
            let want: f64 = (0..n).map(|j| m[i * n + j] * x[j]).sum();
            assert!((y[i] - want).abs() < 1e-10, "n {n} row {i}");
        }
        // H·Hᵀ = I
        let hm = h.matrix();
        for i in (0..n).step_by(7) {
            for j in 0..n {
                let dot: f64 = (0..n).map(|t| hm[i * n + t] * hm[j * n + t]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-10, "n {n}: (H Hᵀ)[{i},{j}] = {dot}");
            }
        }
    }
}

#[test]
fn large_sizes_preserve_norms() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for n in SIZES {
        let h = Hadamard::new(n).unwrap();
        let x: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut y = x.clone();
        h.apply_rows(&mut y);
        let (nx, ny): (f64, f64) = (x.iter().map(|v| v * v).sum(), y.iter().map(|v| v * v).sum());
        assert!((nx - ny).abs() < 1e-9 * nx, "n {n}");
    }
}

#[test]
fn random_hadamard_is_orthogonal() {
    let n = 576;
    let r = random_hadamard(n, 7).unwrap();
    for i in (0..n).step_by(11) {
        for j in 0..n {
            let dot: f64 = (0..n).map(|t| r[i * n + t] * r[j * n + t]).sum();
            assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-10);
        }
    }
    assert_ne!(
        random_hadamard(n, 7).unwrap(),
        random_hadamard(n, 8).unwrap()
    );
}
