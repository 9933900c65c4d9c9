//! A chat session over a decoder that keeps its cache between turns: a prompt that extends the
//! positions the cache holds runs only its new tokens, also after the session was handed back
//! and resumed (how the app keeps an int4 runtime between messages); any other prompt starts
//! over.

use ostquant_core::error::Result;
use ostquant_core::generate::{Decoder, SamplingParams, Session};
use ostquant_core::model::tokenizer::Tokenizer;

/// Feeds are recorded; the next token is always (last id + 1) mod vocab.
struct Counting {
    vocab: usize,
    feeds: Vec<Vec<u32>>,
    resets: usize,
    context: usize,
}

impl Decoder for Counting {
    fn reset(&mut self) {
        self.resets += 1;
    }
    fn last_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.feeds.push(ids.to_vec());
        let mut logits = vec![0f32; self.vocab];
        logits[(*ids.last().unwrap() as usize + 1) % self.vocab] = 1.0;
        Ok(logits)
    }
    fn max_context(&self) -> usize {
        self.context
    }
}

#[test]
fn a_resumed_session_runs_only_the_new_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let w = ostquant_tests::write_tiny_model(tmp.path(), 3);
    let tok = Tokenizer::load(tmp.path(), &w.config).unwrap();
    let mut dec = Counting {
        vocab: w.config.vocab_size,
        feeds: Vec::new(),
        resets: 0,
        context: 256,
    };
    let params = SamplingParams {
        max_new_tokens: 3,
        ..Default::default()
    };
    let mut first = Session::with_decoder(Box::new(&mut dec));
    let (out, _) = first
        .generate(&tok, &[10, 11, 12], params, &mut |_| true)
        .unwrap();
    assert_eq!(out, [13, 14, 15]);
    let held = first.into_tokens();
    // The last generated token is not fed until the next turn.
    assert_eq!(held, [10, 11, 12, 13, 14]);

    let mut second = Session::resume(Box::new(&mut dec), held);
    let (out, _) = second
        .generate(&tok, &[10, 11, 12, 13, 14, 15, 30], params, &mut |_| true)
        .unwrap();
    assert_eq!(out, [31, 32, 33]);
    let held = second.into_tokens();
    // A prompt that does not extend the held positions starts over.
    let mut third = Session::resume(Box::new(&mut dec), held);
    third
        .generate(&tok, &[40, 41], params, &mut |_| true)
        .unwrap();
    drop(third);
    assert_eq!(
        dec.feeds,
        [
            vec![10, 11, 12],
            vec![13],
            vec![14],
            vec![15, 30],
            vec![31],
            vec![32],
            vec![40, 41],
            vec![42],
            vec![43],
        ]
    );
    assert_eq!(
        dec.resets, 2,
        "the first turn and the unrelated prompt reset the cache"
    );
}

/// A reply ends where the caller stops it, at the end of the context, or at max_new_tokens (0:
/// no reply); the positions held are the prompt and every reply token but the last.
#[test]
fn a_reply_stops_at_the_caller_the_context_or_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let w = ostquant_tests::write_tiny_model(tmp.path(), 3);
    let tok = Tokenizer::load(tmp.path(), &w.config).unwrap();
    let run = |context: usize, max_new_tokens: usize, stop_after: usize| {
        let mut dec = Counting {
            vocab: w.config.vocab_size,
            feeds: Vec::new(),
            resets: 0,
            context,
        };
        let params = SamplingParams {
            max_new_tokens,
            ..Default::default()
        };
        let mut session = Session::with_decoder(Box::new(&mut dec));
        let mut pieces = 0;
        let (out, stats) = session
            .generate(&tok, &[10, 11, 12], params, &mut |_| {
                pieces += 1;
                pieces < stop_after
            })
            .unwrap();
        assert_eq!(stats.new_tokens, out.len());
        (out, session.into_tokens())
    };
    // The caller stops after the second piece of text.
    let (out, held) = run(256, 10, 2);
    assert_eq!((out, held), (vec![13, 14], vec![10, 11, 12, 13]));
    // A context of 6 positions: three reply tokens fill it; a fourth is picked, not run.
    let (out, held) = run(6, 10, usize::MAX);
    assert_eq!(
        (out, held),
        (vec![13, 14, 15, 16], vec![10, 11, 12, 13, 14, 15])
    );
    let (out, held) = run(256, 0, usize::MAX);
    assert_eq!((out, held), (vec![], vec![10, 11, 12]));
}
