//! The linear layers' GPU products on the software Vulkan device against f64 references on the
//! same packed codes: the W4A16 GEMV (every tiling, every team sum: shared memory, and
//! subgroup shuffles where the device has them, see `every_variant`; plain, RMS-normalizing
//! its input, and accumulating) on odd and real LLaMA shapes, symmetric per channel and asymmetric in groups;
//! the W4A4 integer GEMV; the q, k, v GEMV storing RoPE-turned pairs; the prefill GEMMs
//! (W4A16, W4A4, f16); the f16 GEMV on the rounded weights.

use ostquant_core::model::qformat::unpack;
use ostquant_core::quant::quantizer::QuantSpec;
use ostquant_core::runtime::Gpu;
use ostquant_core::runtime::host::HostLinear;
use ostquant_core::runtime::linear::{
    HalfMatrix, Input, Int4Matrix, Linear, Probe, Products, Rope, Tiling,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Gpu {
    ostquant_tests::test_gpu()
}

/// RMSNorm in f64: x / sqrt(mean(x²) + eps) · gamma.
fn rms_normed(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(gamma)
        .map(|(&v, &g)| v as f64 * inv * g as f64)
        .collect()
}

/// The W4A16 GEMV tests' matrices (rows, cols, weight grid): real SmolLM2 and LLaMA widths,
/// and odd ones (a single word per row, groups smaller than a vec4 of words, rows past a team).
fn gemv_cases() -> [(usize, usize, QuantSpec); 8] {
    [
        (576, 576, QuantSpec::sym(4)),
        (1536, 576, QuantSpec::sym(4)),
        (576, 1536, QuantSpec::asym(4).with_group(128)),
        (7, 4096, QuantSpec::sym(4).with_group(64)),
        (13, 11008, QuantSpec::asym(4)),
        (3, 8, QuantSpec::sym(4)),
        (5, 48, QuantSpec::asym(4).with_group(16)),
        (9, 40, QuantSpec::sym(4)),
    ]
}

/// Each row's value in `got` is Σ_c w[r, c]·x[c] (w [rows, cols]) to within 1e-5 of Σ|w·x|
/// (at least 1e-3); `case` names the product in the message.
fn assert_rows(got: &[f32], w: &[f32], x: &[f64], case: &str) {
    let cols = x.len();
    for (r, &g) in got.iter().enumerate() {
        let terms = (0..cols).map(|c| w[r * cols + c] as f64 * x[c]);
        let want: f64 = terms.clone().sum();
        let scale: f64 = terms.map(f64::abs).sum();
        assert!(
            (g as f64 - want).abs() <= 1e-5 * scale.max(1e-3),
            "{case}, row {r}: {g} vs {want}"
        );
    }
}

/// The kernels with every team-sum variant the device allows: shared memory only (1 lane),
/// then subgroup shuffles over 2, 4, … lanes up to the device's subgroup size.
fn every_team_sum(gpu: &Gpu) -> Vec<Products> {
    std::iter::successors(Some(1u32), |l| Some(l * 2))
        .take_while(|&l| l <= gpu.subgroup_lanes)
        .map(|l| Products::with_lanes(gpu, l))
        .collect()
}

/// The (team sum, tiling) pairs a GEMV test runs: every tiling with shared-memory sums and
/// with the widest subgroups, the narrower subgroups with the tilings at both ends.
fn every_variant(kernels: &[Products]) -> Vec<(&Products, Tiling)> {
    let (first, last) = (Tiling::ALL[0], Tiling::ALL[Tiling::ALL.len() - 1]);
    kernels
        .iter()
        .enumerate()
        .flat_map(|(i, k)| {
            let ends = i == 0 || i + 1 == kernels.len();
            Tiling::ALL
                .into_iter()
                .filter(move |&t| ends || t == first || t == last)
                .map(move |t| (k, t))
        })
        .collect()
}

/// y = W·x, and y = W·RMSNorm(x) with the norm inside the GEMV (the residual stream as x).
#[test]
fn gemv_matches_the_f64_reference() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(1);
    let eps = 1e-5;
    for (rows, cols, spec) in gemv_cases() {
        let (words, scales, zeros) =
            ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let gamma: Vec<f32> = (0..cols).map(|_| rng.random_range(0.5..1.5)).collect();
        let m = Linear::Int4(
            Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, zeros.as_deref()).unwrap(),
        );
        let w = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
        let (xb, gb, yb) = (
            gpu.storage("x", &x),
            gpu.storage("gamma", &gamma),
            gpu.output("y", rows),
        );
        let plain: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let normed = rms_normed(&x, &gamma, eps);
        let variants = every_team_sum(&gpu);
        for (gemv, tiling) in every_variant(&variants) {
            for norm in [false, true] {
                let lanes = gemv.subgroup_lanes;
                let (input, x) = match norm {
                    false => (Input::F32(&xb), &plain),
                    true => {
                        let h = &xb;
                        (
                            Input::RmsNormed {
                                h,
                                weight: &gb,
                                eps,
                            },
                            &normed,
                        )
                    }
                };
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                gemv.launch(&gpu, &m, input, &yb, false, Some(tiling))
                    .unwrap()
                    .record(&mut enc);
                let got = gpu.finish_f32(enc, &yb, rows).unwrap();
                let case = format!(
                    "{rows}×{cols} {spec:?} tiling {tiling}, norm {norm}, {lanes} subgroup lanes"
                );
                assert_rows(&got, &w, x, &case);
            }
        }
    }
}

