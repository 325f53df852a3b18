"""Adapters: how a base model becomes trainable, and how the trained part is saved and reloaded.

Each method is one registry line below, pointing at an object with:

* `config_class`: the dataclass whose fields `adapter.args` may set (validated like TRL configs), or None when
  the method takes no arguments;
* `attach(model, args, context) -> model`: wrap a freshly loaded base model for training (`context`, an
  `AdapterContext`, gives the recipe, the data and the run directory to methods that build something from the data,
  such as CoRA's CF model);
* `load(model, path, trainable) -> model`: wrap a base model with weights saved by `save`;
* `save(model, path)`: write the trained part (safetensors) so that `load` restores it exactly.

Methods with their own layers live in `adapters/<method>/` (config.py, model.py, layer.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrec.errors import LLMRecError, did_you_mean

ADAPTERS: dict[str, str] = {
    "lora": "llmrec.adapters.stock:LORA",
    "cora": "llmrec.adapters.cora:CORA",
    "fedlora": "llmrec.adapters.fedlora:FEDLORA",
    "ept": "llmrec.adapters.ept:EPT",
    "lamp": "llmrec.adapters.lamp:LAMP",
    "prompt_tuning": "llmrec.adapters.stock:PROMPT_TUNING",
    "none": "llmrec.adapters.stock:FULL_FINE_TUNING",
}


@dataclass
class AdapterContext:
    recipe: Any
    data: Any
    workdir: Path


def get_adapter(method: str, key: str = "adapter.method"):
    if method not in ADAPTERS:
        raise LLMRecError(
            f"unknown adapter method {method!r}; the methods are {', '.join(ADAPTERS)}."
            f"{did_you_mean(method, ADAPTERS)}",
            key,
        )
    module, attr = ADAPTERS[method].split(":")
    return getattr(importlib.import_module(module), attr)
