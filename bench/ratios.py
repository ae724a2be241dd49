"""Summaries of per-round speed ratios, ours over a peer measured in the same rounds.

The bench scripts alternate rounds (ours, peer, ours, peer, ...) on a noisy shared machine, so
a comparison is the median of the per-round ratios, with their spread.
"""


def median(xs):
    """The middle value; the upper one of an even count, as mode's own medians."""
    return sorted(xs)[len(xs) // 2]


def ratio_summary(ours, peer, digits=3):
    """Per-round ratios ours / peer (rounds where the peer measured 0 are dropped): their
    median, min, max and the list; None for each when no round is left."""
    ratios = [o / p for o, p in zip(ours, peer) if p > 0]
    if not ratios:
        return {"median": None, "min": None, "max": None, "rounds": []}
    return {
        "median": round(median(ratios), digits),
        "min": round(min(ratios), digits),
        "max": round(max(ratios), digits),
        "rounds": [round(r, digits) for r in ratios],
    }
