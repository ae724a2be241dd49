#!/usr/bin/env python3
"""Peer benchmark: training-step speed of PyTorch eager (CPU, float32), the peer of `mode bench train`.

    scripts/reference/.venv/bin/python bench/peer/torch_train.py --mode full|lora|branch \
        --threads 2 --steps 6 --warmup 1 [--seq 256 --batch 2] [--gguf PATH.gguf]
    scripts/reference/.venv/bin/python bench/peer/torch_train.py --self-check [--gguf PATH.gguf]

Backbones: SmolLM2-135M (the default, Llama family: LlamaForCausalLM) and Gemma 3 270M
(--gguf ~/.cache/mode/backbones/gemma3-270m/gemma-3-270m-q4_k_m.gguf: Gemma3ForCausalLM, 18 layers).

One optimizer step = forward over batch x seq random token ids, loss, backward, global-norm gradient clipping
at 1.0, AdamW step (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, over the trainable parameters
only), zero_grad. The loss is the mean next-token cross-entropy over all batch x seq positions, computed here
from the logits with F.cross_entropy: targets are the inputs shifted left by one, the last position of each row
is ignored (ignore_index=-100). Input ids are uniform in [0, vocab) from a torch.Generator seeded 0, a fresh batch
per step (the same sequence of batches on every run); drawing them is not timed.

Modes:
  full    every parameter trainable (the embedding is tied to the LM head: one parameter; both backbones).
  lora    peft LoRA r=16, alpha=32, dropout 0, on q/k/v/o/gate/up/down projections (every linear layer of a
          decoder layer, the same seven names in Llama and Gemma 3), bias "none"; base frozen.
  branch  the whole backbone frozen, plus one trainable branch: deep copies of decoder layers 10 and 11. The
          branch reads the hidden state entering layer 10; its output and layer 11's are mixed 0.5/0.5 and the
          mix feeds layer 12. The decoder loop is run here (embed -> 0..9 under torch.no_grad() -> 10,11 and
          branch 10',11' -> mix -> 12..last -> final norm -> lm_head), so no graph is built before the first
          trainable parameter. For Gemma 3 the loop does what Gemma3TextModel.forward does: the scaled
          embedding (model.model.embed_tokens multiplies by sqrt(hidden)), one (cos, sin) per layer type from
          the rotary module (sliding layers: local base 10k; full layers: 1M), the causal mask for
          full-attention layers and the sliding-window causal mask for sliding layers (a branch copy of layer
          i gets layer i's), the final norm and, where the config has one, the final logit soft-cap.

--steps is the total number of optimizer steps; the first --warmup of them are not timed. Reported values are
medians over the timed steps of the wall time (time.perf_counter) and process CPU time (time.process_time) of
forward + loss + backward + clip + optimizer step + zero_grad. Prints one JSON line on stdout (progress on
stderr). peak_rss_mib is this process's ru_maxrss, so run each mode in its own process (bench/peer/train_all.sh).

--self-check runs the hand-written decoder loop (no branch) against model(input_ids).logits of the untouched
model, and the branch model right after construction (branch == layers 10-11, so the mix is the identity)
against the same logits; prints one JSON line and exits 1 if either max abs diff exceeds 1e-4. For a model
with a sliding window (Gemma 3: 512) it checks a second input of batch 1 x (window + 64) tokens too, so that
the sliding-window mask really cuts something.

The backbone: the GGUF (default: the Q4_1 SmolLM2 of scripts/fetch_backbone.sh) is dequantized by transformers
once (about 30 s) and saved as a float32 HF checkpoint under ${MODE_HOME:-$HOME/.cache/mode}/peer/NAME-f32/,
which later runs load in a few seconds (the conversion runs in a child process so it does not count in peak
RSS). NAME is the folder the GGUF sits in when that is $MODE_HOME/backbones/NAME/ (smollm2-135m-f32,
gemma3-270m-f32), else the GGUF's file name without .gguf; the copy records the GGUF's name and size in
source.json and is converted again when they do not match.
OMP_WAIT_POLICY=PASSIVE is set before torch is imported (OpenMP spinning is very slow on a shared 2-core box).
"""

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import copy
import importlib.util
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

