"""`top_k`: the best-scored catalog items per row, each row's excluded items left out (the CF rankers share it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top_k(scores: torch.Tensor, item_ids: Sequence[str], exclude: Sequence[Sequence[str]] | None, k: int
          ) -> list[list[str]]:
    """For each row of `scores` (n, len(item_ids)), the ids of its k highest-scored items not in `exclude[row]`;
    ties go to the earlier item."""
    scores = scores.clone()
    if exclude is not None:
        position = {item: j for j, item in enumerate(item_ids)}
        for row, items in enumerate(exclude):
            banned = [position[i] for i in items if i in position]
            if banned:
                scores[row, banned] = -torch.inf
    k = min(k, len(item_ids))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return [[item_ids[j] for j, value in zip(row, values) if value > -torch.inf]
            for row, values in zip(order.tolist(), torch.gather(scores, 1, order).tolist())]
