//! OSTQuant calibration: every learned transform is function-preserving (alone and together,
//! fused in f64 and in the training-time student), the losses equal brute-force values, the
//! autodiff gradients match finite differences, the Stiefel optimisers stay orthogonal and
//! find a known minimum, WOMI equalises the weight variances, checkpoints resume exactly, and
//! a short calibration of a tiny model lowers the loss and the quantized model's KL to FP.

use std::sync::atomic::AtomicBool;

use burn::tensor::{Device, Tensor, TensorData};
use ostquant_core::calib::optim::{
    AdamState, RotationOptimizer, StiefelState, orthogonality_error,
};
use ostquant_core::calib::student::{Params, Student, Trainable};
use ostquant_core::calib::transforms::{Shapes, Transforms, womi_residual};
use ostquant_core::calib::{Calibrator, Checkpoint, Init, Loss, Overrides, Preset, Settings};
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::llama::{ForwardOptions, Llama};
use ostquant_core::quant::method::Bits;
use ostquant_core::transform::fuse::fold_norms;
use ostquant_core::transform::hadamard::random_hadamard;
use ostquant_tests::{random_weights, tiny_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOKENS: [u32; 9] = [3, 17, 42, 5, 60, 1, 33, 12, 63];

fn flat(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn logits(w: &LlamaWeights, opts: ForwardOptions) -> Vec<f32> {
    let mut m = Llama::new(w, &Device::flex());
    m.set_options(opts).unwrap();
    flat(m.forward(&[TOKENS.to_vec()], &mut m.new_cache()))
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A random orthogonal n × n matrix: Gram–Schmidt on Gaussian-ish columns, in f64.
fn random_orthogonal(n: usize, rng: &mut StdRng) -> Vec<f64> {
    let mut cols: Vec<Vec<f64>> = Vec::new();
    while cols.len() < n {
        let mut v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        for c in &cols {
            let d: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(c).for_each(|(a, b)| *a -= d * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-3 {
            cols.push(v.into_iter().map(|a| a / norm).collect());
        }
    }
    let mut m = vec![0.0; n * n];
    for (j, c) in cols.iter().enumerate() {
        for i in 0..n {
            m[i * n + j] = c[i];
        }
    }
    m
}

fn random_scales(n: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(0.5..2.0)).collect()
}

/// Transforms with the chosen kinds randomised and the rest at identity.
fn random_transforms(w: &LlamaWeights, kinds: &[&str], seed: u64) -> Transforms {
    let mut rng = StdRng::seed_from_u64(seed);
    let s = Shapes::of(&w.config);
    let mut t = Transforms::identity(s);
    for kind in kinds {
        match *kind {
            "r_res" => t.r_res = random_orthogonal(s.d, &mut rng),
            _ => {
                for l in &mut t.layers {
                    match *kind {
                        "s_attn" => l.s_attn = random_scales(s.d, &mut rng),
                        "s_ffn" => l.s_ffn = random_scales(s.d, &mut rng),
                        "s_qk" => l.s_qk = random_scales(l.s_qk.len(), &mut rng),
                        "s_ov" => l.s_ov = random_scales(l.s_ov.len(), &mut rng),
                        "r_ov" => {
                            l.r_ov = (0..s.nkv)
                                .flat_map(|_| random_orthogonal(s.hd, &mut rng))
                                .collect()
                        }
                        "s_ud" => l.s_ud = random_scales(s.dff, &mut rng),
                        other => panic!("unknown kind {other}"),
                    }
                }
            }
        }
    }
    t
}

const KINDS: [&str; 7] = ["r_res", "s_attn", "s_ffn", "s_qk", "s_ov", "r_ov", "s_ud"];

#[test]
fn every_transform_is_function_preserving_when_fused() {
    let w = random_weights(&tiny_config(64), 1);
    let reference = logits(&w, ForwardOptions::default());
    let mut cases: Vec<Vec<&str>> = KINDS.iter().map(|k| vec![*k]).collect();
    cases.push(KINDS.to_vec());
    for (i, kinds) in cases.iter().enumerate() {
        for qk in [false, true] {
            let t = random_transforms(&w, kinds, 10 + i as u64);
            let (fused, online) = t.fuse(&w, qk).unwrap();
            let err = rel_err(&logits(&fused, online), &reference);
            assert!(
                err < 2e-5,
                "{kinds:?} (qk Hadamard {qk}): relative error {err}"
            );
        }
    }
}

#[test]
fn the_student_equals_the_original_model_with_quantizers_off() {
    let w = random_weights(&tiny_config(64), 2);
    let reference = logits(&w, ForwardOptions::default());
    let device = Device::flex().autodiff();
    let mut student = Student::new(&w, &device, &ForwardOptions::default(), None).unwrap();
    for (i, kinds) in [KINDS.to_vec(), vec!["s_qk", "s_ov"]].iter().enumerate() {
        let t = random_transforms(&w, kinds, 30 + i as u64);
        let p = Params::upload(
            &t,
            &device,
            Trainable {
                rotations: true,
                scales: true,
            },
        );
        let out = flat(student.forward(&p, &[TOKENS.to_vec()]));
        let err = rel_err(&out, &reference);
        assert!(err < 2e-5, "{kinds:?}: relative error {err}");
    }
}

#[test]
fn the_student_equals_the_fused_quantized_model() {
    // Same transforms, same activation / KV quantizers: training and deployment agree.
    let w = random_weights(&tiny_config(64), 3);
    let t = random_transforms(&w, &KINDS, 40);
    let settings = Settings::ostquant(Bits { w: 16, a: 4, kv: 4 }, Preset::Cpu);
    let opts = settings.forward_options();
    let (fused, _) = t.fuse(&w, opts.qk_hadamard).unwrap();
    let deployed = logits(&fused, opts.clone());
    let device = Device::flex().autodiff();
    let mut student = Student::new(&w, &device, &opts, None).unwrap();
    let p = Params::upload(
        &t,
        &device,
        Trainable {
            rotations: false,
            scales: false,
        },
    );
    let trained = flat(student.forward(&p, &[TOKENS.to_vec()]));
    // Rounding of values that sit on a quantization boundary may differ; most must agree.
    let err = rel_err(&trained, &deployed);
    assert!(err < 0.05, "relative error {err}");
}

/// Σ p·(log p − log q) over the teacher's top-k of each row, in f64.
fn kl_top_reference(zp: &[f32], zq: &[f32], v: usize, k: usize) -> f64 {
    let log_softmax = |z: &[f32]| {
        let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        z.iter().map(|&x| x as f64 - lse).collect::<Vec<f64>>()
    };
    let rows = zp.len() / v;
    let mut total = 0.0;
    for r in 0..rows {
        let (p, q) = (&zp[r * v..(r + 1) * v], &zq[r * v..(r + 1) * v]);
        let (lp, lq) = (log_softmax(p), log_softmax(q));
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
        for &i in &order[..k] {
            total += lp[i].exp() * (lp[i] - lq[i]);
        }
    }
    total / rows as f64
}

#[test]
fn losses_equal_brute_force() {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, t, v) = (2, 5, 37);
    let zp: Vec<f32> = (0..b * t * v)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let zq: Vec<f32> = (0..b * t * v)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let tokens: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..t).map(|_| rng.random_range(0..v as u32)).collect())
        .collect();
    let dev = Device::flex();
    let tensor = |x: &Vec<f32>| Tensor::<3>::from_data(TensorData::new(x.clone(), [b, t, v]), &dev);
    let value = |loss: Loss| {
        loss.compute(tensor(&zp), tensor(&zq), &tokens)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()[0] as f64
    };
    for k in [1, 5, 37] {
        let want = kl_top_reference(&zp, &zq, v, k);
        let got = value(Loss::KlTop(k));
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "k={k}: {got} vs {want}"
        );
    }
    // Full KL = KL-Top with k = V; CE = −mean log q(next token).
    assert!((value(Loss::Kl) - kl_top_reference(&zp, &zq, v, v)).abs() < 1e-4);
    let mut ce = 0.0;
    for (r, row) in tokens.iter().enumerate() {
        for i in 0..t - 1 {
            let z = &zq[(r * t + i) * v..(r * t + i + 1) * v];
            let lse = z.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            ce -= z[row[i + 1] as usize] as f64 - lse;
        }
    }
    ce /= (b * (t - 1)) as f64;
    assert!(
        (value(Loss::Ce) - ce).abs() < 1e-4,
        "ce {} vs {ce}",
        value(Loss::Ce)
    );
    let mse = zp
        .iter()
        .zip(&zq)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / zp.len() as f64;
    assert!((value(Loss::Mse) - mse).abs() < 1e-3);
    assert_eq!(Loss::parse("kl-top:50"), Ok(Loss::KlTop(50)));
    assert!(Loss::parse("kl-top:0").is_err() && Loss::parse("l1").is_err());
}