PEFT_VERSION = "0.21.2"
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
VENV_PYTHON = os.path.join(REPO, "scripts", "reference", ".venv", "bin", "python")
PEFT_PIP_CMD = f"{VENV_PYTHON} -m pip install --no-deps peft=={PEFT_VERSION}"

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BRANCH_FIRST, BRANCH_DEPTH, BRANCH_MIX = 10, 2, 0.5
SELF_CHECK_TOL = 1e-4


def log(msg):
    print(f"torch_train: {msg}", file=sys.stderr, flush=True)


def mode_home():
    return os.environ.get("MODE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mode")


def default_gguf():
    return os.path.join(mode_home(), "backbones", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_f32_dir(gguf):
    """peer/NAME-f32 under the mode home: NAME is the backbone's cache folder (backbones/NAME/x.gguf) or else
    the GGUF's stem, so that each backbone gets its own copy (smollm2-135m-f32, gemma3-270m-f32)."""
    gguf = os.path.abspath(gguf)
    parent = os.path.dirname(gguf)
    if os.path.dirname(parent) == os.path.abspath(os.path.join(mode_home(), "backbones")):
        name = os.path.basename(parent)
    else:
        name = os.path.splitext(os.path.basename(gguf))[0]
    return os.path.join(mode_home(), "peer", f"{name}-f32")


def gguf_source(gguf):
    return {"gguf": os.path.basename(gguf), "bytes": os.path.getsize(gguf)}


def f32_copy_ready(d, gguf):
    if not (os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, "model.safetensors"))):
        return False
    marker = os.path.join(d, "source.json")
    if not os.path.isfile(marker):
        return True  # a copy written before source.json existed (SmolLM2's): trusted, as before
    with open(marker) as f:
        return json.load(f) == gguf_source(gguf)


