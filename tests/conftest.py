"""Shared fixtures: a small recipe that trains in seconds, and the location of the shared ml-100k data."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("LLMREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def small_recipe(output_dir: Path, name: str = "small", **sections) -> dict:
    """A recipe on a small synthetic world that trains for a few steps."""
    recipe = {
        "run": {"name": name, "seed": 0, "output_dir": str(output_dir)},
        "model": {"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 400},
        "data": {"source": {"format": "synthetic", "num_users": 60, "num_items": 40, "max_interactions": 15}},
        "adapter": {"method": "lora", "args": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}},
        "stages": [
            {
                "trainer": "sft",
                "args": {
                    "max_steps": 6,
                    "per_device_train_batch_size": 8,
                    "learning_rate": 3e-3,
                    "logging_steps": 2,
                    "save_steps": 3,
                    "max_length": 128,
                },
            }
        ],
        "eval": {"ks": [5, 10], "batch_size": 16, "valid_item_samples": 8},
    }
    for key, value in sections.items():
        recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llmrec ARGS` in a fresh process (exit codes and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "llmrec", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def inside(folder: Path):
    """The working directory is `folder` for a while (a user's shell in their project)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def train_tiny(root: Path, name: str, **sections) -> Path:
    """A few steps of a tiny run, trained in `root/project` with a relative output_dir (as a user would);
    returns the project folder."""
    from llmrec.recipe import load_recipe
    from llmrec.run import train

    project = root / "project"
    project.mkdir(exist_ok=True)
    recipe = small_recipe(Path("runs"), name, **sections)
    recipe["stages"][0]["args"].update(max_steps=3, save_steps=3)
    recipe["eval"].update(max_targets=8, valid_item_samples=0)
    with inside(project):
        train(load_recipe(write_recipe(Path(f"{name}.yaml"), recipe)))
    return project


def fed_recipe(tmp_path: Path, rule: str = "fedlora_opt", name: str = "fed", **federated) -> Path:
    """A federated recipe on a fresh tiny model, small enough for seconds per round."""
    raw = yaml.safe_load((REPO / "recipes/fedlora/tiny.yaml").read_text())
    raw["run"].update(name=name, output_dir=str(tmp_path / "runs"))
    raw["model"] = {"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 500}
    raw["data"]["instructions"].update(examples_per_category=30, max_new_tokens=4)
    raw["adapter"] = {"method": "fedlora" if rule == "fedlora_opt" else "lora", "args": {"r": 4, "lora_alpha": 8}}
    raw["stages"][0]["args"].update(max_steps=3, per_device_train_batch_size=8)
    raw["federated"] = {"rule": rule, "num_clients": 3, "rounds": 2, "max_eval_rows": 8, "eval_batch_size": 8,
                        "partition": {"by": "category", "alpha": 1.0, "min_examples": 10}, **federated}
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_tiny_cora(root: Path, name: str = "cora", **sections) -> Path:
    """`train_tiny` of a user-conditioned CoRA like-prediction run (3 steps); returns its run directory. `sections`
    replace recipe sections (e.g. `model`)."""
    data = {"source": {"format": "synthetic", "num_users": 60, "num_items": 40, "max_interactions": 15,
                       "latent_dim": 4}, "split": {"method": "temporal"}, "ctr": {"history_length": 3}}
    adapter = {"method": "cora", "args": {"r": 4, "query_dim": 32, "target_modules": "qv", "cf_dim": 8,
                                          "cf_epochs": 2, "conditioning": "user"}}
    stages = [{"trainer": "ctr", "args": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                                         "logging_steps": 3, "save_steps": 3}}]
    return train_tiny(root, name, **{"data": data, "adapter": adapter, "stages": stages,
                                     "eval": {"task": "ctr", "splits": ["test"], "batch_size": 32}, **sections}
                      ) / "runs" / name


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", small_recipe(tmp_path / "runs"))


needs_ml100k = pytest.mark.skipif(
    not (ML100K / "ml-100k.inter").is_file(),
    reason=f"the shared MovieLens-100K files are not at {ML100K} (set LLMREC_ML100K to their folder)",
)


@pytest.fixture(scope="module")
def tokenizer():
    """A small BPE tokenizer for adapter tests (a test module may override it with its own texts)."""
    from llmrec.models.tiny import train_tokenizer

    return train_tokenizer(
        ["A user liked these items: Golden Jazz River. Will the user like it? Answer: Yes No"] * 20, 300
    )


@pytest.fixture(scope="module")
def base(tokenizer):
    """A tiny random Qwen2 model for `tokenizer`, in eval mode; tests that change it work on a copy."""
    from llmrec.models.tiny import build_tiny_model

    return build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0).eval()
