"""EPT/DePT and LAMP: parameter accounting, the forward's contract (caller's positions only, padding-invariant),
generate() against a greedy loop, SFTTrainer with two learning rates, save/resume, the stock PEFT export, and the
configuration errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from llmrec.adapters import get_adapter
from llmrec.adapters.ept import EPT, EPTConfig, EPTModel
from llmrec.adapters.lamp import LAMP, LAMPConfig, LAMPModel
from llmrec.errors import LLMRecError

TEXTS = ["Golden Jazz River", "Will the user like it? Answer: Yes", "Answer: No"]
SMALL_EPT = {"num_virtual_tokens": 5, "r": 4, "max_length": 40, "fusion_dim": 4, "num_spaces": 3, "projection_rank": 2}
SMALL_LAMP = {"num_virtual_tokens": 8, "r": 3, "pool_size": 2}


def _ept(base, **args) -> EPTModel:
    return EPTModel(copy.deepcopy(base), EPTConfig(**{**SMALL_EPT, **args}))


def _lamp(base, **args) -> LAMPModel:
    return LAMPModel(copy.deepcopy(base), LAMPConfig(**{**SMALL_LAMP, **args}))


def _perturb(model) -> None:
    """Move every factor off its initial value, as training would (B and the projections start at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in model.adapter_names:
            parameter = model.get_parameter(name)
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- parameter accounting --------------------------------------------------------------------------------------


def test_dept_has_the_parameter_count_of_a_100_token_prompt_at_t5_base_width():
    wide = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=768, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=12, num_key_value_heads=12))
    dept = EPTModel(wide, EPTConfig(num_virtual_tokens=40, max_length=256, r=45, fusion=False, projection=False))
    assert _trainable(dept) == 76_800 == 100 * 768
    assert set(dept.adapter_names) == {"prompt_embeddings", "offset_A", "offset_B"}


def test_fusion_and_projection_add_their_documented_parameters(base):
    d, m, n, r = 64, 5, 40, 4
    ept = _ept(base)
    fusion, projection = 4 * d * 4, 3 * (2 * d * 2 + d + 1)
    assert _trainable(ept) == m * d + n * r + r * d + fusion + projection
    dept = _ept(base, fusion=False, projection=False)
    assert not any(name.startswith(("fusion", "projection", "gate")) for name in dept.adapter_names)
    assert _trainable(_ept(base, offsets=False, fusion=False, projection=False)) == m * d  # vanilla prompt tuning


def test_lamp_trains_r_times_l_plus_d_plus_one_parameters_and_its_full_rank_prompt_is_p0(base):
    lamp = _lamp(base, num_virtual_tokens=12, r=5, pool_size=3)
    assert _trainable(lamp) == 5 * (12 + 64 + 1)
    assert lamp.num_virtual_tokens == 4 and lamp.prompt().shape == (4, 64)
    full = _lamp(base, num_virtual_tokens=12, r=12, pool_size=1)
    vocabulary = base.get_input_embeddings().weight
    rows = [int((vocabulary - row).abs().sum(-1).argmin()) for row in full.decomposed_prompt().detach()]
    torch.testing.assert_close(full.decomposed_prompt().detach(), vocabulary[rows], rtol=1e-4, atol=1e-5)
    assert len(set(rows)) == 12  # distinct sampled vocabulary rows, reconstructed by the full-rank SVD
    pooled = full.decomposed_prompt().detach()
    torch.testing.assert_close(_lamp(base, num_virtual_tokens=12, r=12, pool_size=3).prompt().detach(),
                               pooled.view(4, 3, 64).mean(1))


# --- the forward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_ept, _lamp])
def test_forward_returns_the_callers_positions_and_their_loss(tokenizer, base, make):
    model = make(base).eval()
    _perturb(model)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("make", [_ept, _lamp])
def test_left_padding_does_not_change_a_rows_logits(tokenizer, base, make):
    model = make(base).eval()
    _perturb(model)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        together = model(**batch).logits
        for row, text in enumerate(TEXTS):
            alone = model(**tokenizer([text], return_tensors="pt")).logits[0]
            torch.testing.assert_close(together[row, -alone.shape[0]:], alone, rtol=1e-4, atol=1e-4)


