//! Evaluation panel: Wikipedia perplexity, KL and top-1 agreement to the FP model, and the
//! zero-shot tasks, for FP and the chosen methods at one bit setting, as a table and bar
//! charts. Results come from (and go to) the same cache as `ostquant eval` and `results`.

use egui_plot::{Bar, BarChart, Legend, Plot};
use ostquant_core::data::tasks::TaskName;
use ostquant_core::eval::suite::{RowResult, Settings};
use ostquant_core::quant::method::{Bits, Method};
use serde::{Deserialize, Serialize};

use super::app::Shared;
use super::calibrate::BITS;
use super::jobs::{Job, finish};
use super::style::{AFTER, BEFORE};

/// The evaluation form (persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Form {
    pub methods: Vec<Method>,
    pub bits: String,
    /// Perplexity windows (of 512 tokens, or the model's context where shorter).
    pub windows: usize,
    pub zeroshot: bool,
    /// Items per zero-shot task (the first N in file order, spread evenly).
    pub limit: usize,
}

impl Default for Form {
    fn default() -> Self {
        Form {
            methods: vec![Method::Fp, Method::Rtn, Method::Quarot],
            bits: BITS[0].into(),
            windows: 4,
            zeroshot: false,
            limit: 20,
        }
    }
}

impl Form {
    /// The evaluation settings for a model of `positions` positions: windows of 512 tokens,
    /// or of the whole context where the model has fewer.
    fn settings(&self, positions: usize) -> Settings {
        let default = Settings::default();
        Settings {
            ctx: default.ctx.min(positions),
            windows: Some(self.windows),
            tasks: if self.zeroshot {
                TaskName::ALL.to_vec()
            } else {
                Vec::new()
            },
            limit: Some(self.limit),
            ..default
        }
    }
}

pub struct Panel {
    pub form: Form,
    job: Option<Job<RowResult, ()>>,
    pub rows: Vec<RowResult>,
}

impl Panel {
    pub fn new(form: Form) -> Self {
        Panel {
            form,
            job: None,
            rows: Vec::new(),
        }
    }

    pub fn clear(&mut self) {
        self.rows.clear();
    }

    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    /// What the running evaluation measures now ("fp · piqa"), once it has said.
    pub fn stage(&self) -> Option<&str> {
        let (what, _, _) = self.job.as_ref()?.progress.as_ref()?;
        Some(what)
    }

    pub fn cancel(&self) {
        if let Some(j) = &self.job {
            j.cancel();
        }
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        let rows = &mut self.rows;
        if let Some(r) = self.job.as_mut().and_then(|j| {
            j.poll(|row| {
                rows.retain(|r| (r.method, r.bits) != (row.method, row.bits));
                rows.push(row)
            })
        }) {
            let cancelled = self.job.as_ref().is_some_and(|j| j.is_cancelling());
            self.job = None;
            if cancelled {
                shared.notice = Some(format!(
                    "evaluation cancelled; {} rows shown, the tasks measured so far are cached",
                    self.rows.len()
                ));
            } else if finish(r, &mut shared.error).is_some() {
                shared.notice = Some(format!("evaluated {} rows", self.rows.len()));
            }
        }
    }

    pub fn start(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(m) = &shared.model else { return };
        let bits: Bits = match self.form.bits.parse() {
            Ok(b) => b,
            Err(e) => {
                shared.error = Some(e);
                return;
            }
        };
        let positions = m.overview.config.max_position_embeddings;
        let (lab, methods, settings) = (
            m.lab.clone(),
            self.form.methods.clone(),
            self.form.settings(positions),
        );
        self.job = Some(Job::spawn(ctx, "evaluating", move |r| {
            let mut lab = lab
                .lock()
                .map_err(|_| anyhow::anyhow!("the model is unavailable"))?;
            for m in methods {
                if r.cancelled() {
                    break;
                }
                let row = lab.evaluate(
                    m,
                    bits,
                    &settings,
                    &mut |what, d, t| r.progress(&format!("{} · {what}", m.name()), d, t),
                    &r.cancel,
                )?;
                r.event(row);
            }
            Ok(())
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        if shared.model.is_none() {
            ui.label("Open a model to evaluate it.");
            return;
        }
        let ctx = ui.ctx().clone();
        let running = self.job.is_some();
        let window = shared.model.as_ref().map_or(512, |m| {
            let positions = m.overview.config.max_position_embeddings;
            self.form.settings(positions).ctx
        });
        ui.add_enabled_ui(!running, |ui| {
            let f = &mut self.form;
            ui.horizontal_wrapped(|ui| {
                ui.label("Methods");
                for m in Method::ALL {
                    let mut on = f.methods.contains(&m);
                    if ui.checkbox(&mut on, m.name()).changed() {
                        f.methods.retain(|x| *x != m);
                        if on {
                            f.methods.push(m);
                            f.methods
                                .sort_by_key(|x| Method::ALL.iter().position(|y| y == x));
                        }
                    }
                }
            });
            ui.horizontal(|ui| {
                ui.label("Bits");
                egui::ComboBox::from_id_salt("eval bits")
                    .selected_text(f.bits.clone())
                    .show_ui(ui, |ui| {
                        for b in BITS {
                            ui.selectable_value(&mut f.bits, b.to_string(), b);
                        }
                    });
                ui.label(format!("perplexity windows ({window} tokens)"));
                ui.add(egui::DragValue::new(&mut f.windows).range(1..=1000));
                ui.checkbox(&mut f.zeroshot, "nine zero-shot tasks, items per task:");
                ui.add_enabled(
                    f.zeroshot,
                    egui::DragValue::new(&mut f.limit).range(1..=100_000),
                );
            });
        });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!running, egui::Button::new("Evaluate"))
                .clicked()
            {
                self.start(&ctx, shared);
            }
            if let Some(j) = &self.job
                && ui.button("Stop after this row").clicked()
            {
                j.cancel();
            }
        });
        ui.weak("Learned methods calibrate with their preset first (or reuse its checkpoint); results are cached, so a rerun is instant.");
        if let Some(j) = &self.job {
            j.show(ui);
        }
        if self.rows.is_empty() {
            return;
        }
        self.table(ui);
        self.charts(ui);
    }

