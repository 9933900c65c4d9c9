//! Helpers shared by the end-to-end tests: tiny random LLaMA checkpoints, a byte-level
//! tokenizer for them, a GGUF writer, and a naive f64 reference forward.

use std::path::Path;

use ostquant_core::model::checkpoint::{HostTensor, LayerWeights, LlamaWeights};
use ostquant_core::model::config::{LlamaConfig, RopeScaling, TokenIds};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A tiny config with GQA (4 query heads, 2 KV heads), 2 layers and llama3 RoPE scaling.
pub fn tiny_config(vocab: usize) -> LlamaConfig {
    LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: Some(8),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: Some(1.0),
            // Wavelengths 6.3, 63, 628, 6283 against 64/8 and 64/1: each llama3 branch is taken.
            high_freq_factor: Some(8.0),
            original_max_position_embeddings: Some(64),
        }),
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        bos_token_id: Some(TokenIds::One(1)),
        eos_token_id: Some(TokenIds::One(2)),
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        torch_dtype: Some("float32".into()),
    }
}

fn rand_tensor(rng: &mut StdRng, shape: Vec<usize>, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(
        shape,
        (0..n).map(|_| rng.random_range(-scale..scale)).collect(),
    )
}

fn norm_weight(rng: &mut StdRng, d: usize) -> HostTensor {
    HostTensor::new(
        vec![d],
        (0..d).map(|_| rng.random_range(0.5..1.5)).collect(),
    )
}

/// Random weights for `config`, deterministic in `seed`.
pub fn random_weights(config: &LlamaConfig, seed: u64) -> LlamaWeights {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = config;
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * hd, c.n_kv_heads() * hd);
    let s = 1.0 / (d as f32).sqrt();
    let layers = (0..c.num_hidden_layers)
        .map(|_| LayerWeights {
            attn_norm: norm_weight(&mut rng, d),
            wq: rand_tensor(&mut rng, vec![q, d], s * 2.0),
            wk: rand_tensor(&mut rng, vec![kv, d], s * 2.0),
            wv: rand_tensor(&mut rng, vec![kv, d], s),
            wo: rand_tensor(&mut rng, vec![d, q], s),
            ffn_norm: norm_weight(&mut rng, d),
            w_gate: rand_tensor(&mut rng, vec![f, d], s),
            w_up: rand_tensor(&mut rng, vec![f, d], s),
            w_down: rand_tensor(&mut rng, vec![d, f], 1.0 / (f as f32).sqrt()),
        })
        .collect();
    LlamaWeights {
        config: c.clone(),
        embed: rand_tensor(&mut rng, vec![c.vocab_size, d], 1.0),
        layers,
        norm: norm_weight(&mut rng, d),
        lm_head: (!c.tie_word_embeddings).then(|| rand_tensor(&mut rng, vec![c.vocab_size, d], s)),
    }
}

/// GPT-2's map from bytes to printable characters (the byte-level BPE alphabet).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).expect("valid char");
    }
    map
}

/// Vocabulary size of [`write_tiny_model`]: 256 byte tokens and 4 specials.
pub const TINY_VOCAB: usize = 260;

