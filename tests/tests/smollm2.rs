//! The real default model, SmolLM2-135M-Instruct (fetched and imported on first use): tokenizer
//! round trips, the ChatML template, a greedy answer, and perplexity on the Wikipedia
//! evaluation half. Runs on the CPU backend.

use std::sync::OnceLock;

use burn::tensor::Device;
use ostquant_core::assets;
use ostquant_core::data::wiki;
use ostquant_core::eval::perplexity::perplexity;
use ostquant_core::generate::{SamplingParams, Session};
use ostquant_core::model::LoadedModel;
use ostquant_core::model::tokenizer::ChatMessage;

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = assets::ensure_default_model(&mut |_, _| {}).expect("fetch and import SmolLM2");
        LoadedModel::load(&dir, &Device::flex()).expect("load SmolLM2")
    })
}

#[test]
fn tokenizer_round_trips() {
    let tok = &model().tokenizer;
    let texts = [
        "Hello, world!",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\n\n",
        "digits 1234567890 and 3.14159",
        "unicode: naïve café, Ελληνικά, 日本語, emoji 🦀🚀",
        "mixed CASE and punctuation?!... (brackets) [x] {y}",
    ];
    for t in texts {
        let ids = tok.encode(t).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids, false).unwrap(), t, "round trip of {t:?}");
    }
    // SmolLM splits digits one by one.
    let ids = tok.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.add_bos, "SmolLM2 adds no BOS");
    // Special tokens in text are matched whole.
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
}

#[test]
fn chat_template_renders_chatml() {
    let tok = &model().tokenizer;
    let got = tok
        .render_chat(&[ChatMessage::new("user", "Hi there")], true)
        .unwrap();
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(got, want);
    let got = tok
        .render_chat(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        got,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn greedy_answer_is_english() {
    let m = model();
    let tok = &m.tokenizer;
    let prompt = tok
        .render_chat(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = tok.encode_with_bos(&prompt).unwrap();
    let mut text = String::new();
    let params = SamplingParams {
        max_new_tokens: 24,
        ..Default::default()
    };
    Session::new(&m.model)
        .generate(tok, &ids, params, &mut |p| {
            text.push_str(p);
            true
        })
        .unwrap();
    println!("answer: {text}");
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    assert!(
        letters as f64 >= 0.8 * text.chars().count() as f64,
        "not English-looking: {text:?}"
    );
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    let common = ["the", "is", "of", "capital", "france", "paris", "a", "city"];
    assert!(
        words
            .iter()
            .filter(|w| common
                .iter()
                .any(|c| w.trim_matches(|ch: char| !ch.is_alphabetic()) == *c))
            .count()
            >= 3,
        "too few common English words: {text:?}"
    );
    assert!(
        text.contains("Paris"),
        "the capital of France is Paris: {text:?}"
    );
}

#[test]
fn wiki_perplexity_is_plausible() {
    let m = model();
    let articles = wiki::read_articles(&assets::wiki_dump()).unwrap();
    assert!(articles.len() >= 100, "{} articles", articles.len());
    let split = wiki::split(&articles);
    assert!(
        split.evaluation.len() > 1_000_000,
        "evaluation half has {} bytes",
        split.evaluation.len()
    );
    // Four windows of 512 keep the test short; `ostquant ppl` scores the whole half.
    let r = perplexity(
        &m.model,
        &m.tokenizer,
        &split.evaluation,
        512,
        Some(4),
        &mut |_, _| {},
    )
    .unwrap();
    println!("wiki ppl over {} tokens: {:.3}", r.tokens_scored, r.ppl);
    assert_eq!(r.tokens_scored, 4 * 511);
    assert!(
        r.ppl.is_finite() && r.ppl > 2.0 && r.ppl < 40.0,
        "perplexity {}",
        r.ppl
    );
}