def test_at_initialisation_ept_is_vanilla_prompt_tuning_with_its_short_prompt(tokenizer, base):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ept = _ept(base).eval()(**batch).logits
        vanilla = _ept(base, offsets=False, fusion=False, projection=False).eval()(**batch).logits
    torch.testing.assert_close(ept, vanilla)


def test_a_trained_ept_prompt_and_its_offsets_follow_the_equations(tokenizer, base):
    """B, the projections' U and the gates away from zero (at initialisation they are zero, so a mistake in the
    fusion or projection terms would not show), checked against the equations of shared/methods/ept_lamp.md
    written out here term by term, with loops over tokens and spaces instead of the model's matrix forms."""
    model = _ept(base, lora_alpha=3.0).eval()
    _perturb(model)
    config, d = model.prompt_config, model.hidden_size
    p_s, b, a = model.prompt_embeddings.double(), model.offset_B.double(), model.offset_A.double()
    w_q, w_k, w_v, w_o = (getattr(model, f"fusion_{n}").double() for n in ("query", "key", "value", "out"))
    down, up = model.projection_down.double(), model.projection_up.double()
    g_w, g_b = model.gate_weight.double(), model.gate_bias.double()
    assert b.abs().sum() > 0 and up.abs().sum() > 0 and g_w.abs().sum() > 0 and g_b.abs().sum() > 0

    # P_f = P_s + softmax((P_s W_q)(K W_k)ᵀ / √f)(V), the keys and values from the rows of B
    fused = []
    for token in p_s:
        scores = torch.stack([(token @ w_q) @ (key @ w_k) for key in b]) / config.fusion_dim**0.5
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        fused.append(token + sum(w * (key @ w_v @ w_o) for w, key in zip(weights, b)))
    p_f = torch.stack(fused)
    # g = softmax(G(mean(P_f))), P_r = P_f + Σ_i g_i P_f D_i U_i
    logits = torch.stack([g_w[i] @ p_f.mean(0) + g_b[i] for i in range(config.num_spaces)])
    gates = torch.exp(logits) / torch.exp(logits).sum()
    p_r = p_f + sum(gates[i] * (p_f @ down[i] @ up[i]) for i in range(config.num_spaces))
    torch.testing.assert_close(model.prompt().double(), p_r, rtol=1e-5, atol=1e-6)

    # the frozen model reads [P_r ; E(x) + s (A B)[position]], s = α / √r, positions counted within each row
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    seen = {}
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    scale = config.lora_alpha / config.r**0.5
    embeddings = model.get_input_embeddings().weight.double()
    for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        got = seen["inputs_embeds"][row].double()
        torch.testing.assert_close(got[: config.num_virtual_tokens], p_r, rtol=1e-5, atol=1e-6)
        position = 0
        for column, (token, real) in enumerate(zip(ids.tolist(), mask.tolist())):
            if not real:
                continue
            expected = embeddings[token] + scale * (a[position] @ b)
            torch.testing.assert_close(got[config.num_virtual_tokens + column], expected, rtol=1e-5, atol=1e-6)
            position += 1
    assert d == got.shape[-1]


