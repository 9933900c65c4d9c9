//! OSTQuant calibration (SPEC §4–5): learn the orthogonal and scaling transforms of a model so
//! that its fake-quantized outputs stay close to the full-precision ones.
//!
//! Each step runs the full-precision teacher and the transformed, fake-quantized student on a
//! batch of calibration windows, takes the gradient of the loss with respect to every
//! transform on burn's autodiff backend, clips it, and updates the rotations on the Stiefel
//! manifold (Riemannian Adam or Cayley SGD, on the host in f64) and the scales with Adam.
//! Progress goes out as [`Event`]s (the CLI draws a bar, the GUI a loss curve); a checkpoint
//! with the optimiser state can be written at any step, so a run resumes where it stopped.

pub mod loss;
pub mod optim;
pub mod student;
pub mod transforms;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::checkpoint::LlamaWeights;
use crate::model::llama::{ForwardOptions, Llama};
use crate::quant::method::Bits;
use crate::quant::quantizer::QuantSpec;
pub use loss::Loss;
pub use optim::RotationOptimizer;
use optim::{AdamState, StiefelState};
use student::{Params, Student, Trainable};
pub use transforms::{Init, Transforms};

/// The official scripts' learning rates (SPEC §5.1).
pub const PAPER_LR_ROT: f64 = 0.016_897_531_728_732_17;
pub const PAPER_LR_SCALE: f64 = 0.001_789_882_267_591_724_8;
/// Global L2 norm the Euclidean gradients are clipped to.
pub const CLIP_NORM: f64 = 1.0;
/// Tokens of one forward and backward pass. A step's windows go through in passes of at most
/// this many tokens (at least one window) whose gradients add up to the step's, so only one
/// pass's activations must fit in memory (one 2048-token window of SmolLM2 takes well over
/// 14 GB on the CPU backend; the paper preset's 16 windows at once would not fit anywhere).
pub const TOKENS_PER_PASS: usize = 2048;

/// Sizes of a calibration run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// SPEC §5: 100 steps of 16 windows of 2048 tokens, from 128 windows. For a GPU.
    Paper,
    /// Sized for two CPU cores: SmolLM2-135M at W4A4KV4 in well under half an hour.
    Cpu,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "paper" => Ok(Preset::Paper),
            "cpu" => Ok(Preset::Cpu),
            _ => Err(format!("unknown preset '{s}' (expected paper or cpu)")),
        }
    }
}

/// Everything that decides what a calibration learns; saved with its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub bits: Bits,
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// Distinct calibration windows (cycled through in order).
    pub samples: usize,
    pub seq_len: usize,
    pub lr_rot: f64,
    pub lr_scale: f64,
    pub loss: Loss,
    pub init: Init,
    pub optimizer: RotationOptimizer,
    pub trainable: Trainable,
    /// Fake-quantize the fused weights during training (the W4A16 script does; the W4A4
    /// scripts leave weights to GPTQ afterwards).
    pub train_weights: bool,
}

impl Settings {
    /// OSTQuant at `bits` with a preset's sizes.
    pub fn ostquant(bits: Bits, preset: Preset) -> Self {
        let (steps, batch, samples, seq_len) = match preset {
            Preset::Paper => (100, 16, 128, 2048),
            Preset::Cpu => (60, 1, 60, 256),
        };
        Settings {
            bits,
            steps,
            batch,
            samples,
            seq_len,
            lr_rot: PAPER_LR_ROT,
            lr_scale: PAPER_LR_SCALE,
            loss: Loss::KlTop(1000),
            // The W4A16 script starts from a random Hadamard, the W4A4 ones from WOMI.
            init: if bits.a >= 16 {
                Init::Hadamard
            } else {
                Init::Womi
            },
            optimizer: RotationOptimizer::Adam,
            trainable: Trainable {
                rotations: true,
                scales: true,
            },
            train_weights: bits.a >= 16 && bits.w < 16,
        }
    }

    /// A SpinQuant-style run: rotations only, cross-entropy, random-Hadamard start, Cayley SGD.
    pub fn spinquant(bits: Bits, preset: Preset) -> Self {
        Settings {
            loss: Loss::Ce,
            init: Init::Hadamard,
            optimizer: RotationOptimizer::Sgd,
            lr_rot: SPINQUANT_LR,
            trainable: Trainable {
                rotations: true,
                scales: false,
            },
            ..Settings::ostquant(bits, preset)
        }
    }

