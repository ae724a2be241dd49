//! The names of the gated blocks' trainable tensors: the one place they are spelled. The
//! engine names gradients with them, the model names its tensors with them, and the optimizer
//! pairs the two by name, so a spelling in only one place would stop a tensor from training
//! (the optimizer refuses a trainable tensor without a gradient rather than skip it).

/// `blocks.{block}.experts.{expert}.layers.{layer}`: the prefix of one expert layer's tensors
/// (a tensor is this, a dot, then its name inside the layer).
pub fn expert_layer(block: usize, expert: usize, layer: usize) -> String {
    format!("blocks.{block}.experts.{expert}.layers.{layer}")
}

/// One tensor of an expert layer: [`expert_layer`] then `.{tensor}`.
pub fn expert_tensor(block: usize, expert: usize, layer: usize, tensor: &str) -> String {
    format!("{}.{tensor}", expert_layer(block, expert, layer))
}

/// The weight `[branches, hidden]` of block `block`'s gate.
pub fn gate_weight(block: usize) -> String {
    format!("blocks.{block}.gate.weight")
}

/// The bias `[branches]` of block `block`'s gate.
pub fn gate_bias(block: usize) -> String {
    format!("blocks.{block}.gate.bias")
}

/// Whether `name` is a gate's tensor ([`gate_weight`] or [`gate_bias`]).
pub fn is_gate(name: &str) -> bool {
    name.strip_prefix("blocks.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(b, rest)| {
            b.parse::<usize>().is_ok() && (rest == "gate.weight" || rest == "gate.bias")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            expert_tensor(2, 1, 0, "self_attn.q_proj.weight"),
            "blocks.2.experts.1.layers.0.self_attn.q_proj.weight"
        );
        assert!(is_gate(&gate_weight(3)) && is_gate(&gate_bias(0)));
        assert!(!is_gate(&expert_tensor(0, 0, 0, "gate.weight")));
        assert!(!is_gate("model.layers.0.mlp.gate_proj.weight"));
        assert!(!is_gate("blocks.x.gate.weight"));
    }
}
