//! Where the W4A4 error of the default model lives, before and after OSTQuant's transforms:
//! KL(FP ‖ model) per token on the first windows of the Wikipedia evaluation half with the
//! weights in full precision and 4-bit quantizers switched on one place at a time (each linear
//! input, the KV cache) and all together (W16A4KV4).
//!
//! `cargo run --release -p ostquant-tests --example ostquant_probe -- [WINDOWS] [--inputs-only]
//! [--quick] CHECKPOINT...` (`--quick`: the W16A4KV4 column of the checkpoints only)
//! where each checkpoint is a finished calibration under ~/.cache/ostquant/calib; the random
//! Hadamard (QuaRot's rotation) and WOMI starts are always measured.
//!
//! A second table splits the error where it starts: the relative error ‖q(x) − x‖² / ‖x‖² of
//! each linear input quantized to 4 bits per token, in the unquantized transformed model on the
//! first window, for its first token (where massive activations sit) and for the others.

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::calib::{Checkpoint, Init, Transforms};
use ostquant_core::data::wiki;
use ostquant_core::eval::perplexity::{score_windows, text_windows};
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::llama::{Llama, Site};
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_core::quant::quantizer::{QuantSpec, fake_quant_group};

fn main() {
    let mut windows = 4;
    let mut checkpoints = Vec::new();
    let (mut inputs_only, mut quick) = (false, false);
    for a in std::env::args().skip(1) {
        match a.parse() {
            Ok(n) => windows = n,
            Err(_) if a == "--inputs-only" => inputs_only = true,
            Err(_) if a == "--quick" => quick = true,
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
        // Mean calibration loss over each third of the steps, to compare runs.
        let third = (learned.losses.len() / 3).max(1);
        let thirds: Vec<String> = learned
            .losses
            .chunks(third)
            .map(|c| format!("{:.3}", c.iter().sum::<f64>() / c.len() as f64))
            .collect();
        println!(
            "{name}: {} steps, init {:?}, lr {:.3}/{:.4}, mean loss by thirds {}",
            learned.step,
            settings.init,
            settings.lr_rot,
            settings.lr_scale,
            thirds.join(" / ")
        );
        // How far the scales moved from 1, against the most Adam can move a parameter with
        // this schedule: about lr per step, Σ lr·(1 − t/T) = lr·(T + 1)/2.
        let mut moved: std::collections::BTreeMap<String, (f64, f64, usize)> = Default::default();
        for (full, shape, values) in learned.transforms.named() {
            let kind = full.rsplit('.').next().unwrap_or(&full).to_string();
            if !kind.starts_with("s_") || shape.len() != 1 {
                continue;
            }
            let e = moved.entry(kind).or_insert((0.0, 0.0, 0));
            for v in values {
                let d = (v - 1.0).abs();
                (e.0, e.1, e.2) = (e.0 + d, e.1.max(d), e.2 + 1);
            }
        }
        let budget = settings.lr_scale * (settings.steps as f64 + 1.0) / 2.0;
        let list: Vec<String> = moved
            .iter()
            .map(|(k, (sum, max, n))| format!("{k} {:.4}/{max:.4}", sum / *n as f64))
            .collect();
        println!(
            "  |s − 1| mean/max: {}; Adam's reach at this schedule {budget:.4}",
            list.join(", ")
        );
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
    if quick {
        configs.drain(..configs.len() - 1);
        cases.drain(..2);
    }
    println!(
        "KL(FP ‖ W16 model) in nats per token, {} tokens ({windows} windows of 512)",
        wins.iter().map(|w| w.len() - 1).sum::<usize>()
    );
    if !quick {
        input_errors(&w, &dev, &cases, &wins[0]);
    }
    if inputs_only {
        return;
    }

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

/// Mean over layers of the per-token relative 4-bit error of each linear input: token 0, then
/// the mean over the other tokens.
fn input_errors(w: &LlamaWeights, dev: &Device, cases: &[(String, Transforms)], window: &[u32]) {
    let hd = w.config.head_dim();
    println!(
        "relative error of each linear input quantized to 4 bits per token, mean over layers, first window ({} tokens): token 0 / the others",
        window.len()
    );
    print!("{:<60}", "transforms");
    for s in Site::ALL {
        print!(" {:>19}", s.name());
    }
    println!();
    for (name, t) in cases {
        let (fused, online) = t.fuse(w, true).unwrap();
        let mut m = Llama::new(&fused, dev);
        m.set_options(online).unwrap();
        // [site] → (Σ error of token 0, Σ mean error of the others, layers seen)
        let mut sums = [(0.0f64, 0.0f64, 0usize); 4];
        let mut tap = |_layer: usize, site: Site, x: burn::tensor::Tensor<2>| {
            let [tokens, n] = x.dims();
            let data = x.into_data().try_to_vec::<f32>().unwrap();
            let spec = QuantSpec::asym(4);
            let group = if site == Site::OIn { hd } else { n };
            let errs: Vec<f64> = data
                .chunks(n)
                .map(|row| {
                    let mut q = row.to_vec();
                    for g in q.chunks_mut(group) {
                        fake_quant_group(g, &spec, 1.0);
                    }
                    let e: f64 = q
                        .iter()
                        .zip(row)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum();
                    let x2: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum();
                    e / x2.max(1e-30)
                })
                .collect();
            let s = &mut sums[Site::ALL.iter().position(|&x| x == site).unwrap()];
            s.0 += errs[0];
            s.1 += errs[1..].iter().sum::<f64>() / (tokens - 1) as f64;
            s.2 += 1;
        };
        let mut cache = m.new_cache();
        m.forward_tapped(&[window.to_vec()], &mut cache, &mut tap);
        print!("{name:<60}");
        for (first, rest, n) in sums {
            print!("   {:>7.4} / {:>7.4}", first / n as f64, rest / n as f64);
        }
        println!();
    }
}