/// The benchmark's probes that are whole kernels equal the f64 product at every tiling: x16
/// (the W4A16 GEMV on x given as f16 pairs) with the f16-rounded x; ahead (each step's weights
/// loaded a step early), in-place (codes decoded where they lie), both, and staged (16-byte
/// weight loads, x tiled through shared memory), with x itself.
#[test]
fn whole_probe_gemvs_match_the_f64_reference() {
    let gpu = gpu();
    let gemv = Products::new(&gpu);
    let mut rng = StdRng::seed_from_u64(5);
    for (rows, cols, spec) in gemv_cases() {
        let (words, scales, zeros) =
            ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let halves: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        let pairs: Vec<u32> = halves
            .chunks_exact(2)
            .map(|p| p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16)
            .collect();
        let m =
            Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, zeros.as_deref()).unwrap();
        let w = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
        let yb = gpu.output("y", rows);
        let exact: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (probe, xb, x) in [
            (
                Probe::XHalf,
                gpu.storage("x", &pairs),
                halves.iter().map(|h| h.to_f64()).collect::<Vec<_>>(),
            ),
            (Probe::Ahead, gpu.storage("x", &x), exact.clone()),
            (Probe::InPlace, gpu.storage("x", &x), exact.clone()),
            (Probe::AheadInPlace, gpu.storage("x", &x), exact.clone()),
            (Probe::Staged, gpu.storage("x", &x), exact.clone()),
        ] {
            for tiling in Tiling::ALL {
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                gemv.launch_probe(&gpu, &m, &xb, &yb, tiling, probe)
                    .record(&mut enc);
                let got = gpu.finish_f32(enc, &yb, rows).unwrap();
                assert_rows(
                    &got,
                    &w,
                    &x,
                    &format!("{probe:?} {rows}×{cols} {spec:?} tiling {tiling}"),
                );
            }
        }
    }
}

#[test]
fn gemv_refuses_mismatched_inputs() {
    let gpu = gpu();
    let spec = QuantSpec::sym(4);
    assert!(
        Int4Matrix::upload(&gpu, 2, 12, spec, &[0; 3], &[1.0; 2], None).is_err(),
        "cols % 8"
    );
    assert!(
        Int4Matrix::upload(&gpu, 2, 16, spec, &[0; 3], &[1.0; 2], None).is_err(),
        "words"
    );
    assert!(
        Int4Matrix::upload(&gpu, 2, 16, QuantSpec::asym(4), &[0; 4], &[1.0; 2], None).is_err(),
        "zeros"
    );
    let m = Linear::Int4(Int4Matrix::upload(&gpu, 2, 16, spec, &[0; 4], &[1.0; 2], None).unwrap());
    assert!(Products::new(&gpu).run(&gpu, &m, &[0.0; 8]).is_err());
    assert!(
        HalfMatrix::upload(&gpu, 2, 12, &[0; 24]).is_err(),
        "cols % 8"
    );
    assert!(HalfMatrix::upload(&gpu, 2, 16, &[0; 31]).is_err(), "values");
}

