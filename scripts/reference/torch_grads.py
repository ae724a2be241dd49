#!/usr/bin/env python3
"""Reference parameter gradients of tiny random Llama / Qwen2 / Qwen3 / Gemma 3 models, from HF transformers.

Run with the reference venv (scripts/reference/setup_venv.sh); no download, CPU, a few seconds:

    scripts/reference/.venv/bin/python scripts/reference/torch_grads.py [--out-dir tests/fixtures] [--arch llama ...]

For each architecture (`llama`, `qwen2`, `qwen3`, `gemma3`) a randomly initialised *ForCausalLM with
vocab 256, hidden 64, intermediate 128, 2 layers (gemma3: 3), 4 query heads, 2 KV heads, head_dim 16,
rms_norm_eps 1e-6, rope_theta 10000 (default RoPE, no scaling), eager attention, eval mode, float64:

* llama: tied embeddings, no biases;
* qwen2: untied embeddings (separate lm_head.weight), biases on q/k/v projections;
* qwen3: tied embeddings, no biases, q_norm/k_norm (RMSNorm over head_dim) before RoPE;
* gemma3 (Gemma3ForCausalLM, the text-only Gemma 3; mode's Config::tiny(Gemma3)): tied embeddings, no biases,
  q_norm/k_norm, 3 layers with layer_types [sliding, sliding, full] (a global layer every 3rd), sliding_window 4
  (a sliding layer's query sees the last 4 positions, itself included), RoPE theta 10000 on the full-attention
  layer and 100 on the sliding ones, query_pre_attn_scalar 16 (scores scaled by 16**-0.5 = 1/sqrt(head_dim)),
  GELU-tanh gated MLP (gelu_pytorch_tanh), embeddings multiplied by sqrt(64) = 8, four RMSNorms per layer
  (input, post_attention, pre_feedforward, post_feedforward) that scale by (1 + weight), no attention or final
  logit softcapping, pad_token_id None (so the embedding has no padding_idx row whose gradient torch would
  drop).

Initialisation: torch.manual_seed(0) before construction, then every parameter is re-drawn from a
torch.Generator seeded with the architecture's seed (llama 1, qwen2 2, qwen3 3, gemma3 4), in
named_parameters() order: Linear/Embedding weights and all biases uniform(-0.0346, 0.0346) (std ~0.02), RMSNorm
weights 1 + uniform(-0.1, 0.1). Gemma's RMSNorm weights are stored as offsets (the norm scales by 1 + weight,
transformers initialises them to 0), so for gemma3 they are uniform(-0.1, 0.1): the same effective scales
1 + uniform(-0.1, 0.1) as the others.

Input: ids [2, 9] from torch.randint(0, 256, generator=torch.Generator().manual_seed(1)), the same for every
architecture. Targets: targets[b, t] = ids[b, t + 1], -100 at the last position of each row and at position 0
of row 1. Loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=-100,
reduction="mean") on model(input_ids=ids).logits (no attention mask, positions 0..8, no labels argument).

Float64 throughout: transformers 5 computes RMSNorm, the attention softmax and the RoPE cos/sin in float32 even
in a float64 model. Those three steps are replaced here (same formulas, no dtype change; RoPE inv_freq
recomputed in float64, for gemma3 per layer type) so that the gradients are float64-exact; the attention mask
transformers builds (causal, and for gemma3's sliding layers causal AND key > query - 4) is used unchanged. The
script checks that the patched logits agree with the unpatched model's to float32 accuracy, for gemma3 that the
masks reaching attention are exactly the expected causal / sliding-window patterns and that the window changes
the logits (only at positions >= 4), and checks a few gradient entries by central finite differences (eps 1e-6;
see fd_check for how entries are chosen).

Writes tests/fixtures/grads_{arch}.safetensors:
    <name>        F64   every parameter under its Hugging Face name (named_parameters(); with tied embeddings
                        only model.embed_tokens.weight, lm_head.weight exists only for qwen2; gemma3 norm
                        weights are the stored offsets, scale = 1 + weight)
    grad.<name>   F64   d loss / d <name> (tied: includes the LM-head contribution)
    input_ids     I64 [2, 9]
    targets       I64 [2, 9]   -100 = ignored
    loss          F64 [1]
  metadata (strings): arch, transformers_version, torch_version, config (JSON), generator, seeds, init,
  targets_rule, loss_rule, float64_patches, fd_check (JSON list of the checked entries).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

GENERATOR = "scripts/reference/torch_grads.py"
DTYPE = torch.float64
BATCH, SEQ = 2, 9
INPUT_SEED = 1
ARCH_SEEDS = {"llama": 1, "qwen2": 2, "qwen3": 3, "gemma3": 4}
WEIGHT_BOUND = 0.0346  # uniform(-a, a) has std a / sqrt(3) ~= 0.02
NORM_BOUND = 0.1
FD_EPS = 1e-6
FD_TOL = 1e-6
FD_MIN_GRAD = 1e-4  # see fd_check
FD_ABS_FLOOR = 1e-10
GEMMA_WINDOW = 4

SIZES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=512,
)

ARCHS = {
    "llama": dict(
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        module=modeling_llama,
        prefix="Llama",
        kwargs=dict(tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
        fd_params=["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.1.input_layernorm.weight"],
    ),
    "qwen2": dict(
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        module=modeling_qwen2,
        prefix="Qwen2",
        kwargs=dict(tie_word_embeddings=False, use_sliding_window=False),
        fd_params=["model.layers.0.self_attn.k_proj.bias", "model.layers.1.mlp.down_proj.weight",
                   "lm_head.weight"],
    ),
    "qwen3": dict(
        config_cls=Qwen3Config,
        model_cls=Qwen3ForCausalLM,
        module=modeling_qwen3,
        prefix="Qwen3",
        kwargs=dict(tie_word_embeddings=True, attention_bias=False, use_sliding_window=False),
        fd_params=["model.layers.0.self_attn.k_norm.weight", "model.layers.0.mlp.gate_proj.weight",
                   "model.embed_tokens.weight"],
    ),
    # mode's Config::tiny(Architecture::Gemma3) (crates/model/src/config.rs): SIZES with 3 layers.
    "gemma3": dict(
        config_cls=Gemma3TextConfig,
        model_cls=Gemma3ForCausalLM,
        module=modeling_gemma3,
        prefix="Gemma3",
        kwargs=dict(
            num_hidden_layers=3,
            tie_word_embeddings=True,
            attention_bias=False,
            pad_token_id=None,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=GEMMA_WINDOW,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            query_pre_attn_scalar=16,
            hidden_activation="gelu_pytorch_tanh",
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            use_bidirectional_attention=False,
        ),
        drop=["rope_theta"],  # given per layer type in rope_parameters
        norm_offset=True,  # RMSNorm scales by 1 + weight: weights are initialised around 0, not 1
        fd_params=["model.layers.1.self_attn.q_norm.weight", "model.layers.2.post_feedforward_layernorm.weight",
                   "model.layers.0.self_attn.k_proj.weight"],
    ),
}


# ---- float64-preserving replacements for the three float32 islands in transformers' modeling code ----------

PATCH_HITS = {"rmsnorm": 0, "rope": 0, "attention": 0}


def rmsnorm_forward_f64(self, hidden_states):
    """weight * x / sqrt(mean(x^2) + eps), in the input's dtype (transformers upcasts to float32)."""
    PATCH_HITS["rmsnorm"] += 1
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def gemma_rmsnorm_forward_f64(self, x):
    """(x / sqrt(mean(x^2) + eps)) * (1 + weight), in the input's dtype (transformers upcasts to float32)."""
    PATCH_HITS["rmsnorm"] += 1
    return self._norm(x) * (1.0 + self.weight)


