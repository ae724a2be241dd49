//! Reading what a backbone is made of: GGUF files, Hugging Face safetensors folders, tokenizers
//! and chat templates, and fetching the default backbone through the package registry; plus
//! the file safety every crate uses: atomic writes, inputs that cannot block or escape their
//! folder, safe names, terminal-safe printing and the memory probe.
//!
//! Everything here names the file (and the tensor or line) in its errors, so a user can act on them.

pub mod atomic;
pub mod chat;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod guard;
pub mod hf;
pub mod input;
pub mod memory;
pub mod names;
pub mod spm;
pub mod term;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use hf::HfFolder;
pub use tokenizer::Tokenizer;

/// Where `mode` keeps downloaded backbones and data: `$MODE_HOME`, or `~/.cache/mode`.
pub fn mode_home() -> std::path::PathBuf {
    if let Some(home) = std::env::var_os("MODE_HOME") {
        return home.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::PathBuf::from(home).join(".cache").join("mode")
}

/// Reads and parses a JSON file; parse errors name the file, line and column.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = input::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!(
            "invalid JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    })
}
