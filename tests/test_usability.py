"""A new user's first hour, through the CLI: recommendations that do not depend on k, values checked at load, failed
runs that can be rerun, damaged runs named before any work, one rule for metric keys, quiet and fast commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, run_cli, small_recipe, write_recipe

from llmrec.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(recipe path, run directory, the train command's stderr) of a small run trained in a fresh process."""
    root = tmp_path_factory.mktemp("usability")
    path = write_recipe(root / "r.yaml", small_recipe(root / "runs", name="u"))
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path, root / "runs" / "u", result.stderr


def _recommend(run, *args: str) -> dict:
    result = run_cli("recommend", str(run), *args, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


# --- 1, 10: recommendations ----------------------------------------------------------------------------------------


def test_a_shorter_recommendation_list_is_the_start_of_a_longer_one(trained):
    _, run, _ = trained
    three, ten = _recommend(run, "--user", "u0007", "-k", "3"), _recommend(run, "--user", "u0007", "-k", "10")
    assert [r["item_id"] for r in three["ranked"]] == [r["item_id"] for r in ten["ranked"]][:3]
    assert [r["rank"] for r in ten["ranked"]] == list(range(1, 11))
    scores = [r["logprob"] for r in ten["ranked"]]
    assert scores == sorted(scores, reverse=True)
    seen = {item["item_id"] for item in ten["history"]}
    assert not seen & {r["item_id"] for r in ten["ranked"]}  # the user's own items are excluded, as in evaluation


def test_a_new_user_is_recommended_for_from_a_history_of_ids_or_titles(trained):
    _, run, _ = trained
    titles = {p["target"]: p["target_title"] for p in map(json.loads, (run / "predictions" / "test.jsonl").open())}
    (first, first_title), (second, _) = list(titles.items())[:2]
    result = _recommend(run, "--history", first_title.upper(), second, "-k", "5")
    assert [item["item_id"] for item in result["history"]] == [first, second]
    assert len(result["ranked"]) == 5 and not {first, second} & {r["item_id"] for r in result["ranked"]}

    refused = run_cli("recommend", str(run), "--history", "No Such Film")
    assert refused.returncode == 2 and "--history: 'No Such Film' is neither an item id nor a title" in refused.stderr
    table = run_cli("recommend", str(run), "--user", "u0007", "-k", "2")
    assert table.returncode == 0 and table.stdout.splitlines()[1].split() == ["rank", "item_id", "log-prob", "title"]


def test_predictions_carry_the_rank_of_the_target(trained):
    _, run, _ = trained
    for prediction in map(json.loads, (run / "predictions" / "test.jsonl").open()):
        items = [r["item_id"] for r in prediction["ranked"]]
        expected = items.index(prediction["target"]) + 1 if prediction["target"] in items else None
        assert prediction["target_rank"] == expected


# --- 10: one rule for metric keys ---------------------------------------------------------------------------------


def test_baselines_are_keyed_by_split_on_every_split_and_old_runs_still_read(trained, tmp_path, capsys):
    path, run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert "baseline/popularity/test/hr@10" in metrics and "baseline/random/test/ndcg@5" in metrics
    assert not [key for key in metrics if key.startswith("baseline/") and len(key.split("/")) != 4]

    old = tmp_path / "runs" / "u"
    shutil.copytree(run, old)
    recipe = yaml.safe_load(path.read_text())
    recipe["run"]["output_dir"] = str(tmp_path / "runs")
    old_path = write_recipe(tmp_path / "r.yaml", recipe)
    stored = yaml.safe_load((old / "recipe.yaml").read_text())
    stored["run"]["output_dir"] = str(tmp_path / "runs")
    (old / "recipe.yaml").write_text(yaml.safe_dump(stored))
    legacy = {key.replace("/test/", "/") if key.startswith("baseline/") else key: value
              for key, value in metrics.items()}
    (old / "metrics.json").write_text(json.dumps(legacy))
    assert main(["train", str(old_path)]) == 0  # complete: prints the summary from the old keys
    printed = capsys.readouterr().out
    assert f"{metrics['baseline/popularity/test/hr@10']:.4f}" in printed


# --- 3: values are checked at load --------------------------------------------------------------------------------


def test_values_that_cannot_train_are_refused_at_load_with_their_place(trained, tmp_path, capsys):
    path, _, _ = trained
    bad = ["stages.0.args.learning_rate=-1e-3", "adapter.args.r=-4", "stages.0.args.per_device_train_batch_size=0",
           "stages.0.args.num_train_epochs=-1", "adapter.args.lora_dropout=1.5"]
    assert main(["recipe", "check", str(path), *bad]) == 2
    err = capsys.readouterr().err
    for override in bad:
        key = override.split("=")[0]
        assert f"override '{override}': {key}: " in err and "cannot train" in err
    recipe = small_recipe(tmp_path / "runs", name="bad")
    recipe["stages"][0]["args"]["learning_rate"] = -0.001
    bad_file = write_recipe(tmp_path / "bad.yaml", recipe)
    assert main(["train", str(bad_file)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:" in err and "stages.0.args.learning_rate: -0.001 cannot train" in err
    assert not (tmp_path / "runs" / "bad").exists()  # nothing half-made


# --- 4: a failed run can be rerun with a corrected recipe ---------------------------------------------------------


def test_a_run_that_failed_before_training_restarts_with_the_corrected_recipe(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs", name="fix")
    recipe["stages"][0]["args"]["max_steps"] = 2
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path), f"model.name={tmp_path / 'no-such-model'}"]) == 2
    assert "no model folder at" in capsys.readouterr().err
    status = json.loads((tmp_path / "runs" / "fix" / "status.json").read_text())
    assert status["state"] == "failed"
    assert main(["train", str(path), "eval.valid_item_samples=0"]) == 0
    err = capsys.readouterr().err
    assert "holds a run of a different recipe (differences at eval.valid_item_samples, model.name)" in err
    assert "that trained nothing (it failed, no checkpoint); starting over with this recipe" in err


def test_a_run_with_trained_work_still_refuses_a_changed_recipe_and_says_what_would_be_lost(trained, capsys):
    path, run, _ = trained
    assert main(["train", str(path), "stages.0.args.learning_rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "differences at stages.0.args.learning_rate" in err and "--overwrite" in err
    assert "the finished stage stage0-sft" in err and "the trained model in final/" in err
    assert (run / "final").is_dir()


# --- 5: damaged or unfinished runs are named before any work ------------------------------------------------------


def test_a_damaged_metrics_file_is_named_before_evaluating(trained, tmp_path, capsys):
    _, run, _ = trained
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "metrics.json").write_text('{"test/hr@10": 0.1,')
    for command in (["eval", str(damaged)], ["recommend", str(damaged), "--user", "u0007"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{damaged / 'metrics.json'}: this file is damaged (not valid JSON" in err
    assert not (damaged / "predictions" / "valid.jsonl").exists()


def test_commands_on_a_failed_or_missing_run_say_what_is_missing(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs", name="failed")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path), f"model.name={tmp_path / 'nowhere'}"]) == 2
    capsys.readouterr()
    run = tmp_path / "runs" / "failed"
    for command in (["export", str(run), str(tmp_path / "out")], ["eval", str(run)],
                    ["recommend", str(run), "--user", "u0001"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "the run has no final/ model yet (it failed: LLMRecError" in err, command
    assert not (tmp_path / "out").exists()
    assert main(["eval", str(tmp_path / "elsewhere")]) == 2
    assert "does not exist; give the folder that `llmrec train` made" in capsys.readouterr().err


# --- 7: every field described -------------------------------------------------------------------------------------


def test_recipe_show_all_describes_every_key_in_comments(trained, capsys):
    path, _, _ = trained
    assert main(["recipe", "show", str(path), "--all"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    learning_rate = next(i for i, line in enumerate(lines) if line.strip().startswith("learning_rate:"))
    assert lines[learning_rate - 1].strip().startswith("# The initial learning rate")
    assert "# Seeds data generation, model initialisation and training." in text
    assert yaml.safe_load(text)["stages"][0]["args"]["learning_rate"] == pytest.approx(3e-3)


# --- 9: quiet, fast, --debug anywhere -----------------------------------------------------------------------------


def test_training_output_has_no_weight_loading_bars_or_known_warnings(trained):
    _, _, stderr = trained
    assert "Loading weights" not in stderr and "Writing model shards" not in stderr
    assert "is_gradient_checkpointing" not in stderr and "[llmrec] wrote" in stderr


def test_help_and_missing_files_answer_without_loading_torch():
    code = ("import sys; from llmrec.cli import main; rc = main(['recipe', 'check', 'missing.yaml']); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert "recipe file not found" in result.stderr
    help_code = "import sys; from llmrec.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
        "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", help_code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("False") and "recommend" in result.stdout


def test_debug_may_follow_the_command(trained, capsys):
    path, _, _ = trained
    assert main(["recipe", "check", str(path), "--debug"]) == 0
    assert main(["recipe", "check", str(path / "missing"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
