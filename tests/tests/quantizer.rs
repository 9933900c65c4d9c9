//! Fake quantizers against hand-computed values and a brute-force clip search.

use burn::tensor::{Device, Tensor, TensorData};
use ostquant_core::quant::quantizer::*;
use ostquant_tests::software_vulkan;
use rand::{Rng, SeedableRng};

fn q(values: &[f32], spec: QuantSpec) -> Vec<f32> {
    let mut v = values.to_vec();
    fake_quant_group(&mut v, &spec, 1.0);
    v
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
}

#[test]
fn symmetric_4bit_uses_minus_8_to_7() {
    // s = max(2.1/7, 1/8) = 0.3
    assert!(close(
        &q(&[-1.0, 0.5, 2.1], QuantSpec::sym(4)),
        &[-0.9, 0.6, 2.1]
    ));
    // Negative-dominated: s = max(1/7, 4/8) = 0.5, and −4 maps to −8 exactly.
    assert!(close(
        &q(&[-4.0, 1.0, 0.2], QuantSpec::sym(4)),
        &[-4.0, 1.0, 0.0]
    ));
    let spec = QuantSpec::sym(4);
    assert_eq!((spec.qmin(), spec.qmax()), (-8.0, 7.0));
}

#[test]
fn asymmetric_zero_point() {
    // s = 4/15, z = round(1/s) = round(3.75) = 4
    let (s, z) = params(&QuantSpec::asym(4), -1.0, 3.0);
    assert!((s - 4.0 / 15.0).abs() < 1e-7);
    assert_eq!(z, 4.0);
    assert!(close(
        &q(&[-1.0, 3.0], QuantSpec::asym(4)),
        &[-16.0 / 15.0, 44.0 / 15.0]
    ));
    // All-positive group: the range is forced to include 0, so z = 0 and s = 2/15.
    let (s, z) = params(&QuantSpec::asym(4), 1.0, 2.0);
    assert!((s - 2.0 / 15.0).abs() < 1e-7 && z == 0.0);
    assert_eq!(QuantSpec::asym(4).qmax(), 15.0);
}

#[test]
fn groups_have_their_own_scales() {
    let spec = QuantSpec::sym(4).with_group(2);
    let mut m = vec![7.0, 1.0, 0.7, 0.1, -8.0, 3.0, 0.07, -0.02];
    fake_quant_matrix(&mut m, 4, &spec, None);
    let want: Vec<f32> = [[7.0, 1.0], [0.7, 0.1], [-8.0, 3.0], [0.07, -0.02]]
        .iter()
        .flat_map(|g| q(g, QuantSpec::sym(4)))
        .collect();
    assert!(close(&m, &want));
    // The small group keeps its resolution: 0.1 survives with scale 0.1.
    assert!((m[3] - 0.1).abs() < 1e-6);
}

/// Naive f64 quantization error, written out independently of the library.
fn brute_error(g: &[f32], bits: u32, sym: bool, clip: f64, p: f64) -> f64 {
    let lo = g.iter().fold(0f64, |m, &x| m.min(x as f64)) * clip;
    let hi = g.iter().fold(0f64, |m, &x| m.max(x as f64)) * clip;
    let (qmin, qmax, s, z) = if sym {
        let (qmin, qmax) = (
            -(2f64.powi(bits as i32 - 1)),
            2f64.powi(bits as i32 - 1) - 1.0,
        );
        (qmin, qmax, (hi.max(1e-6) / qmax).max(lo / qmin), 0.0)
    } else {
        let qmax = 2f64.powi(bits as i32) - 1.0;
        let s = (hi - lo).max(1e-6) / qmax;
        (0.0, qmax, s, (-lo / s).round())
    };
    g.iter()
        .map(|&x| {
            let x = x as f64;
            let xq = (((x / s).round() + z).clamp(qmin, qmax) - z) * s;
            (x - xq).abs().powf(p)
        })
        .sum()
}

