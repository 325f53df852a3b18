"""Data: loaders and synthetic worlds -> checks -> filters -> OOD hold-out -> per-user split -> `RecData`, the row
builders that turn `RecData` into training rows (next-item, preference, CTR), and the data of the text tasks with
their sections: text classification (`data.classification`), reasoning problems (`data.reasoning`), preference
summaries (`data.summaries`; may convert `RecData` to behaviours) and instructions (`data.instructions`), from
synthetic worlds generated offline, local files or Hub datasets. Which task uses which section, and how it is
evaluated, is `llmrec.tasks`; data never imports evaluation."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from pydantic import Field

from llmrec.schema import Section

from .classification import ClassificationTaskConfig, classification_examples, classification_tokenizer_texts
from .ctr import CTRTaskConfig, ctr_examples, ctr_tokenizer_texts
from .filters import FilterConfig, apply_filters
from .instructions import InstructionTaskConfig, instruction_tokenizer_texts
from .loaders import AmazonSource, MovieLens1MSource, MovieLens100KSource, RecBoleSource, TableSource
from .preference_summaries import PreferenceSummaryTaskConfig, summaries_tokenizer_texts
from .preferences import PreferenceDataConfig, pairwise_rows, preference_examples
from .reasoning import ReasoningTaskConfig, reasoning_examples, reasoning_tokenizer_texts
from .recdata import RawData, RecData
from .shifts import OOD_SPLITS, ShiftConfig, hold_out, ood_split, popularity_shift_sample
from .splits import SplitConfig, split_interactions
from .synthetic import SyntheticWorldConfig
from .tasks import NextItemTaskConfig, next_item_examples

Source = Annotated[
    SyntheticWorldConfig | MovieLens100KSource | MovieLens1MSource | RecBoleSource | AmazonSource | TableSource,
    Field(discriminator="format"),
]


class DataConfig(Section):
    """`data`: where interactions come from, how they are filtered and split, and the next-item prompt. Each task
    with a section of its own (`data.ctr`, `data.classification`, ...) adds it to the recipe's schema
    (`llmrec.tasks`, `llmrec.recipe.recipe_schema`)."""

    source: Source = Field(default_factory=lambda: SyntheticWorldConfig(format="synthetic"))
    filters: FilterConfig = Field(default_factory=FilterConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    shifts: list[ShiftConfig] = Field(default_factory=list, description="Out-of-distribution test sets to add.")
    task: NextItemTaskConfig = Field(default_factory=NextItemTaskConfig)

    def shift(self, kind: str) -> ShiftConfig | None:
        return next((shift for shift in self.shifts if shift.kind == kind), None)


def load_data(config: DataConfig, seed: int) -> RecData:
    """Load, check, filter and split; raises `LLMRecError` naming the file, column or recipe key at fault."""
    raw = config.source.load(seed)
    checked = RecData.from_raw(raw)
    catalog = checked.catalog_frame
    interactions = apply_filters(checked.interactions_frame, config.filters, catalog)
    catalog = catalog[catalog["item_id"].isin(set(interactions["item_id"]))]
    kept, held = hold_out(interactions, config.shifts)
    interactions = pd.concat([split_interactions(kept, config.split), held]).sort_index(kind="stable")
    return RecData.from_frames(interactions, catalog, raw.name, {"source": raw.interactions_place})


__all__ = [
    "CTRTaskConfig",
    "ClassificationTaskConfig",
    "DataConfig",
    "FilterConfig",
    "InstructionTaskConfig",
    "NextItemTaskConfig",
    "OOD_SPLITS",
    "PreferenceDataConfig",
    "PreferenceSummaryTaskConfig",
    "RawData",
    "ReasoningTaskConfig",
    "RecData",
    "ShiftConfig",
    "SplitConfig",
    "SyntheticWorldConfig",
    "classification_examples",
    "classification_tokenizer_texts",
    "ctr_examples",
    "ctr_tokenizer_texts",
    "instruction_tokenizer_texts",
    "load_data",
    "reasoning_examples",
    "reasoning_tokenizer_texts",
    "summaries_tokenizer_texts",
    "next_item_examples",
    "ood_split",
    "pairwise_rows",
    "popularity_shift_sample",
    "preference_examples",
]
