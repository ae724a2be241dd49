//! Expert files (`*.expert.safetensors`): the expert's tensors and its stage-1 gates, with a
//! JSON header in the safetensors metadata saying what backbone and layout they belong to.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{BlockLayout, Error, Expert, ExpertForm, Gate, GateInput, Result};

/// The newest expert-file format this version reads and writes. Version 2 added
/// [`ExpertMeta::form`], version 3 [`ExpertMeta::gate_input`]. A file is written with the
/// oldest version that holds what it needs, so that earlier tools keep reading the files they
/// can run, and refuse the others (a residual expert, a gate on the normalised input) rather
/// than run them wrongly.
pub const FORMAT_VERSION: u32 = 3;

/// The format version a file of an expert of `form` whose stage-1 gates read `gate_input` is
/// written with.
pub fn format_version(form: ExpertForm, gate_input: GateInput) -> u32 {
    match (form, gate_input) {
        (_, GateInput::Normalized) => 3,
        (ExpertForm::Residual, GateInput::Raw) => 2,
        (ExpertForm::Replace, GateInput::Raw) => 1,
    }
}

/// The shape an expert's layers must have to run beside a backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertDims {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl ExpertDims {
    pub fn of(config: &mode_model::Config) -> Self {
        Self {
            architecture: format!("{:?}", config.architecture).to_lowercase(),
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        }
    }
}

/// What training produced the expert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub steps: usize,
    pub tokens: usize,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_accuracy: Option<f64>,
    pub data_fingerprint: Option<String>,
    pub seed: u64,
    pub init: String,
}

/// The JSON header of an expert file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertMeta {
    pub format_version: u32,
    pub domain: String,
    pub backbone_fingerprint: String,
    pub backbone_source: String,
    pub layout: BlockLayout,
    pub dims: ExpertDims,
    pub training: TrainingSummary,
    pub tool_version: String,
    /// How the expert's branch mixes with the block (absent before format version 2: replace).
    #[serde(default)]
    pub form: ExpertForm,
    /// What the stage-1 gates read (absent before format version 3: raw). Written only when
    /// not raw, so that a version-1 or 2 file stays byte-for-byte what earlier tools wrote.
    #[serde(default, skip_serializing_if = "is_raw")]
    pub gate_input: GateInput,
}

pub(crate) fn is_raw(input: &GateInput) -> bool {
    *input == GateInput::Raw
}

/// Safetensors metadata key holding the JSON header.
const META_KEY: &str = "mode.expert";

/// An expert file's content: header, expert tensors, stage-1 gate tensors.
pub struct ExpertFile {
    pub meta: ExpertMeta,
    pub tensors: HashMap<String, Tensor>,
}

impl ExpertFile {
    /// Packs an expert and its stage-1 gates (two branches per block). The header's form, gate
    /// input and format version are the expert's and its gates'.
    pub fn from_expert(mut meta: ExpertMeta, expert: &Expert, gates: &[Gate]) -> Self {
        meta.form = expert.form;
        meta.gate_input = gates.first().map_or(GateInput::Raw, |g| g.input);
        meta.format_version = format_version(expert.form, meta.gate_input);
        let mut tensors: HashMap<String, Tensor> = expert
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect();
        for (b, g) in gates.iter().enumerate() {
            tensors.insert(format!("blocks.{b}.gate.weight"), g.weight.clone());
            tensors.insert(format!("blocks.{b}.gate.bias"), g.bias.clone());
        }
        Self { meta, tensors }
    }

