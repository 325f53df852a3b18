"""Interaction filters: a rating threshold for positives, k-core, and minimum interactions per user."""

from __future__ import annotations

import pandas as pd
from pydantic import Field

from llmrec.errors import LLMRecError
from llmrec.schema import Section


class FilterConfig(Section):
    """`data.filters`: applied in this order, before splitting."""

    min_rating: float | None = Field(None, description="Keep interactions rated at least this (the positives).")
    k_core: int | None = Field(None, ge=1, description="Repeatedly drop users and items with fewer interactions.")
    min_user_interactions: int = Field(0, ge=0, description="Then drop users with fewer interactions than this.")


def apply_filters(frame: pd.DataFrame, config: FilterConfig) -> pd.DataFrame:
    before = len(frame)
    if config.min_rating is not None:
        if "rating" not in frame.columns:
            raise LLMRecError("min_rating is set but the interactions have no 'rating' column.",
                              "data.filters.min_rating")
        frame = frame[frame["rating"] >= config.min_rating]
        _require_rows(frame, before, f"min_rating={config.min_rating}", "data.filters.min_rating")
    if config.k_core is not None:
        frame = k_core(frame, config.k_core)
        _require_rows(frame, before, f"k_core={config.k_core}", "data.filters.k_core")
    if config.min_user_interactions:
        counts = frame.groupby("user_id")["item_id"].transform("size")
        frame = frame[counts >= config.min_user_interactions]
        _require_rows(
            frame, before, f"min_user_interactions={config.min_user_interactions}",
            "data.filters.min_user_interactions",
        )
    return frame


def k_core(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """The largest subset in which every user and every item has at least k interactions."""
    while True:
        user_counts = frame.groupby("user_id")["item_id"].transform("size")
        item_counts = frame.groupby("item_id")["user_id"].transform("size")
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return frame
        frame = frame[keep]


def _require_rows(frame: pd.DataFrame, before: int, what: str, place: str) -> None:
    if frame.empty:
        raise LLMRecError(
            f"no interactions are left after filtering with {what} (there were {before} before). "
            "Loosen the filter or check the data.",
            place,
        )
