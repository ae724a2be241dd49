#!/usr/bin/env python3
"""Cross-checks the transformers reference against llama.cpp on the same GGUF: tokenization of the
fixture texts, greedy continuation, and the evaluation protocol of hf_eval.py on text files.

A reference that is wrong in the same way as `mode` proves nothing; llama.cpp is a third
implementation (its own GGUF loader, tokenizer and kernels). It computes with the quantized weights
directly (Q4_K/Q6_K dot products against activations quantized to 8 bits), so its logits differ from
a float32 run on the dequantized weights by more than rounding: expect the losses to agree to a few
hundredths of a nat, not to 1e-4.

Needs llama-cpp-python, which PyPI has only as a source package (compiled on install, ~15 minutes
on 2 cores); keep it out of the reference venv:

    python3 -m venv /tmp/lcpv && /tmp/lcpv/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/lcpv/bin/python scripts/reference/llamacpp_check.py --gguf GEMMA.gguf \
        --tokenization tests/fixtures/gemma3_tokenization.json \
        --eval-reference tests/fixtures/gemma3_eval_samples.json \
        --data SAMPLES/english.txt --data SAMPLES/code.py --seq-len 512

Prints one line per check and a JSON summary; exits non-zero when tokenization differs.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from llama_cpp import Llama


def read_text(path):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return "\n".join(json.loads(line)["text"] for line in f if line.strip())
        return f.read()


def log_softmax_rows(logits):
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def evaluate(llm, ids, seq_len, bos):
    """hf_eval.py's protocol: windows of seq_len, BOS before each (not scored), t predicts t+1."""
    wins = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    wins = [w for w in wins if len(w) >= 2]
    nll, correct, preds = 0.0, 0, 0
    for w in wins:
        fed = ([bos] if bos is not None else []) + w
        llm.reset()
        llm.eval(fed)
        logits = np.asarray(llm.scores[: len(fed)], dtype=np.float64)
        if bos is not None:
            logits = logits[1:]
        lp = log_softmax_rows(logits[:-1])
        target = np.asarray(w[1:])
        nll -= lp[np.arange(len(target)), target].sum()
        correct += int((logits[:-1].argmax(axis=-1) == target).sum())
        preds += len(target)
    return {"next_token_accuracy": correct / preds, "loss": nll / preds, "tokens": len(ids),
            "predictions": preds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokenization", help="fixture JSON of {text, ids} (no BOS)")
    ap.add_argument("--eval-reference", help="hf_eval.py output to compare the evaluation with")
    ap.add_argument("--data", action="append", default=[])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    llm = Llama(model_path=args.gguf, n_ctx=args.seq_len + 8, n_batch=args.seq_len + 8,
                n_threads=args.threads, logits_all=True, verbose=False)
    bos = llm.token_bos() if llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" else None
    summary = {"bos": bos, "gguf": os.path.basename(args.gguf)}
    failed = False

    if args.tokenization:
        with open(args.tokenization, encoding="utf-8") as f:
            cases = json.load(f)
        differ = []
        for case in cases:
            ids = llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=True)
            if ids != case["ids"]:
                differ.append(case["text"])
                print(f"tokenization differs on {case['text']!r}:\n  llama.cpp {ids}\n  fixture   {case['ids']}")
        print(f"tokenization: {len(cases) - len(differ)} of {len(cases)} texts give the fixture's ids")
        summary["tokenization_differs"] = differ
        failed |= bool(differ)

    prompt = ([bos] if bos is not None else []) + llm.tokenize(args.prompt.encode(), add_bos=False)
    llm.reset()
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) == args.max_new_tokens:
            break
    text = llm.detokenize(out).decode("utf-8", "replace")
    print(f"greedy: {args.prompt!r} -> {text!r}")
    summary["greedy_ids"] = prompt + out
    summary["greedy_text"] = text

    reference = {}
    if args.eval_reference:
        with open(args.eval_reference, encoding="utf-8") as f:
            reference = json.load(f)
    summary["eval"] = {}
    for path in args.data:
        name = os.path.basename(path)
        ids = llm.tokenize(read_text(path).encode("utf-8"), add_bos=False)
        t0 = time.time()
        r = evaluate(llm, ids, args.seq_len, bos)
        line = (f"{name}: {r['tokens']} tokens, accuracy {100 * r['next_token_accuracy']:.2f}%, "
                f"loss {r['loss']:.4f} ({time.time() - t0:.0f} s)")
        if name in reference:
            ref = reference[name]
            line += (f"; transformers: {ref['tokens']} tokens, accuracy "
                     f"{100 * ref['next_token_accuracy']:.2f}%, loss {ref['loss']:.4f}; difference "
                     f"{100 * (r['next_token_accuracy'] - ref['next_token_accuracy']):+.2f} points, "
                     f"{r['loss'] - ref['loss']:+.4f} nats")
        print(line)
        summary["eval"][name] = r
    print(json.dumps(summary))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
