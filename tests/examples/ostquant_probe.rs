//! Where the W4A4 error of the default model lives, before and after OSTQuant's transforms:
//! KL(FP ‖ model) per token on the first windows of the Wikipedia evaluation half with the
//! weights in full precision and 4-bit quantizers switched on one place at a time (each linear
//! input, the KV cache) and all together (W16A4KV4).
//!
//! `cargo run --release -p ostquant-tests --example ostquant_probe -- [WINDOWS] CHECKPOINT...`
//! where each checkpoint is a finished calibration under ~/.cache/ostquant/calib; the random
//! Hadamard (QuaRot's rotation) and WOMI starts are always measured.

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::calib::{Checkpoint, Init, Transforms};
use ostquant_core::data::wiki;
use ostquant_core::eval::perplexity::{score_windows, text_windows};
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::llama::{Llama, Site};
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_core::quant::quantizer::QuantSpec;

fn main() {
    let mut windows = 4;
    let mut checkpoints = Vec::new();
    for a in std::env::args().skip(1) {
        match a.parse() {
            Ok(n) => windows = n,
            Err(_) => checkpoints.push(a),
        }
    }
    let dir = assets::default_model_dir();
    let w = LlamaWeights::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, &w.config).unwrap();
    let dev = Device::flex();
    let fp = Llama::new(&w, &dev);
    let text = wiki::split(&wiki::read_articles(&assets::wiki_dump()).unwrap()).evaluation;
    let wins = text_windows(&fp, &tok, &text, 512, Some(windows)).unwrap();

    let mut cases = vec![
        (
            "random Hadamard (QuaRot)".to_string(),
            Transforms::init(&w, Init::Hadamard).unwrap(),
        ),
        (
            "WOMI start".to_string(),
            Transforms::init(&w, Init::Womi).unwrap(),
        ),
    ];
    for path in &checkpoints {
        let bytes = std::fs::read(path).unwrap();
        let (learned, settings) = Checkpoint::from_bytes(path.as_ref(), &bytes, &w).unwrap();
        let name = std::path::Path::new(path)
            .file_stem()
            .unwrap()
            .to_string_lossy();
        let name = format!("{name} ({} steps, init {:?})", learned.step, settings.init);
        cases.push((name, learned.transforms));
    }

    // (column, activation sites quantized, KV cache quantized)
    let mut configs: Vec<(String, Vec<Site>, bool)> = Site::ALL
        .iter()
        .map(|&s| (format!("A4 {}", s.name()), vec![s], false))
        .collect();
    configs.push(("KV4".into(), vec![], true));
    configs.push(("A4KV4 all".into(), Site::ALL.to_vec(), true));
    println!(
        "KL(FP ‖ W16 model) in nats per token, {} tokens ({windows} windows of 512)",
        wins.iter().map(|w| w.len() - 1).sum::<usize>()
    );
    print!("{:<60}", "transforms");
    for (c, _, _) in &configs {
        print!(" {c:>12}");
    }
    println!("   ppl (all)");
    for (name, t) in cases {
        let (fused, online) = t.fuse(&w, true).unwrap();
        let mut m = Llama::new(&fused, &dev);
        print!("{name:<60}");
        let mut ppl = 0.0;
        for (_, sites, kv) in &configs {
            let mut opts = online.clone();
            opts.act = (!sites.is_empty()).then(|| QuantSpec::asym(4));
            opts.act_skip = Site::ALL
                .into_iter()
                .filter(|s| !sites.contains(s))
                .collect();
            opts.kv = kv.then(|| QuantSpec::asym(4));
            m.set_options(opts).unwrap();
            let s = score_windows(&m, Some(&fp), &wins, &mut |_, _| {}).unwrap();
            print!(" {:>12.4}", s.kl.unwrap());
            ppl = s.ppl;
            use std::io::Write;
            std::io::stdout().flush().unwrap();
        }
        println!("   {ppl:.3}");
    }
}
