"""Ranking metrics for one held-out target per example."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def hit_rate(ranked: Sequence[str], target: str, k: int) -> float:
    return 1.0 if target in ranked[:k] else 0.0


def ndcg(ranked: Sequence[str], target: str, k: int) -> float:
    """With one relevant item, NDCG@K = 1 / log2(rank + 1) for a 1-based rank within K, else 0."""
    for rank, item in enumerate(ranked[:k], start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def ranking_metrics(rankings: Sequence[Sequence[str]], targets: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
    """Mean HR@K and NDCG@K over examples, and the over-recommendation ratio, keyed 'hr@K', 'ndcg@K', 'over_rec@K'."""
    if not targets:
        return {}
    out = {}
    for k in sorted(set(ks)):
        out[f"hr@{k}"] = sum(hit_rate(r, t, k) for r, t in zip(rankings, targets)) / len(targets)
        out[f"ndcg@{k}"] = sum(ndcg(r, t, k) for r, t in zip(rankings, targets)) / len(targets)
        out[f"over_rec@{k}"] = over_recommendation(rankings, k)
    return out


def over_recommendation(rankings: Sequence[Sequence[str]], k: int, top: int = 3) -> float:
    """Share of all top-K slots taken by the `top` most recommended items (SPRec's popularity-collapse measure)."""
    counts = Counter(item for ranked in rankings for item in ranked[:k])
    slots = sum(min(k, len(ranked)) for ranked in rankings)
    return sum(n for _, n in counts.most_common(top)) / slots if slots else 0.0
