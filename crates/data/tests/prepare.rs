//! `prepare` on real files in a temporary folder, with a real byte-level BPE tokenizer (no
//! merges: one token per byte, plus an end-of-text token).

use std::path::Path;
use std::sync::Arc;

use mode_data::read::{chat_segments, read_file};
use mode_data::{prepare, Format, Manifest, PrepareOptions, PreparedData, Split};
use mode_io::{ChatMessage, ChatTemplate, Tokenizer};
use parquet::basic::{Compression, GzipLevel, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

fn options(inputs: Vec<&Path>, out: &Path) -> PrepareOptions {
    PrepareOptions {
        inputs: inputs.into_iter().map(|p| p.to_path_buf()).collect(),
        out: out.to_path_buf(),
        glob: None,
        format: Format::Auto,
        column: None,
        val_fraction: 0.2,
        test_fraction: 0.2,
        seed: 7,
        force: false,
    }
}

#[test]
fn folders_of_source_files_split_by_document_and_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("pkg")).unwrap();
    let mut texts = Vec::new();
    for i in 0..30 {
        let text = format!("def f{i}(x):\n    return x * {i}  # é\n");
        std::fs::write(src.join("pkg").join(format!("m{i}.py")), &text).unwrap();
        texts.push(text);
    }
    std::fs::write(src.join("README.txt"), "not python").unwrap();
    std::fs::write(src.join("pkg/binary.py"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let out = tmp.path().join("prepared");
    let mut opts = options(vec![&src], &out);
    opts.glob = Some("*.py".into());
    let manifest = prepare(&opts, &tok, None, |_, _| {}).unwrap();

    assert_eq!(
        manifest.sources.len(),
        31,
        "30 .py files + the binary one, not the README"
    );
    assert_eq!(manifest.skipped_total, 1);
    assert!(
        manifest.skipped[0].location.ends_with("binary.py"),
        "{:?}",
        manifest.skipped
    );
    let docs: usize = manifest.splits.values().map(|s| s.documents).sum();
    assert_eq!(docs, 30);
    assert!(
        Split::ALL.iter().all(|s| manifest.splits[s].documents > 0),
        "{:?}",
        manifest.splits
    );

    // Every document comes back whole from exactly one split, followed by EOS.
    let data = PreparedData::open(&out).unwrap();
    let mut seen = Vec::new();
    for split in Split::ALL {
        let s = data.split(split);
        let offsets = s.doc_offsets();
        for w in offsets.windows(2) {
            let ids = &s.tokens()[w[0] as usize..w[1] as usize];
            assert_eq!(*ids.last().unwrap(), manifest.eos_id);
            seen.push(tok.decode(&ids[..ids.len() - 1]).unwrap());
        }
        assert!(s.mask().iter().all(|&m| m == 1));
    }
    seen.sort();
    texts.sort();
    assert_eq!(seen, texts);

    // Training on the first documents only: the train split ends after them, the others stay.
    let mut part = PreparedData::open(&out).unwrap();
    let whole_train = data.split(Split::Train).doc_offsets().to_vec();
    part.limit_train_documents(3);
    let train = part.split(Split::Train);
    assert_eq!(train.doc_offsets(), &whole_train[..4]);
    assert_eq!(train.len(), whole_train[3] as usize);
    assert_eq!(train.tokens().len(), train.mask().len());
    assert_eq!(part.split(Split::Val).len(), data.split(Split::Val).len());
    assert_ne!(
        part.manifest.data_fingerprint,
        data.manifest.data_fingerprint
    );
    let mut all = PreparedData::open(&out).unwrap();
    all.limit_train_documents(whole_train.len());
    assert_eq!(
        all.split(Split::Train).len(),
        data.split(Split::Train).len()
    );
    assert_eq!(
        all.manifest.data_fingerprint,
        data.manifest.data_fingerprint
    );

    // Deterministic: the same inputs and seed give the same data.
    opts.force = true;
    let again = prepare(&opts, &tok, None, |_, _| {}).unwrap();
    assert_eq!(again.data_fingerprint, manifest.data_fingerprint);
    opts.seed = 8;
    let other = prepare(&opts, &tok, None, |_, _| {}).unwrap();
    assert_ne!(other.data_fingerprint, manifest.data_fingerprint);
}

#[test]
fn jsonl_records_masks_and_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let file = tmp.path().join("mixed.jsonl");
    let lines = [
        r#"{"text": "plain text"}"#,
        r#"{"prompt": "Q: 2+2?", "completion": " A: 4"}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
        r#"{"text": "#,
        r#"{"other": 1}"#,
        "",
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = tmp.path().join("p");
    let mut opts = options(vec![&file], &out);
    opts.val_fraction = 0.0;
    opts.test_fraction = 0.0;
    let chat = ChatTemplate::new(None, "", "<|endoftext|>");
    let manifest = prepare(&opts, &tok, Some(&chat), |_, _| {}).unwrap();
    assert_eq!(manifest.splits[&Split::Train].documents, 3);
    assert_eq!(manifest.skipped_total, 2);
    let locations: Vec<&str> = manifest
        .skipped
        .iter()
        .map(|s| s.location.as_str())
        .collect();
    assert!(
        locations[0].ends_with("mixed.jsonl:4") && locations[1].ends_with("mixed.jsonl:5"),
        "{locations:?}"
    );
    assert!(manifest.skipped[0].reason.contains("invalid JSON"));

    let data = PreparedData::open(&out).unwrap();
    let s = data.split(Split::Train);
    let o = s.doc_offsets();
    // The prompt/completion document: loss only on " A: 4" and the EOS after it.
    let (a, b) = (o[1] as usize, o[2] as usize);
    let masked: Vec<u32> = (a..b)
        .filter(|&i| s.mask()[i] == 1)
        .map(|i| s.tokens()[i])
        .collect();
    assert_eq!(tok.decode(&masked).unwrap(), " A: 4");
    assert_eq!(
        s.mask()[a..b].iter().filter(|&&m| m == 0).count(),
        "Q: 2+2?".len()
    );
    // The chat document: loss on the assistant's content and end marker only.
    let (a, b) = (o[2] as usize, o[3] as usize);
    let masked: Vec<u32> = (a..b)
        .filter(|&i| s.mask()[i] == 1)
        .map(|i| s.tokens()[i])
        .collect();
    assert_eq!(tok.decode(&masked).unwrap(), "Hello!<|im_end|>\n");
}

#[test]
fn chat_segments_put_loss_on_assistant_turns() {
    let chat = ChatTemplate::new(None, "", "");
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "2+2?"),
        ChatMessage::new("assistant", "4"),
        ChatMessage::new("user", "3+3?"),
        ChatMessage::new("assistant", "6"),
    ];
    let segs = chat_segments(&chat, &messages).unwrap();
    let loss: Vec<&str> = segs
        .iter()
        .filter(|s| s.loss)
        .map(|s| s.text.as_str())
        .collect();
    assert_eq!(loss, ["4<|im_end|>\n", "6<|im_end|>\n"]);
    let all: String = segs.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(all, chat.render(&messages, false).unwrap());
}