def rope_forward_f64(self, x, position_ids):
    """cos/sin of position * inv_freq in float64 (transformers computes them in float32)."""
    PATCH_HITS["rope"] += 1
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def gemma_rope_forward_f64(self, x, position_ids, layer_type):
    """rope_forward_f64 with Gemma 3's per-layer-type inv_freq (full_attention / sliding_attention)."""
    PATCH_HITS["rope"] += 1
    inv_freq = getattr(self, f"{layer_type}_inv_freq").to(device=x.device, dtype=torch.float64)
    scaling = getattr(self, f"{layer_type}_attention_scaling")
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


SEEN_MASKS = {}  # layer_idx -> the attention mask that layer's attention received (for gemma3's mask check)


def eager_attention_f64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager GQA attention with the softmax in the input dtype (transformers forces float32).

    The additive mask is transformers' own (causal; for Gemma 3's sliding layers also the window), unchanged.
    """
    PATCH_HITS["attention"] += 1
    assert kwargs.get("softcap") is None, kwargs["softcap"]
    SEEN_MASKS[getattr(module, "layer_idx", None)] = attention_mask
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)  # [B, Hkv, T, D] -> [B, H, T, D], head h uses kv head h // groups
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def f64_inv_freq(theta, head_dim):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def apply_f64_patches(spec, model):
    mod, prefix = spec["module"], spec["prefix"]
    gemma = spec.get("norm_offset", False)
    getattr(mod, f"{prefix}RMSNorm").forward = gemma_rmsnorm_forward_f64 if gemma else rmsnorm_forward_f64
    getattr(mod, f"{prefix}RotaryEmbedding").forward = gemma_rope_forward_f64 if gemma else rope_forward_f64
    mod.eager_attention_forward = eager_attention_f64
    rot = model.model.rotary_emb
    cfg = model.config
    if gemma:
        # One inv_freq buffer per layer type, each with its own theta.
        assert sorted(rot.layer_types) == ["full_attention", "sliding_attention"], rot.layer_types
        for lt in rot.layer_types:
            assert rot.rope_type[lt] == "default" and getattr(rot, f"{lt}_attention_scaling") == 1.0, lt
            setattr(rot, f"{lt}_inv_freq", f64_inv_freq(cfg.rope_parameters[lt]["rope_theta"], cfg.head_dim))
        return
    assert rot.rope_type == "default" and rot.attention_scaling == 1.0, (rot.rope_type, rot.attention_scaling)
    theta = cfg.rope_parameters["rope_theta"]
    rot.inv_freq = f64_inv_freq(theta, cfg.head_dim)  # registered buffer: assignment keeps it a buffer


# ---- model, data, loss ------------------------------------------------------------------------------------


def build_model(arch):
    spec = ARCHS[arch]
    kwargs = {**SIZES, **spec["kwargs"]}
    for key in spec.get("drop", []):
        del kwargs[key]
    config = spec["config_cls"](**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = spec["model_cls"](config).to(DTYPE)
    model.eval()

    gen = torch.Generator().manual_seed(ARCH_SEEDS[arch])
    norm_param_ids = {
        id(m.weight) for m in model.modules() if type(m).__name__.endswith("RMSNorm")
    }
    linear_emb_ids = set()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            linear_emb_ids.add(id(m.weight))
            if getattr(m, "bias", None) is not None:
                linear_emb_ids.add(id(m.bias))
    norm_base = 0.0 if spec.get("norm_offset", False) else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norm_param_ids:
                p.copy_(norm_base + torch.empty_like(p).uniform_(-NORM_BOUND, NORM_BOUND, generator=gen))
            elif id(p) in linear_emb_ids:
                p.uniform_(-WEIGHT_BOUND, WEIGHT_BOUND, generator=gen)
            else:
                raise SystemExit(f"{arch}: parameter {name} is neither Linear/Embedding nor RMSNorm")
    return model


def make_data():
    gen = torch.Generator().manual_seed(INPUT_SEED)
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ), generator=gen, dtype=torch.int64)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[1, 0] = -100
    return ids, targets


def loss_fn(model, ids, targets):
    logits = model(input_ids=ids).logits
    assert logits.dtype == DTYPE, logits.dtype
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="mean"
    )


def check_config(arch, model):
    if arch == "gemma3":
        return check_config_gemma3(model)
    cfg = model.config
    print(f"--- {arch}: {type(model).__name__} config ---")
    print(cfg.to_json_string(use_diff=False))
    rp = cfg.rope_parameters
    assert rp["rope_type"] == "default" and float(rp["rope_theta"]) == 10000.0, rp
    assert set(rp) <= {"rope_type", "rope_theta"}, f"unexpected rope parameters {rp}"
    assert getattr(cfg, "rope_scaling", None) in (None, {}, rp), cfg.rope_scaling
    assert cfg.rms_norm_eps == 1e-6 and cfg.head_dim == 16, (cfg.rms_norm_eps, cfg.head_dim)
    assert cfg._attn_implementation == "eager", cfg._attn_implementation
    assert not getattr(cfg, "use_sliding_window", False)
    tied = cfg.tie_word_embeddings
    assert tied == ARCHS[arch]["kwargs"]["tie_word_embeddings"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.head_dim == 16 and attn.num_key_value_groups == 2 and attn.scaling == 16**-0.5
        has_bias = attn.q_proj.bias is not None
        assert has_bias == (arch == "qwen2") and (attn.k_proj.bias is not None) == has_bias
        assert attn.o_proj.bias is None
        assert hasattr(attn, "q_norm") == (arch == "qwen3")
        for norm in [layer.input_layernorm, layer.post_attention_layernorm] + (
            [attn.q_norm, attn.k_norm] if arch == "qwen3" else []
        ):
            assert norm.variance_epsilon == 1e-6
    print(f"in effect: rope_theta={rp['rope_theta']} rope_type={rp['rope_type']} rms_norm_eps={cfg.rms_norm_eps} "
          f"head_dim={cfg.head_dim} tie_word_embeddings={tied} attn={cfg._attn_implementation} "
          f"dtype={next(model.parameters()).dtype}")


GEMMA_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]
GEMMA_THETAS = {"full_attention": 10000.0, "sliding_attention": 100.0}


def check_config_gemma3(model):
    """The Gemma 3 model is mode's Config::tiny(Architecture::Gemma3) (crates/model/src/config.rs)."""
    cfg = model.config
    print(f"--- gemma3: {type(model).__name__} config ---")
    print(cfg.to_json_string(use_diff=False))
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    for key, want in SIZES.items():
        if key == "rope_theta":
            continue
        want = 3 if key == "num_hidden_layers" else want
        assert getattr(cfg, key) == want, (key, getattr(cfg, key), want)
    assert cfg.layer_types == GEMMA_LAYER_TYPES, cfg.layer_types
    assert cfg.sliding_window == GEMMA_WINDOW and not cfg.use_bidirectional_attention, cfg.sliding_window
    rp = cfg.rope_parameters
    assert set(rp) == set(GEMMA_THETAS), rp
    for lt, theta in GEMMA_THETAS.items():
        assert set(rp[lt]) <= {"rope_type", "rope_theta"}, f"unexpected rope parameters {rp}"
        assert rp[lt]["rope_type"] == "default" and float(rp[lt]["rope_theta"]) == theta, rp
    assert cfg.query_pre_attn_scalar == 16 and cfg.hidden_activation == "gelu_pytorch_tanh"
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert cfg._attn_implementation == "eager", cfg._attn_implementation
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens
    assert emb.padding_idx is None and emb.scalar_embed_scale == 8.0 and emb.embed_scale.item() == 8.0
    assert model.model.norm.eps == 1e-6
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.head_dim == 16 and attn.num_key_value_groups == 2 and attn.scaling == 16**-0.5
        assert attn.layer_type == GEMMA_LAYER_TYPES[i] and attn.is_causal
        assert attn.sliding_window == (GEMMA_WINDOW if i < 2 else None), (i, attn.sliding_window)
        assert all(getattr(attn, f"{n}_proj").bias is None for n in "qkvo")
        assert all(getattr(layer.mlp, f"{n}_proj").bias is None for n in ("gate", "up", "down"))
        assert type(layer.mlp.act_fn).__name__ == "GELUTanh"
        for norm in [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm]:
            assert type(norm).__name__ == "Gemma3RMSNorm" and norm.eps == 1e-6
    print(f"in effect: layer_types={cfg.layer_types} sliding_window={cfg.sliding_window} "
          f"rope_theta full={rp['full_attention']['rope_theta']} sliding={rp['sliding_attention']['rope_theta']} "
          f"scaling={model.model.layers[0].self_attn.scaling} rms_norm_eps={cfg.rms_norm_eps} "
          f"head_dim={cfg.head_dim} tie_word_embeddings={cfg.tie_word_embeddings} "
          f"attn={cfg._attn_implementation} dtype={next(model.parameters()).dtype}")


