//! The quantized model folder (DESIGN.md): `config.json`, the tokenizer files, a JSON header
//! `quantization.json`, and `model.safetensors` holding, for every linear layer `X`:
//!
//! - `X.qweight`: U32 [out, in/8], eight 4-bit codes per little-endian word, column 8·w + j
//!   of the row in bits 4j..4j+3 of word w. A code c stands for the integer c + qmin
//!   (qmin = −8 symmetric, 0 asymmetric), so the weight is (c + qmin − zero)·scale.
//! - `X.scales`: F16 [out, in/group]; `X.zeros`: F16 [out, in/group] (asymmetric only).
//!
//! Embeddings and lm_head are F16, norm weights F32. The header says which online Hadamards
//! and activation / KV quantizers the runtime must apply. The folder is written to a temporary
//! sibling and renamed, so a failed or cancelled export leaves nothing behind.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::checkpoint::{HostTensor, LayerWeights, LlamaWeights, layer_tensor_names};
use super::output;
use crate::error::{Error, Result};
use crate::model::llama::ForwardOptions;
use crate::quant::quantizer::{Grid, LayerGrids, QuantSpec};

pub const HEADER: &str = "quantization.json";
pub const FORMAT: &str = "ostquant-int4";

/// `quantization.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// The method and bit setting that produced the folder, e.g. "ostquant", "W4A4KV4".
    pub method: String,
    pub bits: String,
    /// The weight quantizer (None: the linear weights are stored unquantized, F16).
    pub weight: Option<QuantSpec>,
    /// Online transforms and activation / KV quantizers of the forward.
    pub forward: ForwardSpec,
    /// Anything else worth keeping: calibration settings, losses, timings.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// The serializable part of [`ForwardOptions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardSpec {
    pub down_hadamard: bool,
    pub qk_hadamard: bool,
    pub act: Option<QuantSpec>,
    pub kv: Option<QuantSpec>,
}

impl From<&ForwardOptions> for ForwardSpec {
    fn from(o: &ForwardOptions) -> Self {
        ForwardSpec {
            down_hadamard: o.down_hadamard,
            qk_hadamard: o.qk_hadamard,
            act: o.act,
            kv: o.kv,
        }
    }
}

impl ForwardSpec {
    pub fn options(&self) -> ForwardOptions {
        ForwardOptions {
            down_hadamard: self.down_hadamard,
            qk_hadamard: self.qk_hadamard,
            act: self.act,
            act_skip: Vec::new(),
            kv: self.kv,
        }
    }
}

/// Whether `dir` holds a quantized model.
pub fn is_quantized(dir: &Path) -> bool {
    dir.join(HEADER).is_file()
}

/// The model folder a quantized folder was made from, as its header records it (`details.source`).
pub fn source_model(dir: &Path) -> Option<std::path::PathBuf> {
    let header = read_header(dir).ok()?;
    header.details.get("source")?.as_str().map(Into::into)
}

const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

fn layer_mats(l: &LayerWeights) -> [&HostTensor; 7] {
    [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
}

/// Names of the seven linear layers of block `i` without the `.weight` suffix.
fn linear_names(i: usize) -> [String; 7] {
    let n = layer_tensor_names(i);
    let strip = |s: &String| s.trim_end_matches(".weight").to_string();
    [
        strip(&n[1]),
        strip(&n[2]),
        strip(&n[3]),
        strip(&n[4]),
        strip(&n[6]),
        strip(&n[7]),
        strip(&n[8]),
    ]
}

/// An owned tensor for the safetensors writer.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f16_blob(shape: Vec<usize>, v: impl Iterator<Item = f32>) -> Blob {
    let bytes = v
        .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    Blob {
        dtype: Dtype::F16,
        shape,
        bytes,
    }
}

fn f32_blob(t: &HostTensor) -> Blob {
    Blob {
        dtype: Dtype::F32,
        shape: t.shape.clone(),
        bytes: bytemuck::cast_slice(&t.data).to_vec(),
    }
}

/// Pack the rows of `w` [out, in] on their grids (row-major [out, groups]) into 4-bit codes.
fn pack(w: &HostTensor, grids: &[Grid], spec: &QuantSpec) -> Result<(Blob, Blob, Option<Blob>)> {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let group = spec.group.unwrap_or(cols);
    let groups = cols / group;
    if spec.bits != 4 || !cols.is_multiple_of(8) || grids.len() != rows * groups {
        return Err(Error::other(format!(
            "cannot pack a {rows}×{cols} weight at {} bits into int4 (needs 4 bits and a width divisible by 8)",
            spec.bits
        )));
    }
    let qmin = spec.qmin() as i32;
    let mut words = vec![0u32; rows * cols / 8];
    for r in 0..rows {
        for c in 0..cols {
            let g = &grids[r * groups + c / group];
            let code = (g.code(spec, w.data[r * cols + c]) - qmin) as u32;
            words[(r * cols + c) / 8] |= (code & 0xF) << (4 * (c % 8));
        }
    }
    let qweight = Blob {
        dtype: Dtype::U32,
        shape: vec![rows, cols / 8],
        bytes: bytemuck::cast_slice(&words).to_vec(),
    };
    let scales = f16_blob(vec![rows, groups], grids.iter().map(|g| g.scale));
    let zeros = (!spec.sym).then(|| f16_blob(vec![rows, groups], grids.iter().map(|g| g.zero)));
    Ok((qweight, scales, zeros))
}

