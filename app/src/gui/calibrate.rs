//! Calibration panel: learn OSTQuant's (or SpinQuant-style) transforms with a live loss curve,
//! cancel and resume, then export the quantized model folder.

use std::path::PathBuf;
use std::sync::Arc;

use egui_plot::{Legend, Line, Plot, PlotPoints};
use ostquant_core::calib::{Event, Learned, Loss, Preset, SAVE_EVERY, Settings as CalibSettings};
use ostquant_core::eval::suite::Settings;
use ostquant_core::quant::method::{Bits, Method, Rounding};
use serde::{Deserialize, Serialize};

use super::app::{LearnedRun, Shared};
use super::dialog::{self, Pick, Picked};
use super::jobs::{Job, finish};

pub const BITS: [&str; 3] = ["W4A4KV4", "W4A4KV16", "W4A16KV16"];
const LOSSES: [&str; 5] = ["kl-top", "kl-top:100", "kl", "ce", "mse"];

/// The calibration form (persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Form {
    pub method: Method,
    pub bits: String,
    pub preset: Preset,
    pub steps: usize,
    pub batch: usize,
    pub samples: usize,
    pub seq_len: usize,
    pub lr_rot: f64,
    pub lr_scale: f64,
    pub loss: String,
    /// Start over instead of resuming from the checkpoint.
    pub fresh: bool,
    /// The method and bits of the export section.
    pub export_method: Method,
    pub export_bits: String,
    /// How the export rounds weights, where the method lets it choose (see
    /// [`Form::export_rounding`]).
    pub export_rounding: Rounding,
}

impl Default for Form {
    fn default() -> Self {
        let mut f = Form {
            method: Method::Ostquant,
            bits: BITS[0].into(),
            preset: Preset::Cpu,
            steps: 0,
            batch: 0,
            samples: 0,
            seq_len: 0,
            lr_rot: 0.0,
            lr_scale: 0.0,
            loss: String::new(),
            fresh: false,
            export_method: Method::Ostquant,
            export_bits: BITS[0].into(),
            export_rounding: Rounding::Gptq,
        };
        f.reset();
        f
    }
}

impl Form {
    /// Fill the sizes, rates and loss with the method's preset at the chosen bits.
    pub fn reset(&mut self) {
        let bits: Bits = self.bits.parse().unwrap_or(Bits { w: 4, a: 4, kv: 4 });
        if let Some(s) = self.method.learned_settings(bits, self.preset) {
            self.steps = s.steps;
            self.batch = s.batch;
            self.samples = s.samples;
            self.seq_len = s.seq_len;
            self.lr_rot = s.lr_rot;
            self.lr_scale = s.lr_scale;
            self.loss = match s.loss {
                Loss::KlTop(1000) => "kl-top".into(),
                other => other.name().replace("kl-top", "kl-top:"),
            };
        }
    }

    /// How the export rounds weights: the choice where the method allows it. Methods that round
    /// to nearest (rtn, quarot, …) have no choice; gptq and quarot-gptq choose the column
    /// order; learned methods may also round to nearest.
    fn export_rounding(&self) -> Rounding {
        let m = self.export_method;
        match (m.rounding(), self.export_rounding) {
            (Rounding::Rtn, _) => Rounding::Rtn,
            (_, Rounding::Rtn) if !m.is_learned() => m.rounding(),
            (_, chosen) => chosen,
        }
    }

    /// Whether the sizes and learning rates are the preset's (else the form says "edited").
    fn is_preset(&self) -> bool {
        let bits: Bits = self.bits.parse().unwrap_or(Bits { w: 4, a: 4, kv: 4 });
        self.method
            .learned_settings(bits, self.preset)
            .is_none_or(|s| {
                (s.steps, s.batch, s.samples, s.seq_len)
                    == (self.steps, self.batch, self.samples, self.seq_len)
                    && s.lr_rot == self.lr_rot
                    && s.lr_scale == self.lr_scale
            })
    }

