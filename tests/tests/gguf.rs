//! GGUF: block dequantization against hand-computed blocks, llama.cpp's Q/K permutation, the
//! import of a small GGUF into a Hugging Face folder, bad files, and a fuzz loop over the header
//! parsers of GGUF and safetensors.

use std::path::Path;

use half::f16;
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::gguf::{self, GgufFile, TensorType};
use ostquant_core::model::import::{import_gguf, permute_qk, unpermute_qk};
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_tests::{GgufTensor, Meta, bytes_to_unicode, random_weights, tiny_config, write_gguf};
use proptest::prelude::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q4_0_block() {
    let mut b = h(0.5).to_vec();
    let mut qs = [0x88u8; 16];
    qs[0] = 0x21;
    qs[15] = 0xF0;
    b.extend(qs);
    let x = gguf::dequant_q4_0(&b);
    assert_eq!(x[0], -3.5); // low nibble 1: (1 - 8)·0.5
    assert_eq!(x[16], -3.0); // high nibble 2: (2 - 8)·0.5
    assert_eq!(x[15], -4.0); // low nibble 0
    assert_eq!(x[31], 3.5); // high nibble 15
    assert_eq!(x[1], 0.0);
    assert_eq!(x[20], 0.0);
}

#[test]
fn q4_1_block() {
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    let mut qs = [0u8; 16];
    qs[0] = 0x3A;
    qs[7] = 0xF4;
    b.extend(qs);
    let x = gguf::dequant_q4_1(&b);
    assert_eq!(x[0], 1.5); // 10·0.25 − 1
    assert_eq!(x[16], -0.25); // 3·0.25 − 1
    assert_eq!(x[7], 0.0); // 4·0.25 − 1
    assert_eq!(x[23], 2.75); // 15·0.25 − 1
    assert_eq!(x[3], -1.0);
}

#[test]
fn q8_0_block() {
    let mut b = h(0.125).to_vec();
    let mut qs = [0i8; 32];
    qs[0] = -128;
    qs[5] = 3;
    qs[31] = 127;
    b.extend(qs.iter().map(|&q| q as u8));
    let x = gguf::dequant_q8_0(&b);
    assert_eq!(x[0], -16.0);
    assert_eq!(x[5], 0.375);
    assert_eq!(x[31], 15.875);
    assert_eq!(x[1], 0.0);
}

#[test]
fn qk_permutation_matches_llama_cpp_and_inverts() {
    // Rows tagged by their Hugging Face (head, half, i); llama.cpp's converter reshapes to
    // [heads, 2, hd/2, cols] and swaps axes 1 and 2, so GGUF row (h, i, half) holds HF row (h, half, i).
    let (heads, hd, cols) = (3, 8, 2);
    let hf: Vec<f32> = (0..heads * hd)
        .flat_map(|r| {
            let (hh, rest) = (r / hd, r % hd);
            let (half, i) = (rest / (hd / 2), rest % (hd / 2));
            let tag = (hh * 100 + half * 10 + i) as f32;
            [tag, -tag]
        })
        .collect();
    let gg = permute_qk(&hf, heads, cols);
    for hh in 0..heads {
        for i in 0..hd / 2 {
            for half in 0..2 {
                let row = hh * hd + i * 2 + half;
                assert_eq!(gg[row * cols], (hh * 100 + half * 10 + i) as f32);
            }
        }
    }
    assert_eq!(unpermute_qk(&gg, heads, cols), hf);
}

fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> GgufTensor {
    GgufTensor {
        name: name.into(),
        dims: shape.iter().rev().map(|&d| d as u64).collect(),
        ty: 0,
        data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// A GGUF of the tiny model, laid out as llama.cpp writes it (Q/K permuted, dims reversed).
fn tiny_gguf(w: &LlamaWeights) -> Vec<u8> {
    let c = &w.config;
    let mut t = vec![f32_tensor(
        "token_embd.weight",
        &w.embed.shape,
        &w.embed.data,
    )];
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let wq = permute_qk(&l.wq.data, c.num_attention_heads, c.hidden_size);
        let wk = permute_qk(&l.wk.data, c.n_kv_heads(), c.hidden_size);
        t.push(f32_tensor(
            &n("attn_norm"),
            &l.attn_norm.shape,
            &l.attn_norm.data,
        ));
        t.push(f32_tensor(&n("attn_q"), &l.wq.shape, &wq));
        t.push(f32_tensor(&n("attn_k"), &l.wk.shape, &wk));
        t.push(f32_tensor(&n("attn_v"), &l.wv.shape, &l.wv.data));
        t.push(f32_tensor(&n("attn_output"), &l.wo.shape, &l.wo.data));
        t.push(f32_tensor(
            &n("ffn_norm"),
            &l.ffn_norm.shape,
            &l.ffn_norm.data,
        ));
        t.push(f32_tensor(&n("ffn_gate"), &l.w_gate.shape, &l.w_gate.data));
        t.push(f32_tensor(&n("ffn_up"), &l.w_up.shape, &l.w_up.data));
        t.push(f32_tensor(&n("ffn_down"), &l.w_down.shape, &l.w_down.data));
    }
    t.push(f32_tensor(
        "output_norm.weight",
        &w.norm.shape,
        &w.norm.data,
    ));
    let head = w.lm_head.as_ref().unwrap();
    t.push(f32_tensor("output.weight", &head.shape, &head.data));

    let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
    let pad = (tokens.len()..c.vocab_size - 4).map(|i| format!("<unused{i}>"));
    tokens.extend(pad.collect::<Vec<_>>());
    tokens.extend(["Ġt", "Ġth", "<|im_start|>", "<|im_end|>"].map(String::from));
    let mut types = vec![1i32; c.vocab_size];
    types[c.vocab_size - 2] = 3;
    types[c.vocab_size - 1] = 3;
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(c.num_hidden_layers as u32)),
        (
            "llama.context_length",
            Meta::U32(c.max_position_embeddings as u32),
        ),
        ("llama.embedding_length", Meta::U32(c.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Meta::U32(c.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            Meta::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Meta::U32(c.n_kv_heads() as u32),
        ),
        ("llama.rope.freq_base", Meta::F32(c.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(c.rms_norm_eps as f32),
        ),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32Array(types)),
        (
            "tokenizer.ggml.merges",
            Meta::StrArray(vec!["Ġ t".into(), "Ġt h".into()]),
        ),
        (
            "tokenizer.ggml.bos_token_id",
            Meta::U32(c.vocab_size as u32 - 2),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Meta::U32(c.vocab_size as u32 - 1),
        ),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
    ];
    write_gguf(&meta, &t)
}

fn tiny_weights() -> LlamaWeights {
    let mut c = tiny_config(300);
    c.rope_scaling = None; // GGUF import carries no llama3 scaling
    random_weights(&c, 3)
}

#[test]
fn import_tiny_gguf_reproduces_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny_weights();
    let gguf_path = dir.path().join("tiny.gguf");
    std::fs::write(&gguf_path, tiny_gguf(&w)).unwrap();
    let out = dir.path().join("tiny");
    import_gguf(&gguf_path, &out, &mut |_, _| {}).unwrap();

    let back = LlamaWeights::load(&out).unwrap();
    assert_eq!(back.embed, w.embed);
    for (a, b) in back.layers.iter().zip(&w.layers) {
        assert_eq!(a.wq, b.wq, "Q un-permuted");
        assert_eq!(a.wk, b.wk, "K un-permuted");
        assert_eq!(a.w_down, b.w_down);
    }
    assert_eq!(back.lm_head, w.lm_head);
    assert_eq!(back.config.num_key_value_heads, Some(2));
    assert!(!back.config.tie_word_embeddings);

    let tok = Tokenizer::load(&out, &back.config).unwrap();
    let ids = tok.encode(" the<|im_end|>").unwrap();
    // " th" merges into one token, then 'e', then the special token whole.
    assert_eq!(ids, vec![297, b'e' as u32, 299]);
    assert_eq!(tok.decode(&ids, false).unwrap(), " the<|im_end|>");
    assert!(!tok.add_bos);
    assert_eq!(tok.eos_ids, vec![299]);
}

