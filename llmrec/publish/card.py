"""The run's model card (README.md): what was trained on what, how well it does its task against the task's
baselines, and how to use it.

The card is a `huggingface_hub.ModelCard`: its YAML metadata is a `ModelCardData` (`card_metadata`) and the Hub
reads it as it reads any model card: `base_model` (only when the base is a real Hub id; a `tiny:` or local base is
named in the text instead), `base_model_relation`, `library_name` (`peft` when the run's adapter is a stock PEFT
adapter), `pipeline_tag`, `tags`, `license`, and a `model-index` with the model's metrics per split (`eval_results`).
The task (`llmrec.tasks`) writes its own parts of the body: the introduction, the data line, the results and the
notes on reading and using them. `llmrec push` reuses the body and adds how to load the published repository.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmrec.files import write_text
from llmrec.tasks import task_of
from llmrec.versions import library_versions

# adapters whose final/ folder already is a stock PEFT adapter (the others export to one, or have none)
STOCK_FINAL = ("lora", "prompt_tuning")
# metrics.json metric names that go into the model-index, with their display names
INDEXED_METRICS = {r"hr@(\d+)": "HR@{}", r"ndcg@(\d+)": "NDCG@{}", r"auc": "AUC", r"uauc": "UAUC",
                   r"accuracy": "accuracy", r"mean_accuracy": "mean accuracy",
                   r"majority_accuracy": "majority accuracy", r"model": "judge accuracy"}


def hub_base_model(recipe) -> str | None:
    """The base model's Hub id, or None when it is on no Hub (a `tiny:` model or a local folder). A packaged model
    names the Hub repository its converted weights come from."""
    from llmrec.models import is_folder
    from llmrec.models.packaged import PACKAGED
    from llmrec.models.tiny import is_tiny

    name = recipe.model.name
    if name in PACKAGED:
        return PACKAGED[name].hub_id
    if is_tiny(name) or is_folder(name):
        return None
    return name


def dataset_name(recipe) -> str:
    """A short name of what the run trained and was evaluated on: the data folder's name, or the source's format
    ('synthetic')."""
    task = task_of(recipe)
    if not task.uses_interactions:
        return f"synthetic {task.name}"
    source = recipe.data.source
    path = getattr(source, "path", None)
    if path:
        return getattr(source, "dataset", None) or Path(path).name
    return source.format


def eval_results(recipe, metrics: dict):
    """The model's own metrics (not the baselines') as `EvalResult`s, one per split and indexed metric."""
    from huggingface_hub import EvalResult

    task = task_of(recipe)
    name = dataset_name(recipe)
    results = []
    for key, value in metrics.items():
        split, _, metric = key.partition("/")
        if split in ("baseline", "train", "run") or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        label = _metric_label(metric)
        if label is None:
            continue
        results.append(EvalResult(task_type="text-generation", task_name=task.name, dataset_type=name,
                                  dataset_name=name, dataset_split=split, metric_type=metric, metric_name=label,
                                  metric_value=round(float(value), 6)))
    return results


def _metric_label(metric: str) -> str | None:
    for pattern, label in INDEXED_METRICS.items():
        match = re.fullmatch(pattern, metric)
        if match:
            return label.format(*match.groups())
    return None


def card_metadata(recipe, metrics: dict, license: str | None = None, model_name: str | None = None):
    """The card's YAML metadata (`ModelCardData`)."""
    from huggingface_hub import ModelCardData

    method = recipe.adapter.method
    base = hub_base_model(recipe)
    tags = list(dict.fromkeys(["llmrec", method if method != "none" else "full-fine-tuning",
                               task_of(recipe).card_tag, "recommendation"]))
    results = eval_results(recipe, metrics)
    extra = {"base_model_relation": "adapter" if method != "none" else "finetune"} if base else {}
    return ModelCardData(
        base_model=base,
        library_name="peft" if method in STOCK_FINAL else "transformers" if method == "none" else "llmrec",
        pipeline_tag="text-generation", tags=tags, license=license, model_name=model_name or recipe.run.name,
        eval_results=results or None, **extra,
    )


def card_body(recipe, data, metrics: dict, run_path: Path) -> str:
    """The card's markdown body (the task's introduction, data, results and notes; the recipe; library versions)."""
    task = task_of(recipe)
    adapter = recipe.adapter.method if recipe.adapter.method != "none" else "none (full fine-tuning)"
    stages = ", ".join(stage.trainer for stage in recipe.stages) or "none (evaluation of the base model)"
    base = hub_base_model(recipe)
    base_line = f"`{recipe.model.name}`" + ("" if base == recipe.model.name else
                                             f" (on the Hub: `{base}`)" if base else " (not on the Hugging Face Hub)")
    versions = library_versions()
    return f"""
# {recipe.run.name}

{task.card_intro}

- **Base model:** {base_line}
- **Adapter:** {adapter} {recipe.adapter.args or ''}
- **Stages:** {stages}
{task.card_data(data)}
- **Seed:** {recipe.run.seed}

{task.card_results(metrics)}
{task.card_notes(run_path)}

## Recipe

Trained with `llmrec train recipe.yaml` (this resolved recipe reproduces the run):

```yaml
{recipe.to_yaml().rstrip()}
```

## Library versions

{chr(10).join(f'- {name}: {version}' for name, version in versions.items())}
"""


def build_card(recipe, data, metrics: dict, run_path: Path):
    """The run's `ModelCard`."""
    from huggingface_hub import ModelCard

    metadata = card_metadata(recipe, metrics)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{card_body(recipe, data, metrics, run_path)}")


def write_card(path: Path, recipe, data, metrics: dict) -> None:
    """README.md of a run (`recipe`: its loaded recipe; `data`: its RecData)."""
    write_text(path, str(build_card(recipe, data, metrics, path.parent)))
