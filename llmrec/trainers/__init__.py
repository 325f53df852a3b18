"""Training stages: a TRL config class, a TRL trainer class, and the datasets the stage trains on.

Each method is one registry line below, pointing at a `StageSpec` in `trainers/<method>.py`. A recipe stage's
`args` are validated against `config_class`, so every option of the TRL config works in a recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmrec.errors import LLMRecError, did_you_mean

if TYPE_CHECKING:
    from datasets import Dataset

    from llmrec.data import RecData
    from llmrec.recipe import Recipe

TRAINERS: dict[str, str] = {
    "sft": "llmrec.trainers.sft:SFT",
}


@dataclass
class StageContext:
    """What a stage's dataset builder may use."""

    recipe: Recipe
    data: RecData
    tokenizer: Any
    index: int
    wants_eval: bool


@dataclass(frozen=True)
class StageSpec:
    config_class: type
    trainer_class: type
    build_datasets: Callable[[StageContext], tuple[Dataset, Dataset | None]]
    description: str
    # llmrec passes the model as built by the adapter; methods that need extra trainer arguments add them here.
    trainer_kwargs: Callable[[StageContext], dict] = lambda context: {}


def get_stage(name: str, key: str) -> StageSpec:
    if name not in TRAINERS:
        raise LLMRecError(
            f"unknown trainer {name!r}; the trainers are {', '.join(TRAINERS)}.{did_you_mean(name, TRAINERS)}", key
        )
    module, attr = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), attr)
