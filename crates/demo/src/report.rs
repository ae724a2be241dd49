//! The demo's outputs: the table in the terminal, `results.json` and `report.html`.

use std::fmt::Write;
use std::path::Path;

use mode_eval::stats::Interval;

use crate::method::Method;
use crate::results::{Results, Row, CODE, ENGLISH, MATH, PROSE};
use crate::svg::{bar_chart, error_curves, line_chart, scatter, ErrorPoint, Series};
use crate::{Error, Result, SCALING_DOCUMENTS};

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

fn millions(n: usize) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{:.2}M", n as f64 / 1e6)
    }
}

/// A table column: its heading and the row's interval in it.
type Column = (&'static str, fn(&Row) -> Option<Interval>);

/// The columns of the table.
fn columns() -> Vec<Column> {
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

fn escape(s: &str) -> String {
    mode_eval::gates::escape(s)
}

/// A table cell: estimate, and the interval below it.
fn cell(i: Option<Interval>) -> String {
    i.map_or("<td>-</td>".into(), |i| {
        format!(
            "<td>{:.2}<br><small>{:.2} to {:.2}</small></td>",
            i.estimate, i.lo, i.hi
        )
    })
}

/// A self-contained HTML report: the learning rates and how they were chosen, the table with
/// intervals, the claims, charts of accuracy, retention against target accuracy and the
/// trade-off, training curves, gate weights, and the scaling sweep when there is one.
pub fn html(results: &Results) -> String {
    let mut h = String::new();
    h.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>MoDE demo report</title>\
         <style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}\
         td:first-child,th:first-child{text-align:left}small{color:#666}.gate td{text-align:center;color:#000}</style></head><body>",
    );
    let b = &results.budget;
    let _ = write!(
        h,
        "<h1>MoDE demo ({:?})</h1><p>Backbone <code>{}</code>. Each method trains {} steps of {} tokens \
         (composed MoDE: two experts of {} steps each, then {} steps of stage 2); \
         {} blocks x {} expert layers; LoRA rank {} on attention. Every method is scored on the same \
         {} windows of {} tokens per held-out set, spread over it; intervals are 95% percentile \
         bootstraps over windows (seeds pooled window by window). Math and Code are the targets; \
         English (Shakespeare) and prose (Wikipedia articles) measure retention; <i>Math ans.</i> \
         scores the answer tokens of the math items alone. This invocation took {:.0} s (runs \
         finished by an earlier invocation are reused, with their own times in the table).</p>",
        results.preset,
        escape(&results.backbone),
        b.steps,
        b.batch_tokens,
        b.expert_steps(b.steps),
        b.compose_steps,
        b.blocks,
        b.expert_layers_per_block,
        b.lora_rank,
        b.eval_windows,
        b.eval_seq_len,
        results.total_seconds
    );
    learning_rates(&mut h, results);
    h.push_str("<h2>Accuracy (%)</h2><table><tr><th>method</th>");
    for (head, _) in columns() {
        let _ = write!(h, "<th>{head}</th>");
    }
    h.push_str(
        "<th>seeds</th><th>added</th><th>trainable</th><th>tokens</th><th>train s</th></tr>",
    );
    for r in &results.rows {
        let _ = write!(h, "<tr><td>{}</td>", escape(&r.name));
        for (_, c) in columns() {
            h.push_str(&cell(c(r)));
        }
        let _ = write!(
            h,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td></tr>",
            r.seeds.len(),
            millions(r.added_parameters),
            millions(r.trainable_parameters),
            r.tokens,
            r.train_seconds
        );
    }
    h.push_str("</table>");
    seeds(&mut h, results);
    claims(&mut h, results);

    let shown: Vec<&Row> = results
        .rows
        .iter()
        .filter(|r| r.spec.steps == b.steps && r.spec.documents.is_none())
        .collect();
    h.push_str("<h2>Accuracy per set</h2>");
    let series: Vec<(&str, Vec<[f64; 3]>)> = shown
        .iter()
        .map(|r| {
            let v = [MATH, CODE, ENGLISH, PROSE]
                .iter()
                .map(|s| {
                    r.accuracy
                        .get(*s)
                        .map_or([f64::NAN; 3], |i| [i.estimate, i.lo, i.hi])
                })
                .collect();
            (r.name.as_str(), v)
        })
        .collect();
    h.push_str(&bar_chart(
        "Held-out next-token accuracy (95% intervals)",
        "accuracy (%)",
        &["Math", "Code", "English", "Prose"],
        &series,
    ));

    h.push_str("<h2>Retention against target accuracy</h2>");
    let mean = |r: &Row, sets: &[&str]| {
        sets.iter()
            .filter_map(|s| r.accuracy.get(*s).map(|i| i.estimate))
            .sum::<f64>()
            / sets.len() as f64
    };
    let points: Vec<(&str, f64, f64)> = shown
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                mean(r, &[MATH, CODE]),
                mean(r, &[ENGLISH, PROSE]),
            )
        })
        .collect();
    h.push_str(&scatter(
        "Retention (English, prose) vs target (Math, Code)",
        "target accuracy (%)",
        "retention accuracy (%)",
        &points,
    ));
    tradeoff(&mut h, results);

    h.push_str("<h2>Training curves</h2>");
    let mut curves: Vec<Series> = Vec::new();
    for run in results.runs.values().filter(|r| r.spec.seed == b.seed) {
        for (stage, points) in &run.curves {
            if points.is_empty() || curves.iter().any(|s| &s.name == stage) {
                continue;
            }
            curves.push(Series {
                name: stage.clone(),
                points: smooth(points),
            });
        }
    }
    h.push_str(&line_chart(
        "Training loss (moving average of 5 steps)",
        "step",
        "loss",
        &curves,
    ));
    gates(&mut h, results);
    scaling(&mut h, results);
    h.push_str("</body></html>\n");
    h
}

