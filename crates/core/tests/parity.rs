//! The gated mix is computed in two places: the inference forward of [`ModeModel`] (evaluation,
//! generation, serving) and the training engine's forward (`mode_engine::model`), which
//! validation and training differentiate. On tiny random backbones of every architecture, with
//! two experts (one of each form) and random gates, both give the same logits and loss, dense
//! and routed to one expert; so a validation loss during training means what `mode eval` says.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{ids, max_diff, random_gates};
use mode_core::{BlockLayout, Expert, ExpertForm, ExpertInit, Gate, ModeModel, Routing};
use mode_model::{Architecture, Backbone, CausalLm, Config};

const FORMS: [ExpertForm; 2] = [ExpertForm::Residual, ExpertForm::Replace];

fn backbone(arch: Architecture, seed: u64) -> Backbone {
    let mut config = Config::tiny(arch);
    config.num_hidden_layers = 4;
    Backbone::random(config, seed, DType::F32, &Device::Cpu).unwrap()
}

/// A model over `arch`'s backbone `seed` with the experts `keep` (indices into [`FORMS`]) and
/// the rows of `gates` for the backbone and those experts.
fn model(arch: Architecture, seed: u64, gates: &[Gate], keep: &[usize]) -> ModeModel {
    let bb = backbone(arch, seed);
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let experts = keep
        .iter()
        .map(|&j| {
            let mut e = Expert::new(
                &format!("e{j}"),
                &bb,
                &layout,
                ExpertInit::Random,
                100 + j as u64,
            )
            .unwrap();
            e.form = FORMS[j];
            e
        })
        .collect();
    let rows: Vec<u32> = std::iter::once(0)
        .chain(keep.iter().map(|&j| j as u32 + 1))
        .collect();
    let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    let gates = gates
        .iter()
        .map(|g| Gate {
            weight: g.weight.index_select(&rows, 0).unwrap(),
            bias: g.bias.index_select(&rows, 0).unwrap(),
            input: g.input,
        })
        .collect();
    ModeModel::new(bb, layout, experts, gates).unwrap()
}

/// Mean next-token cross-entropy of `logits: [1, t, vocab]` over `ids: [1, t]`.
fn mean_loss(logits: &Tensor, ids: &Tensor) -> f64 {
    let t = ids.dim(1).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.squeeze(0).unwrap(), D::Minus1).unwrap();
    let targets = ids.squeeze(0).unwrap().narrow(0, 1, t - 1).unwrap();
    let picked = logp
        .narrow(0, 0, t - 1)
        .unwrap()
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap();
    -picked.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

/// The engine's logits and mean loss for `m` (everything it could train, trainable).
fn engine(m: &ModeModel) -> (Tensor, f64) {
    let plan = m.plan(true, true);
    let logits = mode_engine::model::logits(&m.backbone, &plan, &ids()).unwrap();
    let batch = mode_engine::model::Batch::next_token(ids()).unwrap();
    let r =
        mode_engine::model::loss_and_grads(&m.backbone, &plan, &batch.ids, &batch.targets).unwrap();
    (logits, r.loss_sum / r.count as f64)
}

fn assert_same(what: &str, inference: &Tensor, engine: &(Tensor, f64)) {
    let diff = max_diff(inference, &engine.0);
    assert!(diff < 1e-5, "{what}: logits differ by {diff}");
    let loss = mean_loss(inference, &ids());
    let gap = (loss - engine.1).abs();
    assert!(
        gap < 1e-5 * loss.max(1.0),
        "{what}: loss {loss} vs engine {}",
        engine.1
    );
}

#[test]
fn inference_and_training_forwards_agree_dense_and_routed() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ] {
        let hidden = backbone(arch, 1).config.hidden_size;
        let gates = random_gates(hidden, 2, 3);
        let both = model(arch, 1, &gates, &[0, 1]);
        let dense = both
            .logits(&both.hidden_states(&ids(), None).unwrap())
            .unwrap();
        assert_same(&format!("{arch:?} dense"), &dense, &engine(&both));

        // Routed to one expert: the kept weights renormalised, which is the softmax over the
        // backbone's and that expert's gate rows, i.e. a model holding that expert alone.
        for j in 0..2 {
            let routed = both
                .routed(Routing {
                    experts: Some(vec![j]),
                    ..Routing::default()
                })
                .unwrap();
            let logits = routed
                .logits(&routed.hidden_states(&ids(), None).unwrap())
                .unwrap();
            let alone = model(arch, 1, &gates, &[j]);
            assert_same(
                &format!("{arch:?} routed to e{j}"),
                &logits,
                &engine(&alone),
            );
            // The routing changed something: the two experts do not give the dense answer.
            assert!(
                max_diff(&logits, &dense) > 1e-4,
                "{arch:?} e{j}: routing changed nothing"
            );
        }
    }
}
