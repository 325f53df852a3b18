"""`llmrec push` against a fake Hub on loopback (`tests/fakehub.py`): one commit with exactly the files of the run's
stock and llmrec formats, a card the Hub can read (metadata, model-index from metrics.json), the token nowhere but
the Authorization header, one-paragraph errors with exit status 2 and nothing published, and `hf://` runs that load
back with the local run's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_recipe, train_tiny, train_tiny_cora
from huggingface_hub import ModelCard

from llmrec.cli import main

pytest_plugins = ["fakehub"]
pytestmark = pytest.mark.slow

TOKEN = "hf_fake_token_for_tests_0123456789"
PROMPT = "The user interacted with these items, most recent last:"
RUN_FILES = {"README.md", "recipe.yaml", "metrics.json", "curves.png"}
LORA_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"}
TINY_BASE = {f"base/{name}" for name in ("config.json", "generation_config.json", "model.safetensors",
                                         "tokenizer.json", "tokenizer_config.json")}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("hub-lora"), "lora") / "runs" / "lora"


@pytest.fixture
def hub(fake_hub, monkeypatch):
    fake_hub.tokens[TOKEN] = "alice"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("llmrec.publish.push.BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    return fake_hub


def _push(capsys, *args) -> tuple[int, str]:
    code = main(["push", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _assert_token_hidden(hub, output: str) -> None:
    assert TOKEN not in output
    for request in hub.requests:
        assert TOKEN.encode() not in request.body and TOKEN not in request.path
        assert all(TOKEN not in value for name, value in request.headers.items() if name != "authorization")


def _logits(run_dir) -> torch.Tensor:
    from llmrec.rundir import load_trained

    _, _, model, tokenizer, _ = load_trained(run_dir)
    with torch.no_grad():
        return model.eval()(**tokenizer([PROMPT], return_tensors="pt")).logits


def test_a_lora_run_is_published_in_one_commit_and_loads_back_with_the_same_logits(lora_run, hub, capsys):
    code, output = _push(capsys, lora_run, "alice/quick", "--include-base", "--license", "apache-2.0")
    assert code == 0, output
    commits = hub.commits("alice/quick")
    assert len(commits) == 1
    files = hub.files("alice/quick")
    final = {f"final/{name}" for name in LORA_FILES}
    assert set(files) == RUN_FILES | LORA_FILES | final | TINY_BASE
    assert files["adapter_model.safetensors"] == files["final/adapter_model.safetensors"]
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny:qwen2-xs"

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model is None  # a tiny base is on no Hub: named in the text instead
    assert "`tiny:qwen2-xs` (not on the Hugging Face Hub)" in card.text and 'subfolder="base"' in card.text
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation" and {"llmrec", "lora", "recommendation"} <= set(card.data.tags)
    metrics = json.loads(files["metrics.json"])
    indexed = {f"{r.dataset_split}/{r.metric_type}": r.metric_value for r in card.data.eval_results}
    assert indexed and {"test/hr@10", "test/ndcg@10"} <= set(indexed)
    assert all(value == pytest.approx(metrics[key], abs=1e-6) for key, value in indexed.items())
    assert "github.com" not in card.content
    _assert_token_hidden(hub, output)

    torch.testing.assert_close(_logits("hf://alice/quick"), _logits(lora_run), rtol=0, atol=0)
    assert main(["recommend", "hf://alice/quick", "--user", "u0001", "-k", "3", "--json"]) == 0
    from_hub = json.loads(capsys.readouterr().out)
    assert main(["recommend", str(lora_run), "--user", "u0001", "-k", "3", "--json"]) == 0
    assert from_hub == json.loads(capsys.readouterr().out)


def test_a_dry_run_lists_the_files_and_the_card_and_contacts_nothing(lora_run, hub, capsys):
    code, output = _push(capsys, lora_run, "alice/quick", "--include-base", "--dry-run")
    assert code == 0, output
    assert "would publish 17 files" in output and "base/model.safetensors" in output and "model-index:" in output
    assert hub.requests == [] and not hub.repos


def test_a_base_on_no_hub_is_refused_without_include_base(lora_run, hub, capsys):
    code, output = _push(capsys, lora_run, "alice/quick")
    assert code == 2 and "model.name: the base model 'tiny:qwen2-xs'" in output and "--include-base" in output
    assert hub.requests == []


@pytest.mark.parametrize(("case", "repo", "expected"), [
    ("no token", "alice/quick", "no Hugging Face token: set HF_TOKEN"),
    ("bad token", "alice/quick", "the Hub refused the token (401"),
    ("someone else's repo", "bob/theirs", "may not write to this repository (403)"),
    ("server errors", "alice/quick", "server error (HTTP 500) 3 time(s) in a row"),
])
def test_failed_pushes_are_one_paragraph_with_exit_2_and_publish_nothing(lora_run, hub, capsys, monkeypatch, case,
                                                                         repo, expected):
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "bad token":
        monkeypatch.setenv("HF_TOKEN", TOKEN + "-revoked")
    elif case == "someone else's repo":
        hub.add_repo("bob/theirs")
    else:
        hub.fail_next = [("/api/repos/create", 500)] * 3
    code, output = _push(capsys, lora_run, repo, "--include-base")
    assert code == 2, output
    assert f"error: {repo}: " in output and expected in output and "othing was published" in output
    assert "Traceback" not in output and output.count("\nerror: ") + output.startswith("error: ") == 1
    assert all(not hub.commits(repo_id) for _, repo_id in hub.repos)
    _assert_token_hidden(hub, output)


def test_a_server_error_then_success_publishes_once(lora_run, hub, capsys):
    hub.fail_next = [("/api/repos/create", 503)]
    code, output = _push(capsys, lora_run, "alice/quick", "--include-base", "--revision", "v1")
    assert code == 0, output
    assert len(hub.commits("alice/quick", "v1")) == 1 and hub.commits("alice/quick") == []


def test_an_unknown_revision_to_load_is_one_paragraph(lora_run, hub, capsys):
    assert _push(capsys, lora_run, "alice/quick", "--include-base")[0] == 0
    code = main(["recommend", "hf://alice/quick@nope", "--user", "u0001"])
    output = capsys.readouterr().err
    assert code == 2 and "hf://alice/quick: the repository has no revision 'nope'" in output


def test_a_cora_run_publishes_one_users_lora_beside_llmrecs_format(tmp_path, hub, capsys):
    run = train_tiny_cora(tmp_path)
    code, output = _push(capsys, run, "alice/cora-u1", "--include-base", "--user", "u0001")
    assert code == 0, output
    files = hub.files("alice/cora-u1")
    assert len(hub.commits("alice/cora-u1")) == 1
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    final = {name for name in files if name.startswith("final/")}
    assert final and all(name.removeprefix("final/") in {p.name for p in (run / "final").iterdir()} for name in final)
    assert files["adapter_model.safetensors"] != files.get("final/adapter_model.safetensors")
    card = ModelCard(files["README.md"].decode())
    assert "for user u0001" in card.text and {"test/auc"} <= {f"{r.dataset_split}/{r.metric_type}"
                                                              for r in card.data.eval_results}


def test_a_lamp_run_publishes_a_stock_prompt_tuning_adapter(tmp_path, hub, capsys):
    adapter = {"method": "lamp", "args": {"num_virtual_tokens": 8, "r": 4, "pool_size": 2}}
    run = train_tiny(tmp_path, "lamp", adapter=adapter, data={**small_recipe(tmp_path)["data"],
                                                              "task": {"history_length": 3}}) / "runs" / "lamp"
    code, output = _push(capsys, run, "alice/lamp", "--include-base")
    assert code == 0, output
    files = hub.files("alice/lamp")
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    assert {"final/adapter_config.json", "recipe.yaml", "metrics.json"} <= set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl")) or "checkpoint" in name]
    torch.testing.assert_close(_logits("hf://alice/lamp"), _logits(run), rtol=0, atol=0)


def test_no_network_is_one_paragraph_after_the_retries(lora_run, hub, capsys):
    hub.stop()  # nothing listens on the endpoint any more
    code, output = _push(capsys, lora_run, "alice/quick", "--include-base")
    assert code == 2 and "error: alice/quick: could not reach the Hub" in output and "Nothing was published" in output
    assert output.count("retrying") == 2 and "Traceback" not in output


def test_an_ept_run_with_offsets_goes_up_in_llmrecs_format_only_and_says_so(tmp_path, hub, capsys):
    adapter = {"method": "ept", "args": {"num_virtual_tokens": 4, "max_length": 160, "r": 4}}
    run = train_tiny(tmp_path, "ept", adapter=adapter, data={**small_recipe(tmp_path)["data"],
                                                            "task": {"history_length": 3}}) / "runs" / "ept"
    code, output = _push(capsys, run, "alice/ept", "--include-base")
    assert code == 0, output
    files = hub.files("alice/ept")
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files  # no stock form
    assert {name.removeprefix("final/") for name in files if name.startswith("final/")} == {
        p.name for p in (run / "final").iterdir() if p.name != "README.md"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "llmrec" and "No stock PEFT format holds this `ept` adapter exactly" in card.text
    torch.testing.assert_close(_logits("hf://alice/ept"), _logits(run), rtol=0, atol=0)
