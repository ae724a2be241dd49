//! The gate viewer: how each block's gate mixed the backbone and the experts, token by token,
//! over a text (`mode gates`).
//!
//! Mean gate weights (what `mode eval` reports) say how much an expert is used, not where.
//! Seeing the weights on the text itself shows whether a composed model routes as intended (the
//! code expert inside code, the math expert on digits and formulas, the backbone on prose) and
//! what sparse gating (`--gate-top-k`, `--gate-threshold`) keeps of the mix. The page is one
//! self-contained HTML file: no scripts, fonts or style sheets from elsewhere, so it can be
//! mailed or archived as is.

use std::fmt::Write;
use std::ops::Range;

use candle_core::{DType, Tensor};
use mode_core::{ModeModel, Routing};
use mode_io::Tokenizer;

use crate::Result;

/// The gate weights of every block for every token of a text, with what is needed to show them.
#[derive(Debug, Clone, PartialEq)]
pub struct GateTrace {
    /// Branch names in gate order: `backbone`, then the experts.
    pub branches: Vec<String>,
    /// The backbone layers each block covers.
    pub blocks: Vec<Range<usize>>,
    /// The token ids, in order.
    pub ids: Vec<u32>,
    /// Each token's text (see [`token_pieces`]); concatenated, they are the decoded text.
    pub pieces: Vec<String>,
    /// `weights[block][token][branch]`: the weights the gate gave, after routing.
    pub weights: Vec<Vec<Vec<f32>>>,
}

/// Runs `model` under `routing` over `ids` in consecutive windows of `seq_len` tokens, each with
/// a fresh context as in evaluation (the tokenizer's BOS before each, not traced), and records
/// the weights each block's gate used for every token. `progress` is called with the windows
/// done and their total.
pub fn trace(
    model: &ModeModel,
    routing: &Routing,
    tokenizer: &Tokenizer,
    ids: &[u32],
    seq_len: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<GateTrace> {
    routing.check(model.experts.len())?;
    let blocks = model.layout.num_blocks();
    let mut weights = vec![Vec::with_capacity(ids.len()); blocks];
    let windows: Vec<&[u32]> = ids.chunks(seq_len.max(1)).collect();
    let bos = tokenizer.leading_bos();
    for (done, window) in windows.iter().enumerate() {
        let fed: Vec<u32> = bos.iter().copied().chain(window.iter().copied()).collect();
        let input = Tensor::new(fed.as_slice(), model.backbone.device())?.unsqueeze(0)?;
        let mut per_block = Vec::with_capacity(blocks);
        model.forward_routed(&input, None, routing, Some(&mut per_block))?;
        for (b, probs) in per_block.into_iter().enumerate() {
            let rows = probs.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            weights[b].extend(rows.into_iter().skip(usize::from(bos.is_some())));
        }
        progress(done + 1, windows.len());
    }
    // The trace's own means are reported; these would only pile up for the next caller.
    model.take_gate_stats();
    let mut branches = vec!["backbone".to_string()];
    branches.extend(model.expert_names());
    Ok(GateTrace {
        branches,
        blocks: (0..blocks).map(|b| model.layout.block(b)).collect(),
        ids: ids.to_vec(),
        pieces: token_pieces(tokenizer, ids)?,
        weights,
    })
}

/// The text of each token, such that the pieces concatenated are the decoded text. A character
/// that byte-level BPE splits over several tokens is given whole to the token that completes
/// it, and the tokens before get `""`, so no piece holds half a character; special tokens, which
/// decoding leaves out, get `""` too.
///
/// This is incremental decoding with a short look-back (the two offsets of Hugging Face's
/// text-generation-inference): each step decodes only the tokens since the previous piece and
/// the new one, so a long text costs linear time, where decoding the whole prefix at every
/// token (as `mode_infer::TextStream` does for generation) would be quadratic. The look-back
/// keeps decoders that drop a leading space at the start of a decode (SentencePiece) from
/// dropping it mid-text.
pub fn token_pieces(tokenizer: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let mut pieces = Vec::with_capacity(ids.len());
    let (mut prefix, mut read) = (0, 0);
    let mut before = String::new();
    for i in 0..ids.len() {
        let now = tokenizer.decode(&ids[prefix..=i])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            pieces.push(now[before.len()..].to_string());
            (prefix, read) = (read, i + 1);
            before = tokenizer.decode(&ids[prefix..read])?;
        } else {
            pieces.push(String::new());
        }
    }
    // Tokens that never completed a character (the text was cut inside one): what decoding
    // makes of them goes to the last token.
    if read < ids.len() {
        let now = tokenizer.decode(&ids[prefix..])?;
        if now.len() > before.len() && now.is_char_boundary(before.len()) {
            if let Some(last) = pieces.last_mut() {
                *last = now[before.len()..].to_string();
            }
        }
    }
    Ok(pieces)
}

