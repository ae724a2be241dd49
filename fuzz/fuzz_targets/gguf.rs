//! The GGUF reader on arbitrary bytes: header, metadata, and every tensor it lists.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader maps a file: give it one in memory-backed storage.
    let dir = std::env::temp_dir();
    let path = dir.join(format!("mode-fuzz-{}.gguf", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(g) = mode_io::GgufFile::open(&path) {
        let names: Vec<String> = g.tensor_names().map(String::from).take(16).collect();
        for name in names {
            let _ = g.tensor_shape(&name);
            let _ = g.tensor(&name, candle_core::DType::F32, &candle_core::Device::Cpu);
        }
        let _ = mode_io::Tokenizer::from_gguf(&g);
    }
});
