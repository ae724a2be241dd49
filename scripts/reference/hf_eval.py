#!/usr/bin/env python3
"""Next-token evaluation of a GGUF backbone with Hugging Face transformers (the reference protocol).

    scripts/reference/.venv/bin/python scripts/reference/hf_eval.py \
        --gguf PATH.gguf --data english.txt --data code.py --seq-len 512 --json [--out FILE]

Protocol (the Rust evaluator implements the same one):
  1. Read each file as UTF-8 text; for `.jsonl`, the "text" field of every line, joined with "\\n".
  2. Tokenize the whole text at once, no BOS/EOS added.
  3. Cut the tokens into consecutive non-overlapping windows of --seq-len tokens; a last shorter window is kept
     if it has >= 2 tokens.
  4. In each window, position t predicts token t+1: a window of n tokens gives n-1 predictions. A model whose
     tokenizer adds a BOS (`tokenizer.ggml.add_bos_token`, e.g. Gemma) gets its BOS fed before every window;
     the BOS's own prediction is not scored, so the scored predictions are the same either way.
  5. Per file: next_token_accuracy = fraction of predictions whose argmax (over the full vocabulary) equals the
     next token; loss = mean cross-entropy in nats over all predictions; perplexity = exp(loss);
     tokens = number of tokens in the file; predictions = number of predictions.
float32, no_grad, windows batched (--batch windows per forward). With --json one JSON object keyed by each
file's base name is printed; --out also writes it (with a "_meta" key) to a file.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_tokenizer import gguf_tokenizer  # noqa: E402


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            texts = []
            for line in f:
                line = line.strip()
                if line:
                    texts.append(json.loads(line)["text"])
            return "\n".join(texts)
        return f.read()


def windows(ids, seq_len):
    out = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w for w in out if len(w) >= 2]


def evaluate(model, ids, seq_len, batch, bos):
    wins = windows(ids, seq_len)
    total_nll = 0.0  # float64 accumulation
    correct = 0
    preds = 0
    # Batch windows of equal length together (only the last window can be shorter).
    full = [w for w in wins if len(w) == seq_len]
    rest = [w for w in wins if len(w) != seq_len]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in rest]
    for group in groups:
        x = torch.tensor(group, dtype=torch.long)  # [B, n]
        if bos is None:
            logits = model(input_ids=x).logits.float()  # [B, n, V]
        else:
            with_bos = torch.cat([torch.full((x.shape[0], 1), bos, dtype=torch.long), x], dim=1)
            logits = model(input_ids=with_bos).logits.float()[:, 1:, :]  # [B, n, V], BOS's own dropped
        pred_logits = logits[:, :-1, :]
        target = x[:, 1:]
        nll = F.cross_entropy(pred_logits.reshape(-1, pred_logits.shape[-1]), target.reshape(-1), reduction="none")
        total_nll += nll.double().sum().item()
        correct += int((pred_logits.argmax(dim=-1) == target).sum())
        preds += target.numel()
    loss = total_nll / preds if preds else float("nan")
    return {
        "next_token_accuracy": correct / preds if preds else float("nan"),
        "loss": loss,
        "perplexity": math.exp(loss) if preds else float("nan"),
        "tokens": len(ids),
        "predictions": preds,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", action="append", required=True, help="text or .jsonl file (repeatable)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--out", default=None, help="also write the results plus a _meta key to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gguf_path = os.path.abspath(args.gguf)
    gdir, gname = os.path.split(gguf_path)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    tokenizer, bos = gguf_tokenizer(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()

    results = {}
    meta = {
        "seq_len": args.seq_len,
        "protocol": "whole file tokenized without BOS/EOS; non-overlapping windows of seq_len, last shorter "
                    "window kept if >= 2 tokens; the tokenizer's BOS (if it adds one) fed before every window and "
                    "not scored; position t predicts t+1; argmax accuracy; mean CE in nats",
        "bos": bos,
        "gguf_file": gname,
        "gguf_sha256": sha256_file(gguf_path),
        "data_sha256": {},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "threads": args.threads,
    }
    with torch.no_grad():
        for path in args.data:
            name = os.path.basename(path)
            if name in results:
                raise SystemExit(f"duplicate base name {name}")
            text = read_text(path)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            t0 = time.time()
            r = evaluate(model, ids, args.seq_len, args.batch, bos)
            dt = time.time() - t0
            results[name] = r
            meta["data_sha256"][name] = sha256_file(path)
            log(f"{name}: {r} ({dt:.1f} s, {r['tokens'] / dt:.0f} tok/s)")

    if args.json:
        print(json.dumps(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"_meta": meta, **results}, f, indent=2)
            f.write("\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