/// Σ C ⊙ W' over every fused weight of every block, a smooth function of R and S.
fn weight_functional(student: &Student, p: &Params, c: &[Vec<Tensor<2>>]) -> Tensor<1> {
    let mut total: Option<Tensor<1>> = None;
    for (layer, cs) in student.fused_layers(p).into_iter().zip(c) {
        let ws = [
            layer.wq_t,
            layer.wk_t,
            layer.wv_t,
            layer.wo_t,
            layer.w_gate_t,
            layer.w_up_t,
            layer.w_down_t,
        ];
        for (w, c) in ws.into_iter().zip(cs) {
            let term = (w * c.clone()).sum();
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
        }
        let norms = (layer.attn_norm + layer.ffn_norm).sum();
        total = total.map(|t| t + norms);
    }
    total.unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let w = random_weights(&tiny_config(64), 6);
    let device = Device::flex().autodiff();
    let student = Student::new(&w, &device, &ForwardOptions::default(), None).unwrap();
    let t = random_transforms(&w, &KINDS, 50);
    let all = Trainable {
        rotations: true,
        scales: true,
    };
    // Random weights C of the functional, one per fused matrix.
    let mut rng = StdRng::seed_from_u64(7);
    let p0 = Params::upload(&t, &device, all);
    let c: Vec<Vec<Tensor<2>>> = student
        .fused_layers(&p0)
        .iter()
        .map(|l| {
            [
                &l.wq_t,
                &l.wk_t,
                &l.wv_t,
                &l.wo_t,
                &l.w_gate_t,
                &l.w_up_t,
                &l.w_down_t,
            ]
            .iter()
            .map(|m| {
                let [r, k] = m.dims();
                let v: Vec<f32> = (0..r * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                Tensor::from_data(TensorData::new(v, [r, k]), &Device::flex())
            })
            .collect()
        })
        .collect();
    let value = |t: &Transforms| {
        let p = Params::upload(t, &device, all);
        weight_functional(&student, &p, &c)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()[0] as f64
    };
    let loss = weight_functional(&student, &p0, &c);
    let grads = loss.backward();
    let g = p0.gradients(&grads, &t);
    let x: Vec<f64> = t.values().collect();
    // Check a spread of coordinates: R_res, every scale kind, R_ov of both layers.
    let names: Vec<(String, usize)> = t
        .named()
        .iter()
        .map(|(n, _, v)| (n.clone(), v.len()))
        .collect();
    let mut starts = Vec::new();
    let mut at = 0;
    for (n, len) in &names {
        starts.push((n.clone(), at, *len));
        at += len;
    }
    let eps = 1e-2;
    let mut checked = 0;
    for (name, start, len) in starts {
        for j in [0, len / 3, len - 1] {
            let i = start + j;
            let mut plus = t.clone();
            let mut xp = x.clone();
            xp[i] += eps;
            plus.set_values(&xp);
            let mut minus = t.clone();
            let mut xm = x.clone();
            xm[i] -= eps;
            minus.set_values(&xm);
            let fd = (value(&plus) - value(&minus)) / (2.0 * eps);
            let tol = 2e-2 * fd.abs().max(g[i].abs()).max(1.0);
            assert!(
                (fd - g[i]).abs() < tol,
                "{name}[{j}]: autodiff {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 13);
}

#[test]
fn the_loss_gradient_reaches_the_residual_rotation() {
    // With quantizers off the model is unchanged by any orthogonal R, but a non-orthogonal
    // perturbation changes the logits: the loss gradient must match finite differences there.
    let w = random_weights(&tiny_config(64), 8);
    let other = random_weights(&tiny_config(64), 9);
    let device = Device::flex().autodiff();
    let mut student = Student::new(&w, &device, &ForwardOptions::default(), None).unwrap();
    let tokens = vec![TOKENS.to_vec()];
    let teacher = {
        let m = Llama::new(&other, &Device::flex());
        m.forward(&tokens, &mut m.new_cache())
    };
    let t = random_transforms(&w, &["r_res"], 60);
    let rot = Trainable {
        rotations: true,
        scales: false,
    };
    let g = {
        let p = Params::upload(&t, &device, rot);
        let z = student.forward(&p, &tokens);
        p.gradients(
            &Loss::Kl.compute(teacher.clone(), z, &tokens).backward(),
            &t,
        )
    };
    let mut value = |t: &Transforms| {
        let p = Params::upload(t, &device, rot);
        let z = student.forward(&p, &tokens);
        Loss::Kl
            .compute(teacher.clone(), z, &tokens)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()[0] as f64
    };
    let x: Vec<f64> = t.values().collect();
    let eps = 1e-2;
    for i in [0, 5, 100, 1023] {
        let (mut a, mut b) = (t.clone(), t.clone());
        let (mut xa, mut xb) = (x.clone(), x.clone());
        xa[i] += eps;
        xb[i] -= eps;
        a.set_values(&xa);
        b.set_values(&xb);
        let fd = (value(&a) - value(&b)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() < 3e-2 * fd.abs().max(g[i].abs()).max(0.1),
            "R[{i}]: autodiff {} vs finite difference {fd}",
            g[i]
        );
    }
}

#[test]
fn stiefel_optimisers_stay_orthogonal_and_find_a_known_minimum() {
    // Minimise ‖X − T‖² over orthogonal X: the minimum is X = T.
    let n = 12;
    let mut rng = StdRng::seed_from_u64(11);
    let target = random_orthogonal(n, &mut rng);
    for (kind, lr, steps) in [
        (RotationOptimizer::Adam, 0.05, 400),
        (RotationOptimizer::Sgd, 0.2, 400),
    ] {
        // Start in the target's connected component (same determinant): T times Givens
        // rotations of a radian in a few planes.
        let mut x = target.clone();
        for (a, b) in [(0, 1), (2, 5), (3, 7), (4, 11)] {
            let (c, s) = (1f64.cos(), 1f64.sin());
            for i in 0..n {
                let (xa, xb) = (x[i * n + a], x[i * n + b]);
                x[i * n + a] = c * xa - s * xb;
                x[i * n + b] = s * xa + c * xb;
            }
        }
        let mut state = StiefelState::new(n);
        for _ in 0..steps {
            let g: Vec<f64> = x.iter().zip(&target).map(|(a, b)| 2.0 * (a - b)).collect();
            state.step(kind, &mut x, &g, lr);
        }
        let dist = x
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(dist < 1e-2, "{kind:?}: ‖X − T‖ = {dist}");
        assert!(orthogonality_error(&x, n) < 1e-10);
    }
    // 200 steps on noisy gradients, then cast to f32 as the forward sees it.
    let mut x = random_orthogonal(n, &mut rng);
    let mut state = StiefelState::new(n);
    for _ in 0..200 {
        let g: Vec<f64> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        state.step(RotationOptimizer::Adam, &mut x, &g, 0.05);
    }
    let x32: Vec<f64> = x.iter().map(|&v| v as f32 as f64).collect();
    assert!(orthogonality_error(&x32, n) < 1e-4);
    // Adam on scales: minimise Σ(x − 3)².
    let mut s = vec![1.0; 4];
    let mut adam = AdamState::new(4);
    for _ in 0..500 {
        let g: Vec<f64> = s.iter().map(|v| 2.0 * (v - 3.0)).collect();
        adam.step(&mut s, &g, 0.05);
    }
    assert!(s.iter().all(|v| (v - 3.0).abs() < 1e-2), "{s:?}");
}

#[test]
fn womi_equalises_the_weight_variances() {
    // (Q·H)ᵀ Σ (Q·H) = Hᵀ Λ H has every diagonal entry equal to tr Σ / d.
    let w = random_weights(&tiny_config(64), 12);
    let mut folded = w.clone();
    fold_norms(&mut folded);
    let r = womi_residual(&folded).unwrap();
    let d = w.config.hidden_size;
    assert!(orthogonality_error(&r, d) < 1e-10);
    let mut rows: Vec<f64> = Vec::new();
    for l in &folded.layers {
        for m in [&l.wq, &l.wk, &l.wv, &l.w_up, &l.w_gate] {
            rows.extend(m.data.iter().map(|&v| v as f64));
        }
    }
    let n = rows.len() / d;
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| rows[i * d + j]).sum::<f64>() / n as f64)
        .collect();
    // Variance of each rotated coordinate.
    let mut var = vec![0.0; d];
    for i in 0..n {
        for (j, v) in var.iter_mut().enumerate() {
            let y: f64 = (0..d)
                .map(|k| (rows[i * d + k] - mean[k]) * r[k * d + j])
                .sum();
            *v += y * y / n as f64;
        }
    }
    let avg = var.iter().sum::<f64>() / d as f64;
    for v in &var {
        assert!((v - avg).abs() < 1e-9 * avg.max(1.0), "{v} vs {avg}");
    }
    // Without the Hadamard the variances are the (unequal) eigenvalues: WOMI really rotated.
    let h = random_hadamard(d, 0).unwrap();
    assert!(r.iter().zip(&h).any(|(a, b)| (a - b).abs() > 1e-3));
    let t = Transforms::init(&w, Init::Womi).unwrap();
    assert!((0..2).all(|l| orthogonality_error(&t.layers[l].r_ov[..64], 8) < 1e-10));
}

fn tiny_windows(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(0..64)).collect())
        .collect()
}

