//! The desktop app: open a model, inspect its layers, calibrate, evaluate, export and chat, in
//! one eframe window. The panels hold no algorithms: every job calls `ostquant-core` on a
//! background thread (see `jobs`) and draws what it returns.

mod app;
mod calibrate;
pub mod chat;
mod evaluate;
mod inspector;
mod jobs;
mod overview;
mod style;

use std::path::PathBuf;

pub use app::{OstquantApp, Shared, Tab};
use ostquant_core::device::DeviceChoice;

/// Open the window (wgpu renderer; OpenGL through glow when wgpu finds no adapter at all).
pub fn run(model: Option<PathBuf>, device: DeviceChoice) -> anyhow::Result<()> {
    let options = |renderer| eframe::NativeOptions {
        renderer,
        viewport: egui::ViewportBuilder::default()
            .with_title("ostquant")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 500.0]),
        ..Default::default()
    };
    let start = |renderer| {
        let model = model.clone();
        eframe::run_native(
            "ostquant",
            options(renderer),
            Box::new(move |cc| {
                let mut app = OstquantApp::new(cc.storage, device);
                app.renderer = match cc.wgpu_render_state.as_ref() {
                    Some(rs) => format!("wgpu on {}", rs.adapter.get_info().name),
                    None => "OpenGL (glow)".into(),
                };
                if let Some(m) = model {
                    app.open_model(&cc.egui_ctx, Some(m));
                }
                Ok(Box::new(app))
            }),
        )
    };
    match start(eframe::Renderer::Wgpu) {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("ostquant: the wgpu renderer failed ({e}); trying OpenGL");
            start(eframe::Renderer::Glow).map_err(|e| anyhow::anyhow!("cannot open a window: {e}"))
        }
    }
}
