"""`RecData`: interactions and a catalog, the one data type every llmrec task is built from.

Both tables are `datasets.Dataset`s:

* `interactions`: `user_id` (str), `item_id` (str), `timestamp` (float), and optionally `rating` (float),
  `environment` (int, the exposure environment of the interaction) and `split` ("train", "valid" or "test",
  added by a splitter).
* `catalog`: `item_id` (str), `title` (str), and any attribute columns.

`RecData.from_frames` checks a loader's output once, so everything downstream can rely on it: ids are strings,
every interacted item is in the catalog, titles are non-empty and unique (duplicates get their item id appended,
so a title always names exactly one item), and interactions are ordered by user, then time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger

if TYPE_CHECKING:  # datasets is imported where rows are built: reading a recipe does not need it
    from datasets import Dataset

logger = get_logger(__name__)

REQUIRED_INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
REQUIRED_CATALOG_COLUMNS = ("item_id", "title")


@dataclass
class RawData:
    """A loader's output before checks: two frames and where they came from (for error messages)."""

    interactions: pd.DataFrame
    catalog: pd.DataFrame
    interactions_place: str
    catalog_place: str
    name: str


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...] | list[str], place: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LLMRecError(
            f"column {missing[0]!r} not found; the columns are "
            f"{', '.join(map(str, frame.columns)) or '(none)'}.{hint}",
            place,
        )


@dataclass
class RecData:
    interactions: Dataset
    catalog: Dataset
    name: str = "recdata"
    info: dict = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: RawData) -> RecData:
        inter, catalog = raw.interactions.copy(), raw.catalog.copy()
        require_columns(inter, REQUIRED_INTERACTION_COLUMNS, raw.interactions_place)
        require_columns(catalog, REQUIRED_CATALOG_COLUMNS, raw.catalog_place)
        if inter.empty:
            raise LLMRecError("the interactions table is empty.", raw.interactions_place)
        if catalog.empty:
            raise LLMRecError("the catalog is empty.", raw.catalog_place)

        inter["user_id"] = inter["user_id"].astype(str)
        inter["item_id"] = inter["item_id"].astype(str)
        inter["timestamp"] = _numeric(inter["timestamp"], "timestamp", raw.interactions_place)
        if "rating" in inter.columns:
            inter["rating"] = _numeric(inter["rating"], "rating", raw.interactions_place)
        catalog["item_id"] = catalog["item_id"].astype(str)
        catalog["title"] = catalog["title"].fillna("").astype(str).str.strip()

        duplicated_ids = catalog["item_id"].duplicated()
        if duplicated_ids.any():
            logger.warning(
                f"{raw.catalog_place}: {int(duplicated_ids.sum())} repeated item ids; keeping the first row of each."
            )
            catalog = catalog[~duplicated_ids]
        empty = catalog["title"] == ""
        if empty.any():
            examples = ", ".join(catalog.loc[empty, "item_id"].head(5))
            raise LLMRecError(
                f"{int(empty.sum())} catalog items have an empty title (column 'title'), e.g. item ids {examples}. "
                "Titles are what the model reads and generates; fill them in or drop those items.",
                raw.catalog_place,
            )

        known = set(catalog["item_id"])
        unknown = ~inter["item_id"].isin(known)
        if unknown.any():
            examples = ", ".join(sorted(set(inter.loc[unknown, "item_id"]))[:5])
            raise LLMRecError(
                f"{int(unknown.sum())} interactions name item ids absent from the catalog ({raw.catalog_place}), "
                f"e.g. {examples}. Every interacted item needs a catalog row with its title.",
                raw.interactions_place,
            )

        inter = inter.reset_index(drop=True)
        inter["_order"] = np.arange(len(inter))
        inter = inter.sort_values(["user_id", "timestamp", "_order"], kind="stable").drop(columns="_order")
        catalog = _unique_titles(catalog.reset_index(drop=True))
        return cls.from_frames(inter, catalog, raw.name)

    @classmethod
    def from_frames(cls, interactions: pd.DataFrame, catalog: pd.DataFrame, name: str,
                    info: dict | None = None) -> RecData:
        """Wrap frames that already satisfy the contract (from `from_raw`, a filter or a splitter)."""
        from datasets import Dataset

        return cls(
            Dataset.from_pandas(interactions.reset_index(drop=True), preserve_index=False),
            Dataset.from_pandas(catalog.reset_index(drop=True), preserve_index=False),
            name,
            dict(info or {}),
        )

    @cached_property
    def interactions_frame(self) -> pd.DataFrame:
        return self.interactions.to_pandas()

    @cached_property
    def catalog_frame(self) -> pd.DataFrame:
        return self.catalog.to_pandas()

    @cached_property
    def titles(self) -> dict[str, str]:
        """item_id -> title."""
        return dict(zip(self.catalog["item_id"], self.catalog["title"]))

    @property
    def num_users(self) -> int:
        return int(self.interactions_frame["user_id"].nunique())

    @property
    def num_items(self) -> int:
        return len(self.catalog)

    def popularity(self, split: str | None = "train") -> Counter:
        """Interaction counts per item, over one split (or all interactions with `split=None`)."""
        frame = self.interactions_frame
        if split is not None and "split" in frame.columns:
            frame = frame[frame["split"] == split]
        return Counter(frame["item_id"])

    def user_sequences(self) -> dict[str, list[tuple[str, str]]]:
        """user_id -> [(item_id, split), ...] in time order (split is "" before splitting)."""
        frame = self.interactions_frame
        splits = frame["split"] if "split" in frame.columns else pd.Series([""] * len(frame), index=frame.index)
        sequences: dict[str, list[tuple[str, str]]] = {}
        for user, item, split in zip(frame["user_id"], frame["item_id"], splits):
            sequences.setdefault(user, []).append((item, split))
        return sequences

    def stats(self) -> dict:
        frame = self.interactions_frame
        out = {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": len(frame),
            "density": round(len(frame) / max(1, self.num_users * self.num_items), 6),
        }
        if "split" in frame.columns:
            out.update({f"{s}_interactions": int(n) for s, n in frame["split"].value_counts().sort_index().items()})
        if "environment" in frame.columns:
            out["environments"] = int(frame["environment"].nunique())
        out.update(self.info)
        return out


def _numeric(column: pd.Series, name: str, place: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna() & column.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise LLMRecError(
            f"column {name!r} must hold numbers, but row {row + 1} holds {column.iloc[row]!r}.", place
        )
    return values.astype(float)


def _unique_titles(catalog: pd.DataFrame) -> pd.DataFrame:
    """Append ' [item_id]' to repeated titles, so that generating a title names exactly one item."""
    repeated = catalog["title"].duplicated(keep=False)
    if repeated.any():
        logger.info(f"{int(repeated.sum())} catalog items share a title with another; their item ids were appended.")
        catalog = catalog.copy()
        catalog.loc[repeated, "title"] = catalog.loc[repeated, "title"] + " [" + catalog.loc[repeated, "item_id"] + "]"
    return catalog