fn tiny_settings(steps: usize) -> Settings {
    Settings {
        steps,
        batch: 2,
        samples: 8,
        seq_len: 16,
        lr_rot: 0.05,
        lr_scale: 0.02,
        ..Settings::ostquant(Bits { w: 16, a: 4, kv: 4 }, Preset::Cpu)
    }
}

#[test]
fn checkpoints_resume_exactly() {
    let w = random_weights(&tiny_config(64), 13);
    let windows = tiny_windows(8, 16, 1);
    let never = AtomicBool::new(false);
    let straight = {
        let mut c = Calibrator::new(&w, tiny_settings(4), &windows, &Device::flex(), None).unwrap();
        c.run(&mut |_| {}, &never).unwrap();
        c.state.transforms
    };
    let mut first = Calibrator::new(&w, tiny_settings(4), &windows, &Device::flex(), None).unwrap();
    first.step().unwrap();
    first.step().unwrap();
    let bytes = first.state.to_bytes(&first.settings).unwrap();
    let (resumed, settings) = Checkpoint::from_bytes("ckpt".as_ref(), &bytes, &w).unwrap();
    assert_eq!(settings, tiny_settings(4));
    assert_eq!(resumed.step, 2);
    let mut second =
        Calibrator::new(&w, settings, &windows, &Device::flex(), Some(resumed)).unwrap();
    second.run(&mut |_| {}, &never).unwrap();
    let (a, b): (Vec<f64>, Vec<f64>) = (
        straight.values().collect(),
        second.state.transforms.values().collect(),
    );
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst < 1e-9, "resumed run differs by {worst}");
    // A file of another model is refused with a message.
    let big = random_weights(&ostquant_tests::tiny_config(80), 1);
    let mut cfg = big.config.clone();
    cfg.hidden_size = 16;
    let mut other = big.clone();
    other.config = cfg;
    assert!(Checkpoint::from_bytes("ckpt".as_ref(), &bytes, &other).is_err());
    assert!(Checkpoint::from_bytes("ckpt".as_ref(), &bytes[..100], &w).is_err());
}

