"""Task builders: `RecData` -> TRL-format datasets.

Next-item generation (BIGRec-style) in TRL's prompt–completion format: the prompt lists the user's last
`history_length` item titles (oldest first), the completion is the next item's title. TRL appends the EOS token
to the completion, so the model learns where a title ends, and the ranking evaluator's trie of titles ends each
title with EOS the same way.

Training targets are the train-split interactions with at least `min_history` earlier train interactions; their
history holds only training interactions. Evaluation targets are the valid or test interactions; their history
is everything the user did before them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from llmrec.schema import Section

from .recdata import RecData

if TYPE_CHECKING:  # datasets is imported where rows are built: reading a recipe does not need it
    from datasets import Dataset

DEFAULT_PROMPT_TEMPLATE = "A user's recent items, oldest first:\n{history}\nTheir next item:\n"


class NextItemTaskConfig(Section):
    """`data.task`: how histories become prompts."""

    history_length: int = Field(10, ge=1, description="How many of the latest items the prompt shows.")
    prompt_template: str = Field(DEFAULT_PROMPT_TEMPLATE, description="Must contain {history} exactly once.")
    history_item_template: str = Field("{title}", description="How one history item is written ({title}, {item_id}).")
    history_separator: str = Field("\n", description="Between history items.")
    min_history: int = Field(1, ge=1, description="Training targets need at least this many earlier items.")
    max_examples_per_user: int | None = Field(
        None, ge=1, description="Keep only each user's latest training targets (None: all)."
    )

    @field_validator("prompt_template")
    @classmethod
    def _one_history(cls, template: str) -> str:
        if template.count("{history}") != 1:
            raise ValueError("prompt_template must contain {history} exactly once")
        try:
            template.format(history="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt_template may only use the {{history}} placeholder ({err})") from None
        return template

    @field_validator("history_item_template")
    @classmethod
    def _item_fields(cls, template: str) -> str:
        try:
            template.format(title="", item_id="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"history_item_template may only use {{title}} and {{item_id}} ({err})") from None
        return template

    @property
    def completion_anchor(self) -> str:
        """The fixed text that precedes every completion (the template after {history})."""
        return self.prompt_template.split("{history}", 1)[1]


def format_prompt(config: NextItemTaskConfig, history: list[str], titles: dict[str, str]) -> str:
    shown = history[-config.history_length :]
    lines = config.history_separator.join(
        config.history_item_template.format(title=titles[item], item_id=item) for item in shown
    )
    return config.prompt_template.format(history=lines)


def next_item_examples(data: RecData, split: str, config: NextItemTaskConfig) -> Dataset:
    """Rows `prompt`, `completion` (TRL prompt–completion), plus `user_id`, `item_id` (the target) and
    `history` (all earlier item ids, for excluding seen items at evaluation)."""
    from datasets import Dataset

    titles = data.titles
    rows: dict[str, list] = {"prompt": [], "completion": [], "user_id": [], "item_id": [], "history": []}
    for user, sequence in data.user_sequences().items():
        targets = []
        for position, (item, item_split) in enumerate(sequence):
            if item_split != split:
                continue
            history = [earlier for earlier, s in sequence[:position] if split != "train" or s == "train"]
            if len(history) >= (config.min_history if split == "train" else 1):
                targets.append((item, history))
        if split == "train" and config.max_examples_per_user is not None:
            targets = targets[-config.max_examples_per_user :]
        for item, history in targets:
            rows["prompt"].append(format_prompt(config, history, titles))
            rows["completion"].append(titles[item])
            rows["user_id"].append(user)
            rows["item_id"].append(item)
            rows["history"].append(history)
    return Dataset.from_dict(rows)
