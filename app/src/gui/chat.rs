//! Chat panel: a multi-turn conversation with the model's chat template, streamed token by
//! token, with the FP model, a quantized (int4) folder, or both side by side on the same
//! prompt. Sampling controls, Stop, and tokens/s per reply.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ostquant_core::device;
use ostquant_core::generate::{self, BurnDecoder, GenerationStats, SamplingParams, Session};
use ostquant_core::model::LoadedModel;
use ostquant_core::model::llama::KvCache;
use ostquant_core::model::tokenizer::{ChatMessage, Tokenizer};
use ostquant_core::runtime::Runtime;
use serde::{Deserialize, Serialize};

use super::app::Shared;
use super::dialog::{self, Pick, Picked};
use super::jobs::{Job, Reporter, finish};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Fp,
    Quantized,
    SideBySide,
}

/// Sampling and mode (persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Form {
    pub mode: Mode,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub system: String,
}

impl Default for Form {
    fn default() -> Self {
        Form {
            mode: Mode::Fp,
            temperature: 0.0,
            top_p: 0.9,
            max_new_tokens: 128,
            seed: 0,
            system: String::new(),
        }
    }
}

/// One exchange: the user's message and each model's reply.
#[derive(Debug, Clone, Default)]
pub struct Turn {
    pub user: String,
    /// Replies of the FP model (0) and of the quantized model (1).
    pub replies: [Option<Reply>; 2],
}

#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub text: String,
    pub done: bool,
    /// Ended by Stop.
    pub stopped: bool,
    pub tokens_per_sec: Option<f64>,
}

/// An int4 runtime and the token ids its KV cache holds.
type HeldRuntime = (Runtime, Vec<u32>);

/// A quantized folder opened for chat.
struct QuantizedModel {
    dir: PathBuf,
    model: Arc<Mutex<LoadedModel>>,
    /// The int4 runtime, loaded once and kept between messages, with the positions its cache
    /// holds: a message that extends the conversation runs only its new tokens.
    runtime: Option<Arc<Mutex<HeldRuntime>>>,
    /// What answers for this model (the runtime's adapter, or the burn forward).
    what: String,
}

type Answer = Job<String, GenerationStats>;

pub struct Panel {
    pub form: Form,
    pub turns: Vec<Turn>,
    pub input: String,
    quantized: Option<QuantizedModel>,
    loading: Option<Job<(), QuantizedModel>>,
    picking: Option<Job<(), Picked>>,
    /// A folder chosen in the dialog, opened on the next frame.
    pending_open: Option<PathBuf>,
    /// The FP and quantized answers being streamed.
    answers: [Option<Answer>; 2],
    /// The FP model's KV cache and the tokens it holds, kept between messages so that a
    /// message runs only its new tokens (the int4 runtime keeps its own the same way).
    fp_cache: FpCache,
}

type FpCache = Arc<Mutex<Option<(KvCache, Vec<u32>)>>>;

impl Panel {
    pub fn new(form: Form) -> Self {
        Panel {
            form,
            turns: Vec::new(),
            input: String::new(),
            quantized: None,
            loading: None,
            picking: None,
            pending_open: None,
            answers: [None, None],
            fp_cache: FpCache::default(),
        }
    }

    pub fn clear(&mut self) {
        self.turns.clear();
        self.answers = [None, None];
        // A fresh slot: an answer still running writes its cache into the old one.
        self.fp_cache = FpCache::default();
    }

    pub fn is_answering(&self) -> bool {
        self.answers.iter().any(Option::is_some)
    }