fn learning_rates(h: &mut String, results: &Results) {
    let sel = &results.lr_selection;
    h.push_str("<h2>Learning rates</h2>");
    if !sel.is_selected() {
        h.push_str(
            "<p>Not selected on validation data: run <code>mode demo --select-lr</code>.</p>",
        );
    } else {
        let _ = write!(
            h,
            "<p>Chosen per stage by <code>mode demo --select-lr</code>: each rate trained {} steps \
             of {} tokens, scored on {} windows spread over the validation splits of Math and Code \
             (an expert on its own domain); the lowest mean validation loss (nats/token) wins. No \
             test or retention data is used.</p>",
            sel.steps, sel.batch_tokens, sel.windows
        );
    }
    h.push_str("<table><tr><th>stage</th><th>chosen</th><th>validation loss per rate</th></tr>");
    for stage in crate::method::Stage::ALL {
        let chosen = sel.chosen.of(stage);
        let grid: Vec<String> = sel
            .grid_of(stage)
            .iter()
            .map(|(lr, loss)| match loss {
                Some(v) if *lr == chosen => format!("<b>{lr:e}: {v:.4}</b>"),
                Some(v) => format!("{lr:e}: {v:.4}"),
                None => format!("{lr:e}: diverged"),
            })
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{chosen:e}</td><td>{}</td></tr>",
            stage.name(),
            grid.join(", ")
        );
    }
    h.push_str("</table>");
}

fn seeds(h: &mut String, results: &Results) {
    let seeded: Vec<&Row> = results.rows.iter().filter(|r| r.seeds.len() > 1).collect();
    if seeded.is_empty() {
        return;
    }
    h.push_str("<h2>Seeds</h2><p>Accuracy of each seed (the table pools them).</p><table><tr><th>method</th><th>set</th><th>per seed</th></tr>");
    for r in seeded {
        for (set, accs) in &r.seed_accuracy {
            let v: Vec<String> = accs.iter().map(|a| format!("{a:.2}")).collect();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{set}</td><td>{}</td></tr>",
                escape(&r.name),
                v.join(", ")
            );
        }
    }
    h.push_str("</table>");
}

fn claims(h: &mut String, results: &Results) {
    if results.claims.is_empty() {
        return;
    }
    h.push_str(
        "<h2>The paper's findings at this budget</h2><p>Each claim is <i>MoDE - other &gt;= \
         margin</i> on the mean accuracy of the named sets. It holds when the whole 95% paired \
         bootstrap interval of the difference is at or above the margin, does not hold when the \
         whole interval is below it, and is inconclusive otherwise.</p><table><tr><th>finding</th>\
         <th>MoDE</th><th>other</th><th>difference (95%)</th><th>margin</th><th>verdict</th></tr>",
    );
    for c in &results.claims {
        let d = c.difference;
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:+.2} [{:+.2}, {:+.2}]</td><td>{:+.1}</td><td><b>{}</b></td></tr>",
            escape(&c.text),
            c.mode_value,
            c.other_value,
            d.estimate,
            d.lo,
            d.hi,
            c.margin,
            c.verdict.as_str()
        );
    }
    h.push_str("</table>");
}