/// Write a tiny random model folder with a byte-level tokenizer (no merges) and ChatML.
pub fn write_tiny_model(dir: &Path, seed: u64) -> LlamaWeights {
    std::fs::create_dir_all(dir).unwrap();
    let config = tiny_config(TINY_VOCAB);
    let w = random_weights(&config, seed);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    w.save_safetensors(&dir.join("model.safetensors")).unwrap();
    let alphabet = bytes_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), serde_json::json!(i));
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), serde_json::json!(256 + i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tcfg = serde_json::json!({
        "add_bos_token": false, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": ostquant_core::model::import::CHATML_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
    // The tiny config's ids: bos 1 / eos 2 are byte tokens; point them at the specials.
    let mut cfg = config;
    cfg.bos_token_id = Some(TokenIds::One(257));
    cfg.eos_token_id = Some(TokenIds::One(258));
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    LlamaWeights { config: cfg, ..w }
}

/// One tensor for [`write_gguf`]: name, ggml dims (innermost first), ggml type id, raw bytes.
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// A metadata value for [`write_gguf`].
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// Serialize a GGUF v3 file (alignment 32).
pub fn write_gguf(meta: &[(&str, Meta)], tensors: &[GgufTensor]) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Meta::Str(x) => {
                out.extend(8u32.to_le_bytes());
                s(&mut out, x);
            }
            Meta::StrArray(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut out, x);
                }
            }
            Meta::I32Array(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    for (t, off) in tensors.iter().zip(&offsets) {
        s(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.to_le_bytes());
        out.extend(off.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

/// Naive f64 LLaMA forward over `tokens` (one sequence), written from the equations with no
/// code shared with ostquant: returns logits [T][V].
pub fn reference_forward(w: &LlamaWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &w.config;
    let (d, hd) = (c.hidden_size, c.head_dim());
    let (nq, nkv) = (c.num_attention_heads, c.n_kv_heads());
    let g = nq / nkv;
    let eps = c.rms_norm_eps;
    let t_len = tokens.len();
    let f = |t: &HostTensor| t.data.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    // y = x·Wᵀ for W [out, in].
    let matvec = |w: &HostTensor, x: &[f64]| -> Vec<f64> {
        let (rows, cols) = (w.shape[0], w.shape[1]);
        (0..rows)
            .map(|r| (0..cols).map(|k| w.data[r * cols + k] as f64 * x[k]).sum())
            .collect()
    };
    let rms = |x: &[f64], wt: &HostTensor| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        x.iter().zip(f(wt)).map(|(v, g)| v * inv * g).collect()
    };
    // Inverse frequencies, llama3 scaling written out again here.
    let inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| {
            let base = 1.0 / c.rope_theta.powf(2.0 * i as f64 / hd as f64);
            match &c.rope_scaling {
                Some(rs) if rs.rope_type == "llama3" => {
                    let old = rs.original_max_position_embeddings.unwrap() as f64;
                    let (lo, hi) = (rs.low_freq_factor.unwrap(), rs.high_freq_factor.unwrap());
                    let wl = 2.0 * std::f64::consts::PI / base;
                    if wl < old / hi {
                        base
                    } else if wl > old / lo {
                        base / rs.factor
                    } else {
                        let sm = (old / wl - lo) / (hi - lo);
                        (1.0 - sm) * base / rs.factor + sm * base
                    }
                }
                Some(rs) if rs.rope_type == "linear" => base / rs.factor,
                _ => base,
            }
        })
        .collect();
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..hd / 2 {
            let a = pos as f64 * inv_freq[i];
            let (x1, x2) = (v[i], v[i + hd / 2]);
            v[i] = x1 * a.cos() - x2 * a.sin();
            v[i + hd / 2] = x2 * a.cos() + x1 * a.sin();
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| f(&w.embed)[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    for l in &w.layers {
        let hs: Vec<Vec<f64>> = xs.iter().map(|x| rms(x, &l.attn_norm)).collect();
        let mut qs: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&l.wq, h)).collect();
        let mut ks: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&l.wk, h)).collect();
        let vs: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&l.wv, h)).collect();
        for p in 0..t_len {
            for h in 0..nq {
                rope(&mut qs[p][h * hd..(h + 1) * hd], p);
            }
            for h in 0..nkv {
                rope(&mut ks[p][h * hd..(h + 1) * hd], p);
            }
        }
        for p in 0..t_len {
            let mut att = vec![0f64; nq * hd];
            for h in 0..nq {
                let kvh = h / g;
                let q = &qs[p][h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for i in 0..hd {
                        att[h * hd + i] += ej / z * vs[j][kvh * hd + i];
                    }
                }
            }
            let o = matvec(&l.wo, &att);
            for i in 0..d {
                xs[p][i] += o[i];
            }
        }
        for x in xs.iter_mut() {
            let h = rms(x, &l.ffn_norm);
            let gate = matvec(&l.w_gate, &h);
            let up = matvec(&l.w_up, &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&l.w_down, &act);
            for i in 0..d {
                x[i] += down[i];
            }
        }
    }
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    xs.iter().map(|x| matvec(head, &rms(x, &w.norm))).collect()
}

/// burn's software Vulkan device (lavapipe), for the burn-side tests of GPU code.
pub fn software_vulkan() -> burn::tensor::Device {
    use ostquant_core::device::{DeviceChoice, select};
    select(DeviceChoice::Software)
        .expect(
            "the software Vulkan device (mesa-vulkan-drivers) must be installed: run assets/setup",
        )
        .device
}

/// The wgpu device the runtime tests run on: the software Vulkan device (lavapipe) unless
/// `OSTQUANT_TEST_DEVICE=gpu` asks for a real GPU (to check the kernels on one when lent).
pub fn test_gpu() -> ostquant_core::runtime::Gpu {
    use ostquant_core::device::DeviceChoice;
    let choice = match std::env::var("OSTQUANT_TEST_DEVICE").as_deref() {
        Ok("gpu") => DeviceChoice::Gpu,
        _ => DeviceChoice::Software,
    };
    ostquant_core::runtime::Gpu::open(choice).unwrap_or_else(|e| {
        panic!("{e}: the software Vulkan device (mesa-vulkan-drivers) must be installed: run assets/setup")
    })
}

/// Random packed int4 codes of a [rows, cols] matrix quantized as `spec`: the words, one scale
/// per row and group drawn from `scales`, and for asymmetric specs one zero point in 0..16 per
/// row and group (drawn in that order, so a seeded test sees the same matrix every run).
pub fn random_int4(
    rng: &mut impl Rng,
    rows: usize,
    cols: usize,
    spec: &ostquant_core::quant::quantizer::QuantSpec,
    scales: std::ops::Range<f32>,
) -> (Vec<u32>, Vec<f32>, Option<Vec<f32>>) {
    let groups = rows * (cols / spec.group.unwrap_or(cols));
    let words: Vec<u32> = (0..rows * cols / 8).map(|_| rng.random()).collect();
    let scales: Vec<f32> = (0..groups)
        .map(|_| rng.random_range(scales.clone()))
        .collect();
    let zeros = (!spec.sym).then(|| {
        (0..groups)
            .map(|_| rng.random_range(0..16) as f32)
            .collect()
    });
    (words, scales, zeros)
}
