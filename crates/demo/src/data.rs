//! The demo's data: fetched by the pinned script (embedded in the binary, so an installed
//! `mode` needs no checkout), then prepared once per backbone tokenizer.

use std::path::{Path, PathBuf};
use std::process::Command;

use mode_data::{prepare, Format, PrepareOptions, PreparedData};
use mode_io::Tokenizer;

use crate::{Error, Result};

const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch_demo_data.sh");
const MATH_GENERATOR: &str = include_str!("../../../scripts/demo_data/generate_math.py");

/// Runs the fetch script (idempotent: a second run only checks checksums) and returns the
/// folder holding `math/`, `code/` and `english/`.
pub fn fetch() -> Result<PathBuf> {
    let dir = mode_io::mode_home().join("demo-scripts");
    let script = dir.join("fetch_demo_data.sh");
    let generator = dir.join("demo_data").join("generate_math.py");
    for (path, text) in [(&script, FETCH_SCRIPT), (&generator, MATH_GENERATOR)] {
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
    for sub in ["math", "code", "english"] {
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
    /// Held-out math: the generator's interpolation test set, all in the test split.
    pub math_test: PathBuf,
    /// Django's sources, split by file into train, validation and test.
    pub code: PathBuf,
    /// Shakespeare's plays in modern spelling, all in the test split: evaluation only.
    pub english: PathBuf,
}

impl Domains {
    /// The held-out set of each reported domain, in report order.
    pub fn eval_sets(&self) -> [(&'static str, &Path); 3] {
        [
            ("math", &self.math_test),
            ("code", &self.code),
            ("english", &self.english),
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
    Ok(Domains {
        math: one(
            "math",
            vec![root.join("math").join("train.jsonl")],
            None,
            0.05,
            0.0,
        )?,
        math_test: one(
            "math-test",
            vec![root.join("math").join("test.jsonl")],
            None,
            0.0,
            1.0,
        )?,
        code: one("code", vec![root.join("code")], Some("*.py"), 0.05, 0.05)?,
        english: one(
            "english",
            vec![root.join("english")],
            Some("*_gut.txt"),
            0.0,
            1.0,
        )?,
    })
}
