"""Metric keys: how metrics.json names a value, in one place.

- the model on a split: `<split>/<metric>`, e.g. `test/hr@10`, `valid/auc`, `ood_temporal/ndcg@10`;
- a baseline on a split: `baseline/<name>/<split>/<metric>`, on every split alike, e.g.
  `baseline/popularity/test/hr@10`, `baseline/majority/valid/accuracy`. (Runs written before this rule named the
  test split's baselines `baseline/<name>/<metric>`; `upgrade_keys` renames them when such a run is read.)
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
    "train": "training (fit)",
}


def split_prefix(split: str) -> str:
    """Metric-key prefix of the model on `split`."""
    return f"{split}/"


def baseline_prefix(name: str, split: str) -> str:
    """Metric-key prefix of a baseline on a split: 'baseline/<name>/<split>/'."""
    return f"baseline/{name}/{split}/"


def upgrade_keys(metrics: dict) -> dict:
    """`metrics` with the test split's baseline keys of older runs ('baseline/<name>/<metric>') renamed to today's
    'baseline/<name>/test/<metric>'."""
    return {f"baseline/{parts[1]}/test/{parts[2]}" if (parts := key.split("/"))[0] == "baseline" and len(parts) == 3
            else key: value for key, value in metrics.items()}


def stage_prefix(label: str) -> str:
    """Metric-key prefix of a training stage's figures."""
    return f"train/{label}/"


def systems(metrics: dict, split: str, metric: str) -> dict[str, str]:
    """{system: metric-key prefix}: the model and every baseline that reports a metric starting with `metric` on
    `split`, the model first."""
    found = {"model": split_prefix(split)}
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "baseline" and parts[2] == split and parts[3].startswith(metric):
            found[parts[1]] = baseline_prefix(parts[1], split)
    return found
