//! `ostquant results`: the lab's table, every method at every bit setting, as Markdown for
//! people and JSON for plots and the GUI. Each cell comes from the evaluation cache, so an
//! interrupted run picks up where it stopped.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};

use ostquant_core::calib::{Overrides, Settings as CalibSettings};
use ostquant_core::data::tasks::TaskName;
use ostquant_core::device::DeviceChoice;
use ostquant_core::eval::suite::{RowResult, Settings};
use ostquant_core::quant::method::{Bits, Method};

use crate::cli::{open_lab, stage_bar};

/// What to tabulate and where to write it.
pub struct Table<'a> {
    /// Comma-separated methods and bit settings, in table order.
    pub methods: &'a str,
    pub bits: &'a str,
    /// Rows after those, each with its own calibration (`--row`).
    pub rows: &'a [Row],
    pub md: &'a Path,
    pub json: Option<&'a Path>,
    /// Skip rows that are not fully cached instead of measuring them.
    pub cached_only: bool,
    /// Compare every row's zero-shot average item by item with this method's row at the same
    /// bits (FP's row when it is `fp`).
    pub versus: Option<Method>,
}

/// A method at one bit setting, outside the methods × bits grid, whose calibration may differ
/// from the table's (say, a longer one): its overrides apply on top of the table's.
#[derive(Debug, Clone)]
pub struct Row {
    pub method: Method,
    pub bits: Bits,
    /// The learned transforms' calibration.
    pub calib: Overrides,
    /// Round the weights to nearest instead of GPTQ.
    pub w_rtn: bool,
    /// GPTQ in act-order.
    pub act_order: bool,
    /// Weights in groups of this many input columns (None: the table's grid).
    pub w_group: Option<usize>,
    /// Asymmetric weights.
    pub w_asym: bool,
    /// GPTQ's (and SmoothQuant's) calibration windows and their length.
    pub calib_windows: Option<usize>,
    pub calib_len: Option<usize>,
}

/// A row to measure: the table's settings, or a [`Row`]'s, with the footnote that says how.
struct Planned {
    method: Method,
    bits: Bits,
    settings: Settings,
    note: Option<usize>,
}

/// The table so far: measured rows with their footnote numbers, the footnotes, and the rows
/// skipped because they are not cached.
#[derive(Default)]
struct Tabled {
    rows: Vec<Measured>,
    notes: Vec<String>,
    skipped: Vec<String>,
}

/// A row of the table: its results, its footnote, and the builds that measured its cells.
struct Measured {
    result: RowResult,
    note: Option<usize>,
    builds: Vec<String>,
}