#[test]
fn f16_gemv_matches_the_f64_reference() {
    let gpu = gpu();
    let gemv = Products::new(&gpu);
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, cols) in [
        (576, 576),
        (1536, 576),
        (5, 1536),
        (3, 8),
        (9, 40),
        (17, 4096),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let m = Linear::Half(HalfMatrix::from_f32(&gpu, rows, cols, &w).unwrap());
        let got = gemv.run(&gpu, &m, &x).unwrap();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let rounded = |v: f32| half::f16::from_f32(v).to_f32() as f64;
            let want: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| rounded(a) * b as f64)
                .sum();
            let scale: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            assert!(
                (got[r] as f64 - want).abs() <= 1e-5 * scale.max(1e-3),
                "{rows}×{cols} row {r}: {} vs {want}",
                got[r]
            );
        }
    }
}

/// y += W·x (the residual connection folded into o_proj and down_proj) for every int4
/// tiling and the f16 kernel, against y0 + the f64 product.
#[test]
fn gemv_accumulates_for_every_tiling() {
    let gpu = gpu();
    let gemv = Products::new(&gpu);
    let mut rng = StdRng::seed_from_u64(9);
    let (rows, cols) = (37, 96);
    let spec = QuantSpec::asym(4).with_group(32);
    let (words, scales, zeros) =
        ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
    let zeros = zeros.expect("asymmetric");
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
    let y0: Vec<f32> = (0..rows).map(|_| rng.random_range(-5.0..5.0)).collect();
    let w4 = unpack(&words, &scales, Some(&zeros), rows, cols, &spec);
    let w16: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-0.1..0.1))
        .collect();
    let int4 = Linear::Int4(
        Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, Some(&zeros)).unwrap(),
    );
    let f16 = Linear::Half(HalfMatrix::from_f32(&gpu, rows, cols, &w16).unwrap());
    let rounded: Vec<f32> = w16
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let mut cases: Vec<(&Linear, &[f32], Option<Tiling>)> = Tiling::ALL
        .iter()
        .map(|&t| (&int4, w4.as_slice(), Some(t)))
        .collect();
    cases.push((&f16, &rounded, None));
    for (m, w, tiling) in cases {
        let (xb, yb) = (gpu.storage("x", &x), gpu.storage("y", &y0));
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        gemv.launch(&gpu, m, Input::F32(&xb), &yb, true, tiling)
            .unwrap()
            .record(&mut enc);
        let got = gpu.finish_f32(enc, &yb, rows).unwrap();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let want = y0[r] as f64
                + row
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>();
            assert!(
                (got[r] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "tiling {tiling:?} row {r}: {} vs {want}",
                got[r]
            );
        }
    }
}

/// The W4A4 path: activations quantized to integer codes on the GPU (act_codes.wgsl), then the
/// integer GEMV with its dequant epilogue, for every tiling, against the f64
/// product of the unpacked weights and the fake-quantized activations. The activations are
/// grid points (q − z)·2⁻³ with q = 0 and q = 15 present in every group, so the quantizer's
/// rounding is unambiguous and the reference knows the codes exactly.
#[test]
fn w4a4_gemv_matches_the_f64_reference() {
    use ostquant_core::runtime::linear::ActCodes;
    let gpu = gpu();
    let variants = every_team_sum(&gpu);
    let gemv = &variants[0];
    let mut rng = StdRng::seed_from_u64(11);
    let cases = [
        (576, 576, 576, QuantSpec::sym(4)),
        (1536, 576, 576, QuantSpec::sym(4)),
        (9, 576, 64, QuantSpec::sym(4)),
        (576, 1536, 1536, QuantSpec::asym(4).with_group(128)),
        (37, 4096, 128, QuantSpec::sym(4).with_group(32)),
        (5, 11008, 11008, QuantSpec::asym(4)),
    ];
    for (rows, cols, agroup, spec) in cases {
        let (words, scales, zeros) =
            ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
        let mut x = Vec::with_capacity(cols);
        for _ in 0..cols / agroup {
            let z = rng.random_range(0..16) as f32;
            for i in 0..agroup {
                let q = match i {
                    0 => 0.0,
                    1 => 15.0,
                    _ => rng.random_range(0..16) as f32,
                };
                x.push((q - z) * 0.125);
            }
        }
        let m = Linear::Int4(
            Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, zeros.as_deref()).unwrap(),
        );
        let w = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
        let codes = ActCodes::new(&gpu, 1, cols, agroup, 4).unwrap();
        let (xb, yb) = (gpu.storage("x", &x), gpu.output("y", rows));
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (k, tiling) in every_variant(&variants) {
            let lanes = k.subgroup_lanes;
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            gemv.quantize(&gpu, &xb, &codes).record(&mut enc);
            k.launch(&gpu, &m, Input::Codes(&codes), &yb, false, Some(tiling))
                .unwrap()
                .record(&mut enc);
            let got = gpu.finish_f32(enc, &yb, rows).unwrap();
            let case = format!(
                "W4A4 {rows}×{cols} act groups {agroup} {spec:?} tiling {tiling}, {lanes} subgroup lanes"
            );
            assert_rows(&got, &w, &x64, &case);
        }
    }
    // Codes that do not fit a signed byte, or groups that split a 32-column block, are refused.
    assert!(ActCodes::new(&gpu, 1, 576, 576, 8).is_err());
    assert!(ActCodes::new(&gpu, 1, 64, 8, 4).is_err());
}

