//! Admission control over real sockets: with room for two requests, a burst of concurrent
//! requests is answered 200 or 503 (with `Retry-After` and OpenAI's error shape), never
//! anything else, and the server keeps answering afterwards.

mod common;

use common::*;
use mode_core::ModeModel;

#[test]
fn a_full_server_answers_503_with_retry_after() {
    let addr = serve_with(ModeModel::bare(backbone(3)).unwrap(), &[], |s| {
        s.limits.max_queue = 2;
        s.limits.max_new_tokens = 400;
    });
    let (_, _, models) = request(addr, "GET", "/v1/models", "");
    assert_eq!(json(&models)["data"][0]["limits"]["max_queue"], 2);
    // Each request decodes 400 tokens; a burst of 8 overlaps, so some find the server full.
    let mut refused = 0;
    for _burst in 0..5 {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    let body = format!(
                        r#"{{"prompt": "client {i}", "max_tokens": 400, "temperature": 0}}"#
                    );
                    request_with_headers(addr, "POST", "/v1/completions", &body)
                })
            })
            .collect();
        for h in handles {
            let (status, headers, body) = h.join().unwrap();
            match status {
                200 => assert!(json(&body)["choices"][0]["text"].is_string(), "{body}"),
                503 => {
                    refused += 1;
                    let e = json(&body);
                    assert_eq!(e["error"]["type"], "server_error", "{body}");
                    assert!(e["error"]["message"].as_str().unwrap().contains("full"));
                    let retry = headers
                        .lines()
                        .find_map(|l| {
                            l.to_lowercase()
                                .strip_prefix("retry-after: ")
                                .map(String::from)
                        })
                        .unwrap_or_else(|| panic!("503 without Retry-After: {headers}"));
                    assert!(retry.trim().parse::<u64>().unwrap() >= 1, "{retry}");
                }
                other => panic!("status {other}: {body}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(
        refused > 0,
        "no burst of 8 found a server with room for 2 full"
    );
    // Places are given back: a request afterwards is served.
    let (status, _, body) = request(
        addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "x", "max_tokens": 2}"#,
    );
    assert_eq!(status, 200, "{body}");
}
