//! Any model `mode` can run: the plain backbone, a backbone with one expert, a composed MoDE
//! model, or a baseline folder (full fine-tuning or LoRA).

use std::path::Path;

use mode_model::{Backbone, CausalLm};

use crate::composed::{model_kind, read_manifest, MANIFEST_FILE};
use crate::{baseline, load_composed, ExpertFile, ModeModel, Result, Routing};

/// A model ready to evaluate or generate with.
pub enum LoadedModel {
    Backbone(Box<Backbone>),
    Mode(Box<ModeModel>),
}

impl LoadedModel {
    pub fn lm(&self) -> &dyn CausalLm {
        match self {
            LoadedModel::Backbone(b) => b.as_ref(),
            LoadedModel::Mode(m) => m.as_ref(),
        }
    }

    /// The model under `routing`. A plain backbone accepts only a routing that names no expert
    /// or restricts nothing.
    pub fn routed(&self, routing: Routing) -> Result<Box<dyn CausalLm + '_>> {
        match self {
            LoadedModel::Mode(m) => Ok(Box::new(m.routed(routing)?)),
            LoadedModel::Backbone(b) => {
                routing.check(0)?;
                Ok(Box::new(b.as_ref()))
            }
        }
    }

    /// Names of the experts the model runs, in gate order (none for a plain backbone).
    pub fn expert_names(&self) -> Vec<String> {
        match self {
            LoadedModel::Backbone(_) => Vec::new(),
            LoadedModel::Mode(m) => m.expert_names(),
        }
    }

    /// The model as a [`ModeModel`], to which experts can be added and removed while it runs:
    /// a plain backbone becomes one with no experts (see [`ModeModel::bare`]).
    pub fn into_mode(self) -> Result<ModeModel> {
        match self {
            LoadedModel::Backbone(b) => ModeModel::bare(*b),
            LoadedModel::Mode(m) => Ok(*m),
        }
    }

    /// Mean gate weights per block and branch since the last call (MoDE models only).
    pub fn take_gate_stats(&self) -> Option<Vec<Vec<f64>>> {
        match self {
            LoadedModel::Backbone(_) => None,
            LoadedModel::Mode(m) => Some(m.take_gate_stats().0),
        }
    }
}

/// The backbone a model folder was made from, as recorded in its manifest.
pub fn folder_backbone_source(dir: &Path) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Source {
        backbone_source: String,
    }
    Ok(crate::composed::read_json::<Source>(&dir.join(MANIFEST_FILE))?.backbone_source)
}

/// Loads a model folder (`mode compose` or `mode baseline` output) onto `backbone`. Returns
/// the model and a one-line description.
pub fn load_folder(dir: &Path, backbone: Backbone) -> Result<(LoadedModel, String)> {
    if model_kind(dir)? != "mode" {
        let (backbone, m) = baseline::load_baseline(dir, backbone)?;
        let what = format!(
            "{} baseline {} ({:.2}M trained parameters)",
            m.kind,
            dir.display(),
            m.trainable_parameters as f64 / 1e6
        );
        return Ok((LoadedModel::Backbone(Box::new(backbone)), what));
    }
    read_manifest(dir)?;
    let (model, m) = load_composed(dir, backbone)?;
    let what = format!(
        "composed model {} ({} blocks x {} layers; experts: {})",
        dir.display(),
        m.layout.num_blocks(),
        m.layout.expert_layers_per_block,
        m.experts
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((LoadedModel::Mode(Box::new(model)), what))
}

/// The backbone with one expert file and its stage-1 gates: a bare model with that expert
/// added ([`ModeModel::add_expert_file`]).
pub fn load_with_expert(file: &Path, backbone: Backbone) -> Result<(LoadedModel, String)> {
    let expert_file = ExpertFile::load(file, backbone.device())?;
    let fingerprint = backbone.fingerprint()?;
    let mut model = ModeModel::bare(backbone)?;
    model.add_expert_file(&expert_file, file, &fingerprint, None)?;
    let layout = &model.layout;
    let what = format!(
        "expert `{}` ({} blocks x {} layers, {:.2}M parameters)",
        model.experts[0].name,
        layout.num_blocks(),
        layout.expert_layers_per_block,
        model.experts[0].num_parameters() as f64 / 1e6
    );
    Ok((LoadedModel::Mode(Box::new(model)), what))
}
