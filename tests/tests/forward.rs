//! The burn forward of a tiny random LLaMA (GQA, 2 layers, llama3 RoPE scaling) against a naive
//! f64 reference, on the CPU backend and on the software Vulkan device; and prefill + decode
//! through the KV cache against a full recompute.

use burn::tensor::Device;
use ostquant_core::model::llama::Llama;
use ostquant_tests::{random_weights, reference_forward, tiny_config};

const TOKENS: [u32; 11] = [3, 17, 42, 5, 5, 60, 1, 33, 12, 63, 0];

fn logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model
        .forward(&[tokens.to_vec()], &mut cache)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Largest |a - b| relative to the largest |b|.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    err / scale
}

fn check_against_reference(device: &Device) {
    let w = random_weights(&tiny_config(64), 7);
    let reference: Vec<f64> = reference_forward(&w, &TOKENS).concat();
    let model = Llama::new(&w, device);
    let got = logits(&model, &TOKENS);
    let err = rel_err(&got, &reference);
    assert!(
        err < 1e-4,
        "relative error {err:e} against the f64 reference"
    );
}

fn check_cache(device: &Device) {
    let w = random_weights(&tiny_config(64), 11);
    let model = Llama::new(&w, device);
    let full = logits(&model, &TOKENS);
    let v = 64;
    // Prefill 6 tokens, then decode the remaining 5 one by one.
    let mut cache = model.new_cache();
    let mut got = model
        .forward(&[TOKENS[..6].to_vec()], &mut cache)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    for &t in &TOKENS[6..] {
        got.extend(
            model
                .forward(&[vec![t]], &mut cache)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), TOKENS.len());
    assert_eq!(got.len(), TOKENS.len() * v);
    let full64: Vec<f64> = full.iter().map(|&x| x as f64).collect();
    let err = rel_err(&got, &full64);
    assert!(
        err < 1e-5,
        "cached decode differs from recompute by {err:e}"
    );
}

fn check_batch(device: &Device) {
    let w = random_weights(&tiny_config(64), 5);
    let model = Llama::new(&w, device);
    let a = TOKENS[..5].to_vec();
    let b = TOKENS[5..10].to_vec();
    let mut cache = model.new_cache();
    let both = model
        .forward(&[a.clone(), b.clone()], &mut cache)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let one: Vec<f64> = [logits(&model, &a), logits(&model, &b)]
        .concat()
        .iter()
        .map(|&x| x as f64)
        .collect();
    assert!(rel_err(&both, &one) < 1e-5);
}

#[test]
fn cpu_forward_matches_f64_reference() {
    check_against_reference(&Device::flex());
}

#[test]
fn cpu_kv_cache_matches_recompute() {
    check_cache(&Device::flex());
}

#[test]
fn cpu_batch_rows_are_independent() {
    check_batch(&Device::flex());
}

use ostquant_tests::software_vulkan;

#[test]
fn wgpu_forward_matches_f64_reference() {
    check_against_reference(&software_vulkan());
}

#[test]
fn wgpu_kv_cache_matches_recompute() {
    check_cache(&software_vulkan());
}

#[test]
fn site_inputs_are_what_the_block_shows_its_tap() {
    // GPTQ takes one site's inputs at a time from `site_input`, which stops the block there;
    // they must be exactly the tensors a whole block hands its tap (quantizers and online
    // Hadamards on, so every branch runs).
    use ostquant_core::model::llama::ForwardOptions;
    use ostquant_core::quant::quantizer::QuantSpec;
    let w = random_weights(&tiny_config(64), 13);
    let mut model = Llama::new(&w, &Device::flex());
    model
        .set_options(ForwardOptions {
            down_hadamard: true,
            qk_hadamard: true,
            act: Some(QuantSpec::asym(4)),
            kv: Some(QuantSpec::asym(4)),
            ..Default::default()
        })
        .unwrap();
    let tokens: Vec<Vec<u32>> = vec![(0..9).map(|i| (i * 7 + 3) % 64).collect(); 2];
    let x = model.embed(&tokens);
    for layer in 0..w.layers.len() {
        let mut seen = Vec::new();
        model.block(layer, x.clone(), &mut |_, site, a| seen.push((site, a)));
        assert_eq!(seen.len(), 4);
        for (site, tapped) in seen {
            let got = model.site_input(layer, x.clone(), site);
            let [b, t, n] = got.dims();
            let got: Vec<f32> = got
                .reshape([b * t, n])
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let want: Vec<f32> = tapped.into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(got, want, "layer {layer} {site:?}");
        }
    }
}