/// The prefill GEMMs, Y [tokens, rows] = X·Wᵀ, W4A16 (f32 activations, any group) and W4A4
/// (activations quantized to codes per token on the GPU), on shapes that leave partial 64-row
/// and 32-token tiles, against f64 products (W4A4: of the grid-point activations, as in the
/// GEMV test, so the quantizer's codes are known exactly); with accumulation into Y.
#[test]
fn prefill_gemms_match_the_f64_reference() {
    use ostquant_core::runtime::linear::ActCodes;
    let gpu = gpu();
    let gemv = Products::new(&gpu);
    let mut rng = StdRng::seed_from_u64(12);
    let cases = [
        (70, 96, 37, QuantSpec::sym(4)),
        (576, 576, 33, QuantSpec::sym(4)),
        (130, 1536, 5, QuantSpec::asym(4).with_group(128)),
        (64, 256, 64, QuantSpec::sym(4).with_group(32)),
        (9, 40, 3, QuantSpec::asym(4).with_group(8)),
    ];
    for (rows, cols, tokens, spec) in cases {
        let (words, scales, zeros) =
            ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
        let m =
            Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, zeros.as_deref()).unwrap();
        let w = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
        let m4 = Linear::Int4(
            Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, zeros.as_deref()).unwrap(),
        );
        // Grid points per token (one activation group per token): q = 0 and 15 present.
        let mut x = Vec::with_capacity(tokens * cols);
        for _ in 0..tokens {
            let z = rng.random_range(0..16) as f32;
            for i in 0..cols {
                let q = match i {
                    0 => 0.0,
                    1 => 15.0,
                    _ => rng.random_range(0..16) as f32,
                };
                x.push((q - z) * 0.125);
            }
        }
        let y0: Vec<f32> = (0..tokens * rows)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let xb = gpu.storage("x", &x);
        let integer = ActCodes::fits(cols, cols, 4);
        for codes in [false, true] {
            if codes && !integer {
                continue;
            }
            let yb = gpu.storage("y", &y0);
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            if codes {
                let c = ActCodes::new(&gpu, tokens, cols, cols, 4).unwrap();
                gemv.quantize(&gpu, &xb, &c).record(&mut enc);
                gemv.gemm_w4a4(&gpu, &m, &c, &yb, true)
                    .unwrap()
                    .record(&mut enc);
            } else {
                gemv.gemm(&gpu, &m4, &xb, &yb, tokens, true)
                    .record(&mut enc);
            }
            let got = gpu.finish_f32(enc, &yb, tokens * rows).unwrap();
            for t in 0..tokens {
                for r in 0..rows {
                    let terms = (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64);
                    let want = y0[t * rows + r] as f64 + terms.clone().sum::<f64>();
                    let scale: f64 = 1.0 + terms.map(f64::abs).sum::<f64>();
                    let g = got[t * rows + r] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * scale,
                        "GEMM {rows}×{cols} {tokens} tokens {spec:?} codes {codes}, token {t} row {r}: {g} vs {want}"
                    );
                }
            }
        }
    }
}

