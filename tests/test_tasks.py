"""A task is one module plus one registry line: a task defined here, outside llmrec, with a data section of its own,
runs through `llmrec data stats`, `llmrec recipe check` and `llmrec train` (train, evaluate, card, curves,
metrics.json) with nothing else changed. Also: each built-in task reports its own rows, panels and card sections."""

from __future__ import annotations

import json

import pytest
from conftest import small_recipe, write_recipe
from pydantic import Field

from llmrec.cli import main
from llmrec.eval.keys import baseline_prefix, split_prefix
from llmrec.schema import Section
from llmrec.tasks import TASKS, Task, get_task

pytestmark = pytest.mark.slow


class TitleChoiceSection(Section):
    """`data.title_choice`: how many rows the title-choice task scores."""

    max_rows: int = Field(20, ge=1, description="Targets scored per split.")


class TitleChoiceTask(Task):
    """Does the model give the true next title a higher likelihood than another catalog title? Trained on the
    next-item rows; accuracy against a coin."""

    name = "title_choice"
    description = "pairwise accuracy of the true next title against a random one"
    section = "title_choice"
    section_class = TitleChoiceSection
    section_help = "The title-choice task: how many rows to score."
    section_holds = "how many rows to score"
    splits = ("test", "valid")
    card_tag = "recommendation"
    card_intro = "A model that tells a user's next title from another one."

    def rows(self, data, split, kind):
        from llmrec.data import next_item_examples

        return next_item_examples(data, split, self.recipe.data.task)

    def evaluate(self, model, tokenizer, data, split):
        import random

        import torch

        rows = self.rows(data, split, "sft")
        rows = rows.select(range(min(self.config.max_rows, len(rows))))
        items = sorted(data.titles)
        rng = random.Random(self.recipe.run.seed)

        def loss(prompt: str, title: str) -> float:
            ids = tokenizer(prompt + title, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                return float(model(input_ids=ids, labels=ids).loss)

        wins = []
        for row in rows:
            other = rng.choice([item for item in items if item != row["item_id"]])
            wins.append(loss(row["prompt"], row["completion"]) < loss(row["prompt"], data.titles[other]))
        metrics = {split_prefix(split) + "pairwise_accuracy": sum(wins) / len(wins),
                   split_prefix(split) + "rows": len(wins), baseline_prefix("coin", split) + "pairwise_accuracy": 0.5}
        return metrics, [{"user_id": row["user_id"], "won": won} for row, won in zip(rows, wins)]

    def summary(self, metrics, splits):
        return "\n".join(f"{split} title choice: model {metrics[f'{split}/pairwise_accuracy']:.4f}, coin 0.5000"
                         for split in splits)

    def card_results(self, metrics):
        return f"## Results: title choice\n\n| this model | {metrics['test/pairwise_accuracy']:.4f} |\n"

    def plot_splits(self, metrics):
        return [split for split in ("test", "valid") if f"{split}/pairwise_accuracy" in metrics]

    def plot(self, axis, metrics, split):
        axis.bar(["model", "coin"], [metrics[f"{split}/pairwise_accuracy"], 0.5])

    def stats(self, data):
        return [f"title-choice rows: {len(self.rows(data, split, 'sft'))} {split}" for split in ("train", "test")]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TASKS, TitleChoiceTask.name, TitleChoiceTask)


def test_a_task_defined_outside_llmrec_runs_through_llmrec_train(registered, tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs", name="choice")
    recipe["data"]["title_choice"] = {"max_rows": 12}
    recipe["eval"] = {"task": "title_choice", "splits": ["test"]}
    path = write_recipe(tmp_path / "choice.yaml", recipe)

    assert main(["data", "stats", str(path)]) == 0
    assert "title-choice rows:" in capsys.readouterr().out
    assert main(["recipe", "check", str(path)]) == 0
    capsys.readouterr()

    assert main(["train", str(path)]) == 0
    assert "test title choice: model" in capsys.readouterr().out
    run = tmp_path / "runs" / "choice"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/rows"] == 12 and 0 <= metrics["test/pairwise_accuracy"] <= 1
    assert metrics["baseline/coin/test/pairwise_accuracy"] == 0.5 and metrics["train/stage0-sft/global_step"] == 6
    card = (run / "README.md").read_text()
    assert "A model that tells a user's next title from another one." in card and "## Results: title choice" in card
    assert "title_choice:\n    max_rows: 12" in card  # the resolved recipe shows the task's section
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run / "predictions" / "test.jsonl").read_text().splitlines()) == 12


