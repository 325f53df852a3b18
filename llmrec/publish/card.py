"""The run's model card (README.md): what was trained on what, how well it ranks, and how to use it."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from llmrec.data import RecData
from llmrec.data.splits import describe_split
from llmrec.files import write_text
from llmrec.recipe import Recipe

LIBRARIES = ("llmrec", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _metric_table(metrics: dict, recipe: Recipe) -> str:
    split = recipe.eval.split
    ks = sorted(recipe.eval.ks)
    header = "| system | " + " | ".join(f"HR@{k} | NDCG@{k}" for k in ks) + " |"
    rule = "|---|" + "---|---|" * len(ks)
    rows = [header, rule]
    systems = [("this model", f"{split}/")] + [
        (f"{name} baseline", f"baseline/{name}/" if split == "test" else f"baseline/{name}/{split}/")
        for name in recipe.eval.baselines
    ]
    for name, prefix in systems:
        cells = []
        for k in ks:
            for metric in ("hr", "ndcg"):
                value = metrics.get(f"{prefix}{metric}@{k}")
                cells.append(f"{value:.4f}" if isinstance(value, float) else "–")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_card(path: Path, recipe: Recipe, data: RecData, metrics: dict) -> None:
    split = recipe.eval.split
    stats = data.stats()
    adapter = recipe.adapter.method if recipe.adapter.method != "none" else "none (full fine-tuning)"
    stages = ", ".join(stage.trainer for stage in recipe.stages) or "none (evaluation of the base model)"
    ratio = metrics.get(f"{split}/valid_item_ratio")
    versions = library_versions()
    text = f"""---
library_name: llmrec
base_model: {recipe.model.name}
tags: [llmrec, recommendation, {recipe.adapter.method}]
---

# {recipe.run.name}

A next-item recommender trained with [llmrec](https://github.com/llmrec/llmrec): the model reads a user's recent
item titles and writes the title of the next item; recommendations are ranked over the whole catalog by
constrained beam search, so every recommendation is a real item.

- **Base model:** `{recipe.model.name}`
- **Adapter:** {adapter} {recipe.adapter.args or ''}
- **Stages:** {stages}
- **Data:** {stats['name']} — {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions;
  split {describe_split(recipe.data.split)}; prompts show the last {recipe.data.task.history_length} items.
- **Seed:** {recipe.run.seed}

## Results ({split} split, {metrics.get(f'{split}/targets', '?')} targets, {metrics.get(f'{split}/catalog_items', '?')} candidate items)

{_metric_table(metrics, recipe)}

{'Valid-item ratio of unconstrained greedy generation: ' + f'{ratio:.4f}' if isinstance(ratio, float) else ''}
Items the user had already interacted with are {'excluded from' if recipe.eval.exclude_history else 'allowed in'} every ranking.

## Use

```bash
llmrec recommend {path.parent} --user USER_ID -k 10
llmrec eval {path.parent} --split test
```

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```

## Library versions

{chr(10).join(f'- {name}: {version}' for name, version in versions.items())}
"""
    write_text(path, text)