    /// A short key naming these settings (cache file names).
    pub fn key(&self) -> String {
        let mut h = sha2::Sha256::default();
        use sha2::Digest;
        h.update(serde_json::to_vec(self).expect("settings serialize"));
        if self.train_weights {
            // The weights seen in calibration gained the clip search (before: min/max grids);
            // a new key keeps checkpoints learned against the old quantizer from being reused.
            h.update(b"w-clip");
        }
        let hex: String = h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "{}-{}x{}x{}-{hex}",
            self.bits, self.steps, self.batch, self.seq_len
        )
    }

    /// The forward options of the student and of the deployed model: online Hadamards, and the
    /// activation / KV quantizers of `bits`.
    pub fn forward_options(&self) -> ForwardOptions {
        ForwardOptions {
            down_hadamard: true,
            qk_hadamard: self.bits.kv < 16,
            act: (self.bits.a < 16).then(|| QuantSpec::asym(self.bits.a)),
            kv: (self.bits.kv < 16).then(|| QuantSpec::asym(self.bits.kv)),
            ..Default::default()
        }
    }

    /// Refuse sizes and rates no calibration can run with.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch == 0 || self.samples == 0 || self.seq_len < 2 {
            return Err(Error::other(
                "calibration needs at least one step, one sample and two tokens per window",
            ));
        }
        if !(self.lr_rot.is_finite() && self.lr_scale.is_finite()) {
            return Err(Error::other("learning rates must be finite"));
        }
        Ok(())
    }
}

/// SpinQuant's Cayley SGD learning rate.
pub const SPINQUANT_LR: f64 = 1.5;

/// What a calibration reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// About to run `steps` steps from `start` (> 0 when resumed).
    Started { start: usize, steps: usize },
    Step {
        step: usize,
        steps: usize,
        loss: f64,
        lr_rot: f64,
        lr_scale: f64,
        /// Seconds this step took.
        seconds: f64,
    },
}

/// Changes to a method's preset settings (`--steps`, `--lr-scale`, …); None keeps the preset's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub steps: Option<usize>,
    pub lr_rot: Option<f64>,
    pub lr_scale: Option<f64>,
    pub samples: Option<usize>,
    pub seq_len: Option<usize>,
    pub batch: Option<usize>,
    pub loss: Option<Loss>,
    pub init: Option<Init>,
    pub optimizer: Option<RotationOptimizer>,
    pub train_weights: Option<bool>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self == &Overrides::default()
    }

    /// These overrides, and `base`'s where these leave a setting to the preset.
    pub fn over(&self, base: &Overrides) -> Overrides {
        Overrides {
            steps: self.steps.or(base.steps),
            lr_rot: self.lr_rot.or(base.lr_rot),
            lr_scale: self.lr_scale.or(base.lr_scale),
            samples: self.samples.or(base.samples),
            seq_len: self.seq_len.or(base.seq_len),
            batch: self.batch.or(base.batch),
            loss: self.loss.or(base.loss),
            init: self.init.or(base.init),
            optimizer: self.optimizer.or(base.optimizer),
            train_weights: self.train_weights.or(base.train_weights),
        }
    }

    pub fn apply(&self, s: Settings) -> Settings {
        Settings {
            steps: self.steps.unwrap_or(s.steps),
            lr_rot: self.lr_rot.unwrap_or(s.lr_rot),
            lr_scale: self.lr_scale.unwrap_or(s.lr_scale),
            samples: self.samples.unwrap_or(s.samples),
            seq_len: self.seq_len.unwrap_or(s.seq_len),
            batch: self.batch.unwrap_or(s.batch),
            loss: self.loss.unwrap_or(s.loss),
            init: self.init.unwrap_or(s.init),
            optimizer: self.optimizer.unwrap_or(s.optimizer),
            train_weights: self.train_weights.unwrap_or(s.train_weights),
            ..s
        }
    }

    /// The overrides as command-line flags ("--lr-scale 0.0179 --init hadamard"), for tables.
    pub fn flags(&self) -> String {
        let mut f = Vec::new();
        let mut add = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                f.push(format!("--{name} {v}"));
            }
        };
        add("steps", self.steps.map(|v| v.to_string()));
        add("lr-rot", self.lr_rot.map(|v| v.to_string()));
        add("lr-scale", self.lr_scale.map(|v| v.to_string()));
        add("samples", self.samples.map(|v| v.to_string()));
        add("seq-len", self.seq_len.map(|v| v.to_string()));
        add("batch", self.batch.map(|v| v.to_string()));
        add(
            "loss",
            self.loss.map(|v| match v {
                Loss::KlTop(k) => format!("kl-top:{k}"),
                other => other.name(),
            }),
        );
        add("init", self.init.map(|v| format!("{v:?}").to_lowercase()));
        add(
            "optimizer",
            self.optimizer.map(|v| format!("{v:?}").to_lowercase()),
        );
        add("train-weights", self.train_weights.map(|v| v.to_string()));
        f.join(" ")
    }
}

