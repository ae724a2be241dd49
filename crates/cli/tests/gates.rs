//! `mode gates` and sparse gating in `mode eval`, through the binary, on a tiny random backbone
//! (byte-level tokenizer, so every multi-byte character is split over several tokens) with two
//! random experts run together.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{mode, ok};
use mode_core::file::{ExpertDims, TrainingSummary};
use mode_core::{BlockLayout, Expert, ExpertFile, ExpertInit, ExpertMeta, Gate, GateInput};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};

fn p(x: &Path) -> String {
    x.to_str().unwrap().to_string()
}

/// A small random Llama saved as a Hugging Face folder with the byte-level tokenizer, and two
/// stage-1 expert files over it with random gates (so every token mixes differently).
fn tiny_model(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    let bb = Backbone::random(config.clone(), 7, DType::F32, &Device::Cpu).unwrap();
    let path = dir.join("tiny");
    bb.save_hf_folder(&path, &Tokenizer::byte_level()).unwrap();
    // The experts are checked against the backbone as the binary will load it.
    let (bb, _) = Backbone::open(&path, DType::F32, &Device::Cpu).unwrap();
    let layout = BlockLayout::even(4, 2, 1).unwrap();
    let experts = ["math", "code"]
        .iter()
        .enumerate()
        .map(|(i, domain)| {
            let expert =
                Expert::new(domain, &bb, &layout, ExpertInit::Random, 20 + i as u64).unwrap();
            let meta = ExpertMeta {
                format_version: mode_core::file::FORMAT_VERSION,
                domain: domain.to_string(),
                backbone_fingerprint: bb.fingerprint().unwrap(),
                backbone_source: p(&path),
                layout: layout.clone(),
                dims: ExpertDims::of(&bb.config),
                training: TrainingSummary::default(),
                tool_version: "test".into(),
                form: mode_core::ExpertForm::Replace,
                gate_input: GateInput::Raw,
            };
            let gates: Vec<Gate> = (0..layout.num_blocks())
                .map(|b| Gate {
                    weight: Tensor::randn(0f32, 0.3, (2, bb.config.hidden_size), &Device::Cpu)
                        .unwrap(),
                    bias: Tensor::new(&[0.0f32, b as f32 * 0.2 - 0.5], &Device::Cpu).unwrap(),
                    input: GateInput::Raw,
                })
                .collect();
            let file = dir.join(format!("{domain}.expert.safetensors"));
            ExpertFile::from_expert(meta, &expert, &gates)
                .save(&file)
                .unwrap();
            file
        })
        .collect();
    (path, experts)
}

/// The text of every `<div class="text">` block: its token spans' contents, unescaped.
fn block_texts(html: &str) -> Vec<(usize, String)> {
    html.split("<div class=\"text\">")
        .skip(1)
        .map(|block| {
            let block = &block[..block.find("</div>").expect("block closed")];
            let spans = block.matches("<span class=\"t\"").count();
            let text: String = block
                .split("<span class=\"t\"")
                .skip(1)
                .map(|s| {
                    let content = &s[s.find('>').unwrap() + 1..];
                    &content[..content.find("</span>").unwrap()]
                })
                .collect();
            let text = text
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&");
            (spans, text)
        })
        .collect()
}

#[test]
fn gates_page_and_sparse_gating_in_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let (backbone, experts) = tiny_model(tmp.path());
    let text =
        "def f(x):\n    return x * 2  # <b>&\"'</b>\n\nCafé — naïve 日本語 🦀\n  Solve 3*x = 12.\n";
    let data = tmp.path().join("mixed.txt");
    std::fs::write(&data, text).unwrap();
    let tokens = Tokenizer::byte_level().encode(text).unwrap().len();
    assert_eq!(tokens, text.len(), "one token per byte");
    let model = [
        "--backbone",
        &p(&backbone),
        "--expert",
        &p(&experts[0]),
        "--expert",
        &p(&experts[1]),
    ];
    let with = |args: &[&str]| -> Vec<String> {
        model
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| mode(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // The page: one span per token per block, the text intact (no half characters), a legend.
    let page = tmp.path().join("gates.html");
    let mut args = vec!["gates".to_string()];
    args.extend(with(&[
        "--data",
        &p(&data),
        "--html",
        &p(&page),
        "--seq-len",
        "16",
    ]));
    let out = ok(&run(args));
    assert!(out.contains("backbone") && out.contains("math") && out.contains("code"));
    assert!(
        out.contains(&format!("{tokens} tokens x 2 blocks")),
        "{out}"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
    assert_eq!(html.matches("<span class=\"t\"").count(), 2 * tokens);
    let blocks = block_texts(&html);
    assert_eq!(blocks.len(), 2);
    for (spans, shown) in &blocks {
        assert_eq!(*spans, tokens);
        assert_eq!(shown, text);
    }
    for branch in ["backbone", "math", "code"] {
        assert!(
            html.contains(&format!("</span>{branch}")),
            "legend: {branch}"
        );
    }

    // Without --html: the table only; --max-tokens caps the text.
    let mut args = vec!["gates".to_string()];
    args.extend(with(&["--data", &p(&data), "--max-tokens", "5"]));
    let out = ok(&run(args));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[1].starts_with("0      0-1"), "{out}");

    // The backbone alone has no gates to show.
    let bare = mode(&["gates", "--backbone", &p(&backbone), "--data", &p(&data)]);
    assert!(!bare.status.success());
    assert!(String::from_utf8_lossy(&bare.stderr).contains("no gates"));

    // Sparse gating in eval: top-0 is the backbone exactly, top-1 runs and differs from dense.
    let eval = |args: Vec<String>| -> serde_json::Value {
        let out = ok(&run(args));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["mixed.txt"].clone()
    };
    let eval_args = |extra: &[&str]| {
        let mut a = vec!["eval".to_string()];
        a.extend(with(&["--data", &p(&data), "--seq-len", "16", "--json"]));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let backbone_only = eval(
        ["eval", "--backbone", &p(&backbone), "--data", &p(&data)]
            .iter()
            .chain(&["--seq-len", "16", "--json"])
            .map(|s| s.to_string())
            .collect(),
    );
    let dense = eval(eval_args(&[]));
    let top0 = eval(eval_args(&["--gate-top-k", "0"]));
    let top1 = eval(eval_args(&["--gate-top-k", "1"]));
    for key in ["next_token_accuracy", "loss", "predictions"] {
        assert_eq!(top0[key], backbone_only[key], "{key}");
    }
    assert_ne!(
        dense["loss"], backbone_only["loss"],
        "experts change the output"
    );
    assert_ne!(top1["loss"], dense["loss"], "top-1 drops part of the mix");
    let acc = top1["next_token_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // The reported gate weights are the routed ones.
    for block in top0["gate_weights"].as_array().unwrap() {
        let w: Vec<f64> = block
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(w, [1.0, 0.0, 0.0]);
    }
}
