//! Small self-contained SVG charts for the report: line charts, grouped bars, labelled
//! scatter. Text is left to the browser, so no font handling is needed.

use std::fmt::Write;

use mode_eval::gates::escape;

const W: f64 = 640.0;
const H: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// Colours of series, in order (colour-blind friendly).
pub const PALETTE: [&str; 8] = [
    "#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000",
];

/// One named series of points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A linear axis over `[lo, hi]` with "nice" ticks.
struct Axis {
    lo: f64,
    hi: f64,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, include_zero: bool) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if include_zero {
            lo = lo.min(0.0);
        }
        if hi - lo < 1e-9 {
            hi = lo + 1.0;
        }
        let pad = (hi - lo) * 0.05;
        Self {
            lo: if include_zero && lo >= 0.0 {
                lo
            } else {
                lo - pad
            },
            hi: hi + pad,
        }
    }

    fn ticks(&self) -> Vec<f64> {
        let raw = (self.hi - self.lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let mut t = (self.lo / step).ceil() * step;
        let mut out = Vec::new();
        while t <= self.hi + 1e-9 {
            out.push(t);
            t += step;
        }
        out
    }

    fn map(&self, v: f64, a: f64, b: f64) -> f64 {
        a + (v - self.lo) / (self.hi - self.lo) * (b - a)
    }
}

fn label(v: f64) -> String {
    // A tick computed as -0.0 (or a rounding hair off zero) reads as 0.
    let v = if v.abs() < 1e-9 { 0.0 } else { v };
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Frame, title, axis labels and ticks.
fn frame(out: &mut String, title: &str, x_label: &str, y_label: &str, x: Option<&Axis>, y: &Axis) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        out,
        // Left-aligned, so a long title runs into the legend's margin instead of off the left.
        r#"<text x="8" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
    let _ = write!(
        out,
        r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
        x1 - x0,
        y0 - y1
    );
    for t in y.ticks() {
        let py = y.map(t, y0, y1);
        let _ = write!(
            out,
            r##"<line x1="{x0}" x2="{x1}" y1="{py:.1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            py + 4.0,
            label(t)
        );
    }
    if let Some(x) = x {
        for t in x.ticks() {
            let px = x.map(t, x0, x1);
            let _ = write!(
                out,
                r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#,
                y0 + 16.0,
                label(t)
            );
        }
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        H - 10.0,
        escape(x_label)
    );
    let _ = write!(
        out,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (y0 + y1) / 2.0,
        escape(y_label)
    );
}

fn legend(out: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 8.0 + 18.0 * i as f64;
        let x = W - RIGHT + 12.0;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 10.0,
            PALETTE[i % PALETTE.len()],
            x + 18.0,
            y,
            escape(name)
        );
    }
}

/// Lines, one per series.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x = Axis::new(all().map(|p| p.0), false);
    let y = Axis::new(all().map(|p| p.1), false);
    let mut out = String::new();
    frame(&mut out, title, x_label, y_label, Some(&x), &y);
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(a, b)| {
                format!(
                    "{:.1},{:.1}",
                    x.map(a, LEFT, W - RIGHT),
                    y.map(b, H - BOTTOM, TOP)
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
            PALETTE[i % PALETTE.len()],
            pts.join(" ")
        );
    }
    legend(
        &mut out,
        &series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
    );
    out.push_str("</svg>");
    out
}

/// Grouped bars with 95% intervals: one group per category, one bar per series
/// (`values[series][category]` is `[estimate, lo, hi]`).
pub fn bar_chart(
    title: &str,
    y_label: &str,
    categories: &[&str],
    series: &[(&str, Vec<[f64; 3]>)],
) -> String {
    let y = Axis::new(
        series
            .iter()
            .flat_map(|s| s.1.iter().flat_map(|v| v.iter().copied())),
        true,
    );
    let mut out = String::new();
    frame(&mut out, title, "", y_label, None, &y);
    let group = (W - RIGHT - LEFT) / categories.len().max(1) as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    for (c, cat) in categories.iter().enumerate() {
        let gx = LEFT + group * c as f64 + group * 0.1;
        for (i, (_, values)) in series.iter().enumerate() {
            let [v, lo, hi] = values.get(c).copied().unwrap_or([f64::NAN; 3]);
            if !v.is_finite() {
                continue;
            }
            let top = y.map(v, H - BOTTOM, TOP);
            let base = y.map(y.lo.max(0.0), H - BOTTOM, TOP);
            let x = gx + bar * i as f64;
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {v:.2} ({lo:.2} to {hi:.2})</title></rect>"#,
                top.min(base),
                bar * 0.95,
                (base - top).abs(),
                PALETTE[i % PALETTE.len()],
                escape(series[i].0)
            );
            if lo.is_finite() && hi.is_finite() {
                let mid = x + bar * 0.475;
                let _ = write!(
                    out,
                    r##"<line x1="{mid:.1}" x2="{mid:.1}" y1="{:.1}" y2="{:.1}" stroke="#222"/>"##,
                    y.map(lo, H - BOTTOM, TOP),
                    y.map(hi, H - BOTTOM, TOP)
                );
            }
        }
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            gx + group * 0.4,
            H - BOTTOM + 16.0,
            escape(cat)
        );
    }
    legend(&mut out, &series.iter().map(|s| s.0).collect::<Vec<_>>());
    out.push_str("</svg>");
    out
}

/// A point with 95% intervals on both axes and a label.
pub struct ErrorPoint {
    pub label: String,
    pub x: [f64; 3],
    pub y: [f64; 3],
}

