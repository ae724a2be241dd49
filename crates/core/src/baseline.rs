//! Baselines as artifacts: a fully fine-tuned backbone or LoRA adapters, in a model folder that
//! `--model` loads like a composed MoDE model.
//!
//! ```text
//! models/NAME/
//!   model.json            kind (`full` or `lora`), backbone, LoRA rank/alpha/targets, training
//!   weights.safetensors   full: every backbone tensor (HF names); lora: `*.lora_A` / `*.lora_B`
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use mode_model::layers::Lora;
use mode_model::{Backbone, Weights};
use serde::{Deserialize, Serialize};

use crate::composed::MANIFEST_FILE;
use crate::file::TrainingSummary;
use crate::{Error, Result};

/// Version of the baseline-folder format.
pub const BASELINE_FORMAT_VERSION: u32 = 1;
const WEIGHTS_FILE: &str = "weights.safetensors";

/// Which projections LoRA adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraTargets {
    /// q, k, v and o projections (the paper's LoRA baseline).
    #[serde(rename = "attn")]
    Attn,
    /// Attention and the MLP's gate, up and down projections.
    #[serde(rename = "attn+mlp")]
    AttnMlp,
}

impl LoraTargets {
    /// The projection names as [`Backbone::attach_lora`] takes them.
    pub fn projections(self) -> &'static [&'static str] {
        match self {
            Self::Attn => &["q_proj", "k_proj", "v_proj", "o_proj"],
            Self::AttnMlp => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        }
    }
}

impl std::str::FromStr for LoraTargets {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "attn" => Ok(Self::Attn),
            "attn+mlp" => Ok(Self::AttnMlp),
            other => Err(format!("`{other}` is not one of attn, attn+mlp")),
        }
    }
}

/// LoRA's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: LoraTargets,
}

/// `model.json` of a baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineManifest {
    pub format_version: u32,
    /// `full` or `lora`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    pub backbone_source: String,
    /// Of the backbone before fine-tuning: the one to load the folder onto.
    pub backbone_fingerprint: String,
    pub trainable_parameters: usize,
    pub training: TrainingSummary,
    pub tool_version: String,
}

/// Writes `backbone`'s trained tensors (all of them for `full`, the adapters for `lora`) and
/// the manifest to `dir`, atomically.
pub fn save_baseline(dir: &Path, manifest: &BaselineManifest, backbone: &Backbone) -> Result<()> {
    let err = |msg: String| Error::File {
        path: dir.to_path_buf(),
        msg,
    };
    let tensors = if manifest.lora.is_some() {
        backbone.lora_tensors()
    } else {
        backbone.named_tensors()
    };
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let tmp = mode_io::atomic::temp_dir_beside(dir).map_err(|e| err(e.to_string()))?;
    candle_core::safetensors::save(&tensors, tmp.path().join(WEIGHTS_FILE))?;
    let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    std::fs::write(tmp.path().join(MANIFEST_FILE), json).map_err(|e| err(e.to_string()))?;
    mode_io::atomic::commit_dir(tmp, dir).map_err(|e| err(e.to_string()))
}

/// Reads `dir/model.json` of a baseline.
pub fn read_manifest(dir: &Path) -> Result<BaselineManifest> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest: BaselineManifest = crate::composed::read_json(&manifest_path)?;
    if manifest.format_version != BASELINE_FORMAT_VERSION {
        return Err(Error::File {
            path: manifest_path,
            msg: format!(
                "baseline format {} is not the supported {BASELINE_FORMAT_VERSION}",
                manifest.format_version
            ),
        });
    }
    Ok(manifest)
}

/// Loads the baseline in `dir` onto `backbone` (which must be the one it was trained from).
pub fn load_baseline(dir: &Path, backbone: Backbone) -> Result<(Backbone, BaselineManifest)> {
    let manifest = read_manifest(dir)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    if backbone.fingerprint()? != manifest.backbone_fingerprint {
        return Err(Error::File {
            path: manifest_path,
            msg: format!(
                "fine-tuned from a different backbone ({}), not the one given; pass --backbone {}",
                manifest.backbone_source, manifest.backbone_source
            ),
        });
    }
    let path = dir.join(WEIGHTS_FILE);
    let file_err = |msg: String| Error::File {
        path: path.clone(),
        msg,
    };
    // A named pipe in place of the weights would block the memory map's open.
    mode_io::input::check(&path).map_err(|e| file_err(e.to_string()))?;
    let tensors = candle_core::safetensors::load(&path, backbone.device())
        .map_err(|e| file_err(e.to_string()))?;
    let backbone = match manifest.lora {
        None => {
            let dtype = backbone.embed_tokens.dtype();
            let weights = Weights::Map {
                tensors,
                label: path,
            };
            Backbone::load(backbone.config.clone(), &weights, dtype, backbone.device())?
        }
        Some(spec) => attach_saved_lora(backbone, &tensors, spec, &path)?,
    };
    Ok((backbone, manifest))
}

fn attach_saved_lora(
    mut backbone: Backbone,
    tensors: &HashMap<String, Tensor>,
    spec: LoraSpec,
    path: &Path,
) -> Result<Backbone> {
    let missing = |name: &str| Error::File {
        path: path.to_path_buf(),
        msg: format!("tensor `{name}` is missing"),
    };
    let dtype = backbone.adapter_dtype();
    let targets = spec.targets.projections();
    for (i, layer) in backbone.layers.iter_mut().enumerate() {
        for (name, linear) in layer.linears_mut() {
            let short = name.rsplit('.').next().unwrap_or(name);
            if !targets.contains(&short) {
                continue;
            }
            let a_name = format!("model.layers.{i}.{name}.lora_A");
            let b_name = format!("model.layers.{i}.{name}.lora_B");
            let a = tensors.get(&a_name).ok_or_else(|| missing(&a_name))?;
            let b = tensors.get(&b_name).ok_or_else(|| missing(&b_name))?;
            let want_a = [spec.rank, linear.in_features()];
            let want_b = [linear.out_features(), spec.rank];
            if a.dims() != want_a || b.dims() != want_b {
                return Err(Error::File {
                    path: path.to_path_buf(),
                    msg: format!(
                        "`{a_name}`/`{b_name}` have shapes {:?}/{:?}, expected {want_a:?}/{want_b:?}",
                        a.dims(),
                        b.dims()
                    ),
                });
            }
            linear.lora = Some(Lora {
                a: a.to_dtype(dtype)?,
                b: b.to_dtype(dtype)?,
                scale: spec.alpha / spec.rank as f64,
            });
        }
    }
    Ok(backbone)
}
