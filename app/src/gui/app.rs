//! The window's state: the open model, the five panels, and what persists between runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ostquant_core::assets;
use ostquant_core::calib::Learned;
use ostquant_core::device::{self, DeviceChoice};
use ostquant_core::eval::suite::Lab;
use ostquant_core::model::qformat;
use ostquant_core::quant::method::{Bits, Method};
use serde::{Deserialize, Serialize};

use super::dialog::{self, Pick, Picked};
use super::jobs::{Job, finish};
use super::overview::Overview;
use super::{calibrate, chat, evaluate, inspector, overview};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tab {
    Overview,
    Inspector,
    Calibrate,
    Evaluate,
    Chat,
}

impl Tab {
    const ALL: [Tab; 5] = [
        Tab::Overview,
        Tab::Inspector,
        Tab::Calibrate,
        Tab::Evaluate,
        Tab::Chat,
    ];

    fn label(self) -> &'static str {
        match self {
            Tab::Overview => "Overview",
            Tab::Inspector => "Inspector",
            Tab::Calibrate => "Calibrate",
            Tab::Evaluate => "Evaluate",
            Tab::Chat => "Chat",
        }
    }
}

/// An opened model: the lab (FP weights and model, text, tasks) behind a lock that only
/// background jobs take, and what the overview shows.
pub struct Opened {
    pub dir: PathBuf,
    pub lab: Arc<Mutex<Lab>>,
    pub overview: Overview,
    /// The int4 folder the user opened, when `dir` is the original it was made from: it
    /// goes to the chat as the quantized model.
    pub int4: Option<PathBuf>,
}

/// Transforms learned in this window, for the inspector, the evaluation and the export.
pub struct LearnedRun {
    pub method: Method,
    pub bits: Bits,
    pub learned: Arc<Learned>,
}

/// What every panel may read or change.
pub struct Shared {
    pub device: DeviceChoice,
    pub model: Option<Opened>,
    pub learned: Option<LearnedRun>,
    pub error: Option<String>,
    pub notice: Option<String>,
    /// What the previous frame cost the CPU, drawing included (eframe's measure; None in
    /// tests without a window).
    pub frame_ms: Option<f64>,
}

/// Settings that persist between runs.
#[derive(Serialize, Deserialize)]
#[serde(default)]
struct Persisted {
    recent: Vec<PathBuf>,
    tab: Tab,
    calibrate: calibrate::Form,
    evaluate: evaluate::Form,
    chat: chat::Form,
}

impl Default for Persisted {
    fn default() -> Self {
        Persisted {
            recent: Vec::new(),
            tab: Tab::Overview,
            calibrate: Default::default(),
            evaluate: Default::default(),
            chat: Default::default(),
        }
    }
}

const STORAGE_KEY: &str = "ostquant";
const MAX_RECENT: usize = 8;

pub struct OstquantApp {
    pub tab: Tab,
    pub shared: Shared,
    recent: Vec<PathBuf>,
    loading: Option<Job<(), Opened>>,
    picking: Option<Job<(), Picked>>,
    /// The top bar's typed path.
    path_input: String,
    pub inspector: inspector::Panel,
    pub calibrate: calibrate::Panel,
    pub evaluate: evaluate::Panel,
    pub chat: chat::Panel,
    /// Which renderer draws the window (for the overview).
    pub renderer: String,
}

impl OstquantApp {
    pub fn new(storage: Option<&dyn eframe::Storage>, device: DeviceChoice) -> Self {
        let p: Persisted = storage
            .and_then(|s| eframe::get_value(s, STORAGE_KEY))
            .unwrap_or_default();
        OstquantApp {
            tab: p.tab,
            shared: Shared {
                device,
                model: None,
                learned: None,
                error: None,
                notice: None,
                frame_ms: None,
            },
            recent: p.recent,
            loading: None,
            picking: None,
            path_input: String::new(),
            inspector: Default::default(),
            calibrate: calibrate::Panel::new(p.calibrate),
            evaluate: evaluate::Panel::new(p.evaluate),
            chat: chat::Panel::new(p.chat),
            renderer: "none (headless)".into(),
        }
    }

