//! Readers: files and folders to documents, each a list of text segments with or without loss.

use std::path::{Path, PathBuf};

use mode_io::{ChatMessage, ChatTemplate};

use crate::{io_err, Error, Result};

/// A piece of a document's text, and whether the loss counts on its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub loss: bool,
}

/// One document: the unit that splits never cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// `file` or `file:line`, stable across runs: it decides the document's split.
    pub id: String,
    pub segments: Vec<Segment>,
}

/// A record that was left out, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub location: String,
    pub reason: String,
}

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// By extension: `.jsonl` is JSONL, `.parquet` Parquet, anything else text.
    Auto,
    /// Each file is one document.
    Text,
    /// One JSON object per line: `text`, or `prompt` + `completion`, or chat `messages`.
    Jsonl,
    Parquet,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Format::Auto),
            "text" => Ok(Format::Text),
            "jsonl" => Ok(Format::Jsonl),
            "parquet" => Ok(Format::Parquet),
            other => Err(format!(
                "`{other}` is not one of auto, text, jsonl, parquet"
            )),
        }
    }
}

/// The files an input names: the file itself, or the files under a folder matching `glob`
/// (all files when `glob` is `None`), in sorted order.
pub fn discover(input: &Path, glob: Option<&str>) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(input).map_err(io_err(input))?;
    if meta.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let matcher = glob
        .map(|g| {
            globset::Glob::new(g)
                .map(|g| g.compile_matcher())
                .map_err(|e| Error::Data {
                    path: input.to_path_buf(),
                    msg: format!("bad --glob `{g}`: {e}"),
                })
        })
        .transpose()?;
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
        let entry = entry.map_err(|e| Error::Data {
            path: input.to_path_buf(),
            msg: e.to_string(),
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        let keep = match &matcher {
            Some(m) => m.is_match(entry.file_name()) || m.is_match(entry.path()),
            None => true,
        };
        if keep {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

/// Turns one file's bytes (read by the caller, who also hashes them) into documents. Records
/// that cannot be used are returned as skipped, with file and line.
pub fn read_file(
    path: &Path,
    bytes: Vec<u8>,
    format: Format,
    chat: Option<&ChatTemplate>,
) -> Result<(Vec<Document>, Vec<Skipped>)> {
    let format = match format {
        Format::Auto => match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => Format::Jsonl,
            Some("parquet") => Format::Parquet,
            _ => Format::Text,
        },
        f => f,
    };
    let location = path.display().to_string();
    match format {
        Format::Parquet => Err(Error::Data {
            path: path.to_path_buf(),
            msg: "Parquet input is not supported yet; convert it to JSONL with a `text` field"
                .into(),
        }),
        Format::Text | Format::Auto => match String::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => Ok((
                vec![],
                vec![Skipped {
                    location,
                    reason: "empty file".into(),
                }],
            )),
            Ok(text) => Ok((
                vec![Document {
                    id: location,
                    segments: vec![Segment { text, loss: true }],
                }],
                vec![],
            )),
            Err(e) => Ok((
                vec![],
                vec![Skipped {
                    location,
                    reason: format!(
                        "not UTF-8 text (bad byte at offset {})",
                        e.utf8_error().valid_up_to()
                    ),
                }],
            )),
        },
        Format::Jsonl => {
            let text = String::from_utf8_lossy(&bytes);
            let mut docs = Vec::new();
            let mut skipped = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let location = format!("{}:{}", path.display(), i + 1);
                match jsonl_record(line, chat) {
                    Ok(segments) => docs.push(Document {
                        id: location,
                        segments,
                    }),
                    Err(reason) => skipped.push(Skipped { location, reason }),
                }
            }
            Ok((docs, skipped))
        }
    }
}

/// One JSONL record to segments: `text`; `prompt` + `completion` (loss on the completion);
/// `messages` (loss on assistant turns).
fn jsonl_record(
    line: &str,
    chat: Option<&ChatTemplate>,
) -> std::result::Result<Vec<Segment>, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let field = |k: &str| value.get(k).and_then(|v| v.as_str());
    if let Some(text) = field("text") {
        if text.is_empty() {
            return Err("empty `text`".into());
        }
        return Ok(vec![Segment {
            text: text.to_string(),
            loss: true,
        }]);
    }
    if let (Some(prompt), Some(completion)) = (field("prompt"), field("completion")) {
        return Ok(vec![
            Segment {
                text: prompt.to_string(),
                loss: false,
            },
            Segment {
                text: completion.to_string(),
                loss: true,
            },
        ]);
    }
    if let Some(messages) = value.get("messages").and_then(|m| m.as_array()) {
        let chat =
            chat.ok_or("chat `messages` need a chat template, and the tokenizer has none")?;
        let messages = messages
            .iter()
            .map(|m| {
                let role = m
                    .get("role")
                    .and_then(|r| r.as_str())
                    .ok_or("a message has no `role`")?;
                let content = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .ok_or("a message has no string `content`")?;
                Ok(ChatMessage::new(role, content))
            })
            .collect::<std::result::Result<Vec<_>, &str>>()?;
        return chat_segments(chat, &messages);
    }
    Err("no `text`, `prompt`+`completion` or `messages` field".into())
}

/// Splits a rendered conversation into segments: each assistant turn's content (and its end
/// marker) carries the loss; everything else, including the assistant header, does not.
/// Works for any template whose renderings of growing prefixes extend each other.
pub fn chat_segments(
    chat: &ChatTemplate,
    messages: &[ChatMessage],
) -> std::result::Result<Vec<Segment>, String> {
    let render = |n: usize, gen: bool| chat.render(&messages[..n], gen).map_err(|e| e.to_string());
    let mut segments = Vec::new();
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        let full = render(i + 1, false)?;
        let Some(rest) = full.strip_prefix(&done) else {
            return Err("the chat template does not render conversations prefix by prefix".into());
        };
        if m.role == "assistant" {
            let header = render(i, true)?;
            let head = header
                .strip_prefix(&done)
                .filter(|_| full.starts_with(&header))
                .unwrap_or("");
            segments.push(Segment {
                text: head.to_string(),
                loss: false,
            });
            segments.push(Segment {
                text: rest[head.len()..].to_string(),
                loss: true,
            });
        } else {
            segments.push(Segment {
                text: rest.to_string(),
                loss: false,
            });
        }
        done = full;
    }
    if !segments.iter().any(|s| s.loss) {
        return Err("no assistant turn to train on".into());
    }
    segments.retain(|s| !s.text.is_empty());
    Ok(segments)
}
