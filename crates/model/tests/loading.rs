//! Loading from files: Hugging Face folders (single and sharded), GGUF (f32 and quantised, with
//! llama.cpp's Q/K row permutation), and clear errors for broken inputs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use mode_io::{GgufFile, HfFolder};
use mode_model::{random_weights, Architecture, Backbone, Config, Error, Weights};

const TOKENS: [u32; 7] = [3, 77, 12, 200, 9, 9, 141];

fn map_of(weights: &Weights) -> &HashMap<String, Tensor> {
    match weights {
        Weights::Map { tensors, .. } => tensors,
        _ => unreachable!(),
    }
}

fn logits(model: &Backbone) -> Tensor {
    let ids = Tensor::new(&TOKENS, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&ids, None).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn write_hf_folder(dir: &Path, config: &Config, weights: &Weights, shards: usize) {
    std::fs::write(dir.join("config.json"), config.to_hf_json().to_string()).unwrap();
    let mut names: Vec<&String> = map_of(weights).keys().collect();
    names.sort();
    if shards == 1 {
        candle_core::safetensors::save(map_of(weights), dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| (n.to_string(), map_of(weights)[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn hf_folders_single_and_sharded_load_the_same_model() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ] {
        let config = Config::tiny(arch);
        let weights = random_weights(&config, 11);
        let reference = Backbone::load(config.clone(), &weights, DType::F32, &Device::Cpu).unwrap();
        for shards in [1, 3] {
            let dir = tempfile::tempdir().unwrap();
            write_hf_folder(dir.path(), &config, &weights, shards);
            let folder = HfFolder::open(dir.path()).unwrap();
            let loaded_config = Config::from_hf(&folder).unwrap();
            assert_eq!(loaded_config, config, "{arch:?}");
            let model = Backbone::load(
                loaded_config,
                &Weights::Hf(folder),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(
                max_abs_diff(&logits(&model), &logits(&reference)),
                0.0,
                "{arch:?} {shards}"
            );
        }
    }
}

/// Writes a GGUF the way llama.cpp's converter does: llama Q/K rows permuted for interleaved
/// RoPE, names mapped, dims reversed by the writer.
fn write_gguf(path: &Path, config: &Config, weights: &Weights, dtype: GgmlDType, arch_name: &str) {
    let map = map_of(weights);
    let mut tensors = Vec::new();
    for (name, t) in map {
        let mut t = t.clone();
        if config.architecture == Architecture::Llama {
            let heads = if name.ends_with("q_proj.weight") {
                Some(config.num_attention_heads)
            } else if name.ends_with("k_proj.weight") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                let (rows, cols) = t.dims2().unwrap();
                t = t
                    .reshape((heads, 2, rows / heads / 2, cols))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((rows, cols))
                    .unwrap();
            }
        }
        // llama.cpp's converter stores Gemma's norm scales as 1 + weight.
        if name.ends_with("norm.weight") {
            t = t.affine(1.0, config.norm_weight_offset()).unwrap();
        }
        // Norms and biases stay f32, as in real files.
        let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        tensors.push((
            mode_model::weights::gguf_name(config.architecture, name),
            QTensor::quantize(&t, dt).unwrap(),
        ));
    }
    use gguf_file::Value;
    let a = |k: &str| format!("{arch_name}.{k}");
    let mut metadata: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(arch_name.into()),
        ),
        (
            a("block_count"),
            Value::U32(config.num_hidden_layers as u32),
        ),
        (a("embedding_length"), Value::U32(config.hidden_size as u32)),
        (
            a("feed_forward_length"),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            a("attention.head_count"),
            Value::U32(config.num_attention_heads as u32),
        ),
        (
            a("attention.head_count_kv"),
            Value::U32(config.num_key_value_heads as u32),
        ),
        (
            a("attention.key_length"),
            Value::U32(config.head_dim as u32),
        ),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (a("rope.freq_base"), Value::F32(config.rope_theta as f32)),
        (
            a("context_length"),
            Value::U32(config.max_position_embeddings as u32),
        ),
    ];
    if let Some(w) = &config.sliding_window {
        metadata.push((a("attention.sliding_window"), Value::U32(w.size as u32)));
        metadata.push((
            a("attention.sliding_window_pattern"),
            Value::U32(w.global_every as u32),
        ));
        metadata.push((
            a("rope.freq_base_swa"),
            Value::F32(w.local_rope_theta as f32),
        ));
    }
    let mut file = std::fs::File::create(path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts).unwrap();
}

#[test]
fn gguf_f32_loads_exactly_and_quantised_types_load_closely() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ] {
        let config = Config::tiny(arch);
        let weights = random_weights(&config, 12);
        let reference =
            logits(&Backbone::load(config.clone(), &weights, DType::F32, &Device::Cpu).unwrap());
        let arch_name = format!("{arch:?}").to_lowercase();
        for (dtype, tolerance) in [
            (GgmlDType::F32, 1e-5),
            (GgmlDType::F16, 1e-2),
            (GgmlDType::Q8_0, 5e-2),
            (GgmlDType::Q4_0, 0.5),
            (GgmlDType::Q4_1, 0.5),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            write_gguf(&path, &config, &weights, dtype, &arch_name);
            let gguf = GgufFile::open(&path).unwrap();
            let loaded = Config::from_gguf(&gguf).unwrap();
            assert_eq!(loaded.architecture, arch);
            assert_eq!(loaded.tie_word_embeddings, config.tie_word_embeddings);
            assert_eq!(loaded.attention_bias, config.attention_bias);
            assert_eq!(loaded.qk_norm, config.qk_norm);
            assert_eq!(loaded.sliding_window, config.sliding_window);
            let model =
                Backbone::load(loaded, &Weights::Gguf(gguf), DType::F32, &Device::Cpu).unwrap();
            let diff = max_abs_diff(&logits(&model), &reference);
            assert!(diff < tolerance, "{arch:?} {dtype:?}: {diff}");
        }
    }
}