#[test]
fn unsupported_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.gguf");
    let t = GgufTensor {
        name: "blk.0.ffn_up.weight".into(),
        dims: vec![256],
        ty: 12, // Q4_K
        data: vec![0; 144],
    };
    std::fs::write(
        &path,
        write_gguf(&[("general.architecture", Meta::Str("llama".into()))], &[t]),
    )
    .unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensors[0].ty, TensorType::Other(12));
    let err = f.tensor_f32(&f.tensors[0]).unwrap_err().to_string();
    assert!(
        err.contains("unsupported tensor type Q4_K in tensor blk.0.ffn_up.weight"),
        "{err}"
    );
    assert!(err.contains("k.gguf"), "{err}");
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    match GgufFile::open(&path) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_gguf_is_reported() {
    let bytes = tiny_gguf(&tiny_weights());
    let err = open_err(&bytes[..bytes.len() - 100]);
    assert!(
        err.contains("bad.gguf") && err.contains("past the end of the file"),
        "{err}"
    );
    let err = open_err(&bytes[..1000]);
    assert!(
        err.contains("bad.gguf") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn gguf_header_lying_about_counts_is_reported() {
    let mut bytes = tiny_gguf(&tiny_weights());
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    let err = open_err(&bytes);
    assert!(err.contains("more than the file can hold"), "{err}");
}

#[test]
fn gguf_tensor_offset_past_end_is_reported() {
    let mut t = vec![f32_tensor("a", &[4], &[1.0, 2.0, 3.0, 4.0])];
    t[0].dims = vec![64]; // claims 64 elements, the file holds 4
    let err = open_err(&write_gguf(&[], &t));
    assert!(
        err.contains("tensor a") && err.contains("past the end"),
        "{err}"
    );
}

#[test]
fn not_a_gguf_is_reported() {
    let err = open_err(b"PK\x03\x04 this is a zip");
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn non_llama_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen.gguf");
    std::fs::write(
        &path,
        write_gguf(&[("general.architecture", Meta::Str("qwen2".into()))], &[]),
    )
    .unwrap();
    let err = import_gguf(&path, &dir.path().join("out"), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qwen.gguf") && err.contains("'qwen2' is not LLaMA"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists(), "no output on failure");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random corruption of a valid GGUF (byte flips, truncation) never panics the parser.
    #[test]
    fn gguf_parser_never_panics(flips in proptest::collection::vec((0usize..4000, any::<u8>()), 0..8),
                                cut in 0usize..5000) {
        let mut bytes = tiny_gguf_small();
        for (pos, val) in flips {
            if pos < bytes.len() { bytes[pos] = val; }
        }
        bytes.truncate(cut.max(4));
        if let Ok(h) = gguf::parse_header(Path::new("fuzz.gguf"), &bytes) {
            for t in &h.tensors { let _ = t.shape(); }
        }
    }

    /// Random bytes after a valid-looking safetensors length prefix never panic the loader.
    #[test]
    fn safetensors_header_never_panics(len in 0u64..300, body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(body);
        let _ = safetensors::SafeTensors::deserialize(&bytes);
    }
}

fn tiny_gguf_small() -> Vec<u8> {
    let t = vec![f32_tensor("x", &[2, 3], &[1., 2., 3., 4., 5., 6.])];
    write_gguf(
        &[
            ("general.architecture", Meta::Str("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Meta::StrArray(vec!["a".into(), "b".into()]),
            ),
        ],
        &t,
    )
}

/// Two .gguf files of the same name, or one file changed, import into different folders; the
/// same file finds its earlier import.
#[test]
fn gguf_files_of_the_same_name_import_apart() {
    use ostquant_core::assets::gguf_import_dir;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (fa, fb) = (a.join("model.gguf"), b.join("model.gguf"));
    std::fs::write(&fa, b"GGUF one").unwrap();
    std::fs::write(&fb, b"GGUF one").unwrap();
    let da = gguf_import_dir(&fa).unwrap();
    assert_eq!(
        da,
        gguf_import_dir(&fa).unwrap(),
        "the same file, the same folder"
    );
    assert_ne!(
        da,
        gguf_import_dir(&fb).unwrap(),
        "another file of the same name"
    );
    assert!(
        da.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("model-")
    );
    std::fs::write(&fa, b"GGUF two, longer").unwrap();
    assert_ne!(da, gguf_import_dir(&fa).unwrap(), "the file changed");
}