    /// Open the model folder or .gguf `path` (None: the default model, fetched if needed) in
    /// the background.
    pub fn open_model(&mut self, ctx: &egui::Context, path: Option<PathBuf>) {
        // An int4 folder of the model already open: straight to the chat, the lab's state
        // (inspections, learned transforms) kept.
        if let (Some(p), Some(m)) = (&path, &self.shared.model)
            && qformat::is_quantized(p)
            && qformat::source_model(p).is_some_and(|s| same_dir(&s, &m.dir))
        {
            self.chat.open_quantized(ctx, &self.shared, p.clone());
            self.tab = Tab::Chat;
            return;
        }
        let choice = self.shared.device;
        let title = match &path {
            Some(p) => format!("opening {}", p.display()),
            None => "opening the default model".into(),
        };
        self.loading = Some(Job::spawn(ctx, title, move |r| {
            let dir = assets::resolve_model(path.as_deref(), &mut |d, t| {
                r.progress("importing tensors", d, t)
            })?;
            // An int4 folder: the lab opens the original it was made from (its header says
            // which), the folder itself goes to the chat.
            let (dir, int4) = match qformat::source_model(&dir) {
                Some(source) if qformat::is_quantized(&dir) => {
                    if !source.join("config.json").is_file() {
                        anyhow::bail!(
                            "{} is an int4 folder made from {}, which is not there any more: open the original model, then this folder in Chat (Open int4 folder…)",
                            dir.display(),
                            source.display()
                        );
                    }
                    (source, Some(dir))
                }
                _ => (dir, None),
            };
            r.progress("loading weights and text", 0, 1);
            let dev = device::select(choice)?;
            let lab = Lab::open(&dir, dev)?;
            let overview = Overview::of(&lab)?;
            Ok(Opened {
                dir,
                lab: Arc::new(Mutex::new(lab)),
                overview,
                int4,
            })
        }));
    }

    pub fn is_loading(&self) -> bool {
        self.loading.is_some()
    }

    /// The recently opened models, newest first.
    pub fn recent(&self) -> &[PathBuf] {
        &self.recent
    }

    fn remember(&mut self, dir: &Path) {
        self.recent.retain(|p| p != dir);
        self.recent.insert(0, dir.to_path_buf());
        self.recent.truncate(MAX_RECENT);
    }

    /// Drain the background jobs of the window itself (loading, file dialogs).
    fn poll(&mut self, ctx: &egui::Context) {
        if let Some(r) = self.loading.as_mut().and_then(|j| j.poll(|_| {})) {
            self.loading = None;
            if let Some(mut opened) = finish(r, &mut self.shared.error) {
                self.remember(&opened.dir);
                self.shared.error = None;
                self.shared.notice = Some(format!("opened {}", opened.dir.display()));
                let int4 = opened.int4.take();
                self.shared.model = Some(opened);
                self.shared.learned = None;
                self.inspector = Default::default();
                self.evaluate.clear();
                self.chat.clear();
                if let Some(q) = int4 {
                    self.shared.notice = Some(format!(
                        "{} is an int4 folder: opened its original model, and the folder in Chat",
                        q.display()
                    ));
                    self.chat.open_quantized(ctx, &self.shared, q);
                    self.tab = Tab::Chat;
                }
            }
        }
        if let Some(r) = self.picking.as_mut().and_then(|j| j.poll(|_| {})) {
            self.picking = None;
            match finish(r, &mut self.shared.error) {
                Some(Picked {
                    path: Some(path), ..
                }) => self.open_model(ctx, Some(path)),
                Some(Picked {
                    no_dialog: true, ..
                }) => self.shared.error = Some(dialog::NO_DIALOG.into()),
                _ => {}
            }
        }
    }

