//! Times the MSE clip search of weight quantization (RTN and GPTQ run it once per output
//! channel or group) on weight-like rows: Gaussian with a few outliers per row.
//!
//!     cargo run --release -p ostquant-tests --example clip_search
//!
//! Prints µs per row for each row length and the mean chosen shrink factor (so two code states
//! can be checked to pick the same factors).

use ostquant_core::quant::quantizer::{QuantSpec, search_clip};
use rand::{Rng, SeedableRng};

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    println!("row length   rows   µs/row (sym, p 2.4)   mean factor");
    for cols in [576usize, 1536, 4096] {
        let rows = 4_000_000 / cols;
        let data: Vec<Vec<f32>> = (0..rows)
            .map(|_| {
                let mut g: Vec<f32> = (0..cols)
                    .map(|_| {
                        // Box–Muller: N(0, 0.02²), a typical weight spread.
                        let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                        0.02 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                    })
                    .collect();
                for _ in 0..3 {
                    let i = rng.random_range(0..cols);
                    g[i] *= 6.0;
                }
                g
            })
            .collect();
        let spec = QuantSpec::sym(4);
        let t0 = std::time::Instant::now();
        let sum: f64 = data.iter().map(|g| search_clip(g, &spec, 2.4) as f64).sum();
        let us = t0.elapsed().as_secs_f64() * 1e6 / rows as f64;
        println!(
            "{cols:>10} {rows:>6} {us:>21.1} {:>13.4}",
            sum / rows as f64
        );
    }
}
