"""Preference alignment: softmax DPO against TRL's DPO, CausalDPO against softmax DPO, masking, the environment
head."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from llmrec.errors import LLMRecError
from llmrec.eval.metrics import normalised_mutual_information
from llmrec.models.tiny import build_tiny_model, train_tokenizer
from llmrec.trainers.causal_dpo import (
    CausalDPOConfig,
    CausalDPOTrainer,
    EnvironmentHead,
    environment_loss,
    weighted_mmd2,
)
from llmrec.trainers.softmax_dpo import SoftmaxDPOConfig, SoftmaxDPOTrainer

TITLES = ["Golden River", "Silent Road", "Wild Jazz", "Quiet Garden", "Frozen Empire", "Lost Letters",
          "Bright Station", "Velvet Dreams", "Iron Harbor", "Crimson Kingdom"]


def _prompt(i: int) -> str:
    return f"History:\n{TITLES[i % 10]}\n{TITLES[(i + 3) % 10]}\nNext:\n"


ROWS = [  # (prompt, chosen, negatives)
    (_prompt(i), TITLES[(i + 1) % 10], [TITLES[(i + 2 + j) % 10] for j in range(n)])
    for i, n in enumerate([3, 1, 2, 3, 1, 2])
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([*TITLES, *(_prompt(i) for i in range(10))] * 5, 400)


@pytest.fixture(scope="module")
def base(tokenizer):
    return build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0)


def _policy(base):
    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def _args(config_class, tmp_path, **extra):
    defaults = dict(per_device_train_batch_size=4, beta=0.1, report_to="none", use_cpu=True, bf16=False,
                    activation_checkpointing=False, max_length=128, seed=0, logging_steps=1, save_strategy="no")
    return config_class(output_dir=str(tmp_path), **{**defaults, **extra})


def _perturb(model) -> None:
    """Move the policy away from its reference (TRL's frozen copy of the adapter), identically in every model."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".default." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _loss_and_grads(trainer, rows: list[int]):
    trainer.model.train()
    trainer.model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None and ".default." in n}
    return loss.detach(), grads


def _multi(rows=ROWS, **columns) -> Dataset:
    data = {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]}
    return Dataset.from_dict({**data, **columns})


def test_softmax_dpo_with_one_negative_is_trl_sigmoid_dpo(tokenizer, base, tmp_path):
    pairs = [(p, c, n[0]) for p, c, n in ROWS]
    trl_rows = Dataset.from_dict({"prompt": [r[0] for r in pairs], "chosen": [r[1] for r in pairs],
                                  "rejected": [r[2] for r in pairs]})
    ours_rows = _multi([(p, c, [n]) for p, c, n in pairs])
    reference = DPOTrainer(_policy(base), args=_args(DPOConfig, tmp_path / "a"), train_dataset=trl_rows,
                           processing_class=tokenizer)
    ours = SoftmaxDPOTrainer(_policy(base), args=_args(SoftmaxDPOConfig, tmp_path / "b"), train_dataset=ours_rows,
                             processing_class=tokenizer)
    _perturb(reference.model)
    _perturb(ours.model)
    batch_rows = [0, 1, 2, 3]
    trl_batch = reference.data_collator([reference.train_dataset[i] for i in batch_rows])
    our_batch = ours.data_collator([ours.train_dataset[i] for i in batch_rows])
    assert torch.equal(trl_batch["input_ids"], our_batch["input_ids"])  # one stacked forward, laid out like TRL's

    expected_loss, expected_grads = _loss_and_grads(reference, batch_rows)
    loss, grads = _loss_and_grads(ours, batch_rows)
    assert expected_loss.item() != pytest.approx(0.6931, abs=1e-3)  # the policy differs from its reference
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert expected_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert ours._metrics["train"][key][-1] == pytest.approx(reference._metrics["train"][key][-1], rel=1e-5,
                                                                abs=1e-7)


def test_rows_with_different_numbers_of_negatives_equal_the_per_row_losses(tokenizer, base, tmp_path):
    trainer = SoftmaxDPOTrainer(_policy(base), args=_args(SoftmaxDPOConfig, tmp_path), train_dataset=_multi(),
                                processing_class=tokenizer)
    _perturb(trainer.model)
    rows = [0, 1, 2]  # 3, 1 and 2 negatives
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    assert batch["negatives_per_row"].tolist() == [3, 1, 2] and batch["input_ids"].shape[0] == 3 + 6
    with torch.no_grad():
        together = trainer.compute_loss(trainer.model, batch)
        alone = [trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i]])) for i in rows]
    torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)

    # and each row's loss is S-DPO's formula, computed from log-probabilities by hand
    row = trainer.train_dataset[0]
    with torch.no_grad():
        def logp(model, completion):
            ids = torch.tensor([row["prompt_ids"] + completion])
            logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1 : -1].log_softmax(-1)
            return logits.gather(-1, torch.tensor(completion).unsqueeze(-1)).sum()

        def reward(completion):
            policy = logp(trainer.model, completion)
            with _ref(trainer.model):
                ref = logp(trainer.model, completion)
            return 0.1 * (policy - ref)

        chosen = reward(row["chosen_ids"])
        gaps = torch.stack([reward(ids) - chosen for ids in row["rejected_ids"]])
        expected = -torch.nn.functional.logsigmoid(-torch.logsumexp(gaps, 0))
    torch.testing.assert_close(alone[0], expected, rtol=1e-4, atol=1e-5)