/// The mean weight of every branch in every block, over all tokens (`[block][branch]`).
pub fn mean_weights(trace: &GateTrace) -> Vec<Vec<f64>> {
    trace
        .weights
        .iter()
        .map(|tokens| {
            let mut sums = vec![0.0f64; trace.branches.len()];
            for row in tokens {
                sums.iter_mut()
                    .zip(row)
                    .for_each(|(s, &w)| *s += f64::from(w));
            }
            sums.iter()
                .map(|s| s / tokens.len().max(1) as f64)
                .collect()
        })
        .collect()
}

/// Says in words what `routing` restricts, naming experts by `experts` (gate order).
pub fn describe_routing(routing: &Routing, experts: &[String]) -> String {
    if routing.is_dense() {
        return "dense (every expert, as trained)".into();
    }
    let mut parts = Vec::new();
    if let Some(allowed) = &routing.experts {
        let names: Vec<&str> = allowed
            .iter()
            .filter_map(|&j| experts.get(j).map(String::as_str))
            .collect();
        parts.push(if names.is_empty() {
            "no expert".to_string()
        } else {
            format!("experts {}", names.join(", "))
        });
    }
    if let Some(k) = routing.top_k {
        parts.push(format!("top-{k} experts per token"));
    }
    if let Some(t) = routing.threshold.filter(|&t| t > 0.0) {
        parts.push(format!("experts below weight {t} dropped"));
    }
    parts.join("; ")
}

/// The mean weights per block and branch as a text table, for the terminal.
pub fn summary_table(trace: &GateTrace) -> String {
    let width = trace
        .branches
        .iter()
        .map(|b| b.chars().count())
        .max()
        .unwrap_or(0)
        .max(8);
    let mut out = String::new();
    let _ = write!(out, "{:<6} {:<9}", "block", "layers");
    for b in &trace.branches {
        let _ = write!(out, " {b:>width$}");
    }
    out.push('\n');
    for (i, (means, layers)) in mean_weights(trace).iter().zip(&trace.blocks).enumerate() {
        let layers = format!("{}-{}", layers.start, layers.end.saturating_sub(1));
        let _ = write!(out, "{i:<6} {layers:<9}");
        for w in means {
            let _ = write!(out, " {w:>width$.3}");
        }
        out.push('\n');
    }
    out
}

/// Background colours of the branches: the backbone light grey, the experts Paul Tol's
/// "bright" scheme (distinct for colour-blind readers, and the demo report's colours), then
/// golden-angle hues. Black text stays readable on all of them.
pub fn branch_colour(branch: usize) -> [u8; 3] {
    const BACKBONE: [u8; 3] = [0xe0, 0xe0, 0xe0];
    const EXPERTS: [[u8; 3]; 6] = [
        [0x44, 0x77, 0xaa],
        [0xee, 0x66, 0x77],
        [0x22, 0x88, 0x33],
        [0xcc, 0xbb, 0x44],
        [0x66, 0xcc, 0xee],
        [0xaa, 0x33, 0x77],
    ];
    match branch {
        0 => BACKBONE,
        j if j <= EXPERTS.len() => EXPERTS[j - 1],
        j => hsl((j as f64 * 137.508) % 360.0, 0.55, 0.6),
    }
}

