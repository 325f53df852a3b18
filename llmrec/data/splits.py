"""Per-user splits into train / valid / test, written as a `split` column on the interactions.

* `leave_one_out`: each user's last interaction is the test target, the one before it the validation target,
  the rest is training. Users with fewer than three interactions stay entirely in training.
* `temporal`: each user's latest `test_fraction` of interactions (at least one) is test, the `valid_fraction`
  before it validation, the rest training. Users with fewer than three interactions stay in training.

Evaluation uses every test interaction as a target, with all of the user's earlier interactions as history.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from llmrec.errors import LLMRecError
from llmrec.schema import Section


class SplitConfig(Section):
    """`data.split`."""

    method: Literal["leave_one_out", "temporal"] = "leave_one_out"
    test_fraction: float = Field(0.2, gt=0, lt=1, description="temporal: share of each user's latest interactions.")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="temporal: share just before the test part.")

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.test_fraction + self.valid_fraction >= 1:
            raise ValueError("test_fraction + valid_fraction must be below 1")
        return self


def split_interactions(frame: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Add the `split` column; `frame` must be ordered by user, then time."""
    position = frame.groupby("user_id", sort=False).cumcount().to_numpy()
    length = frame.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    from_end = length - position  # 1 for the user's last interaction
    if config.method == "leave_one_out":
        n_test = np.ones_like(length)
        n_valid = np.ones_like(length)
    else:
        n_test = np.maximum(1, np.ceil(length * config.test_fraction).astype(int))
        n_valid = np.floor(length * config.valid_fraction).astype(int)
        n_valid = np.where((config.valid_fraction > 0) & (n_valid == 0), 1, n_valid)
    n_test = np.minimum(n_test, length - 1)
    n_valid = np.minimum(n_valid, length - 1 - n_test)
    short = length < 3
    split = np.where(from_end <= n_test, "test", np.where(from_end <= n_test + n_valid, "valid", "train"))
    split = np.where(short, "train", split)
    frame = frame.assign(split=split)
    if not (frame["split"] == "test").any():
        raise LLMRecError(
            "the split left no test interactions: every user has fewer than 3 interactions. "
            "Lower data.filters or use more data.",
            "data.split",
        )
    return frame


def describe_split(config: SplitConfig) -> str:
    if config.method == "leave_one_out":
        return "leave-one-out (last interaction per user = test, the one before = valid)"
    return (
        f"temporal (latest {math.ceil(config.test_fraction * 100)}% per user = test, "
        f"{math.ceil(config.valid_fraction * 100)}% before = valid)"
    )
