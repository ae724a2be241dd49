//! The continual study's outputs: a text table, `continual.json` and `report.html` with one
//! chart per track (accuracy on each domain and retention set after each addition).

use std::fmt::Write;
use std::path::Path;

use crate::continual::{sets, ContinualResults, Track};
use crate::method::Domain;
use crate::svg::{line_chart, Series};
use crate::{Error, Result};

/// Writes `continual.json` and `report.html` into `dir`.
pub fn write(dir: &Path, results: &ContinualResults) -> Result<()> {
    let put = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        mode_io::atomic::write_file(&path, bytes).map_err(|e| Error::Io { path, source: e })
    };
    put(
        "continual.json",
        &serde_json::to_vec_pretty(results).expect("results serialise"),
    )?;
    put("report.html", html(results).as_bytes())
}

/// Accuracy of `track` after `step` on `set`, or NaN where it was not scored.
fn accuracy(results: &ContinualResults, track: Track, step: usize, set: &str) -> f64 {
    results
        .at(track, step)
        .and_then(|s| s.result.sets.get(set))
        .map_or(f64::NAN, |s| s.accuracy)
}

/// `estimate ±half-width` of the 95% interval over windows of `track` after `step` on `set`.
fn cell(results: &ContinualResults, track: Track, step: usize, set: &str) -> String {
    let windows = results
        .at(track, step)
        .map(|s| s.result.windows(set, false))
        .unwrap_or_default();
    if windows.is_empty() {
        return "-".into();
    }
    let i = mode_eval::stats::accuracy_interval(&windows, 0x00c0_7a11);
    format!("{:.2} ±{:.2}", i.estimate, i.half_width())
}

/// Every track after every step: accuracy per set (with the half-width of its 95% interval
/// over windows) and the step's training cost, then forgetting and the goals.
pub fn text(results: &ContinualResults) -> String {
    let mut out = String::new();
    let names = sets();
    let _ = write!(out, "{:<20} {:<4}", "track", "step");
    for n in &names {
        let _ = write!(out, " {n:>13}");
    }
    let _ = writeln!(out, " {:>9} {:>8}", "tokens", "seconds");
    for track in Track::ALL {
        for step in 1..=Domain::SEQUENCE.len() {
            let Some(s) = results.at(track, step) else {
                continue;
            };
            let _ = write!(out, "{:<20} +{:<3}", track.name(), s.domain.name());
            for n in &names {
                let _ = write!(out, " {:>13}", cell(results, track, step, n));
            }
            let _ = writeln!(out, " {:>9} {:>8.0}", s.step_tokens, s.step_seconds);
        }
    }
    let _ = writeln!(
        out,
        "\nForgetting (best step minus last step, points, 95% interval):"
    );
    for f in &results.forgetting {
        let _ = writeln!(
            out,
            "  {:<20} {:<5} {:+.2} [{:+.2}, {:+.2}] (best after step {})",
            f.track.name(),
            f.domain.name(),
            f.drop.estimate,
            f.drop.lo,
            f.drop.hi,
            f.best_step
        );
    }
    let _ = writeln!(
        out,
        "\nGoals (mean drop of the earlier domains from when each was added):"
    );
    for g in &results.goals {
        let _ = writeln!(
            out,
            "  {}: {} ({:+.2} [{:+.2}, {:+.2}])",
            g.text,
            g.verdict.as_str(),
            g.drop.estimate,
            g.drop.lo,
            g.drop.hi
        );
    }
    out
}

/// The page: how the study ran, the table, one chart per track, forgetting and goals.
pub fn html(results: &ContinualResults) -> String {
    let mut h = String::new();
    h.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>MoDE continual study</title>\
         <style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}\
         td:first-child,th:first-child{text-align:left}</style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>Domains added one at a time</h1><p>Math, then Code, then C. Each addition trains {} \
         steps of {} tokens: fine-tuning and LoRA continue from the previous step; MoDE trains one \
         new expert and either adds it with its stage-1 gates (hot-add) or re-tunes the gates of \
         all experts, experts frozen. Replay tracks mix in the first {} training documents of each \
         earlier domain ({}% of each batch). MoDE's recipe: {}. After each addition every track \
         is scored on the test sets of all three domains and the retention sets.</p>",
        results.steps_per_domain,
        results.batch_tokens,
        crate::continual::REPLAY_DOCUMENTS,
        (crate::continual::REPLAY_SHARE * 100.0).round(),
        results.recipe.describe()
    );
    h.push_str("<h2>Accuracy (%) after each addition</h2><pre>");
    h.push_str(&text(results).replace('&', "&amp;").replace('<', "&lt;"));
    h.push_str("</pre><h2>Accuracy per domain, one panel per track</h2>");
    for track in Track::ALL {
        let series: Vec<Series> = sets()
            .into_iter()
            .map(|set| Series {
                name: set.to_string(),
                points: (1..=Domain::SEQUENCE.len())
                    .map(|step| (step as f64, accuracy(results, track, step, set)))
                    .filter(|(_, a)| a.is_finite())
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        h.push_str(&line_chart(
            &track.name(),
            "domains added (1 math, 2 +code, 3 +c)",
            "accuracy (%)",
            &series,
        ));
    }
    h.push_str("</body></html>\n");
    h
}