def _ref(model):
    from trl.trainer.utils import use_adapter

    return use_adapter(model, adapter_name="ref")


def test_causal_dpo_with_one_environment_and_no_penalty_is_softmax_dpo(tokenizer, base, tmp_path):
    softmax = SoftmaxDPOTrainer(_policy(base), args=_args(SoftmaxDPOConfig, tmp_path / "a"), train_dataset=_multi(),
                                processing_class=tokenizer)
    causal = CausalDPOTrainer(
        _policy(base),
        args=_args(CausalDPOConfig, tmp_path / "b", num_environments=1, invariance_weight=0.0,
                   environment_init_samples=6),
        train_dataset=_multi(),
        processing_class=tokenizer,
    )
    _perturb(softmax.model)
    _perturb(causal.model)
    rows = [0, 1, 2, 3]
    expected_loss, expected_grads = _loss_and_grads(softmax, rows)
    loss, grads = _loss_and_grads(causal, rows)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_environment_head_refits_and_reloads_with_identical_memberships(tokenizer, base, tmp_path):
    args = _args(CausalDPOConfig, tmp_path, num_environments=2, invariance_weight=0.1, max_steps=3, learning_rate=5e-3,
                 environment_init_samples=6, backdoor_prior="marginal", environment_refit_steps=1)
    rows = _multi(environment=[0, 1, 0, 1, 0, 1])  # true environments: logged against, not used (mode inferred)
    trainer = CausalDPOTrainer(_policy(base), args=args, train_dataset=rows, processing_class=tokenizer)
    head = trainer.environment_head
    assert not list(head.parameters())  # nothing for the optimizer: the loss does not choose environments
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert head.membership_count == 6 and head.pool_seen == 6  # the initialisation pass over the training prompts
    trainer.train()
    after = head.state_dict()
    assert torch.equal(before["weight"], after["weight"]) and torch.equal(before["bias"], after["bias"])  # g fixed
    assert not torch.equal(before["centres"], after["centres"])  # refitted on the policy's moving states
    assert head.membership_count == 6 + 3 * 4 - 2  # 3 steps over 6 rows in batches of 4: 4 + 2 + 4
    assert head.pool_seen == 6 + 10
    logged = trainer.state.log_history[0]
    assert {"loss/backdoor", "loss/invariance", "environment/0/mass", "environment/1/mass", "environment/nmi",
            "rewards/accuracies"} <= logged.keys()
    assert 0 <= logged["environment/nmi"] <= 1

    trainer.save_model(str(tmp_path / "saved"))
    assert {"environment_head.safetensors", "environment_head.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "saved").iterdir()
    }
    loaded = EnvironmentHead.from_pretrained(tmp_path / "saved")
    states = torch.randn(5, head.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(states), head(states), rtol=0, atol=0)
    torch.testing.assert_close(loaded.marginal(), head.marginal(), rtol=0, atol=0)
    assert json.loads((tmp_path / "saved" / "environment_head.json").read_text())["num_environments"] == 2


def test_known_environments_take_memberships_from_the_column(tokenizer, base, tmp_path):
    rows = _multi(environment=[0, 1, 0, 1, 0, 1])
    args = _args(CausalDPOConfig, tmp_path, environment_mode="known", num_environments=2, backdoor_prior="marginal")
    trainer = CausalDPOTrainer(_policy(base), args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.environment_head.marginal().tolist() == [0.5, 0.5]
    _perturb(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in [0, 1, 2, 3]])
    assert batch["environment"].tolist() == [0, 1, 0, 1]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        logged_backdoor = trainer._metrics["train"]["loss/backdoor"][-1]
        logged_penalty = trainer._metrics["train"]["loss/invariance"][-1]
        per_row = torch.stack([trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i]]))
                               for i in [0, 1, 2, 3]])
    # L_BA with P(k) = 1/2: the mean of the two environments' mean losses, plus λ·MMD
    backdoor = 0.5 * (per_row[[0, 2]].mean() + per_row[[1, 3]].mean())
    assert logged_backdoor == pytest.approx(backdoor.item(), rel=1e-5)
    assert logged_penalty > 0
    assert loss.item() == pytest.approx(backdoor.item() + 0.001 * logged_penalty, rel=1e-5)


