//! No user file is replaced without `--force`: a second `mode train`, `compose`, `baseline` or
//! `gates --html` onto an existing output is refused, names the path and `--force`, and leaves
//! the output byte for byte as it was; with `--force` it is replaced. An output that is, lies
//! inside or holds an input of the same run is refused even with `--force`.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};

fn mode(home: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mode"))
        .args(args)
        .env("MODE_HOME", home)
        .env("PIP_NO_INDEX", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file under `path` (or the file itself) with its bytes, in path order.
fn snapshot(path: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    if path.is_file() {
        return vec![(path.to_path_buf(), std::fs::read(path).unwrap())];
    }
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for e in entries {
        out.extend(snapshot(&e));
    }
    out
}

#[test]
fn outputs_are_replaced_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let home = t.join("home");
    let s = |rel: &str| t.join(rel).display().to_string();
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    Backbone::random(config, 5, DType::F32, &Device::Cpu)
        .unwrap()
        .save_hf_folder(&t.join("tiny"), &Tokenizer::byte_level())
        .unwrap();
    std::fs::create_dir_all(t.join("src")).unwrap();
    for i in 0..20 {
        let text = format!("def f_{i}(x):\n    return x * {i}\n\n").repeat(6);
        std::fs::write(t.join(format!("src/m{i}.py")), text).unwrap();
    }
    let tiny = s("tiny");
    let (ok, err) = mode(
        &home,
        &[
            "data",
            "prepare",
            "--backbone",
            &tiny,
            "--input",
            &s("src"),
            "--out",
            &s("data"),
        ],
    );
    assert!(ok, "{err}");
    let flags = [
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch-tokens",
        "32",
        "--val-every",
        "0",
        "--val-windows",
        "1",
        "--warmup",
        "0",
    ];
    let expert = s("code.expert.safetensors");
    let data = s("data");
    let train: Vec<&str> = [
        "train",
        "--backbone",
        &tiny,
        "--data",
        &data,
        "--out",
        &expert,
        "--blocks",
        "2",
        "--expert-layers-per-block",
        "1",
    ]
    .into_iter()
    .chain(flags)
    .collect();
    let compose: Vec<&str> = [
        "compose",
        "--backbone",
        &tiny,
        "--expert",
        &expert,
        "--data",
        &data,
        "--out",
    ]
    .into_iter()
    .collect();
    let model = s("models/one");
    let compose: Vec<&str> = compose
        .into_iter()
        .chain([model.as_str()])
        .chain(flags)
        .collect();
    let full = s("models/full");
    let baseline: Vec<&str> = [
        "baseline",
        "full",
        "--backbone",
        &tiny,
        "--data",
        &data,
        "--out",
    ]
    .into_iter()
    .chain([full.as_str()])
    .chain(flags)
    .collect();
    let html = s("gates.html");
    let sample = s("src/m0.py");
    let gates: Vec<&str> = [
        "gates",
        "--model",
        &model,
        "--backbone",
        &tiny,
        "--data",
        &sample,
        "--html",
        &html,
        "--seq-len",
        "32",
    ]
    .into_iter()
    .collect();
    for (args, out) in [
        (&train, &expert),
        (&compose, &model),
        (&baseline, &full),
        (&gates, &html),
    ] {
        let (ok, err) = mode(&home, args);
        assert!(ok, "mode {}: {err}", args.join(" "));
        let before = snapshot(Path::new(out));
        assert!(!before.is_empty());
        let (ok, err) = mode(&home, args);
        assert!(!ok, "a second `mode {}` replaced {out}", args[0]);
        assert!(
            err.contains(out.as_str()) && err.contains("--force"),
            "{err}"
        );
        assert_eq!(snapshot(Path::new(out)), before, "{out} changed");
        let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
        let (ok, err) = mode(&home, &forced);
        assert!(ok, "mode {} --force: {err}", args[0]);
    }

    // An output that is, lies inside or holds an input of the same run: refused even with
    // --force, every input left byte for byte as it was.
    let src = s("src");
    let with = |args: &[&str], out: &str| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let at = v
            .iter()
            .position(|a| a == "--out" || a == "--html")
            .unwrap();
        v[at + 1] = out.to_string();
        v.push("--force".into());
        v
    };
    let prepare = [
        "data",
        "prepare",
        "--backbone",
        &tiny,
        "--input",
        &src,
        "--out",
        "",
    ];
    let src_inner = s("src/prepared");
    let data_inner = s("data/expert.expert.safetensors");
    let expert_dir = s("");
    let tiny_inner = s("tiny/x.expert.safetensors");
    let data_lora = s("data/lora");
    let gates_onto_expert = with(
        &[
            "gates",
            "--backbone",
            &tiny,
            "--expert",
            &expert,
            "--data",
            &sample,
            "--html",
            "",
            "--seq-len",
            "32",
        ],
        &expert,
    );
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (with(&prepare, &src), vec![src.clone()]),
        (with(&prepare, &src_inner), vec![src.clone()]),
        (with(&train, &data_inner), vec![data.clone()]),
        (with(&train, &tiny_inner), vec![tiny.clone()]),
        (
            with(&compose, &expert_dir),
            vec![expert.clone(), data.clone()],
        ),
        (with(&compose, &expert), vec![expert.clone()]),
        (with(&baseline, &data), vec![data.clone()]),
        (
            with(
                &[
                    "baseline",
                    "lora",
                    "--backbone",
                    &tiny,
                    "--data",
                    &data,
                    "--out",
                    "",
                ],
                &data_lora,
            ),
            vec![data.clone()],
        ),
        (gates_onto_expert, vec![expert.clone()]),
        (with(&gates, &sample), vec![sample.clone()]),
    ];
    for (args, protected) in cases {
        let before: Vec<_> = protected.iter().map(|p| snapshot(Path::new(p))).collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = mode(&home, &argv);
        assert!(!ok, "`mode {}` ran onto its own input", argv.join(" "));
        assert!(err.contains("the input"), "mode {}: {err}", argv.join(" "));
        let after: Vec<_> = protected.iter().map(|p| snapshot(Path::new(p))).collect();
        assert!(
            after == before,
            "mode {} changed {protected:?}",
            argv.join(" ")
        );
        assert!(!Path::new(&src_inner).exists() && !Path::new(&data_lora).exists());
    }
}