pub fn results(
    model: Option<&Path>,
    device: DeviceChoice,
    settings: &Settings,
    table: &Table,
) -> Result<()> {
    let (md, cached_only, versus) = (table.md, table.cached_only, table.versus);
    let methods: Vec<Method> = split_list(table.methods)?;
    let bits: Vec<Bits> = split_list(table.bits)?;
    let mut lab = open_lab(model, device)?;
    let name = lab.model_name();
    let json = table
        .json
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new("results").join(format!("{}.json", name.to_lowercase())));

    let mut tabled = Tabled::default();
    let mut plan: Vec<Planned> = Vec::new();
    for &method in &methods {
        let row_bits: &[Bits] = if method == Method::Fp {
            &[Bits::FP]
        } else {
            &bits
        };
        for &bits in row_bits {
            let settings = settings.clone();
            plan.push(Planned {
                method,
                bits,
                settings,
                note: None,
            });
        }
    }
    for row in table.rows {
        let row_settings = Settings {
            calib: row.calib.over(&settings.calib),
            w_rtn: row.w_rtn || settings.w_rtn,
            act_order: row.act_order || settings.act_order,
            w_group: row.w_group.or(settings.w_group),
            w_asym: row.w_asym || settings.w_asym,
            calib_windows: row.calib_windows.unwrap_or(settings.calib_windows),
            calib_len: row.calib_len.unwrap_or(settings.calib_len),
            ..settings.clone()
        };
        // A row measured as the table says needs no note.
        let mut how = Vec::new();
        if !row.calib.is_empty() {
            how.push(format!("calibrated with `{}`", row_settings.calib.flags()));
        }
        if row.w_rtn && !settings.w_rtn {
            how.push("weights rounded to nearest (no GPTQ)".to_string());
        }
        if row.act_order && !settings.act_order {
            how.push("GPTQ in act-order".to_string());
        }
        if let Some(g) = row.w_group.filter(|&g| settings.w_group != Some(g)) {
            how.push(format!("weights in groups of {g} input columns"));
        }
        if row.w_asym && !settings.w_asym {
            how.push("asymmetric weights".to_string());
        }
        let windows = (row_settings.calib_windows, row_settings.calib_len);
        if windows != (settings.calib_windows, settings.calib_len) {
            let what = if row.method == Method::SmoothQuant {
                "SmoothQuant"
            } else {
                "GPTQ"
            };
            how.push(format!(
                "{what} on {} windows of {} tokens",
                windows.0, windows.1
            ));
        }
        let note = (!how.is_empty()).then(|| {
            tabled
                .notes
                .push(format!("{} {} {}", row.method, row.bits, how.join(", ")));
            tabled.notes.len()
        });
        plan.push(Planned {
            method: row.method,
            bits: row.bits,
            settings: row_settings,
            note,
        });
    }

    let mut json_rows = Vec::new();
    for p in &plan {
        let label = label(p.method, p.bits, p.note);
        if cached_only && !lab.is_cached(p.method, p.bits, &p.settings) {
            eprintln!("ostquant: {label}: not measured yet, skipped (--cached-only)");
            tabled.skipped.push(label);
            continue;
        }
        eprintln!("ostquant: {label}");
        let (bar, mut prog) = stage_bar();
        let row = lab.evaluate(
            p.method,
            p.bits,
            &p.settings,
            &mut prog,
            &AtomicBool::new(false),
        )?;
        bar.finish_and_clear();
        let mut obj = row.to_json(p.settings.limit);
        // Learned rows say how they were calibrated (preset and overrides resolved).
        obj["calibration"] = serde_json::to_value(p.settings.learned_settings(p.method, p.bits))?;
        if p.method != Method::Fp {
            obj["rounding"] = p.settings.rounding(p.method)?.to_string().into();
            obj["w_group"] = p.settings.w_group.into();
            obj["w_asym"] = p.settings.w_asym.into();
        }
        if p.method.needs_calibration() {
            obj["calib_windows"] = [p.settings.calib_windows, p.settings.calib_len].into();
        }
        let builds = lab.measured_by(p.method, p.bits, &p.settings);
        obj["measured_by"] = builds.clone().into();
        json_rows.push(obj);
        tabled.rows.push(Measured {
            result: row,
            note: p.note,
            builds,
        });
        // Written after every row, so the files show the table as far as it got.
        write_atomic(md, &markdown(&name, &tabled, settings, versus))?;
        write_atomic(&json, &serde_json::to_string_pretty(&json_rows)?)?;
    }
    if tabled.rows.is_empty() {
        // An empty table would replace a good one (say, after the cache was cleared).
        anyhow::bail!(
            "no row of this table is cached yet (--cached-only), so {} and {} were left as they were",
            md.display(),
            json.display()
        );
    }
    let text = markdown(&name, &tabled, settings, versus);
    write_atomic(md, &text)?;
    print!("{text}");
    eprintln!("ostquant: wrote {} and {}", md.display(), json.display());
    Ok(())
}

/// "ostquant-nowomi W4A4KV4 [1]": a row as progress lines and the skipped list name it.
fn label(method: Method, bits: Bits, note: Option<usize>) -> String {
    format!("{method} {bits}{}", note_mark(note))
}

/// " [1]" after a row's name where a note under the table says how it was measured.
fn note_mark(note: Option<usize>) -> String {
    note.map_or(String::new(), |n| format!(" [{n}]"))
}

fn split_list<T: std::str::FromStr<Err = String>>(s: &str) -> Result<Vec<T>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse().map_err(anyhow::Error::msg))
        .collect()
}

