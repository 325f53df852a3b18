"""Interaction filters: a rating threshold for positives, k-core, minimum interactions per user, and the users of
some genre groups.

`user_genres` keeps the users whose dominant genre is listed: the catalog genre most frequent among the user's
(filtered) interactions, an item with several genres counting once for each, ties going to the genre first in
alphabetical order. It makes per-domain datasets out of one catalog (model merging's multi-domain experts: one
adapter per genre group of ml-100k users, `recipes/merging/domains-tiny.yaml`). The genre column is the catalog's
first of `GENRE_COLUMNS`; genre names compare case-insensitively.
"""

from __future__ import annotations

import pandas as pd
from pydantic import Field

from llmrec.errors import LLMRecError, did_you_mean
from llmrec.schema import Section

# Catalog columns that hold an item's genres, in order of preference (ML-1M: "genres"; RecBole ml-100k: "class";
# the synthetic world: "genre").
GENRE_COLUMNS = ("genres", "genre", "class", "categories", "category")


def genre_words(value: object) -> list[str]:
    """An item's genres, lowercased: ML-1M separates them with '|', RecBole token sequences with spaces."""
    text = "" if pd.isna(value) else str(value)
    separator = "|" if "|" in text else "," if "," in text else None
    return [word.strip().lower() for word in text.split(separator) if word.strip()]


class FilterConfig(Section):
    """`data.filters`: applied in this order, before splitting."""

    min_rating: float | None = Field(None, description="Keep interactions rated at least this (the positives).")
    k_core: int | None = Field(None, ge=1, description="Repeatedly drop users and items with fewer interactions.")
    min_user_interactions: int = Field(0, ge=0, description="Then drop users with fewer interactions than this.")
    user_genres: list[str] | None = Field(
        None, min_length=1, description="Then keep only the users whose dominant genre (the catalog genre most "
        "frequent among their interactions) is one of these, e.g. [comedy]: one domain of a multi-domain dataset."
    )


def apply_filters(frame: pd.DataFrame, config: FilterConfig, catalog: pd.DataFrame | None = None) -> pd.DataFrame:
    """`frame` filtered by `config`; `catalog` (item_id and a genre column) is needed by `user_genres` only."""
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
    if config.user_genres:
        frame = frame[frame["user_id"].isin(users_of_genres(frame, catalog, config.user_genres))]
        _require_rows(frame, before, f"user_genres={config.user_genres}", "data.filters.user_genres")
    return frame


def users_of_genres(frame: pd.DataFrame, catalog: pd.DataFrame | None, wanted: list[str]) -> set:
    """The users of `frame` whose dominant genre (see the module docstring) is in `wanted`; an unknown genre is
    refused with the known ones."""
    column = next((c for c in GENRE_COLUMNS if catalog is not None and c in catalog.columns), None)
    if column is None:
        raise LLMRecError(f"user_genres needs the catalog's genres, and the catalog has none of the columns "
                          f"{', '.join(GENRE_COLUMNS)}. Remove the filter or use data with item genres.",
                          "data.filters.user_genres")
    genres = catalog.set_index("item_id")[column].map(genre_words).rename("genre")
    known = sorted({g for words in genres for g in words})
    for name in wanted:
        if name.lower() not in known:
            raise LLMRecError(f"user_genres: no item has the genre {name!r}. The catalog's genres are "
                              f"{', '.join(known)}.{did_you_mean(name.lower(), known)}", "data.filters.user_genres")
    exploded = frame[["user_id", "item_id"]].join(genres, on="item_id").explode("genre").dropna(subset=["genre"])
    counts = exploded.groupby(["user_id", "genre"]).size().reset_index(name="count")
    counts = counts.sort_values(["user_id", "count", "genre"], ascending=[True, False, True], kind="stable")
    dominant = counts.drop_duplicates("user_id").set_index("user_id")["genre"]
    return set(dominant.index[dominant.isin({name.lower() for name in wanted})])


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
