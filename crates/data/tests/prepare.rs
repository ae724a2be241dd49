//! `prepare` on real files in a temporary folder, with a real byte-level BPE tokenizer (no
//! merges: one token per byte, plus an end-of-text token).

use std::path::Path;

use mode_data::read::chat_segments;
use mode_data::{prepare, Format, PrepareOptions, PreparedData, Split};
use mode_io::{ChatMessage, ChatTemplate, Tokenizer};

fn options(inputs: Vec<&Path>, out: &Path) -> PrepareOptions {
    PrepareOptions {
        inputs: inputs.into_iter().map(|p| p.to_path_buf()).collect(),
        out: out.to_path_buf(),
        glob: None,
        format: Format::Auto,
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
        .contains("sum to less than 1"));

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
