//! The whole demo on the real default backbone with a tiny budget and small stand-in corpora
//! (the real ones come from `scripts/fetch_demo_data.sh`, which `make demo` runs): every method
//! trains, is evaluated and lands in `results.json` and `report.html`; a second run reuses the
//! saved results; another budget in the same folder is refused.

use std::path::Path;

use mode_demo::{Budget, DemoOptions, Preset, Reporter, METHODS};
use mode_train::trainer::Event;

struct Quiet(Vec<String>);

impl Reporter for Quiet {
    fn stage(&mut self, what: &str) {
        self.0.push(what.to_string());
    }
    fn train(&mut self, _: Event) -> bool {
        true
    }
}

fn corpora(root: &Path) {
    let math = root.join("math");
    std::fs::create_dir_all(&math).unwrap();
    let qa = |i: usize| {
        format!(
            "{{\"text\": \"Question: What is {i} + {}?\\nAnswer: {}\"}}",
            i * 3,
            i * 4
        )
    };
    let train: Vec<String> = (0..400).map(qa).collect();
    std::fs::write(math.join("train.jsonl"), train.join("\n")).unwrap();
    let test: Vec<String> = (400..440).map(qa).collect();
    std::fs::write(math.join("test.jsonl"), test.join("\n")).unwrap();
    let code = root.join("code").join("pkg");
    std::fs::create_dir_all(&code).unwrap();
    for i in 0..40 {
        std::fs::write(
            code.join(format!("m{i}.py")),
            format!("def scale_{i}(values):\n    return [v * {i} for v in values]\n\n").repeat(4),
        )
        .unwrap();
    }
    let english = root.join("english");
    std::fs::create_dir_all(&english).unwrap();
    for i in 0..4 {
        std::fs::write(
            english.join(format!("play{i}_gut.txt")),
            "The king rode out at dawn, and all the court went with him to the sea.\n".repeat(30),
        )
        .unwrap();
    }
}

#[test]
fn a_tiny_demo_runs_every_method_and_writes_the_report() {
    if !mode_io::fetch::default_backbone_path().exists()
        && std::env::var("MODE_REQUIRE_BACKBONE").is_err()
    {
        eprintln!("skipped: default backbone not cached");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("corpora");
    corpora(&data);
    let budget = Budget {
        steps: 2,
        compose_steps: 1,
        batch_tokens: 64,
        seq_len: 64,
        expert_layers_per_block: 1,
        eval_windows: 1,
        eval_seq_len: 64,
        lora_sweep: vec![4],
        ..Budget::preset(Preset::Quick)
    };
    let out = tmp.path().join("demo");
    let opts = DemoOptions {
        out: out.clone(),
        preset: Preset::Quick,
        budget: budget.clone(),
        backbone: mode_io::fetch::DEFAULT_BACKBONE.into(),
        data_dir: Some(data),
        restart: false,
        scaling: false,
    };
    let results = mode_demo::run(&opts, &mut Quiet(Vec::new())).unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for name in METHODS.iter().copied().chain(["lora_r4"]) {
        let m = &json["methods"][name];
        for field in ["math", "code", "english", "average"] {
            let v = m[field].as_f64().unwrap_or(f64::NAN);
            assert!((0.0..=100.0).contains(&v), "{name}.{field} = {v}");
        }
    }
    let composed = &results.methods["mode_composed"];
    assert_eq!(composed.branches, ["backbone", "math", "code"]);
    assert_eq!(composed.gate_weights["code"].len(), budget.blocks);
    assert_eq!(
        composed.tokens,
        2 * budget.expert_steps() * budget.batch_tokens
            + budget.compose_steps * budget.batch_tokens
    );
    assert!(results.methods["full_ft"].trainable_parameters > 100_000_000);
    assert_eq!(results.methods["backbone"].tokens, 0);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("mode_fresh_mix") && html.contains("<svg"));

    // A second run reuses every saved result.
    let mut again = Quiet(Vec::new());
    let second = mode_demo::run(&opts, &mut again).unwrap();
    assert_eq!(second.methods, results.methods);
    assert!(
        again.0.iter().all(|s| !s.starts_with("training")),
        "{:?}",
        again.0
    );

    // The scaling sweep adds its runs and reuses the table's.
    let scaling = DemoOptions {
        scaling: true,
        ..opts.clone()
    };
    let mut log = Quiet(Vec::new());
    let swept = mode_demo::run(&scaling, &mut log).unwrap();
    let extra = mode_demo::scaling_methods(&budget);
    assert!(extra.contains(&"mode_fresh_mix_l4".to_string()));
    for name in &extra {
        assert!(swept.methods.contains_key(name), "{name}");
    }
    assert_eq!(swept.methods["lora"], results.methods["lora"]);
    assert!(
        log.0.iter().all(|s| !s.starts_with("training lora ")),
        "{:?}",
        log.0
    );
    let wide = &swept.methods["mode_fresh_mix_l4"];
    assert!(wide.added_parameters > 3 * results.methods["mode_fresh_mix"].added_parameters);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Scaling"), "the report shows the sweep");

    // Another budget in the same folder: refused unless told to restart.
    let other = DemoOptions {
        budget: Budget { steps: 3, ..budget },
        ..opts
    };
    let e = mode_demo::run(&other, &mut Quiet(Vec::new()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--restart"), "{e}");
}
