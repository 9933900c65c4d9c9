//! `ostquant bench` without the GUI's dependencies, for carrying to a lent GPU machine:
//! `device_bench [synthetic models] [tokens] [iters] [device]` (defaults: all 32 200 gpu), JSON
//! to $OUT.

use ostquant_core::runtime::bench::{Options, run};

fn main() {
    let arg = |i: usize, default: &str| std::env::args().nth(i).unwrap_or(default.into());
    let o = Options {
        device: arg(4, "gpu").parse().expect("device"),
        iters: arg(3, "200").parse().expect("iters"),
        model: None,
        synthetic: arg(1, "all"),
        tokens: arg(2, "32").parse().expect("tokens"),
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