/// The f16 prefill GEMM against f64 products of the rounded weights, partial tiles included.
#[test]
fn f16_gemm_matches_the_f64_reference() {
    let gpu = gpu();
    let gemv = Products::new(&gpu);
    let mut rng = StdRng::seed_from_u64(13);
    for (rows, cols, tokens) in [(70, 96, 37), (9, 40, 3), (130, 576, 33)] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let m = Linear::Half(HalfMatrix::from_f32(&gpu, rows, cols, &w).unwrap());
        let yb = gpu.output("y", tokens * rows);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        gemv.gemm(&gpu, &m, &gpu.storage("x", &x), &yb, tokens, false)
            .record(&mut enc);
        let got = gpu.finish_f32(enc, &yb, tokens * rows).unwrap();
        let rounded = |v: f32| half::f16::from_f32(v).to_f32() as f64;
        for t in 0..tokens {
            for r in 0..rows {
                let terms = (0..cols).map(|c| rounded(w[r * cols + c]) * x[t * cols + c] as f64);
                let want: f64 = terms.clone().sum();
                let scale: f64 = terms.map(f64::abs).sum::<f64>().max(1e-3);
                let g = got[t * rows + r] as f64;
                assert!(
                    (g - want).abs() <= 1e-5 * scale,
                    "f16 GEMM {rows}×{cols} {tokens} tokens, token {t} row {r}: {g} vs {want}"
                );
            }
        }
    }
}

/// The gated MLP's middle in one GEMV: gate and up int4 matrices interleaved row by row, the
/// epilogue storing SiLU(gate·x)·(up·x), on f32 activations, on f32 activations RMS-normalized
/// in the GEMV, and on integer codes, for every team sum and tiling that holds whole pairs,
/// against f64.
#[test]
fn silu_mul_gemv_matches_the_f64_reference() {
    use ostquant_core::runtime::host::HostLinear;
    use ostquant_core::runtime::linear::ActCodes;
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(21);
    let eps = 1e-5;
    for (rows, cols, spec) in [
        (1536, 576, QuantSpec::sym(4)),
        (37, 256, QuantSpec::asym(4).with_group(64)),
    ] {
        let mut half = || {
            let (words, scales, zeros) =
                ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.02);
            let w = unpack(&words, &scales, zeros.as_deref(), rows, cols, &spec);
            (
                HostLinear::int4(rows, cols, spec, words, scales, zeros).unwrap(),
                w,
            )
        };
        let ((gate, wg), (up, wu)) = (half(), half());
        let fused =
            HostLinear::interleave_rows(&gate, &up).expect("two int4 matrices of one shape");
        let Linear::Int4(m) = Linear::upload(&gpu, &fused).unwrap() else {
            unreachable!()
        };
        // Activations on the 4-bit grid of one group, so the codes path sees exact values.
        let z = 7.0;
        let x: Vec<f32> = (0..cols)
            .map(|c| match c {
                0 => (0.0 - z) * 0.125,
                1 => (15.0 - z) * 0.125,
                _ => (rng.random_range(0..16) as f32 - z) * 0.125,
            })
            .collect();
        let gamma: Vec<f32> = (0..cols).map(|_| rng.random_range(0.5..1.5)).collect();
        let silu_mul = |x: &[f64]| -> Vec<f64> {
            (0..rows)
                .map(|r| {
                    let dot = |w: &[f32]| -> f64 {
                        (0..cols).map(|c| w[r * cols + c] as f64 * x[c]).sum()
                    };
                    let g = dot(&wg);
                    g / (1.0 + (-g).exp()) * dot(&wu)
                })
                .collect()
        };
        let plain = silu_mul(&x.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let normed = silu_mul(&rms_normed(&x, &gamma, eps));
        let (xb, gb) = (gpu.storage("x", &x), gpu.storage("gamma", &gamma));
        let codes = ActCodes::new(&gpu, 1, cols, cols, 4).unwrap();
        let yb = gpu.output("y", rows);
        let tilings = Tiling::ALL.into_iter().filter(|t| t.rows >= 2).map(Some);
        for k in every_team_sum(&gpu) {
            for tiling in tilings.clone().chain([None]) {
                for input in ["f32", "normed", "codes"] {
                    let mut enc = gpu.device.create_command_encoder(&Default::default());
                    let (x, want) = match input {
                        "codes" => {
                            k.quantize(&gpu, &xb, &codes).record(&mut enc);
                            (Input::Codes(&codes), &plain)
                        }
                        "normed" => {
                            let h = &xb;
                            (
                                Input::RmsNormed {
                                    h,
                                    weight: &gb,
                                    eps,
                                },
                                &normed,
                            )
                        }
                        _ => (Input::F32(&xb), &plain),
                    };
                    k.launch_silu_mul(&gpu, &m, x, &yb, tiling)
                        .unwrap()
                        .record(&mut enc);
                    let got = gpu.finish_f32(enc, &yb, rows).unwrap();
                    for r in 0..rows {
                        assert!(
                            (got[r] as f64 - want[r]).abs() <= 1e-4 * (1.0 + want[r].abs()),
                            "{rows}×{cols} {spec:?} tiling {tiling:?}, {} lanes, input {input}, row {r}: {} vs {}",
                            k.subgroup_lanes,
                            got[r],
                            want[r]
                        );
                    }
                }
            }
        }
    }
}

