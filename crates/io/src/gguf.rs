//! GGUF files: metadata and tensors, dequantised at load.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// An opened GGUF file: its parsed header and a memory map of the tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    mmap: memmap2::Mmap,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file. Tensor data is read lazily by [`Self::tensor`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = crate::input::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us is the same hazard every
        // mmap-based loader (llama.cpp, safetensors) accepts.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        // candle's reader panics on some damaged headers (an alignment of 0 divides by zero).
        let content = crate::guard::catch_panic(|| Content::read(&mut Cursor::new(&mmap[..])))
            .unwrap_or_else(|panic| {
                Err(candle_core::Error::Msg(format!("damaged header ({panic})")))
            })
            .map_err(|e| Error::Gguf {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        Ok(Self {
            path,
            content,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw metadata value for `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn metadata_err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.metadata(key)
            .ok_or_else(|| self.metadata_err(key, "missing"))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.required(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| self.metadata_err(key, e.to_string()))
    }

    /// An integer metadata value of any integer width, as `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        value_to_u64(self.required(key)?).ok_or_else(|| self.metadata_err(key, "not an integer"))
    }

    /// A float metadata value (f32 or f64).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.required(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            v => value_to_u64(v)
                .map(|v| v as f64)
                .ok_or_else(|| self.metadata_err(key, "not a number")),
        }
    }

    /// An optional integer metadata value.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.metadata(key).map(|_| self.get_u64(key)).transpose()
    }

    /// An optional float metadata value.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.metadata(key).map(|_| self.get_f64(key)).transpose()
    }

    /// An array whose every element `convert` accepts (`what` names the element type in
    /// the error).
    fn get_array<'a, T>(
        &'a self,
        key: &str,
        what: &str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let values = match self.required(key)? {
            Value::Array(values) => values,
            _ => return Err(self.metadata_err(key, "not an array")),
        };
        values
            .iter()
            .map(|v| {
                convert(v)
                    .ok_or_else(|| self.metadata_err(key, format!("array element is not {what}")))
            })
            .collect()
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// An array of integers.
    pub fn get_u64_array(&self, key: &str) -> Result<Vec<u64>> {
        self.get_array(key, "an integer", value_to_u64)
    }

    /// An array of numbers (f32, f64 or integers), as f64.
    pub fn get_f64_array(&self, key: &str) -> Result<Vec<f64>> {
        self.get_array(key, "a number", |v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            v => value_to_u64(v).map(|x| x as f64),
        })
    }

    /// An optional boolean metadata value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.metadata_err(key, "not true or false")),
        }
    }

    /// Names of all tensors in the file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(|s| s.as_str())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape of a tensor in row-major order (outermost dimension first), as candle reports it.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// The storage type of a tensor as written in the file, e.g. `Q4_1`.
    pub fn tensor_ggml_dtype(&self, name: &str) -> Option<String> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| format!("{:?}", info.ggml_dtype))
    }

    /// Reads a tensor and dequantises it to `dtype` (f32, f16 or bf16).
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let bad = |msg: String| Error::BadTensor {
            path: self.path.clone(),
            name: name.to_string(),
            msg,
        };
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            });
        };
        // candle counts elements with a product that wraps: a lying shape could pass its size
        // check and give a tensor without the data behind it.
        let dims = info.shape.dims();
        if dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none()
        {
            return Err(bad(format!(
                "shape {dims:?} has more elements than memory can hold"
            )));
        }
        let qtensor = self
            .content
            .tensor(&mut Cursor::new(&self.mmap[..]), name, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let tensor = match dtype {
            DType::F16 => qtensor.dequantize_f16(&Device::Cpu),
            _ => qtensor.dequantize(&Device::Cpu),
        }
        .map_err(|e| bad(e.to_string()))?;
        tensor
            .to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(|e| bad(e.to_string()))
    }
}

fn value_to_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(v) => Some(v as u64),
        Value::U16(v) => Some(v as u64),
        Value::U32(v) => Some(v as u64),
        Value::U64(v) => Some(v),
        Value::I8(v) if v >= 0 => Some(v as u64),
        Value::I16(v) if v >= 0 => Some(v as u64),
        Value::I32(v) if v >= 0 => Some(v as u64),
        Value::I64(v) if v >= 0 => Some(v as u64),
        _ => None,
    }
}
