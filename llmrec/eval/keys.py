"""Metric keys: how metrics.json names a value, in one place.

- the model on a split: `<split>/<metric>`, e.g. `test/hr@10`, `valid/auc`, `ood_temporal/ndcg@10`;
- a baseline: `baseline/<name>/<metric>` on the test split and `baseline/<name>/<split>/<metric>` on the others,
  e.g. `baseline/popularity/hr@10`, `baseline/majority/valid/accuracy`;
- a training stage: `train/<stage label>/<figure>`, e.g. `train/stage0-sft/final_loss`;
- the run: `run/seed`, `run/world_size`.
"""

from __future__ import annotations

SPLIT_NAMES = {
    "test": "test",
    "ood_popularity": "popularity-shift test",
    "ood_temporal": "temporal-shift test",
    "ood_environment": "environment-shift test",
    "valid": "validation",
}


def split_prefix(split: str) -> str:
    """Metric-key prefix of the model on `split`."""
    return f"{split}/"


def baseline_prefix(name: str, split: str) -> str:
    """Metric-key prefix of a baseline: 'baseline/<name>/' on the test split, 'baseline/<name>/<split>/' elsewhere."""
    return f"baseline/{name}/" if split == "test" else f"baseline/{name}/{split}/"


def stage_prefix(label: str) -> str:
    """Metric-key prefix of a training stage's figures."""
    return f"train/{label}/"


def systems(metrics: dict, split: str, metric: str) -> dict[str, str]:
    """{system: metric-key prefix}: the model and every baseline that reports a metric starting with `metric` on
    `split`, the model first."""
    found = {"model": split_prefix(split)}
    for key in metrics:
        parts = key.split("/")
        in_split = len(parts) == 3 if split == "test" else (len(parts) == 4 and parts[2] == split)
        if parts[0] == "baseline" and parts[-1].startswith(metric) and in_split:
            found[parts[1]] = "/".join(parts[:-1]) + "/"
    return found
