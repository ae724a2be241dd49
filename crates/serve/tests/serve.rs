//! The HTTP API over real sockets, on a tiny random model with the byte-level tokenizer:
//! OpenAI-shaped answers (whole and streamed), 4xx for bad requests, concurrent clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use candle_core::{DType, Device};
use mode_core::LoadedModel;
use mode_io::Tokenizer;
use mode_model::{random_weights, Architecture, Backbone, Config};
use mode_serve::{Limits, Served};
use serde_json::Value;

fn start() -> SocketAddr {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    let bb = Backbone::load(
        config.clone(),
        &random_weights(&config, 3),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let served = Served {
        name: "tiny".into(),
        model: LoadedModel::Backbone(Box::new(bb)),
        tokenizer: Tokenizer::byte_level(),
        experts: vec![],
        limits: Limits {
            max_prompt_tokens: 64,
            max_new_tokens: 16,
        },
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, mode_serve::router(served))
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// One HTTP/1.1 request; returns (status, content type, body).
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("content-type: ")
                .map(String::from)
        })
        .unwrap_or_default();
    // Chunked bodies: keep the data lines, drop the chunk sizes.
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, content_type, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

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
