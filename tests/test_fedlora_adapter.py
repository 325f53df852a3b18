"""FedLoRA: the model at initialisation, the forward against its equations (and its invariance to the stored
directions' norms), which tensors train and when, the state dict, save/load, the stock PEFT export, TRL's
SFTTrainer, determinism and the configuration errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from llmrec.adapters import get_adapter
from llmrec.adapters.fedlora import FEDLORA, FedLoRAConfig, FedLoRALinear, FedLoRAModel
from llmrec.errors import LLMRecError

TEXTS = ["Golden Jazz River", "Will the user like it? Answer: Yes", "Answer: No"]
KINDS = ("lora_A_direction", "lora_A_magnitude", "lora_B_direction", "lora_B_magnitude")


def _fedlora(base, **args) -> FedLoRAModel:
    return FedLoRAModel(copy.deepcopy(base), FedLoRAConfig(**{"r": 4, "lora_alpha": 8.0, **args}))


def _batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def _train(model: FedLoRAModel, tokenizer, steps: int = 3) -> None:
    """A few AdamW steps on the language-modelling loss, as a client's local training would do."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tokenizer)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# --- the forward -------------------------------------------------------------------------------------------------


def test_at_initialisation_the_model_gives_the_base_models_logits(tokenizer, base):
    model = _fedlora(base).eval()
    assert all(torch.equal(layer.lora_A(), torch.zeros_like(layer.lora_A())) for layer in model.fedlora_layers)
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)


def test_the_layer_computes_base_plus_scaled_increment_of_normalised_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    layer = FedLoRALinear(linear, r=4, scaling=2.5, dropout=0.0, init_a_magnitude=0.0, init_b_magnitude=1.0, eps=1e-8)
    with torch.no_grad():
        layer.lora_A_magnitude.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
        layer.lora_B_magnitude.normal_()
    x = torch.randn(3, 7, 24)
    A_D = layer.lora_A_direction / layer.lora_A_direction.norm(dim=1, keepdim=True)
    B_D = layer.lora_B_direction / layer.lora_B_direction.norm(dim=1, keepdim=True)
    A, B = layer.lora_A_magnitude[:, None] * A_D, layer.lora_B_magnitude[:, None] * B_D
    with torch.no_grad():
        expected = linear(x) + 2.5 * x @ A.T @ B.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_A().norm(dim=1), layer.lora_A_magnitude.abs())
        # only the directions of the stored rows matter: scaling each row by a positive factor changes nothing
        layer.lora_A_direction.mul_(torch.tensor([3.0, 0.01, 7.0, 1e3])[:, None])
        layer.lora_B_direction.mul_(torch.rand(40, 1) * 10 + 0.1)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_parameters_stay_float32_on_a_bfloat16_base_and_the_output_keeps_the_base_dtype():
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = FedLoRALinear(linear, r=2, scaling=1.0, dropout=0.0, init_a_magnitude=1.0, init_b_magnitude=1.0, eps=1e-8)
    assert {p.dtype for name, p in layer.named_parameters() if name.startswith("lora_")} == {torch.float32}
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- what trains -------------------------------------------------------------------------------------------------


def test_at_the_first_step_only_a_magnitude_has_a_gradient(tokenizer, base):
    model = _fedlora(base, target_modules="qv").train()
    batch = _batch(tokenizer)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name in model.adapter_names:
        grad = model.get_parameter(name).grad
        if _kind(name) == "lora_A_magnitude":
            assert grad.abs().sum() > 0, name
        else:  # A = diag(a_M)·A_D = 0 blocks the gradient of A_D, and of B, which multiplies A x = 0
            assert torch.equal(grad, torch.zeros_like(grad)), name


def test_the_state_dict_holds_the_four_adapter_tensors_of_each_target_and_nothing_else(base):
    model = _fedlora(base, target_modules="qv")
    state = model.state_dict()
    assert list(state) == model.adapter_names
    assert len(model.target_names) == 4 and len(state) == 4 * len(model.target_names)
    assert {name.rsplit(".", 2)[-2] for name in state} == {"q_proj", "v_proj"}
    assert state["language_model.model.layers.0.self_attn.q_proj.lora_A_direction"].shape == (4, 64)
    assert state["language_model.model.layers.0.self_attn.q_proj.lora_A_magnitude"].shape == (4,)
    assert state["language_model.model.layers.0.self_attn.v_proj.lora_B_direction"].shape == (32, 4)
    assert state["language_model.model.layers.0.self_attn.v_proj.lora_B_magnitude"].shape == (32,)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(model.adapter_names)