def check_gemma3_window(model, ids, logits):
    """The sliding window is in force: the masks reaching attention are exactly causal (layer 2) and causal with
    key > query - GEMMA_WINDOW (layers 0, 1), and widening the window beyond the sequence changes the logits at
    positions >= GEMMA_WINDOW only."""
    q = torch.arange(SEQ)[:, None]
    k = torch.arange(SEQ)[None, :]
    causal = k <= q
    window = causal & (k > q - GEMMA_WINDOW)
    for i, lt in enumerate(model.config.layer_types):
        mask = SEEN_MASKS[i]
        assert mask is not None and mask.dtype == DTYPE and mask.shape[-2:] == (SEQ, SEQ), (i, mask)
        allowed = (mask == 0).expand(BATCH, 1, SEQ, SEQ)
        blocked = (mask == torch.finfo(DTYPE).min).expand(BATCH, 1, SEQ, SEQ)
        assert bool((allowed | blocked).all()), f"layer {i}: mask has values other than 0 and min"
        want = window if lt == "sliding_attention" else causal
        assert torch.equal(allowed, want.expand(BATCH, 1, SEQ, SEQ)), f"layer {i} ({lt}): mask {allowed[0, 0]}"
    model.config.sliding_window = 10**6
    try:
        with torch.no_grad():
            wide = model(input_ids=ids).logits
    finally:
        model.config.sliding_window = GEMMA_WINDOW
    head = (wide[:, :GEMMA_WINDOW] - logits[:, :GEMMA_WINDOW]).abs().max().item()
    tail = (wide[:, GEMMA_WINDOW:] - logits[:, GEMMA_WINDOW:]).abs().amax(dim=-1).min().item()
    print(f"gemma3: window {GEMMA_WINDOW} vs 10**6: max |logit change| at positions < {GEMMA_WINDOW} = {head:.1e}, "
          f"smallest per-position max change at positions >= {GEMMA_WINDOW} = {tail:.1e}")
    assert head < 1e-13 and tail > 1e-6, (head, tail)
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert torch.equal(again, logits)


