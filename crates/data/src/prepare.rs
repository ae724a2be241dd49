//! `mode data prepare`: read, tokenise, split by document, write shards and a manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mode_io::{ChatTemplate, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::read::{discover, read_file, Document, Format, Skipped};
use crate::{io_err, Error, Result, Split};

/// Version of the prepared-folder layout.
pub const FORMAT_VERSION: u32 = 1;

/// What to prepare and how.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// Only files matching this glob when an input is a folder.
    pub glob: Option<String>,
    pub format: Format,
    /// The field (JSONL) or column (Parquet) that holds each record's text, instead of `text`.
    pub column: Option<String>,
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub seed: u64,
    /// Replace `out` if it exists.
    pub force: bool,
}

/// One input file as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub documents: usize,
    pub skipped: usize,
}

/// Counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: usize,
    pub tokens: usize,
    /// Tokens whose loss counts.
    pub loss_tokens: usize,
}

/// `manifest.json` of a prepared folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tokenizer_fingerprint: String,
    pub eos_id: u32,
    /// The BOS the model expects before every sequence (its tokenizer's `add_bos_token`):
    /// training rows and validation windows are fed with it in front, its own prediction not
    /// counted. Absent for models without one (SmolLM2), as in folders written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_id: Option<u32>,
    pub seed: u64,
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub sources: Vec<SourceInfo>,
    pub splits: BTreeMap<Split, SplitInfo>,
    /// How many records were left out, and the first of them with reasons.
    pub skipped_total: usize,
    pub skipped: Vec<Skipped>,
    /// SHA-256 over the token files: identifies the data in expert files and metrics.
    pub data_fingerprint: String,
    pub tool_version: String,
}

/// Which split a document goes to: a hash of the seed and the document's id, so the choice is
/// deterministic, independent of the order of inputs, and never cuts a document.
pub fn split_of(id: &str, seed: u64, val_fraction: f64, test_fraction: f64) -> Split {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(id.as_bytes());
    let digest = h.finalize();
    let u = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    if u < test_fraction {
        Split::Test
    } else if u < test_fraction + val_fraction {
        Split::Val
    } else {
        Split::Train
    }
}

/// Token ids and loss mask of one document, EOS appended (its loss follows the last segment).
fn tokenize(doc: &Document, tokenizer: &Tokenizer, eos: u32) -> Result<(Vec<u32>, Vec<u8>)> {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for seg in &doc.segments {
        let t = tokenizer.encode(&seg.text)?;
        mask.extend(std::iter::repeat_n(seg.loss as u8, t.len()));
        ids.extend(t);
    }
    ids.push(eos);
    mask.push(doc.segments.last().is_some_and(|s| s.loss) as u8);
    Ok((ids, mask))
}

