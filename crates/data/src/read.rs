//! Readers: files and folders to documents, each a list of text segments with or without loss.

use std::path::{Path, PathBuf};

use mode_io::{ChatMessage, ChatTemplate};
use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, RowGroupReader, SerializedFileReader};
use parquet::schema::types::ColumnDescriptor;

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
    /// `file`, `file:line` or `file:row N`, stable across runs: it decides the document's split
    /// (`prepare` names the file relative to its input's parent folder).
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
    /// One JSON object per line: `text` (or the `--column` field), or `prompt` + `completion`,
    /// or chat `messages`.
    Jsonl,
    /// One document per row: a string column (`text`, the `--column` one, or the only string
    /// column), or `prompt` + `completion` columns.
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
    // A named pipe or device given as an input is refused, not walked as an empty folder.
    mode_io::input::check(input).map_err(io_err(input))?;
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
/// that cannot be used are returned as skipped, with file and line (or row). `column` names the
/// field (JSONL) or column (Parquet) that holds the text, instead of `text`.
pub fn read_file(
    path: &Path,
    bytes: Vec<u8>,
    format: Format,
    column: Option<&str>,
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
    let (docs, mut skipped) = match format {
        // The parquet crate still panics on some damaged files (apache/arrow-rs#9705, and
        // flipped bytes in tests): a bad input must be an error naming the file, not a crash
        // (nor a panic message on stderr).
        Format::Parquet => mode_io::guard::catch_panic(|| read_parquet(path, bytes, column))
            .unwrap_or_else(|what| {
                Err(Error::Data {
                    path: path.to_path_buf(),
                    msg: format!("damaged Parquet file (the reader failed: {what})"),
                })
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
                match jsonl_record(line, column, chat) {
                    Ok(segments) => docs.push(Document {
                        id: location,
                        segments,
                    }),
                    Err(reason) => skipped.push(Skipped { location, reason }),
                }
            }
            Ok((docs, skipped))
        }
    }?;
    // A huge line (minified code, a data dump) is one huge pre-token: slow to tokenise and
    // gigabytes of encoding for nothing to learn from. Skip its record.
    let mut kept = Vec::with_capacity(docs.len());
    for doc in docs {
        match doc.segments.iter().find_map(|s| long_line(&s.text)) {
            Some((line, len)) => skipped.push(Skipped {
                location: doc.id,
                reason: format!(
                    "line {line} of the text is {len} bytes long, over the limit of \
                     {MAX_LINE_BYTES} bytes (minified or binary data?)"
                ),
            }),
            None => kept.push(doc),
        }
    }
    Ok((kept, skipped))
}

/// The longest line a document may have, in bytes (1 MiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The first line of `text` longer than [`MAX_LINE_BYTES`], as (1-based number, length).
pub fn long_line(text: &str) -> Option<(usize, usize)> {
    if text.len() <= MAX_LINE_BYTES {
        return None;
    }
    text.split('\n')
        .enumerate()
        .find(|(_, l)| l.len() > MAX_LINE_BYTES)
        .map(|(i, l)| (i + 1, l.len()))
}

/// Which fields of a record make its text.
#[derive(Debug, Clone, Copy)]
enum Shape<'a> {
    /// One field is the whole text, with loss.
    Text(&'a str),
    /// `prompt` then `completion`: the loss counts on the completion only.
    PromptCompletion,
}

/// A record's fields to segments, shared by the readers of records with named fields (JSONL,
/// Parquet) so that they agree on what a record means. `field(name)` is the field's text, or why
/// there is none.
fn record_segments<'v>(
    shape: Shape,
    field: impl Fn(&str) -> std::result::Result<&'v str, String>,
) -> std::result::Result<Vec<Segment>, String> {
    match shape {
        Shape::Text(name) => {
            let text = field(name)?;
            if text.is_empty() {
                return Err(format!("empty `{name}`"));
            }
            Ok(vec![Segment {
                text: text.to_string(),
                loss: true,
            }])
        }
        Shape::PromptCompletion => {
            let (prompt, completion) = (field("prompt")?, field("completion")?);
            // Without a completion only the EOS would carry loss: nothing to learn from.
            if completion.is_empty() {
                return Err("empty `completion`".into());
            }
            Ok(vec![
                Segment {
                    text: prompt.to_string(),
                    loss: false,
                },
                Segment {
                    text: completion.to_string(),
                    loss: true,
                },
            ])
        }
    }
}