/// A buffer the device cannot hold (32 GB; the software device has 2 GB) is an error naming
/// what was being allocated, not wgpu's default panic; the device stays usable.
#[test]
fn a_buffer_over_the_device_memory_is_an_error() {
    let gpu = gpu();
    let err = gpu
        .checked("a 32 GB scratch buffer", || gpu.output("huge", 1 << 33))
        .expect_err("an error");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("a 32 GB scratch buffer"), "{msg}");
    assert!(
        msg.contains("out of GPU memory") || msg.contains("refused"),
        "{msg}"
    );
    let y = gpu
        .checked("a small buffer", || gpu.storage("ok", &[1.0f32, 2.0]))
        .unwrap();
    let enc = gpu.device.create_command_encoder(&Default::default());
    assert_eq!(gpu.finish_f32(enc, &y, 2).unwrap(), [1.0, 2.0]);
}

/// RMSNorm straight into activation codes (one launch) gives the codes of the two-launch path,
/// RMSNorm then quantization: the W4A4 GEMV on either gives the same bits, on several tokens.
#[test]
fn rms_norm_into_codes_equals_norm_then_quantize() {
    use ostquant_core::runtime::linear::ActCodes;
    use ostquant_core::runtime::ops::Ops;
    let gpu = gpu();
    let (kernels, ops) = (Products::new(&gpu), Ops::new(&gpu));
    let mut rng = StdRng::seed_from_u64(31);
    let (tokens, cols, rows) = (3, 576, 64);
    let h: Vec<f32> = (0..tokens * cols)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let w: Vec<f32> = (0..cols).map(|_| rng.random_range(0.5..1.5)).collect();
    let spec = QuantSpec::sym(4);
    let (words, scales, _) = ostquant_tests::random_int4(&mut rng, rows, cols, &spec, 0.001..0.05);
    let m = Int4Matrix::upload(&gpu, rows, cols, spec, &words, &scales, None).unwrap();
    let (hb, wb, nb) = (
        gpu.storage("h", &h),
        gpu.storage("w", &w),
        gpu.output("n", tokens * cols),
    );
    let eps = 1e-5;
    let mut outs = Vec::new();
    for fused in [false, true] {
        let codes = ActCodes::new(&gpu, tokens, cols, cols, 4).unwrap();
        let y = gpu.output("y", tokens * rows);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        if fused {
            kernels
                .norm_quantize(&gpu, &hb, &wb, eps, &codes)
                .unwrap()
                .record(&mut enc);
        } else {
            ops.rms_norm(&gpu, &hb, &wb, &nb, tokens, cols, eps)
                .record(&mut enc);
            kernels.quantize(&gpu, &nb, &codes).record(&mut enc);
        }
        kernels
            .gemm_w4a4(&gpu, &m, &codes, &y, false)
            .unwrap()
            .record(&mut enc);
        outs.push(gpu.finish_f32(enc, &y, tokens * rows).unwrap());
    }
    assert!(outs[0].iter().any(|&v| v != 0.0));
    assert_eq!(outs[0], outs[1]);
    // Groups narrower than a token cannot take the norm.
    let heads = ActCodes::new(&gpu, 1, cols, 64, 4).unwrap();
    assert!(kernels.norm_quantize(&gpu, &hb, &wb, eps, &heads).is_err());
}