#[test]
fn a_step_split_into_passes_equals_the_whole_batch() {
    // The gradient of a mean over positions is the passes' gradients weighted by their share:
    // one pass of 4 windows, four of 1 and an uneven 3 + 1 learn the same transforms. Cayley
    // SGD too, whose step (unlike Adam's) scales with the gradient.
    let w = random_weights(&tiny_config(64), 21);
    let windows = tiny_windows(8, 16, 2);
    for (optimizer, lr_rot) in [
        (RotationOptimizer::Adam, 0.05),
        (RotationOptimizer::Sgd, 1.5),
    ] {
        let settings = Settings {
            batch: 4,
            optimizer,
            lr_rot,
            ..tiny_settings(2)
        };
        let run = |per_pass: usize| {
            let mut c =
                Calibrator::new(&w, settings.clone(), &windows, &Device::flex(), None).unwrap();
            c.set_windows_per_pass(per_pass);
            let losses = [c.step().unwrap(), c.step().unwrap()];
            (losses, c.state.transforms.values().collect::<Vec<f64>>())
        };
        let (whole_losses, whole) = run(4);
        let start: Vec<f64> = Transforms::init(&w, settings.init)
            .unwrap()
            .values()
            .collect();
        let moved = whole
            .iter()
            .zip(&start)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        for per_pass in [1, 3] {
            let (losses, t) = run(per_pass);
            for (a, b) in losses.iter().zip(&whole_losses) {
                assert!(
                    (a - b).abs() < 1e-4 * b.abs(),
                    "loss {a} vs {b} ({per_pass} per pass)"
                );
            }
            let worst = t
                .iter()
                .zip(&whole)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            eprintln!(
                "{optimizer:?}, {per_pass} per pass: transforms differ by {worst:.1e}, moved {moved:.1e}"
            );
            assert!(
                worst < 1e-3 * moved,
                "{per_pass} per pass differs by {worst}"
            );
        }
    }
}

