//! `ostquant bench` without the GUI's dependencies, for carrying to a lent GPU machine:
//! `device_bench [synthetic models] [tokens] [iters] [device] [prefill lengths]` (defaults: all
//! 32 200 gpu 512,2048), JSON to $OUT.

use ostquant_core::runtime::bench::{Options, run};

fn main() {
    let arg = |i: usize, default: &str| std::env::args().nth(i).unwrap_or(default.into());
    let o = Options {
        device: arg(4, "gpu").parse().expect("device"),
        iters: arg(3, "200").parse().expect("iters"),
        model: None,
        synthetic: arg(1, "all"),
        tokens: arg(2, "32").parse().expect("tokens"),
        prefill: arg(5, "512,2048")
            .split(',')
            .filter(|v| *v != "none")
            .map(|v| v.parse().expect("prefill lengths"))
            .collect(),
    };
    match run(&o, &mut std::io::stdout()) {
        Ok(report) => {
            if let Ok(dir) = std::env::var("OUT") {
                let path = std::path::Path::new(&dir).join("bench.json");
                std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
            }
        }
        Err(e) => {
            eprintln!("device_bench: {e}");
            std::process::exit(1);
        }
    }
}
