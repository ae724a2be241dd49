#!/usr/bin/env python3
"""Tokenization by Google's SentencePiece library itself, from a GGUF's SentencePiece metadata.

The GGUF of a SentencePiece model (`tokenizer.ggml.model = llama`: Gemma, Llama 2) keeps its pieces,
scores and piece types. This script puts them back into a SentencePiece ModelProto (BPE, byte
fallback, whitespace escaped to U+2581, no dummy prefix unless `tokenizer.ggml.add_space_prefix`, no
whitespace folding) and tokenizes with the library the model was trained with: a reference for the
tokenizer that owes nothing to transformers' GGUF converter or to llama.cpp.

Needs only `pip install sentencepiece protobuf gguf numpy` (wheels; keep it out of the reference venv
or inside it, either works):

    python scripts/reference/spm_from_gguf.py --gguf GEMMA.gguf --check tests/fixtures/gemma3_tokenization.json \
        [--text-file FILE ...]

--check compares the fixture's ids with SentencePiece's and lists the texts where they differ;
--text-file prints the token count of each file and, with --ids-out, writes the ids as JSON.
"""

import argparse
import json
import re
import sys

import gguf
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as pb

# GGUF token types (llama.cpp's llama_token_type) to SentencePiece piece types.
TYPES = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
         3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
         5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}


def processor(gguf_path):
    reader = gguf.GGUFReader(gguf_path)

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    assert field("tokenizer.ggml.model") == "llama", "not a SentencePiece GGUF"
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = int(field("tokenizer.ggml.unknown_token_id", 0))
    m.trainer_spec.bos_id = int(field("tokenizer.ggml.bos_token_id", -1))
    m.trainer_spec.eos_id = int(field("tokenizer.ggml.eos_token_id", -1))
    m.trainer_spec.pad_id = int(field("tokenizer.ggml.padding_token_id", -1))
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix", False))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    tokens = field("tokenizer.ggml.tokens")
    scores = field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    for piece, score, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        if TYPES[int(ty)] == pb.ModelProto.SentencePiece.USER_DEFINED:
            # llama.cpp's converter stores user-defined pieces with U+2581 turned back into spaces
            # (it matches them on raw text); SentencePiece matches them on escaped text.
            piece = piece.replace(" ", "\u2581")
        p.piece, p.score, p.type = piece, float(score), TYPES[int(ty)]
    sp = SentencePieceProcessor()
    sp.LoadFromSerializedProto(m.SerializeToString())
    return sp


class SentencePieceTokenizer:
    """The SentencePiece processor of a GGUF with the call shape of a transformers tokenizer
    (`tok(text, add_special_tokens=False)["input_ids"]`, `tok.decode(ids)`). Control pieces written
    in the text (`<start_of_turn>`) become their ids, as transformers and mode read them; the text
    between them goes through SentencePiece."""

    def __init__(self, gguf_path):
        self.sp = processor(gguf_path)
        pieces = sp_proto(self.sp).pieces
        self.control = {p.piece: i for i, p in enumerate(pieces)
                        if p.type == pb.ModelProto.SentencePiece.CONTROL and p.piece}
        names = sorted(self.control, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def __call__(self, text, add_special_tokens=False):
        assert not add_special_tokens, "BOS is added by the caller"
        ids = []
        for part in self.split.split(text):
            if part in self.control:
                ids.append(self.control[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return {"input_ids": ids}

    def decode(self, ids, **_):
        by_id = {i: p for p, i in self.control.items()}
        out, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in by_id:
                out.append(self.sp.decode(run))
                run = []
                if i is not None:
                    out.append(by_id[i])
            else:
                run.append(int(i))
        return "".join(out)


def sp_proto(sp):
    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--check", help="fixture JSON of {text, ids} to compare with")
    ap.add_argument("--text-file", action="append", default=[])
    ap.add_argument("--ids-out", help="with --text-file: write {file: ids} as JSON")
    args = ap.parse_args()
    sp = processor(args.gguf)
    failed = False
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            cases = json.load(f)
        differ = 0
        # SentencePiece never reads control pieces (<bos>, <start_of_turn>) in text; transformers
        # and mode do, so texts holding them are left out.
        control = {p.piece for p in sp_proto(sp).pieces if p.type == pb.ModelProto.SentencePiece.CONTROL}
        cases = [c for c in cases if not any(piece in c["text"] for piece in control)]
        for case in cases:
            ids = sp.encode(case["text"])
            if ids != case["ids"]:
                differ += 1
                print(f"differs on {case['text']!r}:\n  sentencepiece {ids}\n  fixture       {case['ids']}")
        print(f"{len(cases) - differ} of {len(cases)} texts: SentencePiece gives the fixture's ids")
        failed |= differ > 0
    out = {}
    for path in args.text_file:
        with open(path, encoding="utf-8") as f:
            ids = sp.encode(f.read())
        print(f"{path}: {len(ids)} tokens")
        out[path] = ids
    if args.ids_out:
        with open(args.ids_out, "w") as f:
            json.dump(out, f)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
