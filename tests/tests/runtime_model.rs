//! The whole model on both int4 runtimes — the WGSL kernels on the software Vulkan device (with
//! the fused q/k/v and gate/up products and without), and
//! the CPU path — against the burn forward of the same folder (dequantized weights, the same
//! fake quantizers), logits per position: int4 folders at W4A4KV4 and W4A16KV16, and the
//! unquantized folder on the f16 path.

use burn::tensor::Device;
use ostquant_core::device::DeviceChoice;
use ostquant_core::generate::Decoder;
use ostquant_core::model::LoadedModel;
use ostquant_core::model::qformat::{self, Header};
use ostquant_core::quant::method::{Calibration, Method, quantize_weights_rtn, transform};
use ostquant_core::quant::quantizer::QuantSpec;
use ostquant_core::runtime::Runtime;
use ostquant_core::runtime::host::HostModel;
use ostquant_core::runtime::model::{Fusion, GpuModel};
use ostquant_tests::write_tiny_model;

#[test]
fn runtime_logits_match_the_burn_forward_of_the_same_folder() {
    check(None);
}

/// SmolLM2's head layout (9 query heads of 64, 3 KV heads) and widths, one layer.
#[test]
fn runtime_matches_burn_with_smollm2_head_shapes() {
    check(Some(|c: &mut ostquant_core::model::config::LlamaConfig| {
        c.hidden_size = 576;
        c.intermediate_size = 1536;
        c.num_attention_heads = 9;
        c.num_key_value_heads = Some(3);
        c.head_dim = Some(64);
        c.num_hidden_layers = 1;
        c.rope_theta = 100000.0;
        c.rope_scaling = None;
    }));
}

fn check(edit: Option<fn(&mut ostquant_core::model::config::LlamaConfig)>) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let w = match edit {
        None => write_tiny_model(&src, 7),
        Some(f) => {
            // The tiny tokenizer's vocabulary: every id it can produce has an embedding row.
            let mut c = ostquant_tests::tiny_config(ostquant_tests::TINY_VOCAB);
            f(&mut c);
            let w = ostquant_tests::random_weights(&c, 7);
            write_tiny_model(&src, 7);
            std::fs::write(
                src.join("config.json"),
                serde_json::to_string(&w.config).unwrap(),
            )
            .unwrap();
            w.save_safetensors(&src.join("model.safetensors")).unwrap();
            w
        }
    };
    let calib = Calibration {
        windows: &[],
        device: &Device::flex(),
        learned: None,
    };
    let (mut tw, mut online) = transform(&w, Method::Quarot, &calib).unwrap();
    let spec = QuantSpec::sym(4);
    let grids = quantize_weights_rtn(&mut tw, &spec);
    online.act = Some(QuantSpec::asym(4));
    online.kv = Some(QuantSpec::asym(4));
    let header = Header {
        format: qformat::FORMAT.into(),
        version: 1,
        method: "quarot".into(),
        bits: "W4A4KV4".into(),
        weight: Some(spec),
        forward: (&online).into(),
        details: serde_json::Value::Null,
    };
    let out = tmp.path().join("q");
    qformat::write(&out, &src, &tw, Some(&grids), &header).unwrap();

    for (dir, what) in [(&out, "W4A4KV4 folder"), (&src, "unquantized folder (f16)")] {
        compare(dir, what);
    }
    // 4-bit weights with 16-bit activations and KV cache.
    let mut h16 = header.clone();
    h16.bits = "W4A16KV16".into();
    h16.forward.act = None;
    h16.forward.kv = None;
    let out16 = tmp.path().join("q16");
    qformat::write(&out16, &src, &tw, Some(&grids), &h16).unwrap();
    compare(&out16, "W4A16KV16 folder");
    // Without the online Hadamard on q and k, decode's q, k, v GEMV applies RoPE in its
    // epilogue (q's and k's rows uploaded in RoPE pairs): one launch fewer per layer, the same
    // logits. At W4A16KV16 (f32 input, RMSNorm inside the GEMV) and at W4A4KV4 (integer
    // activation codes on the SmolLM2-shaped model).
    // With the online Hadamard on q and k (the W4A4KV4 folder), decode's attention reads the
    // paired heads back into natural order and turns them itself, and it appends k and v to
    // the caches in every case: unpaired, decode runs RoPE, the Q/K Hadamard and the append
    // in launches of their own, three launches more per layer.
    for (h, name, qk_hadamard) in [
        (&h16, "q16-pairs", false),
        (&header, "q-pairs", false),
        (&header, "q-pairs-hadamard", true),
    ] {
        let mut h = h.clone();
        h.forward.qk_hadamard = qk_hadamard;
        let dir = tmp.path().join(name);
        qformat::write(&dir, &src, &tw, Some(&grids), &h).unwrap();
        let what = format!(
            "{} folder, online Hadamard on q and k: {qk_hadamard}",
            h.bits
        );
        compare(&dir, &what);
        let host = HostModel::load(&dir).unwrap();
        let launches = |fusion| {
            GpuModel::upload_with(&host, ostquant_tests::test_gpu(), 64, fusion)
                .unwrap()
                .decode_launches()
        };
        let unpaired = Fusion {
            rope: false,
            ..Fusion::ALL
        };
        let layers = w.config.num_hidden_layers;
        let saved = if qk_hadamard { 3 } else { 1 };
        assert_eq!(
            launches(Fusion::ALL) + saved * layers,
            launches(unpaired),
            "{what}"
        );
    }
    // A KV cache the kernels do not implement is refused by name.
    let mut h8 = header.clone();
    h8.forward.kv = Some(QuantSpec::asym(8));
    let out8 = tmp.path().join("q8");
    qformat::write(&out8, &src, &tw, Some(&grids), &h8).unwrap();
    let gpu = ostquant_tests::test_gpu();
    let err = GpuModel::load(&out8, gpu, 8).err().unwrap().to_string();
    assert!(
        err.contains("quantization.json") && err.contains("KV cache"),
        "{err}"
    );
    let err = Runtime::load(&out8, DeviceChoice::Cpu, 8)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("KV cache"), "{err}");
}

