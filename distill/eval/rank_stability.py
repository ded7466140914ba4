"""Rank stability (issue #31): the same entries benched on several disjoint noise-seed sets (same N, same reference);
how often does the top-k order hold? ``stability`` takes each set's FIDs and reports each set's top k, the share of
sets whose top k (in order) equals the most common one, and the share of entry pairs whose order never changes."""

from __future__ import annotations

from collections import Counter
from itertools import combinations


def top_k(fids: dict[str, float], k: int) -> tuple[str, ...]:
    return tuple(sorted(fids, key=fids.get)[:k])


def stability(per_set: list[dict[str, float]], k: int = 3) -> dict:
    """``per_set``: for each seed set, {entry: FID} over the same entries."""
    if len(per_set) < 2:
        raise ValueError(f"rank stability needs at least 2 seed sets, got {len(per_set)}")
    names = set(per_set[0])
    if any(set(s) != names for s in per_set) or len(names) < k:
        raise ValueError(f"every seed set must score the same entries, at least k = {k} of them")
    tops = [top_k(s, k) for s in per_set]
    modal, count = Counter(tops).most_common(1)[0]
    pairs = list(combinations(sorted(names), 2))
    kept = sum(len({s[a] < s[b] for s in per_set}) == 1 for a, b in pairs)
    return {"top": [list(t) for t in tops], "modal_top": list(modal), "top_k_held": count / len(per_set),
            "pairs_kept": kept / len(pairs) if pairs else 1.0, "k": k, "sets": len(per_set)}
