//! GGUF → Hugging Face folder: config.json, model.safetensors (f32, dequantized exactly),
//! tokenizer.json rebuilt from the embedded byte-level BPE vocabulary, tokenizer_config.json with
//! the chat template. Written into a temporary folder and renamed, so a failed import leaves
//! nothing behind.

use std::path::Path;

use serde_json::{Value as Json, json};

use super::checkpoint::{HostTensor, LayerWeights, LlamaWeights};
use super::config::{LlamaConfig, RopeScaling, TokenIds};
use super::gguf::{GgufFile, Value};
use super::output;
use crate::error::{Error, Result};

/// The ChatML template SmolLM2 ships; used when a GGUF carries no template of its own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Import `gguf` into the folder `out`, which must not exist yet or be empty.
pub fn import_gguf(gguf: &Path, out: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    output::check_target(out, None)?;
    let file = GgufFile::open(gguf)?;
    let config = gguf_config(&file)?;
    let tokenizer = gguf_tokenizer(&file)?;
    let tok_config = tokenizer_config(&file)?;
    let weights = gguf_weights(&file, config.clone(), progress)?;

    let tmp = output::staging_dir(out)?;
    let write = || -> Result<()> {
        write_json(
            &tmp.join("config.json"),
            &serde_json::to_value(&config).expect("config serializes"),
        )?;
        write_json(&tmp.join("tokenizer.json"), &tokenizer)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok_config)?;
        write_json(
            &tmp.join("generation_config.json"),
            &json!({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}),
        )?;
        weights.save_safetensors(&tmp.join("model.safetensors"))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    output::install(&tmp, out, None)
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON serializes");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn meta<'a>(f: &'a GgufFile, key: &str) -> Result<&'a Value> {
    f.get(key)
        .ok_or_else(|| Error::format(&f.path, format!("metadata key {key} is missing")))
}
fn meta_u64(f: &GgufFile, key: &str) -> Result<u64> {
    meta(f, key)?
        .as_u64()
        .ok_or_else(|| Error::format(&f.path, format!("metadata key {key} is not an integer")))
}
fn meta_f64(f: &GgufFile, key: &str) -> Option<f64> {
    f.get(key).and_then(Value::as_f64)
}

/// config.json from the `llama.*` metadata.
pub fn gguf_config(f: &GgufFile) -> Result<LlamaConfig> {
    let arch = meta(f, "general.architecture")?.as_str().unwrap_or("");
    if arch != "llama" {
        return Err(Error::unsupported(
            &f.path,
            format!("architecture '{arch}' is not LLaMA (general.architecture must be 'llama')"),
        ));
    }
    if f.tensor("rope_freqs.weight").is_some() {
        return Err(Error::unsupported(
            &f.path,
            "per-frequency RoPE factors (rope_freqs.weight) in GGUF; import the Hugging Face checkpoint instead",
        ));
    }
    let n_heads = meta_u64(f, "llama.attention.head_count")? as usize;
    let hidden = meta_u64(f, "llama.embedding_length")? as usize;
    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(&f.path, "tensor token_embd.weight is missing"))?;
    let vocab = embd.shape()[0];
    let tied = f.tensor("output.weight").is_none();
    let head_dim = f
        .get("llama.rope.dimension_count")
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(hidden / n_heads.max(1));
    let rope_scaling = match f.get("llama.rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling {
            rope_type: "linear".into(),
            factor: meta_f64(f, "llama.rope.scaling.factor").unwrap_or(1.0),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        }),
        Some(other) => {
            return Err(Error::unsupported(
                &f.path,
                format!("rope scaling type '{other}'"),
            ));
        }
    };
    let id = |k: &str| {
        f.get(k)
            .and_then(Value::as_u64)
            .map(|v| TokenIds::One(v as u32))
    };
    let config = LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_u64(f, "llama.feed_forward_length")? as usize,
        num_hidden_layers: meta_u64(f, "llama.block_count")? as usize,
        num_attention_heads: n_heads,
        num_key_value_heads: Some(
            f.get("llama.attention.head_count_kv")
                .and_then(Value::as_u64)
                .unwrap_or(n_heads as u64) as usize,
        ),
        head_dim: Some(head_dim),
        rms_norm_eps: meta_f64(f, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: meta_f64(f, "llama.rope.freq_base").unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: meta_u64(f, "llama.context_length").unwrap_or(2048) as usize,
        tie_word_embeddings: tied,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        torch_dtype: Some("float32".into()),
    };
    config.validate(&f.path)?;
    Ok(config)
}

/// llama.cpp stores Q and K with the rows of each head interleaved for its RoPE ([h, i, 2]
/// instead of Hugging Face's [h, 2, i]). Undo it: HF row h·hd + p·hd/2 + i is GGUF row
/// h·hd + 2i + p.
pub fn unpermute_qk(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    remap_qk_rows(w, n_heads, cols, |hf, gguf| (hf, gguf))
}

