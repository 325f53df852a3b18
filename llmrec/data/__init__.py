"""Recommendation data: loaders and synthetic worlds -> filters -> checks -> per-user split -> `RecData`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmrec.schema import Section

from .filters import FilterConfig, apply_filters
from .loaders import AmazonSource, MovieLens1MSource, MovieLens100KSource, RecBoleSource, TableSource
from .recdata import RawData, RecData
from .splits import SplitConfig, split_interactions
from .synthetic import SyntheticWorldConfig
from .tasks import NextItemTaskConfig, next_item_examples

Source = Annotated[
    SyntheticWorldConfig | MovieLens100KSource | MovieLens1MSource | RecBoleSource | AmazonSource | TableSource,
    Field(discriminator="format"),
]


class DataConfig(Section):
    """`data`: where interactions come from and how they become tasks."""

    source: Source = Field(default_factory=lambda: SyntheticWorldConfig(format="synthetic"))
    filters: FilterConfig = Field(default_factory=FilterConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    task: NextItemTaskConfig = Field(default_factory=NextItemTaskConfig)


def load_data(config: DataConfig, seed: int) -> RecData:
    """Load, check, filter and split; raises `LLMRecError` naming the file, column or recipe key at fault."""
    raw = config.source.load(seed)
    checked = RecData.from_raw(raw)
    interactions = apply_filters(checked.interactions_frame, config.filters)
    catalog = checked.catalog_frame
    catalog = catalog[catalog["item_id"].isin(set(interactions["item_id"]))]
    interactions = split_interactions(interactions, config.split)
    return RecData.from_frames(interactions, catalog, raw.name, {"source": raw.interactions_place})


__all__ = [
    "DataConfig",
    "FilterConfig",
    "NextItemTaskConfig",
    "RawData",
    "RecData",
    "SplitConfig",
    "SyntheticWorldConfig",
    "load_data",
    "next_item_examples",
]