/// Write the quantized folder `out` from fused, fake-quantized weights `w` and their `grids`
/// (None when the weights are not quantized), copying the tokenizer files from `src`.
pub fn write(
    out: &Path,
    src: &Path,
    w: &LlamaWeights,
    grids: Option<&[LayerGrids]>,
    header: &Header,
) -> Result<()> {
    let mut blobs: Vec<(String, Blob)> = Vec::new();
    let embed_like = |t: &HostTensor| f16_blob(t.shape.clone(), t.data.iter().copied());
    blobs.push(("model.embed_tokens.weight".into(), embed_like(&w.embed)));
    for (i, l) in w.layers.iter().enumerate() {
        let names = layer_tensor_names(i);
        blobs.push((names[0].clone(), f32_blob(&l.attn_norm)));
        blobs.push((names[5].clone(), f32_blob(&l.ffn_norm)));
        for (k, (name, m)) in linear_names(i).iter().zip(layer_mats(l)).enumerate() {
            match (grids, &header.weight) {
                (Some(g), Some(spec)) => {
                    let (q, s, z) = pack(m, &g[i][k], spec)
                        .map_err(|e| Error::other(format!("{name}: {e}")))?;
                    blobs.push((format!("{name}.qweight"), q));
                    blobs.push((format!("{name}.scales"), s));
                    if let Some(z) = z {
                        blobs.push((format!("{name}.zeros"), z));
                    }
                }
                _ => blobs.push((format!("{name}.weight"), embed_like(m))),
            }
        }
    }
    blobs.push(("model.norm.weight".into(), f32_blob(&w.norm)));
    if let Some(h) = &w.lm_head {
        blobs.push(("lm_head.weight".into(), embed_like(h)));
    }

    check_out(out)?;
    let tmp = output::staging_dir(out)?;
    let result = (|| -> Result<()> {
        let views = blobs
            .iter()
            .map(|(n, b)| {
                safetensors::tensor::TensorView::new(b.dtype, b.shape.clone(), &b.bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::other(format!("tensor {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let st = tmp.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &st)
            .map_err(|e| Error::format(&st, format!("writing safetensors: {e}")))?;
        let mut config = w.config.clone();
        config.tie_word_embeddings = w.lm_head.is_none();
        config.torch_dtype = Some("float16".into());
        let cfg = tmp.join("config.json");
        std::fs::write(
            &cfg,
            serde_json::to_string_pretty(&config).expect("config serializes"),
        )
        .map_err(|e| Error::io(&cfg, e))?;
        let hdr = tmp.join(HEADER);
        std::fs::write(
            &hdr,
            serde_json::to_string_pretty(header).expect("header serializes"),
        )
        .map_err(|e| Error::io(&hdr, e))?;
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(f)).map_err(|e| Error::io(&from, e))?;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => output::install(&tmp, out, Some(HEADER)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Check that `out` may receive a quantized folder: absent, empty, or a quantized folder
/// (which [`write`] replaces).
pub fn check_out(out: &Path) -> Result<()> {
    output::check_target(out, Some(HEADER))
}

/// Read a quantized folder's header.
pub fn read_header(dir: &Path) -> Result<Header> {
    let path = dir.join(HEADER);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let h: Header = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("invalid quantization header: {e}")))?;
    if h.format != FORMAT || h.version != 1 {
        return Err(Error::unsupported(
            &path,
            format!(
                "format {} version {} (this build reads {FORMAT} version 1)",
                h.format, h.version
            ),
        ));
    }
    // The weights are packed 4-bit codes, 8 to a word: a group must hold whole words.
    if let Some(w) = &h.weight
        && (w.bits != 4 || w.group.is_some_and(|g| g == 0 || !g.is_multiple_of(8)))
    {
        return Err(Error::format(
            &path,
            format!(
                "weight quantizer {} bits, group {:?}: this format stores 4-bit weights in \
                 groups of a multiple of 8 columns",
                w.bits, w.group
            ),
        ));
    }
    for (what, spec) in [("act", h.forward.act), ("kv", h.forward.kv)] {
        if let Some(q) = spec
            && (!(2..=8).contains(&q.bits) || q.group == Some(0))
        {
            return Err(Error::format(
                &path,
                format!(
                    "forward.{what}: {} bits, group {:?} (expected 2 to 8 bits and a group of \
                     at least 1)",
                    q.bits, q.group
                ),
            ));
        }
    }
    Ok(h)
}

/// Unpack the codes of one linear layer back to f32 weights [rows, cols].
pub fn unpack(
    words: &[u32],
    scales: &[f32],
    zeros: Option<&[f32]>,
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
) -> Vec<f32> {
    let group = spec.group.unwrap_or(cols);
    let groups = cols / group;
    let qmin = spec.qmin() as i32;
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let code = (words[(r * cols + c) / 8] >> (4 * (c % 8))) & 0xF;
            let g = r * groups + c / group;
            let grid = Grid {
                scale: scales[g],
                zero: zeros.map_or(0.0, |z| z[g]),
            };
            out[r * cols + c] = grid.value(code as i32 + qmin);
        }
    }
    out
}
