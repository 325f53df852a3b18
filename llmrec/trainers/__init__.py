"""Training stages: a TRL config class, a TRL trainer class, and the datasets the stage trains on.

Each method is one registry line below, pointing at a `StageSpec` in `trainers/<method>.py`. A recipe stage's
`args` are validated against `config_class`, so every option of the TRL config works in a recipe. A stage trains
either on its task's rows of one kind (`task_rows`: the `sft` stage asks `llmrec.tasks` for "sft" rows, whatever
the task) or on rows it builds from the data section it declares in `recipe_needs` (CTR, preference, RL stages).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmrec.errors import LLMRecError, did_you_mean

TRAINERS: dict[str, str] = {
    "sft": "llmrec.trainers.sft:SFT",
    "dpo": "llmrec.trainers.dpo:DPO",
    "softmax_dpo": "llmrec.trainers.softmax_dpo:SOFTMAX_DPO",
    "causal_dpo": "llmrec.trainers.causal_dpo:CAUSAL_DPO",
    "ctr": "llmrec.trainers.ctr:CTR",
    "echo": "llmrec.trainers.echo:ECHO",
    "alignxplore_sft": "llmrec.trainers.alignxplore:ALIGNXPLORE_SFT",
    "alignxplore": "llmrec.trainers.alignxplore:ALIGNXPLORE",
}


@dataclass
class StageContext:
    """What a stage's dataset builder and trainer arguments may use."""

    recipe: Any  # llmrec.recipe.Recipe
    data: Any  # llmrec.data.RecData
    model: Any
    tokenizer: Any
    index: int
    wants_eval: bool
    data_config: Any = None  # the stage's `data` section, validated against StageSpec.data_config
    model_source: str = ""  # where the model at the start of this stage was loaded from (a folder or a Hub id)
    args: Any = None  # the stage's config object (the trainer's `args`)


def _no_kwargs(context: StageContext) -> dict:
    return {}


def _needs_nothing(recipe) -> list[tuple[tuple, str]]:
    return []


@dataclass(frozen=True)
class StageSpec:
    config_class: type
    trainer_class: type
    # (train, eval or None) datasets.Dataset of the stage
    build_datasets: Callable[[StageContext], tuple[Any, Any]]
    description: str
    # the pydantic section that validates the stage's `data` (None: the stage takes no `data` section)
    data_config: type | None = None
    # llmrec passes the model as built by the adapter; methods that need extra trainer arguments add them here
    trainer_kwargs: Callable[[StageContext], dict] = _no_kwargs
    # (recipe key path, message) for each thing the stage needs elsewhere in the recipe (checked at load time)
    recipe_needs: Callable[[Any], list[tuple[tuple, str]]] = _needs_nothing
    # the kind of rows the stage asks the recipe's task for (`Task.rows`); None: it builds its own
    task_rows: str | None = None


def get_stage(name: str, key: str) -> StageSpec:
    if name not in TRAINERS:
        raise LLMRecError(
            f"unknown trainer {name!r}; the trainers are {', '.join(TRAINERS)}.{did_you_mean(name, TRAINERS)}", key
        )
    module, attr = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), attr)
