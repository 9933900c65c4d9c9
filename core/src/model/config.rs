//! `config.json` of a Hugging Face LLaMA-family checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

/// `bos_token_id` / `eos_token_id` are a number or a list of numbers (LLaMA-3.1 has several).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(t) => vec![*t],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// "llama3", "linear" or "default"; older configs call the field `type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}
fn one() -> f64 {
    1.0
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("invalid config.json: {e}")))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reject what the LLaMA forward cannot run, with the reason.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let llama_like = ["llama", "mistral"].contains(&self.model_type.as_str())
            && self
                .architectures
                .iter()
                .all(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !llama_like {
            return Err(Error::unsupported(
                path,
                format!(
                    "architecture '{}' ({}) is not LLaMA-like; ostquant runs LlamaForCausalLM checkpoints",
                    self.model_type,
                    self.architectures.join(", ")
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(Error::unsupported(
                path,
                format!("hidden_act '{}' (only silu)", self.hidden_act),
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err(Error::unsupported(path, "linear layers with bias"));
        }
        let fields = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.n_kv_heads()),
            ("head_dim", self.head_dim()),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(Error::format(path, format!("{name} is 0")));
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return Err(Error::format(
                path,
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads,
                    self.n_kv_heads()
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::format(path, "head_dim must be even for RoPE"));
        }
        if let Some(rs) = &self.rope_scaling {
            if !(rs.factor.is_finite() && rs.factor > 0.0) {
                return Err(Error::format(
                    path,
                    format!("rope_scaling factor {} must be positive", rs.factor),
                ));
            }
            if let (Some(lo), Some(hi)) = (rs.low_freq_factor, rs.high_freq_factor)
                && !(hi > lo && lo > 0.0)
            {
                return Err(Error::format(
                    path,
                    format!(
                        "rope_scaling needs 0 < low_freq_factor < high_freq_factor, not {lo} and {hi}"
                    ),
                ));
            }
            match rs.rope_type.as_str() {
                "default" | "linear" => {}
                "llama3" => {
                    if rs.low_freq_factor.is_none()
                        || rs.high_freq_factor.is_none()
                        || rs.original_max_position_embeddings.is_none()
                    {
                        return Err(Error::format(
                            path,
                            "llama3 rope_scaling needs low_freq_factor, high_freq_factor and original_max_position_embeddings",
                        ));
                    }
                }
                other => {
                    return Err(Error::unsupported(
                        path,
                        format!("rope_scaling type '{other}' (supported: default, linear, llama3)"),
                    ));
                }
            }
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(Error::format(
                path,
                "rms_norm_eps and rope_theta must be positive",
            ));
        }
        Ok(())
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    /// (out, in) of one layer's linears: q, k, v, o, gate, up, down.
    pub fn linear_shapes(&self) -> [(usize, usize); 7] {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.n_kv_heads() * hd);
        [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// RoPE inverse frequencies (one per pair of head dimensions), with the configured scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        let Some(rs) = &self.rope_scaling else {
            return base;
        };
        match rs.rope_type.as_str() {
            "linear" => base.iter().map(|f| f / rs.factor).collect(),
            "llama3" => {
                let (low, high) = (
                    rs.low_freq_factor.unwrap_or(1.0),
                    rs.high_freq_factor.unwrap_or(4.0),
                );
                let old_len = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wavelen, high_wavelen) = (old_len / low, old_len / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / rs.factor
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / rs.factor + smooth * f
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }

    pub fn n_params(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let attn = d * hd * (self.num_attention_heads * 2 + self.n_kv_heads() * 2);
        let layer = attn + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }
}
