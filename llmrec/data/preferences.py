"""Preference data for recommendation: (history prompt, the true next item, J negative items).

Rows are `prompt`, `chosen` (the next item's title) and `rejected` (a list of J titles), plus `user_id`,
`item_id` and, when the interactions carry one, `environment`. The prompts are the next-item prompts of the SFT
task, so an SFT model and its aligned successor read the same text.

Negatives never include the user's positives: every item the user interacted with in the training split, and the
target itself. Samplers:

* `uniform`: uniformly over the rest of the catalog;
* `popularity`: proportionally to training popularity (+1, so unseen items stay possible) — the negatives a
  popularity-biased recommender would rank high;
* `model`: from the current model's own top-K (constrained beam search over the catalog, `model_top_k` beams),
  the "hard" negatives; a user whose top-K holds fewer than J non-positive items is topped up uniformly.

Choices where the method file is silent: the negatives of a user are drawn without replacement, each training
target gets its own draw, and `max_examples_per_user` keeps each user's latest targets (as the SFT task does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from llmrec.errors import LLMRecError
from llmrec.schema import Section

from .recdata import RecData
from .tasks import NextItemTaskConfig, next_item_examples

if TYPE_CHECKING:  # datasets is imported where rows are built: reading a recipe does not need it
    from datasets import Dataset


class PreferenceDataConfig(Section):
    """`stages.N.data` of a preference stage (dpo, softmax_dpo, causal_dpo)."""

    negatives: int = Field(1, ge=1, description="J, the negatives per row (pairwise DPO expands them into J rows).")
    sampler: Literal["uniform", "popularity", "model"] = Field("uniform", description="How negatives are drawn.")
    model_top_k: int = Field(20, ge=1, description="model sampler: how many of the model's top items to draw from.")
    max_examples_per_user: int | None = Field(
        None, ge=1, description="Keep only each user's latest training targets (None: all)."
    )
    validation: bool = Field(False, description="Also build rows for the valid split (for eval_loss during training).")


RankFunction = Callable[[Sequence[str], Sequence[Sequence[str]], int], list[list[str]]]


def preference_examples(
    data: RecData,
    split: str,
    task: NextItemTaskConfig,
    config: PreferenceDataConfig,
    seed: int,
    rank: RankFunction | None = None,
) -> Dataset:
    """Rows with `rejected` as a list of J titles; `rank(prompts, excluded, k)` serves the `model` sampler."""
    rows = next_item_examples(data, split, task)
    if config.max_examples_per_user is not None:
        keep: dict[str, list[int]] = {}
        for index, user in enumerate(rows["user_id"]):
            keep.setdefault(user, []).append(index)
        rows = rows.select(sorted(i for indices in keep.values() for i in indices[-config.max_examples_per_user :]))
    if len(rows) == 0:
        return rows.add_column("chosen", []).add_column("rejected", [])

    titles = data.titles
    items = sorted(titles)
    item_index = {item: k for k, item in enumerate(items)}
    positives = _training_positives(data)
    available = min(len(items) - len(positives.get(user, ())) - 1 for user in set(rows["user_id"]))
    if available < config.negatives:
        raise LLMRecError(
            f"{config.negatives} negatives per row were asked for, but some user has only {available} catalog items "
            "that are not among their positives.",
            "stages.data.negatives",
        )

    rng = np.random.default_rng(seed)
    counts = data.popularity("train")
    weights = np.array([counts.get(item, 0) + 1.0 for item in items]) if config.sampler == "popularity" else None
    ranked: list[list[str]] = [[] for _ in range(len(rows))]
    if config.sampler == "model":
        if rank is None:
            raise LLMRecError("the model sampler needs a trained model; put an SFT stage first.",
                              "stages.data.sampler")
        excluded = [sorted(positives.get(user, set()) | {item})
                    for user, item in zip(rows["user_id"], rows["item_id"])]
        ranked = rank(rows["prompt"], excluded, config.model_top_k)

    rejected = []
    for row, (user, target) in enumerate(zip(rows["user_id"], rows["item_id"])):
        banned = positives.get(user, set()) | {target}
        picks = [item for item in ranked[row] if item not in banned]
        if len(picks) > config.negatives:
            picks = [picks[k] for k in sorted(rng.choice(len(picks), config.negatives, replace=False))]
        if len(picks) < config.negatives:
            picks += _draw(rng, items, item_index, weights, banned | set(picks), config.negatives - len(picks))
        rejected.append([titles[item] for item in picks])

    out = rows.add_column("chosen", list(rows["completion"])).add_column("rejected", rejected)
    out = out.remove_columns(["completion", "history"])
    if "environment" in data.interactions.column_names:
        environment = {
            (u, i): e
            for u, i, e, s in zip(
                *(data.interactions_frame[c] for c in ("user_id", "item_id", "environment", "split"))
            )
            if s == split
        }
        out = out.add_column("environment", [int(environment[(u, i)]) for u, i in zip(out["user_id"], out["item_id"])])
    return out


def pairwise_rows(dataset: Dataset) -> Dataset:
    """Pairwise DPO's view of multi-negative rows: one (prompt, chosen, rejected) row per negative."""
    from datasets import Dataset

    columns = {name: [] for name in dataset.column_names}
    for row in dataset:
        for negative in row["rejected"]:
            for name in columns:
                columns[name].append(negative if name == "rejected" else row[name])
    return Dataset.from_dict(columns)


def _training_positives(data: RecData) -> dict[str, set[str]]:
    frame = data.interactions_frame
    train = frame[frame["split"] == "train"] if "split" in frame.columns else frame
    positives: dict[str, set[str]] = {}
    for user, item in zip(train["user_id"], train["item_id"]):
        positives.setdefault(user, set()).add(item)
    return positives


def _draw(rng, items: list[str], index: dict[str, int], weights, banned: set[str], count: int) -> list[str]:
    p = np.ones(len(items)) if weights is None else weights.copy()
    p[[index[item] for item in banned if item in index]] = 0.0
    chosen = rng.choice(len(items), size=count, replace=False, p=p / p.sum())
    return [items[k] for k in sorted(chosen)]
