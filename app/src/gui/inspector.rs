//! Layer inspector: QSUR of every quantized input and weight per layer, before and after a
//! transform, as a coloured table; a click shows that tensor's eigenvalue spectrum and
//! per-channel max |x|, before and after.

use std::sync::Arc;

use egui_plot::{Legend, Line, Plot, PlotPoints};
use ostquant_core::analysis::inspect::{Inspection, TENSOR_NAMES, TensorStats};
use ostquant_core::calib::Learned;
use ostquant_core::quant::method::Method;

use super::app::Shared;
use super::jobs::{Job, finish};
use super::style::{AFTER, BEFORE, qsur_colour};

/// Columns of the table: the four quantized activations, then the seven weights.
const COLUMNS: [&str; 11] = TENSOR_NAMES;
/// Widths of the QSUR table's layer column and value cells (header and rows share them).
const LAYER_WIDTH: f32 = 40.0;
const CELL_WIDTH: f32 = 74.0;

/// Transforms the inspector offers without calibration.
const FIXED: [Method; 2] = [Method::Quarot, Method::SmoothQuant];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Before,
    After,
    Gain,
}

pub struct Panel {
    /// The transform compared with "none"; `None` means the window's learned transforms.
    pub method: Option<Method>,
    pub windows: usize,
    pub show: Show,
    /// Windows measured, before, after.
    job: Option<Job<(), (usize, Inspection, Inspection)>>,
    pub before: Option<Inspection>,
    /// The windows `before` was measured over.
    before_windows: usize,
    pub after: Option<Inspection>,
    pub selected: Option<(usize, String)>,
}

impl Default for Panel {
    fn default() -> Self {
        Panel {
            method: Some(Method::Quarot),
            windows: 4,
            show: Show::After,
            job: None,
            before: None,
            before_windows: 0,
            after: None,
            selected: None,
        }
    }
}