/// Prepares `opts.inputs` into `opts.out`. `progress(files_done, files_total)` is called as
/// files are read. The folder is written next to its destination and renamed into place, so an
/// interrupted run leaves nothing half-written.
pub fn prepare(
    opts: &PrepareOptions,
    tokenizer: &Tokenizer,
    chat: Option<&ChatTemplate>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Manifest> {
    let out = &opts.out;
    let bad = |msg: String| Error::Data {
        path: out.clone(),
        msg,
    };
    // A sum of 1 is allowed: a set kept for evaluation only has no training split.
    if !(0.0..=1.0).contains(&(opts.val_fraction + opts.test_fraction))
        || opts.val_fraction < 0.0
        || opts.test_fraction < 0.0
    {
        return Err(bad(format!(
            "--val-fraction {} and --test-fraction {} must be >= 0 and sum to at most 1",
            opts.val_fraction, opts.test_fraction
        )));
    }
    let inputs: Vec<&Path> = opts.inputs.iter().map(|p| p.as_path()).collect();
    mode_io::input::check_apart(out, &inputs).map_err(bad)?;
    if out.exists() && !opts.force {
        return Err(bad("already exists; pass --force to replace it".into()));
    }
    let eos = tokenizer.document_end_id().ok_or_else(|| {
        bad("the tokenizer has no end-of-text token to separate documents".into())
    })?;

    // Each file with the name its documents are split by: relative to the input's parent
    // folder (`code/django/db/models.py`, `train.jsonl`), so the split of a document does not
    // depend on where the data lives on disk.
    let mut files = Vec::new();
    let mut split_names = Vec::new();
    for input in &opts.inputs {
        let base = input.parent().unwrap_or(Path::new(""));
        let found = discover(input, opts.glob.as_deref())?;
        if found.is_empty() {
            return Err(Error::Data {
                path: input.clone(),
                msg: match &opts.glob {
                    Some(g) => format!("no files match --glob `{g}` in this folder"),
                    None => "no files in this folder".into(),
                },
            });
        }
        for file in found {
            let name = file
                .strip_prefix(base)
                .unwrap_or(&file)
                .display()
                .to_string();
            split_names.push(name);
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(bad("the inputs contain no files (check --glob)".into()));
    }
    let mut docs = Vec::new();
    let mut skipped = Vec::new();
    let mut sources = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let bytes = mode_io::input::read(file).map_err(io_err(file))?;
        let (sha256, size) = (format!("{:x}", Sha256::digest(&bytes)), bytes.len() as u64);
        let (mut d, s) = read_file(file, bytes, opts.format, opts.column.as_deref(), chat)?;
        let shown = file.display().to_string();
        for doc in &mut d {
            if let Some(rest) = doc.id.strip_prefix(&shown) {
                doc.id = format!("{}{rest}", split_names[i]);
            }
        }
        sources.push(SourceInfo {
            path: file.display().to_string(),
            sha256,
            bytes: size,
            documents: d.len(),
            skipped: s.len(),
        });
        docs.extend(d);
        skipped.extend(s);
        progress(i + 1, files.len());
    }
    if docs.is_empty() {
        return Err(bad(format!(
            "no usable documents ({} records skipped{})",
            skipped.len(),
            skipped
                .first()
                .map(|s| format!("; first: {}: {}", s.location, s.reason))
                .unwrap_or_default()
        )));
    }

    let tokenized: Vec<(Vec<u32>, Vec<u8>)> = docs
        .par_iter()
        .map(|d| tokenize(d, tokenizer, eos))
        .collect::<Result<_>>()?;

    let tmp = mode_io::atomic::temp_dir_beside(out).map_err(io_err(out))?;
    let mut splits = BTreeMap::new();
    let mut fingerprint = Sha256::new();
    for split in Split::ALL {
        let mut info = SplitInfo::default();
        let mut tokens = Vec::new();
        let mut mask = Vec::new();
        let mut offsets = vec![0u64];
        for (doc, (ids, m)) in docs.iter().zip(&tokenized) {
            if split_of(&doc.id, opts.seed, opts.val_fraction, opts.test_fraction) != split {
                continue;
            }
            tokens.extend(ids.iter().flat_map(|t| t.to_le_bytes()));
            mask.extend_from_slice(m);
            info.documents += 1;
            info.tokens += ids.len();
            info.loss_tokens += m.iter().filter(|&&b| b == 1).count();
            offsets.push(info.tokens as u64);
        }
        fingerprint.update(&tokens);
        let offsets: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        write_file(
            &tmp.path().join(format!("{}.tokens", split.name())),
            &tokens,
        )?;
        write_file(&tmp.path().join(format!("{}.mask", split.name())), &mask)?;
        write_file(&tmp.path().join(format!("{}.docs", split.name())), &offsets)?;
        splits.insert(split, info);
    }
    let skipped_total = skipped.len();
    skipped.truncate(100);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tokenizer_fingerprint: tokenizer.fingerprint(),
        eos_id: eos,
        bos_id: tokenizer.leading_bos(),
        seed: opts.seed,
        val_fraction: opts.val_fraction,
        test_fraction: opts.test_fraction,
        sources,
        splits,
        skipped_total,
        skipped,
        data_fingerprint: format!("{:x}", fingerprint.finalize()),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    write_file(&tmp.path().join("manifest.json"), &json)?;
    mode_io::atomic::commit_dir(tmp, out).map_err(io_err(out))?;
    Ok(manifest)
}

/// A file inside the temporary folder; [`mode_io::atomic::commit_dir`] syncs it.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(io_err(path))
}
