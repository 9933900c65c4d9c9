//! The desktop app driven through its real state with egui_kittest, on a tiny generated model
//! (CPU backend): open it, fill the QSUR table, start and cancel a calibration, chat and see
//! tokens arrive. Then every panel rendered on the software Vulkan device and saved as PNG
//! (in $OSTQUANT_SCREENSHOTS, else target/…/screenshots), checked not to be blank.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use ostquant_app::gui::{OstquantApp, Tab};
use ostquant_core::device::DeviceChoice;
use ostquant_core::quant::method::Method;
use ostquant_tests::write_tiny_model;

fn harness(wgpu: bool) -> Harness<'static, OstquantApp> {
    let app = OstquantApp::new(None, DeviceChoice::Cpu);
    let b = Harness::builder().with_size([1280.0, 820.0]);
    let b = if wgpu { b.wgpu() } else { b };
    b.build_ui_state(|ui, app: &mut OstquantApp| app.ui(ui), app)
}

/// Step frames until `done` holds (the engine works on background threads meanwhile).
fn wait(h: &mut Harness<'static, OstquantApp>, what: &str, done: impl Fn(&OstquantApp) -> bool) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "timed out waiting for {what}; error: {:?}",
            h.state().shared.error
        );
        std::thread::sleep(Duration::from_millis(20));
        h.step();
    }
    h.step();
}

fn open(h: &mut Harness<'static, OstquantApp>, dir: &Path) {
    let ctx = h.ctx.clone();
    h.state_mut().open_model(&ctx, Some(dir.to_path_buf()));
    wait(h, "the model to open", |a| !a.is_loading());
    assert!(
        h.state().shared.model.is_some(),
        "open failed: {:?}",
        h.state().shared.error
    );
}

fn tiny(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny-model");
    write_tiny_model(&dir, 3);
    dir
}

#[test]
fn open_inspect_calibrate_cancel_and_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let mut h = harness(false);
    h.step();
    open(&mut h, &dir);
    // The overview names the architecture's numbers.
    h.get_by_label("Parameters");

    // Inspector: QuaRot against none, every layer's QSUR in the table.
    h.get_by_label("Inspector").click();
    h.step();
    h.state_mut().inspector.windows = 1;
    h.get_by_label("Inspect").click();
    h.step();
    wait(&mut h, "the inspection", |a| !a.inspector.is_running());
    let app = h.state();
    assert!(app.shared.error.is_none(), "{:?}", app.shared.error);
    let (before, after) = (
        app.inspector.before.as_ref().unwrap(),
        app.inspector.after.as_ref().unwrap(),
    );
    assert_eq!(after.method, "quarot");
    assert!(
        before
            .stats
            .iter()
            .any(|s| s.name == "down_in" && s.qsur.is_some())
    );
    h.get_by_label("upgate_in");
    // Selecting a cell shows its spectrum and channel maxima.
    h.state_mut().inspector.selected = Some((0, "down_in".into()));
    h.step();
    h.get_by_label_contains("layer 0 · down_in");

    // Calibration: start a (small) run, see a step arrive, cancel it.
    h.get_by_label("Calibrate").click();
    h.step();
    {
        let f = &mut h.state_mut().calibrate.form;
        f.steps = 50;
        f.samples = 2;
        f.seq_len = 16;
        f.fresh = true;
    }
    h.get_by_label("Start").click();
    h.step();
    wait(&mut h, "a calibration step", |a| {
        !a.calibrate.points.is_empty() || !a.calibrate.is_running()
    });
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
    assert!(h.state().calibrate.points[0].loss.is_finite());
    h.get_by_label("Cancel").click();
    h.step();
    wait(&mut h, "the cancellation", |a| !a.calibrate.is_running());
    let notice = h.state().shared.notice.clone().unwrap_or_default();
    assert!(notice.contains("cancelled"), "{notice}");

    // Evaluation: cancelled in the middle of a zero-shot task, it stops there, with no row.
    {
        let f = &mut h.state_mut().evaluate.form;
        f.methods = vec![Method::Fp];
        f.windows = 1;
        f.zeroshot = true;
        f.limit = 100_000;
    }
    let ctx = h.ctx.clone();
    let app = h.state_mut();
    app.evaluate.start(&ctx, &mut app.shared);
    wait(&mut h, "a zero-shot task", |a| {
        a.evaluate.stage().is_some_and(|s| !s.contains("wiki")) || !a.evaluate.is_running()
    });
    h.state().evaluate.cancel();
    wait(&mut h, "the evaluation's cancellation", |a| {
        !a.evaluate.is_running()
    });
    let notice = h.state().shared.notice.clone().unwrap_or_default();
    assert!(notice.contains("evaluation cancelled"), "{notice}");
    assert!(h.state().evaluate.rows.is_empty());
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );

    // Chat: send a message, tokens stream in. A random tiny model writes arbitrary bytes, which
    // no font draws: tofu boxes instead of the harness's panic on missing glyphs.
    h.ctx
        .set_missing_glyph_policy(egui::MissingGlyphPolicy::Tofu);
    h.get_by_label("Chat").click();
    h.step();
    h.state_mut().chat.form.max_new_tokens = 8;
    h.state_mut().chat.input = "Hello".into();
    h.get_by_label("Send").click();
    h.step();
    wait(&mut h, "the reply", |a| !a.chat.is_answering());
    let app = h.state();
    assert!(app.shared.error.is_none(), "{:?}", app.shared.error);
    let reply = app.chat.turns[0].replies[0].as_ref().unwrap();
    assert!(
        reply.done && !reply.text.is_empty(),
        "no tokens arrived: {reply:?}"
    );
}

