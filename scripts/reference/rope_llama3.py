#!/usr/bin/env python3
"""Writes tests/fixtures/rope_llama3_inv_freq.json: the RoPE inverse frequencies transformers computes
for Llama 3.1's `rope_scaling` (rope_type llama3), so the Rust RoPE can be checked against it.

    scripts/reference/.venv/bin/python scripts/reference/rope_llama3.py
"""
import json
import os

import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
config = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_theta=500000.0,
                     max_position_embeddings=131072, rope_scaling=dict(SCALING))
inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
out = os.path.join(os.path.dirname(__file__), "../../tests/fixtures/rope_llama3_inv_freq.json")
with open(out, "w") as f:
    json.dump({"rope_theta": 500000.0, "head_dim": 128, "rope_scaling": SCALING,
               "transformers_version": transformers.__version__,
               "inv_freq": [float(x) for x in inv_freq]}, f)
print("wrote", os.path.normpath(out))
