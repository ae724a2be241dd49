use std::path::PathBuf;

/// Errors from reading model files, tokenizers and fetching backbones.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid GGUF file: {msg}", path.display())]
    Gguf { path: PathBuf, msg: String },
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` cannot be read: {msg}", path.display())]
    BadTensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("{}: metadata `{key}`: {msg}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("fetching the default backbone failed: {0}")]
    Fetch(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
