//! Quantization settings (`W4A4KV4`, …) and the methods that turn a full-precision model into a
//! fake-quantized one: weights edited on the host, activations and KV quantized in the forward.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::calib::student::Trainable;
use crate::calib::{Init, Learned, Loss, Preset, Settings as CalibSettings};

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::model::checkpoint::LlamaWeights;
use crate::model::config::LlamaConfig;
use crate::model::llama::{ForwardOptions, Llama};
use crate::quant::gptq::gptq_model;
use crate::quant::quantizer::{CLIP_POWER, LayerGrids, QuantSpec, fake_quant_matrix};
use crate::quant::smoothquant;
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
pub enum Method {
    /// Full precision: nothing is quantized, whatever the bits say.
    #[serde(rename = "fp")]
    Fp,
    /// Round-to-nearest with per-channel MSE-searched weight scales.
    #[serde(rename = "rtn")]
    Rtn,
    /// SmoothQuant: activation outliers migrated into the weights (α = 0.5); RTN weights.
    #[serde(rename = "smoothquant")]
    SmoothQuant,
    /// GPTQ weights (error feedback through the input Hessian), no transform.
    #[serde(rename = "gptq")]
    Gptq,
    /// QuaRot: random Hadamard residual rotation, Hadamard value heads, online Hadamards on the
    /// down_proj input and on Q/K; RTN weights.
    #[serde(rename = "quarot")]
    Quarot,
    /// QuaRot's rotations with GPTQ weights (the QuaRot paper's main setting).
    #[serde(rename = "quarot-gptq")]
    QuarotGptq,
    /// OSTQuant: learned rotations and scales (WOMI start, KL-Top loss); GPTQ weights.
    #[serde(rename = "ostquant")]
    Ostquant,
    /// SpinQuant-style: learned rotations only, CE loss, Cayley SGD; GPTQ weights.
    #[serde(rename = "spinquant")]
    Spinquant,
    /// OSTQuant ablation: random-Hadamard start instead of WOMI.
    #[serde(rename = "ostquant-nowomi")]
    OstquantNoWomi,
    /// OSTQuant ablation: cross-entropy instead of KL-Top.
    #[serde(rename = "ostquant-ce")]
    OstquantCe,
    /// OSTQuant ablation: rotations learned, scales left at 1.
    #[serde(rename = "ostquant-rot")]
    OstquantRot,
    /// OSTQuant ablation: scales learned, rotations left at their (WOMI) start.
    #[serde(rename = "ostquant-scale")]
    OstquantScale,
}

impl Method {
    pub const ALL: [Method; 12] = [
        Method::Fp,
        Method::Rtn,
        Method::SmoothQuant,
        Method::Gptq,
        Method::Quarot,
        Method::QuarotGptq,
        Method::Ostquant,
        Method::Spinquant,
        Method::OstquantNoWomi,
        Method::OstquantCe,
        Method::OstquantRot,
        Method::OstquantScale,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Method::Fp => "fp",
            Method::Rtn => "rtn",
            Method::SmoothQuant => "smoothquant",
            Method::Gptq => "gptq",
            Method::Quarot => "quarot",
            Method::QuarotGptq => "quarot-gptq",
            Method::Ostquant => "ostquant",
            Method::Spinquant => "spinquant",
            Method::OstquantNoWomi => "ostquant-nowomi",
            Method::OstquantCe => "ostquant-ce",
            Method::OstquantRot => "ostquant-rot",
            Method::OstquantScale => "ostquant-scale",
        }
    }

    /// The calibration settings of a learned method at `bits` (None: nothing is learned).
    pub fn learned_settings(self, bits: Bits, preset: Preset) -> Option<CalibSettings> {
        let ost = CalibSettings::ostquant(bits, preset);
        let both = Trainable {
            rotations: true,
            scales: true,
        };
        Some(match self {
            Method::Ostquant => ost,
            Method::Spinquant => CalibSettings::spinquant(bits, preset),
            Method::OstquantNoWomi => CalibSettings {
                init: Init::Hadamard,
                ..ost
            },
            Method::OstquantCe => CalibSettings {
                loss: Loss::Ce,
                ..ost
            },
            Method::OstquantRot => CalibSettings {
                trainable: Trainable {
                    scales: false,
                    ..both
                },
                ..ost
            },
            Method::OstquantScale => CalibSettings {
                trainable: Trainable {
                    rotations: false,
                    ..both
                },
                ..ost
            },
            _ => return None,
        })
    }

    pub fn is_learned(self) -> bool {
        self.learned_settings(Bits::FP, Preset::Cpu).is_some()
    }
    /// Whether the method runs the model on calibration text.
    pub fn needs_calibration(self) -> bool {
        matches!(
            self,
            Method::SmoothQuant | Method::Gptq | Method::QuarotGptq
        ) || self.is_learned()
    }
    /// How the method rounds weights: GPTQ for gptq, quarot-gptq and the learned methods (the
    /// paper's setting), RTN for the others.
    pub fn rounding(self) -> Rounding {
        if matches!(self, Method::Gptq | Method::QuarotGptq) || self.is_learned() {
            Rounding::Gptq
        } else {
            Rounding::Rtn
        }
    }
}

/// How linear weights are put on their quantization grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rounding {
    /// Round to nearest, each weight on its own.
    Rtn,
    /// GPTQ: each column's rounding error pushed onto the columns not yet quantized.
    Gptq,
    /// GPTQ with the columns taken by decreasing Hessian diagonal.
    GptqActOrder,
}

