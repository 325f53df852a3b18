"""`accelerate launch` with two CPU processes: both ranks train, only rank 0 writes the run directory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import REPO, small_recipe, write_recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes(recipe_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/multi_cpu.yaml",
         "--main_process_port", str(_free_port()), "-m", "llmrec", "train", str(recipe_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def test_multi_cpu_config_really_runs_two_processes(tmp_path):
    recipe = small_recipe(tmp_path / "runs")
    recipe["stages"][0]["args"].update(max_steps=4, save_steps=2, logging_steps=1)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = _launch_two_processes(path)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stderr.splitlines()
    for rank in (0, 1):
        assert f"[llmrec rank {rank}/2] finished step 4/4" in lines
    writes = [line for line in lines if "] wrote " in line]
    assert writes and all(line.startswith("[llmrec rank 0/2] wrote ") for line in writes)
    assert ({line.rsplit("/", 1)[-1] for line in writes}
            >= {"recipe.yaml", "result", "final", "metrics.json", "README.md"})

    run = tmp_path / "runs" / "small"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run/world_size"] == 2
    assert metrics["test/targets"] == 60  # the two ranks' shares gathered back into one evaluation
    assert len((run / "predictions" / "test.jsonl").read_text().splitlines()) == 60
    assert (sorted(p.name for p in (run / "checkpoints" / "stage0-sft").glob("checkpoint-*"))
            == ["checkpoint-2", "checkpoint-4"])
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("*.partial"))


def test_test_time_rl_with_groups_split_across_two_processes(tmp_path):
    """6 completions per process and 4 per question: a question's group straddles the ranks, so its votes must be
    grown in one place and gathered back."""
    recipe = {
        "run": {"name": "echo-mp", "seed": 0, "output_dir": str(tmp_path / "runs")},
        "model": {"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 400, "tokenizer_split_digits": True},
        "data": {"reasoning": {"train_size": 64, "valid_size": 0, "test_size": 8, "levels": [1]}},
        "adapter": {"method": "none"},
        "stages": [
            {"trainer": "sft", "args": {"max_steps": 2, "per_device_train_batch_size": 8, "save_steps": 100,
                                        "max_length": 96}},
            {"trainer": "echo", "args": {"max_steps": 2, "per_device_train_batch_size": 6, "num_generations": 4,
                                         "num_votes": 6, "max_completion_length": 12, "logging_steps": 1,
                                         "save_steps": 100,
                                         "tree": {"entropy_high": 1.0, "entropy_low": 0.5, "branch_confidence": 9.0,
                                                  "entropy_jump": -10.0, "min_depth": 3}}},
        ],
        "eval": {"task": "reasoning", "samples": 2, "max_new_tokens": 12, "batch_size": 8},
    }
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = _launch_two_processes(path)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "runs" / "echo-mp"
    history = json.loads(
        (run / "checkpoints" / "stage1-echo" / "result" / "llmrec_stage.json").read_text())["log_history"]
    steps = [entry for entry in history if "rollout/effective_leaves" in entry]
    assert len(steps) == 2
    # 3 questions per step, each grown once: 6 leaves each, tree leaves plus fills
    assert all(entry["rollout/effective_leaves"] + entry["rollout/fills_per_question"] == 6 for entry in steps)
    assert json.loads((run / "metrics.json").read_text())["run/world_size"] == 2