#[test]
fn bad_requests_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let out = tmp.path().join("out");
    let err = prepare(&options(vec![&empty], &out), &tok, None, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no usable documents") && err.contains("empty file"),
        "{err}"
    );

    let good = tmp.path().join("good.txt");
    std::fs::write(&good, "hello").unwrap();
    let mut opts = options(vec![&good], &out);
    opts.val_fraction = 0.7;
    opts.test_fraction = 0.4;
    assert!(prepare(&opts, &tok, None, |_, _| {})
        .unwrap_err()
        .to_string()
        .contains("sum to at most 1"));

    std::fs::create_dir_all(&out).unwrap();
    let err = prepare(&options(vec![&good], &out), &tok, None, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );

    let missing = tmp.path().join("nope");
    let err = prepare(
        &options(vec![&missing], &tmp.path().join("o2")),
        &tok,
        None,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nope"), "{err}");

    // A truncated token file is caught when opening.
    let ok = tmp.path().join("ok");
    let mut opts = options(vec![&good], &ok);
    opts.val_fraction = 0.0;
    opts.test_fraction = 0.0;
    prepare(&opts, &tok, None, |_, _| {}).unwrap();
    let f = ok.join("train.tokens");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 2]).unwrap();
    let err = PreparedData::open(&ok).err().unwrap().to_string();
    assert!(err.contains("train.tokens"), "{err}");
}

/// A column of a test Parquet file: byte strings (`None`: null) or integers.
enum Col {
    Bytes(Vec<Option<Vec<u8>>>),
    Int(Vec<i64>),
}