/// Transforms plus the optimiser state after `step` steps: enough to resume.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub transforms: Transforms,
    pub step: usize,
    rotations: Vec<StiefelState>,
    scales: Vec<AdamState>,
    /// The loss of every step so far.
    pub losses: Vec<f64>,
}

impl Checkpoint {
    fn new(transforms: Transforms) -> Self {
        let (mut rotations, mut scales) = (Vec::new(), Vec::new());
        for (_, shape, v) in transforms.named() {
            if shape.len() >= 2 {
                let n = shape[shape.len() - 1];
                rotations.extend((0..v.len() / (n * n)).map(|_| StiefelState::new(n)));
            } else {
                scales.push(AdamState::new(v.len()));
            }
        }
        Checkpoint {
            transforms,
            step: 0,
            rotations,
            scales,
            losses: Vec::new(),
        }
    }

    /// Serialize (transforms, optimiser state, losses and the settings as metadata).
    pub fn to_bytes(&self, settings: &Settings) -> Result<Vec<u8>> {
        let mut extra = vec![
            ("opt.step".to_string(), vec![self.step as f64]),
            ("opt.losses".to_string(), self.losses.clone()),
        ];
        for (i, r) in self.rotations.iter().enumerate() {
            extra.push((format!("opt.rot.{i}.m"), r.m.clone()));
            extra.push((format!("opt.rot.{i}.v"), vec![r.v, r.step as f64]));
        }
        for (i, s) in self.scales.iter().enumerate() {
            extra.push((format!("opt.scale.{i}.m"), s.m.clone()));
            extra.push((format!("opt.scale.{i}.v"), s.v.clone()));
            extra.push((format!("opt.scale.{i}.step"), vec![s.step as f64]));
        }
        let mut meta = HashMap::new();
        meta.insert(
            "settings".to_string(),
            serde_json::to_string(settings).expect("settings serialize"),
        );
        self.transforms.to_safetensors(&extra, meta)
    }

    /// Read a checkpoint written by [`to_bytes`](Self::to_bytes) for a model of this config,
    /// with the settings it was made with.
    pub fn from_bytes(
        path: &std::path::Path,
        bytes: &[u8],
        w: &LlamaWeights,
    ) -> Result<(Self, Settings)> {
        let shapes = transforms::Shapes::of(&w.config);
        let (t, safe) = Transforms::from_safetensors(path, bytes, shapes)?;
        let settings: Settings = safe
            .meta
            .get("settings")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| Error::format(path, "no calibration settings in the metadata"))?;
        let extra: HashMap<_, _> = safe.extra.into_iter().collect();
        let get = |n: &str| {
            extra
                .get(n)
                .cloned()
                .ok_or_else(|| Error::format(path, format!("missing optimiser state {n}")))
        };
        let mut c = Checkpoint::new(t);
        c.step = get("opt.step")?[0] as usize;
        c.losses = get("opt.losses")?;
        for (i, r) in c.rotations.iter_mut().enumerate() {
            r.m = get(&format!("opt.rot.{i}.m"))?;
            let v = get(&format!("opt.rot.{i}.v"))?;
            (r.v, r.step) = (v[0], v[1] as usize);
        }
        for (i, s) in c.scales.iter_mut().enumerate() {
            s.m = get(&format!("opt.scale.{i}.m"))?;
            s.v = get(&format!("opt.scale.{i}.v"))?;
            s.step = get(&format!("opt.scale.{i}.step"))?[0] as usize;
        }
        Ok((c, settings))
    }
}

/// A calibration in progress.
pub struct Calibrator<'a> {
    pub settings: Settings,
    teacher: Llama,
    student: Student,
    windows: &'a [Vec<u32>],
    /// Windows per forward and backward pass (see [`TOKENS_PER_PASS`]).
    windows_per_pass: usize,
    pub state: Checkpoint,
}

impl<'a> Calibrator<'a> {
    /// Prepare a calibration of `w` on `windows` (at least `settings.samples` of them are
    /// used, cycled) on `device`, starting from `resume` when given.
    pub fn new(
        w: &LlamaWeights,
        settings: Settings,
        windows: &'a [Vec<u32>],
        device: &Device,
        resume: Option<Checkpoint>,
    ) -> Result<Self> {
        settings.validate()?;
        if windows.is_empty() {
            return Err(Error::other("no calibration windows"));
        }
        let state = match resume {
            Some(c) => c,
            None => Checkpoint::new(Transforms::init(w, settings.init)?),
        };
        let weight = (settings.train_weights && settings.bits.w < 16)
            .then(|| QuantSpec::sym(settings.bits.w));
        let student = Student::new(
            w,
            &device.clone().autodiff(),
            &settings.forward_options(),
            weight,
        )?;
        Ok(Calibrator {
            teacher: Llama::new(w, device),
            student,
            windows: &windows[..settings.samples.min(windows.len())],
            windows_per_pass: (TOKENS_PER_PASS / settings.seq_len).clamp(1, settings.batch),
            settings,
            state,
        })
    }