impl Panel {
    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        if let Some(r) = self.job.as_mut().and_then(|j| j.poll(|_| {})) {
            let cancelled = self.job.as_ref().is_some_and(|j| j.is_cancelling());
            self.job = None;
            if cancelled {
                shared.notice = Some("inspection cancelled".into());
            } else if let Some((windows, b, a)) = finish(r, &mut shared.error) {
                shared.notice = Some(format!(
                    "inspected {} and {} over {} tokens",
                    b.method, a.method, b.tokens
                ));
                self.before = Some(b);
                self.before_windows = windows;
                self.after = Some(a);
            }
        }
    }

    /// Start measuring "none" and the chosen transform.
    pub fn start(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(m) = &shared.model else { return };
        let (method, learned): (Method, Option<Arc<Learned>>) = match self.method {
            Some(m) => (m, None),
            None => {
                match &shared.learned {
                    Some(l) => (l.method, Some(l.learned.clone())),
                    None => {
                        shared.error = Some("calibrate first (Calibrate panel), then inspect the learned transforms".into());
                        return;
                    }
                }
            }
        };
        let lab = m.lab.clone();
        let windows = self.windows;
        // The untransformed model's figures depend on the windows only: measured once.
        let measured = self
            .before
            .clone()
            .filter(|_| self.before_windows == windows);
        let passes = if measured.is_some() { 1 } else { 2 };
        self.job = Some(Job::spawn(ctx, "inspecting", move |r| {
            let lab = lab
                .lock()
                .map_err(|_| anyhow::anyhow!("the model is unavailable"))?;
            let before = match measured {
                Some(b) => b,
                None => lab.inspect(
                    Method::Fp,
                    None,
                    windows,
                    &mut |d, t| r.progress("pass 1 of 2: the model as it is", d, t),
                    &r.cancel,
                )?,
            };
            let what = format!("pass {passes} of {passes}: with {}", method.name());
            let after = lab.inspect(
                method,
                learned.as_deref(),
                windows,
                &mut |d, t| r.progress(&what, d, t),
                &r.cancel,
            )?;
            Ok((windows, before, after))
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        if shared.model.is_none() {
            ui.label("Open a model to inspect its layers.");
            return;
        }
        let ctx = ui.ctx().clone();
        ui.horizontal(|ui| {
            ui.label("Transform");
            let name = |m: Option<Method>| match m {
                Some(m) => m.name().to_string(),
                None => "learned (this window)".into(),
            };
            egui::ComboBox::from_id_salt("inspect method")
                .selected_text(name(self.method))
                .show_ui(ui, |ui| {
                    for m in FIXED {
                        ui.selectable_value(&mut self.method, Some(m), m.name());
                    }
                    if shared.learned.is_some() {
                        ui.selectable_value(&mut self.method, None, name(None));
                    }
                });
            ui.label("windows of 512 tokens");
            ui.add(egui::DragValue::new(&mut self.windows).range(1..=64));
            if ui
                .add_enabled(self.job.is_none(), egui::Button::new("Inspect"))
                .clicked()
            {
                self.start(&ctx, shared);
            }
            if let Some(j) = &self.job
                && ui.button("Cancel").clicked()
            {
                j.cancel();
            }
        });
        if let Some(j) = &self.job {
            j.show(ui);
        }
        let (Some(before), Some(after)) = (&self.before, &self.after) else {
            ui.label(
                "QSUR (quantization space utilization rate, from the OSTQuant paper) says how much \
                 of the quantization grid a tensor's distribution fills: higher is better. Press Inspect \
                 to measure every layer before and after the transform.",
            );
            return;
        };
        ui.horizontal(|ui| {
            ui.label("Show");
            ui.selectable_value(&mut self.show, Show::Before, "none");
            ui.selectable_value(&mut self.show, Show::After, after.method.as_str());
            ui.selectable_value(&mut self.show, Show::Gain, "gain (after - before)");
        });
        ui.weak(
            "Cells: per-dimension QSUR ratio (0–1). Red = poor use of the 4-bit grid, green = \
             good; click a cell for its spectrum. '–': fewer samples than dimensions (more \
             windows help; a weight with no more rows than columns has none).",
        );
        let value = |s: &TensorStats| s.qsur.map(|q| q.rel);
        let layers = before.stats.iter().map(|s| s.layer + 1).max().unwrap_or(0);
        // The header is a grid of its own above the scrolled rows, so it stays in view; fixed
        // cell widths line the two grids' columns up.
        egui::Grid::new("qsur header")
            .min_col_width(0.0)
            .show(ui, |ui| {
                let head = |ui: &mut egui::Ui, w: f32, text: &str| {
                    ui.add_sized(
                        [w, 18.0],
                        egui::Label::new(egui::RichText::new(text).strong()),
                    );
                };
                head(ui, LAYER_WIDTH, "layer");
                for c in COLUMNS {
                    head(ui, CELL_WIDTH, c);
                }
                ui.end_row();
            });
        egui::ScrollArea::vertical()
            .id_salt("qsur table")
            // Half the height when a cell's plots share it, else nearly all of it.
            .max_height(ui.available_height() * if self.selected.is_some() { 0.5 } else { 0.95 })
            .show(ui, |ui| {
                egui::Grid::new("qsur")
                    .striped(true)
                    .min_col_width(0.0)
                    .show(ui, |ui| {
                        for layer in 0..layers {
                            ui.add_sized([LAYER_WIDTH, 20.0], egui::Label::new(layer.to_string()));
                            for c in COLUMNS {
                                let (b, a) = (
                                    before.get(layer, c).and_then(value),
                                    after.get(layer, c).and_then(value),
                                );
                                let shown = match self.show {
                                    Show::Before => b,
                                    Show::After => a,
                                    Show::Gain => a.zip(b).map(|(a, b)| a - b),
                                };
                                let (text, fill) = match (shown, self.show) {
                                    (None, _) => ("–".to_string(), ui.visuals().faint_bg_color),
                                    (Some(v), Show::Gain) => {
                                        (format!("{v:+.3}"), qsur_colour(0.5 + v * 2.5))
                                    }
                                    (Some(v), _) => (format!("{v:.3}"), qsur_colour(v / 0.6)),
                                };
                                let selected =
                                    self.selected.as_ref() == Some(&(layer, c.to_string()));
                                let button = egui::Button::new(
                                    egui::RichText::new(text)
                                        .color(egui::Color32::BLACK)
                                        .monospace(),
                                )
                                .fill(fill)
                                .selected(selected);
                                // The selected cell keeps its colour and gets a white frame.
                                let button = match selected {
                                    true => {
                                        button.stroke(egui::Stroke::new(2.5, egui::Color32::WHITE))
                                    }
                                    false => button,
                                };
                                if ui.add_sized([CELL_WIDTH, 20.0], button).clicked() {
                                    self.selected = Some((layer, c.to_string()));
                                }
                            }
                            ui.end_row();
                        }
                    });
            });
        if let Some((layer, name)) = &self.selected
            && let (Some(b), Some(a)) = (before.get(*layer, name), after.get(*layer, name))
        {
            detail(ui, b, a, &after.method);
        }
    }
}

/// Spectrum and channel maxima of one tensor, before and after.
fn detail(ui: &mut egui::Ui, b: &TensorStats, a: &TensorStats, method: &str) {
    let kind = if b.is_weight {
        "weight rows"
    } else {
        "input activations"
    };
    ui.horizontal(|ui| {
        ui.strong(format!(
            "layer {} · {} ({kind}, {} dims)",
            b.layer, b.name, b.dim
        ));
        // Say why two spectra coincide (else one looks like a missing line), or why not.
        let same = b.eigenvalues.len() == a.eigenvalues.len()
            && b.eigenvalues
                .iter()
                .zip(&a.eigenvalues)
                .all(|(x, y)| (x - y).abs() <= 1e-3 * x.abs().max(y.abs()) + 1e-12);
        ui.weak(if same {
            "The two spectra coincide: a rotation leaves the eigenvalues as they are; it \
             spreads the channel maxima."
        } else {
            "The spectra differ: besides rotating, the transform changed these values (norm \
             weights folded into a layer's weights, smoothing or learned scales)."
        });
    });
    let log_points = |v: &[f64]| -> PlotPoints {
        v.iter()
            .enumerate()
            .map(|(i, &x)| [i as f64, x.max(1e-30).log10()])
            .collect()
    };
    let points =
        |v: &[f64]| -> PlotPoints { v.iter().enumerate().map(|(i, &x)| [i as f64, x]).collect() };
    let h = (ui.available_height() - 30.0).max(120.0);
    ui.columns(2, |cols| {
        Plot::new("spectrum")
            .legend(Legend::default())
            .height(h)
            .x_axis_label("eigenvalue index (sorted)")
            .y_axis_label("log10 eigenvalue")
            .show(&mut cols[0], |p| {
                p.line(Line::new("none", log_points(&b.eigenvalues)).color(BEFORE));
                p.line(Line::new(method, log_points(&a.eigenvalues)).color(AFTER));
            });
        Plot::new("channels")
            .legend(Legend::default())
            .height(h)
            .x_axis_label(if b.is_weight { "column" } else { "channel" })
            .y_axis_label(if b.is_weight {
                "max |w| over the rows"
            } else {
                "max |x| over the tokens"
            })
            .show(&mut cols[1], |p| {
                p.line(Line::new("none", points(&b.max_abs)).color(BEFORE));
                p.line(Line::new(method, points(&a.max_abs)).color(AFTER));
            });
    });
}