def _two_environments(rows: int = 3200, hidden: int = 32, seed: int = 0):
    """States of two well-separated environments, and a per-row loss that one other state direction predicts (the
    setting in which environments trained by the loss collapsed onto the lowest-loss rows)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % 2
    axis, loss_axis = torch.zeros(hidden), torch.zeros(hidden)
    axis[0], loss_axis[1] = 3.0, 1.0
    states = torch.randn(rows, hidden, generator=generator) + (2 * labels - 1).unsqueeze(1).float() * axis
    return states, labels, loss_axis


@pytest.mark.parametrize("invariance", ["mmd", "vrex"])
def test_training_under_the_causal_dpo_loss_keeps_the_inferred_environments(invariance):
    states, labels, loss_axis = _two_environments()
    head = EnvironmentHead(states.shape[1], 8, 2, 1.0, pool_size=512)
    generator = torch.Generator().manual_seed(0)
    head.fit(states[torch.randperm(len(states), generator=generator)[:512]], generator)

    def nmi_and_masses():
        with torch.no_grad():
            memberships = head(policy_states)
        assigned = memberships.argmax(dim=1).tolist()
        masses = torch.bincount(memberships.argmax(dim=1), minlength=2).float() / len(states)
        return normalised_mutual_information(assigned, labels.tolist()), masses

    # the policy's states are trainable, as the policy's are: the loss may move them, but not choose environments
    policy_states = torch.nn.Parameter(states.clone())
    initial, _ = nmi_and_masses()
    assert initial > 0.6
    optimiser = torch.optim.Adam([policy_states, *head.parameters()], lr=5e-4)
    for step in range(1, 301):
        batch = torch.randint(len(states), (16,), generator=generator)
        rows = policy_states[batch]
        per_row_loss = torch.nn.functional.softplus(rows @ loss_axis)
        memberships = head(rows)
        loss, *_ = environment_loss(per_row_loss, memberships, torch.ones(2), invariance, 0.1, per_row_loss, None)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        head.remember(head.embed(rows.detach()))
        if step % 50 == 0:
            head.refit()
    final, masses = nmi_and_masses()
    assert final >= 0.9 * initial, (initial, final)
    assert masses.min() >= 0.2, masses


def test_environment_loss_is_the_prior_weighted_risk_plus_the_penalty():
    per_row = torch.tensor([1.0, 2.0, 3.0, 6.0])
    memberships = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    loss, backdoor, penalty, risks, mass, present = environment_loss(
        per_row, memberships, torch.tensor([1.0, 3.0]), "vrex", 0.5, per_row, None)
    torch.testing.assert_close(risks, torch.tensor([(1 + 2 + 3) / 2.5, (3 + 3) / 1.5]))
    torch.testing.assert_close(backdoor, 0.25 * risks[0] + 0.75 * risks[1])
    torch.testing.assert_close(penalty, risks.var(unbiased=False))
    torch.testing.assert_close(loss, backdoor + 0.5 * penalty)
    assert mass.tolist() == [2.5, 1.5] and present.tolist() == [True, True]
    weights, losses = memberships.clone().requires_grad_(True), per_row.clone().requires_grad_(True)
    environment_loss(losses, weights, torch.ones(2), "mmd", 1.0, losses, None)[0].backward()
    assert weights.grad is None and losses.grad.abs().sum() > 0  # memberships are taken as given; the losses train


def test_weighted_mmd_is_zero_for_equal_weights_and_positive_otherwise():
    x = torch.tensor([0.0, 0.1, 2.0, 2.1])
    same = weighted_mmd2(x, torch.ones(4), torch.ones(4), None)
    apart = weighted_mmd2(x, torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]), 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7) and apart.item() > 0.5


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (_multi([(ROWS[0][0], ROWS[0][1], [])]), "'rejected' is empty"),
        (_multi([(ROWS[0][0], ROWS[0][1], [ROWS[0][1], "Wild Jazz"])]), "is also among its rejected items"),
    ],
    ids=["empty rejected", "rejected equals chosen"],
)
def test_bad_preference_rows(tokenizer, base, tmp_path, rows, message):
    with pytest.raises(LLMRecError, match=message):
        SoftmaxDPOTrainer(_policy(base), args=_args(SoftmaxDPOConfig, tmp_path), train_dataset=rows,
                          processing_class=tokenizer)


def test_bad_causal_dpo_settings(tokenizer, base, tmp_path):
    with pytest.raises(LLMRecError, match="no 'environment' column"):
        CausalDPOTrainer(_policy(base), args=_args(CausalDPOConfig, tmp_path, environment_mode="known"),
                         train_dataset=_multi(), processing_class=tokenizer)
    with pytest.raises(LLMRecError, match="num_environments is 8 but there are only 6 training prompts"):
        CausalDPOTrainer(_policy(base), args=_args(CausalDPOConfig, tmp_path, num_environments=8),
                         train_dataset=_multi(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="loss_type"):
        _args(SoftmaxDPOConfig, tmp_path, loss_type=["ipo"])
    with pytest.raises(ValueError, match="backdoor_prior"):
        _args(CausalDPOConfig, tmp_path, backdoor_prior="batch")


@pytest.mark.slow
def test_causal_dpo_recipe_runs_end_to_end(tmp_path):
    from conftest import run_cli

    overrides = [f"run.output_dir={tmp_path}", "data.source.num_users=120", "stages.0.args.max_steps=20",
                 "stages.1.args.max_steps=4", "eval.max_targets=20", "eval.valid_item_samples=4"]
    result = run_cli("train", "recipes/causal_dpo/tiny.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "causal-dpo-tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("test", "ood_environment", "ood_popularity"):
        assert 0 <= metrics[f"{split}/hr@10"] <= 1 and 0 <= metrics[f"{split}/over_rec@10"] <= 1
        assert f"baseline/popularity/{split}/ndcg@20" in metrics
        assert (run / "predictions" / f"{split}.jsonl").is_file()
    assert metrics["train/stage1-causal_dpo/global_step"] == 4
    final = {p.name for p in (run / "final").iterdir()}
    assert {"adapter_model.safetensors", "environment_head.safetensors", "environment_head.json"} <= final
    assert not (run / "final" / "ref").exists()  # TRL's reference copy of the adapter is not part of the result
    history = json.loads((run / "checkpoints" / "stage1-causal_dpo" / "result" / "llmrec_stage.json").read_text())
    assert any("loss/invariance" in entry for entry in history["log_history"])
    card = (run / "README.md").read_text()
    assert "## Results: environment-shift test" in card and "## Results: popularity-shift test" in card


@pytest.mark.slow
def test_pairwise_dpo_recipe_with_the_models_own_hard_negatives(tmp_path):
    from conftest import run_cli

    overrides = [f"run.output_dir={tmp_path}", "data.source.num_users=60", "stages.0.args.max_steps=10",
                 "stages.1.args.max_steps=3", "stages.1.data.sampler=model", "stages.1.data.negatives=2",
                 "stages.1.data.max_examples_per_user=1", "stages.1.data.model_top_k=5", "eval.max_targets=10",
                 "eval.valid_item_samples=0", "eval.splits=[test]"]
    result = run_cli("train", "recipes/causal_dpo/dpo-tiny.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "dpo-tiny" / "metrics.json").read_text())
    assert metrics["train/stage1-dpo/global_step"] == 3 and "test/hr@10" in metrics
    assert "Ranking the catalog" in result.stderr  # the SFT model ranked the catalog to find hard negatives


def test_causal_dpo_resumes_its_environment_head_from_a_checkpoint(tokenizer, base, tmp_path):
    def trainer(folder, **extra):
        settings = dict(num_environments=2, invariance_weight=0.1, max_steps=4, learning_rate=5e-3,
                        environment_init_samples=6, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                        environment_refit_steps=1)
        args = _args(CausalDPOConfig, folder, **{**settings, **extra})
        return CausalDPOTrainer(_policy(base), args=args, train_dataset=_multi(), processing_class=tokenizer)

    class StopAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    straight = trainer(tmp_path / "straight")
    straight.train()
    interrupted = trainer(tmp_path / "interrupted")
    interrupted.add_callback(StopAfterTwoSteps())
    interrupted.train()
    resumed = trainer(tmp_path / "interrupted")
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2"))
    for name, value in straight.environment_head.state_dict().items():
        torch.testing.assert_close(resumed.environment_head.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.environment_head.membership_count == straight.environment_head.membership_count
    assert resumed.environment_head.pool_seen == straight.environment_head.pool_seen
    torch.testing.assert_close(resumed.environment_head.marginal(), straight.environment_head.marginal())


def test_a_fully_fine_tuned_model_is_saved_without_the_head(tokenizer, base, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = copy.deepcopy(base)
    args = _args(CausalDPOConfig, tmp_path, num_environments=2, environment_init_samples=6)
    trainer = CausalDPOTrainer(policy, ref_model=copy.deepcopy(base), args=args, train_dataset=_multi(),
                               processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "environment_head" in k]  # noqa: SIM118 (safe_open is not iterable)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not hasattr(reloaded, "environment_head")
    assert EnvironmentHead.from_pretrained(tmp_path / "saved").config["num_environments"] == 2
