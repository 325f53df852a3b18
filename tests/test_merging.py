"""Static merges of LoRA adapters (`llmrec.merging`): exactness against W0 + Σ w_k ΔW_k computed by hand, the SVD
truncation and its reported error, the configuration's refusals, and `llmrec merge` on finished runs (a new run
directory that reloads, evaluates and exports; incompatible runs refused with the reason)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import train_tiny
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from llmrec.cli import main
from llmrec.errors import LLMRecError
from llmrec.merging import AdaMergingConfig, MergeConfig, learn_coefficients, materialise, merge_loaded
from llmrec.merging.adamerging import ScaledAdapters, lora_layers
from llmrec.merging.surgery import SurgeryConfig, load_surgery, save_surgery, train_surgery, with_surgery

WEIGHTS = [0.7, 0.4]


@pytest.fixture
def two_adapters(base, tokenizer):
    """A PeftModel with two random (non-zero) LoRA adapters of ranks 4 and 2 on all linear layers."""
    torch.manual_seed(0)
    plain = copy.deepcopy(base)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights=False), adapter_name="input0")
    model.add_adapter("input1", LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", init_lora_weights=False))
    return model, tokenizer(["A user liked these items: Golden Jazz River."], return_tensors="pt"), plain


def _exact(adapters, weights) -> torch.Tensor:
    """Logits of W0 + Σ_k w_k ΔW_k, the weights written into a copy of the plain base."""
    model, inputs, plain = adapters
    plain = copy.deepcopy(plain)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                delta = sum(w * module.get_delta_weight(a) for a, w in zip(["input0", "input1"], weights))
                plain.get_submodule(name.removeprefix("base_model.model.")).weight += delta
        return plain(**inputs).logits


def _merged_logits(adapters, config) -> tuple[torch.Tensor, dict]:
    model, inputs, _ = adapters
    errors = merge_loaded(model, ["input0", "input1"], config)
    with torch.no_grad():
        return model.eval()(**inputs).logits, errors


@pytest.mark.parametrize("config", [MergeConfig("cat", WEIGHTS), MergeConfig("task_arithmetic", WEIGHTS),
                                    MergeConfig("svd", WEIGHTS, rank=6),
                                    MergeConfig("dare_linear", WEIGHTS, density=1.0)],
                         ids=["cat", "task_arithmetic", "svd-full-rank", "dare-density-1"])
def test_exact_merges_give_the_logits_of_the_weighted_delta_sum(two_adapters, config):
    model = two_adapters[0]
    expected = _exact(two_adapters, WEIGHTS)
    logits, errors = _merged_logits(two_adapters, config)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert model.peft_config["default"].r == 6
    assert all(error < 1e-5 for error in errors.values())
    separately = _exact(two_adapters, [1.0, 1.0])
    assert not torch.allclose(separately, expected, atol=1e-3)  # the weights matter


def test_a_truncated_svd_reports_each_layers_frobenius_error(two_adapters):
    model = two_adapters[0]
    expected = _exact(two_adapters, WEIGHTS)
    logits, errors = _merged_logits(two_adapters, MergeConfig("svd", WEIGHTS, rank=1))
    assert model.peft_config["default"].r == 1 and not torch.allclose(logits, expected, atol=1e-4)
    layers = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    assert len(errors) == len(layers) and all(0.05 < error < 1 for error in errors.values())
    name = next(iter(errors))
    module = model.get_submodule(f"base_model.model.{name}")
    exact = sum(w * module.get_delta_weight(a) for a, w in zip(["input0", "input1"], WEIGHTS))
    by_hand = (torch.linalg.matrix_norm(exact - module.get_delta_weight("default")) / torch.linalg.matrix_norm(exact))
    assert errors[name] == pytest.approx(by_hand.item(), rel=1e-4)


def test_ties_trims_and_elects_signs_so_it_differs_from_the_sum(two_adapters):
    expected = _exact(two_adapters, WEIGHTS)
    logits, _ = _merged_logits(two_adapters, MergeConfig("ties", WEIGHTS, density=0.3))
    assert torch.isfinite(logits).all() and not torch.allclose(logits, expected, atol=1e-3)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"method": "ties"}, "ties needs a density in (0, 1]"),
    ({"method": "dare_ties", "density": 1.5}, "dare_ties needs a density"),
    ({"method": "cat", "rank": 4}, "cat's rank is the sum"),
    ({"method": "svd", "density": 0.5}, "svd keeps every entry"),
    ({"method": "mean"}, "unknown merging method 'mean'"),
    ({"method": "adamerging", "weights": [0.5, 0.5]}, "adamerging learns its weights"),
])
def test_impossible_configurations_are_refused_with_the_reason(arguments, message):
    with pytest.raises(LLMRecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MergeConfig(**arguments)


def test_one_weight_per_adapter(two_adapters):
    with pytest.raises(LLMRecError, match="3 weights for 2 adapters"):
        merge_loaded(two_adapters[0], ["input0", "input1"], MergeConfig("cat", [1.0, 1.0, 1.0]))


PROMPTS = ["A user liked these items: Golden Jazz River.", "A user liked these items: Jazz.",
           "Will the user like it? Answer:", "A user liked these items: River Golden."]


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokenizer(PROMPTS[:1], return_tensors="pt")).logits


def test_adamerging_at_the_task_arithmetic_lambda_is_task_arithmetic_and_materialises_exactly(two_adapters, tokenizer):
    model = two_adapters[0]
    expected = _exact(two_adapters, [0.5, 0.5])
    lambdas, history = learn_coefficients(model, ["input0", "input1"], tokenizer, [(PROMPTS, (5, 6, 7))],
                                          AdaMergingConfig(init=0.5, steps=0), progress=False)
    assert lambdas.tolist() == [0.5, 0.5] and history == []
    with ScaledAdapters(model, ["input0", "input1"]) as scaled:
        scaled.apply(lambdas)
        torch.testing.assert_close(_logits(model, tokenizer), expected, rtol=1e-4, atol=1e-4)
    materialise(model, ["input0", "input1"], lambdas)
    torch.testing.assert_close(_logits(model, tokenizer), expected, rtol=1e-4, atol=1e-4)


def test_layer_wise_lambdas_materialise_into_the_same_model(two_adapters, tokenizer):
    model = two_adapters[0]
    lambdas = torch.rand(2, len(lora_layers(model)), generator=torch.Generator().manual_seed(0))
    with ScaledAdapters(model, ["input0", "input1"]) as scaled:
        scaled.apply(lambdas)
        scaled_logits = _logits(model, tokenizer)
    materialise(model, ["input0", "input1"], lambdas)
    torch.testing.assert_close(_logits(model, tokenizer), scaled_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scaled_logits, _exact(two_adapters, [0.5, 0.5]), atol=1e-3)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_trains_lambda_only_keeps_it_in_0_1_and_lowers_the_entropy(two_adapters, tokenizer, granularity):
    model = two_adapters[0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = AdaMergingConfig(granularity=granularity, steps=30, learning_rate=0.05, batch_size=4)
    lambdas, history = learn_coefficients(model, ["input0", "input1"], tokenizer, [(PROMPTS, (5, 6, 7, 8, 9))], config,
                                          progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert lambdas.shape == ((2,) if granularity == "task" else (2, len(lora_layers(model))))
    assert not torch.allclose(lambdas, torch.full_like(lambdas, 0.3)) and lambdas.min() >= 0 and lambdas.max() <= 1
    logged = torch.tensor([entry["lambda"] for entry in history])
    assert len(history) == 30 and logged.min() >= 0 and logged.max() <= 1
    entropies = [entry["entropy"] for entry in history]
    assert sum(entropies[-5:]) < sum(entropies[:5])
    big = AdaMergingConfig(granularity=granularity, steps=5, learning_rate=5.0, batch_size=4)
    lambdas, _ = learn_coefficients(model, ["input0", "input1"], tokenizer, [(PROMPTS, (5, 6, 7, 8, 9))], big,
                                    progress=False)
    assert lambdas.min() >= 0 and lambdas.max() <= 1 and ((lambdas == 0) | (lambdas == 1)).any()


def test_surgery_moves_the_merged_representations_towards_the_expert_and_nothing_else(two_adapters, tokenizer,
                                                                                          tmp_path):
    model = two_adapters[0]
    merge_loaded(model, ["input0", "input1"], MergeConfig("cat", [0.5, 0.5]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    merged = _logits(model, tokenizer)
    module, losses = train_surgery(model, "input0", tokenizer, PROMPTS,
                                   SurgeryConfig(rank=4, steps=40, learning_rate=1e-2, batch_size=4))
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert losses[-1] < 0.8 * losses[0] and model.active_adapters == ["default"]
    with with_surgery(model, module):
        corrected = _logits(model, tokenizer)
    model.set_adapter("input0")
    expert = _logits(model, tokenizer)
    model.set_adapter("default")
    assert torch.equal(_logits(model, tokenizer), merged)  # the hook is gone after the block
    assert (corrected - expert).abs().mean() < (merged - expert).abs().mean()
    save_surgery(module, tmp_path, "first")
    with with_surgery(model, load_surgery(tmp_path, "first")):
        torch.testing.assert_close(_logits(model, tokenizer), corrected)


def test_an_untrained_surgery_module_changes_nothing(two_adapters, tokenizer):
    from llmrec.merging.surgery import SurgeryModule

    model = two_adapters[0]
    plain = _logits(model, tokenizer)
    with with_surgery(model, SurgeryModule(model.get_input_embeddings().weight.shape[1], 4)):
        assert torch.equal(_logits(model, tokenizer), plain)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    first = train_tiny(root, "first") / "runs" / "first"
    stages = [{"trainer": "sft", "args": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                                         "logging_steps": 3, "save_steps": 3, "max_length": 128}}]
    second = train_tiny(root, "second", stages=stages) / "runs" / "second"
    return first, second


@pytest.mark.slow
def test_merged_runs_make_a_run_that_reloads_evaluates_and_exports(two_runs, tmp_path, capsys):
    from llmrec.rundir import load_trained

    first, second = two_runs
    out = tmp_path / "merged"
    assert main(["merge", str(first), str(second), "--method", "cat", "--weights", "0.5,0.5", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["peft_combination"] == "cat" and record["rank"] == 8 and len(record["inputs"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/hr@10" in metrics and "## Merge" in (out / "README.md").read_text()

    _, _, merged, tokenizer, _ = load_trained(out)
    inputs = tokenizer(["The user interacted with these items, most recent last:"], return_tensors="pt")
    models = [load_trained(run)[2] for run in (first, second)]
    expected = _exact_from_runs(models, inputs)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    assert main(["export", str(out), str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["r"] == 8
    capsys.readouterr()


def _exact_from_runs(models, inputs) -> torch.Tensor:
    """Logits of W0 + 0.5 ΔW_first + 0.5 ΔW_second from the two reloaded runs."""
    with torch.no_grad():
        deltas = {name.removeprefix("base_model.model."): 0.5 * module.get_delta_weight("default")
                  + 0.5 * models[1].get_submodule(name).get_delta_weight("default")
                  for name, module in models[0].named_modules() if isinstance(module, LoraLayer)}
        base = models[0].unload()
        for name, delta in deltas.items():
            base.get_submodule(name).weight += delta
        return base.eval()(**inputs).logits


@pytest.mark.slow
def test_adamerging_runs_learn_layer_wise_lambdas_on_unlabelled_prompts(two_runs, tmp_path):
    out = tmp_path / "ada"
    assert main(["merge", str(two_runs[0]), str(two_runs[1]), "--method", "adamerging", "--granularity", "layer",
                 "--steps", "4", "--lr", "0.05", str(out)]) == 0
    learned = json.loads((out / "merge.json").read_text())["adamerging"]
    assert len(learned["lambda"]) == 2 and len(learned["lambda"][0]) > 2 and len(learned["history"]) == 4
    assert learned["prompts"] > 0 and (out / "adamerging.png").stat().st_size > 0
    assert "AdaMerging learned layer-wise λ" in (out / "README.md").read_text()


@pytest.mark.slow
def test_runs_of_other_data_on_the_same_base_are_endpoints_of_the_merged_run(two_runs, tmp_path, capsys):
    first = two_runs[0]
    data = {"source": {"format": "synthetic", "num_users": 50, "num_items": 40, "max_interactions": 15}}
    other = train_tiny(tmp_path, "other", model={"name": str(first / "base")}, data=data) / "runs" / "other"
    out = tmp_path / "merged"
    assert main(["merge", str(first), str(other), "--method", "adamerging", "--steps", "3", "--surgery-steps", "5",
                 str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/hr@10" in metrics and "endpoint/other/test/hr@10" in metrics
    assert (out / "predictions" / "other.test.jsonl").is_file()
    assert set(json.loads((out / "endpoints.json").read_text())) == {"first", "other"}
    card = (out / "README.md").read_text()
    assert "## Endpoint `other`" in card and "Endpoints: first, other." in card
    assert json.loads((out / "merge.json").read_text())["adamerging"]["prompts"] > 8
    assert "endpoint other (ranking)" in capsys.readouterr().out
    assert {p.name for p in (out / "surgery").iterdir()} == {"first.safetensors", "other.safetensors"}
    assert "Representation Surgery" in card and len(json.loads((out / "merge.json").read_text())["surgery"]["l1"]) == 2
    assert main(["push", str(out), "me/merged", "--include-base", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("surgery/other.safetensors", "merge.json", "endpoints.json",
                                            "adamerging.png", "final/adapter_model.safetensors"))


@pytest.mark.slow
def test_surgery_needs_one_input_per_endpoint(two_runs, tmp_path, capsys):
    code = main(["merge", str(two_runs[0]), str(two_runs[1]), "--method", "cat", "--surgery-steps", "5",
                 str(tmp_path / "merged")])
    assert code == 2 and "every input must be a different endpoint" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("sections", "message"), [
    ({"adapter": {"method": "lora", "args": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}},
     "merged adapters must target the same modules"),
    ({"data": {"source": {"format": "synthetic", "num_users": 60, "num_items": 30, "max_interactions": 15}}},
     "differs from the first run's (\'tiny:qwen2-xs\') in weights or tokenizer"),
    ({"adapter": {"method": "prompt_tuning", "args": {"num_virtual_tokens": 4}}}, "only LoRA runs merge"),
])
def test_runs_that_cannot_merge_are_refused_with_the_reason(two_runs, tmp_path, capsys, sections, message):
    other = train_tiny(tmp_path, "other", **sections) / "runs" / "other"
    code = main(["merge", str(two_runs[0]), str(other), "--method", "cat", str(tmp_path / "merged")])
    error = capsys.readouterr().err
    assert code == 2 and message in error and str(other) in error
    assert not (tmp_path / "merged").exists()



def _merge_recipe(tmp_path, text: str):
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("run: {name: m}\ninputs: [a, b]\nmerge: {method: cat, densty: 0.5}\n", "merge.yaml:3: merge.densty: unknown key"),
    ("run: {name: m}\ninputs: [a]\nmerge: {method: cat}\n", "merge.yaml:2: inputs"),
    ("run: {name: m}\ninputs: [a, b]\nmerge: {method: ties}\n", "merge.yaml:3: merge: ties needs a density"),
    ("run: {name: m}\ninputs: [a, b]\nmerge: {method: cat}\nadamerging: {steps: 3}\n",
     "merge.yaml:4: adamerging: is for merge.method: adamerging"),
])
def test_merge_recipe_mistakes_name_the_file_and_line(tmp_path, text, message):
    from llmrec.merging.recipe import load_merge_recipe

    with pytest.raises(LLMRecError) as caught:
        load_merge_recipe(_merge_recipe(tmp_path, text))
    assert message in str(caught.value)


@pytest.mark.slow
def test_a_merge_recipe_merges_its_inputs_once(two_runs, tmp_path, capsys):
    path = _merge_recipe(tmp_path, f"run: {{name: m, output_dir: {tmp_path}}}\n"
                                   f"inputs: [{two_runs[0]}, {two_runs[1]}]\n"
                                   "merge: {method: task_arithmetic, weights: [0.5, 0.5]}\n")
    assert main(["merge", str(path), "merge.weights=[0.3, 0.7]"]) == 0
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["weights"] == [0.3, 0.7] and record["peft_combination"] == "cat"
    stamp = (tmp_path / "m" / "metrics.json").stat().st_mtime_ns
    assert main(["merge", str(path)]) == 0 and (tmp_path / "m" / "metrics.json").stat().st_mtime_ns == stamp
    assert main(["merge", str(path), "--method", "cat"]) == 2
    capsys.readouterr()


@pytest.mark.slow
def test_the_personal_adapters_of_a_federated_runs_clients_merge_without_their_data(tmp_path, capsys):
    from conftest import fed_recipe

    fed = fed_recipe(tmp_path, "fedsa", rounds=1)
    run = tmp_path / "runs" / "fed"
    out = tmp_path / "merged"
    recipe = _merge_recipe(tmp_path, f"run: {{name: merged, output_dir: {tmp_path}}}\n"
                                     f"inputs: ['{fed}#client=0', '{run}#client=2']\n"
                                     "merge: {method: task_arithmetic, weights: [0.5, 0.5]}\n")
    assert main(["merge", str(recipe)]) == 0  # federates the recipe first, then merges two of its clients
    record = json.loads((out / "merge.json").read_text())
    assert record["inputs"] == [f"{run.resolve()}#client=0", f"{run.resolve()}#client=2"] and record["rank"] == 8
    assert "test/exact_match" in json.loads((out / "metrics.json").read_text())
    assert main(["merge", str(run), f"{run}#client=1", "--method", "cat", str(tmp_path / "other")]) == 2
    assert "a federated run merges one client's adapter" in capsys.readouterr().err
