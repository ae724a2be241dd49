//! Window-by-window evaluation on a tiny random model: the windows' scores add up to the whole,
//! come back in text order whatever the batching, and a prepared folder's answers (completions,
//! without the end-of-document token) are scored alone.

use candle_core::{DType, Device};
use mode_data::{prepare, Format, PrepareOptions, Split};
use mode_eval::{eval_set, evaluate_ids, evaluate_path, EvalSet, Totals};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};

fn model() -> Backbone {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    Backbone::random(config, 11, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn window_scores_add_up_and_keep_text_order_whatever_the_batch() {
    let model = model();
    let tok = Tokenizer::byte_level();
    let ids = tok
        .encode(&"the cat sat on the mat; 12 + 30 = 42.\n".repeat(6))
        .unwrap();
    let set = EvalSet::plain(ids.clone());
    let one = evaluate_ids(&model, &set, 16, 1, None, |_| {}).unwrap();
    let batched = evaluate_ids(&model, &set, 16, 3, None, |_| {}).unwrap();
    assert_eq!(one.len(), ids.len().div_ceil(16));
    for (a, b) in one.iter().zip(&batched) {
        assert_eq!(a.all.correct, b.all.correct);
        assert_eq!(a.all.predictions, b.all.predictions);
        assert!((a.all.loss_sum - b.all.loss_sum).abs() < 1e-3);
    }
    let whole = Totals::sum(one.iter().map(|w| &w.all));
    assert_eq!(whole.predictions, ids.len() - one.len());
    // A window scored alone gives the score it has in the list.
    let third = EvalSet::plain(ids[32..48].to_vec());
    let alone = evaluate_ids(&model, &third, 16, 1, None, |_| {}).unwrap();
    assert_eq!(alone[0].all.correct, one[2].all.correct);
    assert!((alone[0].all.loss_sum - one[2].all.loss_sum).abs() < 1e-3);
    // Spread windows are a subset of the same scores.
    let spread = evaluate_ids(&model, &set, 16, 2, Some(3), |_| {}).unwrap();
    let picked = mode_eval::spread((0..one.len()).collect(), Some(3));
    for (s, &i) in spread.iter().zip(&picked) {
        assert_eq!(s.all.correct, one[i].all.correct);
    }
    assert!(one.iter().all(|w| w.answer.predictions == 0));
}

#[test]
fn answers_of_prepared_prompts_are_scored_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("qa.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"prompt": "Question: what is {i} + {i}?\nAnswer:", "completion": " {}"}}"#,
                2 * i
            )
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = tmp.path().join("prepared");
    let tok = Tokenizer::byte_level();
    prepare(
        &PrepareOptions {
            inputs: vec![input],
            out: out.clone(),
            glob: None,
            format: Format::Auto,
            column: None,
            val_fraction: 0.0,
            test_fraction: 1.0,
            seed: 0,
            force: false,
        },
        &tok,
        None,
        |_, _| {},
    )
    .unwrap();
    let set = eval_set(&out, &tok, Split::Test).unwrap();
    let answer = set.answer.as_ref().expect("prompts mark answers");
    // Byte-level: " 2i" is its bytes; the EOS after each item is not an answer token.
    let expected: usize = (0..20).map(|i| format!(" {}", 2 * i).len()).sum();
    assert_eq!(answer.iter().filter(|&&a| a).count(), expected);
    // Windows of 32: every answer token but those opening a window is a prediction.
    let model = model();
    let (report, windows) =
        evaluate_path(&model, &tok, &out, Split::Test, 32, 4, None, |_, _| {}).unwrap();
    let starts = (0..set.ids.len())
        .step_by(32)
        .filter(|&i| answer[i])
        .count();
    let scored: usize = windows.iter().map(|w| w.answer.predictions).sum();
    assert_eq!(scored, expected - starts);
    assert_eq!(report.answer_predictions, Some(scored));
    let acc = report.answer_accuracy.unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let i = report.accuracy_interval;
    assert!(
        i.lo <= 100.0 * report.next_token_accuracy && 100.0 * report.next_token_accuracy <= i.hi
    );
    // The validation split of this folder is empty: a clear error names it.
    let e = evaluate_path(&model, &tok, &out, Split::Val, 32, 4, None, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("val split has 0 tokens"), "{e}");
}
