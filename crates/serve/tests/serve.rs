//! The HTTP API over real sockets, on a tiny random model with the byte-level tokenizer:
//! OpenAI-shaped answers (whole and streamed), 4xx for bad requests, concurrent clients,
//! experts chosen per request, and experts added and removed while serving.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use candle_core::Device;
use common::*;
use mode_core::{ExpertFile, ExpertInit, ModeModel};
use serde_json::Value;

#[test]
fn the_api_answers_like_openai_and_refuses_bad_requests() {
    let addr = start();
    let (status, _, body) = request(addr, "GET", "/health", "");
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    let (_, _, body) = request(addr, "GET", "/v1/models", "");
    assert_eq!(json(&body)["data"][0]["id"], "tiny");

    // Whole completion.
    let (status, _, body) = request(
        addr,
        "POST",
        "/v1/completions",
        r#"{"model": "tiny", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), 9);

    // Greedy is deterministic, and streaming produces the same text.
    let (_, _, again) = request(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "def f(x):", "max_tokens": 5, "temperature": 0}"#,
    );
    assert_eq!(json(&again)["choices"][0]["text"], v["choices"][0]["text"]);
    let (status, content_type, body) = request(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "stream": true}"#,
    );
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| json(d)["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, v["choices"][0]["text"].as_str().unwrap());

    // Chat, whole and streamed.
    let chat =
        r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}"#;
    let (status, _, body) = request(addr, "POST", "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let streamed_chat = chat.replace("\"temperature\": 0", "\"temperature\": 0, \"stream\": true");
    let (_, _, body) = request(addr, "POST", "/v1/chat/completions", &streamed_chat);
    let first = body.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let first = json(first);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // Bad requests: 4xx with an OpenAI error body.
    for (path, body, want) in [
        ("/v1/completions", "{not json", 400),
        ("/v1/completions", r#"{"prompt": 5}"#, 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 100000}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": -1}"#,
            400,
        ),
        ("/v1/completions", r#"{"prompt": "x", "top_p": 0}"#, 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "model": "other"}"#,
            404,
        ),
        (
            "/v1/completions",
            &format!(r#"{{"prompt": "{}"}}"#, "y".repeat(200)),
            400,
        ),
        ("/v1/completions", r#"{"prompt": ""}"#, 400),
        ("/v1/chat/completions", r#"{"messages": []}"#, 400),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user"}]}"#,
            400,
        ),
        ("/v1/nothing", "{}", 404),
    ] {
        let (status, _, text) = request(addr, "POST", path, body);
        assert_eq!(status, want, "{path} {body}: {text}");
        assert!(json(&text)["error"]["message"].is_string(), "{text}");
    }

    // Concurrent clients all get answers.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let body = format!(r#"{{"prompt": "client {i}", "max_tokens": 3}}"#);
                request(addr, "POST", "/v1/completions", &body).0
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
}

/// The greedy completion of a fixed prompt, with `extra` JSON fields in the request.
fn greedy(addr: SocketAddr, extra: &str) -> String {
    completion(addr, &format!(r#", "temperature": 0{extra}"#))
}

/// A completion sampled with a fixed seed: the tiny random model's greedy text is mostly one
/// token repeated, while sampled text shows any change in the logits.
fn sampled(addr: SocketAddr, extra: &str) -> String {
    completion(addr, &format!(r#", "temperature": 1, "seed": 7{extra}"#))
}

fn completion(addr: SocketAddr, extra: &str) -> String {
    let body = format!(r#"{{"prompt": "def f(x):", "max_tokens": 16{extra}}}"#);
    let (status, _, text) = request(addr, "POST", "/v1/completions", &body);
    assert_eq!(status, 200, "{body}: {text}");
    json(&text)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The streamed greedy chat answer, with `extra` JSON fields in the request.
fn greedy_chat_streamed(addr: SocketAddr, extra: &str) -> String {
    let body = format!(
        r#"{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 16, "temperature": 0, "stream": true{extra}}}"#
    );
    let (status, _, text) = request(addr, "POST", "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{body}: {text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            json(d)["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

fn model_ids(addr: SocketAddr) -> Vec<String> {
    let (_, _, body) = request(addr, "GET", "/v1/models", "");
    json(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn experts_of(addr: SocketAddr) -> Value {
    let (status, _, body) = request(addr, "GET", "/v1/experts", "");
    assert_eq!(status, 200, "{body}");
    json(&body)["experts"].clone()
}

#[test]
fn requests_choose_their_experts() {
    let dir = tempfile::tempdir().unwrap();
    let bb = backbone(3);
    let code = expert_file(&bb, "code", 1, 2, dir.path());
    let math = expert_file(&bb, "math", 2, 2, dir.path());
    let plain = start();
    let both = serve(with_experts(&[&code, &math]), &[]);
    let math_only = serve(with_experts(&[&math]), &[]);

    assert_eq!(model_ids(both), vec!["tiny", "tiny/code", "tiny/math"]);
    let (backbone_greedy, backbone_sampled) = (greedy(plain, ""), sampled(plain, ""));
    assert_ne!(
        sampled(both, ""),
        backbone_sampled,
        "the experts change the text"
    );
    // No expert is the backbone exactly, however it is asked for.
    assert_eq!(greedy(both, r#", "experts": []"#), backbone_greedy);
    assert_eq!(sampled(both, r#", "experts": []"#), backbone_sampled);
    assert_eq!(sampled(both, r#", "gate_top_k": 0"#), backbone_sampled);
    assert_eq!(
        greedy_chat_streamed(both, r#", "experts": []"#),
        greedy_chat_streamed(plain, "")
    );
    // One expert of two is the model loaded with that expert alone (stage-1 odds kept).
    let math_text = sampled(math_only, "");
    assert_eq!(sampled(both, r#", "experts": ["math"]"#), math_text);
    assert_eq!(sampled(both, r#", "model": "tiny/math""#), math_text);
    assert_eq!(
        greedy(both, r#", "experts": ["math"]"#),
        greedy(math_only, "")
    );
    assert_eq!(
        sampled(both, r#", "experts": ["code", "math"]"#),
        sampled(both, "")
    );

    for (body, want, says) in [
        (
            r#""experts": ["poetry"]"#,
            400,
            "loaded experts: code, math",
        ),
        (r#""model": "tiny/poetry""#, 400, "unknown expert `poetry`"),
        (r#""experts": "code""#, 400, "`experts`: invalid type"),
        (r#""gate_threshold": 1.5"#, 400, "gate_threshold"),
        (r#""gate_top_k": -1"#, 400, "`gate_top_k`: invalid value"),
    ] {
        let body = format!(r#"{{"prompt": "x", "max_tokens": 2, {body}}}"#);
        let (status, _, text) = request(both, "POST", "/v1/completions", &body);
        assert_eq!(status, want, "{body}: {text}");
        let message = json(&text)["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(says), "{body}: {message}");
    }
    // The backbone alone has no expert to name.
    let (status, _, text) = request(
        plain,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "Hi"}], "experts": ["code"]}"#,
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("loaded experts: none"), "{text}");
}

#[test]
fn a_hot_added_preserving_expert_changes_no_answer_until_it_is_trained() {
    let allowed = tempfile::tempdir().unwrap();
    let bb = backbone(3);
    let start = started_expert_file(&bb, "fresh", 1, 2, allowed.path(), ExpertInit::Preserve);
    let file = ExpertFile::load(&start, &Device::Cpu).unwrap();
    assert_eq!(file.meta.form, mode_core::ExpertForm::Residual);
    let addr = serve(ModeModel::bare(backbone(3)).unwrap(), &[allowed.path()]);
    let before = sampled(addr, "");
    let body = serde_json::json!({"path": start}).to_string();
    let (status, _, text) = request(addr, "POST", "/v1/experts", &body);
    assert_eq!(status, 201, "{text}");
    // Its gates lean towards it, and still every sampled token is the backbone's.
    assert_eq!(sampled(addr, ""), before);
    assert_eq!(sampled(addr, r#", "experts": ["fresh"]"#), before);
}

#[test]
fn experts_are_added_and_removed_while_serving() {
    let allowed = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let bb = backbone(3);
    let code = expert_file(&bb, "code", 1, 2, allowed.path());
    let wide = expert_file(&bb, "wide", 4, 4, allowed.path());
    let foreign = expert_file(&backbone(5), "foreign", 1, 2, allowed.path());
    let outside = expert_file(&bb, "outside", 1, 2, elsewhere.path());
    let junk = allowed.path().join("junk.expert.safetensors");
    std::fs::write(&junk, b"not safetensors").unwrap();

    let addr = serve(ModeModel::bare(backbone(3)).unwrap(), &[allowed.path()]);
    let add = |path: &Path, name: Option<&str>| {
        let body = serde_json::json!({"path": path, "name": name}).to_string();
        let (status, _, text) = request(addr, "POST", "/v1/experts", &body);
        (status, json(&text))
    };
    let (before, before_sampled) = (greedy(addr, ""), sampled(addr, ""));
    assert_eq!(experts_of(addr), serde_json::json!([]));

    let (status, v) = add(&code, None);
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], "code");
    assert_eq!(v["experts"], serde_json::json!(["code"]));
    assert_eq!(model_ids(addr), vec!["tiny", "tiny/code"]);
    let with_code = sampled(addr, "");
    assert_ne!(with_code, before_sampled, "the added expert runs");
    assert_eq!(sampled(addr, r#", "experts": []"#), before_sampled);

    // The same file under another name runs beside it.
    let (status, v) = add(&code, Some("code2"));
    assert_eq!(status, 201, "{v}");
    assert_eq!(experts_of(addr), serde_json::json!(["code", "code2"]));

    let message = |v: &Value| v["error"]["message"].as_str().unwrap_or("").to_string();
    let refused: Vec<(PathBuf, Option<&str>, u16, String)> = vec![
        (
            code.clone(),
            None,
            409,
            "already has an expert `code`".into(),
        ),
        (wide.clone(), None, 409, wide.display().to_string()),
        (foreign.clone(), None, 400, foreign.display().to_string()),
        (junk.clone(), None, 400, junk.display().to_string()),
        (outside.clone(), None, 403, "--allow-expert-dir".into()),
        (
            allowed
                .path()
                .join("../")
                .join(elsewhere.path().file_name().unwrap())
                .join("outside.expert.safetensors"),
            None,
            403,
            "outside".into(),
        ),
        (
            allowed.path().join("missing.expert.safetensors"),
            None,
            404,
            "missing.expert.safetensors".into(),
        ),
        (allowed.path().to_path_buf(), None, 400, "not a file".into()),
        (
            "relative.expert.safetensors".into(),
            None,
            400,
            "absolute".into(),
        ),
        (code.clone(), Some("a/b"), 400, "expert name".into()),
    ];
    for (path, name, want, says) in refused {
        let (status, v) = add(&path, name);
        assert_eq!(status, want, "{}: {v}", path.display());
        assert!(message(&v).contains(&says), "{}: {v}", path.display());
    }
    #[cfg(unix)]
    {
        let link = allowed.path().join("link.expert.safetensors");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let (status, v) = add(&link, None);
        assert_eq!(status, 403, "a link out of the directory: {v}");
    }
    let (status, _, text) = request(addr, "POST", "/v1/experts", r#"{"path": 5}"#);
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        experts_of(addr),
        serde_json::json!(["code", "code2"]),
        "refused adds change nothing"
    );

    // Requests racing adds and deletes all finish, each on one model.
    let clients: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let body = format!(r#"{{"prompt": "client {i}", "max_tokens": 8}}"#);
                request(addr, "POST", "/v1/completions", &body).0
            })
        })
        .collect();
    let (status, _, text) = request(addr, "DELETE", "/v1/experts/code2", "");
    assert_eq!(status, 200, "{text}");
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    assert_eq!(sampled(addr, ""), with_code);

    let (status, _, text) = request(addr, "DELETE", "/v1/experts/code", "");
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["experts"], serde_json::json!([]));
    assert_eq!(greedy(addr, ""), before, "back to the backbone exactly");
    assert_eq!(sampled(addr, ""), before_sampled);
    assert_eq!(model_ids(addr), vec!["tiny"]);
    let (status, _, text) = request(addr, "DELETE", "/v1/experts/code", "");
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("unknown expert `code`"), "{text}");

    // Emptied, the model takes an expert of another layout.
    let (status, v) = add(&wide, None);
    assert_eq!(status, 201, "{v}");

    // Without --allow-expert-dir, adding is off.
    let closed = start();
    let body = serde_json::json!({"path": code}).to_string();
    let (status, _, text) = request(closed, "POST", "/v1/experts", &body);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("--allow-expert-dir"), "{text}");
}
