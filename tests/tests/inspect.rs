//! `inspect` on a tiny model: every layer and site measured, device-side moments equal to a
//! host computation on the same activations.

use burn::tensor::Device;
use ostquant_core::analysis::inspect::inspect;
use ostquant_core::analysis::qsur::Moments;
use ostquant_core::model::llama::{Llama, Site};
use ostquant_tests::{random_weights, tiny_config};

#[test]
fn inspect_covers_every_layer_and_matches_host_moments() {
    let w = random_weights(&tiny_config(64), 31);
    let model = Llama::new(&w, &Device::flex());
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..40).map(|i| ((i * 7 + s * 13) % 64) as u32).collect())
        .collect();
    let ins = inspect(
        &model,
        &w,
        "none",
        &windows,
        &mut |_, _| {},
        &Default::default(),
    )
    .unwrap();
    assert_eq!(ins.tokens, 120);
    assert_eq!(ins.stats.len(), w.layers.len() * (4 + 7));
    for s in &ins.stats {
        assert!(s.eigenvalues.windows(2).all(|p| p[0] >= p[1]));
        if !s.is_weight {
            assert_eq!(s.samples, 120);
            let q = s.qsur.expect("120 samples > dims");
            assert!(q.rel > 0.0 && q.rel <= 1.0 + 1e-9, "{}: {}", s.name, q.rel);
        }
    }
    // Recompute layer 1's down_proj input moments on the host from the tapped activations.
    let mut host = Moments::new(w.config.intermediate_size);
    for win in &windows {
        let mut cache = model.new_cache();
        model.forward_tapped(
            std::slice::from_ref(win),
            &mut cache,
            &mut |layer, site, x| {
                if layer == 1 && site == Site::DownIn {
                    host.add_rows(&x.into_data().try_to_vec::<f32>().unwrap());
                }
            },
        );
    }
    let dev = ins.get(1, "down_in").unwrap();
    let (a, b) = (&dev.max_abs, &host.max_abs);
    assert!(
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs().max(1.0))
    );
    let cov = host.covariance();
    let trace: f64 = (0..host.d).map(|i| cov[i * host.d + i]).sum();
    let eig_sum: f64 = dev.eigenvalues.iter().sum();
    assert!(
        (trace - eig_sum).abs() < 1e-4 * trace,
        "trace {trace} vs Σλ {eig_sum}"
    );
}
