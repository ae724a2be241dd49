//! The demo's data: fetched by the pinned script (embedded in the binary, so an installed
//! `mode` needs no checkout), then prepared once per backbone tokenizer.

use std::path::{Path, PathBuf};
use std::process::Command;

use mode_data::{prepare, Format, PrepareOptions, PreparedData};
use mode_io::Tokenizer;

use crate::{Error, Result};

const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch_demo_data.sh");
const MATH_GENERATOR: &str = include_str!("../../../scripts/demo_data/generate_math.py");
const WIKI_CONVERTER: &str = include_str!("../../../scripts/demo_data/wiki_to_text.py");

/// Runs the fetch script (idempotent: a second run only checks checksums) and returns the
/// folder holding `math/`, `code/`, `c/`, `english/` and `prose/`.
pub fn fetch() -> Result<PathBuf> {
    let dir = mode_io::mode_home().join("demo-scripts");
    let script = dir.join("fetch_demo_data.sh");
    let generator = dir.join("demo_data").join("generate_math.py");
    let converter = dir.join("demo_data").join("wiki_to_text.py");
    for (path, text) in [
        (&script, FETCH_SCRIPT),
        (&generator, MATH_GENERATOR),
        (&converter, WIKI_CONVERTER),
    ] {
        if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
            mode_io::atomic::write_file(path, text.as_bytes()).map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
        }
    }
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Io {
            path: script.clone(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "fetching the demo data failed ({}); see the messages above",
            out.status
        )));
    }
    let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for sub in ["math", "code", "c", "english", "prose"] {
        if !root.join(sub).exists() {
            return Err(Error::Step(format!(
                "{}: the fetch script did not produce `{sub}/`",
                root.display()
            )));
        }
    }
    Ok(root)
}

/// The prepared folders the demo trains and evaluates on.
pub struct Domains {
    /// Math questions (train-easy difficulty), split into train and validation.
    pub math: PathBuf,
    /// Held-out math: the generator's interpolation test set, all in the test split, each item
    /// a prompt (the question) and a completion (the answer) so that answers can be scored
    /// alone.
    pub math_test: PathBuf,
    /// Django's sources, split by file into train, validation and test.
    pub code: PathBuf,
    /// numpy's C sources, split by file into train, validation and test (the continual demo).
    pub c: PathBuf,
    /// Shakespeare's plays in modern spelling, all in the test split: evaluation only.
    pub english: PathBuf,
    /// Wikipedia articles, split by article into train, validation and test: only the test
    /// split is scored; train and validation are there for work that needs general text.
    pub prose: PathBuf,
}

impl Domains {
    /// The prepared folder a training domain trains on.
    pub fn training(&self, domain: crate::method::Domain) -> &Path {
        match domain {
            crate::method::Domain::Math => &self.math,
            crate::method::Domain::Code => &self.code,
            crate::method::Domain::C => &self.c,
        }
    }

    /// The held-out (test) set of a training domain.
    pub fn test_set(&self, domain: crate::method::Domain) -> &Path {
        match domain {
            crate::method::Domain::Math => &self.math_test,
            _ => self.training(domain),
        }
    }

    /// The held-out set of each reported domain, in report order.
    pub fn eval_sets(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            (crate::results::MATH, self.math_test.clone()),
            (crate::results::CODE, self.code.clone()),
            (crate::results::ENGLISH, self.english.clone()),
            (crate::results::PROSE, self.prose.clone()),
        ]
    }

    /// The folders whose validation splits choose learning rates and recipes: the training
    /// domains and general prose.
    pub fn validation_sets(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            (crate::results::MATH, self.math.clone()),
            (crate::results::CODE, self.code.clone()),
            (crate::results::PROSE, self.prose.clone()),
        ]
    }
}

