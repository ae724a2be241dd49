"""The reference tokenizer of a GGUF backbone: transformers' GGUF converter, corrected where it is
known to differ from the tokenizer the model was trained with.

SmolLM2: the converter builds a plain ByteLevel pre-tokenizer and drops the
`Digits(individual_digits=True)` step that the original `tokenizer.json` has (and that llama.cpp
applies for `tokenizer.ggml.pre = smollm`). The two differ only where a run of whitespace precedes
a digit ("\\n        2-tuples": the converter splits off one space as its own token). The
reference scripts restore the original pipeline so that both sides score the same token ids and
the comparison is about the model.

Gemma (a SentencePiece GGUF, `tokenizer.ggml.model = llama`): the converter splits runs of more
than 16 spaces unlike SentencePiece (32 spaces then `k` give 16 + 16 + `k` instead of 31 + `▁k`;
`requests/models.py` comes out 8797 tokens instead of 8795). The reference tokenizes with Google's
SentencePiece library on the GGUF's own pieces instead (`spm_from_gguf.py`).
"""

import os

from tokenizers import pre_tokenizers


def use_original_pretokenizer(tokenizer):
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tokenizer


def gguf_tokenizer(gguf_path):
    """(tokenizer, bos): transformers' tokenizer of the GGUF, with SmolLM2's pre-tokenizer restored
    when `tokenizer.ggml.pre` is `smollm`, or SentencePiece's for a SentencePiece GGUF; `bos` is the id fed before every sequence when the file
    says `tokenizer.ggml.add_bos_token`, else None."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(gguf_path)

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    gdir, gname = os.path.split(os.path.abspath(gguf_path))
    if field("tokenizer.ggml.model") == "llama":
        from spm_from_gguf import SentencePieceTokenizer

        tokenizer = SentencePieceTokenizer(gguf_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    if field("tokenizer.ggml.pre") == "smollm":
        tokenizer = use_original_pretokenizer(tokenizer)
    bos = field("tokenizer.ggml.bos_token_id") if field("tokenizer.ggml.add_bos_token") else None
    return tokenizer, None if bos is None else int(bos)
