//! Composed models: a folder holding N experts and the gates trained with them in stage 2.
//!
//! ```text
//! models/NAME/
//!   model.json                      manifest: backbone, layout, experts (with SHA-256), training
//!   gates.safetensors               blocks.{b}.gate.{weight,bias}, over [backbone, expert_1..N]
//!   experts/{name}.expert.safetensors   each expert as stage 2 left it (tuned or as trained)
//! ```
//!
//! Each expert file in the folder is a complete expert file: it still loads alone with
//! `--expert`, with its stage-1 gates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mode_model::Backbone;
use serde::{Deserialize, Serialize};

use crate::file::{ExpertDims, TrainingSummary};
use crate::{BlockLayout, Error, ExpertFile, Gate, GateInput, ModeModel, Result};

/// The newest composed-model format this version reads and writes. Version 2 added
/// [`ComposedManifest::gate_input`]; models whose gates read the raw block input are still
/// written as version 1 (see [`composed_format_version`]).
pub const COMPOSED_FORMAT_VERSION: u32 = 2;

/// The format version of a composed model whose gates read `gate_input`.
pub fn composed_format_version(gate_input: GateInput) -> u32 {
    match gate_input {
        GateInput::Raw => 1,
        GateInput::Normalized => 2,
    }
}
/// The manifest's file name inside a composed-model folder.
pub const MANIFEST_FILE: &str = "model.json";
const GATES_FILE: &str = "gates.safetensors";

/// One expert of a composed model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposedExpert {
    pub name: String,
    /// Path inside the folder.
    pub file: String,
    pub sha256: String,
    /// The stage-1 expert file it came from, and that file's SHA-256.
    pub source: String,
    pub source_sha256: String,
    /// Whether stage 2 changed the expert's layers.
    pub tuned: bool,
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposedManifest {
    pub format_version: u32,
    /// Always `mode`: tells composed models from baselines in `model.json`.
    #[serde(default = "mode_kind")]
    pub kind: String,
    pub backbone_source: String,
    pub backbone_fingerprint: String,
    pub layout: BlockLayout,
    pub dims: ExpertDims,
    /// In gate order: branch `j + 1` of every gate is `experts[j]`.
    pub experts: Vec<ComposedExpert>,
    pub gates_file: String,
    /// `fresh` or `stage1`.
    pub gate_init: String,
    pub training: TrainingSummary,
    pub tool_version: String,
    /// What the gates read (absent before format version 2: raw).
    #[serde(default, skip_serializing_if = "crate::file::is_raw")]
    pub gate_input: GateInput,
}

/// An expert file on disk, with the SHA-256 of its bytes.
pub struct LoadedExpertFile {
    pub path: PathBuf,
    pub sha256: String,
    pub file: ExpertFile,
}

impl LoadedExpertFile {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = mode_io::input::read(path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            sha256: mode_io::atomic::sha256_hex(&bytes),
            file: ExpertFile::from_bytes(&bytes, path, device)?,
        })
    }
}

/// Writes a composed model to `dir` atomically (a folder beside it, renamed into place).
/// `experts[j]` pairs the expert file it came from with the stage-2 state of its layers.
pub fn save_composed(
    dir: &Path,
    manifest: &ComposedManifest,
    model: &ModeModel,
    sources: &[LoadedExpertFile],
    tuned: bool,
) -> Result<ComposedManifest> {
    let err = |msg: String| Error::File {
        path: dir.to_path_buf(),
        msg,
    };
    let tmp = mode_io::atomic::temp_dir_beside(dir).map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(tmp.path().join("experts")).map_err(|e| err(e.to_string()))?;
    let mut manifest = manifest.clone();
    manifest.gate_input = model.gates.first().map_or(GateInput::Raw, |g| g.input);
    manifest.format_version = composed_format_version(manifest.gate_input);
    manifest.experts.clear();
    for (expert, source) in model.experts.iter().zip(sources) {
        // Names were checked where they entered; checked again as they become file names.
        mode_io::names::check_name(&expert.name).map_err(err)?;
        let rel = format!("experts/{}.expert.safetensors", expert.name);
        let path = tmp.path().join(&rel);
        source.file.with_layers(expert).save(&path)?;
        let bytes = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
        manifest.experts.push(ComposedExpert {
            name: expert.name.clone(),
            file: rel,
            sha256: mode_io::atomic::sha256_hex(&bytes),
            source: source.path.display().to_string(),
            source_sha256: source.sha256.clone(),
            tuned,
        });
    }
    let mut gates: HashMap<String, Tensor> = HashMap::new();
    for (b, g) in model.gates.iter().enumerate() {
        gates.insert(
            format!("blocks.{b}.gate.weight"),
            g.weight.to_dtype(DType::F32)?,
        );
        gates.insert(
            format!("blocks.{b}.gate.bias"),
            g.bias.to_dtype(DType::F32)?,
        );
    }
    candle_core::safetensors::save(&gates, tmp.path().join(GATES_FILE))?;
    manifest.gates_file = GATES_FILE.into();
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    std::fs::write(tmp.path().join(MANIFEST_FILE), json).map_err(|e| err(e.to_string()))?;
    mode_io::atomic::commit_dir(tmp, dir).map_err(|e| err(e.to_string()))?;
    Ok(manifest)
}