/// Prepares each domain under `dir` unless it is already there for this tokenizer.
pub fn prepare_domains(root: &Path, dir: &Path, tokenizer: &Tokenizer) -> Result<Domains> {
    let one = |name: &str, inputs: Vec<PathBuf>, glob: Option<&str>, val: f64, test: f64| {
        let out = dir.join(name);
        if let Ok(d) = PreparedData::open(&out) {
            if d.manifest.tokenizer_fingerprint == tokenizer.fingerprint() {
                return Ok(out);
            }
        }
        let opts = PrepareOptions {
            column: None,
            inputs,
            out: out.clone(),
            glob: glob.map(String::from),
            format: Format::Auto,
            val_fraction: val,
            test_fraction: test,
            seed: 0,
            force: true,
        };
        prepare(&opts, tokenizer, None, |_, _| {})?;
        Ok::<_, Error>(out)
    };
    let answers = dir.join("math-test-answers.jsonl");
    write_math_answers(&root.join("math").join("test.jsonl"), &answers, tokenizer)?;
    Ok(Domains {
        math: one(
            "math",
            vec![root.join("math").join("train.jsonl")],
            None,
            0.05,
            0.0,
        )?,
        math_test: one("math-test-answers", vec![answers], None, 0.0, 1.0)?,
        code: one("code", vec![root.join("code")], Some("*.py"), 0.05, 0.05)?,
        c: one("c", vec![root.join("c")], Some("*.[ch]"), 0.05, 0.05)?,
        english: one(
            "english",
            vec![root.join("english")],
            Some("*_gut.txt"),
            0.0,
            1.0,
        )?,
        prose: one("prose", vec![root.join("prose")], Some("*.txt"), 0.15, 0.15)?,
    })
}

/// Rewrites the math test items (`{"text": "Question: ...\nAnswer: ..."}`) as prompt and
/// completion at the token where the answer starts, so the prepared set marks answer tokens and
/// holds the same tokens as each item tokenised whole. Written once (atomically).
fn write_math_answers(input: &Path, out: &Path, tokenizer: &Tokenizer) -> Result<()> {
    if out.exists() {
        return Ok(());
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let text = std::fs::read_to_string(input).map_err(io(input))?;
    let mut lines = String::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |msg: &str| Error::Step(format!("{}: line {}: {msg}", input.display(), i + 1));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let item = value["text"].as_str().ok_or_else(|| bad("no `text`"))?;
        let (prompt, completion) =
            split_answer(item, tokenizer)?.ok_or_else(|| bad("no `\nAnswer:` in the item"))?;
        let record = serde_json::json!({ "prompt": prompt, "completion": completion });
        lines.push_str(&record.to_string());
        lines.push('\n');
    }
    mode_io::atomic::write_file(out, lines.as_bytes()).map_err(io(out))
}

/// `item` cut into (prompt, answer) where its tokens split: after `Answer:` and the spaces
/// that tokenise apart from the answer (`" 42"` is `" "`, `"4"`, `"2"` in SmolLM2), or before
/// the space a word answer carries (`" True"`). None when the item has no answer.
pub fn split_answer<'a>(
    item: &'a str,
    tokenizer: &Tokenizer,
) -> Result<Option<(&'a str, &'a str)>> {
    const MARK: &str = "\nAnswer:";
    let Some(at) = item.rfind(MARK).map(|i| i + MARK.len()) else {
        return Ok(None);
    };
    let whole = tokenizer.encode(item)?;
    let first_char = item[at..]
        .find(|c: char| !c.is_whitespace())
        .map_or(item.len(), |i| at + i);
    // The latest cut (answer starting at its first character) whose pieces tokenise to the
    // same ids as the whole item; else the cut right after the mark.
    for cut in [first_char, at] {
        let mut ids = tokenizer.encode(&item[..cut])?;
        ids.extend(tokenizer.encode(&item[cut..])?);
        if ids == whole {
            return Ok(Some((&item[..cut], &item[cut..])));
        }
    }
    Ok(Some((&item[..at], &item[at..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_split_where_their_tokens_start() {
        let tok = Tokenizer::byte_level();
        let (p, a) = split_answer("Question: 1 + 1?\nAnswer: 2", &tok)
            .unwrap()
            .unwrap();
        assert_eq!((p, a), ("Question: 1 + 1?\nAnswer: ", "2"));
        // The last mark counts: a question may quote an earlier answer.
        let (p, a) = split_answer("Question: x\nAnswer: y?\nAnswer: True", &tok)
            .unwrap()
            .unwrap();
        assert!(p.ends_with("y?\nAnswer: ") && a == "True");
        assert!(split_answer("no answer here", &tok).unwrap().is_none());
    }
}
