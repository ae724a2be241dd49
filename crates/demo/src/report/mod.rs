//! The demo's outputs: the table in the terminal, `results.json` and `report.html`.

use std::fmt::Write;
use std::path::Path;

pub mod continual;
mod html;

use mode_eval::stats::Interval;

pub use html::html;

use crate::results::{Results, Row, CODE, ENGLISH, MATH, PROSE};
use crate::{Error, Result};

/// Writes `results.json` and `report.html` into `dir`.
pub fn write(dir: &Path, results: &Results) -> Result<()> {
    let put = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        mode_io::atomic::write_file(&path, bytes).map_err(|e| Error::Io { path, source: e })
    };
    put(
        "results.json",
        &serde_json::to_vec_pretty(results).expect("results serialise"),
    )?;
    put("report.html", html(results).as_bytes())
}

pub(crate) fn millions(n: usize) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{:.2}M", n as f64 / 1e6)
    }
}

/// A table column: its heading and the row's interval in it.
pub(crate) type Column = (&'static str, fn(&Row) -> Option<Interval>);

/// The columns of the table.
pub(crate) fn columns() -> Vec<Column> {
    vec![
        ("Math", |r| r.accuracy.get(MATH).copied()),
        ("Math ans.", |r| r.math_answer),
        ("Code", |r| r.accuracy.get(CODE).copied()),
        ("English", |r| r.accuracy.get(ENGLISH).copied()),
        ("Prose", |r| r.accuracy.get(PROSE).copied()),
        ("Avg", |r| r.average),
    ]
}

/// `estimate ±half-width` of an interval.
fn pm(i: Option<Interval>) -> String {
    i.map_or("-".into(), |i| {
        format!("{:.2} ±{:.2}", i.estimate, i.half_width())
    })
}

/// The paper's Table 1 for this run, as text: accuracy (%) with the half-width of its 95%
/// interval, pooled over seeds.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = write!(out, "{:<24}", "method");
    for (h, _) in columns() {
        let _ = write!(out, " {h:>13}");
    }
    let _ = writeln!(
        out,
        " {:>6} {:>9} {:>10} {:>9} {:>8}",
        "seeds", "added", "trainable", "tokens", "train s"
    );
    for r in &results.rows {
        let _ = write!(out, "{:<24}", r.name);
        for (_, cell) in columns() {
            let _ = write!(out, " {:>13}", pm(cell(r)));
        }
        let _ = writeln!(
            out,
            " {:>6} {:>9} {:>10} {:>9} {:>8.0}",
            r.seeds.len(),
            millions(r.added_parameters),
            millions(r.trainable_parameters),
            r.tokens,
            r.train_seconds
        );
    }
    out
}

