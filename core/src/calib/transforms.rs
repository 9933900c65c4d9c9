//! The learned transforms of OSTQuant (SPEC §2.1–2.3): what is trained, how it starts (WOMI or
//! a random Hadamard, §4), how it is saved, and the final fusion into the weights in f64.
//!
//! Conventions as in `transform::fuse`: row vectors, y = x·Wᵀ with W [out, in]; the residual
//! stream is rotated as x' = x·R. The three non-equivalences of the official code (§2.4) are
//! fixed: S_qk is tied per RoPE pair (one value per frequency, used on dims i and i + hd/2),
//! S_ov scales W_o's columns, and D_ud is applied to W_down before the down Hadamard.

use std::path::Path;

use faer::Mat;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::model::config::LlamaConfig;
use crate::model::llama::ForwardOptions;
use crate::transform::fuse::fold_norms;
use crate::transform::hadamard::{Hadamard, random_hadamard};

/// Sizes of the model the transforms belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    pub d: usize,
    pub hd: usize,
    pub nq: usize,
    pub nkv: usize,
    pub dff: usize,
    pub layers: usize,
}

impl Shapes {
    pub fn of(c: &LlamaConfig) -> Self {
        Shapes {
            d: c.hidden_size,
            hd: c.head_dim(),
            nq: c.num_attention_heads,
            nkv: c.n_kv_heads(),
            dff: c.intermediate_size,
            layers: c.num_hidden_layers,
        }
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.nq / self.nkv
    }
}

/// One block's transforms; rotations row-major, all in f64 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTransforms {
    /// S_attn [d]: the attention norm's output is divided by it, q/k/v's columns multiplied.
    pub s_attn: Vec<f64>,
    /// S_ffn [d]: the same for the MLP norm and gate/up.
    pub s_ffn: Vec<f64>,
    /// S_qk [nkv·hd/2]: K's output channels × s, Q's ÷ s (tied per RoPE pair).
    pub s_qk: Vec<f64>,
    /// S_ov [nkv·hd]: V's output channels ÷ s, W_o's matching input columns × s.
    pub s_ov: Vec<f64>,
    /// R_ov [nkv, hd, hd]: one rotation per KV head, v_h ← v_h·R_h.
    pub r_ov: Vec<f64>,
    /// S_u|d [dff]: up's output ÷ s, W_down's input columns × s.
    pub s_ud: Vec<f64>,
}

/// Every learned transform of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Transforms {
    pub shapes: Shapes,
    /// R_res [d, d], shared by all layers.
    pub r_res: Vec<f64>,
    pub layers: Vec<LayerTransforms>,
}

/// How the rotations start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// Weight outlier minimisation: principal axes of the weights, then a random Hadamard.
    Womi,
    /// A random Hadamard (QuaRot's rotation).
    Hadamard,
    /// No rotation at the start (for ablations and tests).
    Identity,
}

impl std::str::FromStr for Init {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "womi" => Ok(Init::Womi),
            "hadamard" | "random-hadamard" => Ok(Init::Hadamard),
            "identity" => Ok(Init::Identity),
            _ => Err(format!(
                "unknown init '{s}' (expected womi, hadamard or identity)"
            )),
        }
    }
}

/// Seed of the random Hadamards of the initialisation.
pub const INIT_SEED: u64 = 0;

fn identity(n: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    (0..n).for_each(|i| m[i * n + i] = 1.0);
    m
}

impl Transforms {
    /// Identity rotations and unit scales: the transforms that change nothing.
    pub fn identity(shapes: Shapes) -> Self {
        let s = shapes;
        let layer = LayerTransforms {
            s_attn: vec![1.0; s.d],
            s_ffn: vec![1.0; s.d],
            s_qk: vec![1.0; s.nkv * s.hd / 2],
            s_ov: vec![1.0; s.nkv * s.hd],
            r_ov: (0..s.nkv).flat_map(|_| identity(s.hd)).collect(),
            s_ud: vec![1.0; s.dff],
        };
        Transforms {
            shapes,
            r_res: identity(s.d),
            layers: vec![layer; s.layers],
        }
    }

