"""The CTR task: "will the user like this item?" answered Yes or No (TALLRec-style like prediction).

Every rated interaction of a split is one row: the prompt shows the titles of the user's latest `history_length`
earlier *liked* items (oldest first) and the target item's title; the label is 1 ("Yes") when the rating is at least
`like_threshold`, else 0 ("No"). Rows carry `prompt`, `completion` (the answer text for the label, so TRL's
prompt–completion trainers can use them as they are), `label`, `user_id` and `item_id`.

Histories follow the next-item task: a training row's history holds only earlier training interactions, an
evaluation row's history every earlier interaction of any split (what the user did before the target). Only liked
items are shown, so the history says what the user enjoys; interactions without a rating are neither rows nor
history. `min_history` applies to every split, so training and evaluation prompts look alike.

Training rows: `max_examples_per_user` keeps each user's latest rows, then `balance` downsamples the majority class
to the minority's size (seeded), because ratings are skewed towards likes on most datasets and a classifier
trained on them learns to answer "Yes". Evaluation rows are never balanced (AUC does not need it, and the true
class ratio is part of what is measured); `max_eval_users` keeps the rows of a seeded sample of users (all of each
one's rows, so per-user AUC stays defined on a small evaluation), then `max_eval_examples` draws a seeded sample of
rows, kept in data order.
"""

from __future__ import annotations

from collections import Counter
from string import Formatter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from llmrec.errors import LLMRecError
from llmrec.schema import Section

from .recdata import RecData

if TYPE_CHECKING:  # datasets is imported where rows are built: reading a recipe does not need it
    from datasets import Dataset

DEFAULT_CTR_TEMPLATE = "A user liked these items:\n{history}\nWill the user like {target}? Answer:"

COLUMNS = {"prompt": "string", "completion": "string", "label": "int64", "user_id": "string", "item_id": "string"}


class _Row(NamedTuple):
    user_id: str
    item_id: str
    prompt: str
    label: int


