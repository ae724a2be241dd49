//! Reading a prepared folder: memory-mapped token and mask files per split.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::prepare::{Manifest, FORMAT_VERSION};
use crate::{io_err, Error, Result, Split};

/// One split: token ids, loss mask, document offsets.
pub struct SplitData {
    tokens: Vec<u32>,
    mask: memmap2::Mmap,
    docs: Vec<u64>,
    /// Tokens in use: all, or those of the first documents (see
    /// [`PreparedData::limit_train_documents`]).
    len: usize,
}

impl SplitData {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens[..self.len]
    }

    /// 1 where the loss counts, per token.
    pub fn mask(&self) -> &[u8] {
        &self.mask[..self.len]
    }

    /// Start offsets of the documents, then the end.
    pub fn doc_offsets(&self) -> &[u64] {
        let used = self.docs.partition_point(|&o| o < self.len as u64);
        &self.docs[..(used + 1).min(self.docs.len())]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A prepared folder, opened.
pub struct PreparedData {
    pub dir: PathBuf,
    pub manifest: Manifest,
    splits: HashMap<Split, SplitData>,
}

impl PreparedData {
    /// Opens `dir`, checking the manifest and that every file has the size it should.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join("manifest.json");
        let text =
            mode_io::input::read_to_string(&manifest_path).map_err(io_err(&manifest_path))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Data {
            path: manifest_path.clone(),
            msg: format!(
                "invalid manifest at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(Error::Data {
                path: manifest_path,
                msg: format!(
                    "format version {} is not the supported {FORMAT_VERSION}; prepare the data again",
                    manifest.format_version
                ),
            });
        }
        let mut splits = HashMap::new();
        for split in Split::ALL {
            let info = manifest.splits.get(&split).cloned().unwrap_or_default();
            let file = |ext: &str| dir.join(format!("{}.{ext}", split.name()));
            let bad = |path: PathBuf, msg: String| Error::Data { path, msg };
            let token_bytes =
                mode_io::input::read(file("tokens")).map_err(io_err(file("tokens")))?;
            if token_bytes.len() != 4 * info.tokens {
                return Err(bad(
                    file("tokens"),
                    format!(
                        "{} bytes, the manifest says {} tokens",
                        token_bytes.len(),
                        info.tokens
                    ),
                ));
            }
            let tokens = token_bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            let mask_file = mode_io::input::open(file("mask")).map_err(io_err(file("mask")))?;
            // SAFETY: read-only map of a file this tool wrote and renamed into place.
            let mask = unsafe { memmap2::Mmap::map(&mask_file) }.map_err(io_err(file("mask")))?;
            if mask.len() != info.tokens {
                return Err(bad(
                    file("mask"),
                    format!("{} bytes for {} tokens", mask.len(), info.tokens),
                ));
            }
            let doc_bytes = mode_io::input::read(file("docs")).map_err(io_err(file("docs")))?;
            if doc_bytes.len() != 8 * (info.documents + 1) {
                return Err(bad(
                    file("docs"),
                    format!("{} bytes for {} documents", doc_bytes.len(), info.documents),
                ));
            }
            let docs = doc_bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let len = info.tokens;
            splits.insert(
                split,
                SplitData {
                    tokens,
                    mask,
                    docs,
                    len,
                },
            );
        }
        Ok(Self {
            dir,
            manifest,
            splits,
        })
    }

    pub fn split(&self, split: Split) -> &SplitData {
        &self.splits[&split]
    }

    /// Trains on the first `documents` training documents only (validation and test stay
    /// whole): how "fewer training examples at equal steps" is run. The data fingerprint
    /// changes with the limit, so checkpoints of the whole data are not resumed on a part.
    pub fn limit_train_documents(&mut self, documents: usize) {
        let train = self
            .splits
            .get_mut(&Split::Train)
            .expect("every split is read");
        let available = train.docs.len() - 1;
        if documents >= available {
            return;
        }
        train.len = train.docs[documents] as usize;
        self.manifest.data_fingerprint = format!(
            "{}+first-{documents}-documents",
            self.manifest.data_fingerprint
        );
    }

    /// Checks that every token id is below `vocab_size`: an id past the model's embeddings
    /// means a damaged file (or one from another tokenizer), and would fail deep in the model.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        for split in Split::ALL {
            let tokens = self.split(split).tokens();
            if let Some(i) = tokens.iter().position(|&t| t as usize >= vocab_size) {
                return Err(Error::Data {
                    path: self.dir.join(format!("{}.tokens", split.name())),
                    msg: format!(
                        "token {i} has id {}, beyond the vocabulary of {vocab_size}: the file is \
                         damaged; prepare the data again",
                        tokens[i]
                    ),
                });
            }
        }
        Ok(())
    }
}