    /// Unit scales and rotations initialised by `init` from the (original) weights.
    pub fn init(w: &LlamaWeights, init: Init) -> Result<Self> {
        let shapes = Shapes::of(&w.config);
        let mut t = Transforms::identity(shapes);
        let (d, hd) = (shapes.d, shapes.hd);
        match init {
            Init::Identity => {}
            Init::Hadamard => {
                t.r_res = random_hadamard(d, INIT_SEED)?;
                let r = random_hadamard(hd, INIT_SEED + 1)?;
                for l in &mut t.layers {
                    l.r_ov = (0..shapes.nkv).flat_map(|_| r.clone()).collect();
                }
            }
            Init::Womi => {
                let mut folded = w.clone();
                fold_norms(&mut folded);
                t.r_res = womi_residual(&folded)?;
                let h = random_hadamard(hd, INIT_SEED + 1)?;
                for (l, lw) in t.layers.iter_mut().zip(&folded.layers) {
                    l.r_ov = (0..shapes.nkv)
                        .map(|kv| womi_value_head(&lw.wo.data, shapes, kv, &h))
                        .collect::<Result<Vec<_>>>()?
                        .concat();
                }
            }
        }
        Ok(t)
    }

    /// Number of trainable values.
    pub fn len(&self) -> usize {
        self.r_res.len()
            + self
                .layers
                .iter()
                .map(|l| {
                    l.s_attn.len()
                        + l.s_ffn.len()
                        + l.s_qk.len()
                        + l.s_ov.len()
                        + l.r_ov.len()
                        + l.s_ud.len()
                })
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Named flat tensors, in a fixed order (for saving and for the optimiser).
    pub fn named(&self) -> Vec<(String, Vec<usize>, &Vec<f64>)> {
        let s = self.shapes;
        let mut out = vec![("r_res".to_string(), vec![s.d, s.d], &self.r_res)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = |n: &str| format!("layers.{i}.{n}");
            out.push((p("s_attn"), vec![s.d], &l.s_attn));
            out.push((p("s_ffn"), vec![s.d], &l.s_ffn));
            out.push((p("s_qk"), vec![s.nkv * s.hd / 2], &l.s_qk));
            out.push((p("s_ov"), vec![s.nkv * s.hd], &l.s_ov));
            out.push((p("r_ov"), vec![s.nkv, s.hd, s.hd], &l.r_ov));
            out.push((p("s_ud"), vec![s.dff], &l.s_ud));
        }
        out
    }

    fn named_mut(&mut self) -> Vec<(String, &mut Vec<f64>)> {
        let mut out = vec![("r_res".to_string(), &mut self.r_res)];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = |n: &str| format!("layers.{i}.{n}");
            out.push((p("s_attn"), &mut l.s_attn));
            out.push((p("s_ffn"), &mut l.s_ffn));
            out.push((p("s_qk"), &mut l.s_qk));
            out.push((p("s_ov"), &mut l.s_ov));
            out.push((p("r_ov"), &mut l.r_ov));
            out.push((p("s_ud"), &mut l.s_ud));
        }
        out
    }

