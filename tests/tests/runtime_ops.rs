//! The runtime's small kernels (RMSNorm, SiLU·mul, RoPE, residual add, activation fake
//! quantization, Hadamard, KV cache and attention) on the software Vulkan device against f64
//! or host references, on real and odd shapes.

use ostquant_core::runtime::Gpu;
use ostquant_core::runtime::kernel::record_all;
use ostquant_core::runtime::ops::{Ops, RopeShape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> Gpu {
    ostquant_tests::test_gpu()
}

fn rand_vec(rng: &mut StdRng, n: usize, r: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-r..r)).collect()
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn rms_norm_matches_f64() {
    let gpu = gpu();
    let ops = Ops::new(&gpu);
    let mut rng = StdRng::seed_from_u64(1);
    for (rows, n) in [(1, 576), (5, 1536), (3, 4096), (2, 7)] {
        let x = rand_vec(&mut rng, rows * n, 3.0);
        let w = rand_vec(&mut rng, n, 2.0);
        let (xb, wb, y) = (
            gpu.storage("x", &x),
            gpu.storage("w", &w),
            gpu.output("y", rows * n),
        );
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        ops.rms_norm(&gpu, &xb, &wb, &y, rows, n, 1e-5)
            .record(&mut enc);
        let got = gpu.finish_f32(enc, &y, rows * n).unwrap();
        let mut want = Vec::new();
        for row in x.chunks(n) {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            want.extend(row.iter().zip(&w).map(|(&v, &g)| v as f64 * inv * g as f64));
        }
        close(&got, &want, 1e-5, &format!("rms_norm {rows}×{n}"));
    }
}

#[test]
fn silu_mul_matches_f64() {
    let gpu = gpu();
    let ops = Ops::new(&gpu);
    let mut rng = StdRng::seed_from_u64(2);
    for len in [1536, 11008, 1, 257] {
        let (g, u) = (rand_vec(&mut rng, len, 6.0), rand_vec(&mut rng, len, 2.0));
        let out = gpu.output("out", len);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        ops.silu_mul(
            &gpu,
            &gpu.storage("g", &g),
            &gpu.storage("u", &u),
            &out,
            len,
        )
        .record(&mut enc);
        let got = gpu.finish_f32(enc, &out, len).unwrap();
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&a, &b)| a as f64 / (1.0 + (-(a as f64)).exp()) * b as f64)
            .collect();
        close(&got, &want, 1e-5, &format!("silu_mul {len}"));
    }
}

#[test]
fn rope_matches_f64_at_far_positions() {
    let gpu = gpu();
    let ops = Ops::new(&gpu);
    let mut rng = StdRng::seed_from_u64(3);
    let (tokens, heads, hd) = (3, 9, 64);
    let positions = [0usize, 17, 8191];
    let inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| 100000f64.powf(-(2.0 * i as f64) / hd as f64))
        .collect();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &positions {
        for f in &inv_freq {
            cos.push((p as f64 * f).cos() as f32);
            sin.push((p as f64 * f).sin() as f32);
        }
    }
    let x = rand_vec(&mut rng, tokens * heads * hd, 1.0);
    let (cb, sb) = (gpu.storage("cos", &cos), gpu.storage("sin", &sin));
    let half = hd / 2;
    // Pair i of a head at (i, i + hd/2) (half-split) or at (2i, 2i + 1) (paired).
    for paired in [false, true] {
        let xb = gpu.storage("x", &x);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let shape = RopeShape {
            tokens,
            heads,
            head_dim: hd,
            paired,
        };
        ops.rope(&gpu, &xb, &cb, &sb, shape).record(&mut enc);
        let got = gpu.finish_f32(enc, &xb, x.len()).unwrap();
        let mut want = vec![0f64; x.len()];
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..heads {
                let base = (t * heads + h) * hd;
                for (i, f) in inv_freq.iter().enumerate() {
                    let a = pos as f64 * f;
                    let (c, s) = (a.cos(), a.sin());
                    let (ia, ib) = if paired {
                        (base + 2 * i, base + 2 * i + 1)
                    } else {
                        (base + i, base + i + half)
                    };
                    let (u, v) = (x[ia] as f64, x[ib] as f64);
                    want[ia] = u * c - v * s;
                    want[ib] = v * c + u * s;
                }
            }
        }
        close(&got, &want, 1e-5, &format!("rope, paired {paired}"));
    }
}

