//! Where does QuaRot with RTN weights lose at W4A16 on the default model? Each of QuaRot's
//! pieces alone and in combination, RTN weights, scored against FP on the first 8 windows of
//! the wiki-2016 evaluation half (ctx 512).
//!
//! `cargo run -p ostquant-tests --example quarot_ablation` (needs `ostquant fetch` first)
use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::data::wiki;
use ostquant_core::eval::perplexity::{score_windows, text_windows};
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::llama::{ForwardOptions, Llama};
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_core::quant::method::quantize_weights_rtn;
use ostquant_core::quant::quantizer::QuantSpec;
use ostquant_core::transform::fuse::*;
use ostquant_core::transform::hadamard::{Hadamard, random_hadamard};

fn main() {
    let dir = assets::default_model_dir();
    let w = LlamaWeights::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, &w.config).unwrap();
    let dev = Device::flex();
    let fp = Llama::new(&w, &dev);
    let text = wiki::split(&wiki::read_articles(&assets::wiki_dump()).unwrap()).evaluation;
    let wins = text_windows(&fp, &tok, &text, 512, Some(8)).unwrap();
    let c = w.config.clone();
    let run = |name: &str, mut q: LlamaWeights, opts: ForwardOptions| {
        quantize_weights_rtn(&mut q, &QuantSpec::sym(4));
        let mut m = Llama::new(&q, &dev);
        m.set_options(opts).unwrap();
        let s = score_windows(&m, Some(&fp), &wins, &mut |_, _| {}).unwrap();
        println!(
            "{name}: ppl {:.3} KL {:.4} top1 {:.4}",
            s.ppl,
            s.kl.unwrap(),
            s.top1.unwrap()
        );
    };
    let mut f = w.clone();
    fold_norms(&mut f);
    run("fold only", f.clone(), ForwardOptions::default());
    let mut r = f.clone();
    rotate_residual(&mut r, &random_hadamard(c.hidden_size, 0).unwrap());
    run("fold + R1", r.clone(), ForwardOptions::default());
    let mut d = r.clone();
    fuse_down_hadamard(&mut d, &Hadamard::new(c.intermediate_size).unwrap());
    run(
        "fold + R1 + down H",
        d,
        ForwardOptions {
            down_hadamard: true,
            ..Default::default()
        },
    );
    let mut u = w.clone();
    fuse_down_hadamard(&mut u, &Hadamard::new(c.intermediate_size).unwrap());
    run(
        "down H only",
        u,
        ForwardOptions {
            down_hadamard: true,
            ..Default::default()
        },
    );
    let mut o = w.clone();
    rotate_value_heads(&mut o, &Hadamard::new(c.head_dim()).unwrap().matrix());
    run("value heads only", o, ForwardOptions::default());
}