/// The inverse of [`unpermute_qk`]: what llama.cpp's converter does to a Hugging Face Q/K.
pub fn permute_qk(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    remap_qk_rows(w, n_heads, cols, |hf, gguf| (gguf, hf))
}

/// Copy rows between the two layouts; `pick(hf_row, gguf_row)` returns (destination, source).
fn remap_qk_rows(
    w: &[f32],
    n_heads: usize,
    cols: usize,
    pick: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let hd = w.len() / cols / n_heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for p in 0..2 {
            for i in 0..half {
                let (dst, src) = pick(h * hd + p * half + i, h * hd + 2 * i + p);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_weights(
    f: &GgufFile,
    config: LlamaConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LlamaWeights> {
    let total = f.tensors.len();
    let mut done = 0;
    let mut load = |name: &str, shape: Vec<usize>| -> Result<HostTensor> {
        let info = f
            .tensor(name)
            .ok_or_else(|| Error::format(&f.path, format!("tensor {name} is missing")))?;
        if info.shape() != shape {
            return Err(Error::format(
                &f.path,
                format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    info.shape(),
                    shape
                ),
            ));
        }
        let data = f.tensor_f32(info)?;
        done += 1;
        progress(done, total);
        Ok(HostTensor::new(shape, data))
    };
    let c = &config;
    let (d, ff, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (nq, nkv) = (c.num_attention_heads, c.n_kv_heads());
    let embed = load("token_embd.weight", vec![c.vocab_size, d])?;
    let mut layers = Vec::new(); // not sized from the header: a bad count must fail, not abort
    for i in 0..c.num_hidden_layers {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        let mut wq = load(&b("attn_q"), vec![nq * hd, d])?;
        wq.data = unpermute_qk(&wq.data, nq, d);
        let mut wk = load(&b("attn_k"), vec![nkv * hd, d])?;
        wk.data = unpermute_qk(&wk.data, nkv, d);
        layers.push(LayerWeights {
            attn_norm: load(&b("attn_norm"), vec![d])?,
            wq,
            wk,
            wv: load(&b("attn_v"), vec![nkv * hd, d])?,
            wo: load(&b("attn_output"), vec![d, nq * hd])?,
            ffn_norm: load(&b("ffn_norm"), vec![d])?,
            w_gate: load(&b("ffn_gate"), vec![ff, d])?,
            w_up: load(&b("ffn_up"), vec![ff, d])?,
            w_down: load(&b("ffn_down"), vec![d, ff])?,
        });
    }
    let norm = load("output_norm.weight", vec![d])?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(load("output.weight", vec![c.vocab_size, d])?)
    };
    Ok(LlamaWeights {
        config,
        embed,
        layers,
        norm,
        lm_head,
    })
}

fn string_array<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    meta(f, key)?
        .as_array()
        .ok_or_else(|| Error::format(&f.path, format!("{key} is not an array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| Error::format(&f.path, format!("{key} holds a non-string")))
        })
        .collect()
}

/// tokenizer.json for the `tokenizers` crate, from the embedded GPT-2 style BPE.
pub fn gguf_tokenizer(f: &GgufFile) -> Result<Json> {
    let model = meta(f, "tokenizer.ggml.model")?.as_str().unwrap_or("");
    if model != "gpt2" {
        return Err(Error::unsupported(
            &f.path,
            format!("tokenizer model '{model}' (only byte-level BPE, 'gpt2', is imported)"),
        ));
    }
    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let merges = string_array(f, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match f.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                Error::format(
                    &f.path,
                    format!("merge '{m}' is not two tokens separated by a space"),
                )
            })?;
            Ok(json!([a, b]))
        })
        .collect::<Result<_>>()?;
    // Control (3) and user-defined (4) tokens are matched whole, before BPE.
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
        .map(|(i, (t, ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == 3})
        })
        .collect();
    let pre = f
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // SmolLM splits every digit on its own, then applies the GPT-2 pattern.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "gpt2" | "default" => byte_level,
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        other => {
            return Err(Error::unsupported(
                &f.path,
                format!("pre-tokenizer '{other}'"),
            ));
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

/// tokenizer_config.json: special tokens, whether BOS is added, and the chat template.
pub fn tokenizer_config(f: &GgufFile) -> Result<Json> {
    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let tok = |key: &str| {
        f.get(key)
            .and_then(Value::as_u64)
            .and_then(|i| tokens.get(i as usize))
            .map(|s| s.to_string())
    };
    let add_bos = match f.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => false,
    };
    let template = f
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .unwrap_or(CHATML_TEMPLATE);
    Ok(json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
        "model_max_length": meta_u64(f, "llama.context_length").unwrap_or(2048),
        "chat_template": template,
        "clean_up_tokenization_spaces": false,
    }))
}
