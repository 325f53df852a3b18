"""Tasks: what a run's model is trained to do and how it is measured, one module per task.

A task is named by a recipe's `eval.task` (`ranking` by default) and keeps together everything that depends on it:

- its data section `data.<section>` (a `Section` class the recipe schema picks up from here) and what it needs
  from the rest of the recipe, reported with file:line when the recipe loads (`needs`);
- its rows per split and stage kind (`rows`; the `sft` stage trains on `rows(data, split, "sft")`);
- the texts a `tiny:` model's tokenizer is trained on (`template_texts`, `text_rows`);
- `evaluate(model, tokenizer, data, split) -> (metrics, predictions)` with the metric keys its module documents
  (named by `llmrec.eval.keys`) and its baselines;
- its rows in the console summary (`summary`), the model card (`card_*`) and curves.png (`plot`);
- its `llmrec data stats` lines (`stats`).

`run.py`, `cli.py`, `publish/card.py`, the recipe schema and the trainers ask the recipe's task; none of them
branches on a task's name. A new task is one module with a `Task` subclass and one line in `TASKS` (an entry may
also be the class itself, e.g. registered by a test or a plugin).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from typing import Any, ClassVar

from llmrec.errors import LLMRecError, did_you_mean
from llmrec.eval.keys import SPLIT_NAMES

TASKS: dict[str, Any] = {
    "ranking": "llmrec.tasks.ranking:RankingTask",
    "ctr": "llmrec.tasks.ctr:CTRTask",
    "reasoning": "llmrec.tasks.reasoning:ReasoningTask",
    "preference_summary": "llmrec.tasks.preference_summary:PreferenceSummaryTask",
    "instructions": "llmrec.tasks.instructions:InstructionTask",
    "classification": "llmrec.tasks.classification:ClassificationTask",
}

ALL_SPLITS = tuple(split for split in SPLIT_NAMES if split != "train")  # what a task evaluates unless it says

# (recipe key path, message): what a part of the recipe needs elsewhere in it, reported at load time
Need = tuple[tuple, str]


class Task(abc.ABC):
    """One task: its data section, rows, tokenizer texts, evaluation and reports. `recipe` is a loaded recipe."""

    name: ClassVar[str]
    description: ClassVar[str]  # what the evaluation measures, one line (recipe docs and errors)
    section: ClassVar[str | None] = None  # the data.<section> this task owns (None: it needs none)
    section_class: ClassVar[type | None] = None  # the Section class of data.<section>
    section_help: ClassVar[str] = ""  # the section's description in the recipe schema
    section_holds: ClassVar[str] = ""  # what the section holds, for "needs a data.<section> section (...)"
    section_trains: ClassVar[str] = "the stages train on that task"  # what a present section means for training
    splits: ClassVar[tuple[str, ...]] = ALL_SPLITS  # the evaluation splits the task has
    row_kinds: ClassVar[tuple[str, ...]] = ("sft",)  # the stage kinds `rows` serves
    uses_interactions: ClassVar[bool] = True  # whether `stats` reads the recipe's interactions (RecData)
    headline: ClassVar[str] = ""  # the metric whose key `<split>/<headline>` marks a split as evaluated
    card_tag: ClassVar[str] = "recommendation"
    card_intro: ClassVar[str] = ""

    def __init__(self, recipe):
        self.recipe = recipe
        # eval.engine: vllm: ranks (tokenizer, trie, prompts, excluded, beams) on the run's engine; set by the layer
        # that knows the run (llmrec.run.evaluation_task)
        self.engine_ranker = None

    @property
    def config(self):
        """The task's data section (None when the task has none or the recipe leaves it out)."""
        return getattr(self.recipe.data, self.section) if self.section else None

    # --- the recipe ----------------------------------------------------------------------------------------------

    def needs(self) -> list[Need]:
        """What the task needs from the recipe: its section, and evaluation splits it has."""
        needs: list[Need] = []
        if self.section and self.config is None:
            needs.append((("eval", "task"), f"the {self.name} evaluation needs a data.{self.section} section "
                          f"({self.section_holds})."))
        others = [split for split in self.recipe.eval.splits if split not in self.splits]
        if others:
            has = f"{' and '.join(self.splits)} split{'s' if len(self.splits) > 1 else ''}"
            needs.append((("eval", "splits"), f"a {self.name} task has {has} only, not {others[0]!r}."))
        return needs

    # --- rows ----------------------------------------------------------------------------------------------------

    def rows(self, data, split: str, kind: str):
        """The `datasets.Dataset` a stage of `kind` trains (split 'train') or validates on; for kind 'sft', TRL's
        prompt–completion rows (`prompt`, `completion`, and columns of the task's own)."""
        raise LLMRecError(f"the {self.name} task has no rows for {kind} stages (it has {', '.join(self.row_kinds)}).",
                          "stages")

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer the task cannot be scored with, before any training (e.g. label words that start with
        the same token)."""

    def template_texts(self) -> list[str]:
        """The task's fixed prompt texts; a tiny tokenizer sees them many times, so their words become whole tokens."""
        return []

    def text_rows(self, data) -> list[str]:
        """Texts of the task's rows a tiny tokenizer is trained on (besides the catalog's titles)."""
        return []

    # --- evaluation ----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        """(metrics keyed `<split>/<metric>` and `baseline/...`, one prediction row per evaluated example)."""

    def recommend(self, model, tokenizer, data, k: int, user: str | None = None,
                  history: list[str] | None = None, llm=None, lora_request=None) -> dict:
        """The top-k items for a user of the run or for a history of items (tasks that rank items), ranked by the
        model or by a vLLM engine (`llm`, with the run's adapter as `lora_request`):
        {"user", "history": [{"item_id", "title"}], "ranked": [{"rank", "item_id", "title", "logprob"}]}."""
        raise LLMRecError(f"this run is evaluated on eval.task: {self.name}, it does not rank items; use `llmrec "
                          "eval`.", "eval.task")

    def unlabelled_answers(self, tokenizer, data, split: str) -> tuple[list[str], tuple[int, ...]]:
        """(prompts, answer token ids) for label-free objectives such as AdaMerging's entropy: the split's prompts
        without their labels, and the tokens an answer can start with. Tasks without a closed set of answers
        raise."""
        raise LLMRecError(f"eval.task {self.name} has no closed set of answers, so AdaMerging has no answer "
                          "distribution to sharpen; use a static merging method.", "eval.task")

    # --- reports -------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def summary(self, metrics: dict, splits: list[str]) -> str:
        """The console table(s) of the model and its baselines, one per evaluated split."""

    @abc.abstractmethod
    def card_results(self, metrics: dict) -> str:
        """The model card's results section(s), Markdown."""

    def card_data(self, data) -> str:
        """The model card's data line, Markdown."""
        return f"- **Data:** data.{self.section}." if self.section else "- **Data:** the recipe's interactions."

    def card_notes(self, run_path) -> str:
        """How to read the metrics, and how to use the run (Markdown, ending with a `## Use` section)."""
        return f"## Use\n\n```bash\nllmrec eval {run_path}\n```"

    def evaluated(self, metrics: dict, splits=ALL_SPLITS) -> list[str]:
        """The splits among `splits` that `metrics` hold results of (their `<split>/<headline>` key), in order."""
        return [split for split in splits if f"{split}/{self.headline}" in metrics]

    def plot_splits(self, metrics: dict) -> list[str]:
        """The splits curves.png has a panel for, in display order."""
        return self.evaluated(metrics)

    def plot(self, axis, metrics: dict, split: str) -> None:
        """Draw the task's metrics on `split` against its baselines into a matplotlib axis."""

    def stats(self, data) -> list[str]:
        """`llmrec data stats` lines: counts per split and an example; `data` is the loaded RecData when
        `uses_interactions`, else None."""
        return []