#[test]
fn overrides_change_only_what_they_name() {
    let base = Settings::ostquant(Bits { w: 4, a: 4, kv: 4 }, Preset::Cpu);
    assert_eq!(Overrides::default().apply(base.clone()), base);
    let o = Overrides {
        lr_scale: Some(0.0179),
        init: Some(Init::Hadamard),
        loss: Some(Loss::KlTop(50)),
        train_weights: Some(true),
        ..Default::default()
    };
    let s = o.apply(base.clone());
    assert_eq!(
        (s.lr_scale, s.init, s.loss, s.train_weights),
        (0.0179, Init::Hadamard, Loss::KlTop(50), true)
    );
    assert!(
        !base.train_weights,
        "the W4A4 preset leaves weights to GPTQ"
    );
    let back = Settings {
        lr_scale: base.lr_scale,
        init: base.init,
        loss: base.loss,
        train_weights: base.train_weights,
        ..s.clone()
    };
    assert_eq!(back, base);
    // Another calibration, so another cache key; the flags read back as the same overrides.
    assert_ne!(s.key(), base.key());
    assert_eq!(
        o.flags(),
        "--lr-scale 0.0179 --loss kl-top:50 --init hadamard --train-weights true"
    );
    assert_eq!(Loss::parse("kl-top:50"), Ok(Loss::KlTop(50)));
    assert_eq!("hadamard".parse::<Init>(), Ok(Init::Hadamard));
}