/// Curves of points with intervals on both axes (one series per method), the axes' zero lines
/// drawn: for a trade-off of one change against another.
pub fn error_curves(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(impl AsRef<str>, Vec<ErrorPoint>)],
) -> String {
    let all = || series.iter().flat_map(|s| s.1.iter());
    let x = Axis::new(all().flat_map(|p| p.x).chain([0.0]), false);
    let y = Axis::new(all().flat_map(|p| p.y).chain([0.0]), false);
    let mut out = String::new();
    frame(&mut out, title, x_label, y_label, Some(&x), &y);
    let (px, py) = (
        |v: f64| x.map(v, LEFT, W - RIGHT),
        |v: f64| y.map(v, H - BOTTOM, TOP),
    );
    let _ = write!(
        out,
        r##"<line x1="{:.1}" x2="{:.1}" y1="{TOP}" y2="{}" stroke="#999" stroke-dasharray="4 3"/><line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="4 3"/>"##,
        px(0.0),
        px(0.0),
        H - BOTTOM,
        W - RIGHT,
        py(0.0),
        py(0.0)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let name = name.as_ref();
        let colour = PALETTE[i % PALETTE.len()];
        let finite: Vec<&ErrorPoint> = points
            .iter()
            .filter(|p| p.x.iter().chain(&p.y).all(|v| v.is_finite()))
            .collect();
        let line: Vec<String> = finite
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.x[0]), py(p.y[0])))
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{}"/>"#,
            line.join(" ")
        );
        for p in finite {
            let (cx, cy) = (px(p.x[0]), py(p.y[0]));
            let _ = write!(
                out,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{cy:.1}" y2="{cy:.1}" stroke="{colour}"/><line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="{colour}"/><circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="{colour}"><title>{}: {:.2} ({:.2} to {:.2}), {:.2} ({:.2} to {:.2})</title></circle><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                px(p.x[1]),
                px(p.x[2]),
                py(p.y[1]),
                py(p.y[2]),
                escape(&format!("{name} {}", p.label)),
                p.x[0],
                p.x[1],
                p.x[2],
                p.y[0],
                p.y[1],
                p.y[2],
                cx + 5.0,
                cy - 5.0,
                escape(&p.label)
            );
        }
    }
    legend(
        &mut out,
        &series.iter().map(|s| s.0.as_ref()).collect::<Vec<_>>(),
    );
    out.push_str("</svg>");
    out
}

/// Labelled points.
pub fn scatter(title: &str, x_label: &str, y_label: &str, points: &[(&str, f64, f64)]) -> String {
    let x = Axis::new(points.iter().map(|p| p.1), false);
    let y = Axis::new(points.iter().map(|p| p.2), false);
    let mut out = String::new();
    frame(&mut out, title, x_label, y_label, Some(&x), &y);
    for (i, (_, a, b)) in points.iter().enumerate() {
        if !(a.is_finite() && b.is_finite()) {
            continue;
        }
        let _ = write!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{}"/>"#,
            x.map(*a, LEFT, W - RIGHT),
            y.map(*b, H - BOTTOM, TOP),
            PALETTE[i % PALETTE.len()]
        );
    }
    legend(&mut out, &points.iter().map(|p| p.0).collect::<Vec<_>>());
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let axis = Axis::new([0.0, 97.0].into_iter(), true);
        assert_eq!(axis.ticks(), [0.0, 25.0, 50.0, 75.0, 100.0]);
        let axis = Axis::new([2.1, 2.9].into_iter(), false);
        let t = axis.ticks();
        assert!(
            t.len() >= 3 && t[0] >= axis.lo && *t.last().unwrap() <= axis.hi,
            "{t:?}"
        );
        assert!(t
            .windows(2)
            .all(|w| ((w[1] - w[0]) - (t[1] - t[0])).abs() < 1e-9));
    }

    #[test]
    fn charts_are_well_formed_and_escape_names() {
        let s = line_chart(
            "loss",
            "tokens",
            "loss",
            &[Series {
                name: "a<b".into(),
                points: vec![(0.0, 3.0), (10.0, 2.0), (20.0, f64::NAN)],
            }],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("a&lt;b") && !s.contains("a<b"));
        assert!(s.contains("<polyline") && !s.contains("NaN"));
        let b = bar_chart(
            "acc",
            "%",
            &["math", "code"],
            &[("x", vec![[50.0, 49.0, 51.0], [60.0, f64::NAN, f64::NAN]])],
        );
        assert_eq!(
            b.matches("<rect").count(),
            2 + 1 + 1,
            "frame + 2 bars + legend"
        );
        assert_eq!(
            b.matches("stroke=\"#222\"").count(),
            1,
            "one bar has an interval"
        );
        let e = error_curves(
            "t",
            "gain",
            "change",
            &[(
                "m",
                vec![
                    ErrorPoint {
                        label: "64".into(),
                        x: [1.0, 0.5, 1.5],
                        y: [-1.0, -2.0, 0.0],
                    },
                    ErrorPoint {
                        label: "256".into(),
                        x: [f64::NAN; 3],
                        y: [0.0; 3],
                    },
                ],
            )],
        );
        assert_eq!(e.matches("<circle").count(), 1);
        assert!(!e.contains("NaN"));
        let p = scatter("r", "t", "e", &[("m", 1.0, 2.0), ("n", f64::NAN, 1.0)]);
        assert_eq!(p.matches("<circle").count(), 1);
    }
}