    pub fn has_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        for side in 0..2 {
            let Some(job) = self.answers[side].as_mut() else {
                continue;
            };
            let Some(turn) = self.turns.last_mut() else {
                continue;
            };
            let reply = turn.replies[side].get_or_insert_with(Default::default);
            if let Some(r) = job.poll(|piece| reply.text.push_str(&piece)) {
                reply.done = true;
                reply.stopped = job.is_cancelling();
                self.answers[side] = None;
                if let Some(stats) = finish(r, &mut shared.error) {
                    reply.tokens_per_sec = Some(stats.decode_tokens_per_sec());
                }
            }
        }
        if let Some(r) = self.loading.as_mut().and_then(|j| j.poll(|_| {})) {
            self.loading = None;
            if let Some(q) = finish(r, &mut shared.error) {
                let beside = shared.model.as_ref().map_or(String::new(), |m| {
                    format!(", beside the FP model {}", m.dir.display())
                });
                shared.notice = Some(format!(
                    "chat: int4 folder {} ({}){beside}",
                    q.dir.display(),
                    q.what
                ));
                self.quantized = Some(q);
                if self.form.mode == Mode::Fp {
                    self.form.mode = Mode::SideBySide;
                }
            }
        }
        if let Some(r) = self.picking.as_mut().and_then(|j| j.poll(|_| {})) {
            self.picking = None;
            match finish(r, &mut shared.error) {
                Some(Picked {
                    path: Some(dir), ..
                }) => self.pending_open = Some(dir),
                Some(Picked {
                    no_dialog: true, ..
                }) => {
                    shared.error = Some(format!(
                        "{}; an int4 folder typed there opens here, beside its original model",
                        dialog::NO_DIALOG
                    ))
                }
                _ => {}
            }
        }
    }

    /// Open the int4 (or any) model folder `dir` as the chat's quantized model.
    pub fn open_quantized(&mut self, ctx: &egui::Context, shared: &Shared, dir: PathBuf) {
        let choice = shared.device;
        self.loading = Some(Job::spawn(
            ctx,
            format!("loading {}", dir.display()),
            move |_| {
                let dev = device::select(choice)?;
                let model = LoadedModel::load(&dir, &dev.device)?;
                let (runtime, what) = match generate::int4_runtime(&model, choice) {
                    Some(Ok(rt)) => {
                        let what = format!("int4 runtime on {}", rt.device_name());
                        (Some(Arc::new(Mutex::new((rt, Vec::new())))), what)
                    }
                    Some(Err(e)) => (None, format!("burn forward on {dev} ({e})")),
                    None => (None, format!("burn forward on {dev}")),
                };
                Ok(QuantizedModel {
                    dir,
                    model: Arc::new(Mutex::new(model)),
                    runtime,
                    what,
                })
            },
        ));
    }

    /// Send `text` as the next user message to the models the mode names.
    pub fn send(&mut self, ctx: &egui::Context, shared: &mut Shared, text: String) {
        let Some(m) = &shared.model else { return };
        let text = text.trim().to_string();
        if text.is_empty() || self.is_answering() {
            return;
        }
        let sides: &[usize] = match (self.form.mode, &self.quantized) {
            (Mode::Fp, _) => &[0],
            (_, None) => {
                shared.error =
                    Some("open a quantized model folder first (Open int4 folder…)".into());
                return;
            }
            (Mode::Quantized, Some(_)) => &[1],
            (Mode::SideBySide, Some(_)) => &[0, 1],
        };
        self.turns.push(Turn {
            user: text,
            replies: [None, None],
        });
        let params = SamplingParams {
            temperature: self.form.temperature,
            top_p: self.form.top_p,
            seed: self.form.seed,
            max_new_tokens: self.form.max_new_tokens,
        };
        for &side in sides {
            let history = self.history(side);
            let title = if side == 0 {
                "FP model"
            } else {
                "quantized model"
            };
            self.turns.last_mut().expect("pushed above").replies[side] = Some(Reply::default());
            let job = if side == 0 {
                let (lab, kept) = (m.lab.clone(), self.fp_cache.clone());
                Job::spawn(ctx, title, move |r| {
                    let unavailable = || anyhow::anyhow!("the model is unavailable");
                    let lab = lab.lock().map_err(|_| unavailable())?;
                    let mut kept = kept.lock().map_err(|_| unavailable())?;
                    let mut decoder = match kept.take() {
                        Some((cache, tokens)) => (BurnDecoder::with_cache(lab.fp(), cache), tokens),
                        None => (BurnDecoder::new(lab.fp()), Vec::new()),
                    };
                    let mut session = Session::resume(Box::new(&mut decoder.0), decoder.1);
                    let stats = answer(lab.tokenizer(), &mut session, &history, params, r);
                    let tokens = session.into_tokens();
                    *kept = Some((decoder.0.into_cache(), tokens));
                    stats
                })
            } else {
                let q = self.quantized.as_ref().expect("checked above");
                let (model, runtime) = (q.model.clone(), q.runtime.clone());
                let unavailable = || anyhow::anyhow!("the model is unavailable");
                Job::spawn(ctx, title, move |r| {
                    let m = model.lock().map_err(|_| unavailable())?;
                    match runtime {
                        Some(rt) => {
                            let mut guard = rt.lock().map_err(|_| unavailable())?;
                            let (rt, held) = &mut *guard;
                            let mut session =
                                Session::resume(Box::new(&mut *rt), std::mem::take(held));
                            let stats = answer(&m.tokenizer, &mut session, &history, params, r);
                            *held = session.into_tokens();
                            stats
                        }
                        None => {
                            let mut session = Session::new(&m.model);
                            answer(&m.tokenizer, &mut session, &history, params, r)
                        }
                    }
                })
            };
            self.answers[side] = Some(job);
        }
    }

    /// The conversation as `side`'s model saw it, ending with the newest user message.
    fn history(&self, side: usize) -> Vec<ChatMessage> {
        let mut h = Vec::new();
        if !self.form.system.trim().is_empty() {
            h.push(ChatMessage::new("system", self.form.system.trim()));
        }
        for t in &self.turns {
            h.push(ChatMessage::new("user", t.user.clone()));
            if let Some(r) = &t.replies[side] {
                h.push(ChatMessage::new("assistant", r.text.clone()));
            }
        }
        h
    }

    pub fn stop(&self) {
        for j in self.answers.iter().flatten() {
            j.cancel();
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        if shared.model.is_none() {
            ui.label("Open a model to chat with it.");
            return;
        }
        let ctx = ui.ctx().clone();
        if let Some(dir) = self.pending_open.take() {
            self.open_quantized(&ctx, shared, dir);
        }
        self.controls(ui, &ctx);
        if let Some(j) = &self.loading {
            j.show(ui);
        }
        ui.separator();
        let input_h = 70.0;
        let side_by_side = self.form.mode == Mode::SideBySide;
        egui::ScrollArea::vertical()
            .id_salt("chat log")
            .stick_to_bottom(true)
            .auto_shrink(false)
            .max_height(ui.available_height() - input_h)
            .show(ui, |ui| {
                for t in &self.turns {
                    let you = egui::RichText::new(format!("you: {}", t.user));
                    ui.label(you.color(ui.visuals().hyperlink_color));
                    let show = |ui: &mut egui::Ui, name: &str, r: &Option<Reply>| {
                        if let Some(r) = r {
                            let speed = r
                                .tokens_per_sec
                                .map(|s| format!("  [{s:.1} tok/s]"))
                                .unwrap_or_default();
                            let end = match (r.done, r.stopped) {
                                (false, _) => " _",
                                (true, true) => " [stopped]",
                                (true, false) => "",
                            };
                            let text = format!("{name}: {}{end}{speed}", r.text);
                            ui.label(egui::RichText::new(text).strong());
                        }
                    };
                    if side_by_side {
                        ui.columns(2, |c| {
                            show(&mut c[0], "FP", &t.replies[0]);
                            show(&mut c[1], "int4", &t.replies[1]);
                        });
                    } else {
                        show(ui, "FP", &t.replies[0]);
                        show(ui, "int4", &t.replies[1]);
                    }
                    ui.add_space(6.0);
                }
            });
        ui.horizontal(|ui| {
            let answering = self.is_answering();
            let edit = ui.add_sized(
                [ui.available_width() - 150.0, 40.0],
                egui::TextEdit::multiline(&mut self.input)
                    .hint_text("Message (Enter sends, Shift+Enter: new line)"),
            );
            let enter = edit.has_focus()
                && ui.input(|i| i.key_pressed(egui::Key::Enter) && !i.modifiers.shift);
            if (ui
                .add_enabled(!answering, egui::Button::new("Send"))
                .clicked()
                || enter)
                && !answering
            {
                let text = std::mem::take(&mut self.input);
                self.send(&ctx, shared, text);
            }
            if ui
                .add_enabled(answering, egui::Button::new("Stop"))
                .clicked()
            {
                self.stop();
            }
            if ui
                .add_enabled(!answering, egui::Button::new("Clear"))
                .clicked()
            {
                self.turns.clear();
            }
        });
    }

    fn controls(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        let f = &mut self.form;
        ui.horizontal_wrapped(|ui| {
            ui.label("Model");
            ui.selectable_value(&mut f.mode, Mode::Fp, "FP");
            ui.add_enabled_ui(self.quantized.is_some(), |ui| {
                ui.selectable_value(&mut f.mode, Mode::Quantized, "int4");
                ui.selectable_value(&mut f.mode, Mode::SideBySide, "side by side");
            });
            if ui
                .add_enabled(
                    self.loading.is_none() && self.picking.is_none(),
                    egui::Button::new("Open int4 folder…"),
                )
                .on_hover_text("A folder written by Export or `ostquant quantize`")
                .clicked()
            {
                self.picking = Some(dialog::pick(
                    ctx,
                    "Open a quantized model folder",
                    Pick::Folder,
                ));
            }
            if let Some(q) = &self.quantized {
                ui.weak(format!("{} · {}", q.dir.display(), q.what));
            }
        });
        ui.horizontal_wrapped(|ui| {
            ui.label("temperature");
            ui.add(
                egui::DragValue::new(&mut f.temperature)
                    .range(0.0..=2.0)
                    .speed(0.05),
            );
            ui.label("top-p");
            ui.add(
                egui::DragValue::new(&mut f.top_p)
                    .range(0.05..=1.0)
                    .speed(0.01),
            );
            ui.label("max tokens");
            ui.add(egui::DragValue::new(&mut f.max_new_tokens).range(1..=4096));
            ui.label("seed");
            ui.add(egui::DragValue::new(&mut f.seed));
            ui.label("system");
            ui.add(egui::TextEdit::singleline(&mut f.system).desired_width(200.0));
        });
    }
}

/// Generate one reply to `history`, streaming pieces to the UI; Stop ends it early.
fn answer(
    tok: &Tokenizer,
    session: &mut Session<'_>,
    history: &[ChatMessage],
    params: SamplingParams,
    r: &Reporter<String, GenerationStats>,
) -> anyhow::Result<GenerationStats> {
    let prompt = if tok.has_chat_template() {
        tok.render_chat(history, true)?
    } else {
        // No template: continue the last message as plain text.
        history
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default()
    };
    let ids = tok.encode_with_bos(&prompt)?;
    let (_, stats) = session.generate(tok, &ids, params, &mut |piece| {
        r.event(piece.to_string());
        !r.cancelled()
    })?;
    Ok(stats)
}
