//! SmoothQuant: the migration preserves the function, and the smoothed activations' channel
//! maxima are the old ones divided by the scales (s_j = a_j^α / w_j^(1−α), checked by hand).

use burn::tensor::Device;
use ostquant_core::model::checkpoint::HostTensor;
use ostquant_core::model::llama::Llama;
use ostquant_core::quant::smoothquant::{calibrate, scales, smooth};
use ostquant_tests::{random_weights, tiny_config};

fn windows() -> Vec<Vec<u32>> {
    vec![
        (0..20).map(|i| (i * 7 + 3) % 64).collect(),
        (0..20).map(|i| (i * 5 + 11) % 64).collect(),
    ]
}

#[test]
fn scales_follow_the_formula() {
    let w1 = HostTensor {
        shape: vec![2, 3],
        data: vec![1.0, -4.0, 0.5, -2.0, 1.0, 0.25],
    };
    let w2 = HostTensor {
        shape: vec![1, 3],
        data: vec![0.5, 2.0, -1.0],
    };
    // Column maxima over both weights: 2, 4, 1. Activation maxima 8, 1, 9.
    let s = scales(&[8.0, 1.0, 9.0], &[&w1, &w2], 0.5);
    let want = [8f64.sqrt() / 2f64.sqrt(), 1.0 / 2.0, 3.0 / 1.0];
    for (a, b) in s.iter().zip(want) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
}

#[test]
fn smoothing_preserves_logits_and_flattens_activations() {
    let w0 = random_weights(&tiny_config(64), 12);
    let dev = Device::flex();
    let m0 = Llama::new(&w0, &dev);
    let before = calibrate(&m0, &windows()).unwrap();
    let mut w = w0.clone();
    smooth(&mut w, &before, 0.5);
    let m = Llama::new(&w, &dev);
    let logits = |m: &Llama| {
        m.forward(&windows()[..1], &mut m.new_cache())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (a, b) = (logits(&m0), logits(&m));
    let scale = a.iter().fold(0f32, |x, v| x.max(v.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |x, (p, q)| x.max((p - q).abs()))
        / scale;
    assert!(err < 1e-4, "relative logit error {err:e}");

    let after = calibrate(&m, &windows()).unwrap();
    for (l, (b0, b1)) in before.iter().zip(&after).enumerate() {
        let lw = &w0.layers[l];
        let s = scales(&b0.qkv_in, &[&lw.wq, &lw.wk, &lw.wv], 0.5);
        for (j, sj) in s.iter().enumerate() {
            let want = b0.qkv_in[j] as f64 / sj;
            let got = b1.qkv_in[j] as f64;
            assert!(
                (got - want).abs() <= 1e-3 * want.abs().max(1e-3),
                "layer {l} channel {j}: {got} vs {want}"
            );
        }
    }
}
