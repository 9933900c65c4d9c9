//! An int4 runtime (GPU or CPU) against the burn fake-quant forward of the same int4 folder, on
//! the first tokens of the Wikipedia evaluation half: top-1 agreement per position and the
//! largest relative logit difference; and burn fed one token at a time against burn's own
//! prefill, the float-order sensitivity of the folder itself.
//!
//! `cargo run -p ostquant-tests --example runtime_check -- QDIR [TOKENS] [software|gpu|cpu]`

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::data::wiki;
use ostquant_core::device::DeviceChoice;
use ostquant_core::model::LoadedModel;
use ostquant_core::runtime::Runtime;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::PathBuf::from(args.first().expect("usage: runtime_check QDIR [TOKENS]"));
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(64);
    let choice: DeviceChoice = args
        .get(2)
        .map_or(DeviceChoice::Software, |d| d.parse().unwrap());
    let m = LoadedModel::load(&dir, &Device::flex()).unwrap();
    let text = wiki::split(&wiki::read_articles(&assets::wiki_dump()).unwrap()).evaluation;
    let ids: Vec<u32> = m
        .tokenizer
        .encode(&text)
        .unwrap()
        .into_iter()
        .take(n)
        .collect();
    let want = m
        .model
        .forward(std::slice::from_ref(&ids), &mut m.model.new_cache())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    // The same burn model fed one token at a time (its own KV cache): how much two float
    // orders of the *same* computation disagree on this folder.
    let v = m.model.config.vocab_size;
    let mut cache = m.model.new_cache();
    let (mut self_agree, mut self_worst) = (0, 0f32);
    let argmax = |x: &[f32]| (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
    for (i, &t) in ids.iter().enumerate() {
        let got = m
            .model
            .forward(&[vec![t]], &mut cache)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let row = &want[i * v..(i + 1) * v];
        self_agree += (argmax(&got) == argmax(row)) as usize;
        let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        self_worst = self_worst.max(
            got.iter()
                .zip(row)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale,
        );
    }
    println!(
        "burn token-by-token vs burn prefill: top-1 {self_agree}/{n}, largest relative logit difference {self_worst:.2e}"
    );
    let mut rt = Runtime::load(&dir, choice, n + 1).unwrap();
    println!("runtime: {}", rt.device_name());
    let v = rt.config().vocab_size;
    let (mut agree, mut worst) = (0, 0f32);
    let t0 = std::time::Instant::now();
    for (i, &t) in ids.iter().enumerate() {
        let got = rt.step(t).unwrap();
        let row = &want[i * v..(i + 1) * v];
        let argmax = |x: &[f32]| (0..v).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
        agree += (argmax(&got) == argmax(row)) as usize;
        let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        worst = worst.max(
            got.iter()
                .zip(row)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale,
        );
    }
    println!(
        "{n} tokens: top-1 agreement {agree}/{n} ({:.1}%), largest relative logit difference {worst:.2e}, runtime {:.1} tok/s",
        100.0 * agree as f64 / n as f64,
        n as f64 / t0.elapsed().as_secs_f64()
    );
}
