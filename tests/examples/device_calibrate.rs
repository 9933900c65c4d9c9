//! The paper-preset calibration (SPEC §5: 100 steps × 16 windows × 2048 tokens) on a lent GPU,
//! without the app's dependencies, so the binary travels to the device machine
//! (tests/device/calib.sh says how).
//!
//! Here: `device_calibrate prepare DIR` writes DIR/windows.bin, the paper preset's calibration
//! windows of the default model (the same random windows of the Wikipedia calibration half
//! that `ostquant quantize --preset paper` draws), as little-endian u32: count, length, tokens.
//!
//! There: `device_calibrate run GGUF WINDOWS OUT METHOD[,METHOD…] [BITS] [DEVICE]` imports the
//! GGUF, learns each method's transforms at BITS (default W4A4KV4) on DEVICE (default gpu;
//! cpu or software for a smoke test here) and writes each
//! checkpoint to OUT, every 5 steps and at the end, under the name the calibration cache uses:
//! copied into ~/.cache/ostquant/calib/<model>/, `ostquant eval --preset paper` picks it up.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use ostquant_core::assets;
use ostquant_core::calib::{Event, Preset, Store, learn_resumable};
use ostquant_core::device::{DeviceChoice, select};
use ostquant_core::eval::suite::Lab;
use ostquant_core::model::checkpoint::LlamaWeights;
use ostquant_core::model::import::import_gguf;
use ostquant_core::quant::method::{Bits, Method};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("prepare") if args.len() == 2 => prepare(Path::new(&args[1])),
        Some("run") if (5..=7).contains(&args.len()) => run(&args[1..]),
        _ => Err(
            "usage: device_calibrate prepare DIR | run GGUF WINDOWS OUT METHODS [BITS] [DEVICE]"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("device_calibrate: {e}");
        std::process::exit(1);
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn paper_settings(method: Method, bits: Bits) -> Result<ostquant_core::calib::Settings, String> {
    method
        .learned_settings(bits, Preset::Paper)
        .ok_or_else(|| format!("{} learns nothing", method.name()))
}

fn prepare(dir: &Path) -> Res {
    let s = paper_settings(Method::Ostquant, "W4A4KV4".parse()?)?;
    let lab = Lab::open(&assets::default_model_dir(), select(DeviceChoice::Cpu)?)?;
    let windows = lab.random_calibration_windows(s.samples, s.seq_len)?;
    let mut out = Vec::with_capacity(8 + 4 * s.samples * s.seq_len);
    out.extend((windows.len() as u32).to_le_bytes());
    out.extend((s.seq_len as u32).to_le_bytes());
    for t in windows.iter().flatten() {
        out.extend(t.to_le_bytes());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("windows.bin"), out)?;
    println!("{} windows of {} tokens", windows.len(), s.seq_len);
    Ok(())
}

fn read_windows(path: &Path) -> Result<Vec<Vec<u32>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let (n, len) = match words.as_slice() {
        [n, len, ..] => (*n as usize, *len as usize),
        _ => return Err(format!("{}: too short", path.display())),
    };
    if words.len() != 2 + n * len {
        return Err(format!(
            "{}: {} tokens, expected {n} × {len}",
            path.display(),
            words.len() - 2
        ));
    }
    Ok(words[2..].chunks(len).map(<[u32]>::to_vec).collect())
}

fn run(args: &[String]) -> Res {
    let (gguf, windows, out) = (
        Path::new(&args[0]),
        Path::new(&args[1]),
        Path::new(&args[2]),
    );
    let bits: Bits = args.get(4).map_or("W4A4KV4", String::as_str).parse()?;
    let windows = read_windows(windows)?;
    let dir = std::env::temp_dir().join("device-calibrate-model");
    if !dir.join("config.json").exists() {
        import_gguf(gguf, &dir, &mut |_, _| {})?;
    }
    let w = LlamaWeights::load(&dir)?;
    let device = select(args.get(5).map_or("gpu", String::as_str).parse()?)?;
    println!("{device}");
    std::fs::create_dir_all(out)?;
    for name in args[3].split(',') {
        let method: Method = name.parse()?;
        let settings = paper_settings(method, bits)?;
        let path = out.join(format!("{}-{}.safetensors", method.name(), settings.key()));
        println!("{name} {bits}: {:?}", settings);
        let t0 = Instant::now();
        let mut events = |e: &Event| match e {
            Event::Started { start, steps } => println!("steps {start}..{steps}"),
            Event::Step {
                step,
                steps,
                loss,
                seconds,
                ..
            } => println!(
                "step {step}/{steps} loss {loss:.4} {seconds:.2} s ({:.0} s so far)",
                t0.elapsed().as_secs_f64()
            ),
        };
        let store = Store {
            path: &path,
            fresh: false,
        };
        let cancel = AtomicBool::new(false);
        learn_resumable(
            &w,
            &settings,
            &windows,
            &device.device,
            store,
            &mut events,
            &cancel,
        )?;
        println!(
            "{name}: {:.0} s, checkpoint {}",
            t0.elapsed().as_secs_f64(),
            path.display()
        );
    }
    Ok(())
}
