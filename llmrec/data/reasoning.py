"""Reasoning problems with short final answers: a seeded synthetic arithmetic world, and GSM8K / MATH-500 / AIME.

A row is a prompt (the recipe's `prompt_template` with the question filled in), a completion (a worked solution that
ends in "#### <answer>", which SFT trains on), the normalised final answer `answer` (what evaluation compares with;
test-time RL never reads it) and a difficulty `level`.

The arithmetic world (`source: arithmetic`) writes word problems such as "Ada has 12 coins. She finds 7 more and
then gives away 3. How many coins does Ada have now?" whose solution is one line per operation ("12 + 7 = 19.
19 - 3 = 16. #### 16"). The level is the number of operations (1-4); operands are drawn from 1..max_operand and
subtractions never go below zero, so every answer is a non-negative integer. Each split's levels are balanced, and
questions are unique across train, valid and test, so test questions are never trained on. Deterministic for
(config, seed). With `solution_order: any` a solution applies the operations in an order drawn among those whose
running value never goes below zero ("12 - 3 = 9. 9 + 7 = 16." as well as "12 + 7 = 19. 19 - 3 = 16."), so
problems of two or more operations have several correct solution paths, and a model trained on them hesitates
between valid next steps, not only between digits (a world in which a tree rollout's forks explore real
alternatives).

Hub sources load through `datasets.load_dataset` (downloaded and cached on first use, or read from `path`, a local
file or folder): `gsm8k` (openai/gsm8k, solution in `answer` ending "#### N"), `math500` (HuggingFaceH4/MATH-500:
problem, solution, answer) and `aime` (HuggingFaceH4/aime_2024: problem, answer; test only). `jsonl` reads a local
JSON Lines file with `question_field` and `answer_field` (and optionally `solution_field`). Test-time RL trains on
the test split's questions, as the method does; `train_size`, `valid_size` and `test_size` cap each split by a
seeded sample (null: all rows).
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from pydantic import Field, field_validator

from llmrec.errors import LLMRecError
from llmrec.schema import Section

from .loaders import iter_jsonl

if TYPE_CHECKING:  # datasets is imported where rows are built: reading a recipe does not need it
    from datasets import Dataset

COLUMNS = {"prompt": "string", "completion": "string", "answer": "string", "level": "int64"}
SPLITS = ("train", "valid", "test")


class _HubSource(NamedTuple):
    dataset: str
    config: str | None
    splits: dict[str, str]  # our split -> the dataset's split
    question: str
    answer: str
    solution: str | None


HUB_SOURCES = {
    "gsm8k": _HubSource("openai/gsm8k", "main", {"train": "train", "test": "test"}, "question", "answer", "answer"),
    "math500": _HubSource("HuggingFaceH4/MATH-500", None, {"test": "test"}, "problem", "answer", "solution"),
    "aime": _HubSource("HuggingFaceH4/aime_2024", None, {"test": "train"}, "problem", "answer", None),
}


class ReasoningTaskConfig(Section):
    """`data.reasoning`: problems with a final answer, for SFT, test-time RL and accuracy evaluation."""

    source: Literal["arithmetic", "gsm8k", "math500", "aime", "jsonl"] = Field(
        "arithmetic", description="'arithmetic' (synthetic, offline), a Hub dataset, or a local 'jsonl' file."
    )
    train_size: int | None = Field(3000, ge=0, description="Rows in train (arithmetic), or a cap (null: all).")
    valid_size: int | None = Field(100, ge=0, description="Rows in valid (held out from train for Hub data).")
    test_size: int | None = Field(200, ge=0, description="Rows in test: the unlabeled questions of test-time RL.")
    levels: list[int] = Field(
        default_factory=lambda: [1, 2, 3], min_length=1, description="arithmetic: operation counts."
    )
    max_operand: int = Field(20, ge=2, description="arithmetic: operands are drawn from 1..max_operand.")
    solution_order: Literal["given", "any"] = Field(
        "given", description="arithmetic: the solution applies the operations in the question's order ('given'), or "
        "in one drawn among the orders whose running value stays non-negative ('any': several correct paths)."
    )
    prompt_template: str = Field("Question: {question}\nAnswer:", description="Must contain {question}.")
    path: str | None = Field(None, description="A local file or folder for Hub sources, or the JSONL file.")
    question_field: str = Field("question", description="jsonl: the question's field.")
    answer_field: str = Field("answer", description="jsonl: the final answer's field.")
    solution_field: str | None = Field(None, description="jsonl: a worked solution's field (SFT target), if any.")

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, template: str) -> str:
        if "{question}" not in template:
            raise ValueError("prompt_template must contain {question}")
        return template

    @field_validator("levels")
    @classmethod
    def _levels(cls, levels: list[int]) -> list[int]:
        if any(level not in (1, 2, 3, 4) for level in levels):
            raise ValueError(f"levels are numbers of operations, 1 to 4; got {levels}")
        return sorted(set(levels))


NAMES = ("Ada", "Ben", "Chloe", "Dev", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lena", "Milo", "Nora")
OBJECTS = ("coins", "apples", "stamps", "books", "shells", "cards", "marbles", "pencils")
GAINS = ("finds {n} more", "buys {n} more", "gets {n} more", "wins {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")


def arithmetic_problem(level: int, max_operand: int, rng: np.random.Generator,
                       any_order: bool = False) -> tuple[str, str, int]:
    """(question, solution, answer) with `level` operations; with `any_order` the solution takes the operations in
    an order drawn uniformly among those that keep the running value non-negative."""
    name, thing = NAMES[rng.integers(len(NAMES))], OBJECTS[rng.integers(len(OBJECTS))]
    value = start = int(rng.integers(1, max_operand + 1))
    clauses, changes = [], []
    for _ in range(level):
        n = int(rng.integers(1, max_operand + 1))
        if rng.random() < 0.5 and n <= value:
            clauses.append(LOSSES[rng.integers(len(LOSSES))].format(n=n))
            changes.append(-n)
            value -= n
        else:
            clauses.append(GAINS[rng.integers(len(GAINS))].format(n=n))
            changes.append(n)
            value += n
    if any_order and level > 1:
        orders = [order for order in itertools.permutations(changes) if _never_negative(start, order)]
        changes = list(orders[rng.integers(len(orders))])
    steps, running = [], start
    for change in changes:
        sign = "-" if change < 0 else "+"
        steps.append(f"{running} {sign} {abs(change)} = {running + change}.")
        running += change
    actions = clauses[0] if level == 1 else ", then ".join(clauses)
    question = f"{name} has {start} {thing}. {name} {actions}. How many {thing} does {name} have now?"
    return question, " " + " ".join(steps) + f" #### {value}", value


def _never_negative(start: int, changes) -> bool:
    running = start
    for change in changes:
        running += change
        if running < 0:
            return False
    return True


def _arithmetic_splits(config: ReasoningTaskConfig, seed: int) -> dict[str, list[dict]]:
    rng = np.random.default_rng([seed, 7411])
    sizes = {"train": config.train_size or 0, "valid": config.valid_size or 0, "test": config.test_size or 0}
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows = []
        levels = [config.levels[i % len(config.levels)] for i in range(sizes[split])]
        for level in levels:
            for _ in range(1000):
                question, solution, answer = arithmetic_problem(level, config.max_operand, rng,
                                                                config.solution_order == "any")
                if question not in seen:
                    break
            else:
                raise LLMRecError(
                    f"the arithmetic world ran out of distinct level-{level} questions; raise max_operand or lower "
                    "the split sizes.", "data.reasoning")
            seen.add(question)
            rows.append({"question": question, "solution": solution, "answer": str(answer), "level": level})
        out[split] = rows
    return out


def _hub_splits(config: ReasoningTaskConfig, seed: int) -> dict[str, list[dict]]:
    from datasets import load_dataset

    from llmrec.answers import extract_answer, normalize_answer

    spec = HUB_SOURCES[config.source]
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for ours, theirs in spec.splits.items():
        try:
            # a local copy (a folder of <split>.jsonl / parquet files) has no Hub configuration name
            table = (load_dataset(config.path, split=theirs) if config.path
                     else load_dataset(spec.dataset, spec.config, split=theirs))
        except Exception as err:  # datasets raises many types (network, missing files, bad configs)
            raise LLMRecError(f"could not load {config.path or spec.dataset} ({theirs}): {err}",
                              "data.reasoning.source") from None
        for row in table:
            answer = str(row[spec.answer])
            answer = extract_answer(answer) if config.source == "gsm8k" else normalize_answer(answer)
            solution = row[spec.solution] if spec.solution else f"#### {answer}"
            out[ours].append({"question": row[spec.question], "solution": " " + solution.strip(),
                              "answer": answer or "", "level": int(row.get("level", 0) or 0)})
    if not out["valid"] and out["train"]:
        order = np.random.default_rng([seed, 7412]).permutation(len(out["train"]))
        held = int(config.valid_size or 0)
        out["valid"] = [out["train"][i] for i in order[:held]]
        out["train"] = [out["train"][i] for i in order[held:]]
    return out


def _jsonl_splits(config: ReasoningTaskConfig, seed: int) -> dict[str, list[dict]]:
    from llmrec.answers import normalize_answer

    if not config.path:
        raise LLMRecError("source jsonl needs a path.", "data.reasoning.path")
    rows = []
    for number, record in iter_jsonl(Path(config.path)):
        for key in (config.question_field, config.answer_field):
            if key not in record:
                raise LLMRecError(f"the record has no {key!r} field (fields: {', '.join(record)}).",
                                  f"{config.path}:{number}")
        answer = normalize_answer(str(record[config.answer_field]))
        solution = record.get(config.solution_field) if config.solution_field else None
        rows.append({"question": str(record[config.question_field]), "answer": answer,
                     "level": int(record.get("level", 0) or 0),
                     "solution": " " + (str(solution).strip() if solution else f"#### {answer}")})
    order = np.random.default_rng([seed, 7413]).permutation(len(rows))
    test = int(config.test_size if config.test_size is not None else len(rows))
    valid = int(config.valid_size or 0)
    return {"test": [rows[i] for i in order[:test]], "valid": [rows[i] for i in order[test:test + valid]],
            "train": [rows[i] for i in order[test + valid:]]}


@functools.lru_cache(maxsize=8)
def _splits(config_json: str, seed: int) -> dict[str, list[dict]]:
    config = ReasoningTaskConfig.model_validate_json(config_json)
    if config.source == "arithmetic":
        return _arithmetic_splits(config, seed)
    out = _jsonl_splits(config, seed) if config.source == "jsonl" else _hub_splits(config, seed)
    caps = {"train": config.train_size, "valid": config.valid_size, "test": config.test_size}
    for split, cap in caps.items():
        if cap is not None and len(out[split]) > cap:
            order = np.random.default_rng([seed, 7414, SPLITS.index(split)]).permutation(len(out[split]))[:cap]
            out[split] = [out[split][i] for i in sorted(order)]
    return out


def reasoning_examples(config: ReasoningTaskConfig, split: str, seed: int) -> Dataset:
    """The split's rows: prompt, completion (worked solution), answer (normalised), level."""
    from datasets import Dataset, Features, Value

    rows = _splits(config.model_dump_json(), seed)[split]
    return Dataset.from_dict(
        {
            "prompt": [config.prompt_template.replace("{question}", r["question"]) for r in rows],
            "completion": [r["solution"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "level": [r["level"] for r in rows],
        },
        features=Features({name: Value(kind) for name, kind in COLUMNS.items()}),
    )


def reasoning_tokenizer_texts(config: ReasoningTaskConfig, seed: int) -> list[str]:
    """What a tiny tokenizer learns from: every split's prompts and solutions."""
    return [config.prompt_template.replace("{question}", r["question"]) + r["solution"]
            for split in SPLITS for r in _splits(config.model_dump_json(), seed)[split]]
