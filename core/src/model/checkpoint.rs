//! Weights of a Hugging Face LLaMA folder: single or sharded safetensors (f32/f16/bf16),
//! memory-mapped, checked against config.json, held on the host in f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::quant::quantizer::QuantSpec;

/// A dense row-major f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        HostTensor { shape, data }
    }
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: HostTensor,
    pub wq: HostTensor,
    pub wk: HostTensor,
    pub wv: HostTensor,
    pub wo: HostTensor,
    pub ffn_norm: HostTensor,
    pub w_gate: HostTensor,
    pub w_up: HostTensor,
    pub w_down: HostTensor,
}

/// All weights of a LLaMA model, in PyTorch layout (linear weights are [out, in]).
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    pub embed: HostTensor,
    pub layers: Vec<LayerWeights>,
    pub norm: HostTensor,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<HostTensor>,
}

/// How many tensors of each dtype the model folder `dir` stores (for the overview).
pub fn stored_dtypes(dir: &Path) -> Result<BTreeMap<String, usize>> {
    Shards::open(dir)?.dtype_counts()
}

/// Parse the safetensors file `path` (its bytes): errors name the file, and a file shorter
/// than its header describes (a copy or download cut short) says so.
pub fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        let why = match described_len(bytes) {
            Some(want) if want > bytes.len() => format!(
                "truncated: the file has {} bytes, its header describes {want}",
                bytes.len()
            ),
            _ => format!("not a valid safetensors file: {e}"),
        };
        Error::format(path, why)
    })
}

/// The length a safetensors file's header describes (8 bytes of header size, the JSON header,
/// then the data up to the last tensor's end), where the header can be read.
fn described_len(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header_end = 8usize.checked_add(n)?;
    let Some(header) = bytes.get(8..header_end) else {
        // The header itself is cut: at least that much was meant to be there.
        return Some(header_end);
    };
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let data_end = header
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0) as usize;
    header_end.checked_add(data_end)
}

