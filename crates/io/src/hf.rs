//! Hugging Face model folders: `config.json`, `*.safetensors` (sharded via
//! `model.safetensors.index.json` too) and `tokenizer.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// An opened Hugging Face model folder.
pub struct HfFolder {
    dir: PathBuf,
    config: serde_json::Value,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    routing: HashMap<String, usize>,
}

impl HfFolder {
    /// Opens `dir`, parses `config.json` and the headers of its safetensors files.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config = crate::read_json(&config_path)?;

        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for path in safetensors_files(&dir)? {
            crate::input::check(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map, see `GgufFile::open`.
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| Error::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, files.len());
            }
            files.push((path, st));
        }
        Ok(Self {
            dir,
            config,
            files,
            routing,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `config.json`, for error messages.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Path of `tokenizer.json` in the folder.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Names of all tensors across shards.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(|s| s.as_str())
    }

    fn locate(&self, name: &str) -> Result<&(PathBuf, MmapedSafetensors)> {
        match self.routing.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(Error::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            }),
        }
    }

    /// Shape of a tensor.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>> {
        let (path, st) = self.locate(name)?;
        let view = st.get(name).map_err(|e| Error::BadTensor {
            path: path.clone(),
            name: name.to_string(),
            msg: e.to_string(),
        })?;
        Ok(view.shape().to_vec())
    }

    /// Reads a tensor and converts it to `dtype`. Weights must be stored as floating point:
    /// integers (a quantised or mislabelled file) are refused, not converted.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (path, st) = self.locate(name)?;
        let bad = |msg: String| Error::BadTensor {
            path: path.clone(),
            name: name.to_string(),
            msg,
        };
        let view = st.get(name).map_err(|e| bad(e.to_string()))?;
        use safetensors::Dtype as D;
        if !matches!(view.dtype(), D::F64 | D::F32 | D::F16 | D::BF16) {
            return Err(bad(format!(
                "stored as {:?}; weights must be F32, F16, BF16 or F64",
                view.dtype()
            )));
        }
        view.load(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| bad(e.to_string()))
    }
}

/// The weight files of a folder: the shards named by the index if there is one, else every
/// `*.safetensors` file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let index = crate::read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index_path.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        return names
            .into_iter()
            .map(|n| {
                crate::input::inside(dir, n).map_err(|e| Error::Config {
                    path: index_path.clone(),
                    msg: format!("weight_map: {e}"),
                })
            })
            .collect();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Config {
            path: dir.to_path_buf(),
            msg: "no *.safetensors weight files in this folder".into(),
        });
    }
    Ok(files)
}
