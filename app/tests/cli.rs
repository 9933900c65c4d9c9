//! The binary on bad input: a clear error naming the file, a non-zero exit code, no panic.

use std::path::Path;
use std::process::{Command, Output};

use ostquant_tests::write_tiny_model;

fn ostquant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ostquant"))
        .args(args)
        .output()
        .expect("run ostquant")
}

/// Run, expect failure, and return stderr.
fn fails(args: &[&str]) -> String {
    let out = ostquant(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure: {args:?}");
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model folder `m` and a text file `name` with `text`, in a temporary folder.
fn model_and_text(
    name: &str,
    text: &[u8],
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny_model(&model, 1);
    let file = dir.path().join(name);
    std::fs::write(&file, text).unwrap();
    (dir, model, file)
}

#[test]
fn ppl_on_empty_text_file() {
    let (_dir, model, text) = model_and_text("empty.txt", b"  \n");
    let err = fails(&[
        "ppl",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--text",
        s(&text),
    ]);
    assert!(err.contains("empty.txt: the file is empty"), "{err}");
}

#[test]
fn ppl_on_binary_file() {
    let (_dir, model, text) = model_and_text("blob.bin", &[0x7f, b'E', b'L', b'F', 0, 1, 2, 0xff]);
    let err = fails(&[
        "ppl",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--text",
        s(&text),
    ]);
    assert!(err.contains("blob.bin: binary file"), "{err}");
}

#[test]
fn ppl_on_text_shorter_than_a_window() {
    let (_dir, model, text) = model_and_text("short.txt", b"just a few words");
    let err = fails(&[
        "ppl",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--text",
        s(&text),
        "--ctx",
        "64",
    ]);
    assert!(err.contains("fewer than one window of 64"), "{err}");
}

#[test]
fn ppl_runs_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny_model(&model, 1);
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(10),
    )
    .unwrap();
    let out = ostquant(&[
        "ppl",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--text",
        s(&text),
        "--ctx",
        "64",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 450 bytes → 7 windows of 64 byte tokens, 63 scored each; a random model is near uniform
    // over 260 tokens, so the perplexity is finite and of that order.
    assert!(stdout.contains("7 windows, 441 tokens scored"), "{stdout}");
    let ppl: f64 = stdout
        .split("perplexity ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ppl > 20.0 && ppl < 5000.0, "{ppl}");
}

#[test]
fn missing_model_folder() {
    let err = fails(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert!(
        err.contains("/nonexistent/model") && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn model_folder_without_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = fails(&[
        "generate",
        "--model",
        s(dir.path()),
        "--device",
        "cpu",
        "--prompt",
        "hi",
    ]);
    assert!(err.contains("tokenizer.json is missing"), "{err}");
}

#[test]
fn truncated_gguf_import() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00\x05").unwrap();
    let out = dir.path().join("out");
    let err = fails(&["import", s(&path), s(&out)]);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn outputs_and_sizes_that_cannot_work_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    write_tiny_model(&m, 1);
    // `--out` a folder of other files (here the model itself): refused, nothing touched.
    let err = fails(&[
        "quantize",
        "--model",
        s(&m),
        "--device",
        "cpu",
        "--method",
        "rtn",
        "--out",
        s(&m),
    ]);
    assert!(err.contains("not a folder this tool wrote"), "{err}");
    assert!(m.join("model.safetensors").is_file());
    let err = fails(&["import", s(&m.join("model.safetensors")), s(&m)]);
    assert!(err.contains("not a folder this tool wrote"), "{err}");
    let err = fails(&[
        "eval",
        "--model",
        s(&m),
        "--device",
        "cpu",
        "--tasks",
        "piqa",
        "--limit",
        "0",
    ]);
    assert!(err.contains("--limit must be at least 1"), "{err}");
    let err = fails(&[
        "quantize",
        "--model",
        s(&m),
        "--device",
        "cpu",
        "--method",
        "gptq",
        "--calib-len",
        "1",
        "--out",
        s(&dir.path().join("q")),
    ]);
    assert!(err.contains("--calib-len at least 2"), "{err}");
}

#[test]
fn generate_streams_from_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let out = ostquant(&[
        "generate",
        "--model",
        s(dir.path()),
        "--device",
        "cpu",
        "--prompt",
        "hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("new tokens at"), "{err}");
}

/// A reader that goes away (`generate … | head -c 5`) ends the generation quietly: no panic,
/// exit code 0.
#[test]
fn generate_stops_quietly_when_stdout_closes() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ostquant"))
        .args(["generate", "--model", s(dir.path()), "--device", "cpu"])
        .args(["--prompt", "hello", "--max-tokens", "64"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ostquant");
    // Closed before the model has loaded: the first write fails.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

/// Sizes of zero are refused, not quietly read as one; an empty prompt and a missing folder get
/// one line each.
#[test]
fn zero_sizes_and_empty_prompts_are_refused() {
    let text = "the cat sat on the mat. ".repeat(40);
    let (_dir, model, file) = model_and_text("t.txt", text.as_bytes());
    let m = s(&model);
    let err = fails(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-tokens",
        "0",
    ]);
    assert!(err.contains("--max-tokens must be at least 1"), "{err}");
    let err = fails(&["generate", "--model", m, "--prompt", "  "]);
    assert!(err.contains("--prompt is empty"), "{err}");
    let err = fails(&[
        "ppl",
        "--model",
        m,
        "--device",
        "cpu",
        "--text",
        s(&file),
        "--ctx",
        "16",
        "--windows",
        "0",
    ]);
    assert!(err.contains("0 windows"), "{err}");
    let err = fails(&["inspect", "--model", m, "--device", "cpu", "--windows", "0"]);
    assert!(err.contains("--windows must be at least 1"), "{err}");
    let err = fails(&["info", "--model", "/nonexistent/model"]);
    assert_eq!(err.matches("no such file or folder").count(), 1, "{err}");
}

#[test]
fn eval_scores_a_method_and_caches_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    write_tiny_model(&dir, 1);
    let cells = tmp.path().join("cells");
    let run = || {
        ostquant(&[
            "eval",
            "--model",
            s(&dir),
            "--device",
            "cpu",
            "--method",
            "quarot",
            "--bits",
            "W4A4KV4",
            "--ctx",
            "64",
            "--windows",
            "2",
            "--cache",
            s(&cells),
        ])
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        out.contains("quarot W4A4KV4") && out.contains("KL to FP") && out.contains("126 tokens"),
        "{out}"
    );
    let second = run();
    assert!(String::from_utf8_lossy(&second.stderr).contains("cached result"));
    assert_eq!(String::from_utf8_lossy(&second.stdout), out);
    // The cell lies in the folder --cache named, where the second run found it.
    let key = ostquant_core::eval::cache_path(
        &cells,
        &dir,
        "quarot",
        "W4A4KV4",
        "wiki-2016-ctx64",
        Some(2),
    );
    assert!(key.is_file(), "{} missing", key.display());
}

/// A tiny model and the files of a `results` table about it: two PIQA items, one 64-token
/// perplexity window.
struct TinyTable {
    dir: tempfile::TempDir,
    model: std::path::PathBuf,
    cells: std::path::PathBuf,
    md: std::path::PathBuf,
    json: std::path::PathBuf,
}

impl TinyTable {
    fn new() -> Self {
        let (dir, model, _) = model_and_text("unused.txt", b"x");
        let (cells, md, json) = (
            dir.path().join("cells"),
            dir.path().join("R.md"),
            dir.path().join("r.json"),
        );
        TinyTable {
            dir,
            model,
            cells,
            md,
            json,
        }
    }

    /// `results` with `extra` arguments: the JSON rows and the Markdown table it wrote.
    fn run(&self, extra: &[&str]) -> (serde_json::Value, String) {
        let mut args = vec![
            "results",
            "--model",
            s(&self.model),
            "--device",
            "cpu",
            "--tasks",
            "piqa",
            "--limit",
            "2",
            "--windows",
            "1",
            "--ctx",
            "64",
            "--cache",
            s(&self.cells),
            "--md",
            s(&self.md),
            "--json",
            s(&self.json),
        ];
        args.extend_from_slice(extra);
        let out = ostquant(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        let rows: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&self.json).unwrap()).unwrap();
        (rows, std::fs::read_to_string(&self.md).unwrap())
    }
}

#[test]
fn results_writes_the_table_and_its_json_and_resumes_from_its_cells() {
    let t = TinyTable::new();
    let (dir, model, cells, md, json) = (&t.dir, &t.model, &t.cells, &t.md, &t.json);
    let run = |methods: &str, extra: &[&str]| {
        let mut args = vec!["--methods", methods, "--bits", "W4A4KV4"];
        args.extend_from_slice(extra);
        t.run(&args)
    };
    // Nothing cached yet: --cached-only refuses to write an empty table over the files.
    std::fs::write(md, "an earlier table").unwrap();
    let mut args = vec![
        "results",
        "--model",
        s(model),
        "--device",
        "cpu",
        "--methods",
        "fp",
    ];
    args.extend([
        "--cache",
        s(cells),
        "--md",
        s(md),
        "--json",
        s(json),
        "--cached-only",
    ]);
    let err = fails(&args);
    assert!(err.contains("no row of this table is cached yet"), "{err}");
    assert_eq!(std::fs::read_to_string(md).unwrap(), "an earlier table");
    assert!(!json.exists());
    let (rows, table) = run("fp,rtn", &[]);
    let rows = rows.as_array().unwrap().clone();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (fp, rtn) = (&rows[0], &rows[1]);
    assert_eq!(
        (&fp["method"], &fp["bits"]),
        (&"fp".into(), &"W16A16KV16".into())
    );
    assert_eq!(
        (&rtn["method"], &rtn["bits"]),
        (&"rtn".into(), &"W4A4KV4".into())
    );
    for row in [fp, rtn] {
        assert_eq!(row["ctx"], 64);
        assert_eq!(row["limit"], 2);
        assert!(row["device"].as_str().unwrap().contains("cpu"), "{row}");
        let piqa = row["zeroshot"]["piqa"].as_f64().unwrap();
        // Two items: each task score is 0, 50 or 100, and the average of one task is itself.
        assert!([0.0, 50.0, 100.0].contains(&piqa), "{row}");
        assert_eq!(row["zeroshot_avg"].as_f64().unwrap(), piqa);
    }
    assert_eq!(
        (fp["kl_to_fp"].as_f64(), fp["top1_agree"].as_f64()),
        (Some(0.0), Some(1.0))
    );
    assert!(rtn["kl_to_fp"].as_f64().unwrap() > 0.0, "{rtn}");
    assert!(
        table.contains("| fp | W16A16KV16 |") && table.contains("| rtn | W4A4KV4 |"),
        "{table}"
    );
    assert!(
        table.contains(s(cells)),
        "the table names its cache: {table}"
    );
    // Item by item against FP: FP's own row is the base (·), RTN's difference is the
    // difference of the two averages (both cells keep their items' outcomes).
    let (_, table) = run("fp,rtn", &["--cached-only", "--versus", "fp"]);
    let delta = rtn["zeroshot_avg"].as_f64().unwrap() - fp["zeroshot_avg"].as_f64().unwrap();
    let rtn_line = table.lines().find(|l| l.starts_with("| rtn |")).unwrap();
    assert!(
        table.contains("| Δ vs fp |") && table.contains(" | · | "),
        "{table}"
    );
    assert!(
        rtn_line.contains(&format!(" {delta:+.2} ± ")),
        "Δ {delta:+.2} in {rtn_line}"
    );

    // The same row measured by `eval` into another cache gives the same perplexity.
    let other = dir.path().join("other-cells");
    let eval = ostquant(&[
        "eval",
        "--model",
        s(model),
        "--device",
        "cpu",
        "--method",
        "rtn",
        "--bits",
        "W4A4KV4",
        "--tasks",
        "none",
        "--windows",
        "1",
        "--ctx",
        "64",
        "--cache",
        s(&other),
    ]);
    let eval_out = String::from_utf8_lossy(&eval.stdout);
    let ppl = format!("{:.3}", rtn["wiki_ppl"].as_f64().unwrap());
    assert!(
        eval.status.success() && eval_out.contains(&ppl),
        "{ppl} in {eval_out}"
    );

    // --cached-only measures nothing: the cached rows come back unchanged, the new one is named.
    let (again, table) = run("fp,rtn,quarot", &["--cached-only"]);
    assert_eq!(again.as_array().unwrap(), &rows);
    assert!(
        table.contains("not measured yet: quarot W4A4KV4"),
        "{table}"
    );
}

#[test]
fn results_rows_carry_their_own_calibration() {
    let t = TinyTable::new();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--methods",
            "fp",
            "--calib-windows",
            "2",
            "--calib-len",
            "32",
        ];
        args.extend_from_slice(extra);
        t.run(&args)
    };
    let row = "spinquant W4A4KV4 --steps 2 --samples 1 --seq-len 16";
    let (rows, table) = run(&["--row", row]);
    let spin = &rows[1];
    assert_eq!(
        (&spin["method"], &spin["bits"]),
        (&"spinquant".into(), &"W4A4KV4".into())
    );
    let calib = &spin["calibration"];
    assert_eq!(
        (&calib["steps"], &calib["samples"], &calib["seq_len"]),
        (&2.into(), &1.into(), &16.into()),
        "{spin}"
    );
    assert!(rows[0]["calibration"].is_null(), "FP learns nothing");
    // Every cell names the build that measured it; this run measured them all.
    let builds = spin["measured_by"]
        .as_array()
        .expect("measured_by is a list");
    assert_eq!(builds.len(), 1, "{spin}");
    assert!(
        builds[0].as_str().is_some_and(|b| b != "unrecorded"),
        "{spin}"
    );
    let measured_by = format!(
        "Measured by: `{}`: fp W16A16KV16, spinquant W4A4KV4 [1].",
        builds[0].as_str().unwrap()
    );
    assert!(table.contains(&measured_by), "{table}");
    assert!(
        table.contains("| spinquant [1] | W4A4KV4 |")
            && table.contains(
                "[1] spinquant W4A4KV4 calibrated with `--steps 2 --samples 1 --seq-len 16`"
            )
            && table.contains(&format!("--row '{row}'")),
        "{table}"
    );
    // The row's flags go on top of the table's: the same calibration split between the two
    // is the same cached row, and another step count is another row, not measured yet.
    let (again, _) = run(&[
        "--cached-only",
        "--steps",
        "2",
        "--row",
        "spinquant W4A4KV4 --samples 1 --seq-len 16",
    ]);
    assert_eq!(again[1]["wiki_ppl"], spin["wiki_ppl"]);
    // A row with no flags of its own has the table's calibration and no note.
    let (plain, table) = run(&[
        "--cached-only",
        "--steps",
        "2",
        "--samples",
        "1",
        "--seq-len",
        "16",
        "--row",
        "spinquant W4A4KV4",
    ]);
    assert_eq!(plain[1]["wiki_ppl"], spin["wiki_ppl"]);
    assert!(
        table.contains("| spinquant | W4A4KV4 |") && !table.contains("[1]"),
        "{table}"
    );
    let (_, table) = run(&[
        "--cached-only",
        "--row",
        "spinquant W4A4KV4 --steps 3 --samples 1 --seq-len 16",
    ]);
    assert!(
        table.contains("not measured yet: spinquant W4A4KV4 [1]"),
        "{table}"
    );

    // A row of RTN weights is another row (its own cells), noted as such.
    let (rtn, table) = run(&[
        "--cached-only",
        "--row",
        row,
        "--row",
        "spinquant W4A4KV4 --steps 2 --samples 1 --seq-len 16 --w-rtn",
    ]);
    assert!(
        table.contains("not measured yet: spinquant W4A4KV4 [2]"),
        "{table}"
    );
    assert_eq!(rtn[1]["rounding"], "gptq");
    let (rtn, table) = run(&[
        "--row",
        "spinquant W4A4KV4 --steps 2 --samples 1 --seq-len 16 --w-rtn",
    ]);
    assert_eq!(rtn[1]["rounding"], "rtn");
    assert_ne!(rtn[1]["wiki_ppl"], spin["wiki_ppl"]);
    assert!(
        table.contains(
            "[1] spinquant W4A4KV4 calibrated with `--steps 2 --samples 1 --seq-len 16`, weights rounded to nearest (no GPTQ)"
        ),
        "{table}"
    );
    // A baseline's row may calibrate GPTQ on other windows than the table's: its own cell,
    // noted, with the windows in its JSON row.
    let (gptq, table) = run(&["--row", "quarot-gptq W4A16KV16 --calib-windows 3"]);
    assert_eq!(gptq[1]["calib_windows"], serde_json::json!([3, 32]));
    let (table_gptq, _) = t.run(&[
        "--methods",
        "fp,quarot-gptq",
        "--bits",
        "W4A16KV16",
        "--calib-windows",
        "2",
        "--calib-len",
        "32",
    ]);
    assert_eq!(table_gptq[1]["calib_windows"], serde_json::json!([2, 32]));
    assert_ne!(gptq[1]["wiki_ppl"], table_gptq[1]["wiki_ppl"]);
    assert!(
        table.contains("| quarot-gptq [1] | W4A16KV16 |")
            && table.contains("[1] quarot-gptq W4A16KV16 GPTQ on 3 windows of 32 tokens"),
        "{table}"
    );
    // ... or take GPTQ's columns in act-order: another cell, noted.
    let (ao, table) = run(&["--row", "quarot-gptq W4A16KV16 --act-order"]);
    assert_eq!(ao[1]["rounding"], "gptq-act-order");
    assert_eq!(table_gptq[1]["rounding"], "gptq");
    assert!(
        table.contains("[1] quarot-gptq W4A16KV16 GPTQ in act-order"),
        "{table}"
    );
    // Any quantizing row may have its own weight grid: another cell, noted, in its JSON row.
    let (grouped, table) = run(&["--row", "rtn W4A16KV16 --w-group 16 --w-asym"]);
    assert_eq!(
        (&grouped[1]["w_group"], &grouped[1]["w_asym"]),
        (&16.into(), &true.into())
    );
    assert_eq!(
        (&table_gptq[1]["w_group"], &table_gptq[1]["w_asym"]),
        (&serde_json::Value::Null, &false.into())
    );
    assert!(
        table.contains(
            "[1] rtn W4A16KV16 weights in groups of 16 input columns, asymmetric weights"
        ),
        "{table}"
    );
    for (spec, why) in [
        ("fp W16A16KV16 --w-group 16", "takes no --w-group"),
        ("rtn W4A4KV4", "learns nothing"),
        ("quarot-gptq W4A4KV4", "learns nothing"),
        ("rtn W4A4KV4 --calib-windows 3", "calibrates nothing"),
        ("ostquant W4A4KV4 --w-rtn --calib-windows 3", "without GPTQ"),
        ("rtn W4A4KV4 --act-order", "rounds its weights to nearest"),
        (
            "ostquant W4A4KV4 --w-rtn --act-order",
            "no meaning with RTN weights",
        ),
        ("gptq W4A4KV4 --w-rtn", "is the method rtn"),
        ("gptq W4A4KV4 --calib-windows 0", "at least 1"),
        ("ostquant", "--row \"ostquant\""),
        ("ostquant W4A4KV4 --stepz 2", "--stepz"),
    ] {
        let err = fails(&[
            "results",
            "--model",
            s(&t.model),
            "--methods",
            "fp",
            "--row",
            spec,
            "--md",
            s(&t.md),
        ]);
        assert!(err.contains(why), "{spec}: {err}");
    }
}

#[test]
fn tasks_measured_side_by_side_score_as_one_at_a_time() {
    // On the CPU, eval runs one task per rayon thread at once; each cell (scores and every
    // item's pick) must be what the same task measured alone gives.
    let (dir, model, _) = model_and_text("unused.txt", b"x");
    let cells = |threads: &str| {
        let cache = dir.path().join(format!("cells-{threads}"));
        let out = Command::new(env!("CARGO_BIN_EXE_ostquant"))
            .env("RAYON_NUM_THREADS", threads)
            .args([
                "eval",
                "--model",
                s(&model),
                "--device",
                "cpu",
                "--method",
                "rtn",
                "--bits",
                "W4A4KV4",
                "--tasks",
                "piqa,arc_easy,boolq,winogrande",
                "--limit",
                "4",
                "--windows",
                "1",
                "--ctx",
                "64",
                "--cache",
                s(&cache),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The cells, and the journals of every item's log-likelihoods (one line per item).
        let mut found = std::collections::BTreeMap::new();
        for f in walk(&cache) {
            let text = std::fs::read_to_string(&f).unwrap();
            let value = if f.extension().is_some_and(|e| e == "jsonl") {
                let lines = text.lines().map(|l| serde_json::from_str(l).unwrap());
                serde_json::Value::Array(lines.collect())
            } else {
                let mut cell: serde_json::Value = serde_json::from_str(&text).unwrap();
                cell.as_object_mut().unwrap().remove("seconds");
                cell
            };
            found.insert(f.file_name().unwrap().to_owned(), value);
        }
        found
    };
    let (alone, together) = (cells("1"), cells("3"));
    assert_eq!(
        alone.len(),
        9,
        "four tasks, the perplexity and four journals: {alone:?}"
    );
    assert_eq!(alone, together);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

#[test]
fn eval_runs_gptq_and_zero_shot_tasks_on_a_tiny_model() {
    let (_dir, model, _) = model_and_text("unused.txt", b"x");
    let json = model.with_file_name("row.json");
    let cells = model.with_file_name("cells");
    let out = ostquant(&[
        "eval",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--method",
        "gptq",
        "--bits",
        "W4A4KV4",
        "--tasks",
        "piqa,lambada",
        "--limit",
        "3",
        "--windows",
        "1",
        "--ctx",
        "64",
        "--calib-windows",
        "2",
        "--calib-len",
        "32",
        "--fresh",
        "--cache",
        s(&cells),
        "--json",
        s(&json),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("gptq W4A4KV4"), "{stdout}");
    assert!(
        stdout.contains("piqa") && stdout.contains("lambada_openai"),
        "{stdout}"
    );
    let row: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(row["method"], "gptq");
    assert_eq!(row["bits"], "W4A4KV4");
    assert_eq!(row["limit"], 3);
    let piqa = row["zeroshot"]["piqa"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&piqa), "{row}");
    assert!(row["kl_to_fp"].as_f64().unwrap() > 0.0, "{row}");
}

#[test]
fn eval_names_an_unknown_task() {
    let (_dir, model, _) = model_and_text("unused.txt", b"x");
    let err = fails(&["eval", "--model", s(&model), "--tasks", "piqa,nope"]);
    assert!(err.contains("unknown task 'nope'"), "{err}");
}

#[test]
fn eval_rejects_a_weight_group_that_does_not_divide_the_layers() {
    let (_dir, model, _) = model_and_text("unused.txt", b"x");
    let err = fails(&[
        "eval",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--windows",
        "1",
        "--ctx",
        "64",
        "--w-group",
        "7",
        "--fresh",
    ]);
    assert!(err.contains("weight group 7 does not divide"), "{err}");
}

#[test]
fn quantize_calibrates_writes_an_int4_folder_that_runs() {
    let (_dir, model, _) = model_and_text("unused.txt", b"x");
    let out = model.with_file_name("q");
    // A 3-step OSTQuant calibration, GPTQ on two 32-token windows.
    let quantize = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "quantize",
            "--model",
            s(&model),
            "--device",
            "cpu",
            "--method",
            "ostquant",
            "--bits",
            "W4A4KV4",
            "--steps",
            "3",
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--calib-windows",
            "2",
            "--calib-len",
            "32",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        ostquant(&args)
    };
    let run = quantize(&out, &["--fresh"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stderr}");
    assert!(
        stdout.contains("wrote") && stderr.contains("calibration loss"),
        "{stdout}{stderr}"
    );
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(header["method"], "ostquant");
    assert_eq!(header["weight"]["bits"], 4);
    assert_eq!(header["forward"]["qk_hadamard"], true);
    assert_eq!(header["details"]["losses"].as_array().unwrap().len(), 3);
    // The folder runs through both int4 runtimes (`--device cpu`: the CPU runtime;
    // `software`: the WGSL kernels on lavapipe), each compared position by position with the
    // burn forward of the folder, whose perplexity the same line prints.
    let number_after = |text: &str, key: &str| -> f64 {
        let rest = &text[text.find(key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len()..];
        rest.trim_start()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    for device in ["cpu", "software"] {
        let rt = ostquant(&[
            "ppl",
            "--model",
            s(&out),
            "--device",
            device,
            "--windows",
            "1",
            "--ctx",
            "32",
        ]);
        let rt_out = String::from_utf8_lossy(&rt.stdout).into_owned();
        assert!(
            rt.status.success(),
            "{}",
            String::from_utf8_lossy(&rt.stderr)
        );
        let rt_ppl = number_after(&rt_out, "perplexity");
        let burn_ppl = number_after(&rt_out, "(prefill): perplexity");
        assert!(
            rt_out.contains("int4 runtime") && (rt_ppl - burn_ppl).abs() <= 1e-3 * burn_ppl,
            "{device}: runtime {rt_ppl} vs burn {burn_ppl}: {rt_out}"
        );
        assert!(number_after(&rt_out, "top-1 agreement") >= 95.0, "{rt_out}");
    }
    // --w-rtn: the same learned transforms (the checkpoint is reused, so the losses are the
    // same), weights rounded to nearest instead of GPTQ: other int4 codes.
    let rtn_out = model.with_file_name("q-rtn");
    let run = quantize(&rtn_out, &["--w-rtn"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rtn_header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rtn_out.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(header["details"]["rounding"], "gptq");
    assert_eq!(rtn_header["details"]["rounding"], "rtn");
    assert_eq!(rtn_header["details"]["losses"], header["details"]["losses"]);
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_ne!(weights(&out), weights(&rtn_out));
    for (method, why) in [
        ("gptq", "is the method rtn"),
        ("quarot-gptq", "is the method quarot"),
    ] {
        let err = fails(&[
            "quantize",
            "--model",
            s(&model),
            "--method",
            method,
            "--w-rtn",
            "--out",
            s(&rtn_out.with_file_name("never")),
        ]);
        assert!(err.contains(why), "{err}");
        let err = fails(&["eval", "--model", s(&model), "--method", method, "--w-rtn"]);
        assert!(err.contains(why), "{err}");
    }
    // --act-order: the same transforms, GPTQ's columns by decreasing Hessian diagonal.
    let ao_out = model.with_file_name("q-act-order");
    let run = quantize(&ao_out, &["--act-order"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ao_header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ao_out.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(ao_header["details"]["rounding"], "gptq-act-order");
    assert_eq!(ao_header["details"]["losses"], header["details"]["losses"]);
    assert_ne!(weights(&out), weights(&ao_out));
    // Act-order with groups: the groups keep their columns, so the format is the same.
    let aog_out = model.with_file_name("q-act-order-g16");
    let run = quantize(&aog_out, &["--act-order", "--w-group", "16"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let aog_header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(aog_out.join("quantization.json")).unwrap())
            .unwrap();
    assert_eq!(aog_header["details"]["rounding"], "gptq-act-order");
    assert_eq!(aog_header["weight"]["group"], 16);
    let never = ao_out.with_file_name("never");
    for (extra, why) in [
        (&["--method", "quarot"][..], "rounds its weights to nearest"),
        (&["--w-rtn"][..], "no meaning with RTN weights"),
    ] {
        let mut args = vec![
            "quantize",
            "--model",
            s(&model),
            "--act-order",
            "--out",
            s(&never),
        ];
        args.extend_from_slice(extra);
        let err = fails(&args);
        assert!(err.contains(why), "{extra:?}: {err}");
    }
    assert!(!never.exists());
    // Options that a method without calibration cannot use are refused.
    let err = fails(&[
        "quantize",
        "--model",
        s(&model),
        "--method",
        "rtn",
        "--steps",
        "3",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("learns nothing"), "{err}");
    let err = fails(&[
        "eval",
        "--model",
        s(&model),
        "--method",
        "gptq",
        "--lr-scale",
        "0.01",
    ]);
    assert!(err.contains("learns nothing"), "{err}");
    let err = fails(&[
        "quantize",
        "--model",
        s(&model),
        "--bits",
        "W8A8KV8",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("8-bit weights"), "{err}");
}

#[test]
fn bench_prints_gemv_bandwidth_and_decode_speed_on_the_software_device() {
    let out = ostquant(&[
        "bench",
        "--device",
        "software",
        "--iters",
        "1",
        "--synthetic",
        "smollm2-135m",
        "--tokens",
        "1",
        "--prefill",
        "20",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("GB/s") && stdout.contains("11008"),
        "{stdout}"
    );
    let floor = stdout
        .lines()
        .find_map(|l| l.strip_prefix("launch floor ("))
        .and_then(|l| l.rsplit(": ").next())
        .and_then(|us| us.trim_end_matches(" µs").parse::<f64>().ok());
    assert!(floor.is_some_and(|us| us > 0.0), "{stdout}");
    let rows = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(char::is_numeric))
        .count();
    // Seven shapes: int4 and W4A4 at three rows-per-team choices each (the column splits are
    // timed on GPUs only), and f16; where the device has subgroup operations also int4 and
    // W4A4 summed in shared memory only. Every figure is checked against the f64 reference.
    let smem = if stdout.contains("sums over subgroups") {
        2
    } else {
        0
    };
    assert_eq!(rows, 7 * (7 + smem), "{stdout}");
    let model_rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("smollm2-135m"))
        .collect();
    // Decode int4, w4a4 and f16; prefill of 20 tokens for each; the prefill ratio line.
    assert_eq!(model_rows.len(), 3 + 3 + 1, "{stdout}");
    assert!(stdout.contains("decode speed over f16"), "{stdout}");
    assert!(
        stdout.contains("prefill speed over f16 at 20 tokens"),
        "{stdout}"
    );
}