/// HSL (hue in degrees, saturation and lightness in 0..1) to RGB.
fn hsl(h: f64, s: f64, l: f64) -> [u8; 3] {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    [r, g, b].map(|v| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// The colours mixed in proportion to the weights (normalised to sum to one; negative or
/// non-finite weights count as zero). With no weight at all, the first colour (the backbone).
pub fn blend(weights: &[f32], colours: &[[u8; 3]]) -> [u8; 3] {
    let clean = |w: f32| if w.is_finite() && w > 0.0 { w } else { 0.0 };
    let sum: f64 = weights.iter().map(|&w| f64::from(clean(w))).sum();
    if sum <= 0.0 || colours.is_empty() {
        return colours.first().copied().unwrap_or([0xff; 3]);
    }
    let mut rgb = [0.0f64; 3];
    for (&w, c) in weights.iter().zip(colours) {
        let w = f64::from(clean(w)) / sum;
        rgb.iter_mut()
            .zip(c)
            .for_each(|(acc, &v)| *acc += w * f64::from(v));
    }
    rgb.map(|v| v.round().clamp(0.0, 255.0) as u8)
}

/// `#rrggbb`.
fn hex([r, g, b]: [u8; 3]) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// Text made safe for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What a page says about its run, above the text.
#[derive(Debug, Clone, Default)]
pub struct About {
    /// The model, as the user named it.
    pub model: String,
    /// The data the text came from.
    pub data: String,
    /// The routing, in words ([`describe_routing`]).
    pub routing: String,
    /// Window length in tokens.
    pub seq_len: usize,
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
table{border-collapse:collapse;margin:1em 0}\
td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}\
td:first-child,th:first-child{text-align:left}\
.legend span.sw{display:inline-block;width:1.2em;height:1em;vertical-align:middle;\
margin:0 .3em 0 1em;border:1px solid #999}\
.text{white-space:pre-wrap;font-family:monospace;line-height:1.5;border:1px solid #ccc;\
padding:.8em;color:#000;overflow-wrap:anywhere}\
.t:empty{display:inline-block;width:.3em;height:1em;vertical-align:text-bottom}";

/// A self-contained HTML page: a legend of the branches' colours, a table of mean weights per
/// block and branch, and for every block the text with each token's background the mix of the
/// branches' colours by that token's gate weights (a `title` tooltip gives the exact weights).
/// One `<span class="t">` per token per block.
pub fn html(trace: &GateTrace, about: &About) -> String {
    let colours: Vec<[u8; 3]> = (0..trace.branches.len()).map(branch_colour).collect();
    let mut h = String::with_capacity(200 * trace.ids.len() * trace.blocks.len().max(1));
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Gate weights: {}</title>\
         <style>{STYLE}</style></head><body>\n<h1>Gate weights per token</h1>\n\
         <p>Model <code>{}</code>; data <code>{}</code>, {} tokens in windows of {} (each with a \
         fresh context); routing: {}. Each token's background mixes the branches' colours by \
         the weight its block's gate gave them; hover a token for the exact weights.</p>\n",
        escape(&about.data),
        escape(&about.model),
        escape(&about.data),
        trace.ids.len(),
        about.seq_len,
        escape(&about.routing),
    );
    h.push_str("<p class=\"legend\">");
    for (name, c) in trace.branches.iter().zip(&colours) {
        let _ = write!(
            h,
            "<span class=\"sw\" style=\"background:{}\"></span>{}",
            hex(*c),
            escape(name)
        );
    }
    h.push_str("</p>\n<h2>Mean weight per block</h2>\n<table><tr><th>block</th><th>layers</th>");
    for name in &trace.branches {
        let _ = write!(h, "<th>{}</th>", escape(name));
    }
    h.push_str("</tr>");
    for (i, (means, layers)) in mean_weights(trace).iter().zip(&trace.blocks).enumerate() {
        let _ = write!(
            h,
            "<tr><td>{i}</td><td>{}&ndash;{}</td>",
            layers.start,
            layers.end.saturating_sub(1)
        );
        for (j, w) in means.iter().enumerate() {
            // The branch's colour over white, as strong as its share of the mix.
            let w32 = *w as f32;
            let bg = hex(blend(&[1.0 - w32, w32], &[[0xff; 3], colours[j]]));
            let _ = write!(h, "<td style=\"background:{bg}\">{w:.3}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>\n");
    for (b, (tokens, layers)) in trace.weights.iter().zip(&trace.blocks).enumerate() {
        let _ = write!(
            h,
            "<h2>Block {b}: layers {}&ndash;{}</h2>\n<div class=\"text\">",
            layers.start,
            layers.end.saturating_sub(1)
        );
        for (t, (piece, row)) in trace.pieces.iter().zip(tokens).enumerate() {
            let mut tip = format!("token {t} (id {})", trace.ids[t]);
            for (name, w) in trace.branches.iter().zip(row) {
                let _ = write!(tip, "\n{name} {w}");
            }
            let _ = write!(
                h,
                "<span class=\"t\" style=\"background:{}\" title=\"{}\">{}</span>",
                hex(blend(row, &colours)),
                escape(&tip).replace('\n', "&#10;"),
                escape(piece)
            );
        }
        h.push_str("</div>\n");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use mode_core::{BlockLayout, Expert, ExpertInit, Gate};
    use mode_model::{Architecture, Backbone, Config};

    fn sample() -> GateTrace {
        GateTrace {
            branches: vec!["backbone".into(), "math".into(), "c<o>de".into()],
            blocks: vec![0..2, 2..4],
            ids: vec![1, 2, 3],
            pieces: vec!["a<b".into(), String::new(), "\"&\n".into()],
            weights: vec![
                vec![
                    vec![1.0, 0.0, 0.0],
                    vec![0.5, 0.5, 0.0],
                    vec![0.2, 0.3, 0.5],
                ],
                vec![
                    vec![0.0, 1.0, 0.0],
                    vec![0.0, 0.0, 1.0],
                    vec![0.6, 0.2, 0.2],
                ],
            ],
        }
    }

    fn about() -> About {
        About {
            model: "models/<x>".into(),
            data: "a&b.txt".into(),
            routing: "dense".into(),
            seq_len: 512,
        }
    }

    #[test]
    fn escaping_covers_content_and_attributes() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("héllo 日本"), "héllo 日本");
    }

    #[test]
    fn blending_mixes_colours_by_weight() {
        let c = [[0, 0, 0], [200, 100, 50]];
        assert_eq!(blend(&[1.0, 0.0], &c), [0, 0, 0]);
        assert_eq!(blend(&[0.0, 1.0], &c), [200, 100, 50]);
        assert_eq!(blend(&[0.5, 0.5], &c), [100, 50, 25]);
        // Weights are normalised; bad ones count as zero; none at all is the backbone's colour.
        assert_eq!(blend(&[1.0, 1.0], &c), [100, 50, 25]);
        assert_eq!(blend(&[f32::NAN, 2.0], &c), [200, 100, 50]);
        assert_eq!(blend(&[0.0, -1.0], &c), [0, 0, 0]);
        assert_eq!(blend(&[], &[]), [0xff; 3]);
    }

    #[test]
    fn branch_colours_are_distinct_and_the_backbone_is_grey() {
        let [r, g, b] = branch_colour(0);
        assert!(r == g && g == b, "backbone grey");
        let colours: Vec<[u8; 3]> = (0..24).map(branch_colour).collect();
        for (i, a) in colours.iter().enumerate() {
            for b in &colours[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn pieces_never_split_a_character() {
        let tok = Tokenizer::byte_level();
        let text = "héllo — 日本語 🦀 <&>\n\tend";
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() > text.chars().count(), "bytes, not characters");
        let pieces = token_pieces(&tok, &ids).unwrap();
        assert_eq!(pieces.len(), ids.len());
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        // Each character goes whole to the token that completes it.
        assert_eq!(
            pieces.iter().filter(|p| !p.is_empty()).count(),
            text.chars().count()
        );
        // A text cut inside a character: the remainder goes to the last token.
        let cut = token_pieces(&tok, &ids[..2]).unwrap();
        assert_eq!(cut[0], "h");
        assert_eq!(cut[1], "\u{FFFD}");
        assert!(token_pieces(&tok, &[]).unwrap().is_empty());
    }

    #[test]
    fn the_page_has_one_span_per_token_per_block_and_a_full_legend() {
        let t = sample();
        let h = html(&t, &about());
        assert!(h.starts_with("<!doctype html>") && h.ends_with("</html>\n"));
        assert!(!h.contains("src=") && !h.contains("href=") && !h.contains("<script"));
        assert!(h.contains("white-space:pre-wrap"));
        assert_eq!(h.matches("<span class=\"t\"").count(), 3 * 2);
        assert_eq!(h.matches("<div class=\"text\">").count(), 2);
        assert_eq!(h.matches("<span class=\"sw\"").count(), 3);
        for name in ["backbone", "math", "c&lt;o&gt;de"] {
            assert!(h.contains(&format!("</span>{name}")), "legend lists {name}");
        }
        assert!(!h.contains("c<o>de") && !h.contains("models/<x>"));
        // Token text escaped, newlines kept as they are.
        assert!(h.contains(">a&lt;b</span>") && h.contains(">&quot;&amp;\n</span>"));
        // Exact weights in the tooltip, one line per branch.
        assert!(h.contains(
            "title=\"token 2 (id 3)&#10;backbone 0.2&#10;math 0.3&#10;c&lt;o&gt;de 0.5\""
        ));
        // Pure branches get their own colour.
        assert!(h.contains(&format!(
            "background:{}\" title=\"token 0",
            hex(branch_colour(0))
        )));
        let expert = format!(
            "background:{}\" title=\"token 1 (id 2)&#10;backbone 0&#10;math 0&#10;",
            hex(branch_colour(2))
        );
        assert!(h.contains(&expert));
        // Mean weights table.
        assert!(h.contains(">0.567</td>"));
    }

    #[test]
    fn means_and_table_summarise_every_block() {
        let t = sample();
        let m = mean_weights(&t);
        assert!((m[0][0] - 1.7 / 3.0).abs() < 1e-6 && (m[1][2] - 1.2 / 3.0).abs() < 1e-6);
        let table = summary_table(&t);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("backbone") && lines[0].contains("c<o>de"));
        assert!(lines[1].starts_with("0      0-1") && lines[1].contains("0.567"));
        assert!(lines[2].starts_with("1      2-3") && lines[2].contains("0.400"));
    }

    #[test]
    fn routing_is_described_in_words() {
        let experts = vec!["math".to_string(), "code".to_string()];
        assert!(describe_routing(&Routing::default(), &experts).starts_with("dense"));
        let r = Routing {
            experts: Some(vec![1]),
            top_k: Some(1),
            threshold: Some(0.1),
        };
        assert_eq!(
            describe_routing(&r, &experts),
            "experts code; top-1 experts per token; experts below weight 0.1 dropped"
        );
    }

    fn tiny_model() -> ModeModel {
        let mut config = Config::tiny(Architecture::Llama);
        config.vocab_size = 257;
        config.num_hidden_layers = 4;
        let dev = &Device::Cpu;
        let bb = Backbone::random(config.clone(), 3, DType::F32, dev).unwrap();
        let layout = BlockLayout::even(4, 2, 1).unwrap();
        let experts = ["math", "code"]
            .iter()
            .enumerate()
            .map(|(i, n)| Expert::new(n, &bb, &layout, ExpertInit::Random, i as u64).unwrap())
            .collect();
        let gates = (0..2)
            .map(|_| Gate {
                weight: Tensor::randn(0f32, 0.5, (3, config.hidden_size), dev).unwrap(),
                bias: Tensor::zeros(3, DType::F32, dev).unwrap(),
                input: mode_core::GateInput::Raw,
            })
            .collect();
        ModeModel::new(bb, layout, experts, gates).unwrap()
    }

    #[test]
    fn a_trace_has_every_token_of_every_window_and_follows_the_routing() {
        let model = tiny_model();
        let tok = Tokenizer::byte_level();
        let ids = tok.encode("def f(x):\n    return x * 2  # é\n").unwrap();
        let mut calls = Vec::new();
        let t = trace(&model, &Routing::default(), &tok, &ids, 8, |d, n| {
            calls.push((d, n))
        })
        .unwrap();
        let windows = ids.len().div_ceil(8);
        assert_eq!(calls.last(), Some(&(windows, windows)));
        assert_eq!(t.branches, ["backbone", "math", "code"]);
        assert_eq!(t.blocks, vec![0..2, 2..4]);
        assert_eq!(t.weights.len(), 2);
        for block in &t.weights {
            assert_eq!(block.len(), ids.len());
            for row in block {
                assert_eq!(row.len(), 3);
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(row[1] > 0.0 && row[2] > 0.0, "dense: every expert mixes in");
            }
        }
        // Each window starts a fresh context: the second one traced alone gives the same weights.
        let second = trace(&model, &Routing::default(), &tok, &ids[8..16], 8, |_, _| {}).unwrap();
        assert_eq!(second.weights[1][..], t.weights[1][8..16]);

        let top1 = Routing {
            top_k: Some(1),
            ..Default::default()
        };
        let t1 = trace(&model, &top1, &tok, &ids, 8, |_, _| {}).unwrap();
        for row in t1.weights.iter().flatten() {
            assert_eq!(row.iter().skip(1).filter(|&&w| w > 0.0).count(), 1);
        }
        let bad = Routing {
            experts: Some(vec![5]),
            ..Default::default()
        };
        assert!(trace(&model, &bad, &tok, &ids, 8, |_, _| {}).is_err());
    }
}