class CTRTaskConfig(Section):
    """`data.ctr`: how rated interactions become Yes/No like-prediction rows."""

    like_threshold: float = Field(
        4.0, description="A rating at least this is a like (label 1, 'Yes'); below it, a dislike (0, 'No')."
    )
    history_length: int = Field(10, ge=1, description="How many of the user's latest liked items the prompt shows.")
    min_history: int = Field(
        1, ge=0, description="Rows whose user has fewer earlier liked items are skipped (0: keep cold-start rows)."
    )
    prompt_template: str = Field(
        DEFAULT_CTR_TEMPLATE, description="Must contain {history} and {target} (the item's title) exactly once each."
    )
    history_separator: str = Field("\n", description="Between history titles.")
    yes_answer: str = Field(" Yes", min_length=1, description="The completion of a liked row (follows the prompt).")
    no_answer: str = Field(" No", min_length=1, description="The completion of a disliked row (follows the prompt).")
    balance: bool = Field(
        True, description="Training rows: downsample the majority class to the minority's size (seeded)."
    )
    max_examples_per_user: int | None = Field(
        None, ge=1, description="Training rows: keep only each user's latest rows (None: all)."
    )
    max_eval_examples: int | None = Field(
        None, ge=1, description="Evaluation rows: a seeded sample of at most this many (None: all)."
    )
    max_eval_users: int | None = Field(
        None, ge=1, description="Evaluation rows: only those of a seeded sample of this many users (None: all), so "
        "that a small evaluation still has users with both likes and dislikes for UAUC; applied before "
        "max_eval_examples.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        try:
            names = Counter(name for _, name, _, _ in Formatter().parse(template) if name is not None)
        except ValueError as err:
            raise ValueError(f"prompt_template is not a valid format string ({err})") from None
        for needed in ("history", "target"):
            if names[needed] != 1:
                raise ValueError(f"prompt_template must contain {{{needed}}} exactly once")
        others = sorted(set(names) - {"history", "target"})
        if others:
            raise ValueError(f"prompt_template may only use {{history}} and {{target}}, not {{{others[0]}}}")
        return template

    @model_validator(mode="after")
    def _distinct_answers(self) -> CTRTaskConfig:
        if self.yes_answer == self.no_answer:
            raise ValueError("yes_answer and no_answer must differ")
        return self

    def answer(self, label: int) -> str:
        return self.yes_answer if label else self.no_answer


def ctr_examples(data: RecData, split: str, config: CTRTaskConfig, seed: int) -> Dataset:
    """Rows `prompt`, `completion`, `label` (0/1), `user_id`, `item_id` of one split; deterministic for
    (data, config, seed). An empty split gives an empty dataset; training rows of a single class raise."""
    from datasets import Dataset, Features, Value

    frame = data.interactions_frame
    if "rating" not in frame.columns:
        raise LLMRecError(
            f"the CTR task needs ratings (an item is liked, 'Yes', when its rating is at least like_threshold = "
            f"{config.like_threshold:g}), but the interactions of {data.name!r} have no 'rating' column. Ratings come "
            "with the synthetic world, ml-100k, ml-1m, amazon reviews that have a 'rating' field, recbole .inter "
            "files with a rating column, and table sources whose data.source.columns maps a rating column.",
            "data.ctr",
        )
    titles = data.titles
    splits = frame["split"] if "split" in frame.columns else [""] * len(frame)
    per_user: dict[str, list[_Row]] = {}  # in time order
    liked: dict[str, list[str]] = {}  # user -> earlier liked items that a row of `split` may show
    for user, item, item_split, rating in zip(frame["user_id"], frame["item_id"], splits, frame["rating"]):
        if pd.isna(rating):
            continue
        label = int(rating >= config.like_threshold)
        history = liked.setdefault(user, [])
        if item_split == split and len(history) >= config.min_history:
            prompt = config.prompt_template.format(
                history=config.history_separator.join(titles[e] for e in history[-config.history_length :]),
                target=titles[item],
            )
            per_user.setdefault(user, []).append(_Row(user, item, prompt, label))
        if label and (split != "train" or item_split == "train"):
            history.append(item)

    rng = np.random.default_rng(seed)
    if split != "train" and config.max_eval_users is not None and len(per_user) > config.max_eval_users:
        users = list(per_user)
        per_user = {users[k]: per_user[users[k]] for k in sorted(rng.choice(len(users), config.max_eval_users,
                                                                            replace=False))}
    rows: list[_Row] = []
    for user_rows in per_user.values():
        if split == "train" and config.max_examples_per_user is not None:
            user_rows = user_rows[-config.max_examples_per_user :]
        rows.extend(user_rows)

    if split == "train" and rows:
        labels = Counter(row.label for row in rows)
        if len(labels) == 1:
            only = "Yes" if 1 in labels else "No"
            raise LLMRecError(
                f"every one of the {len(rows)} training rows is labelled {only!r} (rating "
                f"{'at least' if only == 'Yes' else 'below'} {config.like_threshold:g}), so there is nothing to "
                f"learn{' and no balancing possible' if config.balance else ''}. Choose a threshold between the "
                "ratings the data holds (and check that data.filters.min_rating does not drop the dislikes).",
                "data.ctr.like_threshold",
            )
        if config.balance:
            rows = _balanced(rows, rng)
    elif split != "train" and config.max_eval_examples is not None and len(rows) > config.max_eval_examples:
        rows = [rows[k] for k in sorted(rng.choice(len(rows), config.max_eval_examples, replace=False))]

    return Dataset.from_dict(
        {
            "prompt": [row.prompt for row in rows],
            "completion": [config.answer(row.label) for row in rows],
            "label": [row.label for row in rows],
            "user_id": [row.user_id for row in rows],
            "item_id": [row.item_id for row in rows],
        },
        features=Features({name: Value(kind) for name, kind in COLUMNS.items()}),
    )


def _balanced(rows: list[_Row], rng: np.random.Generator) -> list[_Row]:
    """The minority class and an equal-sized seeded sample of the majority, in their original order."""
    by_label: dict[int, list[int]] = {0: [], 1: []}
    for index, row in enumerate(rows):
        by_label[row.label].append(index)
    minority, majority = sorted(by_label.values(), key=len)
    kept = rng.choice(majority, len(minority), replace=False)
    return [rows[k] for k in sorted([*minority, *kept])]


def ctr_tokenizer_texts(config: CTRTaskConfig) -> list[str]:
    """The prompt (placeholders filled with the word "title") followed by each answer: texts for a tiny model's
    tokenizer, so the template's words and the answers become whole tokens. Callers repeat them to give them weight
    against the titles, as they do for the next-item template."""
    prompt = config.prompt_template.format(history=config.history_separator.join(["title"] * 2), target="title")
    return [prompt + config.yes_answer, prompt + config.no_answer]