    /// The settings this form asks for.
    pub fn settings(&self) -> Result<(Bits, CalibSettings), String> {
        let bits: Bits = self.bits.parse()?;
        let base = self
            .method
            .learned_settings(bits, self.preset)
            .ok_or_else(|| format!("{} learns nothing", self.method.name()))?;
        let s = CalibSettings {
            steps: self.steps,
            batch: self.batch,
            samples: self.samples,
            seq_len: self.seq_len,
            lr_rot: self.lr_rot,
            lr_scale: self.lr_scale,
            loss: Loss::parse(&self.loss)?,
            ..base
        };
        s.validate().map_err(|e| e.to_string())?;
        Ok((bits, s))
    }
}

/// One step of the live curve.
#[derive(Debug, Clone, Copy)]
pub struct StepPoint {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub seconds: f64,
}

pub struct Panel {
    pub form: Form,
    job: Option<Job<Event, Learned>>,
    export: Option<Job<(), (PathBuf, u64)>>,
    picking: Option<Job<(), Picked>>,
    /// The export row's typed output folder.
    export_path: String,
    /// A folder chosen in the dialog, exported on the next frame.
    pending_export: Option<PathBuf>,
    /// The curve of the current (or last) calibration.
    pub points: Vec<StepPoint>,
    /// Steps already done when the run started (resumed from a checkpoint) and steps asked
    /// for; None while the run prepares.
    pub started: Option<(usize, usize)>,
    /// Every step's loss of the last finished run, the checkpoint's steps included.
    history: Vec<f64>,
    /// Mean CPU time of the window's frames while the calibration runs (ms), drawing included:
    /// on a machine without a GPU the window's software rendering competes with the run.
    pub frame_ms: Option<f64>,
    /// Set when a calibration has just finished (the window then inspects its transforms).
    pub finished: bool,
}

impl Panel {
    pub fn new(form: Form) -> Self {
        Panel {
            form,
            job: None,
            export: None,
            picking: None,
            pending_export: None,
            export_path: String::new(),
            points: Vec::new(),
            started: None,
            history: Vec::new(),
            frame_ms: None,
            finished: false,
        }
    }

    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    pub fn is_exporting(&self) -> bool {
        self.export.is_some()
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        let points = &mut self.points;
        let started = &mut self.started;
        if let Some(job) = self.job.as_mut()
            && let Some(r) = job.poll(|e| match e {
                Event::Started { start, steps } => *started = Some((start, steps)),
                Event::Step {
                    step,
                    steps,
                    loss,
                    seconds,
                    ..
                } => points.push(StepPoint {
                    step,
                    steps,
                    loss,
                    seconds,
                }),
            })
        {
            let cancelled = job.is_cancelling();
            self.job = None;
            match r {
                Err(_) if cancelled => {
                    // Checkpoints are written every SAVE_EVERY steps: say which one is left.
                    let start = self.started.map_or(0, |s| s.0);
                    let last = start + self.points.len();
                    let kept = start.max(last / SAVE_EVERY * SAVE_EVERY);
                    shared.notice = Some(if kept > 0 {
                        format!(
                            "calibration cancelled at step {last}; the checkpoint of step {kept} is kept: Start resumes from it"
                        )
                    } else {
                        format!(
                            "calibration cancelled before its first checkpoint (step {SAVE_EVERY}): nothing was kept"
                        )
                    });
                }
                r => {
                    if let Some(l) = finish(r, &mut shared.error) {
                        let bits = self.form.bits.parse().unwrap_or(Bits::FP);
                        shared.notice = Some(format!(
                            "{} learned at {bits}: loss {:.4} to {:.4}; the inspector is measuring its QSUR",
                            self.form.method.name(),
                            l.losses.first().copied().unwrap_or(f64::NAN),
                            l.losses.last().copied().unwrap_or(f64::NAN),
                        ));
                        self.history = l.losses.clone();
                        shared.learned = Some(LearnedRun {
                            method: self.form.method,
                            bits,
                            learned: Arc::new(l),
                        });
                        self.finished = true;
                    }
                }
            }
        }
        if let Some(r) = self.export.as_mut().and_then(|j| j.poll(|_| {})) {
            self.export = None;
            if let Some((out, bytes)) = finish(r, &mut shared.error) {
                shared.notice = Some(format!(
                    "wrote {} ({:.1} MB): chat with it in the Chat panel",
                    out.display(),
                    bytes as f64 / 1e6
                ));
            }
        }
        if let Some(r) = self.picking.as_mut().and_then(|j| j.poll(|_| {})) {
            self.picking = None;
            match finish(r, &mut shared.error) {
                Some(Picked { path: Some(out), .. }) => self.pending_export = Some(out),
                Some(Picked {
                    no_dialog: true, ..
                }) => {
                    shared.error = Some(
                        "no file dialog could open on this desktop (it needs xdg-desktop-portal or zenity installed): type the output folder beside the Export button instead".into(),
                    )
                }
                _ => {}
            }
        }
    }

