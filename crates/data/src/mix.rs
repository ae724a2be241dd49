//! Mixtures of prepared folders for training: `--data code=0.5 --data math=0.5`.

use std::path::{Path, PathBuf};

use crate::{Error, PreparedData, Result};

/// One source of a mixture: a prepared folder, its name and its share of training rows.
pub struct MixSource {
    /// The folder's name (`code` for `data/code`), used in metrics.
    pub name: String,
    pub data: PreparedData,
    /// Share of training rows, normalised so the shares sum to 1.
    pub weight: f64,
}

/// Prepared folders mixed by weight. Every source must come from the same tokenizer.
pub struct DataMix {
    pub sources: Vec<MixSource>,
}

/// Parses `PATH` or `PATH=WEIGHT` (weight > 0; default 1).
pub fn parse_mix_spec(spec: &str) -> std::result::Result<(PathBuf, f64), String> {
    if let Some((path, weight)) = spec.rsplit_once('=') {
        if let Ok(w) = weight.trim().parse::<f64>() {
            if !(w.is_finite() && w > 0.0) {
                return Err(format!(
                    "`{spec}`: the weight after `=` must be a positive number"
                ));
            }
            return Ok((PathBuf::from(path), w));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

impl DataMix {
    /// One folder, all rows from it.
    pub fn single(data: PreparedData) -> Self {
        Self {
            sources: vec![MixSource {
                name: folder_name(&data.dir),
                data,
                weight: 1.0,
            }],
        }
    }

    /// Opens each `PATH[=WEIGHT]` and normalises the weights.
    pub fn open(specs: &[String]) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::Data {
                path: PathBuf::new(),
                msg: "no data given: pass --data DIR (or DIR=WEIGHT, repeated for a mixture)"
                    .into(),
            });
        }
        let mut parts = Vec::with_capacity(specs.len());
        for spec in specs {
            let (path, weight) = parse_mix_spec(spec).map_err(|msg| Error::Data {
                path: PathBuf::from(spec),
                msg,
            })?;
            parts.push((PreparedData::open(&path)?, weight));
        }
        Self::new(parts)
    }

    /// Trains on only the first `documents` training documents of each source (see
    /// [`PreparedData::limit_train_documents`]).
    pub fn limit_train_documents(&mut self, documents: usize) {
        for s in &mut self.sources {
            s.data.limit_train_documents(documents);
        }
    }

    /// Mixes opened folders; weights are normalised to sum to 1.
    pub fn new(parts: Vec<(PreparedData, f64)>) -> Result<Self> {
        let total: f64 = parts.iter().map(|(_, w)| w).sum();
        let mut sources: Vec<MixSource> = Vec::with_capacity(parts.len());
        for (data, weight) in parts {
            if let Some(first) = sources.first() {
                if first.data.manifest.tokenizer_fingerprint != data.manifest.tokenizer_fingerprint
                {
                    return Err(Error::Data {
                        path: data.dir.clone(),
                        msg: format!(
                            "prepared with another tokenizer than {}; a mixture needs one tokenizer",
                            first.data.dir.display()
                        ),
                    });
                }
            }
            let mut name = folder_name(&data.dir);
            // Two folders with one name (a/code, b/code) stay apart in metrics.
            if sources.iter().any(|s| s.name == name) {
                name = format!("{name}#{}", sources.len() + 1);
            }
            sources.push(MixSource {
                name,
                data,
                weight: weight / total,
            });
        }
        Ok(Self { sources })
    }

    /// The tokenizer fingerprint all sources share.
    pub fn tokenizer_fingerprint(&self) -> &str {
        &self.sources[0].data.manifest.tokenizer_fingerprint
    }

    /// Identifies the data: the folder's own fingerprint for one source, else a SHA-256 over
    /// each source's fingerprint and weight.
    pub fn fingerprint(&self) -> String {
        if let [only] = self.sources.as_slice() {
            return only.data.manifest.data_fingerprint.clone();
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for s in &self.sources {
            h.update(s.data.manifest.data_fingerprint.as_bytes());
            h.update(s.weight.to_le_bytes());
        }
        format!("{:x}", h.finalize())
    }

    /// The source a uniform draw `u` in [0, 1) falls into, by cumulative weight.
    pub fn pick(&self, u: f64) -> &MixSource {
        let mut acc = 0.0;
        for s in &self.sources {
            acc += s.weight;
            if u < acc {
                return s;
            }
        }
        self.sources.last().expect("a mixture has a source")
    }

    /// A short description: `code (50%), math (50%)`.
    pub fn describe(&self) -> String {
        self.sources
            .iter()
            .map(|s| format!("{} ({:.0}%)", s.name, 100.0 * s.weight))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into())
}
