#!/usr/bin/env python3
"""Generate the math demo data (train.jsonl, test.jsonl) with DeepMind's mathematics_dataset.

Run inside the venv that scripts/fetch_demo_data.sh builds (mathematics-dataset==1.0.1 with sympy==1.4 and
numpy==1.23.5; newer sympy/numpy break the package). Mirrors mathematics_dataset/generate.py:

  train.jsonl  the `train-easy` regime: modules.train(entropy_fn) with the lowest third of each module's
               entropy range (generate.py's _make_entropy_fn(0, 3)), --train-per-module examples a module,
               shuffled with the seed (so modules are interleaved).
  test.jsonl   the `interpolate` regime: modules.test(), --test-per-module examples a module, grouped by
               module in the order of --modules.

Like generate.py, samples whose question is over 160 characters or whose answer is over 30 are dropped and
drawn again. Each line is {"text": "Question: <q>\\nAnswer: <a>", "module": "<name>"}.

Deterministic: every (split, module) pair re-seeds Python's `random` and numpy's global generator from a
sha256 of (--seed, split, module), so a module's examples do not depend on which other modules are asked for,
and the script re-executes itself with PYTHONHASHSEED=0 so that any set/dict-of-str ordering is fixed too.
Files are written to a temporary name and renamed into place.

  python generate_math.py --out-dir DIR [--train-per-module 3000] [--test-per-module 200] [--seed 20190402]
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time

DEFAULT_MODULES = [
    "algebra__linear_1d",
    "algebra__linear_2d",
    "arithmetic__add_or_sub",
    "arithmetic__mul",
    "arithmetic__div",
    "arithmetic__mixed",
    "calculus__differentiate",
    "numbers__gcd",
    "numbers__div_remainder",
    "numbers__place_value",
    "polynomials__expand",
    "polynomials__evaluate",
    "comparison__sort",
    "measurement__conversion",
    "probability__swr_p_sequence",
]


def log(msg):
    print(f"generate_math: {msg}", file=sys.stderr, flush=True)


def ensure_hash_seed():
    """Re-exec with PYTHONHASHSEED=0 unless it is already set so (str hashing is randomized otherwise)."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def flatten(tree, prefix=None):
    """{'algebra': {'linear_1d': fn, ...}, ...} -> {'algebra__linear_1d': fn, ...} (as generate.py names them)."""
    flat = {}
    for key, value in tree.items():
        name = key if prefix is None else f"{prefix}__{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def train_easy_entropy(range_):
    """generate.py's _make_entropy_fn(0, 3): the lowest third of the module's entropy range."""
    lo, hi = range_
    return (lo, lo + (hi - lo) / 3)


def reseed(seed, split, module):
    import numpy as np

    digest = hashlib.sha256(f"{seed}:{split}:{module}".encode()).digest()
    value = int.from_bytes(digest[:8], "little")
    random.seed(value)
    np.random.seed(value % (2**32))


def sample(module_fn, max_q, max_a):
    """One problem, re-drawn while too long (generate.sample_from_module without the absl flags)."""
    dropped = 0
    while True:
        problem = module_fn()
        question = str(problem.question)
        answer = str(problem.answer)
        if len(question) > max_q or len(answer) > max_a:
            dropped += 1
            continue
        return question, answer, dropped


def generate_split(split, flat, names, count, seed, settings):
    records = []
    for name in names:
        reseed(seed, split, name)
        started = time.time()
        dropped = 0
        for _ in range(count):
            question, answer, d = sample(
                flat[name], settings.MAX_QUESTION_LENGTH, settings.MAX_ANSWER_LENGTH
            )
            dropped += d
            records.append({"text": f"Question: {question}\nAnswer: {answer}", "module": name})
        log(f"{split}: {name}: {count} examples in {time.time() - started:.1f}s ({dropped} dropped as too long)")
    return records


def write_jsonl(path, records):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="where train.jsonl and test.jsonl go")
    parser.add_argument("--train-per-module", type=int, default=3000)
    parser.add_argument("--test-per-module", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20190402)
    parser.add_argument(
        "--modules",
        default=",".join(DEFAULT_MODULES),
        help="comma-separated module names (e.g. algebra__linear_1d); 'list' prints the available ones",
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep train.jsonl grouped by module")
    args = parser.parse_args()

    ensure_hash_seed()

    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import modules

    train_flat = flatten(modules.train(train_easy_entropy))
    test_flat = flatten(modules.test())
    if args.modules == "list":
        print("\n".join(sorted(train_flat)))
        return 0
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    missing = [n for n in names if n not in train_flat or n not in test_flat]
    if missing:
        log(f"error: unknown module(s): {', '.join(missing)} (use --modules list)")
        return 2
    if len(set(names)) != len(names):
        log("error: a module is named twice in --modules")
        return 2

    os.makedirs(args.out_dir, exist_ok=True)
    started = time.time()
    train = generate_split("train", train_flat, names, args.train_per_module, args.seed, generate_settings)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(train)
    test = generate_split("test", test_flat, names, args.test_per_module, args.seed, generate_settings)
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "test.jsonl"), test)
    log(
        f"wrote {len(train)} train and {len(test)} test examples over {len(names)} modules "
        f"to {args.out_dir} in {time.time() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