fn strs(cells: &[Option<&str>]) -> Col {
    Col::Bytes(
        cells
            .iter()
            .map(|c| c.map(|s| s.as_bytes().to_vec()))
            .collect(),
    )
}

/// Writes a real Parquet file with the parquet crate's writer: `schema` in the message-type
/// syntax, `columns` in schema order, `group` rows per row group.
fn write_parquet(
    path: &Path,
    schema: &str,
    columns: &[Col],
    group: usize,
    compression: Compression,
) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let rows = match &columns[0] {
        Col::Bytes(c) => c.len(),
        Col::Int(c) => c.len(),
    };
    for start in (0..rows).step_by(group) {
        let end = (start + group).min(rows);
        let mut rg = writer.next_row_group().unwrap();
        for col in columns {
            let mut w = rg.next_column().unwrap().unwrap();
            // Definition levels: 1 where there is a value (ignored for required columns).
            match col {
                Col::Bytes(cells) => {
                    let cells = &cells[start..end];
                    let values: Vec<ByteArray> =
                        cells.iter().flatten().map(|b| b.clone().into()).collect();
                    let defs: Vec<i16> = cells.iter().map(|c| c.is_some() as i16).collect();
                    w.typed::<ByteArrayType>()
                        .write_batch(&values, Some(&defs), None)
                        .unwrap();
                }
                Col::Int(cells) => {
                    w.typed::<Int64Type>()
                        .write_batch(&cells[start..end], Some(&vec![1; end - start]), None)
                        .unwrap();
                }
            }
            w.close().unwrap();
        }
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

/// Each document of the train split, decoded, with the text of its loss-carrying tokens
/// (EOS left out).
fn train_docs(out: &Path, manifest: &Manifest, tok: &Tokenizer) -> Vec<(String, String)> {
    let data = PreparedData::open(out).unwrap();
    let s = data.split(Split::Train);
    s.doc_offsets()
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0] as usize, w[1] as usize - 1);
            assert_eq!(s.tokens()[b], manifest.eos_id);
            let loss: Vec<u32> = (a..b)
                .filter(|&i| s.mask()[i] == 1)
                .map(|i| s.tokens()[i])
                .collect();
            (
                tok.decode(&s.tokens()[a..b]).unwrap(),
                tok.decode(&loss).unwrap(),
            )
        })
        .collect()
}

fn all_train(inputs: Vec<&Path>, out: &Path, column: Option<&str>) -> PrepareOptions {
    let mut opts = options(inputs, out);
    opts.val_fraction = 0.0;
    opts.test_fraction = 0.0;
    opts.column = column.map(String::from);
    opts
}

