//! How the backbone's layers are cut into blocks.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Blocks of consecutive backbone layers, and how many expert layers run beside each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLayout {
    /// Block `i` covers backbone layers `boundaries[i]..boundaries[i + 1]`; starts at 0, ends at
    /// the layer count.
    pub boundaries: Vec<usize>,
    pub expert_layers_per_block: usize,
}

impl BlockLayout {
    /// `blocks` blocks of (nearly) equal size over `num_layers` layers; earlier blocks take the
    /// remainder.
    pub fn even(num_layers: usize, blocks: usize, expert_layers_per_block: usize) -> Result<Self> {
        if blocks == 0 || blocks > num_layers {
            return Err(Error::Layout(format!(
                "{blocks} blocks cannot cut a backbone of {num_layers} layers"
            )));
        }
        let mut boundaries = vec![0];
        for i in 0..blocks {
            let size = num_layers / blocks + usize::from(i < num_layers % blocks);
            boundaries.push(boundaries[i] + size);
        }
        Self::explicit(boundaries, num_layers, expert_layers_per_block)
    }

    /// Explicit boundaries, e.g. `[0, 10, 20, 30]`.
    pub fn explicit(
        boundaries: Vec<usize>,
        num_layers: usize,
        expert_layers_per_block: usize,
    ) -> Result<Self> {
        let ok = boundaries.len() >= 2
            && boundaries[0] == 0
            && *boundaries.last().expect("non-empty") == num_layers
            && boundaries.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err(Error::Layout(format!(
                "block boundaries {boundaries:?} must rise strictly from 0 to the layer count {num_layers}"
            )));
        }
        if expert_layers_per_block == 0 {
            return Err(Error::Layout(
                "expert_layers_per_block must be at least 1".into(),
            ));
        }
        Ok(Self {
            boundaries,
            expert_layers_per_block,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.boundaries.len() - 1
    }

    /// Backbone layers of block `i`.
    pub fn block(&self, i: usize) -> std::ops::Range<usize> {
        self.boundaries[i]..self.boundaries[i + 1]
    }

    pub fn num_layers(&self) -> usize {
        *self.boundaries.last().expect("non-empty")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_layouts() {
        let l = BlockLayout::even(30, 3, 2).unwrap();
        assert_eq!(l.boundaries, vec![0, 10, 20, 30]);
        let l = BlockLayout::even(8, 3, 1).unwrap();
        assert_eq!(l.boundaries, vec![0, 3, 6, 8]);
        assert!(BlockLayout::even(2, 3, 1).is_err());
        assert!(BlockLayout::explicit(vec![0, 5, 5, 8], 8, 1).is_err());
        assert!(BlockLayout::explicit(vec![0, 8], 8, 0).is_err());
    }
}
