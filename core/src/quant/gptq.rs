//! GPTQ (Frantar et al., 2022): quantize a linear layer one input column at a time and push
//! each column's rounding error onto the columns not yet quantized, weighted by the inverse
//! Hessian of the layer's inputs, H = Σ xᵀx. Settings of SPEC §6: damping 1% of the mean
//! diagonal, no act-order, per-channel symmetric scales from the MSE clip search (error power
//! 2.4), layers quantized in order and each block's outputs recomputed with its quantized
//! weights before the next block sees them. With groups, each group's scale is searched when
//! the loop reaches it, on the weights as the earlier columns' errors left them.
//!
//! Act-order (an option, off in the paper's setting) quantizes the columns by decreasing
//! H diagonal, so the inputs with the most energy are rounded first, while the most columns
//! remain to absorb their error. With per-channel scales the grid does not depend on the
//! order. With groups, a group's columns are no longer quantized together, so every group's
//! grid is searched up front on the weights as they come in ("static groups"); the groups stay
//! runs of consecutive input columns, and the packed format is unchanged either way.
//!
//! Output rows are independent given H⁻¹, so each row runs the column loop on its own (in
//! parallel); this is the same arithmetic as the reference's blocked "lazy batch" update, which
//! only reorders it for GPU memory traffic.

use burn::tensor::{Device, Tensor};
use faer::linalg::solvers::DenseSolveCore;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::checkpoint::{HostTensor, LlamaWeights};
use crate::model::llama::{ForwardOptions, Llama, Site};
use crate::quant::quantizer::{
    CLIP_POWER, Grid, LayerGrids, QuantSpec, fake_quant_value, search_params,
};

/// Relative damping added to the Hessian's diagonal.
pub const DAMP: f64 = 0.01;
/// Calibration windows pushed through a block at once.
const BATCH: usize = 4;

/// Σ xᵀx over calibration rows x of an n-wide layer input, in f64.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub n: usize,
    pub sum: Vec<f64>,
    pub rows: usize,
}

impl Hessian {
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            sum: vec![0.0; n * n],
            rows: 0,
        }
    }

    /// Add rows x [rows, n] on the device: xᵀx is formed there, summed here in f64.
    pub fn add_tensor(&mut self, x: Tensor<2>) -> Result<()> {
        let [rows, n] = x.dims();
        assert_eq!(n, self.n, "Hessian width");
        let gram = x.clone().transpose().matmul(x);
        let g = gram
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| Error::other(format!("reading a Hessian: {e:?}")))?;
        for (s, v) in self.sum.iter_mut().zip(g) {
            *s += v as f64;
        }
        self.rows += rows;
        Ok(())
    }
}

/// Upper-triangular U with (H + damp·I)⁻¹ = UᵀU, row-major. Damping grows tenfold (up to
/// four times) if H is not numerically positive definite.
fn inverse_cholesky_upper(h: &[f64], n: usize, mut damp: f64) -> Result<Vec<f64>> {
    for _ in 0..5 {
        let m =
            faer::Mat::<f64>::from_fn(n, n, |i, j| h[i * n + j] + if i == j { damp } else { 0.0 });
        if let Ok(llt) = m.llt(faer::Side::Lower) {
            let inv = llt.inverse();
            if let Ok(l) = inv.llt(faer::Side::Lower) {
                let l = l.L();
                let mut u = vec![0.0; n * n];
                for i in 0..n {
                    for j in i..n {
                        u[i * n + j] = l[(j, i)];
                    }
                }
                return Ok(u);
            }
        }
        damp *= 10.0;
    }
    Err(Error::other(
        "GPTQ: the input Hessian is not positive definite even with damping",
    ))
}

