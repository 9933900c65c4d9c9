//! The CPU runtime's kernels against f64 references: the int4 and f16 products on odd and real
//! LLaMA shapes (both the SIMD path this CPU takes and the portable loops), and the KV-cache
//! quantizer against the host quantizer's formula. The whole CPU model is checked against burn
//! in runtime_model.rs and on the real SmolLM2 in runtime_smollm2.rs.

use ostquant_core::model::qformat::unpack;
use ostquant_core::quant::quantizer::QuantSpec;
use ostquant_core::runtime::cpu::kernels;
use ostquant_core::runtime::host::HostLinear;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// |got − want| ≤ tol·Σ|terms| per row.
fn check_rows(got: &[f32], want: &[f64], scale: &[f64], tol: f64, what: &str) {
    for (r, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * s.max(1e-3),
            "{what} row {r}: {g} vs {w}"
        );
    }
}

#[test]
fn int4_gemv_matches_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    let cases = [
        (576, 576, QuantSpec::sym(4)),
        (1536, 576, QuantSpec::sym(4)),
        (576, 1536, QuantSpec::asym(4).with_group(128)),
        (7, 4096, QuantSpec::sym(4).with_group(64)),
        (13, 11008, QuantSpec::asym(4)),
        (3, 8, QuantSpec::sym(4)),
        (5, 48, QuantSpec::asym(4).with_group(16)),
        (9, 40, QuantSpec::sym(4)),
        (130, 24, QuantSpec::sym(4).with_group(8)),
    ];
    for (rows, cols, spec) in cases {
        let (words, scales, zeros) =
            ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let w = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
        let m = HostLinear::int4(rows, cols, spec, words, scales, zeros).unwrap();
        let mut got = vec![0f32; rows];
        kernels::gemv(&m, &x, &mut got);
        let want: Vec<f64> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                    .sum()
            })
            .collect();
        let scale: Vec<f64> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| (w[r * cols + c] as f64 * x[c] as f64).abs())
                    .sum()
            })
            .collect();
        check_rows(
            &got,
            &want,
            &scale,
            1e-5,
            &format!("int4 {rows}×{cols} {spec:?}"),
        );
    }
}

#[test]
fn f16_gemv_matches_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(4);
    for (rows, cols) in [(576, 576), (49, 1536), (3, 8), (5, 40), (17, 4096)] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let m = HostLinear::half_from_f32(rows, cols, &w).unwrap();
        let rounded: Vec<f64> = w
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32() as f64)
            .collect();
        let mut got = vec![0f32; rows];
        kernels::gemv(&m, &x, &mut got);
        let want: Vec<f64> = (0..rows)
            .map(|r| (0..cols).map(|c| rounded[r * cols + c] * x[c] as f64).sum())
            .collect();
        let scale: Vec<f64> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| (rounded[r * cols + c] * x[c] as f64).abs())
                    .sum()
            })
            .collect();
        check_rows(&got, &want, &scale, 1e-5, &format!("f16 {rows}×{cols}"));
    }
}

/// The portable loops (what a CPU without AVX2 runs) agree with the dispatching entry points
/// on lengths that exercise the unrolled body and the tail.
#[test]
fn portable_products_match_the_simd_ones() {
    let mut rng = StdRng::seed_from_u64(5);
    for words_len in [1, 3, 4, 7, 72, 1376] {
        let words: Vec<u32> = (0..words_len).map(|_| rng.random()).collect();
        let x: Vec<f32> = (0..words_len * 8)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let want: f64 = words
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| (0..8).map(move |j| (i, j, (w >> (4 * j)) & 0xF)))
            .map(|(i, j, c)| c as f64 * x[8 * i + j] as f64)
            .sum();
        let bound = 1e-5 * x.iter().map(|v| 15.0 * v.abs() as f64).sum::<f64>();
        for (got, path) in [
            (kernels::dot_int4(&words, &x), "dispatching"),
            (kernels::dot_int4_portable(&words, &x), "portable"),
        ] {
            assert!(
                (got as f64 - want).abs() <= bound,
                "int4 {path}, {words_len} words: {got} vs {want}"
            );
        }
        let h: Vec<u16> = x
            .iter()
            .map(|&v| half::f16::from_f32(v * 0.5).to_bits())
            .collect();
        let want: f64 = h
            .iter()
            .zip(&x)
            .map(|(&a, &b)| half::f16::from_bits(a).to_f32() as f64 * b as f64)
            .sum();
        for (got, path) in [
            (kernels::dot_f16(&h, &x), "dispatching"),
            (kernels::dot_f16_portable(&h, &x), "portable"),
        ] {
            assert!(
                (got as f64 - want).abs() <= 1e-5 * x.len() as f64,
                "f16 {path}, {} values: {got} vs {want}",
                x.len()
            );
        }
    }
}