#[test]
fn online_hadamard_matches_the_host_transform() {
    use ostquant_core::runtime::hadamard::GpuHadamard;
    use ostquant_core::transform::hadamard::Hadamard;
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(4);
    for (rows, n) in [
        (3, 1536),
        (2, 576),
        (1, 4096),
        (1, 11008),
        (2, 14336),
        (4, 64),
        (1, 8192),
        (2, 16384),
        (1, 12 * 8192),
    ] {
        let x = rand_vec(&mut rng, rows * n, 1.0);
        let had = GpuHadamard::new(&gpu, n).unwrap();
        let (xb, out) = (gpu.storage("x", &x), gpu.output("out", rows * n));
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let launches = had.dispatches(&gpu, &xb, &out, rows);
        // One launch to 4096, then the segments' and the mix, and a butterfly per stage of
        // stride 4096 or more: 7B's 11008 = 344·32 and 8B's 14336 = 28·512 take two.
        let p = n / Hadamard::new(n).unwrap().k;
        let later_stages = (p.max(4096) / 4096).ilog2() as usize;
        let want_launches = if n <= 4096 { 1 } else { 2 + later_stages };
        assert_eq!(
            launches.len(),
            want_launches,
            "launches of hadamard {rows}×{n}"
        );
        record_all(&mut enc, &launches);
        let got = gpu.finish_f32(enc, &out, rows * n).unwrap();
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        Hadamard::new(n).unwrap().apply_rows(&mut want);
        close(&got, &want, 2e-5, &format!("hadamard {rows}×{n}"));
        // Rows of one launch also give the W4A4 down_proj's codes: the same output, and
        // exactly the codes and scales of act_codes.wgsl run on it; wider rows decline.
        use ostquant_core::runtime::linear::{ActCodes, Products};
        let fused = ActCodes::new(&gpu, rows, n, n, 4).unwrap();
        let out2 = gpu.output("out", rows * n);
        let Some(d) = had.whole_into_codes(&gpu, &gpu.storage("x", &x), &out2, rows, &fused) else {
            assert!(n > 4096, "hadamard {rows}×{n} declined codes");
            continue;
        };
        let apart = ActCodes::new(&gpu, rows, n, n, 4).unwrap();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        d.record(&mut enc);
        Products::new(&gpu)
            .quantize(&gpu, &out2, &apart)
            .record(&mut enc);
        let got2 = gpu.finish_f32(enc, &out2, rows * n).unwrap();
        assert_eq!(got, got2, "hadamard {rows}×{n} with codes");
        assert_eq!(
            fused.read(&gpu).unwrap(),
            apart.read(&gpu).unwrap(),
            "codes from the hadamard {rows}×{n}"
        );
    }
}

#[test]
fn online_hadamard_reads_heads_in_rope_pairs_back_into_natural_order() {
    use ostquant_core::runtime::hadamard::GpuHadamard;
    use ostquant_core::transform::hadamard::Hadamard;
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(6);
    for (rows, hd) in [(5, 64), (3, 128), (2, 96)] {
        let x = rand_vec(&mut rng, rows * hd, 1.0);
        // Each head as decode's RoPE-pairing GEMV leaves it: x_0, x_h, x_1, x_{h+1}, …
        let half = hd / 2;
        let paired: Vec<f32> = (0..rows * hd)
            .map(|i| {
                let (head, r) = (i / hd, i % hd);
                x[head * hd + r / 2 + (r % 2) * half]
            })
            .collect();
        let had = GpuHadamard::new(&gpu, hd).unwrap();
        let out = gpu.output("out", rows * hd);
        let d = had
            .unpairing_dispatch(&gpu, &gpu.storage("x", &paired), &out, rows)
            .unwrap();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        d.record(&mut enc);
        let got = gpu.finish_f32(enc, &out, rows * hd).unwrap();
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        Hadamard::new(hd).unwrap().apply_rows(&mut want);
        close(
            &got,
            &want,
            2e-5,
            &format!("hadamard of paired {rows}×{hd}"),
        );
    }
}

/// Per-head asymmetric 4-bit fake quantization of one position's [heads, hd], as the host
/// quantizer does it.
fn fake_quant_heads(x: &[f32], hd: usize) -> Vec<f64> {
    use ostquant_core::quant::quantizer::{QuantSpec, fake_quant_group};
    let mut y = x.to_vec();
    for g in y.chunks_mut(hd) {
        fake_quant_group(g, &QuantSpec::asym(4), 1.0);
    }
    y.into_iter().map(|v| v as f64).collect()
}

