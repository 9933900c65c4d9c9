//! Loading Hugging Face folders: dtypes, shards, and every kind of bad input gets an error that
//! names the file and the problem.

use std::collections::HashMap;
use std::path::Path;

use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_tests::write_tiny_model;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn err_of(dir: &Path) -> String {
    LlamaWeights::load(dir).map(|_| ()).unwrap_err().to_string()
}

/// Rewrite model.safetensors with `f` applied to each (name, dtype, shape, bytes).
fn rewrite(
    dir: &Path,
    f: impl Fn(&str, Vec<f32>, Vec<usize>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let w = LlamaWeights::load(dir).unwrap();
    let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = w
        .named_tensors()
        .into_iter()
        .filter_map(|(n, t)| f(&n, t.data.clone(), t.shape.clone()).map(|(d, s, b)| (n, d, s, b)))
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(
        views,
        None::<HashMap<String, String>>,
        &dir.join("model.safetensors"),
    )
    .unwrap();
}

#[test]
fn f16_and_bf16_checkpoints_load() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny_model(dir.path(), 1);
    for dtype in [Dtype::F16, Dtype::BF16] {
        rewrite(dir.path(), |_, data, shape| {
            let bytes = match dtype {
                Dtype::F16 => data
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                _ => data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            Some((dtype, shape, bytes))
        });
        let back = LlamaWeights::load(dir.path()).unwrap();
        let tol = if dtype == Dtype::F16 { 1e-3 } else { 1e-2 };
        for (a, b) in back.embed.data.iter().zip(&w.embed.data) {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-2),
                "{dtype:?}: {a} vs {b}"
            );
        }
        // Write f32 back for the next round.
        rewrite(dir.path(), |n, _, shape| {
            let t = w
                .named_tensors()
                .into_iter()
                .find(|(m, _)| m == n)
                .unwrap()
                .1
                .clone();
            Some((
                Dtype::F32,
                shape,
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ))
        });
    }
}

#[test]
fn sharded_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny_model(dir.path(), 2);
    let named = w.named_tensors();
    let (first, second) = named.split_at(named.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, t.shape.clone(), bytemuck_f32(&t.data)).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(
            views,
            None::<HashMap<String, String>>,
            &dir.path().join(&file),
        )
        .unwrap();
        for (n, _) in part.iter() {
            map.insert(n.clone(), serde_json::json!(file));
        }
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let back = LlamaWeights::load(dir.path()).unwrap();
    assert_eq!(back.embed, w.embed);
    assert_eq!(back.layers[1].w_down, w.layers[1].w_down);
    assert_eq!(back.lm_head, w.lm_head);
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(&path, &bytes[..half]).unwrap();
    let err = err_of(dir.path());
    let want = format!(
        "truncated: the file has {half} bytes, its header describes {}",
        bytes.len()
    );
    assert!(
        err.contains("model.safetensors") && err.contains(&want),
        "{err}"
    );
    // Cut inside the header: still named as truncated.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let err = err_of(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn safetensors_header_lying_about_offsets_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let header = r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[260,32],"data_offsets":[0,999999]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 64]);
    let len = bytes.len();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let err = err_of(dir.path());
    // Shorter than its header says: reported as a cut file, with both lengths.
    let want = format!(
        "truncated: the file has {len} bytes, its header describes {}",
        8 + header.len() + 999999
    );
    assert!(
        err.contains("model.safetensors") && err.contains(&want),
        "{err}"
    );
}

#[test]
fn missing_config_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = err_of(dir.path());
    assert!(
        err.contains("config.json") && err.contains("not a model folder"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny_model(dir.path(), 1);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = Tokenizer::load(dir.path(), &w.config)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn corrupt_tokenizer_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny_model(dir.path(), 1);
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::load(dir.path(), &w.config)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("cannot load tokenizer"),
        "{err}"
    );
}

#[test]
fn non_llama_architecture_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace("\"LlamaForCausalLM\"", "\"GPT2LMHeadModel\"")
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    std::fs::write(&path, text).unwrap();
    let err = err_of(dir.path());
    assert!(
        err.contains("config.json") && err.contains("not LLaMA-like"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    rewrite(dir.path(), |n, data, shape| {
        if n == "model.layers.1.mlp.up_proj.weight" {
            let shape = vec![shape[1], shape[0]];
            return Some((
                Dtype::F32,
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
        Some((
            Dtype::F32,
            shape,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ))
    });
    let err = err_of(dir.path());
    assert!(
        err.contains(
            "model.layers.1.mlp.up_proj.weight has shape [32, 48], config.json implies [48, 32]"
        ),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    rewrite(dir.path(), |n, data, shape| {
        (n != "model.norm.weight").then(|| {
            (
                Dtype::F32,
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
    });
    let err = err_of(dir.path());
    assert!(err.contains("tensor model.norm.weight is missing"), "{err}");
}

#[test]
fn unsupported_dtype_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    rewrite(dir.path(), |n, data, shape| {
        if n == "model.norm.weight" {
            return Some((
                Dtype::I32,
                shape,
                data.iter()
                    .flat_map(|&x| (x as i32).to_le_bytes())
                    .collect(),
            ));
        }
        Some((
            Dtype::F32,
            shape,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ))
    });
    let err = err_of(dir.path());
    assert!(err.contains("model.norm.weight has dtype I32"), "{err}");
}

#[test]
fn a_tokenizer_larger_than_the_embeddings_is_reported() {
    // A tokenizer of another model: ids past the embedding rows would fail deep in a forward.
    let dir = tempfile::tempdir().unwrap();
    let mut w = write_tiny_model(dir.path(), 1);
    w.config.vocab_size = 100;
    let err = Tokenizer::load(dir.path(), &w.config)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("100 embedding rows"),
        "{err}"
    );
}

#[test]
fn an_empty_shard_index_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {}}"#,
    )
    .unwrap();
    let err = err_of(dir.path());
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("no files"),
        "{err}"
    );
}

#[test]
fn a_zero_rope_scaling_factor_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0});
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = err_of(dir.path());
    assert!(
        err.contains("config.json") && err.contains("factor 0 must be positive"),
        "{err}"
    );
}