/// Activation quantization by hand: range [min(x,0), max(x,0)], 15 levels at 4 bits, ties to
/// even, and the dequantized values on the grid.
#[test]
fn activation_quantizer_matches_hand_computed_values() {
    // min −1, max 2.75: s = 3.75/15 = 0.25, z = round(4) = 4 (all exact in binary).
    let mut x = vec![-1.0f32, 0.0, 0.375, 2.75, 0.625, -0.3, 1.1, 0.3];
    let (s, z) = kernels::asym_range(&x, 15.0);
    assert!(s == 0.25 && z == 4.0, "{s} {z}");
    kernels::act_quant(&mut x, 8, 4);
    // 0.375/0.25 = 1.5 → 2 and 0.625/0.25 = 2.5 → 2 (ties to even); −0.3/0.25 = −1.2 → −1;
    // 1.1/0.25 = 4.4 → 4; 0.3/0.25 = 1.2 → 1.
    let want = [-1.0, 0.0, 0.5, 2.75, 0.5, -0.25, 1.0, 0.25];
    for (g, w) in x.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{x:?}");
    }
    // An all-positive group still contains 0 in its range: z = 0.
    let (s, z) = kernels::asym_range(&[1.5, 3.0], 15.0);
    assert!((s - 0.2).abs() < 1e-7 && z == 0.0);
}

/// The CPU prefill GEMM, Y [tokens, rows] = X·Wᵀ, int4 (groups, asymmetric, token blocks of 8
/// and a partial one) and f16, against f64 products.
#[test]
fn cpu_gemm_matches_the_f64_reference() {
    let mut rng = StdRng::seed_from_u64(6);
    for (rows, cols, tokens, spec) in [
        (37, 96, 11, QuantSpec::asym(4).with_group(32)),
        (576, 576, 8, QuantSpec::sym(4)),
        (20, 1536, 3, QuantSpec::sym(4).with_group(128)),
    ] {
        let (words, scales, zeros) =
            ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let w4 = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
        let wf: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let w16: Vec<f32> = wf
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let int4 = HostLinear::int4(rows, cols, spec, words, scales, zeros).unwrap();
        let f16 = HostLinear::half_from_f32(rows, cols, &wf).unwrap();
        for (m, w, what) in [(&int4, &w4, "int4"), (&f16, &w16, "f16")] {
            let mut got = vec![0f32; tokens * rows];
            kernels::gemm(m, &x, tokens, &mut got);
            for t in 0..tokens {
                let want: Vec<f64> = (0..rows)
                    .map(|r| {
                        (0..cols)
                            .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                            .sum()
                    })
                    .collect();
                let scale: Vec<f64> = (0..rows)
                    .map(|r| {
                        (0..cols)
                            .map(|c| (w[r * cols + c] as f64 * x[t * cols + c] as f64).abs())
                            .sum()
                    })
                    .collect();
                check_rows(
                    &got[t * rows..(t + 1) * rows],
                    &want,
                    &scale,
                    1e-5,
                    &format!("{what} GEMM {rows}×{cols}, token {t} of {tokens}"),
                );
            }
        }
    }
}
