#!/usr/bin/env python3
"""Writes the corpus of bad inputs that `crates/cli/tests/bad_inputs.rs` runs through `mode`.

Standard library only, deterministic: rerunning it rewrites the same bytes. Small files only;
inputs that are large or need the tiny test backbone (a 100 MB line, safetensors and expert
files derived from it, prepared folders) are made by the Rust test at run time.

    python3 tests/bad_inputs/make.py        # from anywhere; writes next to this script

Layout:
    gguf/     GGUF files: a good tiny llama (a control) and broken variants of it
    hf/       files that replace one file of a good Hugging Face folder (config.json, ...)
    expert/   expert files broken before their tensors matter
    data/     inputs of `mode data prepare` and `mode eval`
    config/   `--config` TOML files
"""

import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))

# --- GGUF -------------------------------------------------------------------------------------

# GGUF metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
# ggml tensor types.
GGML_F32 = 0


def byte_level_alphabet():
    """GPT-2's bytes_to_unicode: the 256 printable characters byte-level BPE maps bytes to."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def gguf_string(s, length=None):
    data = s.encode("utf-8") if isinstance(s, str) else s
    n = len(data) if length is None else length
    return struct.pack("<Q", n) + data


def gguf_value(vtype, value):
    """Encodes a value of `vtype`; arrays are (element type, [values])."""
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        etype, items = value
        out = struct.pack("<IQ", etype, len(items))
        return out + b"".join(gguf_value(etype, v) for v in items)
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i",
           F32: "<f", BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}[vtype]
    return struct.pack(fmt, value)


class Rng:
    """A small LCG, so that weights are the same on every machine and Python version."""

    def __init__(self, seed):
        self.state = seed

    def uniform(self, bound):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return ((self.state >> 11) / float(1 << 53) * 2.0 - 1.0) * bound


# The tiny llama: 1 layer, hidden 8, 2 heads of 4, MLP 16, byte-level vocabulary of 257.
HIDDEN, FFN, HEADS, HEAD_DIM, VOCAB = 8, 16, 2, 4, 257


def tiny_tensors():
    """(name, row-major shape, dtype, data) of every tensor, in file order."""
    rng = Rng(7)
    out = []

    def add(name, shape, norm=False):
        n = 1
        for d in shape:
            n *= d
        values = [1.0 + rng.uniform(0.1) if norm else rng.uniform(0.05) for _ in range(n)]
        out.append((name, list(shape), GGML_F32, struct.pack("<%df" % n, *values)))

    add("token_embd.weight", [VOCAB, HIDDEN])
    add("blk.0.attn_norm.weight", [HIDDEN], norm=True)
    for p in ["attn_q", "attn_k", "attn_v", "attn_output"]:
        add("blk.0.%s.weight" % p, [HIDDEN, HIDDEN])
    add("blk.0.ffn_norm.weight", [HIDDEN], norm=True)
    add("blk.0.ffn_gate.weight", [FFN, HIDDEN])
    add("blk.0.ffn_up.weight", [FFN, HIDDEN])
    add("blk.0.ffn_down.weight", [HIDDEN, FFN])
    add("output_norm.weight", [HIDDEN], norm=True)
    return out


def tiny_metadata(arch="llama"):
    """(key, type, value) of the tiny model, tokenizer included."""
    a = lambda k: "%s.%s" % (arch, k)
    tokens = byte_level_alphabet() + ["<|endoftext|>"]
    return [
        ("general.architecture", STRING, arch),
        (a("block_count"), U32, 1),
        (a("context_length"), U32, 256),
        (a("embedding_length"), U32, HIDDEN),
        (a("feed_forward_length"), U32, FFN),
        (a("attention.head_count"), U32, HEADS),
        (a("attention.head_count_kv"), U32, HEADS),
        (a("attention.key_length"), U32, HEAD_DIM),
        (a("attention.layer_norm_rms_epsilon"), F32, 1e-5),
        (a("rope.freq_base"), F32, 10000.0),
        (a("vocab_size"), U32, VOCAB),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, "gpt2"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, [])),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [1] * 256 + [3])),
        ("tokenizer.ggml.eos_token_id", U32, 256),
    ]


def gguf(metadata=None, tensors=None, magic=b"GGUF", version=3, tensor_count=None,
         kv_count=None, raw_kv=None, raw_info=None, offsets=None, alignment=32):
    """A GGUF file. `raw_kv` / `raw_info` replace the encoded metadata / tensor infos;
    `offsets` overrides data offsets by tensor name; counts may lie."""
    metadata = tiny_metadata() if metadata is None else metadata
    tensors = tiny_tensors() if tensors is None else tensors
    kv = raw_kv if raw_kv is not None else b"".join(
        gguf_string(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in metadata)
    infos, data, offset = [], b"", 0
    for name, shape, dtype, blob in tensors:
        dims = list(reversed(shape))  # GGUF lists the innermost dimension first
        off = (offsets or {}).get(name, offset)
        infos.append(gguf_string(name) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", dtype, off))
        data += blob + b"\0" * (-len(blob) % alignment)
        offset = len(data)
    info = raw_info if raw_info is not None else b"".join(infos)
    head = magic + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count,
                        len(metadata) if kv_count is None else kv_count)
    head += kv + info
    return head + b"\0" * (-len(head) % alignment) + data


def without(items, name):
    return [x for x in items if x[0] != name]


def replace_meta(key, vtype, value, arch="llama"):
    return [(k, vtype, value) if k == key else (k, t, v) for k, t, v in tiny_metadata(arch)]


def make_gguf(w):
    good = gguf()
    w("gguf/good.gguf", good)
    w("gguf/empty.gguf", b"")
    w("gguf/stub.gguf", good[:6])
    w("gguf/truncated_header.gguf", good[:200])
    w("gguf/truncated_data.gguf", good[:-100])
    w("gguf/bad_magic.gguf", b"GGML" + good[4:])
    w("gguf/wrong_version.gguf", gguf(version=99))
    w("gguf/tensor_count_huge.gguf", gguf(tensor_count=1 << 40))
    w("gguf/tensor_count_plus_one.gguf", gguf(tensor_count=len(tiny_tensors()) + 1))
    w("gguf/tensor_count_minus_one.gguf", gguf(tensor_count=len(tiny_tensors()) - 1))
    w("gguf/kv_count_plus_three.gguf", gguf(kv_count=len(tiny_metadata()) + 3))
    w("gguf/offset_out_of_range.gguf", gguf(offsets={"blk.0.ffn_down.weight": 1 << 40}))
    # The last tensor starts 64 bytes late, so its data runs past the end of the file.
    *rest, (last, _, _, _) = tiny_tensors()
    start = sum(len(b) + (-len(b) % 32) for _, _, _, b in rest)
    w("gguf/size_out_of_range.gguf", gguf(offsets={last: start + 64}))
    w("gguf/unknown_dtype.gguf", gguf(tensors=[
        (n, s, 99 if n == "blk.0.attn_q.weight" else d, b) for n, s, d, b in tiny_tensors()]))
    w("gguf/shape_mismatch.gguf", gguf(tensors=[
        (n, [HIDDEN, HIDDEN] if n == "blk.0.ffn_gate.weight" else s, d, b)
        for n, s, d, b in tiny_tensors()]))
    w("gguf/missing_tensor.gguf", gguf(tensors=without(tiny_tensors(), "blk.0.ffn_up.weight")))
    w("gguf/unsupported_arch.gguf", gguf(metadata=tiny_metadata("phi3")))
    # Metadata string lengths that lie: longer than the file, and absurdly long.
    kv = tiny_metadata()
    first = gguf_string(kv[0][0]) + struct.pack("<I", STRING) + gguf_string(kv[0][2], 1 << 20)
    w("gguf/string_length_lies.gguf", gguf(raw_kv=first))
    first = gguf_string(kv[0][0]) + struct.pack("<I", STRING) + gguf_string(kv[0][2], 1 << 62)
    w("gguf/string_length_huge.gguf", gguf(raw_kv=first))
    key = gguf_string(kv[0][0], 1 << 20) + kv[0][0].encode()
    w("gguf/key_length_lies.gguf", gguf(raw_kv=key))
    tokens = [x for x in kv if x[0] == "tokenizer.ggml.tokens"][0]
    lying = gguf_string(tokens[0]) + struct.pack("<IIQ", ARRAY, STRING, 1 << 29)
    w("gguf/array_length_lies.gguf", gguf(metadata=kv[:1], raw_kv=b"".join(
        gguf_string(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in kv[:1]) + lying,
        kv_count=2))
    w("gguf/missing_metadata.gguf", gguf(metadata=without(kv, "llama.embedding_length")))
    w("gguf/wrong_metadata_type.gguf", gguf(metadata=replace_meta("llama.block_count", STRING, "one")))
    w("gguf/zero_heads.gguf", gguf(metadata=replace_meta("llama.attention.head_count", U32, 0)))
    w("gguf/zero_layers.gguf", gguf(metadata=replace_meta("llama.block_count", U32, 0)))
    w("gguf/no_tokenizer.gguf", gguf(metadata=[x for x in kv if not x[0].startswith("tokenizer.")]))
    w("gguf/sentencepiece_without_scores.gguf",
      gguf(metadata=replace_meta("tokenizer.ggml.model", STRING, "llama")))
    w("gguf/wordpiece_tokenizer.gguf",
      gguf(metadata=replace_meta("tokenizer.ggml.model", STRING, "bert")))
    w("gguf/tokens_not_strings.gguf",
      gguf(metadata=replace_meta("tokenizer.ggml.tokens", ARRAY, (U32, list(range(257))))))
    w("gguf/merge_without_space.gguf",
      gguf(metadata=replace_meta("tokenizer.ggml.merges", ARRAY, (STRING, ["ab"]))))
    bad_type = gguf_string("general.architecture") + struct.pack("<I", 99)
    w("gguf/unknown_value_type.gguf", gguf(raw_kv=bad_type))
    bad_bool = gguf_string("general.flag") + struct.pack("<IB", BOOL, 2)
    w("gguf/bad_bool.gguf", gguf(metadata=kv[:1], kv_count=2, raw_kv=b"".join(
        gguf_string(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in kv[:1]) + bad_bool))
    w("gguf/alignment_zero.gguf", gguf(metadata=kv + [("general.alignment", U32, 0)]))
    # A tensor with 7 dimensions; one with none (and no vocab_size to fall back on); one whose
    # element count overflows 64 bits.
    w("gguf/too_many_dims.gguf", gguf(tensors=[
        (n, [1, 1, 1, 1, 1] + s if n == "blk.0.attn_q.weight" else s, d, b)
        for n, s, d, b in tiny_tensors()]))
    no_vocab = without(kv, "llama.vocab_size")
    w("gguf/embedding_without_dims.gguf", gguf(metadata=no_vocab, tensors=[
        (n, [] if n == "token_embd.weight" else s, d, b) for n, s, d, b in tiny_tensors()]))
    w("gguf/embedding_dims_overflow.gguf", gguf(metadata=no_vocab, tensors=[
        (n, [1 << 62, HIDDEN] if n == "token_embd.weight" else s, d, b)
        for n, s, d, b in tiny_tensors()]))
    w("gguf/vocab_huge.gguf", gguf(metadata=replace_meta("llama.vocab_size", U64, 1 << 40)))
    # A NaN weight (the third value of the second layer's query projection).
    w("gguf/nan_weights.gguf", gguf(tensors=[
        (n, s, d, b[:8] + struct.pack("<f", float("nan")) + b[12:] if n == "blk.0.attn_q.weight"
         else b) for n, s, d, b in tiny_tensors()]))
    # A norm of 8 values stored as Q8_0, whose blocks hold 32.
    w("gguf/quantized_norm.gguf", gguf(tensors=[
        (n, s, 8 if n == "output_norm.weight" else d, b) for n, s, d, b in tiny_tensors()]))
    # 300 tokens for a model with 257 embeddings.
    w("gguf/too_many_tokens.gguf", gguf(metadata=replace_meta(
        "tokenizer.ggml.tokens", ARRAY,
        (STRING, byte_level_alphabet() + ["<|endoftext|>"] + ["tok%d" % i for i in range(43)]))))
    w("gguf/broken_chat_template.gguf", gguf(metadata=kv + [
        ("tokenizer.chat_template", STRING, "{% for message in messages %}{{ message['content'] }")]))
    w("gguf/rope_base_zero.gguf", gguf(metadata=replace_meta("llama.rope.freq_base", F32, 0.0)))


# --- safetensors ------------------------------------------------------------------------------


def safetensors(tensors, metadata=None):
    """A safetensors file: (name, dtype, shape, bytes) in order, optional string metadata."""
    header, data = {}, b""
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def expert_header(version=1):
    return {
        "format_version": version,
        "domain": "code",
        "backbone_fingerprint": "0" * 64,
        "backbone_source": "tiny",
        "layout": {"boundaries": [0, 2, 4], "expert_layers_per_block": 1},
        "dims": {"architecture": "llama", "hidden_size": 64, "intermediate_size": 128,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
        "training": {"steps": 1, "tokens": 1, "final_train_loss": None, "final_val_loss": None,
                     "final_val_accuracy": None, "data_fingerprint": None, "seed": 0,
                     "init": "copy"},
        "tool_version": "0.1.0",
    }


def make_experts(w):
    ones = struct.pack("<4f", 1, 1, 1, 1)
    w("expert/plain.safetensors", safetensors([("weight", "F32", [4], ones)]))
    w("expert/bad_json_header.expert.safetensors",
      safetensors([("weight", "F32", [4], ones)], {"mode.expert": "{\"format_version\": 1,"}))
    w("expert/wrong_version.expert.safetensors",
      safetensors([("weight", "F32", [4], ones)],
                  {"mode.expert": json.dumps(expert_header(99), sort_keys=True)}))
    w("expert/header_not_object.expert.safetensors",
      safetensors([("weight", "F32", [4], ones)], {"mode.expert": "[1, 2, 3]"}))
    w("expert/not_safetensors.expert.safetensors", b"def f(x):\n    return x\n" * 4)


# --- Hugging Face folder pieces ---------------------------------------------------------------


def make_hf(w):
    w("hf/config_not_json.json", b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,\n'
      b'  "num_attention_heads": 4 "num_key_value_heads": 2}\n')
    w("hf/config_missing_fields.json",
      json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4}).encode())
    w("hf/config_phi3.json", json.dumps({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 257}).encode())
    w("hf/config_no_architecture.json", json.dumps({"hidden_size": 64}).encode())
    w("hf/config_negative_eps.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 257, "rms_norm_eps": -1e-6,
        "tie_word_embeddings": True}).encode())
    w("hf/tokenizer_junk.json", b"\x89PNG\r\n\x1a\n this is not a tokenizer")
    w("hf/tokenizer_wrong_schema.json", json.dumps({"version": "1.0", "model": 42}).encode())
    w("hf/index_junk.json", b'{"weight_map": ')
    w("hf/index_no_weight_map.json", json.dumps({"metadata": {"total_size": 1}}).encode())
    w("hf/tokenizer_config_junk.json", b'{"chat_template": "{{ messages }}",\n  "eos_token": <eos>}')
    w("hf/index_missing_shard.json", json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}).encode())


# --- data -------------------------------------------------------------------------------------


# A real Parquet file (one optional UTF8 column `text`, two rows, uncompressed) as the Rust
# `parquet` crate 60.1 writes it; the bad ones below are damaged copies of it.
GOOD_PARQUET = bytes.fromhex(
    "504152311504155015504c150415001200001700000064656620662878293a0a2020202072657475726e20780a090000"
    "007072696e742831290a1500151215122c15041510150615060000020000000401010302191202191817646566206628"
    "78293a0a2020202072657475726e20780a1918097072696e742831290a15021916002926000400191c16741534160000"
    "191640001502192c48016d150200150c25021804746578742500001604191c191c26001c150c19350006101918047465"
    "78741500160416a00116a001267426081c360028097072696e742831290a181764656620662878293a0a202020207265"
    "7475726e20780a111100192c15041500150200150015101502003c1640292600040000168e02151a16a80115660016a0"
    "011604260816a0011400002819706172717565742d72732076657273696f6e2036302e312e30191c1c000000b8000000"
    "50415231"
)


def flipped(data, index, mask):
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def make_data(w):
    w("data/empty.txt", b"")
    w("data/blank.txt", b"  \n\n\t \n")
    w("data/non_utf8.txt", b"caf\xe9 au lait\n\xff\xfe\x00 binary \x80\x81\n")
    w("data/one_char.txt", b"a")
    w("data/nomatch/notes.txt", b"these are notes, not python files\n")
    w("data/all_bad.jsonl", b"".join([
        b'{"text": "unterminated\n',
        b"not json at all\n",
        b'{"body": "no text field"}\n',
        b'{"text": ""}\n',
        b"[1, 2, 3]\n",
        b'{"text": "trailing comma",}\n',
    ]))
    w("data/mixed.jsonl", b"".join([
        b'{"text": "def add(a, b):\\n    return a + b\\n"}\n',
        b'{"text": broken}\n',
        b'{"text": "def sub(a, b):\\n    return a - b\\n"}\n',
        b'{"prompt": "2 + 2 =", "completion": ""}\n',
        b"\n",
        b'{"text": "def mul(a, b):\\n    return a * b\\n"}\n',
        b'{"text": 12}\n',
        b'{"text": "def div(a, b):\\n    return a / b\\n"}\n',
    ]))
    w("data/wrong_types.jsonl", b"".join([
        b'{"text": 5}\n',
        b'{"text": ["a", "b"]}\n',
        b'{"prompt": 1, "completion": "x"}\n',
        b'{"prompt": "q", "completion": {"a": 1}}\n',
        b'{"messages": "hello"}\n',
        b'{"text": null}\n',
    ]))
    w("data/eval_bad_line.jsonl",
      b'{"text": "fine line"}\n{"text": 3}\n{"text": "never read"}\n')
    w("data/good.parquet", GOOD_PARQUET)
    w("data/cut.parquet", GOOD_PARQUET[: len(GOOD_PARQUET) // 2])
    # A flipped byte in the first page header: the parquet crate panics reading it (a slice out
    # of range), which must come out as an error naming the file, without a panic message.
    w("data/page_panics.parquet", flipped(GOOD_PARQUET, 12, 0x5A))
    # A flipped byte in the column chunk metadata: a negative start (another panic).
    w("data/negative_start.parquet", flipped(GOOD_PARQUET, 202, 0x01))
    w("data/junk.parquet", b"PAR1 this is not really a parquet file PAR1")
    w("data/not_parquet.parquet", b"just some text in a file named .parquet\n")
    # Footer length pointing before the start of the file.
    w("data/bad_footer.parquet", b"PAR1" + b"\0" * 8 + struct.pack("<I", 1 << 30) + b"PAR1")


# --- --config files ---------------------------------------------------------------------------


def make_config(w):
    w("config/junk.toml", b"steps = = 3\n[[[ not toml\n")
    w("config/unknown_key.toml", b"steps = 2\nstepz = 3\n")
    w("config/wrong_type.toml", b'steps = "many"\n')
    w("config/table.toml", b"[train]\nsteps = 2\n")
    w("config/not_utf8.toml", b"steps = 2\n# \xff\xfe\n")


def main():
    written = []

    def w(rel, data):
        path = os.path.join(ROOT, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        written.append((rel, len(data)))

    for sub in ["gguf", "expert", "hf", "data", "config"]:
        shutil.rmtree(os.path.join(ROOT, sub), ignore_errors=True)
    make_gguf(w)
    make_experts(w)
    make_hf(w)
    make_data(w)
    make_config(w)
    total = sum(n for _, n in written)
    print("wrote %d files, %d bytes, under %s" % (len(written), total, ROOT))


if __name__ == "__main__":
    main()