#[test]
fn clip_search_finds_the_brute_force_minimum() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for trial in 0..20 {
        // Heavy-tailed rows, where clipping pays.
        let mut g: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        g[trial % 64] = 12.0;
        for (sym, p) in [(true, 2.4), (false, 2.0)] {
            let spec = if sym {
                QuantSpec::sym(4)
            } else {
                QuantSpec::asym(4)
            };
            let got = search_clip(&g, &spec, p as f32);
            let errs: Vec<(f64, f64)> = (0..80)
                .map(|i| 1.0 - i as f64 / 100.0)
                .map(|c| (brute_error(&g, 4, sym, c, p), c))
                .collect();
            let best = errs
                .iter()
                .cloned()
                .fold((f64::INFINITY, 1.0), |b, e| if e.0 < b.0 { e } else { b });
            let got_err = brute_error(&g, 4, sym, got as f64, p);
            assert!(
                got_err <= best.0 * (1.0 + 1e-4),
                "trial {trial}: clip {got} err {got_err} vs {best:?}"
            );
            assert!(got < 1.0, "an outlier row should be clipped");
        }
    }
}

#[test]
fn clip_search_picks_what_a_plain_scan_picks() {
    // The search scores candidates coarse-first and stops losers early; the factor must be the
    // one a plain scan of every candidate's full error picks (ties: the larger factor).
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for trial in 0..200 {
        let n = [8, 64, 576][trial % 3];
        let mut g: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        if trial % 2 == 0 {
            g[trial % n] = rng.random_range(2.0f32..20.0);
        }
        for spec in [QuantSpec::sym(4), QuantSpec::asym(4), QuantSpec::sym(3)] {
            let mut best = (f64::INFINITY, 1.0f32);
            for c in clip_candidates() {
                let e = clip_error(&g, &spec, c, 2.4);
                if e < best.0 {
                    best = (e, c);
                }
            }
            assert_eq!(search_clip(&g, &spec, 2.4), best.1, "trial {trial}");
        }
    }
}

#[test]
fn round_half_away_matches_f32_round() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut xs: Vec<f32> = (-300..300).map(|k| k as f32 + 0.5).collect(); // every tie
    xs.extend([
        0.0,
        -0.0,
        0.49999997,
        -0.49999997,
        0.50000006,
        4_194_303.5,
        -4_194_303.5,
    ]);
    xs.extend((0..100_000).map(|_| rng.random_range(-300.0f32..300.0)));
    xs.extend((0..1000).map(|_| rng.random_range(-1e-3f32..1e-3)));
    for x in xs {
        assert_eq!(round_half_away(x), x.round(), "{x}");
    }
    // Far beyond any quantizer's range the result only has to stay beyond it.
    assert_eq!(round_half_away(1e9), 4_194_304.0);
    assert_eq!(round_half_away(-1e9), -4_194_304.0);
}

#[test]
fn pow_abs_matches_f64_powf() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for p in [1.0f64, 2.0, 2.4, 3.0, 4.5] {
        let mut worst = 0.0f64;
        for _ in 0..100_000 {
            // Log-uniform magnitudes from 1e-12 to 1e4, both signs.
            let x =
                10f64.powf(rng.random_range(-12.0..4.0)) * if rng.random() { 1.0 } else { -1.0 };
            let want = x.abs().powf(p);
            if want < 2f64.powi(-126) || want > 1e38 {
                continue;
            }
            let got = pow_abs(x as f32, p as f32) as f64;
            // The reference gets the same f32 input.
            let want = (x as f32 as f64).abs().powf(p);
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-5, "p {p}: relative error {worst:e}");
    }
    assert!(pow_abs(0.0, 2.4) < 1e-37);
}

#[test]
fn device_quantizer_matches_host() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (rows, cols) = (6, 128);
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-3.0f32..2.0))
        .collect();
    let device = Device::flex();
    for spec in [
        QuantSpec::asym(4),
        QuantSpec::asym(4).with_group(64),
        QuantSpec::sym(4).with_group(32),
        QuantSpec::sym(8),
    ] {
        let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, cols]), &device);
        let got = fake_quant_tensor(t, &spec)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let mut want = x.clone();
        fake_quant_matrix(&mut want, cols, &spec, None);
        let diff = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| (*a - *b).abs() > 1e-5)
            .count();
        // A value exactly on a rounding boundary may round either way in f32; allow a handful.
        assert!(diff <= 2, "{spec:?}: {diff} values differ");
    }
}