def test_a_registered_task_declares_its_section_and_needs(registered, tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs", name="choice")
    recipe["eval"] = {"task": "title_choice", "splits": ["ood_temporal"]}
    recipe["data"]["shifts"] = [{"kind": "temporal"}]
    path = write_recipe(tmp_path / "choice.yaml", recipe)
    assert main(["recipe", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "eval.task: the title_choice evaluation needs a data.title_choice section (how many rows to score)" in err
    assert "eval.splits: a title_choice task has test and valid splits only, not 'ood_temporal'" in err

    recipe["data"]["title_choice"] = {"max_rowz": 3}
    write_recipe(path, recipe)
    assert main(["recipe", "check", str(path)]) == 2
    assert "data.title_choice.max_rowz: unknown key 'max_rowz'" in capsys.readouterr().err


def test_an_unregistered_task_is_refused_with_a_suggestion(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs")
    recipe["eval"] = {"task": "rankin"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["recipe", "check", str(path)]) == 2
    assert "eval.task: unknown task 'rankin'" in (err := capsys.readouterr().err) and "Did you mean 'ranking'?" in err


def test_a_task_section_without_its_task_is_refused(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs")
    recipe["data"]["reasoning"] = {"source": "arithmetic"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["recipe", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "with data.reasoning, the stages train on that task; evaluate it with eval.task: reasoning" in err


def test_a_stage_that_asks_the_task_for_rows_it_lacks_is_refused(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs")
    recipe["data"]["summaries"] = {}
    recipe["eval"] = {"task": "preference_summary"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["recipe", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.0.trainer: trainer sft trains on the task's sft rows, which the preference_summary task" in err


def test_an_sft_stage_mixes_the_rows_of_the_tasks_it_lists(tmp_path):
    from llmrec.data import load_data
    from llmrec.recipe import load_recipe
    from llmrec.trainers import StageContext
    from llmrec.trainers.sft import build_datasets

    raw = small_recipe(tmp_path / "runs")
    raw["data"]["ctr"] = {"history_length": 3}
    raw["stages"][0]["data"] = {"tasks": ["ctr"]}
    recipe = load_recipe(write_recipe(tmp_path / "mtl.yaml", raw))
    data = load_data(recipe.data, 0)
    context = StageContext(recipe, data, None, None, 0, True, data_config=recipe.stage_data(0))
    train, valid = build_datasets(context)
    ranking = get_task("ranking")(recipe).rows(data, "train", "sft")
    like = get_task("ctr")(recipe).rows(data, "train", "sft")
    assert len(train) == len(ranking) + len(like) and len(valid) == len(get_task("ranking")(recipe).rows(
        data, "valid", "sft"))
    answers = {" Yes", " No"}
    assert sorted(train["completion"]) == sorted([*ranking["completion"], *like["completion"]])
    first_half = list(train["completion"])[: len(train) // 2]  # shuffled together, not one task after the other
    assert 0 < sum(c in answers for c in first_half) < len(first_half)


@pytest.mark.parametrize(("tasks", "data", "message"), [
    (["ranking"], {}, "stages.0.data.tasks: 'ranking' is the recipe's own task (eval.task)"),
    (["ctr"], {}, "stages.0.data.tasks: the ctr rows need a data.ctr section"),
    (["ctrr"], {}, "unknown task 'ctrr'"),
    ([], {"ctr": {}}, "with data.ctr, the stages train on that task"),
])
def test_multi_task_rows_need_their_sections_and_other_tasks(tmp_path, capsys, tasks, data, message):
    raw = small_recipe(tmp_path / "runs")
    raw["data"].update(data)
    raw["stages"][0]["data"] = {"tasks": tasks}
    assert main(["recipe", "check", str(write_recipe(tmp_path / "r.yaml", raw))]) == 2
    assert message in capsys.readouterr().err


BUILT_IN = ["ranking", "ctr", "classification", "reasoning", "preference_summary", "instructions"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_task_is_registered_with_its_parts(name):
    task = get_task(name)
    assert task.name == name and issubclass(task, Task) and task.description and task.card_intro
    if task.section is not None:
        assert issubclass(task.section_class, Section) and task.section_help and task.section_holds