@pytest.mark.parametrize("make", [_ept, _lamp])
def test_generate_equals_a_greedy_loop_over_the_forward(tokenizer, base, make):
    model = make(base).eval()
    _perturb(model)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    steps, eos, pad = 6, tokenizer.eos_token_id, tokenizer.pad_token_id
    generated = model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    done = torch.zeros(len(TEXTS), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            following = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
            following = following.masked_fill(done, pad)
            done |= following == eos
            ids = torch.cat([ids, following[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # as generate() extends it
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_generate_applies_the_offsets_to_generated_tokens(tokenizer, base):
    model = _ept(base).eval()
    _perturb(model)
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        with_offsets = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
        model.offset_A[batch["input_ids"].shape[1]:].zero_()  # generated tokens' rows only
        without = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    torch.testing.assert_close(with_offsets.logits[0], without.logits[0])  # the first new token: input rows only
    assert not torch.allclose(with_offsets.logits[1], without.logits[1])


# --- SFTTrainer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_ept, _lamp])
def test_sft_trainer_trains_the_adapter_with_its_learning_rates(tokenizer, base, make, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = make(base, **({"prompt_learning_rate": 0.3} if make is _ept else {}))
    before = {name: value.clone() for name, value in model.adapter_state_dict().items()}
    frozen = {name: value.clone() for name, value in model.language_model.state_dict().items()}
    data = Dataset.from_list([{"prompt": "A user liked Golden Jazz.", "completion": " River"},
                              {"prompt": "Will the user like it? Answer:", "completion": " Yes"}] * 4)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                     dataloader_num_workers=0, max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         optimizer_cls_and_kwargs=model.optimizer_cls_and_kwargs(args))
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all("mean_token_accuracy" in row for row in trainer.state.log_history if "loss" in row)
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates == ({"prompt": 0.3, "low_rank": 1e-2} if make is _ept else {"prompt": 1e-2})
    after = model.adapter_state_dict()
    assert any(not torch.equal(after[name], before[name]) for name in after)
    assert all(torch.equal(value, frozen[name]) for name, value in model.language_model.state_dict().items())
    # TRL's fused LM head reads the prompt-aware backbone: its loss is the model's own
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        fused = model(**inputs, fused_lm_head=True).loss
        torch.testing.assert_close(fused, model(**inputs).loss, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused, base(**inputs).loss)
    # the trainer's own checkpoint holds the adapter, never the frozen base
    checkpoint = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert set(checkpoint) == set(model.adapter_names)
    make(base).load_state_dict(checkpoint, strict=True)  # what Trainer does on resume: no base weight is missing


# --- save, resume, export ----------------------------------------------------------------------------------------


def _loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


@pytest.mark.parametrize("make", [_ept, _lamp])
def test_a_saved_adapter_resumes_training_with_the_same_next_step_loss(tokenizer, base, make, tmp_path):
    model = make(base).train()
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-2), lr=1e-2)
    for _ in range(3):
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    stored = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert f'"adapter_type": "{model.adapter_type}"' in stored
    resumed = type(model).from_pretrained(copy.deepcopy(base), tmp_path / "adapter", trainable=True)
    assert _trainable(resumed) == _trainable(model)
    next_losses = []
    for one in (model, resumed):
        step = torch.optim.SGD(one.parameter_groups(1e-2), lr=1e-2)
        first = _loss(one, batch)
        first.backward()
        step.step()
        next_losses.append((first.item(), _loss(one, batch).item()))
    assert next_losses[0] == next_losses[1]


def test_registry_objects_attach_save_and_load(tokenizer, base, tmp_path):
    assert get_adapter("ept") is EPT and get_adapter("lamp") is LAMP
    for adapter, args in ((EPT, SMALL_EPT), (LAMP, SMALL_LAMP)):
        adapter.config_class(task_type="CAUSAL_LM", **args)  # as the recipe loader validates adapter.args
        model = adapter.attach(copy.deepcopy(base), args).eval()
        _perturb(model)
        adapter.save(model, tmp_path / adapter.model_class.adapter_type)
        loaded = adapter.load(copy.deepcopy(base), tmp_path / adapter.model_class.adapter_type)
        assert not any(p.requires_grad for p in loaded.parameters())
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, model.requires_grad_(False)(**batch).logits)
    with pytest.raises(LLMRecError, match="describes a LAMP adapter, not EPT"):
        EPT.load(copy.deepcopy(base), tmp_path / "LAMP")


@pytest.mark.parametrize("make,args", [(_lamp, {}), (_ept, {"offsets": False})])
def test_the_exported_peft_prompt_gives_the_same_logits(tokenizer, base, tmp_path, make, args):
    from peft import PeftModel

    model = make(base, **args).eval()
    _perturb(model)
    model.to_peft_prompt_tuning(tmp_path / "peft")
    stock = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert stock.peft_config["default"].num_virtual_tokens == model.num_virtual_tokens
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)  # right padding: PEFT ignores position ids
    with torch.no_grad():
        expected = model(**batch).logits
        got = stock(**batch).logits[:, model.num_virtual_tokens:]
        plain = base(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain[real], expected[real], atol=1e-3)


