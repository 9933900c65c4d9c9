//! The int4 model folder: codes packed in the documented nibble order, a written folder reads
//! back to the fake-quantized weights (up to f16 scales), the header's forward options come
//! back, and a failed export leaves nothing behind.

use burn::tensor::Device;
use ostquant_core::model::LoadedModel;
use ostquant_core::model::checkpoint::{HostTensor, LlamaWeights};
use ostquant_core::model::llama::ForwardOptions;
use ostquant_core::model::qformat::{self, ForwardSpec, Header};
use ostquant_core::quant::method::quantize_weights_rtn;
use ostquant_core::quant::quantizer::{Grid, QuantSpec};
use ostquant_tests::write_tiny_model;

fn header(spec: Option<QuantSpec>, forward: ForwardOptions) -> Header {
    Header {
        format: qformat::FORMAT.into(),
        version: 1,
        method: "rtn".into(),
        bits: "W4A4KV4".into(),
        weight: spec,
        forward: (&forward).into(),
        details: serde_json::Value::Null,
    }
}

#[test]
fn codes_unpack_in_the_documented_order() {
    // One row of 16 columns, two groups of 8: word w holds columns 8w..8w+7, column 8w + j in
    // bits 4j..4j+3, code = q − qmin.
    let spec = QuantSpec::sym(4).with_group(8);
    let grids = [
        Grid {
            scale: 0.5,
            zero: 0.0,
        },
        Grid {
            scale: 2.0,
            zero: 0.0,
        },
    ];
    let q: Vec<i32> = vec![-8, -7, -1, 0, 1, 2, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0];
    let mut words = [0u32; 2];
    for (c, &v) in q.iter().enumerate() {
        words[c / 8] |= ((v + 8) as u32) << (4 * (c % 8));
    }
    let scales = [0.5f32, 2.0];
    let got = qformat::unpack(&words, &scales, None, 1, 16, &spec);
    let want: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(c, &v)| grids[c / 8].value(v))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        words[0] & 0xF,
        0,
        "column 0 (q = −8) is code 0 in the lowest nibble"
    );
}

fn max_rel(a: &HostTensor, b: &HostTensor) -> f32 {
    let scale = b.data.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.data
        .iter()
        .zip(&b.data)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn a_written_folder_reads_back_to_the_quantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let w = write_tiny_model(&src, 3);
    for spec in [QuantSpec::sym(4), QuantSpec::asym(4).with_group(16)] {
        let mut q = w.clone();
        let grids = quantize_weights_rtn(&mut q, &spec);
        let out = tmp.path().join(format!("q-{}", spec.sym));
        let fwd = ForwardOptions {
            down_hadamard: false,
            qk_hadamard: true,
            act: Some(QuantSpec::asym(4)),
            kv: Some(QuantSpec::asym(4)),
            ..Default::default()
        };
        qformat::write(
            &out,
            &src,
            &q,
            Some(&grids),
            &header(Some(spec), fwd.clone()),
        )
        .unwrap();
        assert!(out.join("tokenizer.json").is_file() && out.join(qformat::HEADER).is_file());
        let back = LlamaWeights::load(&out).unwrap();
        for (a, b) in back.layers.iter().zip(&q.layers) {
            for (x, y) in [
                (&a.wq, &b.wq),
                (&a.wv, &b.wv),
                (&a.w_down, &b.w_down),
                (&a.wo, &b.wo),
            ] {
                // Scales are stored as f16: 2^-11 relative error at most.
                assert!(max_rel(x, y) < 1e-3, "{spec:?}: {}", max_rel(x, y));
            }
            assert_eq!(a.attn_norm.data, b.attn_norm.data);
        }
        let loaded = LoadedModel::load(&out, &Device::flex()).unwrap();
        assert_eq!(loaded.model.options(), &fwd);
        assert_eq!(
            qformat::read_header(&out).unwrap().forward,
            ForwardSpec::from(&fwd)
        );
        // The folder is about a quarter of the f32 size of the linear weights.
        let st = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len();
        assert!(st > 0);
    }
}

#[test]
fn a_failed_export_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let w = write_tiny_model(&src, 4);
    let mut q = w.clone();
    let spec = QuantSpec::sym(3);
    let grids = quantize_weights_rtn(&mut q, &spec);
    let out = tmp.path().join("q");
    let err = qformat::write(
        &out,
        &src,
        &q,
        Some(&grids),
        &header(Some(spec), ForwardOptions::default()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("int4"), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the source folder remains: {left:?}");
    // A header of another format is refused by name.
    let ok = tmp.path().join("ok");
    qformat::write(
        &ok,
        &src,
        &w,
        None,
        &header(None, ForwardOptions::default()),
    )
    .unwrap();
    let h = ok.join(qformat::HEADER);
    let text = std::fs::read_to_string(&h)
        .unwrap()
        .replace("ostquant-int4", "other");
    std::fs::write(&h, text).unwrap();
    let err = LlamaWeights::load(&ok).unwrap_err().to_string();
    assert!(
        err.contains("quantization.json") && err.contains("other"),
        "{err}"
    );
}

#[test]
fn export_replaces_only_folders_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let w = write_tiny_model(&src, 5);
    let h = header(None, ForwardOptions::default());
    // A folder of the user's own files is never replaced (think `--out ~/models`).
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let err = qformat::write(&mine, &src, &w, None, &h)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mine") && err.contains("not a folder this tool wrote"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt")).unwrap(),
        "keep me"
    );
    // Nor is the source model folder itself.
    assert!(qformat::write(&src, &src, &w, None, &h).is_err());
    assert!(src.join("model.safetensors").is_file());
    // An empty folder, then the quantized folder itself, are fine: the second write replaces
    // the first, and nothing is left beside it.
    let out = tmp.path().join("q");
    std::fs::create_dir(&out).unwrap();
    qformat::write(&out, &src, &w, None, &h).unwrap();
    qformat::write(&out, &src, &w, None, &h).unwrap();
    assert!(LoadedModel::load(&out, &Device::default()).is_ok());
    let mut left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["m", "mine", "q"]);
}

#[test]
fn a_header_with_impossible_quantizers_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let w = write_tiny_model(&src, 6);
    let out = tmp.path().join("q");
    qformat::write(
        &out,
        &src,
        &w,
        None,
        &header(None, ForwardOptions::default()),
    )
    .unwrap();
    let path = out.join(qformat::HEADER);
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (edit, expect) in [
        (
            serde_json::json!({"weight": {"bits": 4, "sym": true, "group": 12}}),
            "groups of a multiple of 8",
        ),
        (
            serde_json::json!({"weight": {"bits": 3, "sym": true, "group": null}}),
            "4-bit weights",
        ),
        (
            serde_json::json!({"forward": {"down_hadamard": false, "qk_hadamard": false,
                "act": {"bits": 4, "sym": false, "group": 0}, "kv": null}}),
            "forward.act",
        ),
        (
            serde_json::json!({"forward": {"down_hadamard": false, "qk_hadamard": false,
                "act": {"bits": 4, "sym": false, "group": 24}, "kv": null}}),
            "do not divide",
        ),
    ] {
        let mut h = original.clone();
        for (k, v) in edit.as_object().unwrap() {
            h[k] = v.clone();
        }
        std::fs::write(&path, h.to_string()).unwrap();
        let err = LoadedModel::load(&out, &Device::default())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("quantization.json") && err.contains(expect),
            "{edit}: {err}"
        );
    }
}
