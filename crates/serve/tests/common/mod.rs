//! What the HTTP tests share: tiny random models, expert files, a server on a free port and a
//! plain HTTP/1.1 client over a socket.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mode_core::file::{ExpertDims, TrainingSummary};
use mode_core::{
    BlockLayout, Expert, ExpertFile, ExpertInit, ExpertMeta, Gate, GateInput, ModeModel,
};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};
use mode_serve::{Limits, Served};
use serde_json::Value;

pub fn backbone(seed: u64) -> Backbone {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    Backbone::random(config.clone(), seed, DType::F32, &Device::Cpu).unwrap()
}

/// A server for `model`, with `allowed` as its --allow-expert-dir.
pub fn serve(model: ModeModel, allowed: &[&Path]) -> SocketAddr {
    serve_with(model, allowed, |_| {})
}

/// [`serve`], with `setup` changing the server's settings before it starts.
pub fn serve_with(
    model: ModeModel,
    allowed: &[&Path],
    setup: impl FnOnce(&mut Served),
) -> SocketAddr {
    let mut served = Served::new("tiny".into(), model, Tokenizer::byte_level()).unwrap();
    served.limits = Limits {
        max_prompt_tokens: 64,
        max_new_tokens: 16,
        max_choices: 3,
        ..Limits::default()
    };
    for dir in allowed {
        served.allow_expert_dir(dir).unwrap();
    }
    setup(&mut served);
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

pub fn start() -> SocketAddr {
    serve(ModeModel::bare(backbone(3)).unwrap(), &[])
}

/// A stage-1 expert file named `domain` for `bb`, over `blocks` blocks, saved under `dir`. Its
/// gates lean towards the expert so that it changes what the model says.
pub fn expert_file(bb: &Backbone, domain: &str, seed: u64, blocks: usize, dir: &Path) -> PathBuf {
    started_expert_file(bb, domain, seed, blocks, dir, ExpertInit::Random)
}

/// [`expert_file`] with the expert started as `init` says.
pub fn started_expert_file(
    bb: &Backbone,
    domain: &str,
    seed: u64,
    blocks: usize,
    dir: &Path,
    init: ExpertInit,
) -> PathBuf {
    let layout = BlockLayout::even(bb.config.num_hidden_layers, blocks, 1).unwrap();
    let expert = Expert::new(domain, bb, &layout, init, seed).unwrap();
    let meta = ExpertMeta {
        format_version: mode_core::file::FORMAT_VERSION,
        domain: domain.into(),
        backbone_fingerprint: bb.fingerprint().unwrap(),
        backbone_source: "test".into(),
        layout: layout.clone(),
        dims: ExpertDims::of(&bb.config),
        training: TrainingSummary::default(),
        tool_version: "test".into(),
        form: mode_core::ExpertForm::Replace,
        gate_input: GateInput::Raw,
    };
    let hidden = bb.config.hidden_size;
    let gates: Vec<Gate> = (0..blocks)
        .map(|_| Gate {
            weight: Tensor::randn(0f32, 0.5, (2, hidden), &Device::Cpu).unwrap(),
            bias: Tensor::new(&[0f32, 2.0], &Device::Cpu).unwrap(),
            input: GateInput::Raw,
        })
        .collect();
    let path = dir.join(format!("{domain}.expert.safetensors"));
    ExpertFile::from_expert(meta, &expert, &gates)
        .save(&path)
        .unwrap();
    path
}

/// A model over backbone(3) with the expert files `files`, as `mode serve --expert ...` has.
pub fn with_experts(files: &[&Path]) -> ModeModel {
    let mut m = ModeModel::bare(backbone(3)).unwrap();
    let fp = m.backbone.fingerprint().unwrap();
    for f in files {
        let file = ExpertFile::load(f, &Device::Cpu).unwrap();
        m.add_expert_file(&file, f, &fp, None).unwrap();
    }
    m
}

/// One HTTP/1.1 request; returns (status, content type, body).
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    request_with(addr, method, path, body, "")
}

/// [`request`] with `headers` (each line ending in `\r\n`) added.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &str,
) -> (u16, String, String) {
    let (status, head, body) = exchange(addr, method, path, body, headers);
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("content-type: ")
                .map(String::from)
        })
        .unwrap_or_default();
    (status, content_type, body)
}

/// One HTTP/1.1 request; returns (status, response head with its headers, body).
pub fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    exchange(addr, method, path, body, "")
}

fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Chunked bodies: keep the data lines, drop the chunk sizes.
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, head.to_string(), body)
}

pub fn dechunk(mut s: &str) -> String {
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

pub fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}