/// Quantize `w` [out, in] in place with GPTQ against the Hessian of its inputs, in act-order
/// when `act_order`; returns the grid of every (row, group).
pub fn gptq_quantize(
    w: &mut HostTensor,
    h: &Hessian,
    spec: &QuantSpec,
    act_order: bool,
) -> Result<Vec<Grid>> {
    let n = w.shape[1];
    assert_eq!(n, h.n, "GPTQ: weight has {n} inputs, Hessian {}", h.n);
    if h.sum.iter().any(|v| !v.is_finite()) {
        return Err(Error::other(
            "GPTQ: the calibration activations contain NaN or infinity",
        ));
    }
    // Inputs that never fire carry no information: their weights are zeroed (as GPTQ does).
    let mut hm = h.sum.clone();
    let mut dead = vec![false; n];
    for (i, d) in dead.iter_mut().enumerate() {
        if hm[i * n + i] == 0.0 {
            hm[i * n + i] = 1.0;
            *d = true;
        }
    }
    let group = spec.group.unwrap_or(n);
    if group == 0 || !n.is_multiple_of(group) {
        return Err(Error::other(format!(
            "GPTQ: group {group} does not divide {n} input columns"
        )));
    }
    // order[i]: the input column quantized i-th.
    let mut order: Vec<usize> = (0..n).collect();
    if act_order {
        order.sort_by(|&a, &b| hm[b * n + b].total_cmp(&hm[a * n + a]));
        hm = (0..n * n)
            .map(|k| hm[order[k / n] * n + order[k % n]])
            .collect();
    }
    let mean_diag = (0..n).map(|i| hm[i * n + i]).sum::<f64>() / n as f64;
    let u = inverse_cholesky_upper(&hm, n, DAMP * mean_diag)?;
    let groups = n / group;
    let mut grids = vec![
        Grid {
            scale: 1.0,
            zero: 0.0
        };
        w.data.len() / n * groups
    ];
    w.data
        .par_chunks_mut(n)
        .zip(grids.par_chunks_mut(groups))
        .for_each(|(row, row_grids)| {
            for (x, &d) in row.iter_mut().zip(&dead) {
                if d {
                    *x = 0.0;
                }
            }
            // Act-order with groups: each group's grid from the incoming weights (see above).
            let fixed = act_order && group != n;
            if fixed {
                for (g, cols) in row.chunks(group).enumerate() {
                    let (scale, zero) = search_params(cols, spec, Some(CLIP_POWER));
                    row_grids[g] = Grid { scale, zero };
                }
            }
            let mut r: Vec<f64> = order.iter().map(|&c| row[c] as f64).collect();
            let (mut s, mut z) = (1.0, 0.0);
            for i in 0..n {
                if fixed {
                    let g = row_grids[order[i] / group];
                    (s, z) = (g.scale, g.zero);
                } else if i % group == 0 {
                    let g: Vec<f32> = r[i..i + group].iter().map(|&x| x as f32).collect();
                    (s, z) = search_params(&g, spec, Some(CLIP_POWER));
                    row_grids[i / group] = Grid { scale: s, zero: z };
                }
                let q = fake_quant_value(r[i] as f32, spec, s, z) as f64;
                let err = (r[i] - q) / u[i * n + i];
                r[i] = q;
                let ui = &u[i * n..(i + 1) * n];
                for j in i + 1..n {
                    r[j] -= err * ui[j];
                }
            }
            for (&c, v) in order.iter().zip(r) {
                row[c] = v as f32;
            }
        });
    Ok(grids)
}

/// Quantize every linear weight of `w` (already transformed for the online Hadamards in
/// `online`) with GPTQ and `spec`, block by block, sequentially within a block:
/// {k, v, q} → o → {up, gate} → down. Hessians come from un-quantized activations of
/// `windows`; each block's outputs are recomputed with its quantized weights.
pub fn gptq_model(
    w: &LlamaWeights,
    online: &ForwardOptions,
    windows: &[Vec<u32>],
    spec: &QuantSpec,
    act_order: bool,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(LlamaWeights, Vec<LayerGrids>)> {
    if windows.is_empty() {
        return Err(Error::other("GPTQ needs at least one calibration window"));
    }
    let mut out = w.clone();
    let mut model = Llama::new(w, device);
    model.set_options(ForwardOptions {
        act: None,
        kv: None,
        ..online.clone()
    })?;
    let mut xs: Vec<Tensor<3>> = windows.chunks(BATCH).map(|b| model.embed(b)).collect();
    let n_layers = w.layers.len();
    let mut grids: Vec<LayerGrids> = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        let mut layer_grids: LayerGrids = Default::default();
        for site in Site::ALL {
            let n = match site {
                Site::DownIn => w.config.intermediate_size,
                _ => w.config.hidden_size,
            };
            let mut h = Hessian::new(n);
            for x in &xs {
                // Only the part of the block before `site` runs.
                let a = model.site_input(l, x.clone(), site);
                let [b, t, _] = a.dims();
                h.add_tensor(a.reshape([b * t, n]))?;
            }
            let lw = &mut out.layers[l];
            // (name, matrix, index in LayerGrids order q, k, v, o, gate, up, down)
            let mats: Vec<(&str, &mut HostTensor, usize)> = match site {
                Site::QkvIn => vec![
                    ("k", &mut lw.wk, 1),
                    ("v", &mut lw.wv, 2),
                    ("q", &mut lw.wq, 0),
                ],
                Site::OIn => vec![("o", &mut lw.wo, 3)],
                Site::UpGateIn => vec![("up", &mut lw.w_up, 5), ("gate", &mut lw.w_gate, 4)],
                Site::DownIn => vec![("down", &mut lw.w_down, 6)],
            };
            for (name, m, k) in mats {
                layer_grids[k] = gptq_quantize(m, &h, spec, act_order)
                    .map_err(|e| Error::other(format!("layer {l} {name}_proj: {e}")))?;
            }
            model.set_layer(l, &out.layers[l]);
        }
        xs = xs
            .into_iter()
            .map(|x| model.block(l, x, &mut |_, _, _| {}))
            .collect();
        grids.push(layer_grids);
        progress(l + 1, n_layers);
    }
    Ok((out, grids))
}