#[test]
fn device_clip_search_scores_as_the_host_search_does() {
    // The search a GPU calibration runs on the device picks, for every group, a factor whose
    // error is the host search's minimum (f32 sums against f64: equal up to near-ties).
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let (groups, n) = (60, 64);
    let mut x: Vec<f32> = (0..groups * n)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    for g in 0..groups {
        if g % 2 == 0 {
            x[g * n + g % n] = rng.random_range(2.0f32..20.0); // outliers: clipping pays
        }
    }
    for device in [Device::flex(), software_vulkan()] {
        for spec in [QuantSpec::sym(4), QuantSpec::asym(4), QuantSpec::asym(3)] {
            let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [groups, n]), &device);
            let got = device_clip_search(t, &spec, CLIP_POWER)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let mut same = 0;
            for (g, &c) in x.chunks(n).zip(&got) {
                let host = search_clip(g, &spec, CLIP_POWER);
                let (e_dev, e_host) = (
                    clip_error(g, &spec, c, CLIP_POWER),
                    clip_error(g, &spec, host, CLIP_POWER),
                );
                assert!(
                    e_dev <= e_host * (1.0 + 1e-4),
                    "{spec:?}: factor {c} (error {e_dev}) vs the host's {host} ({e_host})"
                );
                same += usize::from(c == host);
            }
            assert!(
                same >= groups * 9 / 10,
                "{spec:?}: {same} of {groups} factors agree"
            );
        }
    }
}

#[test]
fn calibration_weight_quantizer_is_clip_searched_rtn_with_a_masked_gradient() {
    // The weights a W4A16 calibration sees are the deployed RTN weights (per output channel,
    // clip search), and the gradient is 1 where a value lands inside its grid, 0 where clamped:
    // on burn's CPU backend (the search on the host) and on a wgpu device (on the device).
    for device in [Device::flex().autodiff(), software_vulkan().autodiff()] {
        weight_quantizer_on(&device);
    }
}

fn weight_quantizer_on(device: &Device) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (rows, cols) = (7, 48);
    // Cubed uniforms: heavy tails, so the search clips and some values get clamped.
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| 3.0 * rng.random_range(-1.0f32..1.0).powi(3))
        .collect();
    for spec in [QuantSpec::sym(4), QuantSpec::asym(4)] {
        let mut want = w.clone();
        fake_quant_matrix(&mut want, cols, &spec, Some(CLIP_POWER));
        // Mask by hand: the code of each value on its row's searched grid, before clamping.
        let mut inside = Vec::new();
        for row in w.chunks(cols) {
            let (s, z) = search_params(row, &spec, Some(CLIP_POWER));
            inside.extend(row.iter().map(|&x| {
                let c = (x / s).round() + z;
                (spec.qmin()..=spec.qmax()).contains(&c)
            }));
        }
        let clamped = inside.iter().filter(|&&b| !b).count();
        assert!(clamped > 0, "the test data must clip some values");

        // The calibration keeps weights transposed, [in, out].
        let w_t: Vec<f32> = (0..cols * rows)
            .map(|i| w[(i % rows) * cols + i / rows])
            .collect();
        let leaf =
            Tensor::<2>::from_data(TensorData::new(w_t, [cols, rows]), device).require_grad();
        let q_t = fake_quant_weight_t(leaf.clone(), &spec);
        let got: Vec<f32> = q_t
            .clone()
            .transpose()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() < 1e-6,
                "{spec:?} [{i}]: {g} vs host {e} on {device:?}"
            );
        }
        let grads = q_t.sum().backward();
        let grad: Vec<f32> = leaf
            .grad(&grads)
            .unwrap()
            .transpose()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (i, (g, &m)) in grad.iter().zip(&inside).enumerate() {
            assert_eq!(*g, if m { 1.0 } else { 0.0 }, "{spec:?} gradient [{i}]");
        }
    }
}