/// One JSONL record to segments: `text` (or the `column` field); `prompt` + `completion` (loss on
/// the completion); `messages` (loss on assistant turns).
fn jsonl_record(
    line: &str,
    column: Option<&str>,
    chat: Option<&ChatTemplate>,
) -> std::result::Result<Vec<Segment>, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let field = |k: &str| match value.get(k) {
        Some(serde_json::Value::String(s)) => Ok(s.as_str()),
        None | Some(serde_json::Value::Null) => Err(format!("no `{k}` field")),
        Some(_) => Err(format!("`{k}` is not a string")),
    };
    let has = |k: &str| value.get(k).is_some_and(|v| !v.is_null());
    if let Some(column) = column {
        return record_segments(Shape::Text(column), field);
    }
    if has("text") {
        return record_segments(Shape::Text("text"), field);
    }
    if has("prompt") || has("completion") {
        return record_segments(Shape::PromptCompletion, field);
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

/// A Parquet file to documents, one per row, with ids `file:row N` (1-based, across row
/// groups). Reads only the text columns, with the column API: no Arrow, and a cell that is not
/// UTF-8 skips its row instead of stopping the file.
fn read_parquet(
    path: &Path,
    bytes: Vec<u8>,
    column: Option<&str>,
) -> Result<(Vec<Document>, Vec<Skipped>)> {
    let bad = |msg: String| Error::Data {
        path: path.to_path_buf(),
        msg,
    };
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes))
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    // Columns that can hold text: top-level, not repeated, byte arrays.
    let leaf = |name: &str| {
        schema.columns().iter().position(|c| {
            c.path().parts() == [name]
                && c.max_rep_level() == 0
                && c.physical_type() == PhysicalType::BYTE_ARRAY
        })
    };
    let is_string = |c: &ColumnDescriptor| {
        c.converted_type() == ConvertedType::UTF8
            || matches!(c.logical_type_ref(), Some(LogicalType::String))
    };
    let all: Vec<&str> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name())
        .collect();
    let strings: Vec<&str> = all
        .iter()
        .copied()
        .filter(|&n| leaf(n).is_some_and(|i| is_string(&schema.columns()[i])))
        .collect();
    let list = |names: &[&str]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let shape = match column {
        Some(c) if !all.contains(&c) => {
            return Err(bad(format!(
                "no column `{c}` (--column); the columns are: {}",
                list(&all)
            )))
        }
        Some(c) if leaf(c).is_none() => {
            return Err(bad(format!(
                "column `{c}` (--column) is not a string column; the string columns are: {}",
                list(&strings)
            )))
        }
        Some(c) => Shape::Text(c),
        None if leaf("text").is_some() => Shape::Text("text"),
        None if leaf("prompt").is_some() && leaf("completion").is_some() => Shape::PromptCompletion,
        None => match strings.as_slice() {
            [only] => Shape::Text(only),
            _ => {
                return Err(bad(format!(
                    "no `text` or `prompt`+`completion` columns and {} string columns ({}); \
                     pass --column to name the text column",
                    strings.len(),
                    list(&strings)
                )))
            }
        },
    };
    let names: Vec<&str> = match shape {
        Shape::Text(c) => vec![c],
        Shape::PromptCompletion => vec!["prompt", "completion"],
    };

    let mut docs = Vec::new();
    let mut skipped = Vec::new();
    let mut row = 0usize;
    for g in 0..reader.num_row_groups() {
        let group = reader
            .get_row_group(g)
            .map_err(|e| bad(format!("row group {g}: {e}")))?;
        let rows = usize::try_from(group.metadata().num_rows())
            .map_err(|_| bad(format!("row group {g}: negative row count")))?;
        let columns = names
            .iter()
            .map(|&n| {
                let i = leaf(n).expect("chosen columns are text columns");
                read_byte_column(&*group, i, schema.column(i).max_def_level(), rows)
                    .map_err(|e| bad(format!("row group {g}, column `{n}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        // Every column has exactly `rows` cells: walk them side by side, a row at a time.
        let mut columns: Vec<_> = columns.into_iter().map(Vec::into_iter).collect();
        for _ in 0..rows {
            row += 1;
            let location = format!("{}:row {row}", path.display());
            let cells: Vec<Option<ByteArray>> =
                columns.iter_mut().map(|c| c.next().flatten()).collect();
            let field = |name: &str| {
                let c = names
                    .iter()
                    .position(|&n| n == name)
                    .ok_or_else(|| format!("no `{name}` column"))?;
                match &cells[c] {
                    None => Err(format!("`{name}` is null")),
                    Some(b) => {
                        std::str::from_utf8(b.data()).map_err(|_| format!("`{name}` is not UTF-8"))
                    }
                }
            };
            match record_segments(shape, field) {
                Ok(segments) => docs.push(Document {
                    id: location,
                    segments,
                }),
                Err(reason) => skipped.push(Skipped { location, reason }),
            }
        }
    }
    Ok((docs, skipped))
}

/// All `rows` cells of one byte-array column of a row group, `None` where null.
fn read_byte_column(
    group: &dyn RowGroupReader,
    leaf: usize,
    max_def: i16,
    rows: usize,
) -> std::result::Result<Vec<Option<ByteArray>>, String> {
    if leaf >= group.num_columns() {
        return Err("missing from the row group".into());
    }
    let ColumnReader::ByteArrayColumnReader(mut reader) =
        group.get_column_reader(leaf).map_err(|e| e.to_string())?
    else {
        return Err("not a byte-array column".into());
    };
    let (mut defs, mut values) = (Vec::new(), Vec::new());
    let (records, _, _) = reader
        .read_records(rows, Some(&mut defs), None, &mut values)
        .map_err(|e| e.to_string())?;
    if records != rows {
        return Err(format!("{records} values for {rows} rows"));
    }
    if max_def == 0 {
        return Ok(values.into_iter().map(Some).collect());
    }
    // Values come without the nulls; the definition levels say which rows have one.
    let mut values = values.into_iter();
    defs.iter()
        .map(|&d| {
            if d == max_def {
                values
                    .next()
                    .map(Some)
                    .ok_or("fewer values than levels".to_string())
            } else {
                Ok(None)
            }
        })
        .collect()
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