def example_text(row: dict, what: str = "example") -> str:
    """A row's prompt and completion, for `llmrec data stats`."""
    return f"\n{what} prompt:\n{row['prompt']}\n{what} completion:\n{row['completion']}"


def get_task(name: str, key: str = "eval.task") -> type[Task]:
    if name not in TASKS:
        raise LLMRecError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}.{did_you_mean(name, TASKS)}", key)
    entry = TASKS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def task_of(recipe) -> Task:
    """The task a recipe trains and evaluates (its `eval.task`)."""
    return get_task(recipe.eval.task)(recipe)


def registered_tasks() -> list[type[Task]]:
    return [get_task(name) for name in TASKS]


def present_tasks(recipe) -> list[Task]:
    """The recipe's task, and every task whose data section it has (a federated recipe's instructions), in
    registry order."""
    return [task(recipe) for task in registered_tasks()
            if task.name == recipe.eval.task or (task.section and getattr(recipe.data, task.section) is not None)]


def tokenizer_texts(recipe, data) -> Callable[[], list[str]]:
    """What a tiny model's tokenizer is trained on (called only when one is built): the catalog's titles, the fixed
    prompt texts repeated so their words become whole tokens (the next-item template always, since preference stages
    and federated user groups prompt with it), and the rows of the recipe's tasks."""
    template = recipe.data.task
    fixed = [template.prompt_template.replace("{history}", template.history_separator.join(["{title}"] * 2))]

    def texts() -> list[str]:
        tasks = present_tasks(recipe)
        fixed_texts = fixed + [text for task in tasks for text in task.template_texts()]
        rows = [text for task in tasks for text in task.text_rows(data)]
        return [*data.titles.values(), *(fixed_texts * 200), *rows]

    return texts


__all__ = ["TASKS", "Task", "example_text", "get_task", "present_tasks", "registered_tasks", "task_of",
           "tokenizer_texts"]
