//! The data readers (text, JSONL, Parquet) on arbitrary bytes; the first byte picks the format
//! and whether a `--column` is given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mode_data::read::read_file;
use mode_data::Format;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let format = match selector % 3 {
        0 => Format::Text,
        1 => Format::Jsonl,
        _ => Format::Parquet,
    };
    let column = (selector & 0x80 != 0).then_some("body");
    let path = std::path::Path::new("fuzz.input");
    let _ = read_file(path, bytes.to_vec(), format, column, None);
});