/// Runtime logits of the folder `dir` position by position against burn's prefill forward, on
/// the GPU runtime and on the CPU runtime.
fn compare(dir: &std::path::Path, what: &str) {
    let tokens: Vec<u32> = vec![1, 17, 42, 5, 60, 33, 12, 63, 8, 2, 40, 41];
    let burn_model = LoadedModel::load(dir, &Device::flex()).unwrap();
    let want = burn_model
        .model
        .forward(
            std::slice::from_ref(&tokens),
            &mut burn_model.model.new_cache(),
        )
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let gpu = GpuModel::load(dir, ostquant_tests::test_gpu(), 64).unwrap();
    // Integer activation codes wherever the folder quantizes activations to ≤ 7 bits and the
    // widths are whole 32-column blocks (the SmolLM2-shaped model; the tiny one's 8-wide heads
    // take the fake-quantized float path).
    let header = qformat::read_header(dir).ok();
    let a4 = header.is_some_and(|h| h.forward.act.is_some());
    let blocks = gpu.config.head_dim().is_multiple_of(32);
    assert_eq!(gpu.integer_activations, a4 && blocks, "{what}");
    let cpu = Runtime::load(dir, DeviceChoice::Cpu, 64).unwrap();
    assert!(matches!(cpu, Runtime::Cpu(_)));
    // The same kernels with q, k, v and gate, up as separate products.
    let host = HostModel::load(dir).unwrap();
    let separate =
        GpuModel::upload_with(&host, ostquant_tests::test_gpu(), 64, Fusion::NONE).unwrap();
    for (mut rt, name) in [
        (Runtime::Gpu(Box::new(gpu)), "GPU"),
        (Runtime::Gpu(Box::new(separate)), "GPU, unfused products"),
        (cpu, "CPU"),
    ] {
        check_runtime(
            &mut rt,
            &tokens,
            &want,
            &format!("{what} on the {name} runtime"),
        );
    }
}

