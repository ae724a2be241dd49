//! Checkpoints of the training loop: parameters, optimizer moments and the step, written
//! atomically and read back in place for an exact resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use serde::{Deserialize, Serialize};

use crate::optim::Moments;
use crate::trainer::Error;
use crate::AdamW;

const CHECKPOINT_TENSORS: &str = "state.safetensors";
pub(crate) const CHECKPOINT_STATE: &str = "state.json";

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    optimizer_step: u64,
}

/// Writes parameters, optimizer moments and the step into `dir`, atomically: everything goes to
/// a fresh folder beside it, which then replaces `dir`.
pub fn save_checkpoint(
    dir: &Path,
    step: usize,
    params: &[(String, &Tensor)],
    opt: &AdamW,
) -> Result<(), Error> {
    let err = |msg: String| Error::File {
        path: dir.to_path_buf(),
        msg,
    };
    let tmp = mode_io::atomic::temp_dir_beside(dir).map_err(|e| err(e.to_string()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in params {
        tensors.insert(
            format!("param.{name}"),
            t.to_dtype(DType::F32)?.contiguous()?,
        );
        if let Some(m) = opt.state.get(name) {
            let shape = t.dims();
            tensors.insert(
                format!("adam_m.{name}"),
                Tensor::from_slice(&m.m, shape, &Device::Cpu)?,
            );
            tensors.insert(
                format!("adam_v.{name}"),
                Tensor::from_slice(&m.v, shape, &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, tmp.path().join(CHECKPOINT_TENSORS))?;
    let state = CheckpointState {
        step,
        optimizer_step: opt.step,
    };
    let json = serde_json::to_vec(&state).expect("state serialises");
    let state_path = tmp.path().join(CHECKPOINT_STATE);
    std::fs::write(&state_path, json).map_err(|e| err(e.to_string()))?;
    // The old checkpoint stays in place until the new one is complete.
    mode_io::atomic::commit_dir(tmp, dir).map_err(|e| err(e.to_string()))
}

/// Loads a checkpoint into `params` (in place) and `opt`; returns the step to continue from.
pub fn load_checkpoint(
    dir: &Path,
    params: &[(String, &Tensor)],
    opt: &mut AdamW,
) -> Result<usize, Error> {
    let state_path = dir.join(CHECKPOINT_STATE);
    let tensors_path = dir.join(CHECKPOINT_TENSORS);
    let err = |path: &Path, msg: String| Error::File {
        path: path.to_path_buf(),
        msg,
    };
    let state: CheckpointState = serde_json::from_slice(
        &mode_io::input::read(&state_path).map_err(|e| err(&state_path, e.to_string()))?,
    )
    .map_err(|e| err(&state_path, format!("bad checkpoint state: {e}")))?;
    // A named pipe in place of the tensors would block the memory map's open.
    mode_io::input::check(&tensors_path).map_err(|e| err(&tensors_path, e.to_string()))?;
    let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .map_err(|e| err(&tensors_path, e.to_string()))?;
    // A saved tensor of the parameter's shape, as f32 values; `None` when absent.
    let values = |key: &str, shape: &[usize]| -> Result<Option<Vec<f32>>, Error> {
        let Some(saved) = tensors.get(key) else {
            return Ok(None);
        };
        if saved.dims() != shape {
            return Err(err(
                &tensors_path,
                format!(
                    "`{key}` has shape {:?}, expected {shape:?}: the checkpoint is from another run",
                    saved.dims()
                ),
            ));
        }
        let values: Vec<f32> = saved
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1())
            .map_err(|e| err(&tensors_path, format!("`{key}`: {e}")))?;
        if !values.iter().all(|v| v.is_finite()) {
            return Err(err(
                &tensors_path,
                format!("`{key}` holds NaN or infinite values"),
            ));
        }
        Ok(Some(values))
    };
    // A checkpoint of another configuration (other --blocks, other method) may hold a superset
    // of this run's parameters: resuming from it would quietly mix two runs.
    let mut extra: Vec<&str> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("param."))
        .filter(|k| !params.iter().any(|(name, _)| name == k))
        .collect();
    extra.sort_unstable();
    if let Some(name) = extra.first() {
        return Err(err(
            &tensors_path,
            format!(
                "parameter `{name}` is not one of this run's: the checkpoint is from another run \
                 (other flags?); pass --restart to start over"
            ),
        ));
    }
    for (name, t) in params {
        let saved = values(&format!("param.{name}"), t.dims())?.ok_or_else(|| {
            err(
                &tensors_path,
                format!(
                    "parameter `{name}` is missing: the checkpoint is from another run; pass \
                     --restart to start over"
                ),
            )
        })?;
        t.inplace_op1(&CopyFrom(saved))?;
        if let (Some(m), Some(v)) = (
            values(&format!("adam_m.{name}"), t.dims())?,
            values(&format!("adam_v.{name}"), t.dims())?,
        ) {
            opt.state.insert(name.clone(), Moments { m, v });
        }
    }
    opt.step = state.optimizer_step;
    Ok(state.step)
}

/// Overwrites a tensor's values in place.
struct CopyFrom(Vec<f32>);

impl InplaceOp1 for CopyFrom {
    fn name(&self) -> &'static str {
        "copy-from"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("copy-from: destination is not contiguous");
        };
        match storage {
            CpuStorage::F32(v) => v[a..b].copy_from_slice(&self.0),
            CpuStorage::F64(v) => v[a..b]
                .iter_mut()
                .zip(&self.0)
                .for_each(|(d, s)| *d = *s as f64),
            _ => candle_core::bail!("copy-from: parameters must be f32 or f64"),
        }
        Ok(())
    }
}