# --- save, load, export ------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_exactly(tokenizer, base, tmp_path):
    model = _fedlora(base, init_a_magnitude=0.3, target_modules="attention", lora_dropout=0.1)
    _train(model, tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    loaded = FedLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert loaded.fedlora_config == model.fedlora_config
    assert not any(p.requires_grad for p in loaded.parameters())
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    model.requires_grad_(False)  # frozen like the loaded one: torch's attention then takes the same kernel
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    trainable = FedLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", trainable=True)
    assert trainable.training
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(model.adapter_names)


def test_the_exported_peft_lora_adapter_gives_the_fedlora_logits_and_generations(tokenizer, base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = _fedlora(base, init_a_magnitude=0.3)
    _train(model, tokenizer)
    folder = model.to_peft_lora(tmp_path / "lora", base_model_name_or_path="tiny-base")
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    config = stock.peft_config["default"]
    assert (config.r, config.lora_alpha, config.base_model_name_or_path) == (4, 8.0, "tiny-base")
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(stock(**batch).logits, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # the adapter is not a no-op
        prompt = tokenizer(["A user liked these items:"], return_tensors="pt")
        greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(model.generate(**prompt, **greedy), stock.generate(**prompt, **greedy))
    # the file has exactly the keys and shapes PEFT itself saves for a LoRA adapter on these modules
    reference = get_peft_model_state_dict(get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, target_modules=config.target_modules, task_type="CAUSAL_LM")))
    written = load_file(folder / "adapter_model.safetensors")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in reference.items()}
    with pytest.raises(LLMRecError, match="describes a LORA adapter, not FEDLORA"):
        FedLoRAModel.from_pretrained(copy.deepcopy(base), folder)


def test_the_offset_initialisation_starts_at_the_base_model_trains_every_tensor_and_exports_exactly(
        tokenizer, base, tmp_path):
    from peft import PeftModel

    model = _fedlora(base, init_offset=True, target_modules="attention")
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, base(**batch).logits, rtol=0, atol=1e-5)
    layer = model.fedlora_layers[0]
    assert layer.lora_A().abs().sum() > 0 and layer.lora_B().abs().sum() > 0  # ΔW ≠ 0, offset by B₀A₀
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name in model.adapter_names:  # every tensor has a gradient from the first step
        assert model.get_parameter(name).grad.abs().sum() > 0, name

    model.zero_grad()
    _train(model, tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "initial_factors.safetensors").is_file()
    loaded = FedLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    model.requires_grad_(False)
    folder = model.to_peft_lora(tmp_path / "lora", base_model_name_or_path="tiny-base")
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert (stock.peft_config["default"].r, stock.peft_config["default"].lora_alpha) == (8, 16.0)  # rank 2r, α / r
    with torch.no_grad():
        expected = model(**batch).logits
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # training moved it
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(stock(**batch).logits, expected, rtol=0, atol=1e-5)


def test_materialised_lora_is_keyed_by_module_name_and_gives_the_weight_increment(base):
    model = _fedlora(base, init_a_magnitude=0.5, target_modules="qv")
    lora = model.materialised_lora()
    assert list(lora) == model.target_names and "model.layers.1.self_attn.v_proj" in lora
    A, B = lora["model.layers.0.self_attn.q_proj"]
    layer = model.language_model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ (2.0 * B @ A).T, rtol=1e-5, atol=1e-6)