fn error_text<T>(r: mode_model::Result<T>) -> (Error, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let text = e.to_string();
            (e, text)
        }
    }
}

#[test]
fn broken_ggufs_give_errors_naming_file_and_tensor() {
    let config = Config::tiny(Architecture::Llama);
    let weights = random_weights(&config, 13);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &config, &weights, GgmlDType::F32, "llama");
    let bytes = std::fs::read(&good).unwrap();

    // Truncated in the tensor data: the header parses, a tensor read fails.
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let gguf = GgufFile::open(&truncated).unwrap();
    let (_, text) = error_text(Backbone::load(
        config.clone(),
        &Weights::Gguf(gguf),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        text.contains("truncated.gguf") && text.contains("tensor `"),
        "{text}"
    );

    // Truncated in the header.
    let stub = dir.path().join("stub.gguf");
    std::fs::write(&stub, &bytes[..40]).unwrap();
    let text = GgufFile::open(&stub)
        .err()
        .expect("header must fail")
        .to_string();
    assert!(
        text.contains("stub.gguf") && text.contains("not a valid GGUF"),
        "{text}"
    );

    // Not a GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"hello world, this is not a model").unwrap();
    assert!(GgufFile::open(&junk).is_err());

    // Wrong architecture.
    let other = dir.path().join("other.gguf");
    write_gguf(&other, &config, &weights, GgmlDType::F32, "gemma2");
    let (e, text) = error_text(Config::from_gguf(&GgufFile::open(&other).unwrap()));
    assert!(
        matches!(e, Error::UnsupportedArchitecture { .. }) && text.contains("gemma2"),
        "{text}"
    );

    // Wrong shape: a config that disagrees with the file.
    let mut wide = config.clone();
    wide.intermediate_size = 96;
    let (e, text) = error_text(Backbone::load(
        wide,
        &Weights::Gguf(GgufFile::open(&good).unwrap()),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        matches!(e, Error::Shape { .. }) && text.contains("blk.0.ffn_gate.weight"),
        "{text}"
    );
}

#[test]
fn broken_hf_folders_give_errors_naming_file_and_tensor() {
    let config = Config::tiny(Architecture::Qwen2);
    let mut weights = random_weights(&config, 14);
    let dir = tempfile::tempdir().unwrap();
    if let Weights::Map { tensors, .. } = &mut weights {
        tensors.remove("model.layers.1.mlp.up_proj.weight");
    }
    write_hf_folder(dir.path(), &config, &weights, 1);
    let folder = HfFolder::open(dir.path()).unwrap();
    let (_, text) = error_text(Backbone::load(
        config.clone(),
        &Weights::Hf(folder),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        text.contains("model.layers.1.mlp.up_proj.weight") && text.contains("missing"),
        "{text}"
    );

    // Truncated safetensors file.
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let text = HfFolder::open(dir.path())
        .err()
        .expect("must fail")
        .to_string();
    assert!(text.contains("model.safetensors"), "{text}");

    // Unsupported architecture in config.json.
    let mut json = config.to_hf_json();
    json["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    let (e, text) = error_text(Config::from_hf_json(&json, Path::new("x/config.json")));
    assert!(
        matches!(e, Error::UnsupportedArchitecture { .. })
            && text.contains("GPT2LMHeadModel")
            && text.contains("x/config.json"),
        "{text}"
    );

    // No tokenizer.json: opening the folder as a backbone says which file is missing.
    std::fs::write(&st, &bytes).unwrap();
    let (_, text) = error_text(Backbone::open(dir.path(), DType::F32, &Device::Cpu));
    assert!(text.contains("tokenizer.json"), "{text}");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rope_llama3_inv_freq.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut json = Config::tiny(Architecture::Llama).to_hf_json();
    json["head_dim"] = fixture["head_dim"].clone();
    json["rope_theta"] = fixture["rope_theta"].clone();
    json["rope_scaling"] = fixture["rope_scaling"].clone();
    let config = Config::from_hf_json(&json, Path::new("config.json")).unwrap();
    assert!(config.rope_scaling.is_some());
    let rope = mode_model::layers::Rope::new(&config, None);
    let expected: Vec<f64> = fixture["inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(rope.inv_freq().len(), expected.len());
    for (i, (a, b)) in rope.inv_freq().iter().zip(&expected).enumerate() {
        assert!(
            (*a - b).abs() <= 1e-6 * b.abs().max(1e-12),
            "pair {i}: {a} vs {b}"
        );
    }
    // Scaling changed the low frequencies, so the check is not vacuous.
    let unscaled = 1.0 / 500000f64.powf(2.0 * 63.0 / 128.0);
    assert!((expected[63] - unscaled).abs() > 0.5 * unscaled);
}

#[test]
fn a_load_bigger_than_free_memory_is_refused_with_the_numbers() {
    use mode_model::backbone::check_load_memory;
    let config = Config::tiny(Architecture::Llama);
    let path = std::path::Path::new("model.gguf");
    let need = Backbone::load_bytes(&config, DType::F32);
    assert!(need > 4 * config.num_parameters() as u64);
    // f16 weights fingerprint through a transient f32 copy, so they need as much at peak.
    assert_eq!(Backbone::load_bytes(&config, DType::F16), need);
    assert!(check_load_memory(path, &config, DType::F32, Some(need)).is_ok());
    assert!(check_load_memory(path, &config, DType::F32, None).is_ok());
    let e = check_load_memory(path, &config, DType::F32, Some(need - 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.gguf") && e.contains("GiB") && e.contains("--no-memory-check"),
        "{e}"
    );
}