    fn table(&self, ui: &mut egui::Ui) {
        let tasks: Vec<TaskName> = self
            .rows
            .iter()
            .flat_map(|r| r.zeroshot.iter().map(|t| t.task))
            .fold(Vec::new(), |mut v, t| {
                if !v.contains(&t) {
                    v.push(t);
                }
                v
            });
        egui::ScrollArea::horizontal().show(ui, |ui| {
            egui::Grid::new("eval table").striped(true).show(ui, |ui| {
                for h in [
                    "method",
                    "bits",
                    "wiki ppl",
                    "KL to FP",
                    "top-1 agree",
                    "0-shot avg",
                ] {
                    ui.strong(h);
                }
                for t in &tasks {
                    ui.strong(t.name());
                }
                ui.end_row();
                for r in &self.rows {
                    ui.label(r.method.name());
                    ui.label(r.bits.to_string());
                    ui.label(format!("{:.3}", r.wiki.ppl));
                    ui.label(r.wiki.kl.map_or("–".into(), |k| format!("{k:.4}")));
                    ui.label(
                        r.wiki
                            .top1
                            .map_or("–".into(), |t| format!("{:.1}%", 100.0 * t)),
                    );
                    // ± the standard error: a user comparing rows a point apart sees it.
                    ui.label(match (r.zeroshot_avg(), r.zeroshot_se()) {
                        (Some(a), Some(se)) => format!("{a:.2} ± {se:.2}"),
                        _ => "–".into(),
                    });
                    for t in &tasks {
                        let s = r.zeroshot.iter().find(|s| s.task == *t);
                        ui.label(s.map_or("–".into(), |s| format!("{:.1}", s.percent())));
                    }
                    ui.end_row();
                }
            });
        });
    }

    fn charts(&self, ui: &mut egui::Ui) {
        // One chart per measure, FP and quantized rows as two series (two legend colours),
        // a bar per row at x = its index, labelled there only.
        let series = |f: &dyn Fn(&RowResult) -> Option<f64>| -> [BarChart; 2] {
            let bars = |fp: bool| -> Vec<Bar> {
                let rows = self.rows.iter().enumerate();
                rows.filter(|(_, r)| (r.method == Method::Fp) == fp)
                    .filter_map(|(i, r)| {
                        let name = format!("{} {}", r.method.name(), r.bits);
                        f(r).map(|v| Bar::new(i as f64, v).width(0.6).name(name))
                    })
                    .collect()
            };
            [
                BarChart::new("FP", bars(true)).color(BEFORE),
                BarChart::new("quantized", bars(false)).color(AFTER),
            ]
        };
        let labels: Vec<String> = self
            .rows
            .iter()
            .map(|r| r.method.name().to_string())
            .collect();
        let label_at = move |v: f64| -> String {
            let i = v.round();
            match (v - i).abs() < 1e-6 && i >= 0.0 {
                true => labels.get(i as usize).cloned().unwrap_or_default(),
                false => String::new(),
            }
        };
        let h = (ui.available_height() - 10.0).max(120.0);
        let chart = |ui: &mut egui::Ui, id: &str, label: &str, log: bool, bars: [BarChart; 2]| {
            let at = label_at.clone();
            let mut plot = Plot::new(id)
                .legend(Legend::default())
                .height(h)
                .y_axis_label(label)
                .x_axis_formatter(move |m, _| at(m.value));
            if log {
                // Bars of log10(value): one quantized row at 2000 next to FP at 20 stays readable.
                plot = plot.y_axis_formatter(|m, _| format!("{:.0}", 10f64.powf(m.value)));
            }
            plot.show(ui, |p| bars.into_iter().for_each(|b| p.bar_chart(b)));
        };
        let ppl = series(&|r| Some(r.wiki.ppl.log10()));
        let ppl_label = "Wikipedia perplexity (log scale, lower is better)";
        if self.rows.iter().any(|r| r.zeroshot_avg().is_some()) {
            ui.columns(2, |cols| {
                chart(&mut cols[0], "ppl bars", ppl_label, true, ppl);
                let zs = series(&|r| r.zeroshot_avg());
                let zs_label = "zero-shot average % (higher is better)";
                chart(&mut cols[1], "zeroshot bars", zs_label, false, zs);
            });
        } else {
            chart(ui, "ppl bars", ppl_label, true, ppl);
        }
    }
}
