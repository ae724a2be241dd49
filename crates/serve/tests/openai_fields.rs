//! The request fields beyond the basics: `stop` and `n` are done, fields the server does not
//! act on are refused naming the field unless they ask for nothing, `stream_options` gives
//! usage, and `--api-key` guards every endpoint but `/health`.

mod common;

use common::*;
use mode_core::ModeModel;
use serde_json::Value;

fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let (status, _, text) = request(addr, "POST", path, body);
    (status, json(&text))
}

/// The text of each choice of a whole completion of `body`.
fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

/// Stream events' JSON (without the final `[DONE]`).
fn events(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data[..data.len() - 1].iter().map(|d| json(d)).collect()
}

#[test]
fn stop_cuts_the_answer_whole_and_streamed() {
    let addr = start();
    // A sampled answer long enough to hold several distinct characters.
    let base = r#""prompt": "def f(x):", "max_tokens": 16, "temperature": 1, "seed": 11"#;
    let (status, v) = post(addr, "/v1/completions", &format!("{{{base}}}"));
    assert_eq!(status, 200, "{v}");
    let full = texts(&v)[0].clone();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 4, "too short to test stop: {full:?}");
    // A stop made of two characters from the middle of the answer: the answer ends before
    // their first occurrence.
    let stop: String = chars[2..4].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    for stops in [
        serde_json::to_string(&stop).unwrap(),
        serde_json::to_string(&vec![stop.clone(), "\u{1}never".into()]).unwrap(),
    ] {
        let body = format!(r#"{{{base}, "stop": {stops}}}"#);
        let (status, v) = post(addr, "/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(texts(&v)[0], want, "stop {stops}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        let streamed = body.replace("\"seed\"", "\"stream\": true, \"seed\"");
        let (status, _, text) = request(addr, "POST", "/v1/completions", &streamed);
        assert_eq!(status, 200, "{text}");
        let evs = events(&text);
        let joined: String = evs
            .iter()
            .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(joined, want, "streamed, stop {stops}");
        assert_eq!(evs.last().unwrap()["choices"][0]["finish_reason"], "stop");
    }
    // A stop that never occurs changes nothing.
    let (_, v) = post(
        addr,
        "/v1/completions",
        &format!(r#"{{{base}, "stop": ["\u0001never"]}}"#),
    );
    assert_eq!(texts(&v)[0], full);
}

#[test]
fn n_gives_that_many_answers_each_its_own_seed() {
    let addr = start();
    let body = r#"{"prompt": "def f(x):", "max_tokens": 8, "temperature": 1, "seed": 5, "n": 3}"#;
    let (status, v) = post(addr, "/v1/completions", body);
    assert_eq!(status, 200, "{v}");
    let answers = texts(&v);
    assert_eq!(answers.len(), 3);
    for (i, c) in v["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    // Choice i is the single answer with seed 5 + i.
    for (i, answer) in answers.iter().enumerate() {
        let one = format!(
            r#"{{"prompt": "def f(x):", "max_tokens": 8, "temperature": 1, "seed": {}}}"#,
            5 + i
        );
        assert_eq!(&texts(&post(addr, "/v1/completions", &one).1)[0], answer);
    }
    let one_tokens = |i: usize| {
        let one = format!(
            r#"{{"prompt": "def f(x):", "max_tokens": 8, "temperature": 1, "seed": {}}}"#,
            5 + i
        );
        post(addr, "/v1/completions", &one).1["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
    };
    let total: u64 = (0..3).map(one_tokens).sum();
    assert_eq!(v["usage"]["completion_tokens"], total);
    assert_eq!(v["usage"]["prompt_tokens"], 9);

    // Streamed chat: every chunk names its choice, each choice opens with the role and ends
    // with a finish reason, and the usage chunk comes last when asked for.
    let chat = r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1, "seed": 5, "n": 2, "stream": true, "stream_options": {"include_usage": true}}"#;
    let (status, _, text) = request(addr, "POST", "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{text}");
    let evs = events(&text);
    let usage = evs.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() >= 2);
    for choice in 0..2 {
        let mine: Vec<&Value> = evs[..evs.len() - 1]
            .iter()
            .filter(|e| e["choices"][0]["index"] == choice)
            .collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(mine.last().unwrap()["choices"][0]["finish_reason"].is_string());
    }

    for n in ["0", "4", "-1", "\"2\""] {
        let (status, v) = post(
            addr,
            "/v1/completions",
            &format!(r#"{{"prompt": "x", "n": {n}}}"#),
        );
        assert_eq!(status, 400, "n {n}: {v}");
        assert_eq!(v["error"]["param"], "n", "{v}");
    }
    // The limits are stated where clients look for models.
    let (_, _, models) = request(addr, "GET", "/v1/models", "");
    assert_eq!(json(&models)["data"][0]["limits"]["max_n"], 3);
}

#[test]
fn fields_the_server_does_not_act_on_are_refused_unless_they_ask_for_nothing() {
    let addr = start();
    let chat = |extra: &str| {
        format!(r#"{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 2{extra}}}"#)
    };
    for extra in [
        r#", "logit_bias": {"65": 100}"#,
        r#", "logprobs": true"#,
        r#", "top_logprobs": 2"#,
        r#", "presence_penalty": 0.5"#,
        r#", "frequency_penalty": -1"#,
        r#", "tools": [{"type": "function", "function": {"name": "f"}}]"#,
        r#", "tool_choice": "required""#,
        r#", "response_format": {"type": "json_object"}"#,
        r#", "stop": ["a", "b", "c", "d", "e"]"#,
        r#", "stop": [""]"#,
        r#", "stop": 5"#,
        r#", "stream_options": {"include_usage": true, "other": 1}"#,
        r#", "no_such_field": 1"#,
        r#", "max_tokens": "2""#,
    ] {
        let (status, v) = post(addr, "/v1/chat/completions", &chat(extra));
        assert_eq!(status, 400, "{extra}: {v}");
        let field = extra.split('"').nth(1).unwrap();
        assert_eq!(v["error"]["param"], field, "{extra}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    for extra in [
        r#", "best_of": 3"#,
        r#", "echo": true"#,
        r#", "suffix": "end""#,
        r#", "logprobs": 1"#,
    ] {
        let body = format!(r#"{{"prompt": "x", "max_tokens": 2{extra}}}"#);
        let (status, v) = post(addr, "/v1/completions", &body);
        assert_eq!(status, 400, "{extra}: {v}");
    }
    // Defaults that ask for nothing, and labels, are accepted, as clients send them.
    let (status, v) = post(
        addr,
        "/v1/chat/completions",
        &chat(
            r#", "logit_bias": {}, "logprobs": false, "presence_penalty": 0, "frequency_penalty": 0.0, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "u1", "metadata": {"a": "b"}, "n": 1, "stop": null"#,
        ),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn an_api_key_guards_every_endpoint_but_health() {
    let addr = serve_with(ModeModel::bare(backbone(3)).unwrap(), &[], |s| {
        s.api_key = Some("s3cret-key".into())
    });
    let body = r#"{"prompt": "x", "max_tokens": 2}"#;
    for (method, path, body) in [
        ("GET", "/v1/models", ""),
        ("POST", "/v1/completions", body),
        ("GET", "/v1/experts", ""),
        ("DELETE", "/v1/experts/x", ""),
    ] {
        for headers in [
            "",
            "Authorization: Bearer wrong\r\n",
            "Authorization: s3cret-key\r\n",
            "Authorization: Bearer s3cret-ke\r\n",
        ] {
            let (status, _, text) = request_with(addr, method, path, body, headers);
            assert_eq!(status, 401, "{method} {path} {headers:?}: {text}");
            assert_eq!(json(&text)["error"]["code"], "invalid_api_key");
        }
    }
    let (status, _, _) = request(addr, "GET", "/health", "");
    assert_eq!(status, 200);
    let key = "Authorization: Bearer s3cret-key\r\n";
    let (status, _, text) = request_with(addr, "POST", "/v1/completions", body, key);
    assert_eq!(status, 200, "{text}");
    let (status, _, _) = request_with(addr, "GET", "/v1/models", "", key);
    assert_eq!(status, 200);
    let lowercase_scheme = "Authorization: bearer s3cret-key\r\n";
    let (status, _, _) = request_with(addr, "GET", "/v1/models", "", lowercase_scheme);
    assert_eq!(status, 200);
}
