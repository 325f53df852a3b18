"""The run's model card (README.md): what was trained on what, how well it ranks (or predicts likes, or classifies),
and how to use it."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from llmrec.data import RecData
from llmrec.data.classification import describe_classification
from llmrec.data.splits import describe_split
from llmrec.eval.ranking import baseline_prefix
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


SPLIT_NAMES = {
    "test": "test",
    "ood_popularity": "popularity-shift test",
    "ood_temporal": "temporal-shift test",
    "ood_environment": "environment-shift test",
    "valid": "validation",
}


def _metric_table(metrics: dict, recipe: Recipe, split: str) -> str:
    ks = sorted(recipe.eval.ks)
    columns = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")] + [f"over_rec@{max(ks)}"]
    header = "| system | " + " | ".join(c.upper().replace("OVER_REC", "over-rec.") for c in columns) + " |"
    rows = [header, "|---|" + "---|" * len(columns)]
    systems = [("this model", f"{split}/")] + [
        (f"{name} baseline", baseline_prefix(name, split)) for name in recipe.eval.baselines
    ]
    for name, prefix in systems:
        cells = [f"{metrics[prefix + c]:.4f}" if isinstance(metrics.get(prefix + c), float) else "–" for c in columns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _results(metrics: dict, recipe: Recipe) -> str:
    sections = []
    for split in SPLIT_NAMES:
        if f"{split}/targets" not in metrics:
            continue
        ratio = metrics.get(f"{split}/valid_item_ratio")
        sections.append(
            f"## Results: {SPLIT_NAMES[split]} ({metrics[f'{split}/targets']} targets, "
            f"{metrics.get(f'{split}/catalog_items', '?')} candidate items)\n\n{_metric_table(metrics, recipe, split)}\n"
            + (f"\nValid-item ratio of unconstrained greedy generation: {ratio:.4f}\n" if isinstance(ratio, float) else "")
        )
    return "\n".join(sections)


def _ctr_results(metrics: dict) -> str:
    sections = []
    for split, name in SPLIT_NAMES.items():
        if f"{split}/auc" not in metrics:
            continue
        rows = ["| system | AUC | UAUC |", "|---|---|---|"]
        systems = [("this model", f"{split}/")] + [
            (f"{baseline} baseline", baseline_prefix(baseline, split)) for baseline in ("cf", "popularity")
            if baseline_prefix(baseline, split) + "auc" in metrics
        ]
        for system, prefix in systems:
            cells = [f"{metrics[prefix + m]:.4f}" if isinstance(metrics.get(prefix + m), float) else "–" for m in ("auc", "uauc")]
            rows.append(f"| {system} | " + " | ".join(cells) + " |")
        sections.append(
            f"## Results: {name} ({metrics[f'{split}/rows']} rows, {metrics[f'{split}/positive_rate']:.1%} liked; UAUC over "
            f"{metrics[f'{split}/uauc_users']} users with both classes)\n\n" + "\n".join(rows) + "\n"
        )
    return "\n".join(sections)


def _classification_results(metrics: dict, recipe: Recipe) -> str:
    sections = []
    for split, name in SPLIT_NAMES.items():
        if f"{split}/accuracy" not in metrics:
            continue
        rows = ["| system | accuracy |", "|---|---|"]
        for system, prefix in (("this model", f"{split}/"), ("majority-class baseline", baseline_prefix("majority", split))):
            value = metrics.get(prefix + "accuracy")
            rows.append(f"| {system} | {value:.4f} |" if isinstance(value, float) else f"| {system} | – |")
        sections.append(f"## Results: {name} ({metrics[f'{split}/rows']} rows, "
                        f"{recipe.data.classification.num_classes} classes)\n\n" + "\n".join(rows) + "\n")
    return "\n".join(sections)


def _reasoning_results(metrics: dict, recipe: Recipe) -> str:
    sections = []
    for split, name in SPLIT_NAMES.items():
        if f"{split}/mean_accuracy" not in metrics:
            continue
        n = metrics[f"{split}/samples"]
        rows = [f"| mean@{n} | maj@{n} | pass@{n} | answered | tokens per solution |", "|---|---|---|---|---|",
                "| " + " | ".join(f"{metrics[f'{split}/{k}']:.4f}" for k in
                                 ("mean_accuracy", "majority_accuracy", "pass_accuracy", "answered", "completion_tokens")) + " |"]
        sections.append(f"## Results: {name} ({metrics[f'{split}/questions']} questions, {n} samples each at "
                        f"temperature {recipe.eval.temperature})\n\n" + "\n".join(rows) + "\n")
    return "\n".join(sections)


def _instruction_results(metrics: dict) -> str:
    sections = []
    for split, name in SPLIT_NAMES.items():
        if f"{split}/exact_match" not in metrics:
            continue
        rows = ["| exact match | ROUGE-L | loss |", "|---|---|---|",
                "| " + " | ".join(f"{metrics[f'{split}/{k}']:.4f}" for k in ("exact_match", "rouge_l", "loss")) + " |"]
        sections.append(f"## Results: {name} ({metrics[f'{split}/rows']} rows)\n\n" + "\n".join(rows) + "\n")
    return "\n".join(sections)


def _summary_results(metrics: dict) -> str:
    sections = []
    for population in ("test", "valid", "ood"):
        if f"{population}/model" not in metrics:
            continue
        columns = [c for c in ("no_summary", "model", "streaming", "oracle") if f"{population}/{c}" in metrics]
        rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                "| " + " | ".join(f"{metrics[f'{population}/{c}']:.4f}" for c in columns) + " |"]
        sections.append(f"## Results: judge accuracy, {population} users ({metrics[f'{population}/users']} users, "
                        f"{metrics[f'{population}/questions']} questions)\n\n" + "\n".join(rows) + "\n")
    return "\n".join(sections)


def _shift(recipe: Recipe) -> str:
    details = {
        "popularity": lambda s: f"test targets re-drawn with weight popularity^-{s.power}",
        "temporal": lambda s: f"each user's latest {s.fraction:.0%} of interactions",
        "environment": lambda s: f"the users of environments {s.ood_environments}, never trained on",
    }
    shifts = [f"{s.kind} shift ({details[s.kind](s)})" for s in recipe.data.shifts]
    return f"; out-of-distribution tests: {'; '.join(shifts)}" if shifts else ""


_INTRO = {
    "ranking": """A next-item recommender trained with [llmrec](https://github.com/llmrec/llmrec): the model reads a user's recent
item titles and writes the title of the next item; recommendations are ranked over the whole catalog by
constrained beam search, so every recommendation is a real item.""",
    "ctr": """A like predictor trained with [llmrec](https://github.com/llmrec/llmrec): the model reads the titles a user liked
and a candidate item's title and answers Yes or No; the score is the softmax of the two answers' logits.""",
    "classification": """A text classifier trained with [llmrec](https://github.com/llmrec/llmrec): the model reads a prompt holding the
text and writes the class's label word; the predicted class is the label word whose first token has the highest
logit after the prompt.""",
    "preference_summary": """A preference-summary model trained with [llmrec](https://github.com/llmrec/llmrec) (AlignXplore+): it reads a
user's (query, chosen, rejected) behaviours and an optional past summary, thinks, and writes a natural-language
summary of the user's preferences that any judge model can read.""",
    "instructions": """An instruction follower trained with [llmrec](https://github.com/llmrec/llmrec): the model reads an instruction
(and a context) and writes a short response; exact match and ROUGE-L compare its greedy responses with the references.""",
    "reasoning": """A problem solver trained with [llmrec](https://github.com/llmrec/llmrec): the model writes a worked solution that ends
in its final answer; accuracy compares the extracted answers of sampled solutions with the true ones.""",
}


def _notes(recipe: Recipe, path: Path) -> str:
    if recipe.eval.task == "preference_summary":
        return f"""Judge accuracy is the share of held-out (query, chosen, rejected) questions the judge answers correctly from
the summary alone; "streaming" updates the summary with newer behaviours first.

## Use

```bash
llmrec eval {path.parent}
```"""
    if recipe.eval.task == "instructions":
        return f"""Answers are compared after lowercasing and removing punctuation; the loss is the mean negative
log-likelihood per reference response token.

## Use

```bash
llmrec eval {path.parent}
```"""
    if recipe.eval.task == "reasoning":
        return f"""mean@n is the share of correct samples, maj@n the accuracy of the majority answer, pass@n the share of
questions with at least one correct sample.

## Use

```bash
llmrec eval {path.parent}
```"""
    if recipe.eval.task == "classification":
        return f"""The majority-class baseline always answers the most frequent class of the training rows.

## Use

```bash
llmrec eval {path.parent}
```"""
    if recipe.eval.task == "ctr":
        export = (f"\nllmrec export {path.parent} --user USER_ID"
                  f"{'' if recipe.adapter.args.get('conditioning') == 'user' else ' --item ITEM_ID'} --to peft-lora OUT"
                  if recipe.adapter.method == "cora" else "")
        return f"""AUC is over all rows; UAUC averages the AUC of each user who has both liked and disliked rows.

## Use

```bash
llmrec eval {path.parent}{export}
```"""
    return f"""Items the user had already interacted with are {'excluded from' if recipe.eval.exclude_history else 'allowed in'} every ranking.
The over-recommendation ratio is the share of all top-{max(recipe.eval.ks)} slots taken by the three most recommended
items (high values mean every user gets the same few items).

## Use

```bash
llmrec recommend {path.parent} --user USER_ID -k 10
llmrec eval {path.parent}
```"""


def _data_line(recipe: Recipe, data: RecData) -> str:
    if recipe.data.classification is not None:
        return f"- **Data:** {describe_classification(recipe.data.classification)}."
    if recipe.data.summaries is not None:
        source = recipe.data.summaries.behaviours
        return f"- **Data:** {source.source} behaviours; judge: {recipe.data.summaries.judge.kind}."
    if recipe.data.instructions is not None:
        config = recipe.data.instructions
        source = config.path if config.source == "jsonl" else (
            f"synthetic instruction world, {config.categories} categories x {config.examples_per_category} rows"
            f"{f', world seed {config.world_seed}' if config.world_seed is not None else ''}")
        return f"- **Data:** {source}; {config.test_fraction:.0%} held out for testing."
    if recipe.data.reasoning is not None:
        config = recipe.data.reasoning
        return (f"- **Data:** {config.source} problems ({config.train_size} train, {config.test_size} test"
                f"{f', levels {config.levels}' if config.source == 'arithmetic' else ''}).")
    stats = data.stats()
    return f"""- **Data:** {stats['name']} — {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions;
  split {describe_split(recipe.data.split)}{_shift(recipe)}; prompts show the last {recipe.data.task.history_length} items."""


def _results_of(metrics: dict, recipe: Recipe) -> str:
    if recipe.eval.task == "classification":
        return _classification_results(metrics, recipe)
    if recipe.eval.task == "reasoning":
        return _reasoning_results(metrics, recipe)
    if recipe.eval.task == "preference_summary":
        return _summary_results(metrics)
    if recipe.eval.task == "instructions":
        return _instruction_results(metrics)
    return _results(metrics, recipe) if recipe.eval.task == "ranking" else _ctr_results(metrics)


_TAGS = {"classification": "text-classification", "reasoning": "reasoning", "preference_summary": "personalization",
         "instructions": "instruction-tuning"}


def write_card(path: Path, recipe: Recipe, data: RecData, metrics: dict) -> None:
    adapter = recipe.adapter.method if recipe.adapter.method != "none" else "none (full fine-tuning)"
    stages = ", ".join(stage.trainer for stage in recipe.stages) or "none (evaluation of the base model)"
    versions = library_versions()
    text = f"""---
library_name: llmrec
base_model: {recipe.model.name}
tags: [llmrec, {_TAGS.get(recipe.eval.task, "recommendation")}, {recipe.adapter.method}]
---

# {recipe.run.name}

{_INTRO[recipe.eval.task]}

- **Base model:** `{recipe.model.name}`
- **Adapter:** {adapter} {recipe.adapter.args or ''}
- **Stages:** {stages}
{_data_line(recipe, data)}
- **Seed:** {recipe.run.seed}

{_results_of(metrics, recipe)}
{_notes(recipe, path)}

## Recipe

```yaml
{recipe.to_yaml().rstrip()}
```

## Library versions

{chr(10).join(f'- {name}: {version}' for name, version in versions.items())}
"""
    write_text(path, text)