#[test]
fn attention_over_the_int4_and_f32_caches_matches_f64() {
    use ostquant_core::runtime::attention::{Attention, KvCache};
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    // (query heads, KV heads, head dim, cached positions, queries): the last `queries`
    // positions attend causally, query i to positions 0..=len − queries + i.
    let cases = [
        (9, 3, 64, 70, 1),
        (4, 4, 128, 3, 3),
        (32, 8, 128, 130, 1),
        (9, 3, 64, 70, 5),
        (4, 2, 256, 65, 2),
        // 12 words per head: 64 threads make 5 groups of 12, 4 threads idle.
        (6, 2, 96, 70, 2),
    ];
    for ((nq, nkv, hd, len, queries), int4) in
        cases.into_iter().flat_map(|c| [(c, true), (c, false)])
    {
        let att = Attention::new(&gpu, nq, nkv, hd, 256).unwrap();
        let (k, v) = (
            KvCache::new(&gpu, 256, nkv, hd, int4),
            KvCache::new(&gpu, 256, nkv, hd, int4),
        );
        let stored = |x: &[f32]| -> Vec<f64> {
            if int4 {
                fake_quant_heads(x, hd)
            } else {
                x.iter().map(|&v| v as f64).collect()
            }
        };
        let kp = rand_vec(&mut rng, len * nkv * hd, 2.0);
        let vp = rand_vec(&mut rng, len * nkv * hd, 2.0);
        let (ks, vs) = (stored(&kp), stored(&vp));
        // Appended in two launches (positions 0..split, then split..len) through one binding
        // per source, as the decode and prefill plans do.
        let split = len / 2;
        let row = nkv * hd;
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for (from, to) in [(0, split), (split, len)] {
            if to == from {
                continue;
            }
            let kb = gpu.storage("k", &kp[from * row..to * row]);
            let vb = gpu.storage("v", &vp[from * row..to * row]);
            let d = att.append(&gpu, &kb, &vb, &k, &v, len);
            att.set_append(&gpu, &d, &k, from, to - from);
            d.record(&mut enc);
            gpu.queue.submit([std::mem::replace(
                &mut enc,
                gpu.device.create_command_encoder(&Default::default()),
            )
            .finish()]);
        }
        let q = rand_vec(&mut rng, queries * nq * hd, 1.0);
        let out = gpu.output("out", queries * nq * hd);
        let pos0 = len - queries;
        let qb = gpu.storage("q", &q);
        let a = att.attend(&gpu, &qb, &k, &v, &out, None, queries).unwrap();
        att.set_attend(&gpu, &a, &k, pos0, queries);
        a.d.record(&mut enc);
        let got = gpu.finish_f32(enc, &out, queries * nq * hd).unwrap();
        // Where heads are whole 32-column blocks, the launch that also writes the W4A4 o_proj
        // input's codes gives the same output and exactly the codes and scales of
        // act_codes.wgsl run on that output.
        if hd % 32 == 0 {
            use ostquant_core::runtime::linear::{ActCodes, Products};
            let products = Products::new(&gpu);
            let fused = ActCodes::new(&gpu, queries, nq * hd, hd, 4).unwrap();
            let apart = ActCodes::new(&gpu, queries, nq * hd, hd, 4).unwrap();
            let out2 = gpu.output("out", queries * nq * hd);
            let a = att
                .attend(&gpu, &qb, &k, &v, &out2, Some(&fused), queries)
                .unwrap();
            att.set_attend(&gpu, &a, &k, pos0, queries);
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            a.d.record(&mut enc);
            products.quantize(&gpu, &out2, &apart).record(&mut enc);
            let got2 = gpu.finish_f32(enc, &out2, queries * nq * hd).unwrap();
            assert_eq!(got, got2, "attention output with codes, nq {nq} hd {hd}");
            assert_eq!(
                fused.read(&gpu).unwrap(),
                apart.read(&gpu).unwrap(),
                "codes from the attention, nq {nq} hd {hd} queries {queries} int4 {int4}"
            );
            // A mis-shaped code buffer is refused.
            let wrong = ActCodes::new(&gpu, queries, nq * hd, nq * hd, 4).unwrap();
            assert!(
                att.attend(&gpu, &qb, &k, &v, &out2, Some(&wrong), queries)
                    .is_err()
            );
        }
        let mut want = vec![0f64; queries * nq * hd];
        for i in 0..queries {
            let n = pos0 + i + 1;
            for h in 0..nq {
                let kv = h / (nq / nkv);
                let qh = &q[(i * nq + h) * hd..(i * nq + h + 1) * hd];
                let scores: Vec<f64> = (0..n)
                    .map(|t| {
                        (0..hd)
                            .map(|d| qh[d] as f64 * ks[t * row + kv * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    want[(i * nq + h) * hd + d] = (0..n)
                        .map(|t| e[t] * vs[t * row + kv * hd + d])
                        .sum::<f64>()
                        / z;
                }
            }
        }
        close(
            &got,
            &want,
            1e-4,
            &format!("attention nq {nq} nkv {nkv} hd {hd} len {len} queries {queries} int4 {int4}"),
        );
    }
}

/// Decode's attention that appends its own position (and, with the Q/K Hadamard, turns q
/// and k first) against the launches it replaces: the Hadamard launch, the append launch and
/// the attention over the cache. The same caches bit for bit, the same output and codes.
#[test]
fn decode_attention_appends_its_position_as_the_append_launch_does() {
    use ostquant_core::runtime::attention::{Attention, Fresh, KvCache};
    use ostquant_core::runtime::hadamard::GpuHadamard;
    use ostquant_core::runtime::kernel::Bind;
    use ostquant_core::runtime::linear::ActCodes;
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(8);
    // (query heads, KV heads, head dim, positions already cached): position `len` is decoded.
    let cases = [
        (9, 3, 64, 70),
        (4, 4, 128, 0),
        (32, 8, 128, 130),
        (4, 2, 256, 65),
        (2, 1, 64, 63),
    ];
    for ((nq, nkv, hd, len), int4, hadamard) in cases.into_iter().flat_map(|c| {
        [
            (c, true, false),
            (c, true, true),
            (c, false, false),
            (c, false, true),
        ]
    }) {
        let what = format!("nq {nq} nkv {nkv} hd {hd} len {len} int4 {int4} hadamard {hadamard}");
        let att = Attention::new(&gpu, nq, nkv, hd, 256).unwrap();
        let (qn, kvn) = (nq * hd, nkv * hd);
        // One position's q, k and v as the q, k, v product leaves them (with the Hadamard, q's
        // and k's heads in RoPE pairs), and the positions before it.
        let qkv = rand_vec(&mut rng, qn + 2 * kvn, 1.5);
        let past_k = rand_vec(&mut rng, len * kvn, 2.0);
        let past_v = rand_vec(&mut rng, len * kvn, 2.0);
        let caches = || {
            let (k, v) = (
                KvCache::new(&gpu, 256, nkv, hd, int4),
                KvCache::new(&gpu, 256, nkv, hd, int4),
            );
            if len > 0 {
                let (kb, vb) = (gpu.storage("k", &past_k), gpu.storage("v", &past_v));
                let d = att.append(&gpu, &kb, &vb, &k, &v, len);
                att.set_append(&gpu, &d, &k, 0, len);
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                d.record(&mut enc);
                gpu.queue.submit([enc.finish()]);
            }
            (k, v)
        };
        let codes = |c: &ActCodes| c.read(&gpu).unwrap();
        let read = |k: &KvCache, v: &KvCache| {
            let words = 256 * kvn / if int4 { 8 } else { 1 };
            let grid = if int4 { 2 * 256 * nkv } else { 2 };
            [&k.codes, &v.codes, &k.grid, &v.grid].map(|b| {
                let n = if std::ptr::eq(b, &k.codes) || std::ptr::eq(b, &v.codes) {
                    words
                } else {
                    grid
                };
                gpu.read_f32(b, n)
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect::<Vec<_>>()
            })
        };

        // Apart: the Q/K Hadamard (where asked), the append, the attention.
        let (k1, v1) = caches();
        let out1 = gpu.output("out", qn);
        let codes1 = ActCodes::new(&gpu, 1, qn, hd, 4).unwrap();
        let qkv_b = gpu.storage("qkv", &qkv);
        let qk_h = gpu.output("qk_h", qn + kvn);
        let v_b = gpu.storage("v", &qkv[qn + kvn..]);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let (q, k): (Bind, Bind) = if hadamard {
            let h = GpuHadamard::new(&gpu, hd).unwrap();
            h.unpairing_dispatch(&gpu, &qkv_b, &qk_h, nq + nkv)
                .unwrap()
                .record(&mut enc);
            (
                Bind::f32_range(&qk_h, 0, qn),
                Bind::f32_range(&qk_h, qn, kvn),
            )
        } else {
            (
                Bind::f32_range(&qkv_b, 0, qn),
                Bind::f32_range(&qkv_b, qn, kvn),
            )
        };
        let d = att.append(&gpu, k, &v_b, &k1, &v1, 1);
        att.set_append(&gpu, &d, &k1, len, 1);
        d.record(&mut enc);
        let a = att
            .attend(&gpu, q, &k1, &v1, &out1, Some(&codes1), 1)
            .unwrap();
        att.set_attend(&gpu, &a, &k1, len, 1);
        a.d.record(&mut enc);
        let got1 = gpu.finish_f32(enc, &out1, qn).unwrap();

        // Together: one launch. Slot `len` holds other values first: a workgroup that read
        // the current position from the cache rather than from its own copy would score them.
        let (k2, v2) = caches();
        let other_k = gpu.storage("other k", &rand_vec(&mut rng, kvn, 3.0));
        let other_v = gpu.storage("other v", &rand_vec(&mut rng, kvn, 3.0));
        let d = att.append(&gpu, &other_k, &other_v, &k2, &v2, 1);
        att.set_append(&gpu, &d, &k2, len, 1);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        d.record(&mut enc);
        gpu.queue.submit([enc.finish()]);
        let out2 = gpu.output("out", qn);
        let codes2 = ActCodes::new(&gpu, 1, qn, hd, 4).unwrap();
        let fresh = Fresh {
            k_off: qn,
            v_off: qn + kvn,
            hadamard,
        };
        let a = att
            .attend_fresh(&gpu, &qkv_b, fresh, &k2, &v2, &out2, Some(&codes2))
            .unwrap();
        att.set_attend(&gpu, &a, &k2, len, 1);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        a.d.record(&mut enc);
        let got2 = gpu.finish_f32(enc, &out2, qn).unwrap();

        assert_eq!(read(&k1, &v1), read(&k2, &v2), "caches, {what}");
        assert_eq!(got1, got2, "attention output, {what}");
        assert_eq!(codes(&codes1), codes(&codes2), "o_proj codes, {what}");
    }
    // k and v must follow q and end within the binding.
    let att = Attention::new(&gpu, 4, 2, 64, 16).unwrap();
    let (k, v) = (
        KvCache::new(&gpu, 16, 2, 64, true),
        KvCache::new(&gpu, 16, 2, 64, true),
    );
    let qkv = gpu.output("qkv", 512);
    let out = gpu.output("out", 256);
    // (k_off, v_off) against q of 256 values, k and v of 128 each, in a binding of 512.
    for (k_off, v_off, fits) in [(128, 384, false), (256, 448, false), (256, 384, true)] {
        let fresh = Fresh {
            k_off,
            v_off,
            hadamard: false,
        };
        match att.attend_fresh(&gpu, &qkv, fresh, &k, &v, &out, None) {
            Ok(_) => assert!(fits, "k at {k_off}, v at {v_off}"),
            Err(e) => {
                assert!(!fits, "k at {k_off}, v at {v_off}: {e}");
                assert!(e.to_string().contains("must follow q"), "{e}");
            }
        }
    }
}

#[test]
fn activation_quantization_matches_the_host_quantizer() {
    use ostquant_core::quant::quantizer::{QuantSpec, fake_quant_group};
    let gpu = gpu();
    let ops = Ops::new(&gpu);
    let mut rng = StdRng::seed_from_u64(9);
    for (len, group, bits) in [(576, 576, 4), (576, 64, 4), (1536, 1536, 8), (4096, 128, 4)] {
        let mut x = rand_vec(&mut rng, len, 3.0);
        x[5] = 40.0; // an outlier widens its group's range
        let xb = gpu.storage("x", &x);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        ops.act_quant(&gpu, &xb, len, group, bits).record(&mut enc);
        let got = gpu.finish_f32(enc, &xb, len).unwrap();
        let mut want = x.clone();
        let spec = QuantSpec::asym(bits);
        for g in want.chunks_mut(group) {
            fake_quant_group(g, &spec, 1.0);
        }
        // f32 rounding may put a value exactly between two levels on one side only: allow a
        // rare one-step difference, never more.
        let mut off = 0;
        for (c, (g, w)) in got.chunks(group).zip(want.chunks(group)).enumerate() {
            let x_g = &x[c * group..(c + 1) * group];
            let range =
                x_g.iter().fold(0f32, |m, &v| m.max(v)) - x_g.iter().fold(0f32, |m, &v| m.min(v));
            let step = range / ((1u32 << bits) - 1) as f32;
            for (a, b) in g.iter().zip(w) {
                let d = (a - b).abs();
                assert!(
                    d <= step * 1.01 + 1e-6,
                    "act quant {len}/{group}/{bits}: {a} vs {b}"
                );
                off += (d > 1e-5 * step.max(1e-6)) as usize;
            }
        }
        assert!(off * 1000 <= len, "{off} of {len} values one level off");
    }
}

/// The GPU's pick of the next token against the host rule (`top_p_pick`, and `argmax` for
/// greedy with its lowest-index tie rule), over vocabularies, temperatures and top-p values:
/// the GPU's token is in the nucleus and its interval of cumulative mass (index order) holds
/// u·(nucleus mass) up to 1e-4 of it, and away from an interval's edge it is the host's token.
#[test]
fn gpu_sampling_follows_the_host_rule() {
    use burn::tensor::wgpu::wgpu;
    use ostquant_core::generate::{argmax, top_p_pick};
    use ostquant_core::runtime::ops::{Pick, SampleParams};
    let gpu = gpu();
    let ops = Ops::new(&gpu);
    let mut rng = StdRng::seed_from_u64(21);
    let token = gpu.output("token", 1);
    let run = |logits: &wgpu::Buffer, vocab: usize, pick: Pick| -> u32 {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        ops.sample(&gpu, &SampleParams::new(vocab, pick), logits, &token)
            .record(&mut enc);
        gpu.finish_f32(enc, &token, 1).unwrap()[0].to_bits()
    };
    let (mut checked, mut near) = (0, 0);
    for vocab in [5, 1000, 49152] {
        let mut logits = rand_vec(&mut rng, vocab, 4.0);
        // Two equal maxima: greedy takes the lower index.
        let top = logits.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
        logits[vocab / 2] = top;
        logits[vocab - 1] = top;
        let lb = gpu.storage("logits", &logits);
        assert_eq!(run(&lb, vocab, Pick::Greedy), argmax(&logits));
        assert_eq!(argmax(&logits), (vocab / 2) as u32);
        for (temperature, top_p) in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)] {
            // The nucleus (f64) and the cumulative mass before each kept index.
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let probs: Vec<f64> = logits
                .iter()
                .map(|&l| ((l - max) / temperature).exp() as f64)
                .collect();
            let total: f64 = probs.iter().sum();
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let mut kept = vec![false; vocab];
            let mut mass = 0.0;
            for &i in &order {
                kept[i] = true;
                mass += probs[i];
                if mass >= top_p as f64 * total {
                    break;
                }
            }
            // Each kept token's interval [lo, hi) of cumulative mass, in index order.
            let mut interval = vec![(0.0, 0.0); vocab];
            let mut run_mass = 0.0;
            for i in (0..vocab).filter(|&i| kept[i]) {
                interval[i] = (run_mass, run_mass + probs[i]);
                run_mass += probs[i];
            }
            let nucleus = run_mass;
            let tol = 1e-4 * nucleus;
            for _ in 0..12 {
                let u: f32 = rng.random();
                let want = top_p_pick(&logits, temperature, top_p, u);
                let pick = Pick::TopP {
                    temperature,
                    top_p,
                    u,
                };
                let got = run(&lb, vocab, pick);
                // The GPU's token is kept and its interval holds the goal, up to float sums.
                let goal = u as f64 * nucleus;
                let (lo, hi) = interval[got as usize];
                assert!(
                    kept[got as usize] && goal >= lo - tol && goal <= hi + tol,
                    "vocab {vocab} T {temperature} top-p {top_p} u {u}: GPU {got} [{lo}, {hi}) misses {goal}"
                );
                // Away from an edge, host and GPU agree exactly.
                let (wlo, whi) = interval[want as usize];
                if (goal - wlo).abs() < tol || (goal - whi).abs() < tol {
                    near += 1;
                } else {
                    assert_eq!(
                        got, want,
                        "vocab {vocab} T {temperature} top-p {top_p} u {u}"
                    );
                    checked += 1;
                }
            }
        }
    }
    // The large vocabulary's intervals are about as narrow as the tolerance: most of its draws
    // are near an edge; the small ones' are not.
    assert!(checked >= 60, "{near} draws at an edge, {checked} checked");
}
