//! GPTQ against RTN on correlated inputs, its identity with RTN when inputs are uncorrelated,
//! its output on the quantization grid, act-order as natural order on permuted columns, and
//! the layer-wise driver on a tiny model.

use burn::tensor::{Device, Tensor, TensorData};
use ostquant_core::model::checkpoint::HostTensor;
use ostquant_core::model::llama::{ForwardOptions, Llama};
use ostquant_core::quant::gptq::{Hessian, gptq_model, gptq_quantize};
use ostquant_core::quant::method::quantize_weights_rtn;
use ostquant_core::quant::quantizer::{CLIP_POWER, QuantSpec, fake_quant_matrix, search_params};
use ostquant_tests::{random_weights, tiny_config};
use rand::{Rng, SeedableRng};

fn randn(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    // Box–Muller keeps the test free of extra distributions crates.
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// X [rows, n] with strongly correlated columns: X = Z·A, A dense with a decaying spectrum.
fn correlated_inputs(rng: &mut impl Rng, rows: usize, n: usize) -> Vec<f32> {
    let z = randn(rng, rows * n);
    let a: Vec<f32> = randn(rng, n * n)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v / (1.0 + (i / n) as f32))
        .collect();
    let mut x = vec![0f32; rows * n];
    for r in 0..rows {
        for k in 0..n {
            let zk = z[r * n + k];
            for j in 0..n {
                x[r * n + j] += zk * a[k * n + j];
            }
        }
    }
    x
}

fn hessian(x: &[f32], n: usize) -> Hessian {
    let mut h = Hessian::new(n);
    let t = Tensor::<2>::from_data(
        TensorData::new(x.to_vec(), [x.len() / n, n]),
        &Device::flex(),
    );
    h.add_tensor(t).unwrap();
    h
}

/// ‖X·(W − Q)ᵀ‖² in f64.
fn output_error(x: &[f32], w: &[f32], q: &[f32], n: usize) -> f64 {
    let mut e = 0.0;
    for xr in x.chunks_exact(n) {
        for (wr, qr) in w.chunks_exact(n).zip(q.chunks_exact(n)) {
            let d: f64 = xr
                .iter()
                .zip(wr.iter().zip(qr))
                .map(|(&xi, (&wi, &qi))| xi as f64 * (wi - qi) as f64)
                .sum();
            e += d * d;
        }
    }
    e
}

#[test]
fn gptq_beats_rtn_on_correlated_inputs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (rows, n, out) = (512, 64, 24);
    let x = correlated_inputs(&mut rng, rows, n);
    let w = randn(&mut rng, out * n);
    let spec = QuantSpec::sym(4);
    let mut rtn = w.clone();
    fake_quant_matrix(&mut rtn, n, &spec, Some(CLIP_POWER));
    let mut g = HostTensor {
        shape: vec![out, n],
        data: w.clone(),
    };
    gptq_quantize(&mut g, &hessian(&x, n), &spec, false).unwrap();
    let (e_rtn, e_gptq) = (
        output_error(&x, &w, &rtn, n),
        output_error(&x, &w, &g.data, n),
    );
    assert!(
        e_gptq < 0.7 * e_rtn,
        "GPTQ output error {e_gptq:.3} vs RTN {e_rtn:.3}"
    );
}

#[test]
fn gptq_output_lies_on_each_rows_grid() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let (n, out) = (32, 6);
    let x = correlated_inputs(&mut rng, 128, n);
    let w = randn(&mut rng, out * n);
    let spec = QuantSpec::sym(3);
    let mut g = HostTensor {
        shape: vec![out, n],
        data: w.clone(),
    };
    gptq_quantize(&mut g, &hessian(&x, n), &spec, false).unwrap();
    for (orig, q) in w.chunks_exact(n).zip(g.data.chunks_exact(n)) {
        let (s, _) = search_params(orig, &spec, Some(CLIP_POWER));
        for &v in q {
            let k = v / s;
            assert!((k - k.round()).abs() < 1e-3, "{v} is not a multiple of {s}");
            assert!(
                (-4.0..=3.0).contains(&k.round()),
                "level {k} outside [-4, 3]"
            );
        }
    }
}

