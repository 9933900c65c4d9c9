//! The real SmolLM2-135M-Instruct quantized to a W4A16KV16 int4 folder (RTN), scored token by
//! token through the int4 runtimes on Wikipedia evaluation text, against the burn forward of
//! the same folder: the CPU runtime over a 2048-token window, the WGSL kernels on the software
//! Vulkan device over 256 tokens (lavapipe decodes a few tokens per second).

use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::data::wiki;
use ostquant_core::device::{self, DeviceChoice};
use ostquant_core::eval::perplexity::{TextScores, score_decoder, text_windows};
use ostquant_core::eval::suite::{Lab, Settings};
use ostquant_core::model::LoadedModel;
use ostquant_core::quant::method::Method;
use ostquant_core::runtime::Runtime;
use ostquant_core::runtime::model::GpuModel;

fn check(r: &TextScores, tokens: usize, what: &str) {
    let (kl, top1) = (r.kl.unwrap(), r.top1.unwrap());
    eprintln!(
        "{what}: {} tokens, perplexity {:.3}, KL to the burn forward {kl:.2e}, top-1 agreement {:.2}%",
        r.tokens_scored,
        r.ppl,
        100.0 * top1
    );
    assert_eq!(r.tokens_scored, tokens);
    assert!(top1 >= 0.99, "{what}: top-1 agreement {top1}");
    assert!(kl < 1e-3, "{what}: KL {kl}");
    assert!(
        r.ppl.is_finite() && r.ppl < 100.0,
        "{what}: perplexity {}",
        r.ppl
    );
}

#[test]
fn int4_runtimes_match_the_burn_forward_on_smollm2() {
    let dir = assets::ensure_default_model(&mut |_, _| {}).expect("fetch and import SmolLM2");
    let dev = device::select(DeviceChoice::Cpu).unwrap();
    let mut lab = Lab::open(&dir, dev).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-rtn-w4a16");
    lab.export(
        Method::Rtn,
        "W4A16KV16".parse().unwrap(),
        &Settings::default(),
        None,
        &out,
        &mut |_, _, _| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let m = LoadedModel::load(&out, &Device::flex()).unwrap();
    let split = wiki::split(&wiki::read_articles(&assets::wiki_dump()).unwrap());
    let text = &split.evaluation;

    let wins = text_windows(&m.model, &m.tokenizer, text, 2048, Some(1)).unwrap();
    let mut cpu = Runtime::load(&out, DeviceChoice::Cpu, 2048).unwrap();
    let r = score_decoder(&mut cpu, Some(&m.model), &wins, &mut |_, _| {}).unwrap();
    check(&r, 2047, "CPU runtime");

    let wins = text_windows(&m.model, &m.tokenizer, text, 257, Some(1)).unwrap();
    let gpu = GpuModel::load(&out, ostquant_tests::test_gpu(), 257).unwrap();
    let r = score_decoder(
        &mut Runtime::Gpu(Box::new(gpu)),
        Some(&m.model),
        &wins,
        &mut |_, _| {},
    )
    .unwrap();
    check(&r, 256, "WGSL runtime");
}
