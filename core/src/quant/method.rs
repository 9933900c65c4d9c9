//! Quantization settings (`W4A4KV4`, …) and the methods that turn a full-precision model into a
//! fake-quantized one: weights edited on the host, activations and KV quantized in the forward.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::model::llama::ForwardOptions;
use crate::quant::quantizer::{QuantSpec, fake_quant_matrix};
use crate::transform::fuse::{fold_norms, fuse_down_hadamard, rotate_residual, rotate_value_heads};
use crate::transform::hadamard::{Hadamard, random_hadamard};

/// Bit widths of weights, activations and the KV cache; 16 means not quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bits {
    pub w: u32,
    pub a: u32,
    pub kv: u32,
}

impl Bits {
    pub const FP: Bits = Bits {
        w: 16,
        a: 16,
        kv: 16,
    };
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "W{}A{}KV{}", self.w, self.a, self.kv)
    }
}

impl FromStr for Bits {
    type Err = String;
    /// `W4A16KV16`, `W4A4KV4`, `W8A8KV8`, `W3A16` (KV defaults to 16).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}' is not a bit setting like W4A16KV16, W4A4KV4 or W3A16");
        let u = s.to_ascii_uppercase();
        let rest = u.strip_prefix('W').ok_or_else(bad)?;
        let (w, rest) = rest.split_once('A').ok_or_else(bad)?;
        let (a, kv) = match rest.split_once("KV") {
            Some((a, kv)) => (a, kv),
            None => (rest, "16"),
        };
        let parse = |x: &str| -> std::result::Result<u32, String> {
            let b: u32 = x.parse().map_err(|_| bad())?;
            if (2..=8).contains(&b) || b == 16 {
                Ok(b)
            } else {
                Err(format!("{b} bits: use 2 to 8, or 16 for none"))
            }
        };
        Ok(Bits {
            w: parse(w)?,
            a: parse(a)?,
            kv: parse(kv)?,
        })
    }
}

/// The methods the lab compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Full precision: nothing is quantized, whatever the bits say.
    Fp,
    /// Round-to-nearest with per-channel MSE-searched weight scales.
    Rtn,
    /// QuaRot: random Hadamard residual rotation, Hadamard value heads, online Hadamards on the
    /// down_proj input and on Q/K; RTN weights.
    Quarot,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Fp, Method::Rtn, Method::Quarot];
    pub fn name(self) -> &'static str {
        match self {
            Method::Fp => "fp",
            Method::Rtn => "rtn",
            Method::Quarot => "quarot",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                format!("unknown method '{s}' (available: {})", names.join(", "))
            })
    }
}

/// The seed of QuaRot's random Hadamard rotation.
pub const QUAROT_SEED: u64 = 0;

/// Apply `method` at `bits` to full-precision weights: the edited weights (fake-quantized where
/// weights are quantized) and the forward options that go with them.
pub fn prepare(
    w: &LlamaWeights,
    method: Method,
    bits: Bits,
) -> Result<(LlamaWeights, ForwardOptions)> {
    let mut w = w.clone();
    let mut opts = ForwardOptions::default();
    if method == Method::Fp {
        return Ok((w, opts));
    }
    if method == Method::Quarot {
        let c = w.config.clone();
        fold_norms(&mut w);
        rotate_residual(&mut w, &random_hadamard(c.hidden_size, QUAROT_SEED)?);
        rotate_value_heads(&mut w, &Hadamard::new(c.head_dim())?.matrix());
        fuse_down_hadamard(&mut w, &Hadamard::new(c.intermediate_size)?);
        opts.down_hadamard = true;
        opts.qk_hadamard = true;
    }
    if bits.w < 16 {
        quantize_weights_rtn(&mut w, bits.w);
    }
    if bits.a < 16 {
        opts.act = Some(QuantSpec::asym(bits.a));
    }
    if bits.kv < 16 {
        opts.kv = Some(QuantSpec::asym(bits.kv));
    }
    Ok((w, opts))
}

/// Fake-quantize every linear weight (not embeddings, norms or lm_head) per output channel,
/// symmetric, with the MSE clip search (error power 2.4, as GPTQ's scale search).
pub fn quantize_weights_rtn(w: &mut LlamaWeights, bits: u32) {
    let spec = QuantSpec::sym(bits);
    for l in &mut w.layers {
        for m in [
            &mut l.wq,
            &mut l.wk,
            &mut l.wv,
            &mut l.wo,
            &mut l.w_gate,
            &mut l.w_up,
            &mut l.w_down,
        ] {
            quantize_rows(m, &spec);
        }
    }
}

fn quantize_rows(m: &mut HostTensor, spec: &QuantSpec) {
    let cols = m.shape[1];
    fake_quant_matrix(&mut m.data, cols, spec, Some(2.4));
}
