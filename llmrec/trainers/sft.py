"""SFT: TRL's `SFTTrainer` unchanged, trained on next-item prompt–completion examples (BIGRec-style).

The loss covers the completion only (TRL's default for prompt–completion data): the model learns to write the
next item's title, then EOS, given the history.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from llmrec.data import next_item_examples

from . import StageContext, StageSpec


def build_datasets(context: StageContext):
    task = context.recipe.data.task
    train = next_item_examples(context.data, "train", task).select_columns(["prompt", "completion"])
    valid = None
    if context.wants_eval:
        valid = next_item_examples(context.data, "valid", task).select_columns(["prompt", "completion"])
    return train, valid


def trainer_kwargs(context: StageContext) -> dict:
    # prompt adapters (EPT/DePT) train their prompt and low-rank factors at different learning rates
    groups = getattr(context.model, "optimizer_cls_and_kwargs", None)
    return {"optimizer_cls_and_kwargs": groups(context.args)} if groups else {}


SFT = StageSpec(
    config_class=SFTConfig,
    trainer_class=SFTTrainer,
    build_datasets=build_datasets,
    description="supervised fine-tuning on next-item prompt-completion pairs",
    trainer_kwargs=trainer_kwargs,
)