def loss_change(z0, z, targets):
    """loss(z) - loss(z0) for logits z near z0, without forming the two ~5.6 losses.

    Per target row: CE(z) - CE(z0) = log(sum_j softmax(z0)_j exp(d_j)) - d_t with d = z - z0, evaluated as
    log1p(sum_j softmax(z0)_j expm1(d_j)) - d_t. The logits are O(0.1), so d keeps ~1e-17 absolute accuracy,
    where loss(z) - loss(z0) would lose ~1e-15 (one ulp of the loss) to cancellation.
    """
    valid = targets.reshape(-1) != -100
    t = targets.reshape(-1)[valid]
    z0 = z0.reshape(-1, z0.shape[-1])[valid]
    d = z.reshape(-1, z.shape[-1])[valid] - z0
    p0 = torch.softmax(z0, dim=-1)
    per_row = torch.log1p((p0 * torch.expm1(d)).sum(-1)) - d.gather(1, t[:, None]).squeeze(1)
    return per_row.mean().item()


def fd_entry(model, ids, targets, p, idx, z0):
    """Central differences in p[idx] with step FD_EPS (p[idx] restored exactly afterwards).

    Returns (fd, fd_plain): fd from loss_change (the asserted one), fd_plain = (L(+) - L(-)) / 2 eps from
    the loss values themselves (reported only; its absolute error is ~1e-9, the loss's ulp / eps).
    """
    with torch.no_grad():
        orig = p[idx].item()
        p[idx] = orig + FD_EPS
        zp = model(input_ids=ids).logits
        p[idx] = orig - FD_EPS
        zm = model(input_ids=ids).logits
        p[idx] = orig
    fd = (loss_change(z0, zp, targets) - loss_change(z0, zm, targets)) / (2 * FD_EPS)
    lp = F.cross_entropy(zp.reshape(-1, zp.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
    lm = F.cross_entropy(zm.reshape(-1, zm.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
    return fd, (lp - lm) / (2 * FD_EPS)


def fd_check(arch, model, ids, targets, params, grads):
    """Central finite differences (float64, eps 1e-6) vs autograd, per parameter on 3 entries drawn at random
    among those with |autograd grad| >= FD_MIN_GRAD (asserted: relative error < FD_TOL) and 3 entries drawn
    from all entries (asserted: |fd - autograd| <= FD_TOL * |autograd| + FD_ABS_FLOOR, since a relative
    error means little for the ~1e-7 gradients of some attention entries)."""
    gen = torch.Generator().manual_seed(1000 + ARCH_SEEDS[arch])
    with torch.no_grad():
        z0 = model(input_ids=ids).logits
    results = []
    for name in ARCHS[arch]["fd_params"]:
        p, g = params[name], grads[name]
        big = (g.abs().reshape(-1) >= FD_MIN_GRAD).nonzero().reshape(-1)
        if big.numel() < 3:
            big = g.abs().reshape(-1).topk(3).indices
        picks = [("rel", int(i)) for i in big[torch.randperm(big.numel(), generator=gen)[:3]]]
        taken = {flat for _, flat in picks}
        rest = [int(i) for i in torch.randperm(p.numel(), generator=gen) if int(i) not in taken]
        picks += [("any", flat) for flat in rest[:3]]
        for kind, flat in picks:
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), p.shape))
            fd, fd_plain = fd_entry(model, ids, targets, p, idx, z0)
            ag = g[idx].item()
            err = abs(fd - ag)
            rel = err / max(abs(fd), abs(ag), 1e-300)
            ok = rel < FD_TOL if kind == "rel" else err <= FD_TOL * abs(ag) + FD_ABS_FLOOR
            results.append(dict(param=name, index=list(idx), kind=kind, autograd=ag, fd=fd, abs_err=err,
                                rel_err=rel, ok=ok, fd_plain=fd_plain, abs_err_plain=abs(fd_plain - ag)))
            print(f"  fd[{kind}] {name}{list(idx)}: autograd {ag:+.12e} fd {fd:+.12e} "
                  f"abs {err:.1e} rel {rel:.1e} {'ok' if ok else 'FAIL'} (plain fd abs {abs(fd_plain - ag):.1e})")
    worst_rel = max(r["rel_err"] for r in results if r["kind"] == "rel")
    worst_rel_all = max(r["rel_err"] for r in results)
    worst_abs = max(r["abs_err"] for r in results)
    print(f"  fd: worst rel error {worst_rel:.2e} on |grad| >= {FD_MIN_GRAD:g} entries (tolerance {FD_TOL:g}); "
          f"over all entries worst rel {worst_rel_all:.2e}, worst abs {worst_abs:.2e} (floor {FD_ABS_FLOOR:g})")
    assert all(r["ok"] for r in results), f"{arch}: finite-difference check failed"
    return results


def run_arch(arch, out_dir):
    spec = ARCHS[arch]
    model = build_model(arch)
    check_config(arch, model)
    ids, targets = make_data()

    with torch.no_grad():
        logits_hf = model(input_ids=ids).logits
    apply_f64_patches(spec, model)
    before = dict(PATCH_HITS)
    with torch.no_grad():
        logits_f64 = model(input_ids=ids).logits
    n_layers = model.config.num_hidden_layers
    # Per layer: input + post-attention norms, + q/k norms (qwen3, gemma3), + pre/post-feedforward (gemma3);
    # then the final norm. RoPE: one call per forward, gemma3 one per layer type.
    norms_per_layer = {"qwen3": 4, "gemma3": 6}.get(arch, 2)
    n_norms = norms_per_layer * n_layers + 1
    n_ropes = len(set(model.config.layer_types)) if arch == "gemma3" else 1
    assert PATCH_HITS["rmsnorm"] - before["rmsnorm"] == n_norms, PATCH_HITS
    assert PATCH_HITS["rope"] - before["rope"] == n_ropes, PATCH_HITS
    assert PATCH_HITS["attention"] - before["attention"] == n_layers, PATCH_HITS
    patch_diff = (logits_hf - logits_f64).abs().max().item()
    print(f"{arch}: max |logits(transformers, float32 islands) - logits(float64 patched)| = {patch_diff:.3e}")
    assert patch_diff < 1e-5, patch_diff
    if arch == "gemma3":
        check_gemma3_window(model, ids, logits_f64)

    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids, targets)
    loss.backward()
    print(f"{arch}: loss = {loss.item():.17g} over {int((targets != -100).sum())} targets")

    params = dict(model.named_parameters())
    assert ("lm_head.weight" in params) == (not model.config.tie_word_embeddings), list(params)
    grads = {}
    for name, p in params.items():
        assert p.dtype == DTYPE and p.grad is not None and p.grad.dtype == DTYPE, name
        assert torch.isfinite(p.grad).all(), name
        grads[name] = p.grad.detach().clone()

    fd_results = fd_check(arch, model, ids, targets, params, grads)

    tensors = {}
    for name, p in params.items():
        tensors[name] = p.detach().clone().contiguous()
        tensors[f"grad.{name}"] = grads[name].contiguous()
    tensors["input_ids"] = ids.contiguous()
    tensors["targets"] = targets.contiguous()
    tensors["loss"] = loss.detach().reshape(1).clone().contiguous()

    metadata = {
        "arch": arch,
        "model_class": type(model).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config": model.config.to_json_string(use_diff=False),
        "generator": GENERATOR,
        "seeds": json.dumps({"torch.manual_seed": 0, "init_generator": ARCH_SEEDS[arch], "input_generator": INPUT_SEED}),
        "init": f"Linear/Embedding weights and biases uniform(-{WEIGHT_BOUND}, {WEIGHT_BOUND}); "
                + (f"RMSNorm weights (offsets: scale = 1 + weight) uniform(-{NORM_BOUND}, {NORM_BOUND}); "
                   if spec.get("norm_offset", False) else
                   f"RMSNorm weights 1 + uniform(-{NORM_BOUND}, {NORM_BOUND}); ")
                + "named_parameters() order",
        "targets_rule": "targets[b,t] = input_ids[b,t+1]; -100 at t = T-1 and at (b=1, t=0)",
        "loss_rule": "F.cross_entropy(logits.reshape(-1,V), targets.reshape(-1), ignore_index=-100, reduction=mean)",
        "float64_patches": "RMSNorm, attention softmax and RoPE cos/sin computed in float64 "
                           f"(transformers: float32); max logits change {patch_diff:.3e}",
        "fd_check": json.dumps(fd_results),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"grads_{arch}.safetensors")
    save_file(tensors, path, metadata=metadata)
    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items()), path
    print(f"{arch}: wrote {path} ({os.path.getsize(path)} bytes, {len(params)} parameters)")
    return loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="tests/fixtures")
    ap.add_argument("--arch", action="append", choices=list(ARCHS), help="default: all four")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    losses = {arch: run_arch(arch, args.out_dir) for arch in (args.arch or list(ARCHS))}
    print("losses:", json.dumps(losses))


if __name__ == "__main__":
    main()
