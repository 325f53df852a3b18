"""Federated LoRA: clients (without Flower), the server strategy on fake replies, recipe errors, and whole runs on
Flower's simulation engine (a crash, a poisoned update, resuming)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fed_recipe

from llmrec.errors import LLMRecError
from llmrec.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def make_client(tmp_path: Path, rule: str, client: int = 0):
    from llmrec.federated.client import FederatedClient

    recipe = load_recipe(fed_recipe(tmp_path, rule), instantiate=False)
    return FederatedClient(recipe, client, tmp_path / "clients", tmp_path / "base")


# --- clients ---------------------------------------------------------------------------------------------------


def test_fedlora_client_uploads_directions_keeps_b_magnitudes_and_starts_from_the_global_tensors(tmp_path):
    client = make_client(tmp_path, "fedlora_opt")
    global_state = client.rule.upload(client.initial)
    upload, metrics = client.train(1, global_state)
    assert set(upload) == set(global_state) and not any(k.endswith("lora_B_magnitude") for k in upload)
    assert metrics["num-examples"] == len(client.train_rows) and metrics["steps"] == 3
    from safetensors.torch import load_file

    private = load_file(client.private_file(1))
    assert set(private) == {k for k in client.initial if k.endswith("lora_B_magnitude")}
    assert any(not torch.equal(private[k], client.initial[k]) for k in private)  # the magnitudes trained
    # round 2 starts from the new global tensors and this client's own magnitudes
    new_global = {k: v + 0.5 for k, v in upload.items()}
    client._set_state(new_global, client.latest_private(2))
    from llmrec.federated.client import adapter_state

    state = adapter_state(client.model)
    assert all(torch.equal(state[k], new_global[k]) for k in new_global)
    assert all(torch.equal(state[k], private[k]) for k in private)


def test_ffa_clients_keep_a_identical_to_the_shared_initialisation(tmp_path):
    uploads, As = [], []
    for client_id in (0, 1):
        client = make_client(tmp_path / str(client_id), "ffa", client_id)
        upload, _ = client.train(1, client.rule.upload(client.initial))
        from llmrec.federated.client import adapter_state

        state = adapter_state(client.model)
        assert all(k.endswith("lora_B.weight") for k in upload)
        As.append({k: v for k, v in state.items() if k.endswith("lora_A.weight")})
        uploads.append(upload)
    assert As[0].keys() == As[1].keys() and all(torch.equal(As[0][k], As[1][k]) for k in As[0])
    assert any(not torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0])  # B trained differently


def test_flora_client_merges_the_stack_like_stock_peft_loads_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmrec.federated.run import export_global

    client = make_client(tmp_path, "flora")
    uploads = [client.train(1, {})[0], make_client(tmp_path / "b", "flora", 1).train(1, {})[0]]
    stack = client.rule.aggregate(uploads, [1, 3], {})
    client._set_state(stack, None)
    ids = client.tokenizer(["Instruction: Name the pet of Ada.\nResponse:"], return_tensors="pt").input_ids
    merged = client.model(input_ids=ids).logits
    export_global(client.rule, client.model, client.initial, stack, tmp_path / "export")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    stock = PeftModel.from_pretrained(base, tmp_path / "export")
    torch.testing.assert_close(stock(input_ids=ids).logits, merged, atol=1e-5, rtol=1e-5)


# --- the server strategy on fake replies -----------------------------------------------------------------------


def _reply(state: dict, client: int, examples: int = 10, error: str | None = None):
    from flwr.app import MetricRecord

    from llmrec.federated.server import record_of

    if error:
        return SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(reason=error),
                               metadata=SimpleNamespace(src_node_id=client))
    content = SimpleNamespace(array_records={"arrays": record_of(state)},
                              metric_records={"metrics": MetricRecord({"num-examples": examples, "client": client,
                                                                       "train_loss": 1.0})})
    return SimpleNamespace(has_error=lambda: False, content=content, metadata=SimpleNamespace(src_node_id=client))


def _strategy(max_failure_fraction=0.5):
    from llmrec.federated.rules import build_rule
    from llmrec.federated.server import AdapterStrategy

    initial = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
    strategy = AdapterStrategy(build_rule("fedit"), initial, num_clients=4, max_failure_fraction=max_failure_fraction,
                               max_update_norm=10.0)
    strategy.sent, strategy.sampled = dict(initial), 4
    return strategy, initial


def test_strategy_rejects_poisoned_updates_and_averages_the_rest():
    from llmrec.federated.server import state_of

    strategy, initial = _strategy()
    good = [{k: torch.full_like(v, float(i)) for k, v in initial.items()} for i in (1, 2)]
    nan = {k: torch.full_like(v, float("nan")) for k, v in initial.items()}
    huge = {k: torch.full_like(v, 1e6) for k, v in initial.items()}
    replies = [_reply(good[0], 0, 10), _reply(good[1], 1, 30), _reply(nan, 2), _reply(huge, 3)]
    strategy.max_failure_fraction = 0.5
    arrays, metrics = strategy.aggregate_train(1, replies)
    state = state_of(arrays)
    torch.testing.assert_close(state["m.lora_A.weight"], torch.full((2, 3), 0.25 * 1 + 0.75 * 2))
    record = strategy.round_record
    assert record["accepted"] == 2 and [r["client"] for r in record["rejected"]] == [2, 3]
    assert ("non-finite" in record["rejected"][0]["reasons"][0]
            and "exceeds the bound" in record["rejected"][1]["reasons"][0])


def test_strategy_stops_the_run_when_too_many_clients_fail():
    strategy, initial = _strategy(max_failure_fraction=0.25)
    good = {k: torch.ones_like(v) for k, v in initial.items()}
    replies = [_reply(good, 0), _reply(good, 1), _reply({}, 2, error="boom")]  # and one never answers
    with pytest.raises(LLMRecError, match="2 of 4 sampled clients .*1 failed, 1 timed out") as caught:
        strategy.aggregate_train(3, replies)
    assert caught.value.place == "federated.max_failure_fraction"


# --- recipes -----------------------------------------------------------------------------------------------------


def test_recipe_errors_name_the_key(tmp_path):
    path = fed_recipe(tmp_path, "fedlora_opt")
    with pytest.raises(LLMRecError,
                       match="adapter.method: federated.rule 'fedlora_opt' works on adapter.method 'fedlora'"):
        load_recipe(path, ["adapter.method=lora"])
    with pytest.raises(LLMRecError, match="faults name client 5"):
        load_recipe(path, ["federated.faults.crash=[[1, 5]]"])
    with pytest.raises(LLMRecError, match="max_steps"):
        load_recipe(path, ["stages.0.args={learning_rate: 0.001}"])
    from llmrec.federated.run import federate

    with pytest.raises(LLMRecError, match="no model folder at .*run that recipe first"):
        federate(load_recipe(path, [f"model.name={tmp_path}/runs/base-run/final"]))
    assert not (tmp_path / "runs" / "fed").exists()  # nothing written that a corrected rerun would refuse
    from llmrec.cli import main

    assert main(["train", str(path)]) == 2  # a federated recipe runs with `llmrec federate`
    assert main(["federate", str(REPO / "recipes/quickstart.yaml")]) == 2


# --- whole runs on Flower's simulation engine ---------------------------------------------------------------------


@pytest.mark.slow
def test_simulation_survives_a_crash_and_a_poisoned_update_then_resumes(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmrec.federated.run import federate

    path = fed_recipe(tmp_path, "fedlora_opt", faults={"crash": [[1, 2]], "poison": [[2, 0, "nan"]]})
    recipe = load_recipe(path)
    metrics = federate(recipe)
    run = tmp_path / "runs" / "fed"
    records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["accepted"] == 2 and "injected crash of client 2" in records[1]["failed"][0]["reason"]
    assert records[2]["accepted"] == 2 and records[2]["rejected"][0]["client"] == 0
    assert "non-finite" in records[2]["rejected"][0]["reasons"][0]
    assert metrics["federated/rejected_updates"] == 1 and metrics["federated/failed_clients"] == 1
    assert 0 <= metrics["test/global_exact_match"] <= 1 and metrics["test/local_loss"] > 0
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert (run / "curves.png").stat().st_size > 0 and "| 2 |" in (run / "README.md").read_text()
    # final/ is a stock PEFT LoRA adapter; a client's personal adapter (its own B magnitudes) exports as one too
    from llmrec.publish.export import export_peft_lora

    ids = torch.tensor([[5, 6, 7, 8]])
    global_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "final")
    export_peft_lora(run, tmp_path / "client1", client=1)
    personal = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), tmp_path / "client1")
    assert not torch.allclose(global_model(input_ids=ids).logits, personal(input_ids=ids).logits)
    with pytest.raises(LLMRecError, match="clients are 0..2"):
        export_peft_lora(run, tmp_path / "client9", client=9)

    # a run stopped after round 1 resumes from it and reproduces round 2's global tensors
    from safetensors.torch import load_file

    expected = load_file(run / "federated" / "round-0002" / "global.safetensors")
    shutil.rmtree(run / "federated" / "round-0002")
    (run / "metrics.json").unlink()
    capsys.readouterr()
    federate(load_recipe(path))
    resumed = load_file(run / "federated" / "round-0002" / "global.safetensors")
    assert all(torch.allclose(resumed[k], expected[k], atol=1e-6) for k in expected)
    assert "federated fedlora_opt: 3 clients, 2 rounds" in capsys.readouterr().out
