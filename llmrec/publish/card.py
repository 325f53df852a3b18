"""The run's model card (README.md): what was trained on what, how well it does its task against the task's
baselines, and how to use it. The task (`llmrec.tasks`) writes its own parts: the introduction, the data line, the
results and the notes on reading and using them."""

from __future__ import annotations

from pathlib import Path

from llmrec.files import write_text
from llmrec.tasks import task_of
from llmrec.versions import library_versions


def write_card(path: Path, recipe, data, metrics: dict) -> None:
    """README.md of a run (`recipe`: its loaded recipe; `data`: its RecData)."""
    task = task_of(recipe)
    adapter = recipe.adapter.method if recipe.adapter.method != "none" else "none (full fine-tuning)"
    stages = ", ".join(stage.trainer for stage in recipe.stages) or "none (evaluation of the base model)"
    versions = library_versions()
    text = f"""---
library_name: llmrec
base_model: {recipe.model.name}
tags: [llmrec, {task.card_tag}, {recipe.adapter.method}]
---

# {recipe.run.name}

{task.card_intro}

- **Base model:** `{recipe.model.name}`
- **Adapter:** {adapter} {recipe.adapter.args or ''}
- **Stages:** {stages}
{task.card_data(data)}
- **Seed:** {recipe.run.seed}

{task.card_results(metrics)}
{task.card_notes(path.parent)}

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```

## Library versions

{chr(10).join(f'- {name}: {version}' for name, version in versions.items())}
"""
    write_text(path, text)