def test_an_ept_prompt_with_offsets_refuses_the_stock_export(base, tmp_path):
    with pytest.raises(LLMRecError, match="position offsets to the token embeddings") as caught:
        _ept(base).to_peft_prompt_tuning(tmp_path / "peft")
    assert caught.value.place == "adapter.args.offsets"
    assert not (tmp_path / "peft").exists()


# --- configuration errors ----------------------------------------------------------------------------------------


def test_lamp_prompt_length_must_be_divisible_by_the_pooling_size():
    with pytest.raises(ValueError, match=r"num_virtual_tokens \(10\) must be divisible by pool_size \(3\)"):
        LAMPConfig(num_virtual_tokens=10, pool_size=3)


def test_lamp_rank_is_bounded_by_the_prompt_length_and_the_models_width(base):
    with pytest.raises(ValueError, match=r"r \(11\) cannot exceed num_virtual_tokens \(10\)"):
        LAMPConfig(num_virtual_tokens=10, r=11)
    with pytest.raises(LLMRecError, match="exceeds the model's embedding width d = 64") as caught:
        LAMP.attach(copy.deepcopy(base), {"num_virtual_tokens": 100, "r": 65})
    assert caught.value.place == "adapter.args.r"


def test_an_input_longer_than_the_offset_table_is_refused_before_any_computation(tokenizer, base):
    model = _ept(base, max_length=4).eval()
    calls = []
    model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    batch = tokenizer(["Will the user like it? Answer: Yes"], return_tensors="pt")
    length = batch["input_ids"].shape[1]
    with pytest.raises(LLMRecError, match=f"an input is {length} tokens long, but .* has n = 4 rows") as caught:
        model(**batch)
    assert caught.value.place == "adapter.args.max_length" and not calls
    fits = tokenizer(["Answer"], return_tensors="pt")
    with pytest.raises(LLMRecError, match="adapter.args.max_length"):  # generated tokens count too
        model.generate(**fits, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert _ept(base, max_length=4, offsets=False).eval()(**batch).logits.shape[1] == length


def test_packed_batches_are_refused(base):
    model = _ept(base).eval()
    with pytest.raises(LLMRecError, match="packed or padding-free"):
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), position_ids=torch.tensor([[0, 1, 0, 1]]))


# --- recipes: the prompt adapters through llmrec's SFT stage and ranking evaluation --------------------------


@pytest.mark.parametrize(
    "adapter",
    [
        {"method": "ept", "args": {"num_virtual_tokens": 4, "max_length": 160, "r": 4, "prompt_learning_rate": 3e-2,
                                   "low_rank_learning_rate": 3e-3}},
        {"method": "lamp", "args": {"num_virtual_tokens": 8, "r": 4, "pool_size": 2}},
        {"method": "prompt_tuning", "args": {"num_virtual_tokens": 4}},
    ],
    ids=lambda a: a["method"],
)
def test_a_prompt_adapter_recipe_trains_ranks_and_reloads(tmp_path, adapter):
    from conftest import run_cli, small_recipe, write_recipe

    from llmrec.recipe import load_recipe
    from llmrec.run import train
    from llmrec.rundir import RunDir, load_trained

    raw = small_recipe(tmp_path, adapter["method"], adapter=adapter)
    raw["data"]["task"] = {"history_length": 3}
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", raw))
    metrics = train(recipe)
    assert "test/hr@10" in metrics and metrics["train/stage0-sft/global_step"] == 6
    run = RunDir(recipe.run_dir)
    assert (run.final / "adapter_config.json").is_file() and (run.final / "adapter_model.safetensors").is_file()
    assert not (run.final / "model.safetensors").exists()
    _, _, model, _, _ = load_trained(run.path)
    if adapter["method"] != "prompt_tuning":  # stock PEFT keeps its prompt encoder trainable even when loaded frozen
        assert not any(p.requires_grad for p in model.parameters())
    exported = run_cli("export", str(run.path), "--to", "peft-prompt-tuning", str(tmp_path / "exported"))
    if adapter["method"] == "lamp":
        assert exported.returncode == 0, exported.stderr
        assert (tmp_path / "exported" / "adapter_config.json").is_file()
    else:
        assert exported.returncode != 0 and not (tmp_path / "exported").exists()
        assert ("adapter.args.offsets" if adapter["method"] == "ept" else "only EPT and LAMP") in exported.stderr