def convert_gguf_to_f32(gguf, out_dir):
    """Dequantize the GGUF with transformers and save a float32 HF checkpoint at out_dir (atomically)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(gguf):
        raise SystemExit(f"torch_train: GGUF not found: {gguf} (run scripts/fetch_backbone.sh)")
    gdir, gname = os.path.split(os.path.abspath(gguf))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    # Without these, save_pretrained writes a GGUF quantization config that from_pretrained then trips over.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "source.json"), "w") as f:
        json.dump(gguf_source(gguf), f)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    log(f"saved float32 copy of {gname} to {out_dir} in {time.perf_counter() - t0:.0f} s")


def load_model(args):
    from transformers import AutoModelForCausalLM

    if not f32_copy_ready(args.f32_dir, args.gguf):
        log(f"no float32 copy of {os.path.basename(args.gguf)} at {args.f32_dir}; converting it in a child "
            f"process (~30 s, once)")
        cmd = [sys.executable, os.path.abspath(__file__), "--convert-only", "--gguf", args.gguf, "--f32-dir", args.f32_dir]
        subprocess.run(cmd, check=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.f32_dir, dtype=torch.float32, attn_implementation=args.attn)
    log(f"loaded {args.f32_dir} ({model.config.model_type}, {model.config.num_hidden_layers} layers, "
        f"attn {model.config._attn_implementation}) in {time.perf_counter() - t0:.1f} s")
    return model


def require_peft():
    if importlib.util.find_spec("peft") is None:
        raise SystemExit(
            "torch_train: peft is not installed in this Python; --mode lora needs it. Install it with\n"
            f"    {PEFT_PIP_CMD}\n"
            "(--no-deps matters: without it pip would pull torch's CUDA wheels and triton again; "
            "bench/peer/train_all.sh does this for you)")
    import peft

    if peft.__version__ != PEFT_VERSION:
        log(f"warning: peft {peft.__version__} installed, the benchmark pins {PEFT_VERSION}")
    return peft


GEMMA3 = "gemma3_text"


class DecoderLoop(torch.nn.Module):
    """Runs a transformers causal LM's decoder by hand, optionally with a trainable parallel branch.

    Llama family (SmolLM2) and Gemma 3 (Gemma3ForCausalLM). Without a branch, forward(ids) reproduces
    model(input_ids=ids).logits. With one, the branch (deep copies of layers [first, first + depth)) reads the
    same hidden state as layer `first`, and mix * main + (1 - mix) * branch after layer first + depth - 1 feeds
    the rest of the stack. Everything before layer `first` runs under torch.no_grad() (the backbone is meant to
    be frozen there).
    """

    def __init__(self, lm, branch=False, first=BRANCH_FIRST, depth=BRANCH_DEPTH, mix=BRANCH_MIX):
        super().__init__()
        self.lm = lm
        self.first, self.depth, self.mix = first, depth, mix
        self.gemma3 = lm.config.model_type == GEMMA3
        if not self.gemma3 and "sliding_attention" in (getattr(lm.config, "layer_types", None) or []):
            raise SystemExit(f"torch_train: the branch loop knows Llama-family models without sliding-window "
                             f"layers and Gemma 3, not this {lm.config.model_type}")
        if self.gemma3 and getattr(lm.config, "use_bidirectional_attention", False):
            raise SystemExit("torch_train: Gemma 3 with use_bidirectional_attention is not supported")
        layers = lm.model.layers
        if branch:
            self.branch = torch.nn.ModuleList(copy.deepcopy(layers[i]) for i in range(first, first + depth))
        else:
            self.branch = None

    def _run(self, layers, indices, h, per_layer, pos):
        # per_layer[i] = (mask, (cos, sin)) of decoder layer i; a branch copy of layer i gets layer i's.
        for layer, i in zip(layers, indices):
            mask, cos_sin = per_layer[i]
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
        return h

    def _masks_and_rope(self, h, pos, n_layers):
        """(mask, (cos, sin)) per decoder layer, computed as the model's own forward computes them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        m = self.lm.model
        kwargs = dict(config=m.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
        if not self.gemma3:
            # Same call as LlamaModel.forward: for sdpa without padding this is None (sdpa then uses is_causal);
            # for eager it is the additive 4-D causal mask. One rotary (cos, sin) for every layer.
            mask = create_causal_mask(**kwargs)
            cos_sin = m.rotary_emb(h, position_ids=pos)
            return [(mask, cos_sin)] * n_layers
        # Gemma3TextModel.forward: a causal mask for full-attention layers, a sliding-window causal mask for
        # sliding layers, and one (cos, sin) per layer type (each type has its own rope base).
        masks = {"full_attention": create_causal_mask(**kwargs),
                 "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
        types = m.config.layer_types
        rope = {t: m.rotary_emb(h, pos, t) for t in set(types)}
        return [(masks[types[i]], rope[types[i]]) for i in range(n_layers)]

    def forward(self, ids):
        m = self.lm.model
        n = m.config.num_hidden_layers
        layers = m.layers[:n]
        split = self.first if self.branch is not None else 0
        with torch.no_grad():  # nothing before layer `first` is trainable (split is 0 without a branch)
            h = m.embed_tokens(ids)  # Gemma 3: a scaled embedding (x sqrt(hidden_size)) in the module itself
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            per_layer = self._masks_and_rope(h, pos, n)
            h = self._run(layers[:split], range(split), h, per_layer, pos)
        if self.branch is not None:
            end = self.first + self.depth
            a = self._run(layers[self.first:end], range(self.first, end), h, per_layer, pos)
            b = self._run(self.branch, range(self.first, end), h, per_layer, pos)
            h = self.mix * a + (1.0 - self.mix) * b
            h = self._run(layers[end:], range(end, n), h, per_layer, pos)
        else:
            h = self._run(layers, range(n), h, per_layer, pos)
        logits = self.lm.lm_head(m.norm(h))
        cap = getattr(m.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma3ForCausalLM.forward (None for Gemma 3 270M)
            logits = torch.tanh(logits / cap) * cap
        return logits


def next_token_loss(logits, ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def self_check(args):
    model = load_model(args)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    shapes = [(args.batch, args.seq)]
    window = getattr(model.config, "sliding_window", None)
    if model.config.model_type == GEMMA3 and window:
        shapes.append((1, window + 64))  # long enough for the sliding-window mask to cut
    checks, ok = [], True
    for batch, seq in shapes:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            loop = DecoderLoop(model, branch=False)(ids)
            branched = DecoderLoop(model, branch=True)(ids)
        d_loop = (loop - ref).abs().max().item()
        d_branch = (branched - ref).abs().max().item()
        ok = ok and d_loop <= SELF_CHECK_TOL and d_branch <= SELF_CHECK_TOL
        checks.append({"batch": batch, "seq": seq, "max_abs_diff_loop": d_loop,
                       "max_abs_diff_branch_at_init": d_branch, "max_abs_logit": ref.abs().max().item()})
        log(f"self-check {batch} x {seq}: loop {d_loop:.3g}, branch at init {d_branch:.3g}")
    print(json.dumps({
        "self_check": "ok" if ok else "FAILED", "model_type": model.config.model_type,
        "attn": model.config._attn_implementation, "sliding_window": window if model.config.model_type == GEMMA3
        else None, "tolerance": SELF_CHECK_TOL, **checks[0], "checks": checks[1:],
        "torch_version": torch.__version__,
    }), flush=True)
    return 0 if ok else 1


def build(args, model):
    """Returns (forward(ids) -> logits, trainable parameter list, module put in train mode)."""
    if args.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        return (lambda ids: model(input_ids=ids, use_cache=False).logits), [p for p in model.parameters()], model
    if args.mode == "lora":
        peft = require_peft()
        # peft 0.21 calls a transformers API that 5.24 deprecates; harmless, and noisy on stderr.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                              task_type="CAUSAL_LM")
        pm = peft.get_peft_model(model, cfg)  # freezes the base, adds trainable lora_A / lora_B
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        return (lambda ids: pm(input_ids=ids, use_cache=False).logits), params, pm
    if args.mode == "branch":
        for p in model.parameters():
            p.requires_grad_(False)
        net = DecoderLoop(model, branch=True)
        for p in net.branch.parameters():
            p.requires_grad_(True)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        return net, params, net
    raise ValueError(args.mode)


def train(args):
    model = load_model(args)
    torch.manual_seed(0)  # LoRA's lora_A init
    fwd, params, _ = build(args, model)
    # model.parameters() already yields a tied parameter once; dedupe anyway by identity.
    uniq = list({id(p): p for p in params}.values())
    n_trainable = sum(p.numel() for p in uniq)
    log(f"mode {args.mode}: {n_trainable:,} trainable parameters in {len(uniq)} tensors; "
        f"{args.threads} threads, batch {args.batch} x seq {args.seq}, {args.steps} steps ({args.warmup} warm-up)")
    opt = torch.optim.AdamW(uniq, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    walls, cpus, losses = [], [], []
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        w0, c0 = time.perf_counter(), time.process_time()
        logits = fwd(ids)
        loss = next_token_loss(logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(uniq, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        losses.append(loss.item())
        del logits, loss
        tag = "warm-up" if step < args.warmup else "timed"
        log(f"step {step + 1}/{args.steps} ({tag}): loss {losses[-1]:.4f}, {wall:.2f} s wall, {cpu:.2f} s CPU, "
            f"{args.batch * args.seq / wall:.1f} tok/s")
        if step >= args.warmup:
            walls.append(wall)
            cpus.append(cpu)

    tokens = args.batch * args.seq
    sec = statistics.median(walls)
    print(json.dumps({
        "peer": "pytorch", "mode": args.mode, "threads": args.threads, "tokens_per_step": tokens,
        "tokens_per_sec": round(tokens / sec, 2), "sec_per_step": round(sec, 4),
        "cpu_sec_per_step": round(statistics.median(cpus), 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_params": n_trainable, "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
        "torch_version": torch.__version__, "steps": args.steps, "warmup": args.warmup, "timed_steps": len(walls),
        "seq": args.seq, "batch": args.batch, "attn": model.config._attn_implementation,
        "model_type": model.config.model_type, "gguf": os.path.basename(args.gguf),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["full", "lora", "branch"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="total optimizer steps, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="transformers attention implementation")
    ap.add_argument("--gguf", default=default_gguf(),
                    help="the backbone's GGUF (default: SmolLM2-135M's Q4_1, scripts/fetch_backbone.sh's path)")
    ap.add_argument("--f32-dir", help="where the float32 HF copy is kept (default: $MODE_HOME/peer/NAME-f32)")
    ap.add_argument("--self-check", action="store_true", help="check the hand-written decoder loop and exit")
    ap.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.f32_dir is None:
        args.f32_dir = default_f32_dir(args.gguf)

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    if args.convert_only:
        convert_gguf_to_f32(args.gguf, args.f32_dir)
        return 0
    if args.self_check:
        return self_check(args)
    if args.mode is None:
        ap.error("--mode is required (or --self-check)")
    if args.steps <= args.warmup or args.warmup < 0:
        ap.error("need --steps > --warmup >= 0")
    if args.mode == "lora":
        require_peft()  # fail before the model load
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
