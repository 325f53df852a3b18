"""CoRA: the adapter's exactness at initialisation, the batched per-sample delta, what trains and what stays
frozen, the PEFT export, cold starts, and a recipe run end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_cli, small_recipe, write_recipe
from transformers import AutoModelForCausalLM

from llmrec.adapters.cora import CoRAConfig, CoRALinear, CoRAModel
from llmrec.cf import CFModel
from llmrec.errors import LLMRecError

USERS, ITEMS = [f"u{k}" for k in range(6)], [f"i{k}" for k in range(9)]


def _cf(seed: int = 0) -> CFModel:
    generator = torch.Generator().manual_seed(seed)
    return CFModel(USERS, ITEMS, torch.randn(len(USERS), 16, generator=generator),
                   torch.randn(len(ITEMS), 16, generator=generator))


def _cora(base, **args) -> CoRAModel:
    return CoRAModel(copy.deepcopy(base), CoRAConfig(**{"r": 4, "query_dim": 32, "num_heads": 4, **args}), _cf())


def _batch(tokenizer, model: CoRAModel, users=("u0", "u1", "u2"), items=("i0", "i4", "i8")):
    encoded = tokenizer(["Golden Jazz River", "Will the user like it?", "Answer: Yes"], return_tensors="pt",
                        padding=True)
    return {**encoded, **model.cf_index(list(users), list(items))}


def _perturb(model: CoRAModel) -> None:
    """Give the gates and B values as training would, so the increment is not zero."""
    with torch.no_grad():
        for layer in model.cora_layers:
            if layer.gate is not None:
                layer.gate.fill_(0.7)
            layer.lora_B.normal_(0, 0.5)


@pytest.mark.parametrize("gate", [True, False])
def test_at_initialisation_cora_gives_the_base_models_logits(tokenizer, base, gate):
    model = _cora(base, gate=gate, target_modules="all-linear").eval()
    batch = _batch(tokenizer, model)
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(**batch).logits
    assert torch.equal(got, expected)


def test_the_batched_delta_equals_a_per_sample_loop():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    layer = CoRALinear(linear, r=4, scaling=2.0, gate=True, fp32_delta=True)
    with torch.no_grad():
        layer.gate.fill_(0.3)
    x, A = torch.randn(5, 7, 24), torch.randn(5, 4, 24)
    layer.lora_A = A
    batched = layer(x)
    for b in range(5):
        weight = linear.weight + 2.0 * torch.tanh(torch.tensor(0.3)) * layer.lora_B @ A[b]  # ΔW_b materialised
        torch.testing.assert_close(batched[b], x[b] @ weight.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_a_model_forward_matches_per_sample_forwards(tokenizer, base):
    model = _cora(base, query_mode="pooled").eval()
    _perturb(model)
    batch = _batch(tokenizer, model)
    with torch.no_grad():
        together = model(**batch).logits
        for b in range(3):
            alone = model(**{k: v[b : b + 1] for k, v in batch.items()}).logits
            # float32 batched and single-row GEMMs reduce in different orders (more so on one thread)
            torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-4, atol=1e-4)


def test_the_increment_depends_on_the_user_and_the_item(tokenizer, base):
    model = _cora(base).eval()
    _perturb(model)
    with torch.no_grad():
        one = model(**_batch(tokenizer, model, users=("u0", "u0", "u0"))).logits
        other_user = model(**_batch(tokenizer, model, users=("u1", "u1", "u1"))).logits
        other_item = model(**_batch(tokenizer, model, items=("i1", "i1", "i1"))).logits
    assert not torch.allclose(one, other_user) and not torch.allclose(one, other_item)


def test_only_the_generator_trains_and_the_llm_and_cf_tables_stay_bit_identical(tokenizer, base):
    model = _cora(base).train()
    frozen = {k: v.clone() for k, v in model.base_model.state_dict().items() if "lora_B" not in k and "gate" not in k}
    tables = (model.cf_users_table.clone(), model.cf_items_table.clone())
    generator = {k: v.clone() for k, v in model.generator.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(model.adapter_names)
    assert all(n.startswith("generator.") or n.endswith((".lora_B", ".gate")) for n in model.adapter_names)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = _batch(tokenizer, model)
    for step in range(3):
        loss = model(**batch).logits[:, -1, :2].logsumexp(-1).mean()
        loss.backward()
        if step > 0:  # at step 0 the zero gate blocks the generator's gradient, by design
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.base_model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert torch.equal(model.cf_users_table, tables[0]) and torch.equal(model.cf_items_table, tables[1])
    assert any(not torch.equal(v, generator[k]) for k, v in model.generator.state_dict().items())


def test_save_and_load_give_identical_logits(tokenizer, base, tmp_path):
    model = _cora(base, target_modules="qv").eval()
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = CoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert not any(p.requires_grad for p in loaded.parameters())
    model.requires_grad_(False)  # frozen like the loaded one: torch's attention then takes the same kernel
    batch = _batch(tokenizer, model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("conditioning", ["user_item", "user"])
def test_the_exported_peft_lora_adapter_reproduces_the_cora_logits(tokenizer, base, tmp_path, conditioning):
    from peft import PeftModel

    model = _cora(base, conditioning=conditioning, target_modules="all-linear").eval()
    _perturb(model)
    item = "i4" if conditioning == "user_item" else None
    model.to_peft_lora(tmp_path / "lora", "u3", item)
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    encoded = tokenizer(["Golden Jazz River", "Answer: Yes"], return_tensors="pt", padding=True)
    cf = model.cf_index(["u3", "u3"], [item, item] if item else None)
    with torch.no_grad():
        expected = model(**encoded, **cf).logits
        got = stock(**encoded).logits
        plain = base(**encoded).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter is not a no-op


def test_exporting_a_pair_conditioned_adapter_without_an_item_is_refused(base, tmp_path):
    with pytest.raises(LLMRecError, match="--item"):
        _cora(base).to_peft_lora(tmp_path / "lora", "u0")


def test_unknown_users_are_an_error_unless_the_recipe_chooses_a_fallback(tokenizer, base):
    with pytest.raises(LLMRecError, match="no embedding for user 'stranger'") as caught:
        _cora(base).cf_index(["stranger"], ["i0"])
    assert caught.value.place == "adapter.args.cold_start"
    model = _cora(base, cold_start="mean")
    index = model.cf_index(["stranger", "u1"], ["i0", "unseen"])
    assert index["cf_users"].tolist() == [len(USERS), 1] and index["cf_items"].tolist() == [0, len(ITEMS)]
    torch.testing.assert_close(model.cf_users_table[-1], model.cf.user_embeddings.mean(0))
    assert torch.equal(_cora(base, cold_start="zero").cf_items_table[-1], torch.zeros(16))


def test_bad_targets_are_named(base):
    with pytest.raises(LLMRecError, match="no linear layer is named 'qkv'") as caught:
        _cora(base, target_modules=["qkv"])
    assert caught.value.place == "adapter.args.target_modules"


# --- a recipe, end to end ---------------------------------------------------------------------------------------


def cora_recipe(tmp_path, name="cora", adapter=None, **eval_args):
    recipe = small_recipe(tmp_path, name)
    recipe["data"] = {
        "source": {"format": "synthetic", "num_users": 60, "num_items": 40, "max_interactions": 15, "latent_dim": 4,
                   "latent_rating_weight": 1.5, "genre_rating_weight": 1.0},
        "split": {"method": "temporal"},
        "ctr": {"history_length": 3},
    }
    recipe["adapter"] = adapter or {"method": "cora", "args": {"r": 4, "query_dim": 32, "target_modules": "qv",
                                                                "cf_dim": 8, "cf_epochs": 5, "conditioning": "user"}}
    recipe["stages"] = [{"trainer": "ctr", "args": {"max_steps": 6, "per_device_train_batch_size": 8,
                                                   "learning_rate": 3e-3, "logging_steps": 2, "save_steps": 3}}]
    recipe["eval"] = {"task": "ctr", "splits": ["test"], "batch_size": 32, **eval_args}
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def test_a_cora_recipe_trains_evaluates_and_exports(tmp_path):
    from llmrec.recipe import load_recipe
    from llmrec.run import train
    from llmrec.rundir import RunDir

    recipe = load_recipe(cora_recipe(tmp_path))
    metrics = train(recipe)
    for key in ("test/auc", "test/uauc", "baseline/cf/test/auc", "baseline/popularity/test/auc",
                "train/stage0-ctr/global_step"):
        assert key in metrics, key
    assert 0 <= metrics["test/auc"] <= 1 and metrics["test/rows"] > 0
    run = RunDir(recipe.run_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "cf_model.safetensors", "cf_model.json"):
        assert (run.final / name).is_file(), name
    assert (run.path / "cf" / "cf_model.safetensors").is_file()
    assert "AUC" in run.card.read_text()

    exported = run_cli("export", str(run.path), "--user", "u0001", str(tmp_path / "u0001"))
    assert exported.returncode == 0, exported.stderr
    from peft import PeftModel

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), str(tmp_path / "u0001"))
    assert stock.peft_config["default"].r == 4

    unknown = run_cli("export", str(run.path), "--user", "nobody", str(tmp_path / "nobody"))
    assert unknown.returncode != 0 and "adapter.args.cold_start" in unknown.stderr
    assert not (tmp_path / "nobody").exists()


def test_a_cora_recipe_must_evaluate_the_ctr_task_and_say_so_before_running(tmp_path):
    from llmrec.recipe import load_recipe

    path = cora_recipe(tmp_path, "ranked", task="ranking")
    with pytest.raises(LLMRecError,
                       match=r"ranked.yaml:\d+: eval.task: CoRA is trained and evaluated on the Yes/No CTR"):
        load_recipe(path)
    with pytest.raises(LLMRecError, match="data: CoRA needs a data.ctr section"):
        load_recipe(path, ["eval.task=ctr", "data.ctr=null"])
    assert not (tmp_path / "ranked").exists()


def test_the_text_only_lora_baseline_runs_through_the_same_loop(tmp_path):
    from llmrec.recipe import load_recipe
    from llmrec.run import train

    lora = {"method": "lora", "args": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    metrics = train(load_recipe(cora_recipe(tmp_path, "lora", adapter=lora)))
    assert "test/auc" in metrics and "baseline/cf/test/auc" not in metrics


def test_left_padded_ctr_scores_equal_one_prompt_at_a_time(tokenizer, base):
    from llmrec.answers import AnswerCollator, answer_logits

    model = _cora(base).eval()
    _perturb(model)
    prompts = [tokenizer("Golden Jazz River. Will the user like it? Answer:")["input_ids"],
               tokenizer("Answer:")["input_ids"]]
    rows = [{"input_ids": ids, "label": 1, "user_id": u, "item_id": i}
            for ids, u, i in zip(prompts, ("u0", "u1"), ("i2", "i3"))]
    collate = AnswerCollator(tokenizer.pad_token_id, model.cf_index)
    answers = (5, 9)
    with torch.no_grad():
        together = answer_logits(model, collate(rows), answers)
        alone = torch.cat([answer_logits(model, collate([row]), answers) for row in rows])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_an_interrupted_cora_stage_resumes_to_the_same_adapter(tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file

    from llmrec.recipe import load_recipe
    from llmrec.run import train
    from llmrec.rundir import RunDir

    straight = load_recipe(cora_recipe(tmp_path, "straight"))
    train(straight)
    interrupted = load_recipe(cora_recipe(tmp_path, "interrupted"))
    train(interrupted)
    run = RunDir(interrupted.run_dir)
    stage = run.stage_dir(interrupted, 0)
    # as if killed after the step-3 checkpoint: the later checkpoint, the result and everything after are gone
    for path in (stage / "checkpoint-6", stage / "result", run.final):
        shutil.rmtree(path)
    run.metrics_file.unlink()
    run.set_status("running")
    with caplog.at_level("INFO", logger="llmrec"):
        train(interrupted)
    assert f"Resuming stage 0 from {stage / 'checkpoint-3'}" in caplog.text
    expected = load_file(RunDir(straight.run_dir).final / "adapter_model.safetensors")
    resumed = load_file(run.final / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
