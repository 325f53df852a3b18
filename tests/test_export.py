"""`llmrec export` makes a self-sufficient folder: stock PEFT loads it from any working directory (the base named
by an absolute path or a Hub id, a tiny base inside it, the run's tokenizer beside the adapter), with the logits of
llmrec's own model, and its README's code runs as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import inside, run_cli, small_recipe, train_tiny, train_tiny_cora
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PROMPT = "The user interacted with these items, most recent last:"
LOGITS = """
import sys
import torch
from safetensors.torch import save_file
with torch.no_grad():
    encoded = tokenizer([sys.argv[1]], return_tensors="pt")
    logits = model.eval()(**encoded).logits
    with model.disable_adapter():
        plain = model(**encoded).logits
    save_file({"ids": encoded["input_ids"], "logits": logits.contiguous(), "plain": plain.contiguous()}, sys.argv[2])
"""


def _export(project: Path, name: str, **args) -> Path:
    """`export_peft_* runs/NAME ../exports/NAME` from the project folder, as in the issue."""
    from llmrec.publish.export import export_peft_lora, export_peft_prompt_tuning

    with inside(project):
        export = export_peft_prompt_tuning if args.pop("prompt_tuning", False) else export_peft_lora
        export(f"runs/{name}", f"../exports/{name}", **args)
    return (project.parent / "exports" / name).resolve()


def _python_blocks(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def _run_elsewhere(code: str, where: Path) -> dict:
    """Run `code` (which defines model and tokenizer) in a fresh process whose working directory is `where`;
    the ids and logits it computes for PROMPT."""
    where.mkdir(parents=True, exist_ok=True)
    result = where / "stock.safetensors"
    done = subprocess.run([sys.executable, "-c", code + LOGITS, PROMPT, str(result)], cwd=where, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return load_file(result)


def _ours(run: Path, **cf):
    """The ids and logits of llmrec's own model (the run reloaded by `load_trained`) for PROMPT."""
    from llmrec.rundir import load_trained

    _, _, model, tokenizer, _ = load_trained(run)
    encoded = tokenizer([PROMPT], return_tensors="pt")
    extra = model.cf_index(**cf) if cf else {}
    with torch.no_grad():
        return encoded["input_ids"], model.eval()(**encoded, **extra).logits


def _check_portable(out: Path) -> str:
    """The checks every tiny export passes; its README."""
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base") and out.is_absolute()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    readme = (out / "README.md").read_text()
    assert f'AutoPeftModelForCausalLM.from_pretrained("{out}")' in readme
    assert f'AutoTokenizer.from_pretrained("{out}")' in readme
    return readme


@pytest.fixture(scope="module")
def lora_project(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("lora"), "lora")


def test_a_tiny_lora_export_loads_with_stock_peft_from_another_directory_with_llmrecs_logits(lora_project):
    final = json.loads((lora_project / "runs" / "lora" / "final" / "adapter_config.json").read_text())
    assert final["base_model_name_or_path"] == "runs/lora/base"  # relative to where training ran: the issue
    exported = run_cli("export", "runs/lora", "../exports/lora", cwd=lora_project)  # the command
    assert exported.returncode == 0, exported.stderr
    out = (lora_project.parent / "exports" / "lora").resolve()
    readme = _check_portable(out)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "base").iterdir()}
    assert f"vllm serve {out}/base --enable-lora --lora-modules lora={out}" in readme
    assert readme.startswith("# lora: a PEFT LoRA adapter") and "runs/lora" in readme

    ids, expected = _ours(lora_project / "runs" / "lora")
    stock = _run_elsewhere(_python_blocks(readme)[0], lora_project.parent / "elsewhere")  # the README's own code
    assert torch.equal(stock["ids"], ids)
    torch.testing.assert_close(stock["logits"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stock["plain"], expected, atol=1e-4)  # the adapter is applied, not only the base

    # moved: the README's second recipe loads base/ from the folder's new place
    moved = lora_project.parent / "moved" / out.name
    moved.parent.mkdir()
    shutil.move(out, moved)
    code = _python_blocks(readme)[1].replace(f"/new/place/{out.name}", str(moved))
    again = _run_elsewhere(code, lora_project.parent / "elsewhere")
    torch.testing.assert_close(again["logits"], expected, rtol=1e-5, atol=1e-5)


def test_a_hub_or_local_base_is_named_as_it_loads_from_anywhere(lora_project, tmp_path, monkeypatch):
    from llmrec.errors import LLMRecError
    from llmrec.publish.export import make_portable
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    run = RunDir(lora_project / "runs" / "lora")
    recipe = load_recipe(run.recipe_file, instantiate=False)
    monkeypatch.chdir(lora_project)
    for name, revision, expected in (("Qwen/Qwen2.5-0.5B", "main", "Qwen/Qwen2.5-0.5B"),
                                     ("runs/lora/base", None, str(run.base.resolve()))):
        folder = tmp_path / name.replace("/", "-")
        folder.mkdir()
        shutil.copy2(run.final / "adapter_config.json", folder)
        changed = recipe.model_copy(deep=True)
        changed.model.name, changed.model.revision = name, revision
        make_portable(folder, folder, run, changed, "a test")
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == expected and config.get("revision") == revision
        assert not (folder / "base").exists() and (folder / "tokenizer.json").is_file()
        assert f"vllm serve {expected} --enable-lora" in (folder / "README.md").read_text()
    changed.model.name = "./no/such/folder"
    with pytest.raises(LLMRecError, match="the base model folder is not at"):
        make_portable(tmp_path / "runs-lora-base", tmp_path / "x", run, changed, "a test")


def test_a_lamp_prompt_tuning_export_loads_from_another_directory(tmp_path):
    adapter = {"method": "lamp", "args": {"num_virtual_tokens": 8, "r": 4, "pool_size": 2}}
    project = train_tiny(tmp_path, "lamp", adapter=adapter, data={**small_recipe(tmp_path)["data"],
                                                              "task": {"history_length": 3}})
    out = _export(project, "lamp", prompt_tuning=True)
    readme = _check_portable(out)
    assert "vLLM does not load PEFT prompt-tuning adapters" in readme and "--enable-prompt-embeds" in readme
    ids, expected = _ours(project / "runs" / "lamp")
    stock = _run_elsewhere(_python_blocks(readme)[0], tmp_path / "elsewhere")
    assert torch.equal(stock["ids"], ids)
    tokens = json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"]
    torch.testing.assert_close(stock["logits"][:, tokens:], expected, rtol=1e-4, atol=1e-4)


def test_a_cora_export_for_one_user_loads_from_another_directory(tmp_path):
    project = train_tiny_cora(tmp_path).parents[1]
    out = _export(project, "cora", user="u0001")
    readme = _check_portable(out)
    assert "user 'u0001'" in readme and f"--lora-modules cora-u0001={out}" in readme
    ids, expected = _ours(project / "runs" / "cora", users=["u0001"])
    stock = _run_elsewhere(_python_blocks(readme)[0], tmp_path / "elsewhere")
    assert torch.equal(stock["ids"], ids)
    torch.testing.assert_close(stock["logits"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stock["plain"], expected, atol=1e-4)
