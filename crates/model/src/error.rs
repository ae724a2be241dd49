use std::path::PathBuf;

/// Errors from building or running a backbone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] mode_io::Error),
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{}: unsupported architecture `{arch}` (supported: {supported})", path.display())]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("{}: tensor `{name}` holds NaN or infinite values", path.display())]
    NonFinite { path: PathBuf, name: String },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Memory { path: PathBuf, msg: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