/// Hugging Face tensor names of one layer, in [`LayerWeights`] field order.
pub fn layer_tensor_names(i: usize) -> [String; 9] {
    let p = format!("model.layers.{i}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

/// Shapes the config implies for one layer, in [`LayerWeights`] field order.
fn layer_shapes(c: &LlamaConfig) -> [Vec<usize>; 9] {
    let d = c.hidden_size;
    let [q, k, v, o, gate, up, down] = c.linear_shapes().map(|(r, k)| vec![r, k]);
    [vec![d], q, k, v, o, vec![d], gate, up, down]
}

impl LlamaWeights {
    /// Load `config.json` and the safetensors of a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        if dir.is_dir() && !dir.join("config.json").exists() {
            return Err(Error::format(
                dir,
                "not a model folder: it has no config.json (a Hugging Face LLaMA folder holds config.json, *.safetensors and tokenizer.json)",
            ));
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let shards = Shards::open(dir)?;
        let weight_spec = if super::qformat::is_quantized(dir) {
            super::qformat::read_header(dir)?.weight
        } else {
            None
        };
        let c = &config;
        let embed = shards.get("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let mut layers = Vec::new(); // not sized from config.json: a bad count must fail, not abort
        for i in 0..c.num_hidden_layers {
            let names = layer_tensor_names(i);
            let shapes = layer_shapes(c);
            let mut t = names
                .iter()
                .zip(shapes.iter())
                .map(|(n, s)| match (&weight_spec, s.len()) {
                    (Some(spec), 2) => shards.get_int4(n, s, spec),
                    _ => shards.get(n, s),
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let mut next = || t.next().expect("nine tensors per layer");
            layers.push(LayerWeights {
                attn_norm: next(),
                wq: next(),
                wk: next(),
                wv: next(),
                wo: next(),
                ffn_norm: next(),
                w_gate: next(),
                w_up: next(),
                w_down: next(),
            });
        }
        let norm = shards.get("model.norm.weight", &[c.hidden_size])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(shards.get("lm_head.weight", &[c.vocab_size, c.hidden_size])?)
        };
        Ok(LlamaWeights {
            config,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Every tensor under its Hugging Face name.
    pub fn named_tensors(&self) -> Vec<(String, &HostTensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            let tensors = [
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.ffn_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ];
            out.extend(layer_tensor_names(i).into_iter().zip(tensors));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// Write every tensor as f32 into one safetensors file.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let named = self.named_tensors();
        let views = named
            .iter()
            .map(|(n, t)| {
                let view = safetensors::tensor::TensorView::new(
                    Dtype::F32,
                    t.shape.clone(),
                    bytemuck::cast_slice(&t.data),
                )
                .map_err(|e| Error::other(format!("tensor {n}: {e}")))?;
                Ok((n.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), path)
            .map_err(|e| Error::format(path, format!("writing safetensors: {e}")))
    }
}

/// The memory-mapped safetensors files of a folder and which file holds each tensor.
struct Shards {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    index: BTreeMap<String, usize>,
}

impl Shards {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "no weight_map object"))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            if files.is_empty() {
                return Err(Error::format(&index_path, "weight_map lists no files"));
            }
            files
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in names {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint nobody writes while it is loaded.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = parse_safetensors(&path, &map)?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(Shards { files, index })
    }

    /// How many tensors of each dtype the shards hold, e.g. {"BF16": 272}.
    fn dtype_counts(&self) -> Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for (path, map) in &self.files {
            let st = parse_safetensors(path, map)?;
            for (_, t) in st.tensors() {
                *counts.entry(format!("{:?}", t.dtype())).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// Read a linear weight `….weight` of `shape` stored as int4 codes (`….qweight`, `….scales`
    /// and, asymmetric, `….zeros`; see `qformat`), dequantized to f32.
    fn get_int4(&self, name: &str, shape: &[usize], spec: &QuantSpec) -> Result<HostTensor> {
        let base = name.trim_end_matches(".weight");
        let (rows, cols) = (shape[0], shape[1]);
        let group = spec.group.unwrap_or(cols);
        if group == 0 || !cols.is_multiple_of(group) || !cols.is_multiple_of(8) {
            let dir = self.files[0].0.parent().unwrap_or(Path::new("."));
            return Err(Error::format(
                dir.join(super::qformat::HEADER),
                format!("weight groups of {group} do not split the {cols} columns of {name}"),
            ));
        }
        let groups = cols / group;
        let words = self.get_raw(&format!("{base}.qweight"), &[rows, cols / 8], Dtype::U32)?;
        let words: Vec<u32> = words
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let scales = self.get(&format!("{base}.scales"), &[rows, groups])?.data;
        let zeros = if spec.sym {
            None
        } else {
            Some(self.get(&format!("{base}.zeros"), &[rows, groups])?.data)
        };
        let data = super::qformat::unpack(&words, &scales, zeros.as_deref(), rows, cols, spec);
        Ok(HostTensor::new(shape.to_vec(), data))
    }

    /// The raw bytes of a tensor of the given shape and dtype.
    fn get_raw(&self, name: &str, shape: &[usize], dtype: Dtype) -> Result<Vec<u8>> {
        let Some(&i) = self.index.get(name) else {
            let dir = self.files[0].0.parent().unwrap_or(Path::new("."));
            return Err(Error::format(dir, format!("tensor {name} is missing")));
        };
        let (path, map) = &self.files[i];
        let st = parse_safetensors(path, map)?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        if view.shape() != shape || view.dtype() != dtype {
            return Err(Error::format(
                path,
                format!(
                    "tensor {name} is {:?} {:?}, expected {dtype:?} {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        Ok(view.data().to_vec())
    }

    /// Read one tensor as f32, checking it exists and has the expected shape.
    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let Some(&i) = self.index.get(name) else {
            let dir = self.files[0].0.parent().unwrap_or(Path::new("."));
            return Err(Error::format(dir, format!("tensor {name} is missing")));
        };
        let (path, map) = &self.files[i];
        let st = parse_safetensors(path, map)?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        if view.shape() != shape {
            return Err(Error::format(
                path,
                format!(
                    "tensor {name} has shape {:?}, config.json implies {:?}",
                    view.shape(),
                    shape
                ),
            ));
        }
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::unsupported(
                    path,
                    format!("tensor {name} has dtype {other:?} (supported: F32, F16, BF16)"),
                ));
            }
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
}