    /// The same file with `expert`'s layers in place of its own (header and stage-1 gates kept).
    pub fn with_layers(&self, expert: &Expert) -> Self {
        let mut tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| k.contains(".gate."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tensors.extend(
            expert
                .named_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.clone())),
        );
        Self {
            meta: self.meta.clone(),
            tensors,
        }
    }

    /// Writes the file atomically: a temporary file in the same folder, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |msg: String| Error::File {
            path: path.to_path_buf(),
            msg,
        };
        let json = serde_json::to_string(&self.meta).expect("metadata serialises");
        let metadata = HashMap::from([(META_KEY.to_string(), json)]);
        let tmp = mode_io::atomic::temp_file_beside(path).map_err(|e| err(e.to_string()))?;
        let tensors: Vec<(&String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let views: Vec<(&String, &Tensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
        safetensors::tensor::serialize_to_file(views, Some(metadata), tmp.path())
            .map_err(|e| err(e.to_string()))?;
        mode_io::atomic::persist(tmp, path).map_err(|e| err(e.to_string()))
    }

    /// Reads a file, checking that it is an expert file this version understands.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let err = |msg: String| Error::File {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = mode_io::input::read(path).map_err(|e| err(e.to_string()))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses an expert file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let err = |msg: String| Error::File {
            path: path.to_path_buf(),
            msg,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| err(format!("no `{META_KEY}` metadata: not an expert file")))?;
        let meta: ExpertMeta =
            serde_json::from_str(json).map_err(|e| err(format!("bad expert header: {e}")))?;
        // The domain names files, URLs and model ids: a hostile file must not pick a path.
        mode_io::names::check_name(&meta.domain)
            .map_err(|e| err(format!("bad expert header: the domain {e}")))?;
        if !(1..=FORMAT_VERSION).contains(&meta.format_version) {
            return Err(err(format!(
                "expert format {} is not one this version reads (1 to {FORMAT_VERSION}); a newer mode wrote it",
                meta.format_version
            )));
        }
        let layout = &meta.layout;
        let layers = layout.boundaries.last().copied().unwrap_or(0);
        BlockLayout::explicit(
            layout.boundaries.clone(),
            layers,
            layout.expert_layers_per_block,
        )
        .map_err(|e| err(format!("bad expert header: {e}")))?;
        let tensors =
            candle_core::safetensors::load_buffer(bytes, device).map_err(|e| err(e.to_string()))?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        if let Some(name) = names.into_iter().find(|n| !tensors[*n].dtype().is_float()) {
            return Err(err(format!(
                "tensor `{name}` is stored as {:?}; expert weights must be floating point",
                tensors[name].dtype()
            )));
        }
        Ok(Self { meta, tensors })
    }

    /// Checks that the expert was trained on this backbone with this layout.
    pub fn check_compatible(
        &self,
        path: &Path,
        backbone_fingerprint: &str,
        dims: &ExpertDims,
        layout: Option<&BlockLayout>,
    ) -> Result<()> {
        let err = |msg: String| Error::File {
            path: path.to_path_buf(),
            msg,
        };
        if self.meta.dims != *dims {
            return Err(err(format!(
                "expert layers are shaped {:?}, the backbone needs {:?}",
                self.meta.dims, dims
            )));
        }
        if self.meta.backbone_fingerprint != backbone_fingerprint {
            return Err(err(format!(
                "trained on a different backbone ({}, fingerprint {}…), not this one (fingerprint {}…)",
                self.meta.backbone_source,
                &self.meta.backbone_fingerprint[..12.min(self.meta.backbone_fingerprint.len())],
                &backbone_fingerprint[..12.min(backbone_fingerprint.len())]
            )));
        }
        if let Some(layout) = layout {
            if self.meta.layout != *layout {
                return Err(err(format!(
                    "block layout {:?} differs from the model's {:?}",
                    self.meta.layout, layout
                )));
            }
        }
        Ok(())
    }

    /// The expert's layers, loaded for `backbone`.
    pub fn expert(&self, backbone: &mode_model::Backbone, path: &Path) -> Result<Expert> {
        let (covered, layers) = (self.meta.layout.num_layers(), backbone.layers.len());
        if covered != layers {
            return Err(Error::File {
                path: path.to_path_buf(),
                msg: format!(
                    "its block layout {:?} covers {covered} layers, the backbone has {layers}",
                    self.meta.layout.boundaries
                ),
            });
        }
        let layers: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| !k.contains(".gate."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Expert::from_tensors(
            &self.meta.domain,
            self.meta.form,
            backbone,
            &self.meta.layout,
            &layers,
            path,
        )
    }

    /// The stage-1 gates (backbone + this expert), one per block.
    pub fn gates(&self, path: &Path) -> Result<Vec<Gate>> {
        let hidden = self.meta.dims.hidden_size;
        (0..self.meta.layout.num_blocks())
            .map(|b| {
                let get = |n: &str, shape: &[usize]| -> Result<Tensor> {
                    let name = format!("blocks.{b}.gate.{n}");
                    let t = self.tensors.get(&name).ok_or_else(|| Error::File {
                        path: PathBuf::from(path),
                        msg: format!("tensor `{name}` is missing"),
                    })?;
                    check_gate_tensor(path, &name, t, shape)?;
                    Ok(t.clone())
                };
                Ok(Gate {
                    weight: get("weight", &[2, hidden])?,
                    bias: get("bias", &[2])?,
                    input: self.meta.gate_input,
                })
            })
            .collect()
    }
}

/// Checks a gate tensor read from `path`: its shape, and that its values are finite.
pub(crate) fn check_gate_tensor(
    path: &Path,
    name: &str,
    t: &Tensor,
    shape: &[usize],
) -> Result<()> {
    let err = |msg: String| Error::File {
        path: path.to_path_buf(),
        msg,
    };
    if t.dims() != shape {
        return Err(err(format!(
            "tensor `{name}` has shape {:?}, expected {shape:?}",
            t.dims()
        )));
    }
    let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        return Err(err(format!("tensor `{name}` holds NaN or infinite values")));
    }
    Ok(())
}