impl fmt::Display for Rounding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rounding::Rtn => "rtn",
            Rounding::Gptq => "gptq",
            Rounding::GptqActOrder => "gptq-act-order",
        })
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

/// Calibration text (windows of the Wikipedia calibration half, never the evaluation half)
/// and the device that runs it, for the methods that need them.
pub struct Calibration<'a> {
    pub windows: &'a [Vec<u32>],
    pub device: &'a Device,
    /// The learned transforms, for the learned methods.
    pub learned: Option<&'a Learned>,
}

/// The method's function-preserving transforms, nothing quantized: the transformed weights and
/// the online Hadamards they were fused for.
pub fn transform(
    w: &LlamaWeights,
    method: Method,
    calib: &Calibration,
) -> Result<(LlamaWeights, ForwardOptions)> {
    let mut w = w.clone();
    let mut online = ForwardOptions::default();
    match method {
        Method::Fp | Method::Rtn | Method::Gptq => {}
        Method::SmoothQuant => {
            let model = Llama::new(&w, calib.device);
            let maxes = smoothquant::calibrate(&model, calib.windows)?;
            smoothquant::smooth(&mut w, &maxes, smoothquant::ALPHA);
        }
        Method::Quarot | Method::QuarotGptq => {
            let c = w.config.clone();
            fold_norms(&mut w);
            rotate_residual(&mut w, &random_hadamard(c.hidden_size, QUAROT_SEED)?);
            rotate_value_heads(&mut w, &Hadamard::new(c.head_dim())?.matrix());
            fuse_down_hadamard(&mut w, &Hadamard::new(c.intermediate_size)?);
            online.down_hadamard = true;
            online.qk_hadamard = true;
        }
        _ => {
            let learned = calib
                .learned
                .ok_or_else(|| Error::other(format!("{method} needs its learned transforms")))?;
            let qk = learned.settings.forward_options().qk_hadamard;
            return learned.transforms.fuse(&w, qk);
        }
    }
    Ok((w, online))
}

/// The weight quantizer at `bits`: per output channel (or per `group` input columns),
/// symmetric unless `asym`; None at 16 bits.
pub fn weight_spec(bits: u32, group: Option<usize>, asym: bool) -> Option<QuantSpec> {
    if bits >= 16 {
        return None;
    }
    let spec = if asym {
        QuantSpec::asym(bits)
    } else {
        QuantSpec::sym(bits)
    };
    Some(match group {
        Some(g) => spec.with_group(g),
        None => spec,
    })
}

/// Check that a weight group divides every linear layer's input width.
pub fn check_weight_group(config: &LlamaConfig, group: Option<usize>) -> Result<()> {
    let Some(g) = group else { return Ok(()) };
    for n in [config.hidden_size, config.intermediate_size] {
        if g == 0 || !n.is_multiple_of(g) {
            return Err(Error::other(format!(
                "weight group {g} does not divide the layer width {n}"
            )));
        }
    }
    Ok(())
}

/// Quantized weights: fake-quantized f32 values and, when quantized, the grid of every group
/// (what the int4 export packs).
#[derive(Debug, Clone)]
pub struct Quantized {
    pub weights: LlamaWeights,
    pub grids: Option<Vec<LayerGrids>>,
}

/// Quantize the linear weights of transformed weights `w` with `spec`, rounded by `rounding`;
/// no spec (16 bits, or the FP method) leaves them as they are.
pub fn quantize_weights(
    mut w: LlamaWeights,
    online: &ForwardOptions,
    rounding: Rounding,
    spec: Option<&QuantSpec>,
    calib: &Calibration,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Quantized> {
    let Some(spec) = spec else {
        return Ok(Quantized {
            weights: w,
            grids: None,
        });
    };
    check_weight_group(&w.config, spec.group)?;
    let act_order = match rounding {
        Rounding::Rtn => {
            let grids = quantize_weights_rtn(&mut w, spec);
            return Ok(Quantized {
                weights: w,
                grids: Some(grids),
            });
        }
        Rounding::Gptq => false,
        Rounding::GptqActOrder => true,
    };
    let (weights, grids) = gptq_model(
        &w,
        online,
        calib.windows,
        spec,
        act_order,
        calib.device,
        progress,
    )?;
    Ok(Quantized {
        weights,
        grids: Some(grids),
    })
}

/// Online transforms plus the activation and KV quantizers of `bits`.
pub fn with_bits(online: ForwardOptions, method: Method, bits: Bits) -> ForwardOptions {
    let mut opts = online;
    if method == Method::Fp {
        return opts;
    }
    if bits.a < 16 {
        opts.act = Some(QuantSpec::asym(bits.a));
    }
    if bits.kv < 16 {
        opts.kv = Some(QuantSpec::asym(bits.kv));
    }
    opts
}

/// Fake-quantize every linear weight (not embeddings, norms or lm_head) with `spec` (groups
/// along each output row) and the MSE clip search (error power 2.4, as GPTQ's scale search).
pub fn quantize_weights_rtn(w: &mut LlamaWeights, spec: &QuantSpec) -> Vec<LayerGrids> {
    w.layers
        .iter_mut()
        .map(|l| {
            [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]
            .map(|m| {
                let cols = m.shape[1];
                fake_quant_matrix(&mut m.data, cols, spec, Some(CLIP_POWER))
            })
        })
        .collect()
}
