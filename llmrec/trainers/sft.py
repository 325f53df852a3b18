"""SFT: TRL's `SFTTrainer` unchanged, trained on the recipe's task's prompt–completion rows.

The task (`eval.task`, `llmrec.tasks`) decides what the rows are: next-item examples (BIGRec-style) for ranking,
prompt -> Yes/No for CTR, prompt -> label word for classification, worked solutions for reasoning, instruction
rows for instructions (the training share of the centralised split; federated clients build their own rows).

The loss covers the completion only (TRL's default for prompt–completion data): the model learns to write the
completion, then EOS, given the prompt; for classification, the class's label word, whose first token's logit
`eval.task: classification` then compares.

Multi-task training (`stages[i].data.tasks`, e.g. `[ctr]` in a ranking recipe): the listed tasks' training rows,
built from the same data and split with their own recipe sections (`data.ctr`, ...), join the recipe's task's rows
and are shuffled together (seeded), so every batch mixes the tasks in proportion to their row counts; validation
stays on the recipe's own task. This is the multi-task reference of model merging: one adapter trained on both
datasets instead of two merged experts.
"""

from __future__ import annotations

from typing import ClassVar

from datasets import concatenate_datasets
from pydantic import Field, field_validator
from trl import SFTConfig, SFTTrainer

from llmrec.logs import get_logger
from llmrec.schema import Section
from llmrec.tasks import TASKS, get_task, task_of

from . import StageContext, StageSpec

logger = get_logger(__name__)


class SFTStageData(Section):
    """`stages[i].data` of `trainer: sft` (optional: left out of the resolved recipe while it lists no task)."""

    omitted_when_default: ClassVar[bool] = True

    tasks: list[str] = Field(
        default_factory=list, description="Other tasks whose training rows join the recipe's task's rows, shuffled "
        "together (multi-task training), e.g. [ctr] in a ranking recipe; each reads its own data section."
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        for name in tasks:
            get_task(name, "tasks")  # an unknown name is refused with the known ones
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a task is listed twice: {tasks}")
        return tasks


def build_datasets(context: StageContext):
    """The task's rows of the train split (and the other tasks' of `data.tasks`, shuffled in), and the task's rows
    of the valid split for evaluation during training."""
    task = task_of(context.recipe)
    columns = ["prompt", "completion"]
    train = task.rows(context.data, "train", "sft").select_columns(columns)
    others = context.data_config.tasks if context.data_config else []
    if others:
        parts = [get_task(name)(context.recipe).rows(context.data, "train", "sft").select_columns(columns)
                 for name in others]
        logger.info("multi-task rows: " + ", ".join(f"{name} {len(rows):,}" for name, rows in
                                                   zip([task.name, *others], [train, *parts])))
        train = concatenate_datasets([train, *parts]).shuffle(seed=context.recipe.run.seed)
    valid = task.rows(context.data, "valid", "sft").select_columns(columns) if context.wants_eval else None
    return train, valid


def recipe_needs(recipe) -> list[tuple[tuple, str]]:
    """The recipe's task is not listed again, and every listed task with a data section has it in the recipe."""
    needs = []
    for index, stage in enumerate(recipe.stages):
        if stage.trainer != "sft" or not stage.data:
            continue
        for name in stage.data.get("tasks", []):
            if name == recipe.eval.task:
                needs.append((("stages", index, "data", "tasks"), f"{name!r} is the recipe's own task (eval.task); "
                               "list only the other tasks whose rows join it."))
            elif name in TASKS and (other := get_task(name)).section and getattr(recipe.data, other.section) is None:
                needs.append((("stages", index, "data", "tasks"), f"the {name} rows need a data.{other.section} "
                               f"section ({other.section_holds})."))
    return needs


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
    data_config=SFTStageData,
    recipe_needs=recipe_needs,
)