/// Write `text` to `path` through a temporary file, so a failed run leaves no half-written file.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// `arg` as a shell reads it back: quoted when it holds spaces or other special characters,
/// so the table's command can be pasted as it is.
fn shell_word(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.,/:=@+%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The cache folder as the table names it: `~/…` for the home folder, relative paths as given.
fn cache_dir_shown(dir: &Path) -> String {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    match home.as_deref().and_then(|h| dir.strip_prefix(h).ok()) {
        Some(rest) => format!("~/{}", rest.display()),
        None => dir.display().to_string(),
    }
}

fn short(t: TaskName) -> &'static str {
    match t {
        TaskName::ArcChallenge => "ARC-c",
        TaskName::ArcEasy => "ARC-e",
        TaskName::Boolq => "BoolQ",
        TaskName::Hellaswag => "HellaS",
        TaskName::Lambada => "LAMB",
        TaskName::Openbookqa => "OBQA",
        TaskName::Piqa => "PIQA",
        TaskName::SocialIqa => "SIQA",
        TaskName::Winogrande => "Wino",
    }
}

/// The table with a header that says exactly how it was measured.
fn markdown(model: &str, table: &Tabled, s: &Settings, versus: Option<Method>) -> String {
    let (rows, skipped) = (&table.rows, &table.skipped);
    let mut out = String::new();
    let command: Vec<String> = std::env::args().skip(1).map(|a| shell_word(&a)).collect();
    let device = rows.first().map_or("", |r| r.result.device.as_str());
    let _ = writeln!(out, "# Results: {model}\n");
    let _ = writeln!(
        out,
        "Written by `ostquant {}` on {device}. Rerun the same command to reproduce or extend it: \
         every cell is cached under `{}`, so only missing cells are measured{}.\n",
        command.join(" "),
        cache_dir_shown(&s.cache_dir),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(
                " (without `--cached-only`; not measured yet: {})",
                skipped.join(", ")
            )
        }
    );
    let wiki = rows.first().map(|r| &r.result.wiki);
    let preset = s.calib.apply(CalibSettings::ostquant(Bits::FP, s.preset));
    let overrides = if s.calib.is_empty() {
        String::new()
    } else {
        format!(" changed by `{}`", s.calib.flags())
    };
    let _ = writeln!(
        out,
        "- Perplexity: Wikipedia (wiki-2016) evaluation half, context {}, {}{} tokens scored. \
         KL(FP ‖ quantized) in nats per token and top-1 agreement with the FP model on the same tokens.",
        s.ctx,
        s.windows.map_or("all windows, ".to_string(), |w| format!(
            "first {w} windows, "
        )),
        wiki.map_or(0, |w| w.tokens_scored)
    );
    let _ = writeln!(
        out,
        "- Zero-shot: {}, lm-eval-harness scoring; acc_norm for ARC-c, ARC-e, HellaSwag, OBQA and PIQA, \
         acc for BoolQ, SIQA, WinoGrande, LAMBADA (greedy last word). Average: the mean of the columns, \
         ± its standard error as an estimate of the whole tasks' average (binomial per task).{}",
        match s.limit {
            Some(l) => format!(
                "{l} items per task spread evenly over each task (the same items in every row)"
            ),
            None => "every item of every task".to_string(),
        },
        versus.map_or(String::new(), |m| format!(
            " Δ vs {m}: the row's average minus {m}'s at the same bits, ± the standard error of \
             that difference from the item-by-item differences (both rows score the same items, \
             so what the items share cancels); `-` where a row's cells predate per-item outcomes \
             (rerun them with `--fresh`)."
        ))
    );
    let _ = writeln!(
        out,
        "- Weights {}, {}, MSE-searched clipping; activations per token, asymmetric \
         (o_proj input per head); K/V per token per head, asymmetric. GPTQ and SmoothQuant calibrate on {} \
         random windows of {} tokens of the Wikipedia calibration half (seed 42). OSTQuant and SpinQuant-style \
         rows learn their transforms with the `{}` preset{} ({} steps × {} window(s) × {} tokens of the calibration half{}), \
         then {} weights. Time: seconds to measure the row, summed over its cells (calibration not included; \
         on the CPU tasks run side by side, so the wall time is shorter).\n",
        s.w_group
            .map_or("per output channel".to_string(), |g| format!(
                "in groups of {g} input columns"
            )),
        if s.w_asym { "asymmetric" } else { "symmetric" },
        s.calib_windows,
        s.calib_len,
        format!("{:?}", s.preset).to_lowercase(),
        overrides,
        preset.steps,
        preset.batch,
        preset.seq_len,
        if table.notes.is_empty() {
            ""
        } else {
            "; rows marked [n] as their note under the table says"
        },
        if s.w_rtn {
            "RTN"
        } else if s.act_order {
            "GPTQ (act-order)"
        } else {
            "GPTQ"
        },
    );
    let _ = write!(out, "| method | bits | wiki ppl | KL to FP | top-1 |");
    for t in &s.tasks {
        let _ = write!(out, " {} |", short(*t));
    }
    let _ = write!(out, " avg |");
    if let Some(m) = versus {
        let _ = write!(out, " Δ vs {m} |");
    }
    let _ = writeln!(out, " time (s) |");
    let _ = write!(out, "|---|---|---:|---:|---:|");
    for _ in &s.tasks {
        let _ = write!(out, "---:|");
    }
    if versus.is_some() {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out, "---:|---:|");
    for Measured {
        result: r, note, ..
    } in rows
    {
        let _ = write!(
            out,
            "| {}{} | {} | {:.3} | {:.4} | {:.1}% |",
            r.method,
            note_mark(*note),
            r.bits,
            r.wiki.ppl,
            r.wiki.kl.unwrap_or(0.0),
            100.0 * r.wiki.top1.unwrap_or(1.0)
        );
        for t in &r.zeroshot {
            let _ = write!(out, " {:.1} |", t.percent());
        }
        let secs = r.wiki.seconds + r.zeroshot.iter().map(|t| t.seconds).sum::<f64>();
        let avg = match (r.zeroshot_avg(), r.zeroshot_se()) {
            (Some(a), Some(se)) => format!("{a:.2} ± {se:.2}"),
            _ => "-".to_string(),
        };
        let _ = write!(out, " {avg} |");
        if let Some(m) = versus {
            let base = rows
                .iter()
                .map(|o| &o.result)
                .find(|o| o.method == m && (m == Method::Fp || o.bits == r.bits));
            let cell = match base.and_then(|o| r.paired_difference(o)) {
                Some(_) if base.is_some_and(|o| std::ptr::eq(o, r)) => "·".to_string(),
                Some((d, se)) => format!("{d:+.2} ± {se:.2}"),
                None => "-".to_string(),
            };
            let _ = write!(out, " {cell} |");
        }
        let _ = writeln!(out, " {secs:.0} |");
    }
    if !table.notes.is_empty() {
        let _ = writeln!(out);
    }
    for (i, n) in table.notes.iter().enumerate() {
        let _ = writeln!(out, "[{}] {n}.  ", i + 1);
    }
    let _ = writeln!(out, "\n{}", builds_line(rows));
    out
}