fn check_runtime(rt: &mut Runtime, tokens: &[u32], want: &[f32], what: &str) {
    let v = rt.config().vocab_size;
    let (mut agree, mut worst) = (0, 0f32);
    for (i, &t) in tokens.iter().enumerate() {
        let got = rt.step(t).unwrap();
        let row = &want[i * v..(i + 1) * v];
        let argmax = |x: &[f32]| (0..v).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
        agree += (argmax(&got) == argmax(row)) as usize;
        let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(row)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        worst = worst.max(err);
    }
    // Prefill: positions 0..5 and 5..11 in two calls (many positions per launch on the GPU:
    // the GEMMs and the multi-query attention; the second call starts mid-cache), then one
    // decode step; each call's last logits against burn's.
    rt.reset();
    let rel = |got: &[f32], i: usize| {
        let row = &want[i * v..(i + 1) * v];
        let scale = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        got.iter()
            .zip(row)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    };
    for (range, last) in [(0..5, 4), (5..11, 10), (11..12, 11)] {
        let got = rt.prefill(&tokens[range]).unwrap();
        worst = worst.max(rel(&got, last));
    }
    // Every position's logits in one call, as perplexity scores a window (on the GPU the final
    // norm and the head run over the whole chunk).
    let all = Decoder::window_logits(rt, tokens).unwrap();
    assert_eq!(all.len(), tokens.len() * v, "{what}");
    for i in 0..tokens.len() {
        worst = worst.max(rel(&all[i * v..(i + 1) * v], i));
    }
    eprintln!(
        "{what}: top-1 agreement {agree}/{}, largest relative logit difference {worst}",
        tokens.len()
    );
    assert!(
        agree >= tokens.len() - 1,
        "{what}: top-1 agrees at {agree} of {} positions",
        tokens.len()
    );
    assert!(
        worst < 1e-2,
        "{what}: largest relative logit difference {worst}"
    );
}

/// Streaming decode (each next token looked up on the GPU, the following step submitted before
/// the host reads the current one) picks the same tokens as stepping with `next_token`, greedy
/// and top-p, with the embedding table in f32 and in f16; after a stop the cache holds what
/// stepping leaves, so both go on with the same token.
#[test]
fn streaming_decode_matches_step_by_step() {
    use ostquant_core::runtime::ops::Pick;
    let w = ostquant_tests::random_weights(&ostquant_tests::tiny_config(64), 7);
    let mut host = HostModel::from_weights(&w).unwrap();
    let mut m = GpuModel::upload(&host, ostquant_tests::test_gpu(), 64).unwrap();
    // Every embedding value a normal f16 (or 0) exactly: the table is stored in f16.
    for v in &mut host.embed {
        let h = half::f16::from_f32(*v);
        *v = if h.is_normal() { h.to_f32() } else { 0.0 };
    }
    let mut m16 = GpuModel::upload(&host, ostquant_tests::test_gpu(), 64).unwrap();
    let prompt = [1u32, 5, 9, 3, 17];
    let n = 12;
    let greedy = |_: usize| Pick::Greedy;
    let top_p = |k: usize| Pick::TopP {
        temperature: 1.5,
        top_p: 0.9,
        u: (k * 37 % 100) as f32 / 100.0,
    };
    for (model, what) in [(&mut m, "f32 table"), (&mut m16, "f16 table")] {
        for (pick, rule) in [
            (&greedy as &dyn Fn(usize) -> Pick, "greedy"),
            (&top_p, "top-p"),
        ] {
            model.len = 0;
            let mut stepped = vec![model.next_token(&prompt, pick(0)).unwrap()];
            for k in 1..=n {
                let last = *stepped.last().unwrap();
                stepped.push(model.next_token(&[last], pick(k)).unwrap());
            }
            let held = model.len;
            let after_stepping = model.next_token(&[stepped[n]], pick(n + 1)).unwrap();

            // One step in flight (the software device's choice) and two (a GPU's).
            for ahead in [1, 2] {
                model.len = 0;
                let mut streamed = vec![model.next_token(&prompt, pick(0)).unwrap()];
                let mut k = 0;
                model
                    .stream_ahead(
                        ahead,
                        streamed[0],
                        &mut || {
                            k += 1;
                            pick(k)
                        },
                        &mut |t| {
                            streamed.push(t);
                            streamed.len() <= n
                        },
                    )
                    .unwrap();
                let case = format!("{what}, {rule}, {ahead} in flight");
                assert_eq!(streamed, stepped, "{case}: streamed tokens");
                assert_eq!(model.len, held, "{case}: positions held after a stop");
                let after_streaming = model.next_token(&[streamed[n]], pick(n + 1)).unwrap();
                assert_eq!(after_streaming, after_stepping, "{case}: going on");
            }
        }
    }
    // Streaming stops when the cache is full: 64 positions, 5 of them the prompt.
    for ahead in [1, 2] {
        m.len = 0;
        let first = m.next_token(&prompt, Pick::Greedy).unwrap();
        let mut handed = 0;
        m.stream_ahead(ahead, first, &mut || Pick::Greedy, &mut |_| {
            handed += 1;
            true
        })
        .unwrap();
        assert_eq!((handed, m.len), (59, 64), "{ahead} in flight: a full cache");
    }
}