#[test]
fn a_bad_folder_is_a_message_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("not-a-model");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("config.json"), "{ not json").unwrap();
    let mut h = harness(false);
    let ctx = h.ctx.clone();
    h.state_mut().open_model(&ctx, Some(bad.clone()));
    wait(&mut h, "the failure", |a| !a.is_loading());
    let err = h.state().shared.error.clone().expect("an error message");
    assert!(err.contains("config.json"), "{err}");
    assert!(h.state().shared.model.is_none());
    h.get_by_label_contains("Error:");
}

/// Every panel rendered through wgpu on the software Vulkan device, saved as PNG. The model is
/// a tiny generated one unless $OSTQUANT_SCREENSHOT_MODEL names a folder (the README's
/// screenshots use the real SmolLM2).
#[test]
fn screenshots_of_every_panel() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("OSTQUANT_SCREENSHOT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| tiny(tmp.path()));
    let out = std::env::var_os("OSTQUANT_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&out).unwrap();
    let mut h = harness(true);
    open(&mut h, &dir);
    // A real model needs more tokens than its widest input (1536) for every QSUR.
    let real = std::env::var_os("OSTQUANT_SCREENSHOT_MODEL").is_some();
    h.state_mut().inspector.windows = if real { 4 } else { 1 };
    let ctx = h.ctx.clone();
    let app = h.state_mut();
    app.tab = Tab::Inspector;
    app.inspector.start(&ctx, &mut app.shared);
    wait(&mut h, "the inspection", |a| !a.inspector.is_running());
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
    h.state_mut().inspector.selected = Some((1, "down_in".into()));
    // An evaluation for the Evaluate panel's table and charts (the panel's defaults: fp, rtn
    // and quarot at W4A4KV4 over 4 windows; the tiny model takes 1 window).
    if !real {
        h.state_mut().evaluate.form.windows = 1;
    }
    let app = h.state_mut();
    app.evaluate.start(&ctx, &mut app.shared);
    wait(&mut h, "the evaluation", |a| !a.evaluate.is_running());
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
    for tab in [
        Tab::Overview,
        Tab::Inspector,
        Tab::Calibrate,
        Tab::Evaluate,
        Tab::Chat,
    ] {
        h.state_mut().tab = tab;
        h.step();
        h.step();
        let image = h.render().expect("render on the software Vulkan device");
        let path = out.join(format!("{tab:?}.png").to_lowercase());
        image.save(&path).unwrap();
        // Not blank: many distinct colours, not one flat background.
        let mut colours: Vec<[u8; 4]> = image.pixels().map(|p| p.0).collect();
        colours.sort_unstable();
        colours.dedup();
        assert!(
            colours.len() > 20,
            "{}: only {} colours",
            path.display(),
            colours.len()
        );
        eprintln!("wrote {}", path.display());
    }
}

/// The real binary opens its window on a virtual X display (Xvfb, installed by assets/setup)
/// and draws through wgpu on the software Vulkan device: a screenshot of the root window shows
/// the app, not a blank screen.
#[test]
fn window_opens_under_xvfb() {
    let (shot, stderr) = window_screenshot("cpu", "window.png");
    assert!(
        !stderr.contains("share the wgpu device"),
        "{}: with --device cpu nothing is shared; app stderr: {stderr}",
        shot.display()
    );
}

/// With the compute on a wgpu device, burn opens it and the window draws on the same device
/// and queue (here the software Vulkan device, the only one CI has).
#[test]
fn window_shares_the_compute_device() {
    let (shot, stderr) = window_screenshot("software", "window-shared-device.png");
    assert!(
        stderr.contains("share the wgpu device") && !stderr.contains("cannot draw on the shared"),
        "{}: the window did not draw on the shared device; app stderr: {stderr}",
        shot.display()
    );
}

/// Run `ostquant gui --device DEVICE` on a tiny model under Xvfb, screenshot the root window
/// into `name` once it has drawn, check it is not blank, and return its path and the app's
/// stderr.
fn window_screenshot(device: &str, name: &str) -> (PathBuf, String) {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let out = std::env::var_os("OSTQUANT_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&out).unwrap();
    // One display per process and window (the two window tests run in parallel).
    let display = format!(
        ":{}",
        90 + (std::process::id() % 100) * 2 + u32::from(device != "cpu")
    );
    let mut xvfb = Command::new("Xvfb")
        .args([
            display.as_str(),
            "-screen",
            "0",
            "1280x800x24",
            "-nolisten",
            "tcp",
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb (apt-get install xvfb; assets/setup installs it)");
    std::thread::sleep(Duration::from_secs(1));
    let mut app = Command::new(env!("CARGO_BIN_EXE_ostquant"))
        .args(["gui", "--device", device, "--model"])
        .arg(&dir)
        .env("DISPLAY", &display)
        .env("XDG_DATA_HOME", tmp.path()) // a fresh settings file
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ostquant gui");
    let shot = out.join(name);
    let t0 = Instant::now();
    let mut colours = 0;
    // Poll until the window has drawn the opened model (or give up after a minute).
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(2));
        let ok = Command::new("import")
            .args(["-display", display.as_str(), "-window", "root"])
            .arg(&shot)
            .status()
            .is_ok_and(|s| s.success());
        if ok && let Ok(img) = image::open(&shot) {
            let mut c: Vec<[u8; 4]> = img.to_rgba8().pixels().map(|p| p.0).collect();
            c.sort_unstable();
            c.dedup();
            colours = c.len();
            if colours > 20 && t0.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    }
    let _ = app.kill();
    let _ = xvfb.kill();
    let stderr = app
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    let _ = xvfb.wait();
    assert!(
        colours > 20,
        "{}: the window looks blank ({colours} colours); app stderr: {stderr}",
        shot.display()
    );
    eprintln!("wrote {}", shot.display());
    (shot, stderr)
}

/// An RTN-quantized QuaRot W4A16KV16 folder of the model in `dir`, written beside it, its
/// header naming `dir` as its source (as `quantize` and Export do).
fn int4_folder(dir: &Path) -> PathBuf {
    use burn::tensor::Device;
    use ostquant_core::model::qformat::{self, Header};
    use ostquant_core::quant::method::{Calibration, Method, quantize_weights_rtn, transform};
    use ostquant_core::quant::quantizer::QuantSpec;
    let w = ostquant_core::model::checkpoint::LlamaWeights::load(dir).unwrap();
    let calib = Calibration {
        windows: &[],
        device: &Device::flex(),
        learned: None,
    };
    let (mut tw, online) = transform(&w, Method::Quarot, &calib).unwrap();
    let spec = QuantSpec::sym(4);
    let grids = quantize_weights_rtn(&mut tw, &spec);
    let header = Header {
        format: qformat::FORMAT.into(),
        version: 1,
        method: "quarot".into(),
        bits: "W4A16KV16".into(),
        weight: Some(spec),
        forward: (&online).into(),
        details: serde_json::json!({ "source": dir }),
    };
    let qdir = dir.with_file_name("tiny-int4");
    qformat::write(&qdir, dir, &tw, Some(&grids), &header).unwrap();
    qdir
}

/// Opening an int4 folder as the model opens the original it was made from (the lab needs
/// the FP weights) and puts the folder in the chat; the lab itself refuses the folder.
#[test]
fn opening_an_int4_folder_opens_its_original_and_the_folder_in_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let qdir = int4_folder(&dir);
    let dev = ostquant_core::device::select(DeviceChoice::Cpu).unwrap();
    let refused = ostquant_core::eval::suite::Lab::open(&qdir, dev)
        .err()
        .expect("refused");
    assert!(refused.to_string().contains("int4 folder"), "{refused}");
    let mut h = harness(false);
    open(&mut h, &qdir);
    wait(&mut h, "the int4 folder in chat", |a| {
        a.chat.has_quantized() || a.shared.error.is_some()
    });
    let app = h.state();
    assert!(app.shared.error.is_none(), "{:?}", app.shared.error);
    assert_eq!(app.shared.model.as_ref().map(|m| m.dir.clone()), Some(dir));
    assert_eq!(app.tab, Tab::Chat);
    // Again, with its original open: straight to the chat, nothing reloaded.
    let ctx = h.ctx.clone();
    h.state_mut().tab = Tab::Overview;
    h.state_mut().open_model(&ctx, Some(qdir));
    assert!(!h.state().is_loading(), "the original is not reopened");
    assert_eq!(h.state().tab, Tab::Chat);
}

/// Export writes an int4 folder the chat then runs; a learned method not calibrated in the
/// window is refused with a message, and nothing is written.
#[test]
fn export_writes_an_int4_folder_that_the_chat_runs() {
    use ostquant_core::quant::method::{Method, Rounding};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let mut h = harness(false);
    open(&mut h, &dir);
    let ctx = h.ctx.clone();
    let refused = tmp.path().join("never");
    let app = h.state_mut();
    app.calibrate.form.export_method = Method::Ostquant;
    app.calibrate
        .export_to(&ctx, &mut app.shared, refused.clone());
    let err = h.state().shared.error.clone().expect("calibrate first");
    assert!(err.contains("calibrate ostquant"), "{err}");
    assert!(!refused.exists());

    let out = tmp.path().join("exported");
    let app = h.state_mut();
    app.shared.error = None;
    app.calibrate.form.export_method = Method::Quarot;
    app.calibrate.form.export_bits = "W4A16KV16".into();
    // A choice of GPTQ column order left over from another method does not apply to quarot,
    // which rounds to nearest.
    app.calibrate.form.export_rounding = Rounding::GptqActOrder;
    app.calibrate.export_to(&ctx, &mut app.shared, out.clone());
    wait(&mut h, "the export", |a| !a.calibrate.is_exporting());
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(header["details"]["rounding"], "rtn", "{header}");

    // A learned method exports the transforms calibrated in the window, its weights rounded to
    // nearest when asked.
    {
        let f = &mut h.state_mut().calibrate.form;
        f.method = Method::Ostquant;
        f.bits = "W4A16KV16".into();
        f.reset();
        (f.steps, f.samples, f.seq_len, f.fresh) = (2, 1, 16, true);
        f.export_method = Method::Ostquant;
        f.export_rounding = Rounding::Rtn;
    }
    let app = h.state_mut();
    app.calibrate.start(&ctx, &mut app.shared);
    wait(&mut h, "the calibration", |a| !a.calibrate.is_running());
    let rtn = tmp.path().join("exported-rtn");
    let app = h.state_mut();
    app.calibrate.export_to(&ctx, &mut app.shared, rtn.clone());
    wait(&mut h, "the learned export", |a| {
        !a.calibrate.is_exporting()
    });
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rtn.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(header["details"]["rounding"], "rtn", "{header}");

    let app = h.state_mut();
    app.chat.open_quantized(&ctx, &app.shared, out);
    wait(&mut h, "the exported folder", |a| {
        a.chat.has_quantized() || a.shared.error.is_some()
    });
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
}

/// The chat answers the same prompt with the FP model and an int4 folder side by side.
#[test]
fn chat_side_by_side_with_an_int4_folder() {
    use ostquant_app::gui::chat::Mode;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let qdir = int4_folder(&dir);

    let mut h = harness(false);
    open(&mut h, &dir);
    h.ctx
        .set_missing_glyph_policy(egui::MissingGlyphPolicy::Tofu);
    h.state_mut().tab = Tab::Chat;
    let ctx = h.ctx.clone();
    let app = h.state_mut();
    app.chat.open_quantized(&ctx, &app.shared, qdir);
    wait(&mut h, "the int4 folder", |a| {
        a.chat.has_quantized() || a.shared.error.is_some()
    });
    assert!(
        h.state().shared.error.is_none(),
        "{:?}",
        h.state().shared.error
    );
    assert_eq!(
        h.state().chat.form.mode,
        Mode::SideBySide,
        "opening an int4 folder switches to side by side"
    );
    h.state_mut().chat.form.max_new_tokens = 6;
    h.state_mut().chat.input = "Hi".into();
    h.get_by_label("Send").click();
    h.step();
    wait(&mut h, "both replies", |a| !a.chat.is_answering());
    // A second message extends the conversation: the int4 side resumes its runtime's cache.
    h.state_mut().chat.input = "Again".into();
    h.get_by_label("Send").click();
    h.step();
    wait(&mut h, "the second replies", |a| !a.chat.is_answering());
    let app = h.state();
    assert!(app.shared.error.is_none(), "{:?}", app.shared.error);
    assert_eq!(app.chat.turns.len(), 2);
    for turn in &app.chat.turns {
        for (side, r) in turn.replies.iter().enumerate() {
            let r = r
                .as_ref()
                .unwrap_or_else(|| panic!("no reply on side {side}"));
            assert!(r.done && !r.text.is_empty(), "side {side}: {r:?}");
        }
    }
}

/// Settings and the recent models survive a restart: the app saves them into eframe's storage
/// (a file under the user's data folder in the real app) and a new app reads them back.
#[test]
fn settings_and_recent_models_persist() {
    #[derive(Default)]
    struct Memory(std::collections::HashMap<String, String>);
    impl eframe::Storage for Memory {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.to_string(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let mut h = harness(false);
    open(&mut h, &dir);
    let app = h.state_mut();
    app.tab = Tab::Evaluate;
    app.calibrate.form.steps = 123;
    app.calibrate.form.bits = "W4A16KV16".into();
    app.chat.form.temperature = 0.25;
    app.chat.form.seed = 7;
    let mut storage = Memory::default();
    eframe::App::save(app, &mut storage);

    let again = OstquantApp::new(Some(&storage), DeviceChoice::Cpu);
    assert_eq!(again.recent(), std::slice::from_ref(&dir));
    assert_eq!(again.tab, Tab::Evaluate);
    assert_eq!(again.calibrate.form.steps, 123);
    assert_eq!(again.calibrate.form.bits, "W4A16KV16");
    assert_eq!(again.chat.form.temperature, 0.25);
    assert_eq!(again.chat.form.seed, 7);
    // Nothing saved yet: the defaults.
    let fresh = OstquantApp::new(Some(&Memory::default()), DeviceChoice::Cpu);
    assert!(fresh.recent().is_empty());
}