#[test]
fn parquet_rows_are_documents_with_text_or_column() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let file = tmp.path().join("web.parquet");
    let schema = "message doc {
        required int64 id;
        optional binary text (UTF8);
        optional binary title (STRING);
        optional binary raw;
    }";
    let text = [
        Some("first row"),
        None,
        Some(""),
        Some("fourth é"),
        None,
        Some("sixth"),
    ];
    let title = [
        Some("T1"),
        Some("T2"),
        Some("T3"),
        None,
        Some("T5"),
        Some("T6"),
    ];
    let mut raw: Vec<Option<Vec<u8>>> = (1..=6).map(|i| Some(format!("raw {i}").into())).collect();
    raw[2] = Some(vec![0xff, 0xfe]);
    let columns = [
        Col::Int((1..=6).collect()),
        strs(&text),
        strs(&title),
        Col::Bytes(raw),
    ];
    // Two row groups of four and two rows: row numbers run on across groups.
    write_parquet(&file, schema, &columns, 4, Compression::SNAPPY);

    // Default: the `text` column; null and empty rows skipped with their rows.
    let out = tmp.path().join("p");
    let manifest = prepare(&all_train(vec![&file], &out, None), &tok, None, |_, _| {}).unwrap();
    let docs = train_docs(&out, &manifest, &tok);
    let texts: Vec<&str> = docs.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["first row", "fourth é", "sixth"]);
    assert!(docs.iter().all(|(t, loss)| t == loss), "{docs:?}");
    assert_eq!(
        (manifest.sources[0].documents, manifest.sources[0].skipped),
        (3, 3)
    );
    let skipped: Vec<(&str, &str)> = manifest
        .skipped
        .iter()
        .map(|s| (s.location.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 3);
    for ((location, reason), (row, why)) in
        skipped.iter().zip([(2, "null"), (3, "empty"), (5, "null")])
    {
        assert!(
            location.ends_with(&format!("web.parquet:row {row}")) && reason.contains(why),
            "{skipped:?}"
        );
    }

    // --column picks another string column; a plain byte-array column works too, its
    // non-UTF-8 cells skipped.
    let out = tmp.path().join("q");
    let opts = all_train(vec![&file], &out, Some("title"));
    let manifest = prepare(&opts, &tok, None, |_, _| {}).unwrap();
    let titles: Vec<String> = train_docs(&out, &manifest, &tok)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(titles, ["T1", "T2", "T3", "T5", "T6"]);
    assert!(manifest.skipped[0].location.ends_with(":row 4"));
    let out = tmp.path().join("r");
    let manifest = prepare(
        &all_train(vec![&file], &out, Some("raw")),
        &tok,
        None,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(manifest.sources[0].documents, 5);
    assert!(
        manifest.skipped[0].location.ends_with(":row 3")
            && manifest.skipped[0].reason.contains("not UTF-8"),
        "{:?}",
        manifest.skipped
    );

    // Rows split by document, deterministically.
    let out = tmp.path().join("s");
    let mut opts = options(vec![&file], &out);
    opts.column = Some("title".into());
    let a = prepare(&opts, &tok, None, |_, _| {}).unwrap();
    opts.force = true;
    let b = prepare(&opts, &tok, None, |_, _| {}).unwrap();
    assert_eq!(a.data_fingerprint, b.data_fingerprint);
    assert_eq!(a.splits.values().map(|s| s.documents).sum::<usize>(), 5);
}

#[test]
fn parquet_single_string_column_and_prompt_completion() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();

    // No `text` column: the only string column is the text.
    let file = tmp.path().join("code.parquet");
    let schema = "message m { optional int64 n; required binary content (UTF8); }";
    let columns = [
        Col::Int(vec![1, 2]),
        strs(&[Some("fn a() {}"), Some("fn b() {}")]),
    ];
    write_parquet(
        &file,
        schema,
        &columns,
        10,
        Compression::GZIP(GzipLevel::default()),
    );
    let out = tmp.path().join("p");
    let manifest = prepare(&all_train(vec![&file], &out, None), &tok, None, |_, _| {}).unwrap();
    let docs = train_docs(&out, &manifest, &tok);
    assert_eq!(docs[0].0, "fn a() {}");
    assert_eq!(docs[1].0, "fn b() {}");

    // `prompt` + `completion`: the loss only on the completion (and EOS).
    let file = tmp.path().join("qa.parquet");
    let schema = "message m { optional binary prompt (UTF8); optional binary completion (UTF8); }";
    let columns = [
        strs(&[Some("Q: 2+2?"), Some("Q: 3+3?"), Some("Q: 1+1?")]),
        strs(&[Some(" A: 4"), None, Some(" A: 2")]),
    ];
    write_parquet(
        &file,
        schema,
        &columns,
        2,
        Compression::ZSTD(ZstdLevel::default()),
    );
    let out = tmp.path().join("q");
    let manifest = prepare(&all_train(vec![&file], &out, None), &tok, None, |_, _| {}).unwrap();
    let docs = train_docs(&out, &manifest, &tok);
    assert_eq!(
        docs,
        [
            ("Q: 2+2? A: 4".to_string(), " A: 4".to_string()),
            ("Q: 1+1? A: 2".to_string(), " A: 2".to_string()),
        ]
    );
    let s = &manifest.splits[&Split::Train];
    assert_eq!(s.tokens - s.loss_tokens, 2 * "Q: 2+2?".len());
    assert_eq!(manifest.skipped_total, 1);
    assert!(
        manifest.skipped[0].location.ends_with("qa.parquet:row 2")
            && manifest.skipped[0].reason.contains("`completion` is null"),
        "{:?}",
        manifest.skipped
    );
}

