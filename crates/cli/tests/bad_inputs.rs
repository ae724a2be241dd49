//! Bad inputs through the `mode` binary: broken GGUF and safetensors backbones, broken expert
//! files and composed models, unusable data, bad flags and config files. Every case must end in
//! a clear error (naming the file, and the line, record or tensor where there is one) with a
//! non-zero exit: no panic, no backtrace, no hang, and no raw control character on stderr.
//! Output into a pipe that is already closed must end quietly, as Unix tools do.
//!
//! Small inputs are committed under `tests/bad_inputs/` (written by `make.py` there); inputs
//! that are large or derived from the tiny test backbone are made here, in a temporary folder.
//! A few controls (good inputs that must work) keep the cases honest.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};

/// A case that runs longer than this has hung.
const TIMEOUT: Duration = Duration::from_secs(60);

enum Expect {
    /// A non-zero exit, with each string in stderr.
    Fails(Vec<String>),
    /// A control: exit 0, with each string in stdout.
    Succeeds(Vec<String>),
    /// Text from a hostile file shown escaped: exit 0, each string in stdout or stderr, and no
    /// raw control character (but newline and tab) in either.
    Escaped(Vec<String>),
    /// Stdout is a pipe closed before the run (`mode ... | head -1`): killed by SIGPIPE or exit
    /// 0, and nothing about it on stderr.
    QuietOnClosedPipe,
}

/// What kind of bad input a case is, for the count per class the run prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
enum Class {
    /// Damaged or wrong files: backbones, experts, composed models, checkpoints.
    #[default]
    BrokenFile,
    /// Data that cannot be prepared, trained or evaluated on.
    BadData,
    /// Flags and config files that make no sense.
    BadFlag,
    /// Paths that do not exist.
    Missing,
    /// Flag and config values that used to panic, overflow or be quietly ignored.
    WasPanicOrIgnored,
    /// Named pipes and devices given as inputs (they used to hang).
    WouldHang,
    /// Output into a closed pipe.
    ClosedPipe,
    /// Control characters from files reaching the terminal.
    TerminalEscape,
    /// Names and paths from files that would lead out of their folder.
    PathEscape,
    /// Requests for results that would not be finite or well-defined.
    NonFinite,
    /// Outputs onto existing results or onto the run's own inputs: refused, the files kept
    /// byte for byte.
    DataLoss,
}

struct Case {
    name: String,
    args: Vec<String>,
    expect: Expect,
    class: Class,
    /// Files and folders the run must leave byte for byte as they were.
    protected: Vec<String>,
}

#[derive(Default)]
struct Cases {
    list: Vec<Case>,
    /// The class of the cases pushed from now on.
    class: Class,
}

impl Cases {
    /// Files the cases pushed from now on under `class`.
    fn class(&mut self, class: Class) {
        self.class = class;
    }

    fn fail(&mut self, name: &str, args: &[&str], stderr: &[&str]) {
        self.push(name, args, Expect::Fails(owned(stderr)));
    }

    /// A failing case that must also leave every path in `protected` as it was.
    fn fail_keeping(&mut self, name: &str, args: &[&str], stderr: &[&str], protected: &[&str]) {
        self.fail(name, args, stderr);
        if let Some(case) = self.list.last_mut() {
            case.protected = owned(protected);
        }
    }

    fn ok(&mut self, name: &str, args: &[&str], stdout: &[&str]) {
        self.push(name, args, Expect::Succeeds(owned(stdout)));
    }

    fn escaped(&mut self, name: &str, args: &[&str], shown: &[&str]) {
        self.push(name, args, Expect::Escaped(owned(shown)));
    }

    fn closed_pipe(&mut self, name: &str, args: &[&str]) {
        self.push(name, args, Expect::QuietOnClosedPipe);
    }

    fn push(&mut self, name: &str, args: &[&str], expect: Expect) {
        assert!(
            self.list.iter().all(|c| c.name != name),
            "two cases named {name}"
        );
        self.list.push(Case {
            name: name.into(),
            args: owned(args),
            expect,
            class: self.class,
            protected: Vec::new(),
        });
    }
}