#[test]
fn gptq_equals_rtn_when_inputs_are_uncorrelated() {
    // H diagonal ⇒ H⁻¹ diagonal ⇒ no error is passed on: GPTQ is RTN with the same scales.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (n, out) = (16, 5);
    let w = randn(&mut rng, out * n);
    let mut h = Hessian::new(n);
    for i in 0..n {
        h.sum[i * n + i] = 1.0 + i as f64;
    }
    let spec = QuantSpec::sym(4);
    let mut g = HostTensor {
        shape: vec![out, n],
        data: w.clone(),
    };
    gptq_quantize(&mut g, &h, &spec, false).unwrap();
    let mut rtn = w;
    fake_quant_matrix(&mut rtn, n, &spec, Some(CLIP_POWER));
    for (a, b) in g.data.iter().zip(&rtn) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn gptq_rejects_nan_activations() {
    let mut h = Hessian::new(4);
    h.sum[5] = f64::NAN;
    let mut w = HostTensor {
        shape: vec![2, 4],
        data: vec![0.5; 8],
    };
    let err = gptq_quantize(&mut w, &h, &QuantSpec::sym(4), false).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
}

#[test]
fn layerwise_gptq_is_closer_to_fp_than_rtn_on_a_tiny_model() {
    let w = random_weights(&tiny_config(64), 31);
    let dev = Device::flex();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let windows: Vec<Vec<u32>> = (0..8)
        .map(|_| (0..32).map(|_| rng.random_range(0..64)).collect())
        .collect();
    let test: Vec<u32> = (0..24).map(|_| rng.random_range(0..64)).collect();
    let logits = |w: &_| {
        let m = Llama::new(w, &dev);
        m.forward(std::slice::from_ref(&test), &mut m.new_cache())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let fp = logits(&w);
    let mse = |q: &[f32]| fp.iter().zip(q).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
    let (g, grids) = gptq_model(
        &w,
        &ForwardOptions::default(),
        &windows,
        &QuantSpec::sym(3),
        false,
        &dev,
        &mut |_, _| {},
    )
    .unwrap();
    // Every quantized weight is its grid's value of an integer code in [−4, 3].
    let spec = QuantSpec::sym(3);
    for (l, lg) in g.layers.iter().zip(&grids) {
        for (m, grid) in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
            .into_iter()
            .zip(lg)
        {
            let cols = m.shape[1];
            for (r, row) in m.data.chunks(cols).enumerate() {
                let gr = grid[r];
                for &x in row {
                    let q = gr.code(&spec, x);
                    assert!(
                        (-4..=3).contains(&q)
                            && (gr.value(q) - x).abs() <= 1e-5 * gr.scale.max(1.0)
                    );
                }
            }
        }
    }
    let mut r = w.clone();
    quantize_weights_rtn(&mut r, &QuantSpec::sym(3));
    let (e_g, e_r) = (mse(&logits(&g)), mse(&logits(&r)));
    assert!(
        e_g > 0.0 && e_g < e_r,
        "GPTQ logit error {e_g} vs RTN {e_r}"
    );
}

#[test]
fn grouped_and_asymmetric_gptq_use_at_most_2_to_the_bits_levels_per_group() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let (n, out, group) = (32, 4, 8);
    let x = correlated_inputs(&mut rng, 128, n);
    let w = randn(&mut rng, out * n);
    let h = hessian(&x, n);
    for spec in [
        QuantSpec::sym(3).with_group(group),
        QuantSpec::asym(3).with_group(group),
    ] {
        let mut g = HostTensor {
            shape: vec![out, n],
            data: w.clone(),
        };
        gptq_quantize(&mut g, &h, &spec, false).unwrap();
        for chunk in g.data.chunks_exact(group) {
            let mut levels: Vec<f32> = chunk.to_vec();
            levels.sort_by(f32::total_cmp);
            levels.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
            assert!(
                levels.len() <= 8,
                "{} levels in a 3-bit group",
                levels.len()
            );
        }
        // Groups fit the data better than one scale per row.
        let mut per_row = HostTensor {
            shape: vec![out, n],
            data: w.clone(),
        };
        let row_spec = QuantSpec {
            group: None,
            ..spec
        };
        gptq_quantize(&mut per_row, &h, &row_spec, false).unwrap();
        assert!(
            output_error(&x, &w, &g.data, n) < output_error(&x, &w, &per_row.data, n),
            "{spec:?}"
        );
    }
    let bad = gptq_quantize(
        &mut HostTensor {
            shape: vec![out, n],
            data: w,
        },
        &h,
        &QuantSpec::sym(4).with_group(7),
        false,
    );
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("group 7 does not divide 32")
    );
}

