"""Ranking metrics for one held-out target per example, and AUC / user-averaged AUC for scored labels."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


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


def auc(labels: Sequence, scores: Sequence[float]) -> float:
    """ROC AUC: the probability that a random positive outscores a random negative, ties counting one half.

    Computed by the rank statistic (Mann–Whitney U) with average ranks for tied scores, in O(n log n). `labels` are
    truthy for positives. Raises ValueError when the inputs differ in length, a score is NaN, or only one class
    is present (AUC is undefined then).
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length ({y.size} vs {s.size})")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position of each distinct score in sorted order
    average_rank = first + (counts + 1) / 2.0  # 1-based average rank of a tie group
    rank_sum = float(average_rank[inverse.ravel()][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def uauc(users: Sequence, labels: Sequence, scores: Sequence[float]) -> tuple[float, int]:
    """User-averaged AUC: the unweighted mean of per-user AUCs, over users that have both classes.

    Returns (UAUC, number of users counted); (nan, 0) when no user has both a positive and a negative.
    """
    u = np.asarray(users).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not (u.shape == y.shape == s.shape):
        raise ValueError(f"users, labels and scores differ in length ({u.size}, {y.size}, {s.size})")
    if u.size == 0:
        return math.nan, 0
    order = np.argsort(u, kind="stable")
    u, y, s = u[order], y[order], s[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], u.size]
    values = []
    for start, end in zip(starts, ends):
        positives = int(y[start:end].sum())
        if 0 < positives < end - start:
            values.append(auc(y[start:end], s[start:end]))
    if not values:
        return math.nan, 0
    return float(np.mean(values)), len(values)


def normalised_mutual_information(a: Sequence, b: Sequence) -> float:
    """NMI of two labellings of the same items, normalised by the geometric mean of their entropies: 1 when one
    determines the other, 0 when they are independent (and 0 when either has one label only)."""
    n = len(a)
    if n == 0:
        return 0.0
    joint, left, right = Counter(zip(a, b)), Counter(a), Counter(b)
    mutual = sum(c / n * math.log(c * n / (left[x] * right[y])) for (x, y), c in joint.items())

    def entropy(counts: Counter) -> float:
        return -sum(c / n * math.log(c / n) for c in counts.values())

    denominator = math.sqrt(entropy(left) * entropy(right))
    return max(0.0, mutual / denominator) if denominator > 0 else 0.0
