//! Function preservation: with quantizers off, folding the norms, rotating the residual stream
//! and the value heads, and the online Hadamards (down_proj input, Q/K per head) each leave the
//! logits unchanged, alone and together. Also: what fake quantization costs, in order.

use burn::tensor::Device;
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::llama::{ForwardOptions, Llama};
use ostquant_core::quant::quantizer::QuantSpec;
use ostquant_core::transform::fuse::*;
use ostquant_core::transform::hadamard::{Hadamard, random_hadamard};
use ostquant_tests::{random_weights, tiny_config};

const TOKENS: [u32; 9] = [3, 17, 42, 5, 60, 1, 33, 12, 63];

fn logits(w: &LlamaWeights, opts: ForwardOptions) -> Vec<f32> {
    let mut m = Llama::new(w, &Device::flex());
    m.set_options(opts).unwrap();
    let mut cache = m.new_cache();
    m.forward(&[TOKENS.to_vec()], &mut cache)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

type Step = fn(&mut LlamaWeights, &mut ForwardOptions);

fn fold(w: &mut LlamaWeights, _: &mut ForwardOptions) {
    fold_norms(w);
}
fn rotate(w: &mut LlamaWeights, _: &mut ForwardOptions) {
    fold_norms(w);
    let r = random_hadamard(w.config.hidden_size, 9).unwrap();
    rotate_residual(w, &r);
}
fn value_heads(w: &mut LlamaWeights, _: &mut ForwardOptions) {
    let hd = w.config.head_dim();
    rotate_value_heads(w, &random_hadamard(hd, 4).unwrap());
}
fn down(w: &mut LlamaWeights, o: &mut ForwardOptions) {
    fuse_down_hadamard(w, &Hadamard::new(w.config.intermediate_size).unwrap());
    o.down_hadamard = true;
}
fn qk(_: &mut LlamaWeights, o: &mut ForwardOptions) {
    o.qk_hadamard = true;
}

#[test]
fn every_transform_preserves_the_function() {
    for tied in [false, true] {
        let mut c = tiny_config(64);
        c.tie_word_embeddings = tied;
        let w0 = random_weights(&c, 21);
        let reference = logits(&w0, ForwardOptions::default());
        let steps: [(&str, Step); 5] = [
            ("fold", fold),
            ("rotate", rotate),
            ("value heads", value_heads),
            ("down", down),
            ("qk", qk),
        ];
        for (name, step) in steps {
            let (mut w, mut o) = (w0.clone(), ForwardOptions::default());
            step(&mut w, &mut o);
            let err = rel_err(&logits(&w, o), &reference);
            assert!(err < 1e-4, "{name} (tied {tied}): relative error {err:e}");
        }
        let (mut w, mut o) = (w0.clone(), ForwardOptions::default());
        for (_, step) in steps.iter().skip(1) {
            step(&mut w, &mut o);
        }
        let err = rel_err(&logits(&w, o), &reference);
        assert!(
            err < 1e-4,
            "all together (tied {tied}): relative error {err:e}"
        );
        assert!(
            !w.config.tie_word_embeddings && w.lm_head.is_some(),
            "folding unties"
        );
        // The check can fail: a fused Hadamard without its online half changes the function.
        let mut w = w0.clone();
        let h = Hadamard::new(w.config.intermediate_size).unwrap();
        fuse_down_hadamard(&mut w, &h);
        let err = rel_err(&logits(&w, ForwardOptions::default()), &reference);
        assert!(
            err > 1e-2,
            "missing online Hadamard went unnoticed: {err:e}"
        );
    }
}

#[test]
fn fake_quantization_error_grows_as_bits_shrink() {
    let w = random_weights(&tiny_config(64), 22);
    let reference = logits(&w, ForwardOptions::default());
    let err = |bits: u32| {
        let opts = ForwardOptions {
            act: Some(QuantSpec::asym(bits)),
            kv: Some(QuantSpec::asym(bits)),
            ..Default::default()
        };
        rel_err(&logits(&w, opts), &reference)
    };
    let (e8, e4, e2) = (err(8), err(4), err(2));
    assert!(e8 > 0.0 && e8 < 0.02, "8-bit error {e8}");
    assert!(e8 < e4 && e4 < e2, "errors {e8} {e4} {e2}");
}
