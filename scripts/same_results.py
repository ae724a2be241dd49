#!/usr/bin/env python3
"""Whether two `mode demo` folders scored the same numbers: every stored value of every run in
their `results.json` (each window's hits, predictions and summed loss, accuracies, parameter and
token counts), wall-clock seconds aside. For checking that a refactor changes no number: run the
same demo command (same budget and seed) at the commit before and after it, then

    scripts/same_results.py runs/quick-before runs/quick-after

Exit status 0 when every value is equal, 1 otherwise (the differing values are printed).
"""
import json
import sys
from pathlib import Path

# Keys that measure time, which no two runs share.
TIMED = ("seconds",)


def flat(value, prefix=""):
    """(path, leaf) for every leaf of a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flat(v, f"{prefix}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (json.loads((Path(d) / "results.json").read_text()) for d in sys.argv[1:])
    equal = differ = 0
    for name in sorted(set(a["runs"]) | set(b["runs"])):
        if name not in a["runs"] or name not in b["runs"]:
            print(f"{name}: only in {sys.argv[1] if name in a['runs'] else sys.argv[2]}")
            differ += 1
            continue
        fa, fb = dict(flat(a["runs"][name])), dict(flat(b["runs"][name]))
        keys = sorted(k for k in set(fa) | set(fb) if not any(t in k for t in TIMED))
        bad = [k for k in keys if fa.get(k) != fb.get(k)]
        print(f"{name}: {len(keys)} values, {len(bad)} differ")
        for k in bad[:5]:
            print(f"  {k}: {fa.get(k)!r} vs {fb.get(k)!r}")
        equal += len(keys) - len(bad)
        differ += len(bad)
    print(f"total: {equal} equal, {differ} differ")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
