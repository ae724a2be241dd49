//! The expert-file reader on arbitrary bytes: safetensors header, JSON metadata, tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.expert.safetensors");
    if let Ok(f) = mode_core::ExpertFile::from_bytes(data, path, &candle_core::Device::Cpu) {
        let _ = f.gates(path);
    }
});