#[test]
fn parquet_bad_files_and_columns_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let run = |file: &Path, column: Option<&str>| {
        let out = tmp.path().join("out");
        prepare(&all_train(vec![file], &out, column), &tok, None, |_, _| {})
            .unwrap_err()
            .to_string()
    };

    // Not Parquet at all, and a real file cut short: errors that name the file.
    let junk = tmp.path().join("junk.parquet");
    std::fs::write(&junk, b"this is not a parquet file").unwrap();
    let err = run(&junk, None);
    assert!(
        err.contains("junk.parquet") && err.contains("Parquet"),
        "{err}"
    );
    let good = tmp.path().join("two.parquet");
    let schema = "message m { optional binary body (UTF8); optional binary lang (UTF8); }";
    let columns = [
        strs(&[Some("print(1)"), Some("print(2)")]),
        strs(&[Some("py"), Some("py")]),
    ];
    write_parquet(&good, schema, &columns, 10, Compression::SNAPPY);
    let bytes = std::fs::read(&good).unwrap();
    let cut = tmp.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = run(&cut, None);
    assert!(err.contains("cut.parquet"), "{err}");
    // Damaged bytes anywhere (pages, metadata): documents, skipped rows or an error that names
    // the file, never a panic.
    let damaged = tmp.path().join("damaged.parquet");
    for i in 0..bytes.len() {
        for flip in [0x01, 0x5a, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            if let Err(e) = read_file(&damaged, b, Format::Parquet, Some("body"), None) {
                assert!(e.to_string().contains("damaged.parquet"), "{e}");
            }
        }
    }

    // Two string columns and no `text`: name one.
    let err = run(&good, None);
    assert!(
        err.contains("two.parquet") && err.contains("--column") && err.contains("`body`, `lang`"),
        "{err}"
    );
    // A column that is not there, or not text: the error lists the columns.
    let err = run(&good, Some("content"));
    assert!(
        err.contains("no column `content`") && err.contains("`body`, `lang`"),
        "{err}"
    );
    let ints = tmp.path().join("ints.parquet");
    let schema = "message m { required int64 id; optional binary text (UTF8); }";
    write_parquet(
        &ints,
        schema,
        &[Col::Int(vec![1]), strs(&[Some("x")])],
        10,
        Compression::UNCOMPRESSED,
    );
    let err = run(&ints, Some("id"));
    assert!(
        err.contains("`id`") && err.contains("not a string column") && err.contains("`text`"),
        "{err}"
    );
}

#[test]
fn jsonl_column_names_the_text_field() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let file = tmp.path().join("c.jsonl");
    let lines = [
        r#"{"text": "not this", "body": "this"}"#,
        r#"{"text": "no body"}"#,
        r#"{"body": 3}"#,
        r#"{"body": "and this"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = tmp.path().join("p");
    let opts = all_train(vec![&file], &out, Some("body"));
    let manifest = prepare(&opts, &tok, None, |_, _| {}).unwrap();
    let texts: Vec<String> = train_docs(&out, &manifest, &tok)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(texts, ["this", "and this"]);
    let reasons: Vec<(&str, &str)> = manifest
        .skipped
        .iter()
        .map(|s| (s.location.as_str(), s.reason.as_str()))
        .collect();
    assert!(
        reasons[0].0.ends_with("c.jsonl:2")
            && reasons[0].1.contains("no `body`")
            && reasons[1].0.ends_with("c.jsonl:3")
            && reasons[1].1.contains("`body` is not a string"),
        "{reasons:?}"
    );
}

#[test]
fn splits_do_not_depend_on_where_the_data_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::byte_level();
    let mut outs = Vec::new();
    for place in ["here", "somewhere/else/entirely"] {
        let src = tmp.path().join(place).join("corpus");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..40 {
            std::fs::write(src.join(format!("d{i}.txt")), format!("document {i}\n")).unwrap();
        }
        let jsonl = tmp.path().join(place).join("records.jsonl");
        let lines: Vec<String> = (0..40)
            .map(|i| format!("{{\"text\": \"record {i}\"}}"))
            .collect();
        std::fs::write(&jsonl, lines.join("\n")).unwrap();
        let out = tmp.path().join(format!("out{}", outs.len()));
        prepare(&options(vec![&src, &jsonl], &out), &tok, None, |_, _| {}).unwrap();
        outs.push(PreparedData::open(out).unwrap());
    }
    for split in Split::ALL {
        assert_eq!(
            outs[0].split(split).tokens(),
            outs[1].split(split).tokens(),
            "{split:?}"
        );
    }
    assert!(!outs[0].split(Split::Test).is_empty());
}
