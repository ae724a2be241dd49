//! Continuous batching: requests that run together, each with its own experts, get exactly the
//! answers they get alone (and again when their prompts' starts come from the prompt cache).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};

use common::{backbone, expert_file, json, request, serve_with, with_experts};
use mode_serve::Batching;

/// A request: expert set, prompt and sampling, as JSON fields.
fn requests() -> Vec<String> {
    let sets = [r#"[]"#, r#"["code"]"#, r#"["math"]"#, r#"["code", "math"]"#];
    let prompts = ["def f(x):", "Once upon a time, in a land far", "1 + 2 ="];
    let mut out = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        for (k, prompt) in prompts.iter().enumerate() {
            let sampling = if (i + k) % 2 == 0 {
                r#""temperature": 0"#.to_string()
            } else {
                format!(r#""temperature": 1, "seed": {}"#, i * 10 + k)
            };
            out.push(format!(
                r#"{{"prompt": "{prompt}", "max_tokens": 16, "experts": {set}, {sampling}}}"#
            ));
        }
    }
    // Two answers of one request run side by side too.
    out.push(r#"{"prompt": "x", "max_tokens": 16, "n": 2, "temperature": 1, "seed": 3}"#.into());
    out
}

fn answer(addr: SocketAddr, body: &str) -> Vec<String> {
    let (status, _, text) = request(addr, "POST", "/v1/completions", body);
    assert_eq!(status, 200, "{body}: {text}");
    json(&text)["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (status, kind, text) = request(addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/plain"), "{kind}");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

#[test]
fn requests_batched_together_answer_as_they_do_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bb = backbone(3);
    let code = expert_file(&bb, "code", 1, 2, dir.path());
    let math = expert_file(&bb, "math", 2, 2, dir.path());
    let addr = serve_with(with_experts(&[&code, &math]), &[], |s| {
        s.batching = Batching {
            parallel: 8,
            prefill_chunk: 4,
            ..Batching::default()
        };
    });
    let requests = requests();
    let alone: Vec<Vec<String>> = requests.iter().map(|r| answer(addr, r)).collect();
    assert_eq!(
        metric(addr, "mode_decode_rows_max"),
        2,
        "only `n` ran side by side"
    );
    // The expert sets matter: the same prompt answers differently under each.
    assert_ne!(alone[1], alone[4]);

    // All at once (several rounds: a round whose requests happen not to overlap proves less).
    for round in 0..3 {
        let start = Arc::new(Barrier::new(requests.len()));
        let together: Vec<Vec<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = requests
                .iter()
                .map(|r| {
                    let start = start.clone();
                    scope.spawn(move || {
                        start.wait();
                        answer(addr, r)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(got, want, "round {round}, request {k}: {}", requests[k]);
        }
    }
    assert!(
        metric(addr, "mode_decode_rows_max") > 2,
        "the requests never ran in one batch"
    );
    assert_eq!(metric(addr, "mode_sequences_running"), 0);
    // The rounds asked the alone phase's prompts again: their starts came from the prompt
    // cache, and the answers above are the same.
    assert!(metric(addr, "mode_prompt_tokens_cached_total") > 0);
    let steps = metric(addr, "mode_decode_steps_total");
    let rows = metric(addr, "mode_decode_rows_total");
    assert!(rows > steps, "{rows} rows in {steps} steps");
}