/// The q, k, v GEMV with RoPE in its epilogue, on a matrix whose q and k heads are in RoPE
/// pairs (`HostLinear::pair_rope_halves`), against f64: W·x on the original rows, each q/k
/// head's half-split pairs (i, i + hd/2) rotated, stored at (2i, 2i + 1) of the head; v's rows
/// as they are. Every tiling (it takes at least 2 rows per team); the W4A4 GEMV's RoPE store
/// on integer codes is checked through the whole model (runtime_model).
#[test]
fn rope_store_gemv_matches_f64_on_paired_rows() {
    let gpu = gpu();
    let gemv = Products::new(&gpu);
    let mut rng = StdRng::seed_from_u64(11);
    let (hd, qk_heads, v_heads, cols) = (8, 3, 1, 64);
    let (rope_rows, rows) = (qk_heads * hd, (qk_heads + v_heads) * hd);
    let half = hd / 2;
    for spec in [QuantSpec::sym(4), QuantSpec::asym(4).with_group(32)] {
        // q and k's heads (paired for the GEMV), then v's, as one stacked matrix; w: the
        // unpaired rows in f32 for the reference.
        let mut w = Vec::new();
        let [qk, v] = [rope_rows, rows - rope_rows].map(|n| {
            let (words, scales, zeros) =
                ostquant_tests::random_int4(&mut rng, n, cols, &spec, 0.01..0.05);
            w.extend(unpack(&words, &scales, zeros.as_deref(), n, cols, &spec));
            HostLinear::int4(n, cols, spec, words, scales, zeros).unwrap()
        });
        let stacked = HostLinear::stack_rows(&[&qk.pair_rope_halves(hd).unwrap(), &v]).unwrap();
        let HostLinear::Int4 {
            words,
            scales,
            zeros,
            ..
        } = &stacked
        else {
            unreachable!("int4 parts stack to an int4 matrix")
        };
        let m =
            Int4Matrix::upload(&gpu, rows, cols, spec, words, scales, zeros.as_deref()).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let angles: Vec<f64> = (0..half).map(|i| 0.7 + 1.3 * i as f64).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
        // f64: the rows' products and their Σ|w·x| (for the tolerance).
        let dot = |r: usize| -> (f64, f64) {
            (0..cols).fold((0.0, 0.0), |(s, a), c| {
                let t = w[r * cols + c] as f64 * x[c] as f64;
                (s + t, a + t.abs())
            })
        };
        let mut want = vec![(0.0, 0.0); rows];
        for h in 0..qk_heads {
            for i in 0..half {
                let ((a, sa), (b, sb)) = (dot(h * hd + i), dot(h * hd + i + half));
                let (c, s) = (cos[i] as f64, sin[i] as f64);
                want[h * hd + 2 * i] = (a * c - b * s, sa + sb);
                want[h * hd + 2 * i + 1] = (b * c + a * s, sa + sb);
            }
        }
        for (r, slot) in want.iter_mut().enumerate().skip(rope_rows) {
            *slot = dot(r);
        }
        let (cb, sb) = (gpu.storage("cos", &cos), gpu.storage("sin", &sin));
        let (xb, yb) = (gpu.storage("x", &x), gpu.output("y", rows));
        let rope = Rope {
            cos: &cb,
            sin: &sb,
            rows: rope_rows,
            head_dim: hd,
        };
        for tiling in Tiling::ALL {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            gemv.launch_rope(&gpu, &m, Input::F32(&xb), &yb, rope, Some(tiling))
                .unwrap()
                .record(&mut enc);
            let got = gpu.finish_f32(enc, &yb, rows).unwrap();
            for (r, (&g, &(v, scale))) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - v).abs() <= 1e-5 * scale.max(1e-3),
                    "{spec:?} tiling {tiling}, row {r}: {g} vs {v}"
                );
            }
        }
        // Heads of an odd size, or rows that are not whole heads, are refused.
        let bad = Rope {
            head_dim: 7,
            ..rope
        };
        assert!(
            gemv.launch_rope(&gpu, &m, Input::F32(&xb), &yb, bad, None)
                .is_err()
        );
    }
}