    /// Start (or resume) the calibration the form describes.
    pub fn start(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(m) = &shared.model else { return };
        let (_, settings) = match self.form.settings() {
            Ok(s) => s,
            Err(e) => {
                shared.error = Some(format!("calibration settings: {e}"));
                return;
            }
        };
        let (lab, method, fresh) = (m.lab.clone(), self.form.method, self.form.fresh);
        self.points.clear();
        self.started = None;
        self.history.clear();
        self.frame_ms = None;
        self.job = Some(Job::spawn(
            ctx,
            format!("calibrating {}", method.name()),
            move |r| {
                let lab = lab
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the model is unavailable"))?;
                Ok(lab.learn(
                    method,
                    &settings,
                    fresh,
                    &mut |e| r.event(e.clone()),
                    &r.cancel,
                )?)
            },
        ));
    }

    pub fn cancel(&self) {
        if let Some(j) = &self.job {
            j.cancel();
        }
    }

    /// Quantize with the export section's method and bits and write the folder `out`.
    pub fn export_to(&mut self, ctx: &egui::Context, shared: &mut Shared, out: PathBuf) {
        let Some(m) = &shared.model else { return };
        let method = self.form.export_method;
        let bits: Bits = match self.form.export_bits.parse() {
            Ok(b) => b,
            Err(e) => {
                shared.error = Some(e);
                return;
            }
        };
        let learned = match (&shared.learned, method.is_learned()) {
            (Some(l), true) if l.method == method && l.bits == bits => Some(l.learned.clone()),
            (_, true) => {
                shared.error = Some(format!(
                    "calibrate {} at {bits} first (above), then export",
                    method.name()
                ));
                return;
            }
            _ => None,
        };
        let lab = m.lab.clone();
        let (rounding, own) = (self.form.export_rounding(), method.rounding());
        let s = Settings {
            w_rtn: rounding == Rounding::Rtn && own == Rounding::Gptq,
            act_order: rounding == Rounding::GptqActOrder,
            ..Settings::default()
        };
        self.export = Some(Job::spawn(
            ctx,
            format!("exporting {}", out.display()),
            move |r| {
                let mut lab = lab
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the model is unavailable"))?;
                let bytes = lab.export(
                    method,
                    bits,
                    &s,
                    learned.as_deref(),
                    &out,
                    &mut |w, d, t| r.progress(w, d, t),
                    &r.cancel,
                )?;
                Ok((out, bytes))
            },
        ));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        if shared.model.is_none() {
            ui.label("Open a model to calibrate it.");
            return;
        }
        let ctx = ui.ctx().clone();
        if let Some(out) = self.pending_export.take() {
            self.export_to(&ctx, shared, out);
        }
        let running = self.job.is_some();
        ui.heading("Learn the transforms");
        ui.add_enabled_ui(!running, |ui| self.form_ui(ui));
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!running, egui::Button::new("Start"))
                .on_hover_text("Resumes from the saved checkpoint of the same settings unless 'start over' is ticked")
                .clicked()
            {
                self.start(&ctx, shared);
            }
            if ui.add_enabled(running, egui::Button::new("Cancel")).clicked() {
                self.cancel();
            }
        });
        if let Some(j) = &self.job {
            j.show(ui);
            if let Some(dt) = shared.frame_ms {
                self.frame_ms = Some(self.frame_ms.map_or(dt, |m| 0.9 * m + 0.1 * dt));
            }
        }
        if let Some(p) = self.points.last() {
            let mean =
                self.points.iter().map(|p| p.seconds).sum::<f64>() / self.points.len() as f64;
            let eta = mean * p.steps.saturating_sub(p.step) as f64;
            ui.label(format!(
                "step {}/{} · loss {:.4} · {:.1} s/step · ETA {:.0} s{}",
                p.step,
                p.steps,
                p.loss,
                mean,
                eta,
                self.frame_ms
                    .map(|f| format!(" · UI frame {f:.1} ms"))
                    .unwrap_or_default()
            ));
        } else if self.job.is_some() {
            ui.label(match self.started {
                None => "preparing: calibration text, the FP model's outputs on it, the starting \
                         transforms (the WOMI start takes an eigendecomposition)"
                    .to_string(),
                Some((start, steps)) if start >= steps => format!(
                    "the checkpoint of these settings already holds all {steps} steps: \
                     finishing from it (tick 'start over' to learn again)"
                ),
                Some((0, steps)) => {
                    format!("step 1 of {steps} running (a step is tens of seconds on a CPU)")
                }
                Some((start, steps)) => format!(
                    "resumed from the checkpoint of step {start}: step {} of {steps} running",
                    start + 1
                ),
            });
        }
        if self.points.is_empty() && self.job.is_none() {
            ui.weak(
                "The loss of every step is plotted here while a calibration runs; a checkpoint \
                 is saved every 5 steps, so Cancel loses little and Start resumes.",
            );
        }
        // While running, the steps of this run; after, every step of the checkpoint too.
        let curve: PlotPoints = if self.history.len() > self.points.len() {
            let steps = self.history.iter().enumerate();
            steps.map(|(i, &l)| [(i + 1) as f64, l]).collect()
        } else {
            let steps = self.points.iter();
            steps.map(|p| [p.step as f64, p.loss]).collect()
        };
        // Axes from step 0 to the last step asked for and loss 0 to 1 at least, even before
        // a point (losses are positive; KL-Top starts near 1 on SmolLM2).
        let last_step = self.started.map_or(self.form.steps, |s| s.1);
        Plot::new("loss")
            .legend(Legend::default())
            .height((ui.available_height() - 90.0).max(120.0))
            .include_x(0.0)
            .include_x(last_step as f64)
            .include_y(0.0)
            .include_y(1.0)
            .x_axis_label("step")
            .y_axis_label("loss")
            .show(ui, |p| p.line(Line::new("calibration loss", curve)));
        ui.separator();
        self.export_ui(ui, shared);
    }

    fn form_ui(&mut self, ui: &mut egui::Ui) {
        let f = &mut self.form;
        let mut changed = false;
        egui::Grid::new("calib form").num_columns(4).show(ui, |ui| {
            ui.label("Method");
            egui::ComboBox::from_id_salt("calib method")
                .selected_text(f.method.name())
                .show_ui(ui, |ui| {
                    for m in Method::ALL.into_iter().filter(|m| m.is_learned()) {
                        changed |= ui.selectable_value(&mut f.method, m, m.name()).changed();
                    }
                });
            ui.label("Bits");
            egui::ComboBox::from_id_salt("calib bits")
                .selected_text(f.bits.clone())
                .show_ui(ui, |ui| {
                    for b in BITS {
                        changed |= ui.selectable_value(&mut f.bits, b.to_string(), b).changed();
                    }
                });
            ui.end_row();
            ui.label("Preset");
            ui.horizontal(|ui| {
                changed |= ui
                    .selectable_value(&mut f.preset, Preset::Cpu, "cpu")
                    .changed();
                changed |= ui
                    .selectable_value(&mut f.preset, Preset::Paper, "paper")
                    .changed();
            });
            ui.label("Loss");
            egui::ComboBox::from_id_salt("calib loss")
                .selected_text(f.loss.clone())
                .show_ui(ui, |ui| {
                    for l in LOSSES {
                        ui.selectable_value(&mut f.loss, l.to_string(), l);
                    }
                });
            ui.end_row();
            ui.label("Steps");
            ui.add(egui::DragValue::new(&mut f.steps).range(1..=10_000));
            ui.label("Windows per step");
            ui.add(egui::DragValue::new(&mut f.batch).range(1..=64));
            ui.end_row();
            ui.label("Calibration windows");
            ui.add(egui::DragValue::new(&mut f.samples).range(1..=1024));
            ui.label("Tokens per window");
            ui.add(egui::DragValue::new(&mut f.seq_len).range(16..=4096));
            ui.end_row();
            ui.label("LR rotations");
            ui.add(
                egui::DragValue::new(&mut f.lr_rot)
                    .speed(1e-4)
                    .max_decimals(5),
            );
            ui.label("LR scales");
            ui.add(
                egui::DragValue::new(&mut f.lr_scale)
                    .speed(1e-4)
                    .max_decimals(5),
            );
            ui.end_row();
        });
        ui.horizontal(|ui| {
            ui.checkbox(&mut f.fresh, "start over (ignore the checkpoint)");
            if ui.button("Reset to preset").clicked() {
                changed = true;
            }
            if !f.is_preset() {
                let preset = format!("{:?}", f.preset).to_lowercase();
                ui.weak(format!(
                    "(edited: the sizes or rates differ from the {preset} preset)"
                ));
            }
        });
        if changed {
            f.reset();
        }
    }

    fn export_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Export the quantized model");
        let f = &mut self.form;
        ui.horizontal(|ui| {
            ui.label("Method");
            egui::ComboBox::from_id_salt("export method")
                .selected_text(f.export_method.name())
                .show_ui(ui, |ui| {
                    for m in Method::ALL.into_iter().filter(|m| *m != Method::Fp) {
                        ui.selectable_value(&mut f.export_method, m, m.name());
                    }
                });
            ui.label("Bits");
            egui::ComboBox::from_id_salt("export bits")
                .selected_text(f.export_bits.clone())
                .show_ui(ui, |ui| {
                    for b in BITS {
                        ui.selectable_value(&mut f.export_bits, b.to_string(), b);
                    }
                });
            ui.label("Weights");
            let chosen = f.export_rounding();
            ui.add_enabled_ui(f.export_method.rounding() == Rounding::Gptq, |ui| {
                egui::ComboBox::from_id_salt("export rounding")
                    .selected_text(rounding_label(chosen))
                    .show_ui(ui, |ui| {
                        let mut choices = vec![Rounding::Gptq, Rounding::GptqActOrder];
                        if f.export_method.is_learned() {
                            choices.push(Rounding::Rtn);
                        }
                        for r in choices {
                            ui.selectable_value(&mut f.export_rounding, r, rounding_label(r));
                        }
                    })
                    .response
                    .on_hover_text(
                        "GPTQ in order (the paper's setting) or by decreasing input energy \
                         (act-order); learned methods may also round to nearest. The baselines \
                         name their rounding: rtn or gptq, quarot or quarot-gptq",
                    );
            });
            let idle = self.export.is_none() && self.picking.is_none() && self.job.is_none();
            if ui
                .add_enabled(idle, egui::Button::new("Export int4 folder…"))
                .on_hover_text("Learned methods use the transforms calibrated above")
                .clicked()
            {
                // The suggested name says a rounding other than the method's own.
                let rounding = f.export_rounding();
                let name = format!(
                    "{}-{}{}",
                    f.export_method.name(),
                    f.export_bits.to_lowercase(),
                    if rounding == f.export_method.rounding() {
                        String::new()
                    } else {
                        format!("-{rounding}")
                    }
                );
                self.picking = Some(dialog::pick(
                    ui.ctx(),
                    "Write the quantized model folder",
                    Pick::Save(name),
                ));
            }
            let hint = "or type the output folder, Enter";
            if let Some(out) = dialog::path_box(ui, idle, &mut self.export_path, hint) {
                self.pending_export = Some(out);
            }
        });
        if let Some(j) = &self.export {
            j.show(ui);
            if ui.button("Cancel export").clicked() {
                j.cancel();
            }
        }
        if let Some(l) = &shared.learned {
            ui.weak(format!(
                "learned in this window: {} at {}",
                l.method.name(),
                l.bits
            ));
        }
    }
}

/// What the export's weights combo calls a rounding.
fn rounding_label(r: Rounding) -> &'static str {
    match r {
        Rounding::Gptq => "GPTQ",
        Rounding::GptqActOrder => "GPTQ, act-order",
        Rounding::Rtn => "round to nearest",
    }
}
