//! `report.html`: a self-contained page (inline SVG charts, no external resources).

use std::fmt::Write;

use mode_eval::stats::Interval;

use super::{columns, millions};
use crate::method::{Method, Recipe};
use crate::results::{Results, Row, CODE, ENGLISH, MATH, PROSE};
use crate::svg::{bar_chart, error_curves, line_chart, scatter, ErrorPoint, Series};
use crate::SCALING_DOCUMENTS;

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
    recipes(&mut h, results);
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
            "<p>Chosen per stage by <code>mode demo --select-lr</code> on <code>{}</code>: each \
             rate trained {} steps of {} tokens, scored on {} windows spread over the validation \
             splits of Math and Code (an expert on its own domain); the lowest mean validation \
             loss (nats/token) wins. No test or retention data is used.</p>",
            escape(&sel.backbone),
            sel.steps,
            sel.batch_tokens,
            sel.windows
        );
    }
    if let Some(note) = sel.other_backbone_note(&results.backbone) {
        let _ = write!(h, "<p><b>Note:</b> {}.</p>", escape(&note));
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

fn recipes(h: &mut String, results: &Results) {
    let sel = &results.recipe_selection;
    h.push_str("<h2>Retention-aware recipe</h2>");
    if !sel.is_selected() {
        h.push_str(
            "<p>Not selected on validation data: run <code>mode demo --select-recipe</code>.</p>",
        );
        return;
    }
    let _ = write!(
        h,
        "<p>Chosen by <code>mode demo --select-recipe</code>: composed MoDE trained {} steps of          {} tokens under each recipe, scored on {} windows spread over the validation splits of          Math, Code and prose. Among the recipes within {} points of the backbone's validation          prose accuracy ({:.2}%), the best Math+Code average wins. No test data is used.</p>",
        sel.steps,
        sel.batch_tokens,
        sel.windows,
        crate::select_recipe::RETENTION_MARGIN,
        sel.backbone_prose
    );
    if let Some(note) = sel.other_backbone_note(&results.backbone) {
        let _ = write!(h, "<p><b>Note:</b> {}.</p>", escape(&note));
    }
    h.push_str(
        "<table><tr><th>recipe</th><th>Math</th><th>Code</th><th>prose</th><th>prose vs backbone</th></tr>",
    );
    for s in &sel.scores {
        let name = escape(&s.recipe.describe());
        let name = if s.recipe == sel.chosen {
            format!("<b>{name} (chosen)</b>")
        } else {
            name
        };
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:+.2}</td></tr>",
            s.math,
            s.code,
            s.prose,
            s.prose - sel.backbone_prose
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

/// The name of a trade-off curve: the method, and what its recipe adds to the paper's.
fn tradeoff_series(method: &Method, recipe: &Recipe) -> String {
    let base = match method {
        Method::FullFt => "full FT",
        Method::Lora { .. } => "LoRA",
        _ => "MoDE composed",
    };
    match (recipe.is_paper(), method) {
        (true, _) => base.to_string(),
        (false, Method::Composed { .. }) => format!("{base}, retention-aware"),
        (false, _) => format!("{base} + {}% replay", recipe.general_percent),
    }
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
    // One curve per method and recipe, in the order the points come, each over its lengths.
    let mut series: Vec<(String, Vec<ErrorPoint>)> = Vec::new();
    let mut sorted: Vec<&crate::results::TradeoffPoint> = points.iter().collect();
    sorted.sort_by_key(|p| p.steps);
    for p in sorted {
        let name = tradeoff_series(&p.method, &p.recipe);
        let point = ErrorPoint {
            label: p.steps.to_string(),
            x: [p.target_gain.estimate, p.target_gain.lo, p.target_gain.hi],
            y: [
                p.retention_change.estimate,
                p.retention_change.lo,
                p.retention_change.hi,
            ],
        };
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push(point),
            None => series.push((name, vec![point])),
        }
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
