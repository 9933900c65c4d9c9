//! Model overview: architecture, size, dtype, quantization, and which device does what.

use std::collections::BTreeMap;

use ostquant_core::device::{self, DeviceChoice};
use ostquant_core::eval::suite::Lab;
use ostquant_core::model::checkpoint::stored_dtypes;
use ostquant_core::model::config::LlamaConfig;
use ostquant_core::model::qformat::{self, Header};

use super::app::Shared;

/// What the overview shows, gathered once when the model opens.
pub struct Overview {
    pub config: LlamaConfig,
    pub params: usize,
    pub disk_bytes: u64,
    pub dtypes: BTreeMap<String, usize>,
    pub quantization: Option<Header>,
    pub compute: String,
    pub adapters: Vec<String>,
    /// The first real GPU among the compute adapters (what `--device auto` runs int4 on).
    pub gpu: Option<String>,
}

impl Overview {
    pub fn of(lab: &Lab) -> anyhow::Result<Self> {
        let dir = lab.dir();
        let config = lab.weights().config.clone();
        let disk_bytes = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let quantization = if qformat::is_quantized(dir) {
            Some(qformat::read_header(dir)?)
        } else {
            None
        };
        let compute: Vec<_> = ostquant_core::device::adapters()
            .into_iter()
            .filter(|a| !a.is_opengl())
            .collect();
        Ok(Overview {
            params: config.n_params(),
            config,
            disk_bytes,
            dtypes: stored_dtypes(dir)?,
            quantization,
            compute: lab.device().description.clone(),
            // The compute backends only: OpenGL (listed for the same GPU again) is only the
            // window's fallback renderer.
            adapters: compute.iter().map(|a| a.to_string()).collect(),
            gpu: compute
                .iter()
                .find(|a| a.is_gpu())
                .map(|a| a.info.name.clone()),
        })
    }
}

fn row(ui: &mut egui::Ui, key: &str, value: impl Into<egui::WidgetText>) {
    ui.label(key);
    ui.label(value);
    ui.end_row();
}

pub fn ui(ui: &mut egui::Ui, shared: &Shared, renderer: &str) {
    let Some(m) = &shared.model else {
        ui.heading("No model open");
        ui.label(
            "Open a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a GGUF \
             file from the bar above, or the default SmolLM2-135M-Instruct.",
        );
        devices(ui, None, renderer, shared.device);
        return;
    };
    let o = &m.overview;
    let c = &o.config;
    ui.heading(
        m.dir
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy()),
    );
    egui::Grid::new("overview")
        .num_columns(2)
        .striped(true)
        .show(ui, |ui| {
            row(ui, "Folder", m.dir.display().to_string());
            row(ui, "Architecture", c.architectures.join(", "));
            let params = if o.params >= 10_000_000 {
                format!("{:.1} M", o.params as f64 / 1e6)
            } else {
                format!("{}", o.params)
            };
            row(ui, "Parameters", params);
            row(ui, "Layers", c.num_hidden_layers.to_string());
            row(
                ui,
                "Hidden / MLP",
                format!("{} / {}", c.hidden_size, c.intermediate_size),
            );
            row(
                ui,
                "Heads (query / KV × dim)",
                format!(
                    "{} / {} × {}",
                    c.num_attention_heads,
                    c.n_kv_heads(),
                    c.head_dim()
                ),
            );
            row(ui, "Vocabulary", c.vocab_size.to_string());
            row(ui, "Context", c.max_position_embeddings.to_string());
            row(ui, "Tied embeddings", c.tie_word_embeddings.to_string());
            let dtypes: Vec<String> = o.dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
            row(ui, "Stored tensors", dtypes.join(", "));
            row(
                ui,
                "Size on disk",
                format!("{:.1} MB", o.disk_bytes as f64 / 1e6),
            );
            match &o.quantization {
                Some(h) => row(
                    ui,
                    "Quantization",
                    format!(
                        "{} {} (int4 folder; Hadamard down {}, Q/K {})",
                        h.method, h.bits, h.forward.down_hadamard, h.forward.qk_hadamard
                    ),
                ),
                None => row(ui, "Quantization", "none (full precision)"),
            }
        });
    devices(ui, Some(o), renderer, shared.device);
    if o.adapters.is_empty() {
        ui.weak("No wgpu adapter was found: the compute runs on the CPU backend.");
    } else {
        ui.label(format!(
            "wgpu compute adapters (device-local memory where the driver reports it): {}",
            o.adapters.join("; ")
        ));
    }
}

fn devices(ui: &mut egui::Ui, o: Option<&Overview>, renderer: &str, choice: DeviceChoice) {
    ui.add_space(8.0);
    ui.heading("Devices");
    egui::Grid::new("devices").num_columns(2).show(ui, |ui| {
        row(ui, "Window", renderer.to_string());
        row(
            ui,
            "Calibration, evaluation, chat (FP)",
            o.map_or("chosen when a model opens (--device auto)", |o| &o.compute)
                .to_string(),
        );
        row(
            ui,
            "Chat with an int4 folder",
            match (device::shared_wgpu(choice), choice, o) {
                (Some(s), _, _) => format!("the WGSL int4 runtime on {}", s.info.name),
                (None, DeviceChoice::Cpu, _) => "the CPU int4 runtime (--device cpu)".into(),
                (None, DeviceChoice::Auto, Some(o)) => match &o.gpu {
                    Some(gpu) => format!("the WGSL int4 runtime on {gpu}"),
                    None => "the CPU int4 runtime (no GPU found)".into(),
                },
                (None, DeviceChoice::Auto, None) => {
                    "the WGSL int4 runtime on a GPU; the CPU int4 runtime otherwise".into()
                }
                (None, _, _) => format!("the WGSL int4 runtime on the {choice:?} device"),
            },
        );
        if let Some(s) = device::shared_wgpu(choice) {
            let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
            row(
                ui,
                "Shared wgpu device",
                format!(
                    "{}: the window, burn and the int4 runtime use one device and queue; \
                     memory {}, held by ostquant {}",
                    s.info.name,
                    s.memory.map_or("not reported".into(), gib),
                    s.reserved_bytes().map_or("not reported".into(), gib),
                ),
            );
        }
    });
}