/// Correlated inputs whose columns carry very different energies (as LLM activations do).
fn uneven_inputs(rng: &mut impl Rng, rows: usize, n: usize) -> Vec<f32> {
    let gains: Vec<f32> = (0..n).map(|_| (3.0 * rng.random::<f32>()).exp()).collect();
    let mut x = correlated_inputs(rng, rows, n);
    for r in x.chunks_exact_mut(n) {
        for (v, g) in r.iter_mut().zip(&gains) {
            *v *= g;
        }
    }
    x
}

#[test]
fn act_order_is_natural_order_gptq_on_columns_sorted_by_energy() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (rows, n, out) = (256, 24, 5);
    let x = uneven_inputs(&mut rng, rows, n);
    let w = randn(&mut rng, out * n);
    // The order, from the inputs in f64: columns by decreasing Σ x².
    let energy: Vec<f64> = (0..n)
        .map(|j| x.chunks_exact(n).map(|r| (r[j] as f64).powi(2)).sum())
        .collect();
    let mut perm: Vec<usize> = (0..n).collect();
    perm.sort_by(|&a, &b| energy[b].total_cmp(&energy[a]));
    let permute = |m: &[f32]| -> Vec<f32> {
        m.chunks_exact(n)
            .flat_map(|r| perm.iter().map(|&c| r[c]))
            .collect()
    };
    let mut natural = HostTensor {
        shape: vec![out, n],
        data: permute(&w),
    };
    gptq_quantize(
        &mut natural,
        &hessian(&permute(&x), n),
        &QuantSpec::sym(4),
        false,
    )
    .unwrap();
    let mut act = HostTensor {
        shape: vec![out, n],
        data: w.clone(),
    };
    gptq_quantize(&mut act, &hessian(&x, n), &QuantSpec::sym(4), true).unwrap();
    for (a, b) in permute(&act.data).iter().zip(&natural.data) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn act_order_with_groups_fixes_each_groups_grid_on_the_incoming_weights() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let (rows, n, out, group) = (256, 32, 6, 8);
    let x = uneven_inputs(&mut rng, rows, n);
    let w = randn(&mut rng, out * n);
    let h = hessian(&x, n);
    for spec in [
        QuantSpec::sym(3).with_group(group),
        QuantSpec::asym(3).with_group(group),
    ] {
        let mut g = HostTensor {
            shape: vec![out, n],
            data: w.clone(),
        };
        let grids = gptq_quantize(&mut g, &h, &spec, true).unwrap();
        // Each group's grid is the clip search on its original columns, and every output
        // value is a code of that grid.
        let mut rtn = w.clone();
        for (k, (orig, q)) in w
            .chunks_exact(group)
            .zip(g.data.chunks_exact(group))
            .enumerate()
        {
            let (scale, zero) = search_params(orig, &spec, Some(CLIP_POWER));
            assert_eq!(
                (grids[k].scale, grids[k].zero),
                (scale, zero),
                "{spec:?} group {k}"
            );
            for &v in q {
                let c = grids[k].code(&spec, v);
                assert!(
                    (grids[k].value(c) - v).abs() <= 1e-5,
                    "{v} off the grid of group {k}"
                );
            }
            for (r, &o) in rtn[k * group..(k + 1) * group].iter_mut().zip(orig) {
                *r = grids[k].value(grids[k].code(&spec, o));
            }
        }
        // On the same grids, GPTQ's error feedback beats rounding each weight to nearest.
        let (e_gptq, e_rtn) = (
            output_error(&x, &w, &g.data, n),
            output_error(&x, &w, &rtn, n),
        );
        assert!(
            e_gptq < 0.8 * e_rtn,
            "{spec:?}: GPTQ {e_gptq:.3} vs RTN {e_rtn:.3}"
        );
    }
}

#[test]
fn act_order_lowers_the_output_error_when_column_energies_differ() {
    // Summed over several draws, so that the test is about the method, not one seed.
    let (mut e_natural, mut e_act) = (0.0, 0.0);
    for seed in 0..6 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + seed);
        let (rows, n, out) = (256, 32, 8);
        let x = uneven_inputs(&mut rng, rows, n);
        let w = randn(&mut rng, out * n);
        let h = hessian(&x, n);
        for (act_order, e) in [(false, &mut e_natural), (true, &mut e_act)] {
            let mut g = HostTensor {
                shape: vec![out, n],
                data: w.clone(),
            };
            gptq_quantize(&mut g, &h, &QuantSpec::sym(3), act_order).unwrap();
            *e += output_error(&x, &w, &g.data, n);
        }
    }
    assert!(
        e_act < e_natural,
        "act-order output error {e_act:.4} vs natural order {e_natural:.4}"
    );
}
