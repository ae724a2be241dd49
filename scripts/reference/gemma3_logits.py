#!/usr/bin/env python3
"""Reference logits, greedy text and tokenization fixtures for Gemma 3 270M, from Hugging Face transformers.

Run with the reference venv (scripts/reference/setup_venv.sh):

    scripts/reference/.venv/bin/python scripts/reference/gemma3_logits.py \
        --gguf ~/.cache/mode/backbones/gemma3-270m/gemma-3-270m-q4_k_m.gguf \
        --out tests/fixtures/gemma3_logits.safetensors \
        --tokenization-out tests/fixtures/gemma3_tokenization.json

transformers loads the GGUF (Q4_K / Q6_K tensors dequantized to float32; about 6 minutes on 2 cores) and
the tokenizer is Google's SentencePiece library on the GGUF's pieces (see gguf_tokenizer.py for why not
transformers'); implementations independent of the Rust one. Every prompt
starts with the BOS the tokenizer adds (`tokenizer.ggml.add_bos_token`). Writes:

* the logits safetensors file, per prompt i:
    p{i}.input_ids       I64 [T]        BOS + the prompt's tokens
    p{i}.logits_strided  F32 [T, 4096]  logits of vocab ids 0, 64, 128, ... at every position
    p{i}.logsumexp       F32 [T]        log-sum-exp over the full vocabulary at every position
    p{i}.argmax          I64 [T]        argmax over the full vocabulary at every position
  metadata (all strings): prompts (JSON list), greedy_prompt, greedy_ids (JSON list: BOS + prompt +
  greedy continuation of --max-new-tokens), greedy_text (the continuation), versions, gguf_sha256.
* the tokenization JSON: a list of {"text": ..., "ids": [...]} without BOS/EOS; every entry is checked
  to decode back to its text.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_tokenizer import gguf_tokenizer  # noqa: E402
from hf_logits import TOKENIZATION_TEXTS, sha256_file  # noqa: E402

GREEDY_PROMPT = "The capital of France is"
PROMPTS = [
    GREEDY_PROMPT,
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "def add(a, b):\n    return a + b\n",
    "Tokyo 東京 had 2024 fans 🎉!",
]
# Cases a SentencePiece-style tokenizer gets wrong first: runs of spaces and newlines (Gemma has
# pieces for them), pieces that only byte fallback can spell, the turn markers as plain text.
GEMMA_TEXTS = [
    "a  12 and \n\n  0. then     five spaces",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<h1>Title</h1>\n<table><tr><td>x</td></tr></table>",
    "control \x07 bell, \x00 nul, and a rare glyph \U0001f9ff plus 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    " leading space, trailing newline\n",
    "tabs\tand\t\tmore\ttabs",
    "\n" + " " * 32 + "k.encode('utf-8'),\n" + " " * 40 + "x = 1" + " " * 17 + "# a comment",
]
STRIDE = 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="path of gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--out", default="tests/fixtures/gemma3_logits.safetensors")
    ap.add_argument("--tokenization-out", default="tests/fixtures/gemma3_tokenization.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    gguf_path = os.path.abspath(args.gguf)
    gdir, gname = os.path.split(gguf_path)
    tokenizer, bos = gguf_tokenizer(gguf_path)
    assert bos is not None, "Gemma's GGUF should ask for a BOS"

    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    entries = []
    for text in TOKENIZATION_TEXTS + GEMMA_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = converted(text, add_special_tokens=False)["input_ids"]
        if theirs != ids:
            log(f"NOTE: transformers' GGUF tokenizer differs from SentencePiece on {text!r}:\n"
                f"  transformers  {theirs}\n  sentencepiece {ids}")
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert back == text, f"{text!r} decodes back as {back!r}"
        entries.append({"text": text, "ids": ids})
    with open(args.tokenization_out, "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log(f"wrote {args.tokenization_out} ({len(entries)} texts)")

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()
    log(f"loaded in {time.time() - t0:.0f} s")

    tensors = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = [bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids=x).logits[0].float()  # [T, V]
            tensors[f"p{i}.input_ids"] = x[0].clone()
            tensors[f"p{i}.logits_strided"] = logits[:, ::STRIDE].contiguous()
            tensors[f"p{i}.logsumexp"] = torch.logsumexp(logits, dim=-1).contiguous()
            tensors[f"p{i}.argmax"] = logits.argmax(dim=-1).contiguous()
        ids = [bos] + tokenizer(GREEDY_PROMPT, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)[0]
    greedy_text = tokenizer.decode(out[len(ids):])
    log(f"greedy: {GREEDY_PROMPT!r} -> {greedy_text!r}")

    metadata = {
        "prompts": json.dumps(PROMPTS, ensure_ascii=False),
        "greedy_prompt": GREEDY_PROMPT,
        "greedy_ids": json.dumps(out.tolist()),
        "greedy_text": greedy_text,
        "stride": str(STRIDE),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_file": gname,
        "gguf_sha256": sha256_file(gguf_path),
        "dtype": "float32",
    }
    save_file(tensors, args.out, metadata=metadata)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