#[test]
fn cancelling_stops_with_an_error() {
    let w = random_weights(&tiny_config(64), 14);
    let windows = tiny_windows(8, 16, 2);
    let mut c = Calibrator::new(&w, tiny_settings(3), &windows, &Device::flex(), None).unwrap();
    let cancel = AtomicBool::new(true);
    let err = c.run(&mut |_| {}, &cancel).unwrap_err();
    assert!(matches!(err, ostquant_core::Error::Cancelled));
    assert_eq!(c.state.step, 0);
}

/// Mean KL(FP ‖ quantized) per position of `w` quantized at W16A4KV4 after transforms `t`.
fn quantized_kl(w: &LlamaWeights, t: &Transforms, settings: &Settings, tokens: &[Vec<u32>]) -> f64 {
    let fp = Llama::new(w, &Device::flex());
    let z_fp = fp.forward(tokens, &mut fp.new_cache());
    let opts = settings.forward_options();
    let (fused, _) = t.fuse(w, opts.qk_hadamard).unwrap();
    let mut q = Llama::new(&fused, &Device::flex());
    q.set_options(opts).unwrap();
    let z_q = q.forward(tokens, &mut q.new_cache());
    Loss::Kl
        .compute(z_fp, z_q, tokens)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()[0] as f64
}

/// A tiny model with the channel outliers of real LLMs: a few residual channels 20× larger.
fn outlier_weights(seed: u64) -> LlamaWeights {
    let mut w = random_weights(&tiny_config(64), seed);
    let d = w.config.hidden_size;
    for row in w.embed.data.chunks_mut(d) {
        row[3] *= 20.0;
        row[17] *= -12.0;
    }
    // Sharper output distributions, as in a trained model.
    let head = w.lm_head.as_mut().unwrap();
    head.data.iter_mut().for_each(|v| *v *= 8.0);
    w
}