/// Reads a JSON manifest; errors name the file, and say what to do when it is missing.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = mode_io::input::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        msg: if e.kind() == std::io::ErrorKind::NotFound {
            "not found: is this a folder written by `mode compose` or `mode baseline`?".into()
        } else {
            e.to_string()
        },
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_path_buf(),
        msg: format!(
            "invalid manifest at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    })
}

/// What a model folder holds: `mode` (a composed MoDE model), `full` or `lora` (baselines).
pub fn model_kind(dir: &Path) -> Result<String> {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(default = "mode_kind")]
        kind: String,
    }
    Ok(read_json::<Kind>(&dir.join(MANIFEST_FILE))?.kind)
}

fn mode_kind() -> String {
    "mode".into()
}

/// Reads `dir/model.json` of a composed model.
pub fn read_manifest(dir: &Path) -> Result<ComposedManifest> {
    let path = dir.join(MANIFEST_FILE);
    let manifest: ComposedManifest = read_json(&path)?;
    if manifest.kind != "mode" {
        return Err(Error::File {
            path,
            msg: format!("a `{}` model, not a composed MoDE model", manifest.kind),
        });
    }
    if !(1..=COMPOSED_FORMAT_VERSION).contains(&manifest.format_version) {
        return Err(Error::File {
            path,
            msg: format!(
                "composed-model format {} is not one this version reads (1 to \
                 {COMPOSED_FORMAT_VERSION}); a newer mode wrote it",
                manifest.format_version
            ),
        });
    }
    Ok(manifest)
}

/// Loads the composed model in `dir` onto `backbone`, checking the backbone's fingerprint, each
/// expert file's SHA-256 and layout, and the gates' shapes; its experts are loaded to run
/// ([`crate::Expert::pack_for_inference`]).
pub fn load_composed(dir: &Path, backbone: Backbone) -> Result<(ModeModel, ComposedManifest)> {
    let manifest = read_manifest(dir)?;
    let fingerprint = backbone.fingerprint()?;
    if manifest.backbone_fingerprint != fingerprint {
        return Err(Error::File {
            path: dir.join(MANIFEST_FILE),
            msg: format!(
                "composed over a different backbone ({}), not the one given; pass --backbone {}",
                manifest.backbone_source, manifest.backbone_source
            ),
        });
    }
    let dims = ExpertDims::of(&backbone.config);
    let mut experts = Vec::with_capacity(manifest.experts.len());
    let manifest_path = dir.join(MANIFEST_FILE);
    let in_manifest = |msg: String| Error::File {
        path: manifest_path.clone(),
        msg,
    };
    for e in &manifest.experts {
        mode_io::names::check_name(&e.name)
            .map_err(|m| in_manifest(format!("expert name: {m}")))?;
        let path = mode_io::input::inside(dir, &e.file).map_err(|m| in_manifest(m.to_string()))?;
        let loaded = LoadedExpertFile::load(&path, backbone.device())?;
        if loaded.sha256 != e.sha256 {
            return Err(Error::File {
                path,
                msg: format!(
                    "SHA-256 {} differs from the manifest's {}: the file changed after composing",
                    loaded.sha256, e.sha256
                ),
            });
        }
        loaded
            .file
            .check_compatible(&path, &fingerprint, &dims, Some(&manifest.layout))?;
        let mut expert = loaded.file.expert(&backbone, &path)?;
        expert.pack_for_inference()?;
        expert.name = e.name.clone();
        experts.push(expert);
    }
    let gates_path = mode_io::input::inside(dir, &manifest.gates_file)
        .map_err(|m| in_manifest(m.to_string()))?;
    let gates_err = |msg: String| Error::File {
        path: gates_path.clone(),
        msg,
    };
    // A named pipe in place of the gates would block the memory map's open.
    mode_io::input::check(&gates_path).map_err(|e| gates_err(e.to_string()))?;
    let tensors = candle_core::safetensors::load(&gates_path, backbone.device())
        .map_err(|e| gates_err(e.to_string()))?;
    let dtype = backbone.adapter_dtype();
    let branches = experts.len() + 1;
    let hidden = backbone.config.hidden_size;
    let gates = (0..manifest.layout.num_blocks())
        .map(|b| {
            let get = |n: &str, shape: &[usize]| -> Result<Tensor> {
                let name = format!("blocks.{b}.gate.{n}");
                let t = tensors.get(&name).ok_or_else(|| Error::File {
                    path: gates_path.clone(),
                    msg: format!("tensor `{name}` is missing"),
                })?;
                crate::file::check_gate_tensor(&gates_path, &name, t, shape)?;
                Ok(t.to_dtype(dtype)?)
            };
            Ok(Gate {
                weight: get("weight", &[branches, hidden])?,
                bias: get("bias", &[branches])?,
                input: manifest.gate_input,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let model = ModeModel::new(backbone, manifest.layout.clone(), experts, gates)?;
    Ok((model, manifest))
}
