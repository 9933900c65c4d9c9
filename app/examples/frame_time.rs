//! The window's frame time while a calibration runs: the real app state in an egui_kittest
//! harness, frames drawn when egui asks for them (as eframe's event loop does), each laid out
//! and rendered through wgpu (the software Vulkan device here), first idle on the Calibrate
//! panel, then while an OSTQuant calibration (cpu preset sizes) runs on the background threads
//! of the same machine. Also prints the calibration's seconds per step, to compare with a
//! headless `ostquant quantize` of the same settings.
//!
//!     cargo run -p ostquant --example frame_time -- [MODEL_DIR] [SECONDS]
//!
//! MODEL_DIR defaults to the fetched SmolLM2-135M-Instruct; SECONDS (default 60) is how long
//! the calibration is watched. Prints the frame-time median, 95th percentile and maximum.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use ostquant_app::gui::OstquantApp;
use ostquant_core::device::DeviceChoice;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = match args.next() {
        Some(m) => PathBuf::from(m),
        None => ostquant_core::assets::resolve_model(None, &mut |_, _| {})?,
    };
    let seconds: u64 = args.next().map_or(Ok(60), |s| s.parse())?;
    let mut h = Harness::builder()
        .with_size([1280.0, 820.0])
        .wgpu()
        .build_ui_state(
            |ui, app: &mut OstquantApp| app.ui(ui),
            OstquantApp::new(None, DeviceChoice::Cpu),
        );
    let ctx = h.ctx.clone();
    h.state_mut().open_model(&ctx, Some(model.clone()));
    while h.state().is_loading() {
        std::thread::sleep(Duration::from_millis(50));
        h.step();
    }
    if let Some(e) = &h.state().shared.error {
        anyhow::bail!("{}: {e}", model.display());
    }
    h.get_by_label("Calibrate").click();
    h.step();
    let idle = frames(&mut h, Duration::from_secs(10), true, |_| true);
    report("the Calibrate panel redrawn continuously, idle", &idle);

    // A run with its own checkpoint name (500 steps), so no cached calibration is touched.
    {
        let f = &mut h.state_mut().calibrate.form;
        f.bits = "W4A4KV4".into();
        f.steps = 500;
        f.fresh = true;
    }
    h.get_by_label("Start").click();
    h.step();
    let busy = frames(&mut h, Duration::from_secs(seconds), false, |a| {
        a.calibrate.is_running()
    });
    let app = h.state();
    if let Some(e) = &app.shared.error {
        anyhow::bail!("calibration: {e}");
    }
    let steps = &app.calibrate.points;
    report(
        &match steps.len() {
            0 => "while calibrating (preparing: no step finished yet)".to_string(),
            n => format!(
                "while calibrating ({n} steps done, {:.1} s/step)",
                steps.iter().map(|p| p.seconds).sum::<f64>() / n as f64
            ),
        },
        &busy,
    );
    let compute = app
        .shared
        .model
        .as_ref()
        .map_or("?".into(), |m| m.overview.compute.clone());
    h.get_by_label("Cancel").click();
    while h.state().calibrate.is_running() {
        std::thread::sleep(Duration::from_millis(50));
        h.step();
    }
    println!(
        "window: wgpu (egui_kittest) on {}; compute: {}; {} cores",
        ostquant_core::device::adapters()
            .iter()
            .find(|a| a.info.backend == burn::tensor::wgpu::wgpu::Backend::Vulkan)
            .map_or("?".into(), |a| a.info.name.clone()),
        compute,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// Frame times in milliseconds: the UI thread's own work (the app's update, layout and
/// tessellation) and the whole frame with the wgpu render and its read-back to an image (the
/// harness cannot present to a screen; the read-back stands in for it).
#[derive(Default)]
struct Frames {
    ui: Vec<f64>,
    total: Vec<f64>,
    seconds: f64,
}

/// Draw frames for `span` (while `go` holds): back to back when `continuous`, else the way
/// eframe's event loop does: a frame when egui asks for one (at once, or after the delay it
/// names), otherwise nothing.
fn frames(
    h: &mut Harness<'static, OstquantApp>,
    span: Duration,
    continuous: bool,
    go: impl Fn(&OstquantApp) -> bool,
) -> Frames {
    let due: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(Some(Instant::now())));
    let d = due.clone();
    h.ctx.set_request_repaint_callback(move |info| {
        let at = Instant::now() + info.delay;
        let mut due = d.lock().unwrap();
        *due = Some(due.map_or(at, |t| t.min(at)));
    });
    let t0 = Instant::now();
    let mut f = Frames::default();
    while t0.elapsed() < span && go(h.state()) {
        let now = Instant::now();
        let ready = continuous || due.lock().unwrap().is_some_and(|t| t <= now);
        if !ready {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        *due.lock().unwrap() = None;
        h.step();
        f.ui.push(now.elapsed().as_secs_f64() * 1e3);
        let _ = h.render();
        f.total.push(now.elapsed().as_secs_f64() * 1e3);
    }
    f.seconds = t0.elapsed().as_secs_f64();
    f
}

fn report(what: &str, f: &Frames) {
    let busy: f64 = f.total.iter().sum::<f64>() / 1e3;
    println!(
        "{what}: {} frames in {:.0} s ({:.1} frames/s; drawing took {:.0}% of one core)",
        f.ui.len(),
        f.seconds,
        f.ui.len() as f64 / f.seconds,
        100.0 * busy / f.seconds
    );
    for (name, ms) in [
        ("UI thread (update + layout + tessellation)", &f.ui),
        ("with the render and read-back", &f.total),
    ] {
        let mut s = ms.clone();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            continue;
        }
        let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
        println!(
            "  {name}: median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
            q(0.5),
            q(0.95),
            q(1.0)
        );
    }
}
