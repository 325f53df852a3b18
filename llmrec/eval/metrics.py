"""Ranking metrics for one held-out target per example."""

from __future__ import annotations

import math
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
    """Mean HR@K and NDCG@K over examples, keyed 'hr@K' and 'ndcg@K'."""
    if not targets:
        return {}
    out = {}
    for k in sorted(set(ks)):
        out[f"hr@{k}"] = sum(hit_rate(r, t, k) for r, t in zip(rankings, targets)) / len(targets)
        out[f"ndcg@{k}"] = sum(ndcg(r, t, k) for r, t in zip(rankings, targets)) / len(targets)
    return out