/// "Measured by: `abc1234`: rtn W4A16KV16, …; unrecorded (…): …": which build measured which
/// rows' cells (a row whose cells come from several builds is under each).
fn builds_line(rows: &[Measured]) -> String {
    let mut builds: Vec<(&str, Vec<String>)> = Vec::new();
    for r in rows {
        for b in &r.builds {
            let label = label(r.result.method, r.result.bits, r.note);
            match builds.iter_mut().find(|(name, _)| name == b) {
                Some((_, labels)) => labels.push(label),
                None => builds.push((b, vec![label])),
            }
        }
    }
    let groups: Vec<String> = builds
        .iter()
        .map(|(b, labels)| {
            let name = match *b {
                "unrecorded" => "unrecorded (cells written before they named their build)".into(),
                b => format!("`{b}`"),
            };
            format!("{name}: {}", labels.join(", "))
        })
        .collect();
    format!("Measured by: {}.", groups.join("; "))
}

#[cfg(all(test, unix))]
mod tests {
    use super::shell_word;

    #[test]
    fn shell_words_read_back_as_the_argument() {
        for arg in [
            "plain-1.5,x",
            "two words",
            "it's",
            "",
            "$HOME",
            "~/x",
            "a\"b",
        ] {
            let word = shell_word(arg);
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {word}")])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), arg, "{word}");
        }
    }
}