    /// Split each step's windows into passes of `n` windows (the results do not depend on it,
    /// up to float rounding; memory does).
    pub fn set_windows_per_pass(&mut self, n: usize) {
        self.windows_per_pass = n.max(1);
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.settings.steps
    }

    /// The windows of step `step`.
    fn batch(&self, step: usize) -> Vec<Vec<u32>> {
        let n = self.windows.len();
        (0..self.settings.batch)
            .map(|j| self.windows[(step * self.settings.batch + j) % n].clone())
            .collect()
    }

    /// The loss of the current transforms on `tokens`, without updating anything.
    pub fn loss(&mut self, tokens: &[Vec<u32>]) -> f64 {
        let p = Params::upload(&self.state.transforms, self.student.device(), NO_GRAD);
        tokens
            .chunks(self.windows_per_pass)
            .map(|pass| {
                let z_fp = self.teacher.forward(pass, &mut self.teacher.new_cache());
                let z_q = self.student.forward(&p, pass);
                let share = pass.len() as f64 / tokens.len() as f64;
                share * scalar(self.settings.loss.compute(z_fp, z_q, pass))
            })
            .sum()
    }

    /// Run one optimiser step; returns the loss before it.
    pub fn step(&mut self) -> Result<f64> {
        let s = &self.settings;
        let step = self.state.step;
        let decay = 1.0 - step as f64 / s.steps as f64;
        let (lr_rot, lr_scale) = (s.lr_rot * decay, s.lr_scale * decay);
        let tokens = self.batch(step);
        // Every loss is a mean over positions and the windows are of one length, so the
        // step's loss and gradient are the passes' weighted by their share of the windows.
        let (mut value, mut g) = (0.0, Vec::new());
        for pass in tokens.chunks(self.windows_per_pass) {
            let share = pass.len() as f64 / tokens.len() as f64;
            let z_fp = self.teacher.forward(pass, &mut self.teacher.new_cache());
            let params = Params::upload(&self.state.transforms, self.student.device(), s.trainable);
            let z_q = self.student.forward(&params, pass);
            let loss = s.loss.compute(z_fp, z_q, pass);
            let v = scalar(loss.clone());
            if !v.is_finite() {
                return Err(Error::other(format!(
                    "calibration diverged at step {}: the loss is {v} (lower the learning rates)",
                    step + 1
                )));
            }
            let grads = loss.backward();
            let gp = params.gradients(&grads, &self.state.transforms);
            if g.is_empty() {
                g = vec![0.0; gp.len()];
            }
            g.iter_mut().zip(gp).for_each(|(a, b)| *a += share * b);
            value += share * v;
        }
        if g.iter().any(|x| !x.is_finite()) {
            return Err(Error::other(format!(
                "calibration diverged at step {}: NaN in the gradients",
                step + 1
            )));
        }
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > CLIP_NORM {
            g.iter_mut().for_each(|x| *x *= CLIP_NORM / norm);
        }
        self.apply(&g, lr_rot, lr_scale);
        self.state.step += 1;
        self.state.losses.push(value);
        Ok(value)
    }

    /// Update every transform from its flat gradient slice.
    fn apply(&mut self, g: &[f64], lr_rot: f64, lr_scale: f64) {
        let s = &self.settings;
        let mut x: Vec<f64> = self.state.transforms.values().collect();
        let (mut at, mut rot, mut sc) = (0, 0, 0);
        let shapes: Vec<Vec<usize>> = self
            .state
            .transforms
            .named()
            .into_iter()
            .map(|(_, shape, _)| shape)
            .collect();
        for shape in shapes {
            let len: usize = shape.iter().product();
            if shape.len() >= 2 {
                let n = shape[shape.len() - 1];
                for k in 0..len / (n * n) {
                    let r = at + k * n * n..at + (k + 1) * n * n;
                    if s.trainable.rotations {
                        self.state.rotations[rot].step(
                            s.optimizer,
                            &mut x[r.clone()],
                            &g[r],
                            lr_rot,
                        );
                    }
                    rot += 1;
                }
            } else {
                if s.trainable.scales {
                    self.state.scales[sc].step(&mut x[at..at + len], &g[at..at + len], lr_scale);
                }
                sc += 1;
            }
            at += len;
        }
        self.state.transforms.set_values(&x);
    }