/// The learning-forgetting trade-off: target gain against retention change, both against the
/// backbone, one curve per method over its training lengths.
fn tradeoff(h: &mut String, results: &Results) {
    let points = &results.tradeoff;
    let steps: std::collections::BTreeSet<usize> = points.iter().map(|p| p.steps).collect();
    if points.is_empty() {
        return;
    }
    h.push_str(
        "<h2>Learning and forgetting</h2><p>Gain on the targets (mean of Math and Code) against \
         the change on the retention sets (mean of English and prose), both in accuracy points \
         against the backbone on the same windows, with paired 95% intervals; each point is one \
         training length (steps).</p>",
    );
    let mut series: Vec<(&str, Vec<ErrorPoint>)> = Vec::new();
    for (name, pick) in [
        (
            "full FT",
            (|m: &Method| *m == Method::FullFt) as fn(&Method) -> bool,
        ),
        ("LoRA", |m| matches!(m, Method::Lora { .. })),
        ("MoDE composed", |m| matches!(m, Method::Composed { .. })),
    ] {
        let mut pts: Vec<&crate::results::TradeoffPoint> =
            points.iter().filter(|p| pick(&p.method)).collect();
        pts.sort_by_key(|p| p.steps);
        series.push((
            name,
            pts.iter()
                .map(|p| ErrorPoint {
                    label: p.steps.to_string(),
                    x: [p.target_gain.estimate, p.target_gain.lo, p.target_gain.hi],
                    y: [
                        p.retention_change.estimate,
                        p.retention_change.lo,
                        p.retention_change.hi,
                    ],
                })
                .collect(),
        ));
    }
    h.push_str(&error_curves(
        &format!(
            "Target gain vs retention change ({} training lengths)",
            steps.len()
        ),
        "target gain (points)",
        "retention change (points)",
        &series,
    ));
    h.push_str(
        "<table><tr><th>run</th><th>steps</th><th>target gain</th><th>retention change</th></tr>",
    );
    for p in points {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:+.2} [{:+.2}, {:+.2}]</td><td>{:+.2} [{:+.2}, {:+.2}]</td></tr>",
            escape(&p.row),
            p.steps,
            p.target_gain.estimate,
            p.target_gain.lo,
            p.target_gain.hi,
            p.retention_change.estimate,
            p.retention_change.lo,
            p.retention_change.hi
        );
    }
    h.push_str("</table>");
}

fn gates(h: &mut String, results: &Results) {
    h.push_str("<h2>Gate weights per block and held-out set</h2>");
    for (name, r) in results
        .runs
        .iter()
        .filter(|(_, r)| r.spec.seed == results.budget.seed)
    {
        if r.gate_weights.is_empty() {
            continue;
        }
        let _ = write!(
            h,
            "<h3>{}</h3><table class=\"gate\"><tr><th>set</th><th>block</th>",
            escape(name)
        );
        for branch in &r.branches {
            let _ = write!(h, "<th>{}</th>", escape(branch));
        }
        h.push_str("</tr>");
        for (set, blocks) in &r.gate_weights {
            for (i, weights) in blocks.iter().enumerate() {
                let _ = write!(h, "<tr><td>{}</td><td>{i}</td>", escape(set));
                for w in weights {
                    // Deeper blue for a larger share of the mix.
                    let light = 100.0 - 55.0 * w.clamp(0.0, 1.0);
                    let _ = write!(
                        h,
                        "<td style=\"background:hsl(210,70%,{light:.0}%)\">{w:.3}</td>"
                    );
                }
                h.push_str("</tr>");
            }
        }
        h.push_str("</table>");
    }
}

