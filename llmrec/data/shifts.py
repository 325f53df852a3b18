"""Distribution-shift test sets: out-of-distribution test splits beside the usual one.

`data.shifts` lists the shifts of a run; each adds the split `ood_<kind>`:

* `popularity`: the OOD targets are the test targets re-sampled (without replacement) with probability
  proportional to `popularity(item) ** -power`, training popularity; `size` of them (default: half the test
  targets). The test set keeps its own targets; the OOD set over-represents unpopular ones.
* `temporal`: each user's latest `fraction` of interactions (at least one) is the OOD test set, every one of them a
  target with all earlier interactions as history; the leave-one-out / temporal split then runs on the rest.
* `environment`: users of the `ood_environments` are held out entirely; their last interaction is an OOD target and
  the rest is history only (split "context", never trained on). With a synthetic world whose exposure follows
  popularity in the training environment and not in the test one, this is the exposure shift of the method file.

The popularity shift is drawn at evaluation time (it only re-weights test targets) and combines with either of the
others; the temporal and environment shifts label interactions before splitting, so training never sees them, and
a run takes at most one of the two.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from llmrec.errors import LLMRecError
from llmrec.schema import Section

CONTEXT_SPLIT = "context"
SHIFT_KINDS = ("popularity", "temporal", "environment")
OOD_SPLITS = tuple(f"ood_{kind}" for kind in SHIFT_KINDS)


class PopularityShift(Section):
    kind: Literal["popularity"]
    power: float = Field(1.0, gt=0, description="Targets are drawn with weight popularity ** -power.")
    size: int | None = Field(None, ge=1, description="Number of OOD targets (default: half the test targets).")


class TemporalShift(Section):
    kind: Literal["temporal"]
    fraction: float = Field(0.2, gt=0, lt=1, description="Each user's latest share of interactions.")


class EnvironmentShift(Section):
    kind: Literal["environment"]
    ood_environments: list[int] = Field(default_factory=lambda: [1], min_length=1, description="The held-out ones.")


ShiftConfig = Annotated[PopularityShift | TemporalShift | EnvironmentShift, Field(discriminator="kind")]


def ood_split(kind: str) -> str:
    return f"ood_{kind}"


def hold_out(frame: pd.DataFrame, shifts: list[ShiftConfig]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, held): interactions held out as OOD before the usual split; `held` carries its `split` labels."""
    holding = [shift for shift in shifts if shift.kind != "popularity"]
    if len(holding) > 1:
        raise LLMRecError("a run takes at most one temporal or environment shift.", "data.shifts")
    if not holding:
        return frame, frame.iloc[0:0].assign(split=pd.Series(dtype=str))
    config = holding[0]
    label = ood_split(config.kind)
    if config.kind == "temporal":
        position = frame.groupby("user_id", sort=False).cumcount().to_numpy()
        length = frame.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
        n_ood = np.maximum(1, np.ceil(length * config.fraction).astype(int))
        ood = (length - position <= n_ood) & (length >= 4)
        held = frame[ood].assign(split=label)
        kept = frame[~ood]
    else:
        if "environment" not in frame.columns:
            raise LLMRecError("an environment shift needs an 'environment' column in the interactions.", "data.shifts")
        held_users = frame["environment"].isin(config.ood_environments)
        if not held_users.any() or held_users.all():
            raise LLMRecError(
                f"environments {config.ood_environments} hold {'no' if not held_users.any() else 'every'} user; "
                f"the data have environments {sorted(frame['environment'].unique().tolist())}.",
                "data.shifts.ood_environments",
            )
        held = frame[held_users]
        last = held.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy() == 0
        held = held.assign(split=np.where(last, label, CONTEXT_SPLIT))
        kept = frame[~held_users]
    if held.empty or not (held["split"] == label).any():
        raise LLMRecError("the shift left no out-of-distribution interactions; users need at least 4 interactions.",
                          "data.shifts")
    return kept, held


def popularity_shift_sample(items: list[str], counts: Counter, config: PopularityShift, seed: int) -> list[int]:
    """Indices of the test targets (whose items are `items`) drawn into the popularity-shift OOD set."""
    weights = np.array([math.pow(max(counts.get(item, 0), 1), -config.power) for item in items])
    size = min(len(items), config.size or max(1, len(items) // 2))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(items), size=size, replace=False, p=weights / weights.sum()).tolist())
