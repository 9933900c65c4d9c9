//! Where OSTQuant's gain comes from on the default model: the W16A4KV4 model (activations and
//! KV cache quantized, weights in full precision) after each set of transforms, against FP on
//! the first windows of the Wikipedia evaluation half.
//!
//! `cargo run -p ostquant-tests --example ostquant_probe -- CHECKPOINT.safetensors [WINDOWS]`
//! where the checkpoint is a finished calibration under ~/.cache/ostquant/calib.

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::calib::{Checkpoint, Init, Transforms};
use ostquant_core::data::wiki;
use ostquant_core::eval::perplexity::{score_windows, text_windows};
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::llama::Llama;
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_core::quant::quantizer::QuantSpec;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ckpt = args
        .first()
        .expect("usage: ostquant_probe CHECKPOINT [WINDOWS]");
    let windows: usize = args.get(1).and_then(|w| w.parse().ok()).unwrap_or(4);
    let dir = assets::default_model_dir();
    let w = LlamaWeights::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, &w.config).unwrap();
    let dev = Device::flex();
    let fp = Llama::new(&w, &dev);
    let text = wiki::split(&wiki::read_articles(&assets::wiki_dump()).unwrap()).evaluation;
    let wins = text_windows(&fp, &tok, &text, 512, Some(windows)).unwrap();
    let bytes = std::fs::read(ckpt).unwrap();
    let (learned, settings) = Checkpoint::from_bytes(ckpt.as_ref(), &bytes, &w).unwrap();
    println!("checkpoint: {} steps of {:?}", learned.step, settings.loss);
    let mut no_rot = learned.transforms.clone();
    let womi = Transforms::init(&w, Init::Womi).unwrap();
    no_rot.r_res = womi.r_res.clone();
    for (l, s) in no_rot.layers.iter_mut().zip(&womi.layers) {
        l.r_ov = s.r_ov.clone();
    }
    let cases = [
        (
            "random Hadamard (QuaRot's rotation)",
            Transforms::init(&w, Init::Hadamard).unwrap(),
        ),
        ("WOMI start", womi),
        ("learned scales on the WOMI rotations", no_rot),
        ("learned (rotations and scales)", learned.transforms),
    ];
    for (name, t) in cases {
        let (fused, mut opts) = t.fuse(&w, true).unwrap();
        opts.act = Some(QuantSpec::asym(4));
        opts.kv = Some(QuantSpec::asym(4));
        let mut m = Llama::new(&fused, &dev);
        m.set_options(opts).unwrap();
        let s = score_windows(&m, Some(&fp), &wins, &mut |_, _| {}).unwrap();
        println!(
            "W16A4KV4 {name}: ppl {:.3} KL {:.4} top1 {:.4}",
            s.ppl,
            s.kl.unwrap(),
            s.top1.unwrap()
        );
    }
}
