"""End-to-end runs: the run directory, eval/recommend on a finished run, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ML100K, REPO, needs_ml100k, run_cli, small_recipe, write_recipe

from llmrec.cli import main
from llmrec.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_small_run_leaves_a_complete_self_describing_run_directory(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs")
    recipe["eval"].update(baselines=["popularity", "random", "bpr_mf", "sasrec"],
                          baseline_args={"bpr_mf": {"epochs": 2}, "sasrec": {"dim": 8, "epochs": 2}})
    recipe_path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(recipe_path)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("model", "popularity", "bpr_mf", "sasrec"))

    run = tmp_path / "runs" / "small"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/hr@5", "test/ndcg@10", "baseline/popularity/test/hr@10", "baseline/random/test/ndcg@5",
                "baseline/bpr_mf/test/hr@10", "baseline/sasrec/test/ndcg@10", "test/valid_item_ratio"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test/targets"] == 60 and metrics["train/stage0-sft/global_step"] == 6
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run / "README.md").read_text()
    assert "| this model |" in card and "tiny:qwen2-xs" in card and "transformers:" in card
    assert ({"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"}
            <= {p.name for p in (run / "final").iterdir()})
    assert not [p for p in (run / "final").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    stored = load_recipe(run / "recipe.yaml", instantiate=False)
    assert stored.to_dict() == load_recipe(recipe_path, instantiate=False).to_dict()
    predictions = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(predictions) == 60 and all(len(p["ranked"]) == 10 for p in predictions)

    # eval reloads base/ and final/ offline and reproduces the numbers
    before = {k: v for k, v in metrics.items() if k.startswith("test/")}
    assert main(["eval", str(run)]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert {k: after[k] for k in before} == pytest.approx(before, abs=1e-6)

    assert main(["eval", str(run), "--split", "valid"]) == 0
    both = json.loads((run / "metrics.json").read_text())
    assert 0 <= both["valid/hr@10"] <= 1 and 0 <= both["baseline/popularity/valid/hr@10"] <= 1
    assert both["test/hr@10"] == after["test/hr@10"]
    assert (run / "predictions" / "valid.jsonl").is_file()
    card = (run / "README.md").read_text()
    assert "## Results: test (60 targets" in card and "## Results: validation (60 targets" in card

    capsys.readouterr()
    assert main(["recommend", str(run), "--user", "u0001", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("user u0001") and len(lines) == 2 + 3
    history = {p["target"] for p in predictions if p["user_id"] == "u0001"}
    assert main(["recommend", str(run), "--user", "u0001x", "-k", "3"]) == 2
    err = capsys.readouterr().err
    assert "--user: user 'u0001x' has no interactions" in err and "Did you mean 'u0001'?" in err

    # a finished run is not trained again
    assert main(["train", str(recipe_path)]) == 0
    assert json.loads((run / "metrics.json").read_text())["test/hr@5"] == metrics["test/hr@5"]
    assert history  # the user had a test target


def test_data_stats_prints_counts_and_a_prompt(recipe_file, capsys):
    assert main(["data", "stats", str(recipe_file)]) == 0
    out = capsys.readouterr().out
    assert "users: 60" in out and "items: 40" in out and "test_interactions: 60" in out
    assert "example prompt:\nA user's recent items, oldest first:" in out


def test_a_different_recipe_for_an_existing_run_is_refused(tmp_path, capsys):
    recipe_path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "runs"))
    assert main(["train", str(recipe_path), "stages.0.args.max_steps=2", "eval.valid_item_samples=0"]) == 0
    assert main(["train", str(recipe_path), "stages.0.args.max_steps=3", "eval.valid_item_samples=0"]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and "stages.0.args.max_steps" in err and "--overwrite" in err
    assert main(["train", str(recipe_path), "stages.0.args.max_steps=3", "eval.valid_item_samples=0",
                 "--overwrite"]) == 0


# --- bad input: one paragraph naming the place, exit 2, no traceback, no finished-looking run directory --------


def _bad_table(tmp_path: Path, interactions: str, suffix: str = ".csv") -> list[str]:
    (tmp_path / f"i{suffix}").write_text(interactions)
    (tmp_path / "c.csv").write_text("item_id,title\na,Alpha\nb,Beta\nc,Gamma\n")
    return [f"data.source={{format: table, interactions: {tmp_path / f'i{suffix}'}, catalog: {tmp_path / 'c.csv'}}}"]


ROWS = "user_id,item_id,timestamp,rating\n" + "".join(f"u,{i},{t},3\n" for t, i in enumerate("abc"))
JSONL = '{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u", "item_id": "b" "timestamp": 2}\n'
CASES = {  # name: (overrides for a tmp folder, the place the error must name, what it must say)
    "misspelled nested key": (lambda tmp: ["data.split.methd=temporal"], "data.split.methd", "Did you mean 'method'?"),
    "wrong value type": (lambda tmp: ["stages.0.args.max_steps=ten"], "stages.0.args.max_steps", "expected int"),
    "missing data file": (lambda tmp: [f"data.source={{format: ml-100k, path: {tmp / 'nowhere'}}}"],
                          "data.source.path", "file not found"),
    "malformed jsonl line": (lambda tmp: _bad_table(tmp, JSONL, ".jsonl"), "i.jsonl:2", "not valid JSON"),
    "missing column": (lambda tmp: _bad_table(tmp, "user,item_id,timestamp\nu,a,1\n"), "i.csv",
                       "column 'user_id' not found"),
    "empty after filtering": (lambda tmp: _bad_table(tmp, ROWS) + ["data.filters.min_rating=4"],
                              "data.filters.min_rating", "no interactions are left"),
    "unknown item ids": (lambda tmp: _bad_table(tmp, ROWS.replace("u,c,", "u,zzz,")), "i.csv",
                         "absent from the catalog"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_paragraph(tmp_path, capsys, case):
    make_overrides, place, what = CASES[case]
    overrides = make_overrides(tmp_path)
    recipe_path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "runs"))
    assert main(["train", str(recipe_path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and place in err and what in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_exit_status_and_debug_traceback_in_a_real_process(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "runs"))
    result = run_cli("train", str(recipe_path), "stages.0.args.learnin_rate=1")
    assert result.returncode == 2
    assert "Did you mean 'learning_rate'?" in result.stderr and "Traceback" not in result.stderr
    debug = run_cli("--debug", "train", str(recipe_path), "stages.0.args.learnin_rate=1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


# --- resume ----------------------------------------------------------------------------------------------------


def _comparable(metrics: dict) -> dict:
    return {k: round(v, 4) for k, v in metrics.items() if isinstance(v, (int, float))}


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    def recipe(name):
        r = small_recipe(tmp_path / "runs", name=name)
        r["stages"][0]["args"].update(max_steps=160, save_steps=20, logging_steps=10)
        r["adapter"]["args"]["lora_dropout"] = 0.1  # randomness that only a restored RNG state reproduces
        return write_recipe(tmp_path / f"{name}.yaml", r)

    assert run_cli("train", str(recipe("straight"))).returncode == 0
    straight = json.loads((tmp_path / "runs" / "straight" / "metrics.json").read_text())

    interrupted = recipe("interrupted")
    stage_dir = tmp_path / "runs" / "interrupted" / "checkpoints" / "stage0-sft"
    process = subprocess.Popen([sys.executable, "-m", "llmrec", "train", str(interrupted)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(stage_dir.glob("checkpoint-*/llmrec_commit.json")):
        assert process.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run = tmp_path / "runs" / "interrupted"
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    (stage_dir / "checkpoint-999").mkdir()  # a checkpoint whose writing was cut off: no commit marker

    resumed = run_cli("train", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming stage 0 from" in resumed.stderr and "incomplete checkpoint" in resumed.stderr
    assert not (stage_dir / "checkpoint-999").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert _comparable(metrics) == _comparable(straight)


# --- the shipped recipes -------------------------------------------------------------------------------------


def test_quickstart_beats_the_popularity_baseline(tmp_path):
    result = run_cli("train", "recipes/quickstart.yaml", f"run.output_dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "quickstart" / "metrics.json").read_text())
    assert metrics["test/hr@10"] > metrics["baseline/popularity/test/hr@10"]
    assert metrics["test/ndcg@10"] > metrics["baseline/popularity/test/ndcg@10"]
    assert "popularity" in result.stdout and f"{metrics['test/hr@10']:.4f}" in result.stdout


@needs_ml100k
def test_ml100k_recipe_runs_on_the_real_data(tmp_path):
    result = run_cli(
        "train", "recipes/sft/ml100k-tiny.yaml", f"run.output_dir={tmp_path}", f"data.source.path={ML100K}",
        "stages.0.args.max_steps=5", "eval.max_targets=40", "eval.valid_item_samples=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ml100k-tiny" / "metrics.json").read_text())
    assert metrics["test/targets"] == 40 and metrics["test/catalog_items"] == 1682
    stored = yaml.safe_load((tmp_path / "ml100k-tiny" / "recipe.yaml").read_text())
    assert stored["data"]["source"]["format"] == "recbole"
