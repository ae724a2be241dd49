//! The training methods, as the loop sees them.

use candle_core::Tensor;
use mode_core::ModeModel;
use mode_engine::model::{Plan, Trainable};
use mode_model::Backbone;

use crate::trainer::Method;

/// MoDE: experts and/or gates of a [`ModeModel`] train, the backbone stays frozen.
pub struct ModeTraining<'a> {
    pub model: &'a ModeModel,
    pub experts: bool,
    pub gates: bool,
    /// The gates' learning rate relative to the run's (0: the gates stay as they are).
    pub gate_lr_scale: f64,
}

impl Method for ModeTraining<'_> {
    fn backbone(&self) -> &Backbone {
        &self.model.backbone
    }

    fn plan(&self) -> Plan<'_> {
        self.model.plan(self.experts, self.gates)
    }

    fn params(&self) -> Vec<(String, &Tensor)> {
        self.model.trainable_tensors(self.experts, self.gates)
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if ModeModel::is_gate_tensor(name) {
            self.gate_lr_scale
        } else {
            1.0
        }
    }
}

/// Full fine-tuning or LoRA: parts of the backbone itself train.
pub struct BackboneTraining<'a> {
    pub backbone: &'a Backbone,
    pub trainable: Trainable,
}

impl Method for BackboneTraining<'_> {
    fn backbone(&self) -> &Backbone {
        self.backbone
    }

    fn plan(&self) -> Plan<'_> {
        Plan::backbone(self.trainable.clone())
    }

    fn params(&self) -> Vec<(String, &Tensor)> {
        let t = &self.trainable;
        let mut out: Vec<(String, &Tensor)> = if t.lora {
            self.backbone.lora_tensors()
        } else {
            Vec::new()
        };
        out.extend(
            self.backbone
                .named_tensors()
                .into_iter()
                .filter(|(name, _)| match name.strip_prefix("model.layers.") {
                    Some(rest) => rest
                        .split('.')
                        .next()
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| t.layers[i]),
                    None => match name.as_str() {
                        "model.embed_tokens.weight" => t.embeddings,
                        "model.norm.weight" => t.final_norm,
                        "lm_head.weight" => t.lm_head,
                        _ => false,
                    },
                }),
        );
        out
    }
}
