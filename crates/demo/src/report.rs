//! The demo's outputs: the table in the terminal, `results.json` and `report.html`.

use std::fmt::Write;
use std::path::Path;

use crate::svg::{bar_chart, line_chart, scatter, Series};
use crate::{numbered, Error, Result, Results, METHODS};

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

/// Method names in table order: the fixed ones, then any extra (a LoRA sweep).
fn ordered(results: &Results) -> Vec<&str> {
    let mut names: Vec<&str> = METHODS
        .iter()
        .copied()
        .filter(|m| results.methods.contains_key(*m))
        .collect();
    names.extend(
        results
            .methods
            .keys()
            .map(String::as_str)
            .filter(|k| !METHODS.contains(k)),
    );
    names
}

fn millions(n: usize) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{:.2}M", n as f64 / 1e6)
    }
}

/// The paper's Table 1 for this run, as text.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>7} {:>7} {:>8} {:>7} {:>10} {:>10} {:>9} {:>8}",
        "method", "Math", "Code", "English", "Avg", "added", "trainable", "tokens", "train s"
    );
    for name in ordered(results) {
        let r = &results.methods[name];
        let _ = writeln!(
            out,
            "{:<22} {:>7.2} {:>7.2} {:>8.2} {:>7.2} {:>10} {:>10} {:>9} {:>8.0}",
            name,
            r.math,
            r.code,
            r.english,
            r.average,
            millions(r.added_parameters),
            millions(r.trainable_parameters),
            r.tokens,
            r.train_seconds
        );
    }
    out
}

/// One of the paper's findings, checked on this run's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The finding, in words.
    pub text: &'static str,
    /// The two numbers compared (MoDE's side first).
    pub mode: f64,
    pub other: f64,
    /// The margin MoDE's side needs over the other's.
    pub margin: f64,
    pub holds: bool,
}

/// The paper's headline findings (Table 1) checked on this run: MoDE composed at least as good
/// as full fine-tuning on average, retaining English at least 1 point better, and at least as
/// good as LoRA on each target domain. Empty when a method they compare is missing.
pub fn claims(results: &Results) -> Vec<Claim> {
    let m = &results.methods;
    let (Some(mode), Some(full), Some(lora)) =
        (m.get("mode_composed"), m.get("full_ft"), m.get("lora"))
    else {
        return Vec::new();
    };
    let claim = |text, mode: f64, other: f64, margin: f64| Claim {
        text,
        mode,
        other,
        margin,
        holds: mode >= other + margin,
    };
    vec![
        claim(
            "MoDE composed average >= full fine-tuning average",
            mode.average,
            full.average,
            0.0,
        ),
        claim(
            "MoDE composed English >= full fine-tuning English + 1.0",
            mode.english,
            full.english,
            1.0,
        ),
        claim("MoDE composed Math >= LoRA Math", mode.math, lora.math, 0.0),
        claim("MoDE composed Code >= LoRA Code", mode.code, lora.code, 0.0),
    ]
}

