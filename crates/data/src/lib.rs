//! Data for training and evaluation: reading corpora (text files, folders of source files,
//! JSONL with `text`, `prompt`/`completion` or chat `messages`, Parquet with a text column or
//! `prompt`/`completion` columns), tokenising, splitting by document, loss masks, and packed
//! token shards that load with a memory map.
//!
//! A prepared folder holds `manifest.json` and, per split (`train`, `val`, `test`),
//! `{split}.tokens` (u32 little-endian token ids, documents back to back, each followed by EOS),
//! `{split}.mask` (one byte per token: 1 where the loss counts) and `{split}.docs` (u64
//! little-endian start offsets of the documents, plus the end).

pub mod dataset;
pub mod mix;
pub mod prepare;
pub mod read;

pub use dataset::{PreparedData, SplitData};
pub use mix::{parse_mix_spec, DataMix, MixSource};
pub use prepare::{prepare, Manifest, PrepareOptions};
pub use read::{Document, Format, Segment, Skipped};

use std::path::PathBuf;

/// Errors from reading and preparing data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {msg}")]
    Record { location: String, msg: String },
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    #[error(transparent)]
    Tokenizer(#[from] mode_io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// The three splits of a prepared dataset.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}
