//! The desktop app: open a model, inspect its layers, calibrate, evaluate, export and chat, in
//! one eframe window. The panels hold no algorithms: every job calls `ostquant-core` on a
//! background thread (see `jobs`) and draws what it returns.

mod app;
mod calibrate;
pub mod chat;
mod dialog;
mod evaluate;
mod inspector;
mod jobs;
mod overview;
mod style;

use std::path::PathBuf;

pub use app::{OstquantApp, Shared, Tab};
use ostquant_core::device::{self, DeviceChoice};

/// Open the window. Where the compute runs on a wgpu device, burn opens it and the window and
/// the int4 runtime draw and run on the same device and queue (one context, one memory pool);
/// otherwise, or if that fails, eframe picks its own wgpu adapter, then OpenGL through glow.
pub fn run(model: Option<PathBuf>, device: DeviceChoice) -> anyhow::Result<()> {
    let shared = device::share_wgpu(device).unwrap_or_else(|e| {
        eprintln!("ostquant: {e}; the window opens its own device");
        None
    });
    let options = |renderer, shared: Option<&device::SharedWgpu>| {
        let mut wgpu_options = eframe::WgpuConfiguration::default();
        if let Some(s) = shared {
            wgpu_options.wgpu_setup =
                eframe::egui_wgpu::WgpuSetup::Existing(eframe::egui_wgpu::WgpuSetupExisting {
                    instance: s.setup.instance.clone(),
                    adapter: s.setup.adapter.clone(),
                    device: s.setup.device.clone(),
                    queue: s.setup.queue.clone(),
                });
        }
        eframe::NativeOptions {
            renderer,
            wgpu_options,
            viewport: egui::ViewportBuilder::default()
                .with_title("ostquant")
                .with_inner_size([1280.0, 820.0])
                .with_min_inner_size([800.0, 500.0]),
            ..Default::default()
        }
    };
    let start = |renderer, shared| {
        let model = model.clone();
        eframe::run_native(
            "ostquant",
            options(renderer, shared),
            Box::new(move |cc| {
                let mut app = OstquantApp::new(cc.storage, device);
                app.renderer = match cc.wgpu_render_state.as_ref() {
                    Some(rs) if shared.is_some() => format!(
                        "wgpu on {} (the compute's device, shared)",
                        rs.adapter.get_info().name
                    ),
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
    if let Some(s) = shared {
        eprintln!(
            "ostquant: the window, burn and the int4 runtime share the wgpu device {}",
            s.info.name
        );
        match start(eframe::Renderer::Wgpu, Some(s)) {
            Ok(()) => return Ok(()),
            Err(e) => eprintln!(
                "ostquant: the window cannot draw on the shared device ({e}); trying its own"
            ),
        }
    }
    match start(eframe::Renderer::Wgpu, None) {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("ostquant: the wgpu renderer failed ({e}); trying OpenGL");
            start(eframe::Renderer::Glow, None)
                .map_err(|e| anyhow::anyhow!("cannot open a window: {e}"))
        }
    }
}