    /// Serialize as f64 safetensors with `extra` tensors (optimiser state) and metadata.
    pub fn to_safetensors(
        &self,
        extra: &[(String, Vec<f64>)],
        meta: std::collections::HashMap<String, String>,
    ) -> Result<Vec<u8>> {
        let mut all: Vec<(String, Vec<usize>, &[f64])> = self
            .named()
            .into_iter()
            .map(|(n, s, v)| (n, s, v.as_slice()))
            .collect();
        for (n, v) in extra {
            all.push((n.clone(), vec![v.len()], v));
        }
        let views = all
            .iter()
            .map(|(n, shape, v)| {
                safetensors::tensor::TensorView::new(
                    Dtype::F64,
                    shape.clone(),
                    bytemuck::cast_slice(v),
                )
                .map(|view| (n.clone(), view))
                .map_err(|e| Error::other(format!("tensor {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::other(format!("serializing transforms: {e}")))
    }

    /// Read transforms of a model of `shapes` (and the named extra tensors and metadata).
    pub fn from_safetensors(path: &Path, bytes: &[u8], shapes: Shapes) -> Result<(Self, Safe)> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(path, format!("not a transforms file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::format(path, format!("not a transforms file: {e}")))?;
        let read = |name: &str| -> Result<Vec<f64>> {
            let t = st
                .tensor(name)
                .map_err(|_| Error::format(path, format!("missing tensor {name}")))?;
            if t.dtype() != Dtype::F64 {
                return Err(Error::format(path, format!("{name}: expected F64")));
            }
            Ok(t.data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect())
        };
        let mut t = Transforms::identity(shapes);
        for (name, v) in t.named_mut() {
            let data = read(&name)?;
            if data.len() != v.len() {
                return Err(Error::format(
                    path,
                    format!(
                        "{name} has {} values, the model needs {} (transforms of another model?)",
                        data.len(),
                        v.len()
                    ),
                ));
            }
            *v = data;
        }
        if t.values().any(|x| !x.is_finite()) {
            return Err(Error::format(path, "transforms contain NaN or infinity"));
        }
        let extra = st
            .names()
            .into_iter()
            .filter(|n| !n.starts_with("r_res") && !n.starts_with("layers."))
            .map(|n| Ok((n.to_string(), read(n)?)))
            .collect::<Result<Vec<_>>>()?;
        let meta = meta.metadata().clone().unwrap_or_default();
        Ok((t, Safe { extra, meta }))
    }

    /// Every value, in `named` order.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.named()
            .into_iter()
            .flat_map(|(_, _, v)| v.iter().copied())
    }

    /// Overwrite every value from a flat slice in `named` order.
    pub fn set_values(&mut self, flat: &[f64]) {
        let mut at = 0;
        for (_, v) in self.named_mut() {
            let n = v.len();
            v.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
    }

    /// The fused model: norms folded, every transform multiplied into the weights in f64, the
    /// down Hadamard fused, and the online transforms the forward must then apply (the down
    /// Hadamard always, the Q/K Hadamard when `qk_hadamard`).
    pub fn fuse(
        &self,
        w: &LlamaWeights,
        qk_hadamard: bool,
    ) -> Result<(LlamaWeights, ForwardOptions)> {
        let s = self.shapes;
        if Shapes::of(&w.config) != s {
            return Err(Error::other(
                "the transforms were learned for a model of another shape",
            ));
        }
        let mut w = w.clone();
        fold_norms(&mut w);
        let r = Mat::from_fn(s.d, s.d, |i, j| self.r_res[i * s.d + j]);
        let had = Hadamard::new(s.dff)?;
        let apply = |t: &mut HostTensor, f: &dyn Fn(Mat<f64>) -> Mat<f64>| {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let m = f(Mat::from_fn(rows, cols, |i, j| t.data[i * cols + j] as f64));
            let (rows, cols) = (m.nrows(), m.ncols());
            for i in 0..rows {
                for j in 0..cols {
                    t.data[i * cols + j] = m[(i, j)] as f32;
                }
            }
        };
        apply(&mut w.embed, &|e| e * &r);
        apply(w.lm_head.as_mut().expect("folded"), &|h| h * &r);
        for (lw, lt) in w.layers.iter_mut().zip(&self.layers) {
            let qk = lt.expand_qk(s);
            let ov_kv = &lt.s_ov;
            let ov_q = lt.expand_ov(s);
            let read = |m: Mat<f64>, sa: &[f64]| col_scale(m * &r, sa);
            apply(&mut lw.wq, &|m| row_scale(read(m, &lt.s_attn), &qk, true));
            let qk_kv = lt.tied_qk(s);
            apply(&mut lw.wk, &|m| {
                row_scale(read(m, &lt.s_attn), &qk_kv, false)
            });
            apply(&mut lw.wv, &|m| {
                let m = row_scale(read(m, &lt.s_attn), ov_kv, true);
                lt.rotate_value_rows(m, s)
            });
            apply(&mut lw.wo, &|m| {
                let m = r.transpose() * col_scale(m, &ov_q);
                lt.rotate_output_columns(m, s)
            });
            apply(&mut lw.w_gate, &|m| read(m, &lt.s_ffn));
            apply(&mut lw.w_up, &|m| {
                row_scale(read(m, &lt.s_ffn), &lt.s_ud, true)
            });
            apply(&mut lw.w_down, &|m| {
                let mut m = col_scale(m, &lt.s_ud);
                // Rows ← rows·Hᵀ (each row mapped by H), then Rᵀ from the left.
                let (rows, cols) = (m.nrows(), m.ncols());
                let mut flat: Vec<f64> =
                    (0..rows * cols).map(|k| m[(k / cols, k % cols)]).collect();
                had.apply_rows(&mut flat);
                m = Mat::from_fn(rows, cols, |i, j| flat[i * cols + j]);
                r.transpose() * m
            });
            lw.attn_norm.data = lt.s_attn.iter().map(|&v| (1.0 / v) as f32).collect();
            lw.ffn_norm.data = lt.s_ffn.iter().map(|&v| (1.0 / v) as f32).collect();
        }
        let online = ForwardOptions {
            down_hadamard: true,
            qk_hadamard,
            ..Default::default()
        };
        Ok((w, online))
    }
}

/// Extra tensors and metadata read with the transforms.
pub struct Safe {
    pub extra: Vec<(String, Vec<f64>)>,
    pub meta: std::collections::HashMap<String, String>,
}

impl LayerTransforms {
    /// S_qk on K's nkv·hd output channels: value i of a head on dims i and i + hd/2.
    pub fn tied_qk(&self, s: Shapes) -> Vec<f64> {
        let half = s.hd / 2;
        (0..s.nkv * s.hd)
            .map(|c| {
                let (h, i) = (c / s.hd, c % s.hd);
                self.s_qk[h * half + i % half]
            })
            .collect()
    }
    /// S_qk on Q's nq·hd channels (query head j uses KV head j / group).
    pub fn expand_qk(&self, s: Shapes) -> Vec<f64> {
        expand_heads(&self.tied_qk(s), s)
    }
    /// S_ov on the nq·hd attention-output channels.
    pub fn expand_ov(&self, s: Shapes) -> Vec<f64> {
        expand_heads(&self.s_ov, s)
    }
    fn r_ov_mat(&self, s: Shapes, kv: usize) -> Mat<f64> {
        let hd = s.hd;
        let r = &self.r_ov[kv * hd * hd..(kv + 1) * hd * hd];
        Mat::from_fn(hd, hd, |i, j| r[i * hd + j])
    }
    /// W_v's rows of KV head h ← R_hᵀ·rows (so v_h ← v_h·R_h).
    fn rotate_value_rows(&self, mut m: Mat<f64>, s: Shapes) -> Mat<f64> {
        let hd = s.hd;
        for kv in 0..s.nkv {
            let block = m.subrows(kv * hd, hd).to_owned();
            let rotated = self.r_ov_mat(s, kv).transpose() * block;
            m.subrows_mut(kv * hd, hd).copy_from(&rotated);
        }
        m
    }
    /// W_o's columns of query head j ← columns·R_{j / group}.
    fn rotate_output_columns(&self, mut m: Mat<f64>, s: Shapes) -> Mat<f64> {
        let hd = s.hd;
        for j in 0..s.nq {
            let block = m.subcols(j * hd, hd).to_owned();
            let rotated = block * self.r_ov_mat(s, j / s.group());
            m.subcols_mut(j * hd, hd).copy_from(&rotated);
        }
        m
    }
}

fn expand_heads(per_kv: &[f64], s: Shapes) -> Vec<f64> {
    (0..s.nq)
        .flat_map(|j| {
            let kv = j / s.group();
            per_kv[kv * s.hd..(kv + 1) * s.hd].iter().copied()
        })
        .collect()
}

/// diag(s)·M, or diag(1/s)·M when `inverse`.
fn row_scale(mut m: Mat<f64>, s: &[f64], inverse: bool) -> Mat<f64> {
    for i in 0..m.nrows() {
        let f = if inverse { 1.0 / s[i] } else { s[i] };
        for j in 0..m.ncols() {
            m[(i, j)] *= f;
        }
    }
    m
}

/// M·diag(s).
fn col_scale(mut m: Mat<f64>, s: &[f64]) -> Mat<f64> {
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            m[(i, j)] *= s[j];
        }
    }
    m
}

/// R_res by WOMI (SPEC §4): eigenvectors of the covariance of every row of W_q, W_k, W_v,
/// W_up and W_gate over all layers (norms folded), times a random Hadamard. The covariance is
/// accumulated in f64 without concatenating the rows.
pub fn womi_residual(folded: &LlamaWeights) -> Result<Vec<f64>> {
    let d = folded.config.hidden_size;
    let mut cov = RowCovariance::new(d);
    for l in &folded.layers {
        for w in [&l.wq, &l.wk, &l.wv, &l.w_up, &l.w_gate] {
            cov.add(&w.data);
        }
    }
    let q = eigenvectors(&cov.finish(), d)?;
    Ok(mat_mul(&q, &random_hadamard(d, INIT_SEED)?, d))
}

/// R_ov of KV head `kv` by WOMI: the hd-wide column blocks of W_o [d, nq·hd] belonging to its
/// query heads, one sample per row and head, centred; eigenvectors times the Hadamard `h`.
fn womi_value_head(wo: &[f32], s: Shapes, kv: usize, h: &[f64]) -> Result<Vec<f64>> {
    let (hd, g) = (s.hd, s.group());
    let cols = s.nq * hd;
    let mut samples = Vec::with_capacity(wo.len() / s.nkv);
    for row in wo.chunks_exact(cols) {
        for j in kv * g..(kv + 1) * g {
            samples.extend_from_slice(&row[j * hd..(j + 1) * hd]);
        }
    }
    let mut cov = RowCovariance::new(hd);
    cov.add(&samples);
    let q = eigenvectors(&cov.finish(), hd)?;
    Ok(mat_mul(&q, h, hd))
}

/// Covariance of the rows of many [n, d] matrices, summed in f64 (Σ xᵀx by matrix products).
struct RowCovariance {
    d: usize,
    n: usize,
    sum: Vec<f64>,
    gram: Mat<f64>,
}

impl RowCovariance {
    fn new(d: usize) -> Self {
        RowCovariance {
            d,
            n: 0,
            sum: vec![0.0; d],
            gram: Mat::zeros(d, d),
        }
    }
    fn add(&mut self, rows: &[f32]) {
        let d = self.d;
        let n = rows.len() / d;
        let x = Mat::<f64>::from_fn(n, d, |i, j| rows[i * d + j] as f64);
        self.gram += x.transpose() * &x;
        for row in rows.chunks_exact(d) {
            self.sum
                .iter_mut()
                .zip(row)
                .for_each(|(s, &v)| *s += v as f64);
        }
        self.n += n;
    }
    fn finish(&self) -> Vec<f64> {
        let (d, n) = (self.d, self.n.max(1) as f64);
        (0..d * d)
            .map(|k| {
                let (i, j) = (k / d, k % d);
                self.gram[(i, j)] / n - self.sum[i] / n * self.sum[j] / n
            })
            .collect()
    }
}

/// Eigenvectors (as columns, row-major n × n) of a symmetric matrix.
fn eigenvectors(sym: &[f64], n: usize) -> Result<Vec<f64>> {
    let m = Mat::<f64>::from_fn(n, n, |i, j| sym[i * n + j]);
    let e = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::other(format!("WOMI: eigendecomposition failed: {e:?}")))?;
    let u = e.U();
    Ok((0..n * n).map(|k| u[(k / n, k % n)]).collect())
}

fn mat_mul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let am = Mat::from_fn(n, n, |i, j| a[i * n + j]);
    let bm = Mat::from_fn(n, n, |i, j| b[i * n + j]);
    let c = am * bm;
    (0..n * n).map(|k| c[(k / n, k % n)]).collect()
}