/// Every file under `path` (or the file itself) with its bytes, in path order; nothing for a
/// path that does not exist.
fn snapshot(path: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    if path.is_file() {
        return vec![(path.to_path_buf(), std::fs::read(path).unwrap())];
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut entries: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    entries.sort();
    entries.iter().flat_map(|e| snapshot(e)).collect()
}

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

/// What a run of `mode` gave.
struct Run {
    /// `None` when killed by a signal or by the timeout.
    code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
    seconds: f64,
}

fn run_mode(args: &[String], home: &Path) -> Run {
    run_mode_with(args, home, false)
}

/// [`run_mode`], with stdout a pipe whose reading end is closed before `mode` starts when
/// `stdout_closed`: every write to it fails, as into `| head -1` once `head` has left.
fn run_mode_with(args: &[String], home: &Path, stdout_closed: bool) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mode"))
        .args(args)
        .env("MODE_HOME", home)
        // Nothing here may fetch the default backbone; if a case tried, pip fails fast.
        .env("PIP_NO_INDEX", "1")
        // The worst case for clarity: a user who asked for backtraces.
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("MODE_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mode starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = child.stdout.take().unwrap();
    let out = if stdout_closed {
        drop(stdout);
        std::thread::spawn(String::new)
    } else {
        drain(Box::new(stdout))
    };
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    Run {
        code: status.code(),
        signal: status.signal(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        timed_out,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Why a case failed, or `None` when it behaved.
fn judge(case: &Case, run: &Run) -> Option<String> {
    if run.timed_out {
        return Some(format!("no answer after {TIMEOUT:?} (hang)"));
    }
    let lower = run.stderr.to_lowercase();
    if run.stderr.contains("panicked") || lower.contains("backtrace") {
        return Some("panicked or printed a backtrace".into());
    }
    // Text from files (names, domains, records) must reach the terminal escaped.
    let raw_control = |text: &str| {
        text.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
    };
    if raw_control(&run.stderr) {
        return Some("a raw control character on stderr".into());
    }
    match (&case.expect, run.code) {
        (Expect::QuietOnClosedPipe, _) => {
            const SIGPIPE: i32 = 13;
            if lower.contains("broken pipe") || lower.contains("failed printing") {
                Some("complained about the closed pipe".into())
            } else if run.code == Some(0) || run.signal == Some(SIGPIPE) {
                None
            } else {
                Some(format!(
                    "ended with {:?} (signal {:?}); expected SIGPIPE or exit 0",
                    run.code, run.signal
                ))
            }
        }
        (Expect::Escaped(_), None) => Some("killed by a signal".into()),
        (Expect::Escaped(_), Some(c)) if c != 0 => Some(format!("exited {c}; expected success")),
        (Expect::Escaped(want), Some(_)) => {
            let both = format!("{}{}", run.stdout, run.stderr);
            let missing: Vec<&String> = want.iter().filter(|w| !both.contains(*w)).collect();
            if raw_control(&run.stdout) {
                Some("a raw control character on stdout".into())
            } else if !missing.is_empty() {
                Some(format!("output lacks {missing:?}"))
            } else {
                None
            }
        }
        (_, None) => Some("killed by a signal".into()),
        (Expect::Fails(_), Some(0)) => Some("exited 0; expected an error".into()),
        (Expect::Fails(want), Some(_)) => {
            let missing: Vec<&String> = want.iter().filter(|w| !run.stderr.contains(*w)).collect();
            if !run.stderr.contains("error") {
                Some("stderr holds no `error`".into())
            } else if !missing.is_empty() {
                Some(format!("stderr lacks {missing:?}"))
            } else {
                None
            }
        }
        (Expect::Succeeds(_), Some(c)) if c != 0 => Some(format!("exited {c}; expected success")),
        (Expect::Succeeds(want), Some(_)) => {
            let missing: Vec<&String> = want.iter().filter(|w| !run.stdout.contains(*w)).collect();
            (!missing.is_empty()).then(|| format!("stdout lacks {missing:?}"))
        }
    }
}

/// Runs `mode train` (with `args`) until it has written a checkpoint to `ckpt`, then kills it:
/// a checkpoint to damage.
fn interrupted_run(home: &Path, args: &[&str], ckpt: &Path) {
    for _ in 0..5 {
        let _ = std::fs::remove_dir_all(ckpt);
        let mut child = Command::new(env!("CARGO_BIN_EXE_mode"))
            .args(args)
            .env("MODE_HOME", home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !ckpt.join("state.json").exists() && start.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        child.wait().unwrap();
        // A kill in the middle of replacing the checkpoint leaves the previous one aside.
        mode_io::atomic::recover_dir(ckpt).unwrap();
        if ckpt.join("state.json").exists() && ckpt.join("state.safetensors").exists() {
            return;
        }
    }
    panic!("mode train never wrote a checkpoint to {}", ckpt.display());
}

/// Runs a setup step that must work.
fn setup(home: &Path, args: &[&str]) {
    let run = run_mode(&owned(args), home);
    assert!(
        run.code == Some(0),
        "setup `mode {}` failed:\n{}",
        args.join(" "),
        run.stderr
    );
}

fn tiny_config() -> Config {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    config
}

/// A small random Llama saved as a Hugging Face folder with the byte-level tokenizer.
fn save_backbone(config: &Config, seed: u64, dir: &Path) {
    let bb = Backbone::random(config.clone(), seed, DType::F32, &Device::Cpu).unwrap();
    bb.save_hf_folder(dir, &Tokenizer::byte_level()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A tensor as a safetensors entry: dtype name, shape, little-endian bytes.
struct Raw {
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raw(t: &Tensor) -> Raw {
    let shape = t.dims().to_vec();
    match t.dtype() {
        DType::I64 => Raw {
            dtype: "I64",
            shape,
            bytes: t
                .flatten_all()
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
        _ => Raw {
            dtype: "F32",
            shape,
            bytes: t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
    }
}

/// Writes a safetensors file by hand, so that anything (integer weights) can go in it.
fn write_safetensors(path: &Path, tensors: &HashMap<String, Raw>, metadata: Option<(&str, &str)>) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for name in names {
        let t = &tensors[name];
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [data.len(), data.len() + t.bytes.len()],
            }),
        );
        data.extend_from_slice(&t.bytes);
    }
    if let Some((k, v)) = metadata {
        header.insert("__metadata__".into(), serde_json::json!({ k: v }));
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn load_raw(path: &Path) -> HashMap<String, Raw> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), raw(t)))
        .collect()
}

fn with_value(t: &Raw, index: usize, value: f32) -> Raw {
    let mut bytes = t.bytes.clone();
    bytes[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
    Raw {
        dtype: t.dtype,
        shape: t.shape.clone(),
        bytes,
    }
}

/// The header (JSON) and data of a safetensors file.
fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// The expert file at `from` with its header changed by `meta` and tensors by `tensors`.
fn edit_expert(
    from: &Path,
    to: &Path,
    meta: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Raw>),
) {
    let bytes = std::fs::read(from).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json = &header.metadata().as_ref().unwrap()["mode.expert"];
    let mut m: serde_json::Value = serde_json::from_str(json).unwrap();
    meta(&mut m);
    let mut t = load_raw(from);
    tensors(&mut t);
    write_safetensors(to, &t, Some(("mode.expert", &m.to_string())));
}

#[test]
fn bad_inputs_fail_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bad_inputs");
    assert!(
        corpus.join("gguf/good.gguf").exists(),
        "run python3 tests/bad_inputs/make.py"
    );
    let c = |rel: &str| p(&corpus.join(rel));
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let home = t.join("home");
    let tp = |rel: &str| t.join(rel);
    let s = |rel: &str| p(&t.join(rel));
    let mut cases = Cases::default();

    // --- Fixtures: two tiny backbones, prepared data, experts, a composed model. ------------
    let config = tiny_config();
    save_backbone(&config, 5, &tp("tiny"));
    save_backbone(&config, 6, &tp("other"));
    std::fs::create_dir_all(tp("src")).unwrap();
    for i in 0..30 {
        let text = format!("def f_{i}(x):\n    return x * {i} + 1\n\n").repeat(6);
        std::fs::write(tp(&format!("src/m{i}.py")), text).unwrap();
    }
    std::fs::write(tp("held_out.py"), "def g(x):\n    return x - 1\n".repeat(8)).unwrap();
    let tiny = s("tiny");
    let train_flags = [
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch-tokens",
        "64",
        "--val-every",
        "0",
        "--val-windows",
        "1",
        "--warmup",
        "0",
        "--expert-layers-per-block",
        "1",
    ];
    let prepare = |input: &str, out: &str, extra: &[&str]| {
        let mut a = vec!["data", "prepare", "--backbone", &tiny, "--input", input];
        a.extend(["--out", out]);
        a.extend(extra);
        setup(&home, &a);
    };
    prepare(&s("src"), &s("data/code"), &[]);
    let train = |out: &str, domain: &str, blocks: &str| {
        let mut a = vec!["train", "--backbone", &tiny, "--data"];
        let data = s("data/code");
        a.extend([data.as_str(), "--out", out, "--domain", domain]);
        a.extend(["--blocks", blocks]);
        a.extend(train_flags);
        setup(&home, &a);
    };
    let code = s("experts/code.expert.safetensors");
    let prose = s("experts/prose.expert.safetensors");
    let one_block = s("experts/one.expert.safetensors");
    train(&code, "code", "2");
    train(&prose, "prose", "2");
    train(&one_block, "one", "1");
    let model = s("models/pair");
    let data_code = s("data/code");
    setup(
        &home,
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--expert",
            &prose,
            "--data",
            &data_code,
            "--out",
            &model,
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
            "--val-every",
            "0",
            "--val-windows",
            "1",
            "--warmup",
            "0",
        ],
    );
    let held = s("held_out.py");
    let lora_model = s("models/lora");
    setup(
        &home,
        &[
            "baseline",
            "lora",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &lora_model,
            "--rank",
            "2",
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
            "--val-every",
            "0",
            "--val-windows",
            "1",
            "--warmup",
            "0",
        ],
    );

    // Controls: the fixtures work, so the cases below fail for their own reasons.
    cases.ok(
        "control: inspect a LoRA baseline folder",
        &["inspect", &lora_model],
        &[
            "LoRA baseline: rank 2",
            "trainable",
            "training          1 steps",
        ],
    );
    cases.ok(
        "control: eval the tiny backbone",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--data",
            &held,
            "--seq-len",
            "32",
        ],
        &["held_out.py"],
    );
    cases.ok(
        "control: eval the good GGUF",
        &[
            "eval",
            "--backbone",
            &c("gguf/good.gguf"),
            "--data",
            &held,
            "--seq-len",
            "32",
        ],
        &["held_out.py"],
    );
    cases.ok(
        "control: eval with the expert",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--data",
            &held,
        ],
        &["gate weights"],
    );
    cases.ok(
        "control: eval the composed model",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--model",
            &model,
            "--data",
            &held,
        ],
        &["gate weights"],
    );
    // A JSONL file with some bad lines prepares the good ones and lists the rest.
    cases.ok(
        "control: JSONL with some bad lines",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &c("data/mixed.jsonl"),
            "--out",
            &s("out/mixed"),
        ],
        &[
            "skipped 3 records",
            "mixed.jsonl:2: invalid JSON",
            "mixed.jsonl:4: empty `completion`",
            "mixed.jsonl:7: `text` is not a string",
        ],
    );

    // --- GGUF backbones (committed). -------------------------------------------------------
    cases.class(Class::BrokenFile);
    let gguf_cases: &[(&str, &[&str])] = &[
        ("empty", &["not a valid GGUF"]),
        ("stub", &["not a valid GGUF"]),
        ("truncated_header", &["not a valid GGUF"]),
        (
            "truncated_data",
            &["tensor `blk.0.ffn_down.weight`", "remaining"],
        ),
        ("bad_magic", &["not a valid GGUF", "magic"]),
        ("wrong_version", &["not a valid GGUF", "version"]),
        ("tensor_count_huge", &["not a valid GGUF", "tensor"]),
        ("tensor_count_plus_one", &["not a valid GGUF"]),
        (
            "tensor_count_minus_one",
            &["tensor `output_norm.weight` is missing"],
        ),
        ("kv_count_plus_three", &["not a valid GGUF"]),
        (
            "offset_out_of_range",
            &["tensor `blk.0.ffn_down.weight`", "offset"],
        ),
        (
            "size_out_of_range",
            &["tensor `output_norm.weight`", "remaining"],
        ),
        ("unknown_dtype", &["not a valid GGUF", "dtype"]),
        (
            "shape_mismatch",
            &["tensor `blk.0.ffn_gate.weight` has shape [8, 8], expected [16, 8]"],
        ),
        (
            "missing_tensor",
            &["tensor `blk.0.ffn_up.weight` is missing"],
        ),
        ("unsupported_arch", &["unsupported architecture `phi3`"]),
        ("string_length_lies", &["not a valid GGUF", "string length"]),
        ("string_length_huge", &["not a valid GGUF", "string length"]),
        ("key_length_lies", &["not a valid GGUF", "string length"]),
        ("array_length_lies", &["not a valid GGUF", "array"]),
        (
            "missing_metadata",
            &["metadata `llama.embedding_length`: missing"],
        ),
        (
            "wrong_metadata_type",
            &["metadata `llama.block_count`: not an integer"],
        ),
        ("zero_heads", &["attention heads"]),
        ("zero_layers", &["layer count must be positive"]),
        (
            "no_tokenizer",
            &["metadata `tokenizer.ggml.model`: missing"],
        ),
        (
            "sentencepiece_without_scores",
            &["metadata `tokenizer.ggml.scores`: missing"],
        ),
        (
            "wordpiece_tokenizer",
            &["tokenizer.ggml.model `bert` is not supported"],
        ),
        ("tokens_not_strings", &["metadata `tokenizer.ggml.tokens`"]),
        ("merge_without_space", &["merge 0 `ab` has no space"]),
        ("unknown_value_type", &["not a valid GGUF", "value-type"]),
        ("bad_bool", &["not a valid GGUF", "bool"]),
        ("alignment_zero", &["not a valid GGUF"]),
        ("too_many_dims", &["not a valid GGUF", "dimensions"]),
        (
            "embedding_without_dims",
            &["`token_embd.weight` has no dimensions"],
        ),
        // The vocabulary comes from the embedding's shape, whose product overflows.
        (
            "embedding_dims_overflow",
            &[
                "vocabulary 4611686018427387904",
                "more parameters than can be counted",
            ],
        ),
        // A vocabulary of 2^40 rows: the memory check refuses it before anything is read.
        ("vocab_huge", &["needs about", "GiB", "--no-memory-check"]),
        ("nan_weights", &["tensor `blk.0.attn_q.weight` holds NaN"]),
        (
            "quantized_norm",
            &["tensor `output_norm.weight`", "block size"],
        ),
        ("rope_base_zero", &["rope_theta", "got 0"]),
        (
            "too_many_tokens",
            &["tokenizer has ids up to 299", "vocabulary of 257"],
        ),
    ];
    for (name, expect) in gguf_cases {
        let file = c(&format!("gguf/{name}.gguf"));
        let mut want = vec![format!("{name}.gguf")];
        want.extend(expect.iter().map(|s| s.to_string()));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        cases.fail(
            &format!("gguf: {name}"),
            &["eval", "--backbone", &file, "--data", &held],
            &want,
        );
    }
    cases.fail(
        "gguf: vocab_huge past the memory check",
        &[
            "eval",
            "--backbone",
            &c("gguf/vocab_huge.gguf"),
            "--no-memory-check",
            "--data",
            &held,
        ],
        &["vocab_huge.gguf", "tensor `token_embd.weight` has shape"],
    );
    cases.fail(
        "gguf: generate --chat with a broken chat template",
        &[
            "generate",
            "--backbone",
            &c("gguf/broken_chat_template.gguf"),
            "--chat",
            "--prompt",
            "hi",
        ],
        &["broken_chat_template.gguf: chat template", "syntax error"],
    );
    cases.fail(
        "gguf: data prepare with a broken GGUF's tokenizer",
        &[
            "data",
            "prepare",
            "--backbone",
            &c("gguf/bad_magic.gguf"),
            "--input",
            &held,
            "--out",
            &s("out/gguf-tok"),
        ],
        &["bad_magic.gguf", "not a valid GGUF"],
    );

    // --- Hugging Face folders derived from the tiny backbone. ------------------------------
    let st_name = "model.safetensors";
    let variant = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let dir = tp(&format!("hf/{name}"));
        copy_dir(&tp("tiny"), &dir);
        edit(&dir);
        p(&dir)
    };
    let weights = std::fs::read(tp("tiny").join(st_name)).unwrap();
    let hf = |cases: &mut Cases, name: &str, edit: &dyn Fn(&Path), want: &[&str]| {
        let dir = variant(name, edit);
        cases.fail(
            &format!("hf: {name}"),
            &["eval", "--backbone", &dir, "--data", &held],
            want,
        );
    };
    let w = weights.clone();
    hf(
        &mut cases,
        "truncated",
        &|d| std::fs::write(d.join(st_name), &w[..w.len() / 2]).unwrap(),
        &[
            "truncated/model.safetensors",
            "not a valid safetensors file",
        ],
    );
    let w = weights.clone();
    hf(
        &mut cases,
        "header_length_lies",
        &|d| {
            let mut b = w.clone();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            std::fs::write(d.join(st_name), b).unwrap()
        },
        &[
            "header_length_lies/model.safetensors",
            "not a valid safetensors file",
        ],
    );
    let w = weights.clone();
    hf(
        &mut cases,
        "header_length_short",
        &|d| {
            let mut b = w.clone();
            b[..8].copy_from_slice(&16u64.to_le_bytes());
            std::fs::write(d.join(st_name), b).unwrap()
        },
        &[
            "header_length_short/model.safetensors",
            "not a valid safetensors file",
        ],
    );
    let w = weights.clone();
    hf(
        &mut cases,
        "header_not_json",
        &|d| {
            let mut b = w.clone();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            for (i, x) in b[8..8 + n].iter_mut().enumerate() {
                *x = b"not json! "[i % 10];
            }
            std::fs::write(d.join(st_name), b).unwrap()
        },
        &[
            "header_not_json/model.safetensors",
            "not a valid safetensors file",
        ],
    );
    let w = weights.clone();
    hf(
        &mut cases,
        "offsets_out_of_range",
        &|d| {
            let (mut header, data) = split_safetensors(&w);
            let entry = &mut header["model.norm.weight"]["data_offsets"];
            let end = entry[1].as_u64().unwrap();
            entry[1] = serde_json::json!(end + (1 << 30));
            std::fs::write(d.join(st_name), join_safetensors(&header, &data)).unwrap()
        },
        &[
            "offsets_out_of_range/model.safetensors",
            "not a valid safetensors file",
        ],
    );
    let rewrite = |d: &Path, edit: &dyn Fn(&mut HashMap<String, Raw>)| {
        let mut t = load_raw(&tp("tiny").join(st_name));
        edit(&mut t);
        write_safetensors(&d.join(st_name), &t, None);
    };
    hf(
        &mut cases,
        "integer_weights",
        &|d| {
            rewrite(d, &|t| {
                let up = "model.layers.1.mlp.up_proj.weight";
                let v = Tensor::zeros(t[up].shape.clone(), DType::I64, &Device::Cpu).unwrap();
                t.insert(up.into(), raw(&v));
            })
        },
        &[
            "integer_weights",
            "tensor `model.layers.1.mlp.up_proj.weight`",
            "I64",
        ],
    );
    hf(
        &mut cases,
        "shape_mismatch",
        &|d| {
            rewrite(d, &|t| {
                let g = t.get_mut("model.layers.2.mlp.gate_proj.weight").unwrap();
                g.shape.reverse();
            })
        },
        &[
            "shape_mismatch",
            "tensor `model.layers.2.mlp.gate_proj.weight` has shape [64, 128]",
        ],
    );
    hf(
        &mut cases,
        "missing_tensor",
        &|d| {
            rewrite(d, &|t| {
                t.remove("model.layers.3.self_attn.v_proj.weight");
            })
        },
        &[
            "missing_tensor",
            "tensor `model.layers.3.self_attn.v_proj.weight` is missing",
        ],
    );
    hf(
        &mut cases,
        "nan_weights",
        &|d| {
            rewrite(d, &|t| {
                let name = "model.layers.0.self_attn.o_proj.weight";
                let v = with_value(&t[name], 17, f32::NAN);
                t.insert(name.into(), v);
            })
        },
        &[
            "nan_weights",
            "tensor `model.layers.0.self_attn.o_proj.weight` holds NaN",
        ],
    );
    hf(
        &mut cases,
        "infinite_weights",
        &|d| {
            rewrite(d, &|t| {
                let name = "model.embed_tokens.weight";
                let v = with_value(&t[name], 3, f32::INFINITY);
                t.insert(name.into(), v);
            })
        },
        &[
            "infinite_weights",
            "tensor `model.embed_tokens.weight` holds NaN or infinite",
        ],
    );
    let replace = |file: &'static str, with: String| {
        move |d: &Path| {
            std::fs::copy(&with, d.join(file)).unwrap();
        }
    };
    hf(
        &mut cases,
        "config_not_json",
        &replace("config.json", c("hf/config_not_json.json")),
        &["config_not_json/config.json", "invalid JSON at line 2"],
    );
    hf(
        &mut cases,
        "config_missing_fields",
        &replace("config.json", c("hf/config_missing_fields.json")),
        &[
            "config_missing_fields/config.json",
            "`hidden_size` is missing",
        ],
    );
    hf(
        &mut cases,
        "config_phi3",
        &replace("config.json", c("hf/config_phi3.json")),
        &[
            "config_phi3/config.json",
            "unsupported architecture `Phi3ForCausalLM`",
        ],
    );
    hf(
        &mut cases,
        "config_no_architecture",
        &replace("config.json", c("hf/config_no_architecture.json")),
        &["config_no_architecture/config.json", "`architectures`"],
    );
    hf(
        &mut cases,
        "config_negative_eps",
        &replace("config.json", c("hf/config_negative_eps.json")),
        &[
            "config_negative_eps/config.json",
            "rms_norm_eps",
            "-0.000001",
        ],
    );
    hf(
        &mut cases,
        "no_config",
        &|d| std::fs::remove_file(d.join("config.json")).unwrap(),
        &["no_config/config.json"],
    );
    hf(
        &mut cases,
        "no_tokenizer",
        &|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap(),
        &["no_tokenizer/tokenizer.json"],
    );
    hf(
        &mut cases,
        "tokenizer_junk",
        &replace("tokenizer.json", c("hf/tokenizer_junk.json")),
        &["tokenizer_junk/tokenizer.json", "tokenizer"],
    );
    hf(
        &mut cases,
        "tokenizer_wrong_schema",
        &replace("tokenizer.json", c("hf/tokenizer_wrong_schema.json")),
        &["tokenizer_wrong_schema/tokenizer.json", "tokenizer"],
    );
    hf(
        &mut cases,
        "no_weights",
        &|d| std::fs::remove_file(d.join(st_name)).unwrap(),
        &["no_weights", "no *.safetensors weight files"],
    );
    hf(
        &mut cases,
        "index_missing_shard",
        &replace(
            "model.safetensors.index.json",
            c("hf/index_missing_shard.json"),
        ),
        &["index_missing_shard/model-00002-of-00002.safetensors"],
    );
    hf(
        &mut cases,
        "index_junk",
        &replace("model.safetensors.index.json", c("hf/index_junk.json")),
        &[
            "index_junk/model.safetensors.index.json",
            "invalid JSON at line 1",
        ],
    );
    hf(
        &mut cases,
        "index_no_weight_map",
        &replace(
            "model.safetensors.index.json",
            c("hf/index_no_weight_map.json"),
        ),
        &[
            "index_no_weight_map/model.safetensors.index.json",
            "no `weight_map`",
        ],
    );
    hf(
        &mut cases,
        "tokenizer_config_junk",
        &replace("tokenizer_config.json", c("hf/tokenizer_config_junk.json")),
        &[
            "tokenizer_config_junk/tokenizer_config.json",
            "invalid JSON at line 2",
        ],
    );
    // A model whose embeddings are fewer than the tokenizer's ids.
    let mut small = tiny_config();
    small.vocab_size = 200;
    save_backbone(&small, 5, &tp("hf/small_vocab"));
    cases.fail(
        "hf: small_vocab",
        &["eval", "--backbone", &s("hf/small_vocab"), "--data", &held],
        &[
            "small_vocab/tokenizer.json",
            "beyond the model's vocabulary of 200",
        ],
    );
    cases.fail(
        "hf: generate with NaN weights",
        &[
            "generate",
            "--backbone",
            &s("hf/nan_weights"),
            "--prompt",
            "def",
            "--max-new-tokens",
            "3",
        ],
        &["nan_weights", "holds NaN"],
    );

    // --- Expert files. ---------------------------------------------------------------------
    let eval_expert = |cases: &mut Cases, name: &str, file: &str, want: &[&str]| {
        cases.fail(
            &format!("expert: {name}"),
            &[
                "eval",
                "--backbone",
                &tiny,
                "--expert",
                file,
                "--data",
                &held,
            ],
            want,
        );
    };
    eval_expert(
        &mut cases,
        "a text file",
        &held,
        &["held_out.py", "not a safetensors file"],
    );
    eval_expert(
        &mut cases,
        "safetensors without expert header",
        &c("expert/plain.safetensors"),
        &["plain.safetensors", "not an expert file"],
    );
    eval_expert(
        &mut cases,
        "the backbone's weights",
        &p(&tp("tiny").join(st_name)),
        &["tiny/model.safetensors", "not an expert file"],
    );
    eval_expert(
        &mut cases,
        "header that is bad JSON",
        &c("expert/bad_json_header.expert.safetensors"),
        &["bad_json_header.expert.safetensors", "bad expert header"],
    );
    eval_expert(
        &mut cases,
        "header that is not an object",
        &c("expert/header_not_object.expert.safetensors"),
        &["header_not_object.expert.safetensors", "bad expert header"],
    );
    eval_expert(
        &mut cases,
        "wrong format version",
        &c("expert/wrong_version.expert.safetensors"),
        &["wrong_version.expert.safetensors", "expert format 99"],
    );
    eval_expert(
        &mut cases,
        "not safetensors at all",
        &c("expert/not_safetensors.expert.safetensors"),
        &[
            "not_safetensors.expert.safetensors",
            "not a safetensors file",
        ],
    );
    cases.fail(
        "expert: from another backbone",
        &[
            "eval",
            "--backbone",
            &s("other"),
            "--expert",
            &code,
            "--data",
            &held,
        ],
        &["code.expert.safetensors", "trained on a different backbone"],
    );
    cases.fail(
        "expert: another layout in compose",
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--expert",
            &one_block,
            "--data",
            &data_code,
            "--out",
            &s("models/mixed"),
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
        ],
        &["one.expert.safetensors", "block layout"],
    );
    cases.fail(
        "expert: from another backbone in compose",
        &[
            "compose",
            "--backbone",
            &s("other"),
            "--expert",
            &code,
            "--data",
            &data_code,
            "--out",
            &s("models/other"),
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
        ],
        &["code.expert.safetensors", "different backbone"],
    );
    std::fs::create_dir_all(tp("bad-experts")).unwrap();
    let bad_expert = |name: &str,
                      meta: &dyn Fn(&mut serde_json::Value),
                      tensors: &dyn Fn(&mut HashMap<String, Raw>)|
     -> String {
        let path = tp(&format!("bad-experts/{name}.expert.safetensors"));
        edit_expert(Path::new(&code), &path, meta, tensors);
        p(&path)
    };
    let keep_meta = |_: &mut serde_json::Value| {};
    let keep_tensors = |_: &mut HashMap<String, Raw>| {};
    let f = bad_expert(
        "empty_layout",
        &|m| m["layout"]["boundaries"] = serde_json::json!([]),
        &keep_tensors,
    );
    eval_expert(
        &mut cases,
        "empty block layout",
        &f,
        &[
            "empty_layout.expert.safetensors",
            "bad expert header",
            "block boundaries",
        ],
    );
    let f = bad_expert(
        "falling_layout",
        &|m| m["layout"]["boundaries"] = serde_json::json!([0, 3, 2, 4]),
        &keep_tensors,
    );
    eval_expert(
        &mut cases,
        "falling block layout",
        &f,
        &["falling_layout.expert.safetensors", "block boundaries"],
    );
    let f = bad_expert(
        "layout_too_long",
        &|m| m["layout"]["boundaries"] = serde_json::json!([0, 2, 4, 6]),
        &keep_tensors,
    );
    eval_expert(
        &mut cases,
        "layout longer than the backbone",
        &f,
        &[
            "layout_too_long.expert.safetensors",
            "covers 6 layers, the backbone has 4",
        ],
    );
    let f = bad_expert(
        "wrong_dims",
        &|m| m["dims"]["hidden_size"] = serde_json::json!(96),
        &keep_tensors,
    );
    eval_expert(
        &mut cases,
        "dims of another backbone",
        &f,
        &["wrong_dims.expert.safetensors", "expert layers are shaped"],
    );
    let f = bad_expert("missing_tensor", &keep_meta, &|t| {
        t.remove("blocks.1.layers.0.mlp.up_proj.weight");
    });
    eval_expert(
        &mut cases,
        "missing tensor",
        &f,
        &[
            "missing_tensor.expert.safetensors",
            "`blocks.1.layers.0.mlp.up_proj.weight` is missing",
        ],
    );
    let f = bad_expert("shape_mismatch", &keep_meta, &|t| {
        t.get_mut("blocks.0.layers.0.mlp.down_proj.weight")
            .unwrap()
            .shape
            .reverse();
    });
    eval_expert(
        &mut cases,
        "shape mismatch",
        &f,
        &[
            "shape_mismatch.expert.safetensors",
            "`blocks.0.layers.0.mlp.down_proj.weight` has shape",
        ],
    );
    let f = bad_expert("nan", &keep_meta, &|t| {
        let name = "blocks.1.layers.0.self_attn.q_proj.weight";
        let v = with_value(&t[name], 0, f32::NAN);
        t.insert(name.into(), v);
    });
    eval_expert(
        &mut cases,
        "NaN weights",
        &f,
        &[
            "nan.expert.safetensors",
            "`blocks.1.layers.0.self_attn.q_proj.weight` holds NaN",
        ],
    );
    let f = bad_expert("integer", &keep_meta, &|t| {
        let name = "blocks.0.layers.0.mlp.gate_proj.weight";
        let v = Tensor::ones(t[name].shape.clone(), DType::I64, &Device::Cpu).unwrap();
        t.insert(name.into(), raw(&v));
    });
    eval_expert(
        &mut cases,
        "integer weights",
        &f,
        &[
            "integer.expert.safetensors",
            "`blocks.0.layers.0.mlp.gate_proj.weight` is stored as I64",
        ],
    );
    let f = bad_expert("gate_shape", &keep_meta, &|t| {
        let v = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        t.insert("blocks.0.gate.weight".into(), raw(&v));
    });
    eval_expert(
        &mut cases,
        "gate of the wrong shape",
        &f,
        &[
            "gate_shape.expert.safetensors",
            "`blocks.0.gate.weight` has shape [2, 32], expected [2, 64]",
        ],
    );
    let f = bad_expert("gate_missing", &keep_meta, &|t| {
        t.remove("blocks.1.gate.bias");
    });
    eval_expert(
        &mut cases,
        "gate missing",
        &f,
        &[
            "gate_missing.expert.safetensors",
            "`blocks.1.gate.bias` is missing",
        ],
    );
    let f = bad_expert("gate_nan", &keep_meta, &|t| {
        let v = with_value(&t["blocks.1.gate.bias"], 1, f32::NAN);
        t.insert("blocks.1.gate.bias".into(), v);
    });
    eval_expert(
        &mut cases,
        "gate with NaN",
        &f,
        &[
            "gate_nan.expert.safetensors",
            "`blocks.1.gate.bias` holds NaN",
        ],
    );
    let bytes = std::fs::read(&code).unwrap();
    std::fs::write(
        tp("bad-experts/truncated.expert.safetensors"),
        &bytes[..bytes.len() - 1000],
    )
    .unwrap();
    eval_expert(
        &mut cases,
        "truncated",
        &s("bad-experts/truncated.expert.safetensors"),
        &["truncated.expert.safetensors"],
    );
    // The expert file's safetensors framing damaged.
    let raw_expert = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| -> String {
        let mut b = std::fs::read(&code).unwrap();
        edit(&mut b);
        let path = tp(&format!("bad-experts/{name}.expert.safetensors"));
        std::fs::write(&path, b).unwrap();
        p(&path)
    };
    let f = raw_expert("header_length_lies", &|b| {
        b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    eval_expert(
        &mut cases,
        "header length that lies",
        &f,
        &[
            "header_length_lies.expert.safetensors",
            "not a safetensors file",
        ],
    );
    let f = raw_expert("header_not_json", &|b| {
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        b[8..8 + n].fill(b'#');
    });
    eval_expert(
        &mut cases,
        "header not JSON",
        &f,
        &[
            "header_not_json.expert.safetensors",
            "not a safetensors file",
        ],
    );
    let f = raw_expert("offsets_out_of_range", &|b| {
        let (mut header, data) = split_safetensors(b);
        let entry = &mut header["blocks.0.gate.bias"]["data_offsets"];
        entry[0] = serde_json::json!(1u64 << 33);
        entry[1] = serde_json::json!((1u64 << 33) + 8);
        *b = join_safetensors(&header, &data);
    });
    eval_expert(
        &mut cases,
        "data offsets out of range",
        &f,
        &["offsets_out_of_range.expert.safetensors"],
    );
    cases.fail(
        "expert: inspect a text file",
        &["inspect", &held],
        &["held_out.py", "not a safetensors file"],
    );
    cases.fail(
        "expert: compose a missing file",
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &s("experts/missing.expert.safetensors"),
            "--data",
            &data_code,
            "--out",
            &s("models/none"),
        ],
        &["missing.expert.safetensors"],
    );

    // --- Composed-model folders. -----------------------------------------------------------
    let model_variant = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let dir = tp(&format!("bad-models/{name}"));
        copy_dir(&tp("models/pair"), &dir);
        edit(&dir);
        p(&dir)
    };
    let eval_model = |cases: &mut Cases, name: &str, dir: &str, want: &[&str]| {
        cases.fail(
            &format!("model: {name}"),
            &["eval", "--backbone", &tiny, "--model", dir, "--data", &held],
            want,
        );
    };
    let d = model_variant("no_manifest", &|d| {
        std::fs::remove_file(d.join("model.json")).unwrap()
    });
    eval_model(
        &mut cases,
        "no model.json",
        &d,
        &["no_manifest/model.json", "mode compose"],
    );
    cases.fail(
        "model: --model is a data folder",
        &["eval", "--model", &data_code, "--data", &held],
        &["code/model.json", "not found"],
    );
    cases.fail(
        "model: inspect a folder without model.json",
        &["inspect", &tiny],
        &["tiny/model.json", "not found"],
    );
    let d = model_variant("manifest_junk", &|d| {
        std::fs::write(
            d.join("model.json"),
            "{\"format_version\": 1,\n \"kind\": mode}",
        )
        .unwrap()
    });
    eval_model(
        &mut cases,
        "model.json junk",
        &d,
        &["manifest_junk/model.json", "line 2"],
    );
    let d = model_variant("manifest_version", &|d| {
        let path = d.join("model.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        m["format_version"] = serde_json::json!(99);
        std::fs::write(path, m.to_string()).unwrap();
    });
    eval_model(
        &mut cases,
        "model.json version 99",
        &d,
        &["manifest_version/model.json", "format 99"],
    );
    let d = model_variant("missing_expert", &|d| {
        std::fs::remove_file(d.join("experts/code.expert.safetensors")).unwrap()
    });
    eval_model(
        &mut cases,
        "an expert file is missing",
        &d,
        &["missing_expert/experts/code.expert.safetensors"],
    );
    let d = model_variant("tampered_expert", &|d| {
        let path = d.join("experts/prose.expert.safetensors");
        let mut b = std::fs::read(&path).unwrap();
        let n = b.len();
        b[n - 5] ^= 0x40;
        std::fs::write(path, b).unwrap();
    });
    eval_model(
        &mut cases,
        "an expert file was changed",
        &d,
        &[
            "tampered_expert/experts/prose.expert.safetensors",
            "SHA-256",
        ],
    );
    let d = model_variant("missing_gates", &|d| {
        std::fs::remove_file(d.join("gates.safetensors")).unwrap()
    });
    eval_model(
        &mut cases,
        "gates file missing",
        &d,
        &["missing_gates/gates.safetensors"],
    );
    let d = model_variant("junk_gates", &|d| {
        std::fs::write(d.join("gates.safetensors"), "not a tensor in sight").unwrap()
    });
    eval_model(
        &mut cases,
        "gates file junk",
        &d,
        &["junk_gates/gates.safetensors"],
    );
    let d = model_variant("gates_shape", &|d| {
        let path = d.join("gates.safetensors");
        let mut t = load_raw(&path);
        let v = Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap();
        t.insert("blocks.1.gate.weight".into(), raw(&v));
        write_safetensors(&path, &t, None);
    });
    eval_model(
        &mut cases,
        "gates of the wrong shape",
        &d,
        &[
            "gates_shape/gates.safetensors",
            "`blocks.1.gate.weight` has shape [2, 64], expected [3, 64]",
        ],
    );
    cases.fail(
        "model: generate over another backbone",
        &[
            "generate",
            "--backbone",
            &s("other"),
            "--model",
            &model,
            "--prompt",
            "def",
        ],
        &["pair/model.json", "different backbone"],
    );

    // --- Data: `mode data prepare`. --------------------------------------------------------
    cases.class(Class::BadData);
    let prep = |cases: &mut Cases, name: &str, inputs: &[&str], extra: &[&str], want: &[&str]| {
        let out = s(&format!("out/{}", name.replace(' ', "_")));
        let mut a = vec![
            "data",
            "prepare",
            "--backbone",
            tiny.as_str(),
            "--out",
            &out,
        ];
        for i in inputs {
            a.extend(["--input", i]);
        }
        a.extend(extra);
        cases.fail(&format!("prepare: {name}"), &a, want);
    };
    prep(
        &mut cases,
        "empty file",
        &[&c("data/empty.txt")],
        &[],
        &["empty.txt: empty file", "no usable documents"],
    );
    prep(
        &mut cases,
        "blank file",
        &[&c("data/blank.txt")],
        &[],
        &["blank.txt: empty file"],
    );
    prep(
        &mut cases,
        "no file matches the glob",
        &[&c("data/nomatch")],
        &["--glob", "*.py"],
        &["nomatch", "no files match --glob `*.py`"],
    );
    prep(
        &mut cases,
        "bad glob",
        &[&c("data/nomatch")],
        &["--glob", "[*.py"],
        &["nomatch", "bad --glob"],
    );
    prep(
        &mut cases,
        "not UTF-8",
        &[&c("data/non_utf8.txt")],
        &[],
        &["non_utf8.txt: not UTF-8"],
    );
    prep(
        &mut cases,
        "every JSONL line bad",
        &[&c("data/all_bad.jsonl")],
        &[],
        &["6 records skipped", "all_bad.jsonl:1: invalid JSON"],
    );
    prep(
        &mut cases,
        "JSONL of wrong field types",
        &[&c("data/wrong_types.jsonl")],
        &[],
        &["wrong_types.jsonl:1: `text` is not a string"],
    );
    cases.ok(
        "control: Parquet",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &c("data/good.parquet"),
            "--out",
            &s("out/parquet"),
        ],
        &["prepared", "from 1 files"],
    );
    prep(
        &mut cases,
        "parquet cut in half",
        &[&c("data/cut.parquet")],
        &[],
        &["cut.parquet", "Parquet"],
    );
    prep(
        &mut cases,
        "parquet the reader panics on",
        &[&c("data/page_panics.parquet")],
        &[],
        &["page_panics.parquet", "damaged Parquet file"],
    );
    prep(
        &mut cases,
        "parquet with a negative column start",
        &[&c("data/negative_start.parquet")],
        &[],
        &["negative_start.parquet", "damaged Parquet file"],
    );
    prep(
        &mut cases,
        "a --column no record has",
        &[&c("data/mixed.jsonl")],
        &["--column", "body"],
        &["mixed.jsonl:1: no `body` field"],
    );
    prep(
        &mut cases,
        "a --column the parquet lacks",
        &[&c("data/good.parquet")],
        &["--column", "body"],
        &["good.parquet", "no column `body`", "`text`"],
    );
    prep(
        &mut cases,
        "junk parquet",
        &[&c("data/junk.parquet")],
        &[],
        &["junk.parquet", "Parquet"],
    );
    prep(
        &mut cases,
        "text named parquet",
        &[&c("data/not_parquet.parquet")],
        &[],
        &["not_parquet.parquet", "Parquet"],
    );
    prep(
        &mut cases,
        "parquet footer out of range",
        &[&c("data/bad_footer.parquet")],
        &[],
        &["bad_footer.parquet", "Parquet"],
    );
    prep(
        &mut cases,
        "val fraction 2",
        &[&held],
        &["--val-fraction", "2"],
        &["--val-fraction 2"],
    );
    prep(
        &mut cases,
        "negative test fraction",
        &[&held],
        &["--test-fraction=-0.5"],
        &["--test-fraction -0.5"],
    );
    prep(
        &mut cases,
        "NaN val fraction",
        &[&held],
        &["--val-fraction", "NaN"],
        &["--val-fraction NaN"],
    );
    prep(
        &mut cases,
        "missing input",
        &[&s("nowhere.txt")],
        &[],
        &["nowhere.txt", "No such file"],
    );
    prep(
        &mut cases,
        "unknown format",
        &[&held],
        &["--format", "csv"],
        &["`csv` is not one of auto, text, jsonl, parquet"],
    );
    cases.fail(
        "prepare: output exists",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &held,
            "--out",
            &data_code,
        ],
        &["data/code: already exists"],
    );
    // One line of 100 MB: refused (skipped, and nothing else to prepare) in bounded time.
    let big = tp("big/one_line.txt");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    std::fs::write(&big, "abcdefgh".repeat(100_000_000 / 8)).unwrap();
    prep(
        &mut cases,
        "a 100 MB line",
        &[&p(&big)],
        &[],
        &["one_line.txt: line 1 of the text is 100000000 bytes long"],
    );
    cases.fail(
        "eval: a 100 MB line",
        &["eval", "--backbone", &tiny, "--data", &p(&big)],
        &["one_line.txt", "line 1 of the text is 100000000 bytes long"],
    );

    // --- Data: `mode eval`. ----------------------------------------------------------------
    let eval_data = |cases: &mut Cases, name: &str, file: &str, want: &[&str]| {
        cases.fail(
            &format!("eval: {name}"),
            &["eval", "--backbone", &tiny, "--data", file],
            want,
        );
    };
    eval_data(
        &mut cases,
        "empty file",
        &c("data/empty.txt"),
        &["empty.txt", "0 tokens: nothing to evaluate"],
    );
    eval_data(
        &mut cases,
        "one token",
        &c("data/one_char.txt"),
        &["one_char.txt", "1 tokens: nothing to evaluate"],
    );
    eval_data(
        &mut cases,
        "not UTF-8",
        &c("data/non_utf8.txt"),
        &["non_utf8.txt", "not valid UTF-8"],
    );
    eval_data(
        &mut cases,
        "JSONL with a bad line",
        &c("data/eval_bad_line.jsonl"),
        &["eval_bad_line.jsonl: line 2"],
    );
    eval_data(
        &mut cases,
        "missing file",
        &s("nowhere.txt"),
        &["nowhere.txt: no such file"],
    );

    eval_data(
        &mut cases,
        "a folder that was never prepared",
        &s("src"),
        &["src/manifest.json"],
    );

    // --- Data: `mode train` on damaged prepared folders. -----------------------------------
    let data_variant = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let dir = tp(&format!("bad-data/{name}"));
        copy_dir(&tp("data/code"), &dir);
        edit(&dir);
        p(&dir)
    };
    let train_on = |cases: &mut Cases, name: &str, data: &str, want: &[&str]| {
        let out = s(&format!(
            "bad-train/{}.expert.safetensors",
            name.replace(' ', "_")
        ));
        let mut a = vec![
            "train",
            "--backbone",
            tiny.as_str(),
            "--data",
            data,
            "--out",
            &out,
        ];
        a.extend(train_flags);
        cases.fail(&format!("train: {name}"), &a, want);
    };
    let truncate = |file: &'static str| {
        move |d: &Path| {
            let path = d.join(file);
            let b = std::fs::read(&path).unwrap();
            std::fs::write(&path, &b[..b.len() - 3]).unwrap();
        }
    };
    let d = data_variant("tokens_cut", &truncate("train.tokens"));
    train_on(
        &mut cases,
        "train.tokens truncated",
        &d,
        &["tokens_cut/train.tokens", "the manifest says"],
    );
    let d = data_variant("mask_cut", &truncate("val.mask"));
    train_on(&mut cases, "val.mask truncated", &d, &["mask_cut/val.mask"]);
    let d = data_variant("docs_cut", &truncate("test.docs"));
    train_on(
        &mut cases,
        "test.docs truncated",
        &d,
        &["docs_cut/test.docs"],
    );
    let d = data_variant("manifest_junk", &|d| {
        std::fs::write(
            d.join("manifest.json"),
            "{\"format_version\": 1,\n\"splits\": [}",
        )
        .unwrap()
    });
    train_on(
        &mut cases,
        "manifest junk",
        &d,
        &["manifest_junk/manifest.json", "invalid manifest at line 2"],
    );
    let d = data_variant("manifest_version", &|d| {
        let path = d.join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        m["format_version"] = serde_json::json!(7);
        std::fs::write(path, m.to_string()).unwrap();
    });
    train_on(
        &mut cases,
        "manifest version 7",
        &d,
        &["manifest_version/manifest.json", "format version 7"],
    );
    let d = data_variant("no_manifest", &|d| {
        std::fs::remove_file(d.join("manifest.json")).unwrap()
    });
    train_on(
        &mut cases,
        "no manifest",
        &d,
        &["no_manifest/manifest.json"],
    );
    let d = data_variant("tokens_out_of_vocab", &|d| {
        let path = d.join("train.tokens");
        let n = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, vec![0xee; n]).unwrap();
    });
    train_on(
        &mut cases,
        "token ids beyond the vocabulary",
        &d,
        &[
            "tokens_out_of_vocab/train.tokens",
            "beyond the vocabulary of 257",
        ],
    );
    // An evaluation-only set (all documents in the test split) with damaged ids.
    prepare(
        &s("src"),
        &s("data/evalset"),
        &["--val-fraction", "0", "--test-fraction", "1"],
    );
    copy_dir(&tp("data/evalset"), &tp("bad-data/test_out_of_vocab"));
    let path = tp("bad-data/test_out_of_vocab/test.tokens");
    let n = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, vec![0xee; n]).unwrap();
    cases.fail(
        "eval: prepared tokens beyond the vocabulary",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--data",
            &s("bad-data/test_out_of_vocab"),
        ],
        &[
            "test_out_of_vocab/test.tokens",
            "beyond the vocabulary of 257",
        ],
    );
    prepare(
        &p(&corpus.join("data/one_char.txt")),
        &s("data/short"),
        &["--val-fraction", "0", "--test-fraction", "0"],
    );
    train_on(
        &mut cases,
        "split shorter than a window",
        &s("data/short"),
        &["data/short", "fewer than one window"],
    );
    setup(
        &home,
        &[
            "data",
            "prepare",
            "--backbone",
            &c("gguf/good.gguf"),
            "--input",
            &s("src"),
            "--out",
            &s("data/gguf-tok"),
        ],
    );
    train_on(
        &mut cases,
        "prepared with another tokenizer",
        &s("data/gguf-tok"),
        &["gguf-tok", "another tokenizer"],
    );
    eval_data(
        &mut cases,
        "a prepared folder with an empty test split",
        &s("data/short"),
        &["data/short", "test split has 0 tokens"],
    );
    cases.fail(
        "flags: eval --max-windows 0",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--data",
            &held,
            "--max-windows",
            "0",
        ],
        &["--max-windows must be at least 1"],
    );
    eval_data(
        &mut cases,
        "a folder prepared with another tokenizer",
        &s("data/gguf-tok"),
        &["gguf-tok", "another tokenizer"],
    );
    cases.fail(
        "train: a mixture of two tokenizers",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &format!("{data_code}=0.5"),
            "--data",
            &format!("{}=0.5", s("data/gguf-tok")),
            "--out",
            &s("bad-train/mix.expert.safetensors"),
        ],
        &["gguf-tok", "another tokenizer"],
    );
    train_on(
        &mut cases,
        "a folder that was never prepared",
        &s("src"),
        &["src/manifest.json"],
    );
    train_on(
        &mut cases,
        "a mixture weight of 0",
        &format!("{data_code}=0"),
        &["code=0", "positive number"],
    );

    // --- Checkpoints of an interrupted run. ------------------------------------------------
    cases.class(Class::BrokenFile);
    let long_run = |out: &str, blocks: &'static str| -> Vec<String> {
        let mut a = owned(&[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            out,
        ]);
        a.extend(owned(&train_flags));
        a.extend(owned(&["--blocks", blocks, "--checkpoint-every", "1"]));
        // Long enough never to finish before the kill, or before a damaged resume fails.
        let steps = a.iter().position(|x| x == "--steps").unwrap();
        a[steps + 1] = "1000000".into();
        a
    };
    let args = long_run(&s("ckpt/run.expert.safetensors"), "2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    interrupted_run(&home, &args, &tp("ckpt/run.expert.ckpt"));
    let resume = |cases: &mut Cases,
                  name: &str,
                  blocks: &'static str,
                  edit: &dyn Fn(&Path),
                  want: &[&str]| {
        let dir = tp(&format!("bad-ckpt/{}", name.replace(' ', "_")));
        copy_dir(&tp("ckpt/run.expert.ckpt"), &dir.join("run.expert.ckpt"));
        edit(&dir.join("run.expert.ckpt"));
        let args = long_run(&p(&dir.join("run.expert.safetensors")), blocks);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cases.fail(&format!("checkpoint: {name}"), &args, want);
    };
    resume(
        &mut cases,
        "state.json junk",
        "2",
        &|d| std::fs::write(d.join("state.json"), "{\"step\": ").unwrap(),
        &["run.expert.ckpt/state.json", "bad checkpoint state"],
    );
    resume(
        &mut cases,
        "tensors truncated",
        "2",
        &|d| {
            let path = d.join("state.safetensors");
            let b = std::fs::read(&path).unwrap();
            std::fs::write(&path, &b[..b.len() / 3]).unwrap();
        },
        &["run.expert.ckpt/state.safetensors"],
    );
    let edit_tensors = |d: &Path, f: &dyn Fn(&mut HashMap<String, Raw>)| {
        let path = d.join("state.safetensors");
        let mut t = load_raw(&path);
        f(&mut t);
        write_safetensors(&path, &t, None);
    };
    resume(
        &mut cases,
        "optimizer moments of the wrong shape",
        "2",
        &|d| {
            edit_tensors(d, &|t| {
                let key = t.keys().find(|k| k.starts_with("adam_m.")).unwrap().clone();
                let v = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
                t.insert(key, raw(&v));
            })
        },
        &[
            "run.expert.ckpt/state.safetensors",
            "`adam_m.",
            "has shape [3]",
        ],
    );
    resume(
        &mut cases,
        "a parameter missing",
        "2",
        &|d| {
            edit_tensors(d, &|t| {
                let key = t.keys().find(|k| k.starts_with("param.")).unwrap().clone();
                t.remove(&key);
            })
        },
        &[
            "run.expert.ckpt/state.safetensors",
            "is missing: the checkpoint is from another run",
        ],
    );
    resume(
        &mut cases,
        "a NaN parameter",
        "2",
        &|d| {
            edit_tensors(d, &|t| {
                let key = t.keys().find(|k| k.starts_with("param.")).unwrap().clone();
                let v = with_value(&t[&key], 0, f32::NAN);
                t.insert(key, v);
            })
        },
        &["run.expert.ckpt/state.safetensors", "holds NaN"],
    );
    resume(
        &mut cases,
        "resumed with another layout",
        "1",
        &|_| {},
        &[
            "run.expert.ckpt/state.safetensors",
            "the checkpoint is from another run",
        ],
    );
    // Control: the intact checkpoint resumes, for one more step.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tp("ckpt/run.expert.ckpt/state.json")).unwrap(),
    )
    .unwrap();
    let step = state["step"].as_u64().unwrap();
    copy_dir(
        &tp("ckpt/run.expert.ckpt"),
        &tp("good-ckpt/run.expert.ckpt"),
    );
    let mut args = long_run(&s("good-ckpt/run.expert.safetensors"), "2");
    let steps = args.iter().position(|x| x == "--steps").unwrap();
    args[steps + 1] = (step + 1).to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cases.ok(
        "control: an intact checkpoint resumes",
        &args,
        &["wrote", &format!("{} steps", step + 1)],
    );

    // --- Flags. ----------------------------------------------------------------------------
    cases.class(Class::BadFlag);
    let train_with = |cases: &mut Cases, name: &str, extra: &[&str], want: &[&str]| {
        let out = s("bad-train/flags.expert.safetensors");
        let mut a = vec!["train", "--backbone", tiny.as_str(), "--data", &data_code];
        a.extend(["--out", &out]);
        a.extend(extra);
        cases.fail(&format!("flags: train {name}"), &a, want);
    };
    train_with(
        &mut cases,
        "--steps 0",
        &["--steps", "0"],
        &["--steps >= 1"],
    );
    train_with(
        &mut cases,
        "--seq-len 1",
        &["--seq-len", "1"],
        &["--seq-len >= 2"],
    );
    train_with(
        &mut cases,
        "--batch-tokens below --seq-len",
        &["--seq-len", "64", "--batch-tokens", "8"],
        &["--batch-tokens >= --seq-len"],
    );
    train_with(
        &mut cases,
        "--val-windows 0",
        &["--val-windows", "0"],
        &["--val-windows must be at least 1"],
    );
    train_with(
        &mut cases,
        "--max-train-documents 0",
        &["--max-train-documents", "0"],
        &["--max-train-documents must be at least 1"],
    );
    train_with(
        &mut cases,
        "--micro-batch-tokens below --seq-len",
        &["--seq-len", "64", "--micro-batch-tokens", "32"],
        &["--micro-batch-tokens must be between --seq-len and --batch-tokens"],
    );
    train_with(
        &mut cases,
        "--lr=-1",
        &["--lr=-1"],
        &["--lr must be a positive number, got -1"],
    );
    train_with(
        &mut cases,
        "--lr -1",
        &["--lr", "-1"],
        &["--lr must be a positive number, got -1"],
    );
    train_with(
        &mut cases,
        "--lr nan",
        &["--lr", "nan"],
        &["--lr must be a positive number"],
    );
    train_with(&mut cases, "--steps -3", &["--steps=-3"], &["--steps"]);
    train_with(
        &mut cases,
        "--blocks 0",
        &["--blocks", "0", "--steps", "1"],
        &["0 blocks cannot cut a backbone of 4 layers"],
    );
    train_with(
        &mut cases,
        "--blocks 9",
        &["--blocks", "9", "--steps", "1"],
        &["9 blocks cannot cut a backbone of 4 layers"],
    );
    train_with(
        &mut cases,
        "--expert-layers-per-block 0",
        &["--expert-layers-per-block", "0", "--steps", "1"],
        &["expert_layers_per_block must be at least 1"],
    );
    train_with(
        &mut cases,
        "--gate-init-backbone-prob 1.5",
        &["--gate-init-backbone-prob", "1.5", "--steps", "1"],
        &["1.5"],
    );
    train_with(
        &mut cases,
        "--init zeros",
        &["--init", "zeros"],
        &["`zeros` is not one of random, copy, preserve"],
    );
    train_with(
        &mut cases,
        "--weight-dtype f8",
        &["--weight-dtype", "f8"],
        &["`f8` is not one of f32, f16, bf16, q8_0"],
    );
    train_with(
        &mut cases,
        "--weight-dtype q8_0 (inference only)",
        &["--weight-dtype", "q8_0"],
        &["training reads the frozen weights as tensors", "not q8_0"],
    );
    std::fs::create_dir_all(tp("bad-train/folder.expert.safetensors")).unwrap();
    cases.fail(
        "flags: train --out an existing folder",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &s("bad-train/folder.expert.safetensors"),
        ],
        &["folder.expert.safetensors: is a folder"],
    );
    for command in ["compose", "baseline"] {
        let mut a = vec![command];
        if command == "baseline" {
            a.push("lora");
        } else {
            a.extend(["--expert", code.as_str()]);
        }
        a.extend(["--backbone", &tiny, "--data", &data_code, "--out", &held]);
        cases.fail(
            &format!("flags: {command} --out an existing file"),
            &a,
            &["held_out.py: is a file"],
        );
    }
    cases.fail(
        "flags: baseline lora --rank 0",
        &[
            "baseline",
            "lora",
            "--rank",
            "0",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &s("models/rank0"),
        ],
        &["--rank >= 1"],
    );
    let generate = |cases: &mut Cases, name: &str, extra: &[&str], want: &[&str]| {
        let mut a = vec!["generate", "--backbone", tiny.as_str(), "--prompt", "def"];
        a.extend(extra);
        cases.fail(&format!("flags: generate {name}"), &a, want);
    };
    generate(
        &mut cases,
        "--temperature=-1",
        &["--temperature=-1"],
        &["--temperature must be >= 0, got -1"],
    );
    generate(
        &mut cases,
        "--temperature -1",
        &["--temperature", "-1"],
        &["--temperature must be >= 0, got -1"],
    );
    generate(
        &mut cases,
        "--top-p 0",
        &["--top-p", "0"],
        &["--top-p must be in (0, 1]"],
    );
    generate(
        &mut cases,
        "--top-p 1.5",
        &["--top-p", "1.5"],
        &["--top-p must be in (0, 1]"],
    );
    cases.fail(
        "flags: generate an empty prompt",
        &["generate", "--backbone", &tiny, "--prompt", ""],
        &["the prompt is empty"],
    );
    cases.fail(
        "flags: eval --seq-len 1",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--data",
            &held,
            "--seq-len",
            "1",
        ],
        &["--seq-len must be at least 2"],
    );
    cases.fail(
        "flags: baseline full in bf16",
        &[
            "baseline",
            "full",
            "--backbone",
            &tiny,
            "--weight-dtype",
            "bf16",
            "--data",
            &data_code,
            "--out",
            &s("models/full"),
        ],
        &["--weight-dtype f32"],
    );
    cases.fail(
        "flags: compose --gate-init-backbone-prob 0",
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--expert",
            &prose,
            "--data",
            &data_code,
            "--out",
            &s("models/p0"),
            "--gate-init-backbone-prob",
            "0",
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
        ],
        &["0"],
    );
    cases.fail(
        "flags: compose the same expert twice",
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--expert",
            &code,
            "--data",
            &data_code,
            "--out",
            &s("models/twice"),
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
        ],
        &["code.expert.safetensors", "both experts for `code`"],
    );
    // Several --expert files run together since they keep their stage-1 odds.
    cases.ok(
        "flags: two experts without compose",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--expert",
            &prose,
            "--data",
            &held,
        ],
        &["held_out.py", "gate weights"],
    );
    // `mode serve` refuses these before it binds a port.
    let missing_dir = s("no-such-dir");
    cases.fail(
        "flags: serve --allow-expert-dir missing",
        &[
            "serve",
            "--backbone",
            &tiny,
            "--allow-expert-dir",
            &missing_dir,
        ],
        &["--allow-expert-dir", "no-such-dir"],
    );
    cases.fail(
        "flags: serve --active-experts unknown",
        &[
            "serve",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--active-experts",
            "poetry",
        ],
        &["poetry", "code"],
    );
    cases.fail(
        "flags: --active-experts names no expert of the model",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--model",
            &model,
            "--data",
            &held,
            "--active-experts",
            "poetry",
        ],
        &["no expert `poetry`", "code", "prose"],
    );
    cases.fail(
        "flags: --gate-threshold of 1",
        &[
            "gates",
            "--backbone",
            &tiny,
            "--model",
            &model,
            "--data",
            &held,
            "--gate-threshold",
            "1",
        ],
        &["threshold", "[0, 1)"],
    );
    cases.fail(
        "flags: gates of a model without experts",
        &["gates", "--backbone", &tiny, "--data", &held],
        &["no gates"],
    );
    cases.fail(
        "flags: gates on no tokens",
        &[
            "gates",
            "--backbone",
            &tiny,
            "--model",
            &model,
            "--data",
            &held,
            "--max-tokens",
            "0",
        ],
        &["--max-tokens"],
    );

    // --- Paths that do not exist. ----------------------------------------------------------
    cases.class(Class::Missing);
    cases.fail(
        "paths: --backbone",
        &["eval", "--backbone", &s("nope.gguf"), "--data", &held],
        &["nope.gguf: no such file or folder"],
    );
    cases.fail(
        "paths: train --data",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &s("nope"),
            "--out",
            &s("x.expert.safetensors"),
        ],
        &["nope/manifest.json"],
    );
    cases.fail(
        "paths: --expert",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--expert",
            &s("nope.expert.safetensors"),
            "--data",
            &held,
        ],
        &["nope.expert.safetensors"],
    );
    cases.fail(
        "paths: inspect",
        &["inspect", &s("nope.expert.safetensors")],
        &["nope.expert.safetensors"],
    );
    cases.fail(
        "paths: --model",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--model",
            &s("nope"),
            "--data",
            &held,
        ],
        &["nope/model.json"],
    );
    cases.fail(
        "paths: --config",
        &["train", "--config", &s("nope.toml")],
        &["nope.toml"],
    );

    // --- Config files. ---------------------------------------------------------------------
    cases.class(Class::BadFlag);
    let with_config = |cases: &mut Cases, name: &str, file: &str, want: &[&str]| {
        let out = s("bad-train/config.expert.safetensors");
        cases.fail(
            &format!("config: {name}"),
            &[
                "train",
                "--config",
                &c(file),
                "--backbone",
                &tiny,
                "--data",
                &data_code,
                "--out",
                &out,
            ],
            want,
        );
    };
    with_config(
        &mut cases,
        "junk TOML",
        "config/junk.toml",
        &["junk.toml: invalid TOML at line 1 column 9"],
    );
    with_config(
        &mut cases,
        "unknown key",
        "config/unknown_key.toml",
        &["unknown_key.toml", "key `stepz`"],
    );
    with_config(
        &mut cases,
        "value of the wrong type",
        "config/wrong_type.toml",
        &["wrong_type.toml", "key `steps`", "many"],
    );
    with_config(
        &mut cases,
        "a table",
        "config/table.toml",
        &["table.toml", "`train`"],
    );
    with_config(
        &mut cases,
        "not UTF-8",
        "config/not_utf8.toml",
        &["not_utf8.toml"],
    );

    // --- A closed pipe (`mode ... | head -1`): a quiet end, no "failed printing" panic. ----
    cases.class(Class::ClosedPipe);
    let data_code_2 = s("out/pipe-prepare");
    let closed: &[(&str, Vec<&str>)] = &[
        (
            "data prepare",
            vec![
                "data",
                "prepare",
                "--backbone",
                &tiny,
                "--input",
                &held,
                "--out",
                &data_code_2,
            ],
        ),
        ("inspect an expert", vec!["inspect", &code]),
        ("inspect a model", vec!["inspect", &model]),
        (
            "eval",
            vec![
                "eval",
                "--backbone",
                &tiny,
                "--data",
                &held,
                "--seq-len",
                "32",
            ],
        ),
        (
            "gates",
            vec![
                "gates",
                "--backbone",
                &tiny,
                "--model",
                &model,
                "--data",
                &held,
            ],
        ),
        (
            "generate",
            vec![
                "generate",
                "--backbone",
                &tiny,
                "--prompt",
                "def",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
            ],
        ),
    ];
    for (name, args) in closed {
        cases.closed_pipe(&format!("closed pipe: {name}"), args);
    }

    // --- Flag and config values that panicked, overflowed or were quietly ignored. ---------
    cases.class(Class::WasPanicOrIgnored);
    let eval_tiny = |cases: &mut Cases, name: &str, extra: &[&str], want: &[&str]| {
        let mut a = vec!["eval", "--backbone", tiny.as_str(), "--data", &held];
        a.extend(extra);
        cases.fail(&format!("values: {name}"), &a, want);
    };
    eval_tiny(
        &mut cases,
        "--threads 100000",
        &["--threads", "100000"],
        &["--threads", "must be between 1 and 1024, got 100000"],
    );
    eval_tiny(
        &mut cases,
        "--threads 0",
        &["--threads", "0"],
        &["--threads", "must be between 1 and 1024, got 0"],
    );
    eval_tiny(
        &mut cases,
        "eval --batch-size 0",
        &["--batch-size", "0"],
        &["--batch-size must be between 1 and 4096, got 0"],
    );
    eval_tiny(
        &mut cases,
        "eval --seq-len 2^62",
        &["--seq-len", "4611686018427387904"],
        &["--seq-len must be between 2 and 1048576"],
    );
    const HUGE: &str = "4611686018427387904";
    train_with(
        &mut cases,
        "--batch-tokens 2^62",
        &["--batch-tokens", HUGE],
        &["--batch-tokens must be at most 67108864, got 4611686018427387904"],
    );
    train_with(
        &mut cases,
        "--steps 2^62 (token budget past 2^64)",
        &["--steps", HUGE, "--batch-tokens", "1024"],
        &[
            "--steps 4611686018427387904 x --batch-tokens 1024",
            "lower --steps",
        ],
    );
    train_with(
        &mut cases,
        "--seq-len 2^62",
        &["--seq-len", HUGE, "--batch-tokens", HUGE],
        &["--seq-len must be at most 1048576"],
    );
    train_with(
        &mut cases,
        "--expert-layers-per-block 2^62",
        &["--expert-layers-per-block", HUGE],
        &["--expert-layers-per-block must be between 0 and 256"],
    );
    let lora = |cases: &mut Cases, name: &str, extra: &[&str], want: &[&str]| {
        let out = s("models/lora-values");
        let mut a = vec!["baseline", "lora", "--backbone", tiny.as_str()];
        a.extend(["--data", data_code.as_str(), "--out", &out]);
        a.extend(["--steps", "1", "--seq-len", "32", "--batch-tokens", "64"]);
        a.extend(extra);
        cases.fail(&format!("values: baseline lora {name}"), &a, want);
    };
    lora(
        &mut cases,
        "--rank 2^62",
        &["--rank", HUGE],
        &["--rank must be at most the backbone's hidden size 64"],
    );
    lora(
        &mut cases,
        "--alpha 0",
        &["--alpha", "0"],
        &["--alpha must be a positive number, got 0"],
    );
    lora(
        &mut cases,
        "--alpha nan",
        &["--alpha", "nan"],
        &["--alpha must be a positive number, got NaN"],
    );
    generate(
        &mut cases,
        "--max-new-tokens 2^62",
        &["--max-new-tokens", HUGE],
        &["--max-new-tokens must be between 1 and 1048576"],
    );
    generate(
        &mut cases,
        "--max-new-tokens 0",
        &["--max-new-tokens", "0"],
        &["--max-new-tokens must be between 1 and 1048576, got 0"],
    );
    cases.fail(
        "values: bench infer --new-tokens 2^62",
        &["bench", "infer", "--backbone", &tiny, "--new-tokens", HUGE],
        &["--new-tokens must be between 1 and 1048576"],
    );
    cases.fail(
        "values: serve --max-tokens 0",
        &["serve", "--backbone", &tiny, "--max-tokens", "0"],
        &["--max-tokens must be between 1 and 1048576, got 0"],
    );
    // config.json values: zero sizes divided by zero, strings fell back to defaults, huge
    // sizes overflowed the parameter count.
    let config_edit = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        variant(name, &|d| {
            let path = d.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            edit(&mut c);
            std::fs::write(path, c.to_string()).unwrap();
        })
    };
    let config_values: &[(&str, &str, serde_json::Value, &[&str])] = &[
        (
            "zero_ffn",
            "intermediate_size",
            serde_json::json!(0),
            &["feed-forward width must be positive, got 0 (`intermediate_size`)"],
        ),
        (
            "zero_heads",
            "num_attention_heads",
            serde_json::json!(0),
            &["attention heads must be positive, got 0 (`num_attention_heads`)"],
        ),
        (
            "zero_hidden",
            "hidden_size",
            serde_json::json!(0),
            &["hidden size must be positive, got 0 (`hidden_size`)"],
        ),
        (
            "string_hidden",
            "hidden_size",
            serde_json::json!("64"),
            &["`hidden_size` must be a non-negative integer, got \"64\""],
        ),
        (
            "string_kv_heads",
            "num_key_value_heads",
            serde_json::json!("2"),
            &["`num_key_value_heads` must be a non-negative integer, got \"2\""],
        ),
        (
            "string_eps",
            "rms_norm_eps",
            serde_json::json!("1e-6"),
            &["`rms_norm_eps` must be a number, got \"1e-6\""],
        ),
        (
            "string_rope_theta",
            "rope_theta",
            serde_json::json!("10000"),
            &["`rope_theta` must be a number, got \"10000\""],
        ),
        (
            "string_tie",
            "tie_word_embeddings",
            serde_json::json!("true"),
            &["`tie_word_embeddings` must be true or false, got \"true\""],
        ),
        (
            "negative_ffn",
            "intermediate_size",
            serde_json::json!(-128),
            &["`intermediate_size` must be a non-negative integer, got -128"],
        ),
        (
            "huge_hidden",
            "hidden_size",
            serde_json::json!(1u64 << 62),
            &["more parameters than can be counted"],
        ),
    ];
    for (name, key, value, want) in config_values {
        let dir = config_edit(name, &|c| c[*key] = value.clone());
        let mut want = want.to_vec();
        let file = format!("{name}/config.json");
        want.push(&file);
        cases.fail(
            &format!("values: config.json {name}"),
            &["eval", "--backbone", &dir, "--data", &held],
            &want,
        );
    }

    // --- Named pipes and devices given as inputs: refused by name, never waited on. --------
    cases.class(Class::WouldHang);
    let fifo = |name: &str| -> String {
        let path = tp(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let made = Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success(), "mkfifo {}", path.display());
        p(&path)
    };
    let pipe = fifo("fifos/input.pipe");
    let is_pipe = "input.pipe: is a named pipe, not a regular file or folder";
    let (fifo_out, fifo_tok_out) = (s("out/fifo-prepare"), s("out/fifo-tokenizer"));
    let fifo_cases: &[(&str, Vec<&str>)] = &[
        (
            "data prepare --input",
            vec![
                "data",
                "prepare",
                "--backbone",
                &tiny,
                "--input",
                &pipe,
                "--out",
                &fifo_out,
            ],
        ),
        (
            "eval --data",
            vec!["eval", "--backbone", &tiny, "--data", &pipe],
        ),
        (
            "eval --backbone",
            vec!["eval", "--backbone", &pipe, "--data", &held],
        ),
        (
            "eval --expert",
            vec![
                "eval",
                "--backbone",
                &tiny,
                "--expert",
                &pipe,
                "--data",
                &held,
            ],
        ),
        (
            "gates --data",
            vec![
                "gates",
                "--backbone",
                &tiny,
                "--model",
                &model,
                "--data",
                &pipe,
            ],
        ),
        ("inspect", vec!["inspect", &pipe]),
        ("--config", vec!["train", "--config", &pipe]),
        (
            "data prepare --backbone",
            vec![
                "data",
                "prepare",
                "--backbone",
                &pipe,
                "--input",
                &held,
                "--out",
                &fifo_tok_out,
            ],
        ),
    ];
    for (name, args) in fifo_cases {
        cases.fail(&format!("fifo: {name}"), args, &[is_pipe]);
    }
    // Files inside folders the user names.
    let fifo_inside = |dir: &str, file: &str| {
        let path = Path::new(dir).join(file);
        std::fs::remove_file(&path).unwrap();
        let made = Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success(), "mkfifo {}", path.display());
    };
    let dir = variant("fifo_config", &|_| {});
    fifo_inside(&dir, "config.json");
    cases.fail(
        "fifo: a backbone's config.json",
        &["eval", "--backbone", &dir, "--data", &held],
        &["fifo_config/config.json: is a named pipe"],
    );
    let dir = variant("fifo_weights", &|_| {});
    fifo_inside(&dir, st_name);
    cases.fail(
        "fifo: a backbone's weights",
        &["eval", "--backbone", &dir, "--data", &held],
        &["fifo_weights/model.safetensors: is a named pipe"],
    );
    let dir = variant("fifo_tokenizer", &|_| {});
    fifo_inside(&dir, "tokenizer.json");
    cases.fail(
        "fifo: a backbone's tokenizer.json",
        &["eval", "--backbone", &dir, "--data", &held],
        &["fifo_tokenizer/tokenizer.json: is a named pipe"],
    );
    let dir = model_variant("fifo_gates", &|_| {});
    fifo_inside(&dir, "gates.safetensors");
    eval_model(
        &mut cases,
        "gates.safetensors a named pipe",
        &dir,
        &["fifo_gates/gates.safetensors: is a named pipe"],
    );
    let dir = model_variant("fifo_manifest", &|_| {});
    fifo_inside(&dir, "model.json");
    eval_model(
        &mut cases,
        "model.json a named pipe",
        &dir,
        &["fifo_manifest/model.json: is a named pipe"],
    );
    let prepared = tp("fifo-data");
    copy_dir(&tp("data/code"), &prepared);
    fifo_inside(&p(&prepared), "manifest.json");
    train_with(
        &mut cases,
        "--data with a named pipe for manifest.json",
        &["--data", &p(&prepared)],
        &["fifo-data/manifest.json: is a named pipe"],
    );
    cases.fail(
        "fifo: eval --data /dev/zero",
        &["eval", "--backbone", &tiny, "--data", "/dev/zero"],
        &["/dev/zero: is a character device"],
    );

    // --- Escape sequences in file metadata reach the terminal escaped. ---------------------
    cases.class(Class::TerminalEscape);
    let evil_domain = "evil\u{1b}[31mred\u{1b}]0;title\u{7}\u{9b}2J";
    let evil = bad_expert(
        "evil_domain",
        &|m| m["domain"] = serde_json::json!(evil_domain),
        &keep_tensors,
    );
    let shown = "evil\\x1b[31mred\\x1b]0;title\\x07\\u{9b}2J";
    // Such a domain is refused as a name, and the refusal shows it escaped.
    let refused = [shown, "evil_domain.expert.safetensors", "not a valid name"];
    cases.fail("escapes: inspect", &["inspect", &evil], &refused);
    cases.fail(
        "escapes: eval --expert",
        &[
            "eval",
            "--backbone",
            &tiny,
            "--expert",
            &evil,
            "--data",
            &held,
        ],
        &refused,
    );
    cases.fail(
        "escapes: gates --expert",
        &[
            "gates",
            "--backbone",
            &tiny,
            "--expert",
            &evil,
            "--data",
            &held,
        ],
        &refused,
    );
    // A file name is text from the input too: an empty file is listed as skipped.
    let evil_dir = tp("evil-names");
    std::fs::create_dir_all(&evil_dir).unwrap();
    std::fs::write(
        evil_dir.join("ok.py"),
        "def f(x):\n    return x\n".repeat(20),
    )
    .unwrap();
    std::fs::write(evil_dir.join("\u{1b}[2Jempty.py"), "").unwrap();
    cases.escaped(
        "escapes: a skipped file's name",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &p(&evil_dir),
            "--out",
            &s("out/evil-names"),
        ],
        &["\\x1b[2Jempty.py: empty file"],
    );

    // --- A temperature too small for f32 is greedy, not empty text. ------------------------
    cases.class(Class::NonFinite);
    let greedy = |temperature: &str| {
        let run = run_mode(
            &owned(&[
                "generate",
                "--backbone",
                &tiny,
                "--prompt",
                "def f(x):",
                "--max-new-tokens",
                "12",
                "--temperature",
                temperature,
            ]),
            &home,
        );
        assert_eq!(run.code, Some(0), "generate: {}", run.stderr);
        run.stdout
    };
    let text = greedy("0");
    assert!(!text.trim().is_empty(), "greedy text is empty");
    // --stop cuts the same greedy text before the first occurrence of a piece of it.
    let chars: Vec<char> = text.trim_end_matches('\n').chars().collect();
    assert!(chars.len() >= 4, "greedy text too short to cut: {text:?}");
    let stop: String = chars[2..4].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let run = run_mode(
        &owned(&[
            "generate",
            "--backbone",
            &tiny,
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--stop",
            &stop,
        ]),
        &home,
    );
    assert_eq!(run.code, Some(0), "generate --stop: {}", run.stderr);
    assert_eq!(
        run.stdout,
        format!("{cut}\n"),
        "--stop {stop:?} on {text:?}"
    );
    cases.ok(
        "control: generate --temperature 1e-300 is greedy",
        &[
            "generate",
            "--backbone",
            &tiny,
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1e-300",
        ],
        &[&text],
    );

    // A learning rate that makes the parameters overflow: an error, and nothing written.
    let diverged = |what: &str| s(&format!("diverged/{what}"));
    let huge_lr = [
        "--lr",
        "1e30",
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch-tokens",
        "64",
    ];
    let no_artifacts = [
        diverged("x.expert.safetensors"),
        diverged("composed"),
        diverged("full"),
        diverged("lora"),
    ];
    let runs: [(&str, Vec<&str>); 4] = [
        (
            "train",
            vec!["train", "--data", &data_code, "--out", &no_artifacts[0]],
        ),
        (
            "compose",
            vec![
                "compose",
                "--expert",
                &code,
                "--expert",
                &prose,
                "--data",
                &data_code,
                "--out",
                &no_artifacts[1],
            ],
        ),
        (
            "baseline full",
            vec![
                "baseline",
                "full",
                "--data",
                &data_code,
                "--out",
                &no_artifacts[2],
            ],
        ),
        (
            "baseline lora",
            vec![
                "baseline",
                "lora",
                "--data",
                &data_code,
                "--out",
                &no_artifacts[3],
            ],
        ),
    ];
    for (what, mut args) in runs {
        args.extend([
            "--backbone",
            tiny.as_str(),
            "--val-every",
            "0",
            "--warmup",
            "0",
        ]);
        args.extend(huge_lr);
        cases.fail(
            &format!("non-finite: {what} --lr 1e30"),
            &args,
            &["is not finite", "no model was written", "lower --lr"],
        );
    }

    // --- Names and paths from files that would lead out of their folder. -------------------
    cases.class(Class::PathEscape);
    for (what, domain) in [
        ("climbs", "../../outside"),
        ("absolute", "/tmp/outside"),
        ("a slash", "a/b"),
        ("dot-dot", ".."),
        ("empty", ""),
    ] {
        let f = bad_expert(
            &format!("domain_{}", what.replace(' ', "_")),
            &|m| m["domain"] = serde_json::json!(domain),
            &keep_tensors,
        );
        let name_refused = [f.as_str(), "not a valid name"];
        cases.fail(
            &format!("path: an expert's domain {what}: compose"),
            &[
                "compose",
                "--backbone",
                &tiny,
                "--expert",
                &f,
                "--expert",
                &prose,
                "--data",
                &data_code,
                "--out",
                &s(&format!("escape-out/{what}")),
                "--steps",
                "1",
            ],
            &name_refused,
        );
        cases.fail(
            &format!("path: an expert's domain {what}: inspect"),
            &["inspect", &f],
            &name_refused,
        );
    }
    cases.fail(
        "path: train --domain with a slash",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &s("escape-out/slash.expert.safetensors"),
            "--domain",
            "../up",
            "--steps",
            "1",
        ],
        &["--domain", "not a valid name"],
    );
    let edit_manifest = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        model_variant(name, &|d| {
            let path = d.join("model.json");
            let mut m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            edit(&mut m);
            std::fs::write(path, m.to_string()).unwrap();
        })
    };
    // A real expert file outside the folder: the manifest must not reach it, even with the
    // right hash.
    let outside_sha = mode_io::atomic::sha256_hex(&std::fs::read(&code).unwrap());
    for (what, file) in [
        (
            "climbs",
            "../../../experts/code.expert.safetensors".to_string(),
        ),
        ("absolute", code.clone()),
    ] {
        let sha = outside_sha.clone();
        let d = edit_manifest(&format!("expert_path_{what}"), &|m| {
            m["experts"][0]["file"] = serde_json::json!(file);
            m["experts"][0]["sha256"] = serde_json::json!(sha);
        });
        eval_model(
            &mut cases,
            &format!("an expert path that {what}"),
            &d,
            &["model.json", "must name a file inside"],
        );
    }
    let d = edit_manifest("gates_path_climbs", &|m| {
        m["gates_file"] = serde_json::json!("../pair/gates.safetensors")
    });
    eval_model(
        &mut cases,
        "a gates path that climbs",
        &d,
        &["gates_path_climbs/model.json", "climbs"],
    );
    let d = edit_manifest("expert_name_climbs", &|m| {
        m["experts"][0]["name"] = serde_json::json!("../x")
    });
    eval_model(
        &mut cases,
        "an expert name that climbs",
        &d,
        &["expert_name_climbs/model.json", "not a valid name"],
    );
    let d = model_variant("expert_symlink_out", &|d| {
        let inside = d.join("experts/code.expert.safetensors");
        std::fs::remove_file(&inside).unwrap();
        std::os::unix::fs::symlink(&code, &inside).unwrap();
    });
    eval_model(
        &mut cases,
        "an expert file linked to one outside",
        &d,
        &["expert_symlink_out", "symbolic link"],
    );
    hf(
        &mut cases,
        "index_shard_outside",
        &|d| {
            let index = serde_json::json!({
                "metadata": {},
                "weight_map": {"model.embed_tokens.weight": "../tiny/model.safetensors"}
            });
            std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        },
        &["index_shard_outside/model.safetensors.index.json", "climbs"],
    );

    // --- Outputs onto finished results or onto the run's own inputs. -----------------------
    cases.class(Class::DataLoss);
    let html = s("gates.html");
    std::fs::write(&html, "<p>an earlier report</p>").unwrap();
    let step = [
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch-tokens",
        "64",
        "--val-every",
        "0",
    ];
    let keep = |cases: &mut Cases, name: &str, args: &[&str], says: &[&str], protected: &[&str]| {
        let mut a = args.to_vec();
        if ["train", "compose", "baseline"].contains(&a[0]) {
            a.extend(step);
        }
        cases.fail_keeping(&format!("data loss: {name}"), &a, says, protected);
    };
    // Finished results, without --force.
    let again = ["already exists", "--force"];
    keep(
        &mut cases,
        "train onto a finished expert",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &code,
            "--domain",
            "code",
        ],
        &again,
        &[&code],
    );
    keep(
        &mut cases,
        "compose onto a composed model",
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--data",
            &data_code,
            "--out",
            &model,
        ],
        &again,
        &[&model],
    );
    keep(
        &mut cases,
        "baseline onto a composed model",
        &[
            "baseline",
            "lora",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &model,
        ],
        &again,
        &[&model],
    );
    keep(
        &mut cases,
        "prepare onto prepared data",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &s("src"),
            "--out",
            &data_code,
        ],
        &again,
        &[&data_code],
    );
    keep(
        &mut cases,
        "gates --html onto a file",
        &[
            "gates",
            "--backbone",
            &tiny,
            "--model",
            &model,
            "--data",
            &held,
            "--html",
            &html,
        ],
        &again,
        &[&html],
    );
    // The run's own inputs, even with --force.
    let own = ["the input", "choose another output path"];
    let src = s("src");
    keep(
        &mut cases,
        "prepare --out = --input, forced",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &src,
            "--out",
            &src,
            "--force",
        ],
        &own,
        &[&src],
    );
    keep(
        &mut cases,
        "prepare --out inside --input",
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &src,
            "--out",
            &s("src/prepared"),
            "--force",
        ],
        &own,
        &[&src],
    );
    keep(
        &mut cases,
        "train into a data folder, forced",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &s("data/code/manifest.json"),
            "--force",
        ],
        &own,
        &[&data_code],
    );
    keep(
        &mut cases,
        "train into the backbone folder, forced",
        &[
            "train",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &s("tiny/model.safetensors"),
            "--force",
        ],
        &own,
        &[&tiny],
    );
    keep(
        &mut cases,
        "compose into the folder of its experts, forced",
        &[
            "compose",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--expert",
            &prose,
            "--data",
            &data_code,
            "--out",
            &s("experts"),
            "--force",
        ],
        &own,
        &[&s("experts")],
    );
    keep(
        &mut cases,
        "baseline onto its data, forced",
        &[
            "baseline",
            "full",
            "--backbone",
            &tiny,
            "--data",
            &data_code,
            "--out",
            &data_code,
            "--force",
        ],
        &own,
        &[&data_code],
    );
    keep(
        &mut cases,
        "gates --html onto its expert, forced",
        &[
            "gates",
            "--backbone",
            &tiny,
            "--expert",
            &code,
            "--data",
            &held,
            "--html",
            &code,
            "--force",
        ],
        &own,
        &[&code],
    );

    // --- Run them all. ---------------------------------------------------------------------
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut slowest = (0.0, String::new());
    // MODE_SHOW_BAD_INPUTS=1 prints what every case said, to review the messages.
    let show = std::env::var_os("MODE_SHOW_BAD_INPUTS").is_some();
    for case in &cases.list {
        let closed = matches!(case.expect, Expect::QuietOnClosedPipe);
        let kept: Vec<_> = case
            .protected
            .iter()
            .map(|p| snapshot(Path::new(p)))
            .collect();
        assert!(
            kept.iter().all(|k| !k.is_empty()),
            "{}: a protected path is missing or empty before the run",
            case.name
        );
        let run = run_mode_with(&case.args, &home, closed);
        for (path, before) in case.protected.iter().zip(&kept) {
            if &snapshot(Path::new(path)) != before {
                failures.push(format!("- {}: changed {path}", case.name));
            }
        }
        if show {
            eprintln!(
                "## {} (exit {:?}, {:.2}s)\n{}",
                case.name,
                run.code,
                run.seconds,
                run.stderr.trim()
            );
        }
        if run.seconds > slowest.0 {
            slowest = (run.seconds, case.name.clone());
        }
        if let Some(why) = judge(case, &run) {
            failures.push(format!(
                "- {}: {why}\n    mode {}\n    stderr: {}\n    stdout: {}",
                case.name,
                case.args.join(" "),
                run.stderr.trim().replace('\n', "\n            "),
                run.stdout.trim().replace('\n', "\n            "),
            ));
        }
    }
    for path in &no_artifacts {
        if Path::new(path).exists() {
            failures.push(format!("- non-finite: {path} was written"));
        }
    }
    let controls = cases
        .list
        .iter()
        .filter(|c| matches!(c.expect, Expect::Succeeds(_)))
        .count();
    eprintln!(
        "bad inputs: ran {} cases ({} bad inputs, {controls} controls) in {:.1}s; slowest {:.1}s ({})",
        cases.list.len(),
        cases.list.len() - controls,
        start.elapsed().as_secs_f64(),
        slowest.0,
        slowest.1
    );
    let mut per_class: std::collections::BTreeMap<Class, usize> = Default::default();
    for case in &cases.list {
        *per_class.entry(case.class).or_default() += 1;
    }
    let counts: Vec<String> = per_class
        .iter()
        .map(|(c, n)| format!("{c:?} {n}"))
        .collect();
    eprintln!("bad inputs per class: {}", counts.join(", "));
    assert!(
        failures.is_empty(),
        "{} of {} cases misbehaved:\n{}",
        failures.len(),
        cases.list.len(),
        failures.join("\n")
    );
}
