#!/usr/bin/env python3
"""Peer benchmark: greedy decoding speed of Hugging Face `generate` (PyTorch eager, CPU, float32).

    scripts/reference/.venv/bin/python bench/peer/hf_generate.py \
        --gguf PATH.gguf --threads 2 --max-new-tokens 64 --runs 5 [--prompt-tokens N] [--prompt auto|chat|text]

The prompt (--prompt auto, the default, picks by whether the GGUF has `tokenizer.chat_template`):
  chat  the ChatML chat prompt ("What is the capital of France?"; 37 tokens with SmolLM2's tokenizer), as is;
        with --prompt-tokens N the script stops unless the prompt is N tokens long.
  text  for a model without a chat template (the Gemma 3 270M base GGUF): exactly --prompt-tokens tokens
        (default 37), the tokenizer's BOS first when the GGUF says `tokenizer.ggml.add_bos_token` (Gemma: yes),
        then the opening of Moby-Dick (the text `mode bench infer` uses, crates/infer/src/bench.rs), repeated
        as needed and cut to length. `mode bench infer --prompt-tokens N` feeds the same: BOS + text, N tokens.
After one warm-up run, reports the median over --runs of
  prefill_tokens_per_sec = prompt tokens / wall time of one forward pass over the prompt (use_cache=True)
  decode_tokens_per_sec  = tokens generated after the first one / wall time between the first and the last
                           generated token inside `generate` (so the prefill is excluded)
generate runs greedily with min_new_tokens = max_new_tokens, so it never stops early. OMP_WAIT_POLICY=PASSIVE
is set before torch is imported (OpenMP spinning makes shared 2-core machines much slower), and the thread
count is pinned with torch.set_num_threads. Prints one JSON line. bench/infer.sh runs it with --runs 1 once per
round, alternating with `mode bench infer`.
"""

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# The opening of Moby-Dick, as in crates/infer/src/bench.rs (TEXT): keep the two the same.
TEXT = (
    "Call me Ishmael. Some years ago\u2014never mind how long precisely\u2014having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see "
    "the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. "
    "Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; "
    "whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every "
    "funeral I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong "
    "moral principle to prevent me from deliberately stepping into the street, and methodically knocking "
    "people's hats off\u2014then, I account it high time to get to sea as soon as I can. "
)
DEFAULT_TEXT_PROMPT_TOKENS = 37


def gguf_fields(path):
    """(has a chat template, BOS id to put first or None) from the GGUF's metadata."""
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    bos = field("tokenizer.ggml.bos_token_id") if field("tokenizer.ggml.add_bos_token") else None
    return bool(field("tokenizer.chat_template")), None if bos is None else int(bos)


def prompt_ids(tokenizer, kind, n_tokens, bos):
    """The prompt as a [1, T] tensor (see the module docstring)."""
    if kind == "chat":
        ids = tokenizer(CHAT_PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if n_tokens is not None and ids.shape[1] != n_tokens:
            raise SystemExit(f"hf_generate: the chat prompt is {ids.shape[1]} tokens, not --prompt-tokens "
                             f"{n_tokens}; pass --prompt-tokens {ids.shape[1]} (or --prompt text)")
        return ids
    n = DEFAULT_TEXT_PROMPT_TOKENS if n_tokens is None else n_tokens
    once = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids = [] if bos is None else [bos]
    while len(ids) < n:
        ids.extend(once)
    return torch.tensor([ids[:n]], dtype=torch.long)


class StepClock(LogitsProcessor):
    """Records wall and CPU time each time generate has new logits (once per generated token)."""

    def __init__(self):
        self.wall = []
        self.cpu = []

    def __call__(self, input_ids, scores):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return scores


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", choices=["auto", "chat", "text"], default="auto",
                    help="chat prompt or plain text (auto: chat when the GGUF has a chat template)")
    ap.add_argument("--prompt-tokens", type=int,
                    help=f"prompt length (text: default {DEFAULT_TEXT_PROMPT_TOKENS}; chat: checked)")
    args = ap.parse_args()
    if args.max_new_tokens < 2:
        raise SystemExit("--max-new-tokens must be >= 2")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise SystemExit("--prompt-tokens must be >= 1")

    torch.set_num_threads(args.threads)
    gguf_path = os.path.abspath(args.gguf)
    gdir, gname = os.path.split(gguf_path)
    has_template, bos = gguf_fields(gguf_path)
    kind = args.prompt if args.prompt != "auto" else ("chat" if has_template else "text")
    tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    ids = prompt_ids(tokenizer, kind, args.prompt_tokens, bos)  # before the model load: fails fast
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()

    n_prompt = ids.shape[1]
    n_new = args.max_new_tokens

    prefill, decode, decode_cpu = [], [], []
    text = None
    with torch.no_grad():
        for run in range(args.runs + 1):  # run 0 is the warm-up
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            t_prefill = time.perf_counter() - t0

            clock = StepClock()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([clock]),
            )
            generated = out.shape[1] - n_prompt
            assert generated == n_new, (generated, n_new)
            assert len(clock.wall) == n_new, len(clock.wall)
            dt = clock.wall[-1] - clock.wall[0]  # covers the n_new - 1 decode steps
            dcpu = clock.cpu[-1] - clock.cpu[0]
            if run == 0:
                text = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=False)
                continue
            prefill.append(n_prompt / t_prefill)
            decode.append((n_new - 1) / dt)
            decode_cpu.append(dcpu / (n_new - 1))
            print(f"run {run}: prefill {prefill[-1]:.1f} tok/s, decode {decode[-1]:.2f} tok/s, "
                  f"{decode_cpu[-1]:.3f} CPU-s/token", file=sys.stderr, flush=True)

    print(f"generated: {text!r}", file=sys.stderr)
    print(json.dumps({
        "peer": "hf_transformers",
        "gguf": gname,
        "prefill_tokens_per_sec": round(statistics.median(prefill), 2),
        "decode_tokens_per_sec": round(statistics.median(decode), 2),
        "threads": args.threads,
        "decode_cpu_seconds_per_token": round(statistics.median(decode_cpu), 4),
        "prompt": kind,
        "bos": bos if kind == "text" else None,
        "prompt_tokens": n_prompt,
        "new_tokens": n_new,
        "runs": args.runs,
        "dtype": "float32",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
