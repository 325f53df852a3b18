"""SFT: TRL's `SFTTrainer` unchanged, trained on the recipe's task's prompt–completion rows.

The task (`eval.task`, `llmrec.tasks`) decides what the rows are: next-item examples (BIGRec-style) for ranking,
prompt -> Yes/No for CTR, prompt -> label word for classification, worked solutions for reasoning, instruction
rows for instructions (the training share of the centralised split; federated clients build their own rows).

The loss covers the completion only (TRL's default for prompt–completion data): the model learns to write the
completion, then EOS, given the prompt; for classification, the class's label word, whose first token's logit
`eval.task: classification` then compares.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from llmrec.tasks import task_of

from . import StageContext, StageSpec


def build_datasets(context: StageContext):
    """The task's rows of the train split, and of the valid split for evaluation during training."""
    task = task_of(context.recipe)
    columns = ["prompt", "completion"]
    train = task.rows(context.data, "train", "sft").select_columns(columns)
    valid = task.rows(context.data, "valid", "sft").select_columns(columns) if context.wants_eval else None
    return train, valid


def trainer_kwargs(context: StageContext) -> dict:
    # prompt adapters (EPT/DePT) train their prompt and low-rank factors at different learning rates
    groups = getattr(context.model, "optimizer_cls_and_kwargs", None)
    return {"optimizer_cls_and_kwargs": groups(context.args)} if groups else {}


SFT = StageSpec(
    config_class=SFTConfig,
    trainer_class=SFTTrainer,
    build_datasets=build_datasets,
    description="supervised fine-tuning on the task's prompt-completion rows",
    trainer_kwargs=trainer_kwargs,
    task_rows="sft",
)
