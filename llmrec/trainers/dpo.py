"""DPO: TRL's `DPOTrainer` unchanged, the pairwise baseline of the preference stages.

It reads the same `data` section as `softmax_dpo` and `causal_dpo` (J negatives per target), so recipes that
differ only in the trainer compare like for like: pairwise DPO sees each (target, negative) pair as its own row.
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from llmrec.data import PreferenceDataConfig

from . import StageContext, StageSpec
from .preference_stage import build_preference_datasets, reference_model_kwargs


def build_datasets(context: StageContext):
    return build_preference_datasets(context, pairwise=True)


DPO = StageSpec(
    config_class=DPOConfig,
    trainer_class=DPOTrainer,
    build_datasets=build_datasets,
    description="pairwise DPO: the true next item against each negative, one row per negative",
    data_config=PreferenceDataConfig,
    trainer_kwargs=reference_model_kwargs,
)