    fn pick(&mut self, ctx: &egui::Context, what: Pick) {
        self.picking = Some(dialog::pick(ctx, "Open a model", what));
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        ui.horizontal(|ui| {
            ui.heading("ostquant");
            ui.separator();
            let idle = self.loading.is_none() && self.picking.is_none();
            if ui
                .add_enabled(idle, egui::Button::new("Open folder…"))
                .on_hover_text("A Hugging Face folder: config.json, *.safetensors, tokenizer.json")
                .clicked()
            {
                self.pick(&ctx, Pick::Folder);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Open GGUF…"))
                .clicked()
            {
                self.pick(&ctx, Pick::Gguf);
            }
            let default_ready = assets::default_model_dir().join("config.json").exists();
            let label = if default_ready {
                "SmolLM2-135M (default)"
            } else {
                "Fetch default model"
            };
            if ui
                .add_enabled(idle, egui::Button::new(label))
                .on_hover_text(assets::default_model_dir().display().to_string())
                .clicked()
            {
                self.open_model(&ctx, None);
            }
            let mut open = None;
            ui.add_enabled_ui(idle && !self.recent.is_empty(), |ui| {
                ui.menu_button("Recent", |ui| {
                    for p in &self.recent {
                        if ui.button(p.display().to_string()).clicked() {
                            open = Some(p.clone());
                        }
                    }
                });
            });
            let hint = "or type a folder or .gguf path, Enter";
            if let Some(p) = dialog::path_box(ui, idle, &mut self.path_input, hint) {
                open = Some(p);
            }
            if let Some(p) = open {
                self.open_model(&ctx, Some(p));
            }
            if let Some(m) = &self.shared.model {
                ui.separator();
                ui.label(egui::RichText::new(m.dir.display().to_string()).strong());
            }
        });
        if let Some(job) = &self.loading {
            job.show(ui);
        }
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(e) = self.shared.error.clone() {
                ui.colored_label(egui::Color32::from_rgb(220, 60, 60), format!("Error: {e}"));
                if ui.small_button("dismiss").clicked() {
                    self.shared.error = None;
                }
            } else if let Some(n) = &self.shared.notice {
                ui.label(n);
            } else {
                ui.weak("Open a model to begin.");
            }
        });
    }

    /// Draw one frame.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.poll(&ctx);
        self.inspector.poll(&mut self.shared);
        self.calibrate.poll(&mut self.shared);
        if std::mem::take(&mut self.calibrate.finished) && !self.inspector.is_running() {
            // Show what was learned: QSUR of the learned transforms against none.
            self.inspector.method = None;
            self.inspector.start(&ctx, &mut self.shared);
        }
        self.evaluate.poll(&mut self.shared);
        self.chat.poll(&mut self.shared);
        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("tabs")
            .resizable(false)
            .exact_size(130.0)
            .show(ui, |ui| {
                ui.add_space(6.0);
                for t in Tab::ALL {
                    ui.selectable_value(&mut self.tab, t, t.label());
                }
            });
        egui::CentralPanel::default().show(ui, |ui| match self.tab {
            Tab::Overview => overview::ui(ui, &self.shared, &self.renderer),
            Tab::Inspector => self.inspector.ui(ui, &mut self.shared),
            Tab::Calibrate => self.calibrate.ui(ui, &mut self.shared),
            Tab::Evaluate => self.evaluate.ui(ui, &mut self.shared),
            Tab::Chat => self.chat.ui(ui, &mut self.shared),
        });
    }

    fn persisted(&self) -> Persisted {
        Persisted {
            recent: self.recent.clone(),
            tab: self.tab,
            calibrate: self.calibrate.form.clone(),
            evaluate: self.evaluate.form.clone(),
            chat: self.chat.form.clone(),
        }
    }
}

impl eframe::App for OstquantApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        self.shared.frame_ms = frame.info().cpu_usage.map(|s| f64::from(s) * 1e3);
        OstquantApp::ui(self, ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.persisted());
    }
}

/// Whether two paths name the same folder (after resolving links and relative parts).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