/// [`claims`] as text lines: `holds` or `does not hold`, with the numbers.
pub fn claims_text(results: &Results) -> String {
    let mut out = String::new();
    let list = claims(results);
    if list.is_empty() {
        return out;
    }
    let _ = writeln!(out, "The paper's findings at this budget:");
    for c in list {
        let verdict = if c.holds { "holds" } else { "does not hold" };
        let _ = writeln!(
            out,
            "  {:<58} {verdict:<13} ({:.2} vs {:.2})",
            c.text, c.mode, c.other
        );
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained HTML report: table, training curves, accuracy per domain, retention
/// against target accuracy, gate weights per block and domain.
pub fn html(results: &Results) -> String {
    let names = ordered(results);
    let mut h = String::new();
    h.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>MoDE demo report</title>\
         <style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}\
         td:first-child,th:first-child{text-align:left}.gate td{text-align:center;color:#000}</style></head><body>",
    );
    let b = &results.budget;
    let _ = write!(
        h,
        "<h1>MoDE demo ({:?})</h1><p>Backbone <code>{}</code>. Each method trains {} steps of {} tokens \
         (composed MoDE: two experts of {} steps each, then {} steps of stage 2); \
         {} blocks x {} expert layers; LoRA rank {} on attention. Held-out next-token accuracy over \
         {} windows of {} tokens per set. This invocation took {:.0} s (methods finished by an earlier, \
         interrupted invocation are reused, and their times are in the table).</p>",
        results.preset,
        escape(&results.backbone),
        b.steps,
        b.batch_tokens,
        b.expert_steps(),
        b.compose_steps,
        b.blocks,
        b.expert_layers_per_block,
        b.lora_rank,
        b.eval_windows,
        b.eval_seq_len,
        results.total_seconds
    );
    h.push_str("<h2>Accuracy (%)</h2><table><tr><th>method</th><th>Math</th><th>Code</th><th>English</th><th>Avg</th><th>added</th><th>trainable</th><th>tokens</th><th>train s</th></tr>");
    for name in &names {
        let r = &results.methods[*name];
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td><b>{:.2}</b></td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td></tr>",
            r.math,
            r.code,
            r.english,
            r.average,
            millions(r.added_parameters),
            millions(r.trainable_parameters),
            r.tokens,
            r.train_seconds
        );
    }
    h.push_str("</table>");
    let list = claims(results);
    if !list.is_empty() {
        h.push_str("<h2>The paper's findings at this budget</h2><table><tr><th>finding</th><th>MoDE</th><th>other</th><th>verdict</th></tr>");
        for c in list {
            let verdict = if c.holds { "holds" } else { "does not hold" };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{verdict}</td></tr>",
                escape(c.text),
                c.mode,
                c.other
            );
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Accuracy per domain</h2>");
    let series: Vec<(&str, Vec<f64>)> = names
        .iter()
        .map(|n| {
            let r = &results.methods[*n];
            (*n, vec![r.math, r.code, r.english, r.average])
        })
        .collect();
    h.push_str(&bar_chart(
        "Held-out next-token accuracy",
        "accuracy (%)",
        &["Math", "Code", "English", "Average"],
        &series,
    ));

    h.push_str("<h2>Retention against target accuracy</h2>");
    let points: Vec<(&str, f64, f64)> = names
        .iter()
        .map(|n| {
            let r = &results.methods[*n];
            (*n, (r.math + r.code) / 2.0, r.english)
        })
        .collect();
    h.push_str(&scatter(
        "English (retention) vs mean of Math and Code",
        "target accuracy (%)",
        "English accuracy (%)",
        &points,
    ));

    h.push_str("<h2>Training curves</h2>");
    let mut curves: Vec<Series> = Vec::new();
    for name in &names {
        for (stage, points) in &results.methods[*name].curves {
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

    h.push_str("<h2>Gate weights per block and held-out set</h2>");
    for name in &names {
        let r = &results.methods[*name];
        if r.gate_weights.is_empty() {
            continue;
        }
        let _ = write!(
            h,
            "<h3>{name}</h3><table class=\"gate\"><tr><th>set</th><th>block</th>"
        );
        for branch in &r.branches {
            let _ = write!(h, "<th>{}</th>", escape(branch));
        }
        h.push_str("</tr>");
        for (set, blocks) in &r.gate_weights {
            for (i, weights) in blocks.iter().enumerate() {
                let _ = write!(h, "<tr><td>{set}</td><td>{i}</td>");
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
    scaling(&mut h, results);
    h.push_str("</body></html>\n");
    h
}

/// The scaling sweep (Figure 3 of the paper), when the run has one: target accuracy and
/// retention against added parameters (LoRA ranks against expert layers per block), and
/// target accuracy against training documents per domain at equal steps.
fn scaling(h: &mut String, results: &Results) {
    let b = &results.budget;
    let m = &results.methods;
    let rank = |name: &str| match name {
        "lora" => Some(b.lora_rank),
        n => numbered(n, "lora_r"),
    };
    let layers = |name: &str| match name {
        "mode_fresh_mix" => Some(b.expert_layers_per_block),
        n => numbered(n, "mode_fresh_mix_l"),
    };
    let docs = |name: &str, prefix: &str, all: &str| -> Option<usize> {
        if name == all {
            return results.train_documents.values().copied().min();
        }
        numbered(name, prefix)
    };
    let target = |r: &crate::MethodResult| (r.math + r.code) / 2.0;
    // (label, x, method) sorted by x, for the methods the run has.
    let pick = |f: &dyn Fn(&str) -> Option<usize>| -> Vec<(usize, &str)> {
        let mut v: Vec<(usize, &str)> = m
            .keys()
            .filter_map(|k| f(k).map(|x| (x, k.as_str())))
            .collect();
        v.sort();
        v
    };
    let lora_sizes = pick(&rank);
    let mode_sizes = pick(&layers);
    let lora_docs = pick(&|n| docs(n, "lora_n", "lora"));
    let mode_docs = pick(&|n| docs(n, "mode_fresh_mix_n", "mode_fresh_mix"));
    if lora_sizes.len() < 2 && mode_sizes.len() < 2 && lora_docs.len() < 2 {
        return;
    }
    h.push_str(
        "<h2>Scaling</h2><p>All on the Math+Code mix at the same steps. LoRA at several \
        ranks against one fresh MoDE expert at several layers per block; then both trained on only \
        the first documents of each domain (the last point: all of them).</p>",
    );
    let log_params = |runs: &[(usize, &str)]| -> Vec<(f64, f64, f64)> {
        runs.iter()
            .map(|(_, n)| {
                let r = &m[*n];
                (
                    (r.added_parameters.max(1) as f64).log10(),
                    target(r),
                    r.english,
                )
            })
            .collect()
    };
    let (lora_p, mode_p) = (log_params(&lora_sizes), log_params(&mode_sizes));
    let series = |name: &str, pts: &[(f64, f64, f64)], english: bool| Series {
        name: name.to_string(),
        points: pts
            .iter()
            .map(|p| (p.0, if english { p.2 } else { p.1 }))
            .collect(),
    };
    h.push_str(&line_chart(
        "Target accuracy (Math, Code) vs added parameters",
        "added parameters (log10)",
        "target accuracy (%)",
        &[
            series("LoRA (rank)", &lora_p, false),
            series("MoDE (layers/block)", &mode_p, false),
        ],
    ));
    h.push_str(&line_chart(
        "English (retention) vs added parameters",
        "added parameters (log10)",
        "English accuracy (%)",
        &[
            series("LoRA (rank)", &lora_p, true),
            series("MoDE (layers/block)", &mode_p, true),
        ],
    ));
    let log_docs = |runs: &[(usize, &str)]| Series {
        name: String::new(),
        points: runs
            .iter()
            .map(|(d, n)| ((*d as f64).log10(), target(&m[*n])))
            .collect(),
    };
    h.push_str(&line_chart(
        "Target accuracy vs documents per domain",
        "documents per domain (log10)",
        "target accuracy (%)",
        &[
            Series {
                name: "LoRA".into(),
                ..log_docs(&lora_docs)
            },
            Series {
                name: "MoDE".into(),
                ..log_docs(&mode_docs)
            },
        ],
    ));
    h.push_str("<table><tr><th>run</th><th>setting</th><th>added</th><th>Math</th><th>Code</th><th>English</th></tr>");
    let rows = lora_sizes
        .iter()
        .map(|(x, n)| (*n, format!("rank {x}")))
        .chain(
            mode_sizes
                .iter()
                .map(|(x, n)| (*n, format!("{x} layers/block"))),
        )
        .chain(
            lora_docs
                .iter()
                .chain(&mode_docs)
                .map(|(d, n)| (*n, format!("{d} docs"))),
        );
    for (name, what) in rows {
        let r = &m[name];
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{what}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            millions(r.added_parameters),
            r.math,
            r.code,
            r.english
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
    use crate::{Budget, MethodResult, Preset};
    use std::collections::BTreeMap;

    fn results() -> Results {
        let mut methods = BTreeMap::new();
        for (i, name) in ["backbone", "mode_composed", "lora_r4"].iter().enumerate() {
            let mut r = MethodResult {
                math: 10.0 + i as f64,
                code: 20.0,
                english: 30.0,
                average: 20.0,
                curves: BTreeMap::from([(name.to_string(), vec![(1, 3.0), (2, 2.5)])]),
                ..Default::default()
            };
            if *name == "mode_composed" {
                r.branches = vec!["backbone".into(), "math".into(), "code".into()];
                r.gate_weights = BTreeMap::from([("math".to_string(), vec![vec![0.5, 0.3, 0.2]])]);
            }
            methods.insert(name.to_string(), r);
        }
        Results {
            preset: Preset::Quick,
            budget: Budget::preset(Preset::Quick),
            backbone: "b".into(),
            methods,
            total_seconds: 1.0,
            train_documents: BTreeMap::new(),
        }
    }

    #[test]
    fn the_table_lists_methods_in_order_with_extras_last() {
        let t = table(&results());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("backbone") && lines[1].contains("10.00"));
        assert!(lines[2].starts_with("mode_composed"));
        assert!(lines[3].starts_with("lora_r4"));
    }

    #[test]
    fn the_papers_findings_are_checked_with_their_margins() {
        let mut r = results();
        assert!(
            claims(&r).is_empty(),
            "no full_ft or lora: nothing to compare"
        );
        let with = |math, code, english, average| MethodResult {
            math,
            code,
            english,
            average,
            ..Default::default()
        };
        r.methods
            .insert("mode_composed".into(), with(50.0, 58.0, 36.0, 48.0));
        r.methods
            .insert("full_ft".into(), with(53.0, 61.0, 35.2, 49.7));
        r.methods
            .insert("lora".into(), with(49.5, 58.0, 34.8, 47.4));
        let c = claims(&r);
        let holds: Vec<bool> = c.iter().map(|c| c.holds).collect();
        // Average 48.0 < 49.7; English 36.0 < 35.2 + 1.0; Math 50.0 >= 49.5; Code 58.0 >= 58.0.
        assert_eq!(holds, [false, false, true, true]);
        assert_eq!((c[1].mode, c[1].other, c[1].margin), (36.0, 35.2, 1.0));
        let text = claims_text(&r);
        assert!(text.contains("does not hold (48.00 vs 49.70)"), "{text}");
        assert!(html(&r).contains("The paper's findings at this budget"));
    }

    #[test]
    fn the_report_is_self_contained_and_has_every_section() {
        let h = html(&results());
        assert!(
            !h.contains("src=") && !h.contains("href="),
            "no external resources"
        );
        for part in [
            "Accuracy (%)",
            "Retention",
            "Training curves",
            "Gate weights",
            "<svg",
        ] {
            assert!(h.contains(part), "missing {part}");
        }
        assert_eq!(h.matches("<svg").count(), 3);
        assert!(h.contains("0.300"));
    }

    #[test]
    fn a_scaling_sweep_adds_its_charts_and_rows() {
        let mut r = results();
        assert!(!html(&r).contains("Scaling"), "no sweep, no section");
        for (i, name) in [
            "lora",
            "lora_r64",
            "mode_fresh_mix",
            "mode_fresh_mix_l4",
            "lora_n32",
            "mode_fresh_mix_n32",
        ]
        .iter()
        .enumerate()
        {
            r.methods.insert(
                name.to_string(),
                MethodResult {
                    math: 40.0 + i as f64,
                    added_parameters: 1_000_000 * (i + 1),
                    ..Default::default()
                },
            );
        }
        r.train_documents = BTreeMap::from([("math".into(), 900), ("code".into(), 700)]);
        let h = html(&r);
        assert!(h.contains("Scaling"));
        assert_eq!(h.matches("<svg").count(), 6);
        for row in ["rank 4", "rank 64", "4 layers/block", "32 docs", "700 docs"] {
            assert!(h.contains(row), "missing {row}");
        }
    }
}