/// The scaling sweep (Figure 3 of the paper), when the run has one: target accuracy and
/// retention against added parameters (LoRA ranks against expert layers per block), and
/// target accuracy against training documents per domain at equal steps.
fn scaling(h: &mut String, results: &Results) {
    let b = &results.budget;
    let at_budget = |r: &&Row| r.spec.steps == b.steps && r.spec.lr.is_none();
    let mut lora_sizes: Vec<(usize, &Row)> = Vec::new();
    let mut mode_sizes: Vec<(usize, &Row)> = Vec::new();
    let mut lora_docs: Vec<(usize, &Row)> = Vec::new();
    let mut mode_docs: Vec<(usize, &Row)> = Vec::new();
    let all_docs = results.train_documents.values().copied().min().unwrap_or(0);
    for r in results.rows.iter().filter(at_budget) {
        match (r.spec.method, r.spec.documents) {
            (Method::Lora { rank }, None) => lora_sizes.push((rank, r)),
            (Method::FreshMix { layers }, None) => mode_sizes.push((layers, r)),
            _ => {}
        }
        match r.spec.method {
            Method::Lora { rank } if rank == b.lora_rank => {
                lora_docs.push((r.spec.documents.unwrap_or(all_docs), r))
            }
            Method::FreshMix { layers } if layers == b.expert_layers_per_block => {
                mode_docs.push((r.spec.documents.unwrap_or(all_docs), r))
            }
            _ => {}
        }
    }
    if lora_docs.len() < 2 && mode_docs.len() < 2 && lora_sizes.len() < 2 {
        return;
    }
    for v in [
        &mut lora_sizes,
        &mut mode_sizes,
        &mut lora_docs,
        &mut mode_docs,
    ] {
        v.sort_by_key(|(x, _)| *x);
    }
    let _ = write!(
        h,
        "<h2>Scaling</h2><p>All on the Math+Code mix at the same steps. LoRA at several \
        ranks against one fresh MoDE expert at several layers per block; then both trained on only \
        the first {SCALING_DOCUMENTS:?} documents of each domain (the last point: all of them).</p>"
    );
    let acc = |r: &Row, s: &str| r.accuracy.get(s).map_or(f64::NAN, |i| i.estimate);
    let target = |r: &Row| (acc(r, MATH) + acc(r, CODE)) / 2.0;
    let retention = |r: &Row| (acc(r, ENGLISH) + acc(r, PROSE)) / 2.0;
    let by_params = |runs: &[(usize, &Row)], f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64)> {
        runs.iter()
            .map(|(_, r)| ((r.added_parameters.max(1) as f64).log10(), f(r)))
            .collect()
    };
    let series = |name: &str, points| Series {
        name: name.to_string(),
        points,
    };
    h.push_str(&line_chart(
        "Target accuracy (Math, Code) vs added parameters",
        "added parameters (log10)",
        "target accuracy (%)",
        &[
            series("LoRA (rank)", by_params(&lora_sizes, &target)),
            series("MoDE (layers/block)", by_params(&mode_sizes, &target)),
        ],
    ));
    h.push_str(&line_chart(
        "Retention (English, prose) vs added parameters",
        "added parameters (log10)",
        "retention accuracy (%)",
        &[
            series("LoRA (rank)", by_params(&lora_sizes, &retention)),
            series("MoDE (layers/block)", by_params(&mode_sizes, &retention)),
        ],
    ));
    let by_docs = |runs: &[(usize, &Row)]| -> Vec<(f64, f64)> {
        runs.iter()
            .map(|(d, r)| (((*d).max(1) as f64).log10(), target(r)))
            .collect()
    };
    h.push_str(&line_chart(
        "Target accuracy vs documents per domain",
        "documents per domain (log10)",
        "target accuracy (%)",
        &[
            series("LoRA", by_docs(&lora_docs)),
            series("MoDE", by_docs(&mode_docs)),
        ],
    ));
    h.push_str("<table><tr><th>run</th><th>setting</th><th>added</th><th>Math</th><th>Code</th><th>English</th><th>Prose</th></tr>");
    let rows = lora_sizes
        .iter()
        .map(|(x, r)| (*r, format!("rank {x}")))
        .chain(
            mode_sizes
                .iter()
                .map(|(x, r)| (*r, format!("{x} layers/block"))),
        )
        .chain(
            lora_docs
                .iter()
                .chain(&mode_docs)
                .map(|(d, r)| (*r, format!("{d} docs"))),
        );
    for (r, what) in rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{what}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            escape(&r.name),
            millions(r.added_parameters),
            acc(r, MATH),
            acc(r, CODE),
            acc(r, ENGLISH),
            acc(r, PROSE)
        );
    }
    h.push_str("</table>");
}

/// Moving average over 5 steps, to make short noisy curves readable.
fn smooth(points: &[(usize, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(4);
            let window = &points[lo..=i];
            let mean = window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64;
            (x as f64, mean)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::RunSpec;
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