    /// Run the remaining steps, reporting each; stops with an error when `cancel` is set
    /// (the state so far stays in `self.state`).
    pub fn run(&mut self, events: &mut dyn FnMut(&Event), cancel: &AtomicBool) -> Result<()> {
        self.run_with(events, cancel, &mut |_| Ok(()))
    }

    /// [`run`](Self::run) that also hands the state to `save` every [`SAVE_EVERY`] steps and
    /// at the end.
    pub fn run_with(
        &mut self,
        events: &mut dyn FnMut(&Event),
        cancel: &AtomicBool,
        save: &mut dyn FnMut(&Checkpoint) -> Result<()>,
    ) -> Result<()> {
        let steps = self.settings.steps;
        events(&Event::Started {
            start: self.state.step,
            steps,
        });
        while !self.done() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let t0 = Instant::now();
            let decay = 1.0 - self.state.step as f64 / steps as f64;
            let loss = self.step()?;
            events(&Event::Step {
                step: self.state.step,
                steps,
                loss,
                lr_rot: self.settings.lr_rot * decay,
                lr_scale: self.settings.lr_scale * decay,
                seconds: t0.elapsed().as_secs_f64(),
            });
            if self.state.step.is_multiple_of(SAVE_EVERY) || self.done() {
                save(&self.state)?;
            }
        }
        Ok(())
    }
}

/// Steps between checkpoints.
pub const SAVE_EVERY: usize = 5;

const NO_GRAD: Trainable = Trainable {
    rotations: false,
    scales: false,
};

fn scalar(t: burn::tensor::Tensor<1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .map(|v| v[0])
        .unwrap_or(f64::NAN)
}

/// Transforms learned with `settings`.
#[derive(Debug, Clone)]
pub struct Learned {
    pub transforms: Transforms,
    pub settings: Settings,
    /// The loss of every step.
    pub losses: Vec<f64>,
}

/// Where the checkpoint of a calibration of the model `w` in `model_dir` with `settings`
/// lives. The name carries a fingerprint of the weights, so two different models in folders
/// of the same name never share a checkpoint.
pub fn checkpoint_path(
    model_dir: &std::path::Path,
    w: &LlamaWeights,
    name: &str,
    settings: &Settings,
) -> std::path::PathBuf {
    use sha2::Digest;
    let model = model_dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let mut h = sha2::Sha256::default();
    h.update(serde_json::to_vec(&w.config).expect("config serializes"));
    for t in [
        &w.embed,
        &w.layers[0].wq,
        &w.layers[w.layers.len() - 1].w_down,
    ] {
        for v in t.data.iter().step_by(97) {
            h.update(v.to_le_bytes());
        }
    }
    let print: String = h.finalize()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    crate::assets::home()
        .join("calib")
        .join(format!("{model}-{print}"))
        .join(format!("{name}-{}.safetensors", settings.key()))
}

/// Where a calibration keeps its checkpoint, and whether to ignore an existing one.
pub struct Store<'a> {
    pub path: &'a std::path::Path,
    pub fresh: bool,
}

/// Learn the transforms of `settings`, resuming from (and saving to) the checkpoint of `store`
/// unless it says `fresh`; a finished checkpoint is returned without running anything. Each
/// save writes a temporary file and renames it, so the checkpoint is never half-written.
pub fn learn_resumable(
    w: &LlamaWeights,
    settings: &Settings,
    windows: &[Vec<u32>],
    device: &Device,
    store: Store,
    events: &mut dyn FnMut(&Event),
    cancel: &AtomicBool,
) -> Result<Learned> {
    let (path, fresh) = (store.path, store.fresh);
    let resume = match std::fs::read(path) {
        Ok(bytes) if !fresh => {
            let (c, saved) = Checkpoint::from_bytes(path, &bytes, w)?;
            if &saved != settings {
                return Err(Error::format(
                    path,
                    "the checkpoint was made with other settings (use --fresh to start over)",
                ));
            }
            Some(c)
        }
        _ => None,
    };
    let mut cal = Calibrator::new(w, settings.clone(), windows, device, resume)?;
    let mut save = |c: &Checkpoint| -> Result<()> {
        let dir = path.parent().expect("checkpoint paths have a parent");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, c.to_bytes(settings)?).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    cal.run_with(events, cancel, &mut save)?;
    Ok(Learned {
        losses: cal.state.losses.clone(),
        transforms: cal.state.transforms,
        settings: settings.clone(),
    })
}