/// The claims as text lines: verdict, the paired interval of the difference and the values.
pub fn claims_text(results: &Results) -> String {
    let mut out = String::new();
    if results.claims.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "The paper's findings at this budget (95% paired bootstrap interval of the difference over windows):"
    );
    for c in &results.claims {
        let d = c.difference;
        let _ = writeln!(
            out,
            "  {:<58} {:<13} difference {:+.2} [{:+.2}, {:+.2}] vs margin {:+.1} ({:.2} vs {:.2})",
            c.text,
            c.verdict.as_str(),
            d.estimate,
            d.lo,
            d.hi,
            c.margin,
            c.mode_value,
            c.other_value
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{Method, RunSpec};
    use crate::results::{RunResult, SetScore};
    use crate::select_lr::LrSelection;
    use crate::{Budget, Preset};
    use mode_eval::stats::Verdict;
    use mode_eval::{Totals, WindowScore};
    use std::collections::BTreeMap;

    const SETS: [&str; 4] = [MATH, CODE, ENGLISH, PROSE];

    /// A run whose accuracy on each set is `acc[set]` percent on every one of 16 windows of
    /// 100 predictions, plus `wobble` points alternating up and down from window to window.
    fn run(spec: RunSpec, acc: [f64; 4], wobble: f64) -> RunResult {
        let sets = SETS
            .iter()
            .zip(acc)
            .map(|(set, a)| {
                let windows: Vec<WindowScore> = (0..16)
                    .map(|i| {
                        let shift = if i % 2 == 0 { wobble } else { -wobble };
                        let t = Totals {
                            correct: (a + shift + (i % 5) as f64).round() as usize,
                            predictions: 100,
                            loss_sum: 150.0,
                        };
                        WindowScore {
                            all: t,
                            answer: Totals {
                                correct: t.correct / 4,
                                predictions: 25,
                                loss_sum: 0.0,
                            },
                        }
                    })
                    .collect();
                let acc =
                    mode_eval::stats::accuracy(&windows.iter().map(|w| w.all).collect::<Vec<_>>());
                (
                    set.to_string(),
                    SetScore {
                        accuracy: acc,
                        loss: 1.5,
                        windows,
                    },
                )
            })
            .collect();
        RunResult {
            spec,
            sets,
            curves: BTreeMap::from([("c".to_string(), vec![(1, 3.0), (2, 2.5)])]),
            ..Default::default()
        }
    }

    fn results(runs: Vec<RunResult>) -> Results {
        let b = Budget::preset(Preset::Default);
        let runs = runs.into_iter().map(|r| (r.spec.name(&b), r)).collect();
        Results::new(
            Preset::Default,
            b,
            "backbone.gguf".into(),
            runs,
            LrSelection::committed(),
        )
    }

    fn spec(method: Method) -> RunSpec {
        RunSpec::new(method, &Budget::preset(Preset::Default))
    }

    const COMPOSED: Method = Method::Composed {
        freeze_experts: false,
    };
    const LORA: Method = Method::Lora { rank: 16 };

    fn table_runs() -> Vec<RunResult> {
        vec![
            run(spec(Method::Backbone), [30.0, 40.0, 35.0, 45.0], 0.0),
            run(spec(Method::FullFt), [50.0, 60.0, 30.0, 40.0], 0.0),
            // LoRA: Math 6 points under MoDE; Code the same on average but wobbling.
            run(spec(LORA), [44.0, 58.0, 34.0, 44.0], 4.0),
            run(spec(COMPOSED), [50.0, 58.0, 34.5, 44.0], 0.0),
        ]
    }

    #[test]
    fn the_table_lists_rows_in_order_with_intervals() {
        let mut runs = table_runs();
        runs.push(run(spec(Method::Lora { rank: 4 }), [1.0; 4], 0.0));
        let r = results(runs);
        let t = table(&r);
        let lines: Vec<&str> = t.lines().collect();
        let names: Vec<&str> = lines[1..]
            .iter()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(
            names,
            ["backbone", "full_ft", "lora", "lora_r4", "mode_composed"]
        );
        assert!(lines[1].contains('±'), "{}", lines[1]);
        let full = r.row("full_ft").unwrap();
        let math = full.accuracy[MATH];
        assert!(math.lo <= math.estimate && math.estimate <= math.hi);
        let answers = full
            .math_answer
            .expect("answer windows give an answer column");
        assert!(
            (answers.estimate - math.estimate).abs() < 2.0,
            "{answers:?}"
        );
        assert!(t.contains(&format!("{:.2} ±", answers.estimate)), "{t}");
    }

    #[test]
    fn claims_are_read_from_paired_intervals() {
        let r = results(table_runs());
        let verdict = |text: &str| {
            r.claims
                .iter()
                .find(|c| c.text.contains(text))
                .unwrap_or_else(|| panic!("no claim {text}"))
                .verdict
        };
        // English: 34.5 vs 30 is well over the 1-point margin on every window.
        assert_eq!(verdict("English"), Verdict::Holds);
        // Prose: 44 vs 40 likewise; Math: 50 vs 44 over LoRA.
        assert_eq!(verdict("prose"), Verdict::Holds);
        assert_eq!(verdict("Math"), Verdict::Holds);
        // Code: the same mean as LoRA, window noise both ways.
        assert_eq!(verdict("Code"), Verdict::Inconclusive);
        // Average: (50+58+34.5)/3 = 47.5 against (50+60+30)/3 = 46.7, on every window: holds.
        assert_eq!(verdict("average"), Verdict::Holds);
        let text = claims_text(&r);
        assert!(
            text.contains("inconclusive") && text.contains("holds"),
            "{text}"
        );
        assert!(html(&r).contains("The paper's findings at this budget"));
    }

    #[test]
    fn a_retention_aware_row_gets_its_claims_against_the_backbone_and_full_ft() {
        let mut runs = table_runs();
        let recipe = crate::method::Recipe {
            general_percent: 10,
            preserve_start: true,
            ..crate::method::Recipe::PAPER
        };
        // Prose 44.9 against the backbone's 45: within 0.3 points on every window.
        let aware = spec(COMPOSED).with_recipe(recipe);
        runs.push(run(aware, [49.0, 59.0, 34.9, 44.9], 0.0));
        let r = results(runs);
        let names: Vec<&str> = r.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names.last(), Some(&"mode_composed_g10_pres"));
        let claim = |text: &str| r.claims.iter().find(|c| c.text == text).unwrap();
        let kept = claim("Retention-aware MoDE prose >= backbone prose - 0.3");
        assert_eq!(
            (kept.mode.as_str(), kept.other.as_str()),
            ("mode_composed_g10_pres", "backbone")
        );
        assert_eq!(kept.verdict, Verdict::Holds);
        // Math+Code 54 against full FT's 55 on every window: does not hold.
        let target = claim("Retention-aware MoDE Math+Code >= full fine-tuning Math+Code");
        assert_eq!(target.verdict, Verdict::DoesNotHold);
        assert_eq!(r.claims.len(), 5 + 3);
    }

    #[test]
    fn seeds_pool_into_one_row() {
        let b = Budget::preset(Preset::Default);
        let mut runs = table_runs();
        let mut second = run(
            spec(Method::FullFt).with_seed(1),
            [52.0, 60.0, 30.0, 40.0],
            0.0,
        );
        second.spec = spec(Method::FullFt).with_seed(1);
        runs.push(second);
        let r = results(runs);
        let full = r.row("full_ft").unwrap();
        assert_eq!(full.seeds, [b.seed, 1]);
        assert_eq!(full.seed_accuracy[MATH].len(), 2);
        let pooled = full.accuracy[MATH].estimate;
        let (a, c) = (full.seed_accuracy[MATH][0], full.seed_accuracy[MATH][1]);
        assert!((pooled - (a + c) / 2.0).abs() < 1e-9, "{pooled} {a} {c}");
        assert!(html(&r).contains("<h2>Seeds</h2>"));
    }

    #[test]
    fn the_report_is_self_contained_and_has_every_section() {
        let mut runs = table_runs();
        let mut composed = runs.pop().unwrap();
        composed.branches = vec!["backbone".into(), "math".into(), "code".into()];
        composed.gate_weights = BTreeMap::from([("math".to_string(), vec![vec![0.5, 0.3, 0.2]])]);
        runs.push(composed);
        let h = html(&results(runs));
        assert!(
            !h.contains("src=") && !h.contains("href="),
            "no external resources"
        );
        for part in [
            "Learning rates",
            "Accuracy (%)",
            "Retention",
            "Learning and forgetting",
            "Training curves",
            "Gate weights",
            "<svg",
        ] {
            assert!(h.contains(part), "missing {part}");
        }
        // Bars, retention scatter, trade-off, curves.
        assert_eq!(h.matches("<svg").count(), 4);
        assert!(h.contains("0.300"));
    }

    #[test]
    fn the_tradeoff_has_a_point_per_method_and_length() {
        let mut runs = table_runs();
        for m in [Method::FullFt, LORA, COMPOSED] {
            runs.push(run(spec(m).with_steps(256), [60.0, 65.0, 25.0, 35.0], 1.0));
        }
        let r = results(runs);
        assert_eq!(r.tradeoff.len(), 6);
        let long_ft = r
            .tradeoff
            .iter()
            .find(|p| p.method == Method::FullFt && p.steps == 256)
            .unwrap();
        // Targets (60+65)/2 - (30+40)/2 = 27.5 (plus rounding), retention (25+35)/2 - 40 = -10.
        assert!(
            (long_ft.target_gain.estimate - 27.5).abs() < 0.5,
            "{long_ft:?}"
        );
        assert!((long_ft.retention_change.estimate + 10.0).abs() < 0.5);
        assert!(long_ft.retention_change.hi < 0.0);
        assert!(html(&r).contains("2 training lengths"));
    }

    #[test]
    fn a_scaling_sweep_adds_its_charts_and_rows() {
        let mut runs = table_runs();
        assert!(!html(&results(runs.clone())).contains("Scaling"));
        for (i, spec) in crate::scaling_runs(&Budget::preset(Preset::Default))
            .into_iter()
            .enumerate()
        {
            let mut r = run(spec, [40.0 + i as f64; 4], 0.0);
            r.added_parameters = 1_000_000 * (i + 1);
            runs.push(r);
        }
        let mut r = results(runs);
        r.train_documents = BTreeMap::from([("math".into(), 900), ("code".into(), 700)]);
        let h = html(&r);
        assert!(h.contains("Scaling"));
        assert_eq!(h.matches("<svg").count(), 4 + 3);
        for row in ["rank 4", "rank 64", "4 layers/block", "32 docs", "700 docs"] {
            assert!(h.contains(row), "missing {row}");
        }
    }

    #[test]
    fn results_read_back_exactly() {
        let r = results(table_runs());
        let json = serde_json::to_string(&r).unwrap();
        let back: Results = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rows, r.rows);
        assert_eq!(back.claims, r.claims);
        assert_eq!(back.runs, r.runs);
    }
}
