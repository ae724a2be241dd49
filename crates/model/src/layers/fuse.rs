//! Quantised projections that read the same input (q/k/v, gate/up) stacked into one matrix, so
//! that one pass over the input serves them all.

use candle_core::{DType, Device, Tensor};

use super::{Linear, Weight};
use crate::compact::QMatrix;

/// The stacked projection, unless one of its parts has since had LoRA attached (which the
/// stack does not carry).
pub(crate) fn fused<'a, const N: usize>(
    stack: &'a Option<Linear>,
    parts: [&Linear; N],
) -> Option<&'a Linear> {
    stack
        .as_ref()
        .filter(|_| parts.iter().all(|p| p.lora.is_none()))
}

/// Stacks quantised projections that read the same input into one (their biases stacked, zeros
/// for those without), and makes each a view of its rows in it. `None` when one is not
/// quantised, or they are not all of one format.
pub fn fuse_quantized(parts: &mut [&mut Linear]) -> candle_core::Result<Option<Linear>> {
    let mut matrices = Vec::with_capacity(parts.len());
    for p in parts.iter() {
        match &p.weight {
            Weight::Quantized(q) => matrices.push(q),
            Weight::Dense(_) | Weight::Packed(_) => return Ok(None),
        }
    }
    // Parts of other formats, or whose rows end inside a group of interleaved rows, stay apart.
    let Ok((stack, views)) = QMatrix::stack(&matrices) else {
        return Ok(None);
    };
    let bias = if parts.iter().any(|p| p.bias.is_some()) {
        let biases = parts
            .iter()
            .map(|p| match &p.bias {
                Some(b) => b.to_dtype(DType::F32),
                None => Tensor::zeros(p.out_features(), DType::F32, &Device::Cpu),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Some(Tensor::cat(&biases, 0)?)
    } else {
        None
    };
    for (p, view) in parts.iter_mut().zip(views) {
        p.weight = Weight::Quantized(view);
    }
    Ok(Some(Linear {
        weight: Weight::Quantized(stack),
        bias,
        lora: None,
    }))
}
