//! The baselines through the shared loop on a tiny backbone: full fine-tuning and LoRA write
//! folders that load back to the very model that was validated, LoRA leaves the backbone's own
//! weights untouched, and a folder refuses another backbone.

use std::path::Path;

use candle_core::{DType, Device};
use mode_core::baseline::{load_baseline, LoraSpec, LoraTargets};
use mode_data::{prepare, DataMix, Format, PrepareOptions, PreparedData};
use mode_engine::model::Trainable;
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};
use mode_train::baseline::{train_baseline, BaselineKind};
use mode_train::methods::BackboneTraining;
use mode_train::trainer::{validate, TrainConfig};

fn backbone(seed: u64) -> Backbone {
    let mut config = Config::tiny(Architecture::Qwen2);
    config.vocab_size = 257;
    config.num_hidden_layers = 3;
    Backbone::random(config.clone(), seed, DType::F32, &Device::Cpu).unwrap()
}

fn data(dir: &Path) -> DataMix {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..30 {
        std::fs::write(
            src.join(format!("d{i}.txt")),
            format!("{i} plus {i} is {}.\n", 2 * i).repeat(6),
        )
        .unwrap();
    }
    let out = dir.join("math");
    let opts = PrepareOptions {
        column: None,
        inputs: vec![src],
        out: out.clone(),
        glob: None,
        format: Format::Auto,
        val_fraction: 0.15,
        test_fraction: 0.1,
        seed: 0,
        force: false,
    };
    prepare(&opts, &Tokenizer::byte_level(), None, |_, _| {}).unwrap();
    DataMix::single(PreparedData::open(out).unwrap())
}

fn cfg() -> TrainConfig {
    TrainConfig {
        steps: 3,
        batch_tokens: 64,
        seq_len: 32,
        lr: 3e-3,
        lr_warmup_steps: 1,
        val_every: 0,
        val_windows: 2,
        checkpoint_every: 0,
        ..Default::default()
    }
}

#[test]
fn full_and_lora_folders_load_back_to_the_trained_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let original = backbone(1).fingerprint().unwrap();
    let lora = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: LoraTargets::AttnMlp,
    };
    for kind in [BaselineKind::Full, BaselineKind::Lora(lora)] {
        let out = tmp.path().join(format!("{kind:?}").to_lowercase());
        let (manifest, report) = train_baseline(
            backbone(1),
            "tiny",
            &Tokenizer::byte_level().fingerprint(),
            &data,
            kind,
            &cfg(),
            &out,
            None,
            |_| true,
        )
        .unwrap();
        let manifest = manifest.unwrap();
        assert_eq!(manifest.backbone_fingerprint, original);
        let (loaded, read) = load_baseline(&out, backbone(1)).unwrap();
        assert_eq!(read, manifest);
        // Validating the loaded model gives exactly the loss the run ended with.
        let method = BackboneTraining {
            backbone: &loaded,
            trainable: Trainable::none(3),
        };
        let v = validate(&method, &data, &cfg()).unwrap();
        assert_eq!(Some(v.total.loss), report.final_val_loss, "{kind:?}");
        let weights_moved = loaded.fingerprint().unwrap() != original;
        match kind {
            BaselineKind::Full => assert!(weights_moved),
            BaselineKind::Lora(_) => {
                assert!(!weights_moved, "LoRA changed the frozen weights");
                assert_eq!(loaded.lora_tensors().len(), 3 * 7 * 2);
                let full = tmp.path().join("full");
                let params = manifest.trainable_parameters;
                assert!(params > 0 && params < read_params(&full) / 4, "{params}");
            }
        }
        let e = load_baseline(&out, backbone(2)).err().unwrap().to_string();
        assert!(e.contains("different backbone"), "{e}");
    }
}

#[test]
fn a_baseline_continues_from_a_folder_of_its_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let original = backbone(1).fingerprint().unwrap();
    let lora = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: LoraTargets::Attn,
    };
    let tok = Tokenizer::byte_level().fingerprint();
    for kind in [BaselineKind::Full, BaselineKind::Lora(lora)] {
        let name = format!("{kind:?}").to_lowercase();
        let first = tmp.path().join(format!("{name}-1"));
        let train = |out: &Path, start: Option<&Path>| {
            train_baseline(
                backbone(1),
                "tiny",
                &tok,
                &data,
                kind,
                &cfg(),
                out,
                start,
                |_| true,
            )
            .unwrap()
            .0
            .unwrap()
        };
        train(&first, None);
        let second = tmp.path().join(format!("{name}-2"));
        let manifest = train(&second, Some(&first));
        // Still the folder of the original backbone, and it says what it continued.
        assert_eq!(manifest.backbone_fingerprint, original);
        assert!(manifest.training.init.contains(&format!("{name}-1")));
        // The second run trained on from the first: its weights differ from the first's.
        let (a, _) = load_baseline(&first, backbone(1)).unwrap();
        let (b, _) = load_baseline(&second, backbone(1)).unwrap();
        let values = |m: &mode_model::Backbone| -> Vec<f32> {
            let t = match kind {
                BaselineKind::Full => m.named_tensors(),
                BaselineKind::Lora(_) => m.lora_tensors(),
            };
            t.iter()
                .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        assert_ne!(values(&a), values(&b));
        // Runs are deterministic (a fresh run repeats the first exactly), so the difference is
        // the continuation's.
        let fresh = tmp.path().join(format!("{name}-fresh"));
        train(&fresh, None);
        let (c, _) = load_baseline(&fresh, backbone(1)).unwrap();
        assert_eq!(values(&a), values(&c));
    }
    // The wrong kind is refused, naming the folder.
    let e = train_baseline(
        backbone(1),
        "tiny",
        &tok,
        &data,
        BaselineKind::Lora(lora),
        &cfg(),
        &tmp.path().join("mixed"),
        Some(&tmp.path().join("full-1")),
        |_| true,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("full-1") && e.contains("same kind"), "{e}");
}

fn read_params(dir: &Path) -> usize {
    mode_core::baseline::read_manifest(dir)
        .unwrap()
        .trainable_parameters
}