# --- TRL ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_trainer_trains_the_four_tensors_and_leaves_the_base_alone(tokenizer, base, tmp_path, checkpointing):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = FEDLORA.attach(copy.deepcopy(base), {"r": 4, "lora_alpha": 8.0, "target_modules": "all-linear"})
    before = {name: value.clone() for name, value in model.adapter_state_dict().items()}
    frozen = {name: value.clone() for name, value in model.language_model.state_dict().items()
              if _kind(name) not in KINDS}
    data = Dataset.from_list([{"prompt": "A user liked Golden Jazz.", "completion": " River"},
                              {"prompt": "Will the user like it? Answer:", "completion": " Yes"}] * 4)
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; set whichever this version has
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    switch = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_steps=2, report_to="none", use_cpu=True,
                     bf16=False, dataloader_num_workers=0, max_length=32, **{switch: checkpointing})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert model.is_activation_checkpointing == checkpointing
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = model.adapter_state_dict()
    for kind in KINDS:  # a_M moves at step 1; with a_M ≠ 0 the directions and b_M move at steps 2 and 3
        changed = [not torch.equal(after[name], before[name]) for name in after if _kind(name) == kind]
        assert all(changed), kind
    for name, value in model.language_model.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    # TRL's fused LM head runs `model.base_model`, the backbone with the FedLoRA layers: its loss is the model's own
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.eval()
    with torch.no_grad():
        fused = model(**inputs, fused_lm_head=True).loss
        torch.testing.assert_close(fused, model(**inputs).loss, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused, base(**inputs).loss)
    # the trainer's checkpoint holds the adapter only, and loads back with no base weight reported missing
    checkpoint = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert set(checkpoint) == set(model.adapter_names)
    FEDLORA.attach(copy.deepcopy(base), {"r": 4, "lora_alpha": 8.0}).load_state_dict(checkpoint, strict=True)


# --- the registry, determinism, errors ---------------------------------------------------------------------------


def test_the_registry_attach_is_deterministic_under_a_seed_and_load_restores_save(base, tmp_path):
    assert get_adapter("fedlora") is FEDLORA and FEDLORA.config_class is FedLoRAConfig
    args = {"r": 2, "target_modules": ["q_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    torch.manual_seed(7)
    first = FEDLORA.attach(copy.deepcopy(base), args).state_dict()
    torch.manual_seed(7)
    model = FEDLORA.attach(copy.deepcopy(base), args)
    torch.manual_seed(8)
    other = FEDLORA.attach(copy.deepcopy(base), args).state_dict()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(first[model.adapter_names[0]], other[model.adapter_names[0]])
    FEDLORA.save(model, tmp_path / "saved")
    loaded = FEDLORA.load(copy.deepcopy(base), tmp_path / "saved")
    assert all(torch.equal(first[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("args, message", [
    ({"r": 0}, "r must be an integer of at least 1"),
    ({"r": 2.5}, "r must be an integer of at least 1"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
    ({"target_modules": "mlp"}, "target_modules must be 'qv', 'attention', 'all-linear' or a list"),
    ({"target_modules": []}, "target_modules is an empty list"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"init_a_magnitude": float("nan")}, "must be finite numbers"),
    ({"init_a_magnitude": 0.0, "init_b_magnitude": 0.0}, "cannot both be 0"),
    ({"init_offset": True, "init_b_magnitude": 0.0}, "init_offset needs a non-zero init_b_magnitude"),
    ({"eps": 0.0}, "eps must be positive"),
    ({"task_type": "SEQ_CLS"}, "causal language models only"),
])
def test_invalid_configurations_are_refused_with_a_clear_message(args, message):
    with pytest.raises(ValueError, match=message):
        FedLoRAConfig(**args)


def test_unknown_targets_and_a_second_attachment_are_refused(base):
    with pytest.raises(LLMRecError, match="no linear layer is named 'qkv'"):
        _fedlora(base, target_modules=["qkv"])
    with pytest.raises(ValueError, match="already has FedLoRA layers"):
        FedLoRAModel(_fedlora(base).language_model, FedLoRAConfig())


# --- a recipe run and `llmrec export` ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_fedlora_recipe_trains_reloads_and_exports_to_stock_peft(tmp_path):
    from conftest import small_recipe, write_recipe
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmrec.publish.export import export_peft_lora
    from llmrec.recipe import load_recipe
    from llmrec.run import train
    from llmrec.rundir import load_trained

    raw = small_recipe(tmp_path / "runs", "fedlora-run",
                       adapter={"method": "fedlora", "args": {"r": 4, "lora_alpha": 8}})
    train(load_recipe(write_recipe(tmp_path / "recipe.yaml", raw)))
    run = tmp_path / "runs" / "fedlora-run"
    _, _, model, _, _ = load_trained(run)
    export_peft_lora(run, tmp_path / "exported")
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), tmp_path / "exported")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(LLMRecError, match="--client is for federated runs"):
        export_peft_lora(run, tmp_path / "other", client=0)
