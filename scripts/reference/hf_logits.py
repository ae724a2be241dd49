#!/usr/bin/env python3
"""Reference logits and tokenization fixtures for the default backbone, from Hugging Face transformers.

Run with the reference venv (scripts/reference/setup_venv.sh):

    scripts/reference/.venv/bin/python scripts/reference/hf_logits.py \
        --gguf "$(scripts/fetch_backbone.sh)" \
        --out tests/fixtures/smollm2_logits.safetensors \
        [--tokenization-out tests/fixtures/smollm2_tokenization.json]

transformers loads the GGUF (Q4_1 / Q8_0 tensors dequantized to float32) and its tokenizer; this is an
implementation independent of the Rust one. Writes:

* the logits safetensors file, per prompt i in 0..3:
    p{i}.input_ids    I64 [T]       tokens (no BOS/EOS added)
    p{i}.logits_head  F32 [T, 4096] logits of vocab ids 0..4095 at every position
    p{i}.logits_last  F32 [49152]   all logits at the last position
    p{i}.argmax       I64 [T]       argmax over the full vocabulary at every position
  metadata (all strings): prompts (JSON list), chat_template_output, chat_greedy_ids (JSON list),
  chat_greedy_text, transformers_version, torch_version, gguf_sha256, gguf_file, dtype, layout.
* the tokenization JSON: a list of {"text": ..., "ids": [...]}, add_special_tokens=False; every entry is
  checked to decode back to its text, and to match a tokenizer rebuilt directly from the GGUF metadata.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_tokenizer import use_original_pretokenizer  # noqa: E402

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
EXPECTED_CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

ENGLISH_PROMPT = "The quick brown fox jumps over the lazy dog near the riverbank."
PYTHON_PROMPT = "def add(a, b):\n    return a + b\n"
MIXED_PROMPT = "Tokyo 東京 had 2024 fans 🎉!"

TOKENIZATION_TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'x': [1, 2, 3]}\n",
    "The population was 1234567 in 2024, i.e. 1,234,567.89 or 3.14159e-10.",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧 and a flag 🇫🇷.",
    "中文文本：东京和北京。日本語のテキスト。한국어 텍스트.",
    "   leading and trailing spaces   ",
    "first line\n\n\nafter three newlines\r\nwindows line\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Inline special tokens: <|im_end|> and <|endoftext|> inside text.",
    "Mixed: café naïve Ærøskøbing — “quotes” ‘single’ … ñ ß",
    "x = 42  # comment\nprint(f\"{x:>10}\")\n\t\n    \n",
    "a dict or a list of\n        2-tuples, and    42 spaces before digits",
]

VOCAB_HEAD = 4096


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rebuilt_tokenizer(gguf_path):
    """A tokenizer built straight from the GGUF metadata, without transformers' GGUF converter:
    BPE(vocab, merges) + Sequence[Digits(individual), ByteLevel(no prefix space)] + token_type==3 specials."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ", 1)) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    )
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="tests/fixtures/smollm2_logits.safetensors")
    ap.add_argument("--tokenization-out", default=None,
                    help="default: smollm2_tokenization.json next to --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf_path = os.path.abspath(args.gguf)
    gdir, gname = os.path.split(gguf_path)
    tok_out = args.tokenization_out or os.path.join(os.path.dirname(args.out), "smollm2_tokenization.json")
    gguf_sha = sha256_file(gguf_path)
    print(f"gguf: {gguf_path} sha256={gguf_sha}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}")

    tokenizer = use_original_pretokenizer(AutoTokenizer.from_pretrained(gdir, gguf_file=gname))

    # ---- chat prompt from the GGUF's chat template -------------------------------------------------
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    print("chat template output:", json.dumps(chat_prompt))
    if chat_prompt != EXPECTED_CHAT_PROMPT:
        print("NOTE: chat template output differs from the expected ChatML string; using the template's.")
    else:
        print("chat template output == expected ChatML string")

    prompts = [ENGLISH_PROMPT, PYTHON_PROMPT, chat_prompt, MIXED_PROMPT]

    # ---- tokenization fixture -------------------------------------------------------------------------
    rebuilt = rebuilt_tokenizer(gguf_path)
    entries = []
    mismatches = 0
    for text in TOKENIZATION_TEXTS + prompts:
        if any(e["text"] == text for e in entries):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            print(f"ROUND TRIP FAILED: {text!r} -> {ids} -> {back!r}", file=sys.stderr)
            sys.exit(1)
        rb = rebuilt.encode(text, add_special_tokens=False).ids
        if rb != ids:
            mismatches += 1
            print(f"NOTE: HF and rebuilt GGUF tokenizer differ on {text!r}:\n  hf      {ids}\n  rebuilt {rb}")
        entries.append({"text": text, "ids": ids})
    os.makedirs(os.path.dirname(os.path.abspath(tok_out)), exist_ok=True)
    with open(tok_out, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(" " + json.dumps(e, ensure_ascii=False) for e in entries) + "\n]\n")
    print(f"wrote {tok_out}: {len(entries)} texts, all round-trip; "
          f"{mismatches} differ from the rebuilt GGUF tokenizer")

    # ---- model ----------------------------------------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size

    tensors = {}
    with torch.no_grad():
        for i, text in enumerate(prompts):
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0].float()  # [T, V]
            assert logits.shape == (ids.shape[1], vocab), logits.shape
            tensors[f"p{i}.input_ids"] = ids[0].to(torch.int64).contiguous()
            tensors[f"p{i}.logits_head"] = logits[:, :VOCAB_HEAD].contiguous()
            tensors[f"p{i}.logits_last"] = logits[-1].contiguous()
            tensors[f"p{i}.argmax"] = logits.argmax(dim=-1).to(torch.int64).contiguous()
            top = tokenizer.decode([int(logits[-1].argmax())])
            print(f"p{i}: T={ids.shape[1]} last argmax={int(logits[-1].argmax())} {top!r}")

        chat_ids = tokenizer(chat_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(
            input_ids=chat_ids,
            attention_mask=torch.ones_like(chat_ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        gen_ids = out[0, chat_ids.shape[1]:].tolist()
    answer = tokenizer.decode(gen_ids, skip_special_tokens=False)
    print("greedy answer:", json.dumps(answer), gen_ids)
    if "Paris" not in answer:
        print("WARNING: the greedy answer does not mention Paris", file=sys.stderr)

    metadata = {
        "format": "mode reference logits v1",
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "chat_template_output": chat_prompt,
        "chat_greedy_ids": json.dumps(gen_ids),
        "chat_greedy_text": answer,
        "chat_greedy_max_new_tokens": str(args.max_new_tokens),
        "layout": f"p{{i}}.input_ids I64[T]; p{{i}}.logits_head F32[T,{VOCAB_HEAD}] (vocab ids 0..{VOCAB_HEAD - 1}); "
                  f"p{{i}}.logits_last F32[{vocab}]; p{{i}}.argmax I64[T]; no BOS/EOS added",
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_file": gname,
        "gguf_sha256": gguf_sha,
        "generator": "scripts/reference/hf_logits.py",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    os.chmod(args.out, 0o644)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
