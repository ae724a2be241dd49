"""The SmolLM2 pre-tokenizer, as the model was trained with it.

transformers' GGUF converter builds SmolLM2's tokenizer with a plain ByteLevel pre-tokenizer and
drops the `Digits(individual_digits=True)` step that the original `tokenizer.json` has (and that
llama.cpp applies for `tokenizer.ggml.pre = smollm`). The two differ only where a run of
whitespace precedes a digit ("\\n        2-tuples": the converter splits off one space as its own
token). The reference scripts restore the original pipeline so that both sides score the same
token ids and the comparison is about the model.
"""

from tokenizers import pre_tokenizers


def use_original_pretokenizer(tokenizer):
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tokenizer