#[test]
fn a_short_calibration_lowers_the_loss_and_the_quantized_kl() {
    let w = outlier_weights(15);
    let windows = tiny_windows(8, 16, 3);
    let held_out = tiny_windows(4, 16, 4);
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let settings = Settings {
        lr_rot: env("LR_ROT", 0.05),
        lr_scale: env("LR_SCALE", 0.02),
        init: [Init::Identity, Init::Hadamard, Init::Womi][env("INIT", 0.0) as usize],
        bits: Bits {
            w: 16,
            a: env("ABITS", 4.0) as u32,
            kv: env("KVBITS", 4.0) as u32,
        },
        ..tiny_settings(30)
    };
    let mut c = Calibrator::new(&w, settings.clone(), &windows, &Device::flex(), None).unwrap();
    let before = c.loss(&held_out);
    if std::env::var("DEBUG_CALIB").is_ok() {
        for _ in 0..30 {
            let l = c.step().unwrap();
            let h = c.loss(&held_out);
            eprintln!("step {} train {l:.6} held-out {h:.6}", c.state.step);
        }
    }
    let kl_before = quantized_kl(&w, &c.state.transforms, &settings, &held_out);
    let mut seen = Vec::new();
    c.run(&mut |e| seen.push(e.clone()), &AtomicBool::new(false))
        .unwrap();
    let after = c.loss(&held_out);
    let kl_after = quantized_kl(&w, &c.state.transforms, &settings, &held_out);
    assert_eq!(seen.len(), 31, "a start event and one per step");
    assert!(after < 0.9 * before, "loss {before} → {after}");
    assert!(
        kl_after < 0.9 * kl_before,
        "quantized KL {kl_before} → {kl_after}"
    );
    let r = &c.state.transforms.r_res;
    assert!(orthogonality_error(r, 32) < 1e-6);
}

/// The calibration's loss and gradient on burn's CPU backend and on the software Vulkan device
/// (wgpu) agree, so the calibration runs on any GPU through burn-wgpu.
#[test]
fn calibration_gradients_on_the_software_vulkan_device_match_the_cpu() {
    let vulkan = ostquant_tests::software_vulkan();
    let w = outlier_weights(16);
    let tokens = tiny_windows(2, 16, 5);
    let t = random_transforms(&w, &KINDS, 70);
    // 8-bit activations and KV: quantizers on, with rounding steps small enough that the
    // devices' float differences rarely move a value across one.
    let settings = Settings {
        bits: Bits { w: 16, a: 8, kv: 8 },
        ..tiny_settings(2)
    };
    let run = |device: &Device| {
        let teacher = Llama::new(&w, device);
        let z_fp = teacher.forward(&tokens, &mut teacher.new_cache());
        let ad = device.clone().autodiff();
        let mut student = Student::new(&w, &ad, &settings.forward_options(), None).unwrap();
        let p = Params::upload(
            &t,
            &ad,
            Trainable {
                rotations: true,
                scales: true,
            },
        );
        let loss = settings
            .loss
            .compute(z_fp, student.forward(&p, &tokens), &tokens);
        let value = loss
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()[0];
        (value as f64, p.gradients(&loss.backward(), &t))
    };
    let (cpu_loss, cpu_g) = run(&Device::flex());
    let (gpu_loss, gpu_g) = run(&vulkan);
    assert!(cpu_loss > 0.0);
    assert!(
        (cpu_loss - gpu_loss).abs() < 1e-2 * cpu_loss,
        "loss {cpu_loss} (cpu) vs {gpu_loss} (vulkan)"
    );
    let norm = cpu_g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff = cpu_g
        .iter()
        .zip(&gpu_g)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        norm > 0.0 && diff < 0.05 * norm,
        "gradients differ by {diff} (norm {norm})"
    );
}

#[test]
fn w4a16_calibration_trains_through_quantized_weights() {
    // At W4A16 the student fake-quantizes its fused weights: the loss is positive from the
    // first step (nothing else is quantized) and the steps run with finite gradients.
    let w = outlier_weights(17);
    let windows = tiny_windows(4, 16, 6);
    let settings = Settings {
        steps: 3,
        batch: 2,
        samples: 4,
        seq_len: 16,
        lr_rot: 0.05,
        lr_scale: 0.02,
        ..Settings::ostquant(
            Bits {
                w: 4,
                a: 16,
                kv: 16,
            },
            Preset::Cpu,
        )
    };
    assert!(settings.train_weights && settings.init == Init::Hadamard);
    let mut c = Calibrator::new(&w, settings, &windows, &Device::flex(), None).unwrap();
    let before = c.loss(&windows[..2]);
    assert!(
        before > 1e-4,
        "weights are quantized in training: loss {before}"
    );
    for _ in 0..3 {
        assert!(c.step().unwrap().is_finite());
    }
    assert!(orthogonality_error(&c.state.transforms.r_res, 32) < 1e-6);
}
