"""ECHO: TRL-GRPO equivalence with every part off, the hybrid advantage and adaptive clip, TTRL voting, answer
extraction, arithmetic data, and an end-to-end SFT -> test-time RL -> evaluation recipe."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_cli, write_recipe
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from llmrec.answers import extract_answer, majority_vote, normalize_answer
from llmrec.data.reasoning import ReasoningTaskConfig, reasoning_examples
from llmrec.errors import LLMRecError
from llmrec.trainers.echo import (
    ECHOConfig,
    ECHOTrainer,
    adaptive_clip_radius,
    hybrid_advantages,
    majority_vote_reward,
)


@pytest.fixture(scope="module")
def tokenizer():
    from llmrec.models.tiny import train_tokenizer

    config = ReasoningTaskConfig(train_size=200, valid_size=0, test_size=8)
    texts = []
    for split in ("train", "test"):
        rows = reasoning_examples(config, split, 0)
        texts += [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    return train_tokenizer(texts, 400, split_digits=True)


def test_answer_extraction_and_normalisation():
    assert extract_answer("so \\boxed{\\frac{1}{2}} and later \\boxed{1,000}") == "1000"
    assert extract_answer("3 + 4 = 7. #### 7") == "7"
    assert extract_answer("#### $1,234.0") == "1234"
    assert extract_answer("the total is 12, then -3.") == "-3"
    assert extract_answer("no numbers here") is None
    assert normalize_answer(" \\text{42} ") == "42" and normalize_answer("+5.") == "5"


def test_majority_vote_ties_are_deterministic():
    assert majority_vote(["3", "5", None, "5", "3"]) == ("3", 2)  # tie: the earliest first vote wins
    assert majority_vote(["5", "3", "3", "5"]) == ("5", 2)
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote(["7", None, "7", "2"]) == ("7", 2)


def test_majority_reward_uses_the_pseudo_label_only():
    rewards = majority_vote_reward(["x #### 4", "#### 5", "nothing"], pseudo_label=["4", "4", "4"], answer=["5"] * 3)
    assert rewards == [1.0, 0.0, 0.0]
    assert majority_vote_reward(["#### 4"], pseudo_label=[None]) == [0.0]


def test_arithmetic_world_is_deterministic_balanced_and_correct():
    config = ReasoningTaskConfig(train_size=60, valid_size=6, test_size=30, levels=[1, 2, 3])
    train, test = reasoning_examples(config, "train", 0), reasoning_examples(config, "test", 0)
    assert train["prompt"] == reasoning_examples(config, "train", 0)["prompt"]
    assert not set(train["prompt"]) & set(test["prompt"])
    assert sorted(test["level"]).count(1) == sorted(test["level"]).count(3) == 10
    for solution, answer in zip(train["completion"], train["answer"]):
        value = None
        for step in solution.split(" #### ")[0].strip().split(". "):
            left, result = step.rstrip(".").split(" = ")
            a, op, b = left.split(" ")
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
            assert value is None or int(a) == value
            value = int(result)
        assert str(value) == answer == extract_answer(solution)


def test_any_order_solutions_are_valid_alternative_paths_to_the_same_answer():
    import re

    config = ReasoningTaskConfig(train_size=400, valid_size=0, test_size=0, levels=[2, 3], solution_order="any")
    rows = reasoning_examples(config, "train", 0)
    orders = set()
    for question, solution, answer in zip(rows["prompt"], rows["completion"], rows["answer"]):
        start = int(re.search(r"has (\d+)", question).group(1))
        changes = [int(n) if sign == "+" else -int(n) for sign, n in re.findall(r"([+-]) (\d+) =", solution)]
        asked = [int(n) if verb in ("finds", "buys", "gets", "wins") else -int(n)
                 for verb, n in re.findall(r"(finds|buys|gets|wins|gives away|loses|sells|uses) (\d+)", question)]
        assert sorted(changes) == sorted(asked)  # the question's operations, in some order
        running = start
        for step in re.findall(r"(\d+) [+-] \d+ = (\d+)\.", solution):
            assert int(step[0]) == running and int(step[1]) >= 0  # each step continues the last, never negative
            running = int(step[1])
        assert running == int(answer) and solution.endswith(f"#### {answer}")
        orders.add(changes != asked)
    assert orders == {True, False}  # some solutions take another order than the question's, some do not
    given = reasoning_examples(config.model_copy(update={"solution_order": "given"}), "train", 0)
    assert given["completion"] != rows["completion"]


def test_hybrid_advantage_and_adaptive_clip_arithmetic():
    args = ECHOConfig(**_cpu_args())
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    entropy = torch.tensor([[0.0, 1.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    confidence = torch.tensor([[3.0, 2.0, 1.0, 9.0], [2.0, 2.0, 2.0, 2.0]])
    out = hybrid_advantages(torch.tensor([1.0, -2.0]), entropy, confidence, mask, args, lambda x, reduction: x)
    valid = mask.bool()
    h, c = entropy[valid], confidence[valid]

    def z(x):
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    score = (z(h) + z(1 - c)).clamp(-2, 2)
    expected = torch.tensor([1.0] * 3 + [-2.0] * 4) * (1 + 0.1 * score)
    assert torch.allclose(out[valid], expected, atol=1e-5)
    assert out[0, 3] == 0  # padding
    assert out[0, 2] > out[0, 0]  # uncertain tokens of a rewarded completion get more credit

    eps = adaptive_clip_radius(confidence, mask, ECHOConfig(**{**_cpu_args(), "clip_tail_tokens": 2}))
    c_tail = torch.tensor([1.5, 2.0])
    assert torch.allclose(eps, 0.05 + 0.15 * torch.sigmoid(4 * (1 - c_tail)))


def _cpu_args(**overrides) -> dict:
    return {"output_dir": "unused", "use_cpu": True, "bf16": False, "num_generations": 2,
            "per_device_train_batch_size": 2, **overrides}


def test_config_refuses_fewer_votes_than_generations_and_unknown_tree_settings():
    with pytest.raises(ValueError, match="num_votes"):
        ECHOConfig(**_cpu_args(num_votes=1))
    with pytest.raises(ValueError, match="unknown tree settings"):
        ECHOConfig(**_cpu_args(tree={"entropy_hi": 2.0}))
    with pytest.raises(ValueError, match="entropy_high"):
        ECHOConfig(**_cpu_args(tree={"entropy_high": 0.5}))


def _trainers(tokenizer, tmp_path, **echo_overrides):
    from llmrec.models.tiny import build_tiny_model

    model = build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0)
    questions = reasoning_examples(ReasoningTaskConfig(train_size=0, valid_size=0, test_size=4), "test", 0)
    dataset = Dataset.from_dict({"prompt": questions["prompt"], "answer": questions["answer"]})
    common = dict(use_cpu=True, bf16=False, num_generations=4, per_device_train_batch_size=8, max_completion_length=12,
                  learning_rate=1e-2, max_steps=1, logging_steps=1, report_to=[], seed=0, temperature=1.0,
                  activation_checkpointing=False)
    parts_off = dict(tree_rollouts=False, online_pruning=False, hybrid_advantage=False, adaptive_clip=False)
    echo_args = ECHOConfig(output_dir=str(tmp_path / "echo"), **{**common, **parts_off, **echo_overrides})
    echo = ECHOTrainer(copy.deepcopy(model), args=echo_args, train_dataset=dataset, processing_class=tokenizer)
    batch = [dataset[i] for i in range(2) for _ in range(4)]
    rollout = echo.tree_rollout  # record the ECHO rollout once, so both trainers see the same completions
    recorded = {}

    def replay(prompts, trainer):
        if "out" not in recorded:
            echo._labels = [row["answer"] for row in batch]
            recorded["out"] = rollout(prompts)
            recorded["signals"] = echo._signals
        echo._signals = recorded["signals"]
        return copy.deepcopy(recorded["out"])

    echo.rollout_func = replay
    grpo = GRPOTrainer(copy.deepcopy(model), [majority_vote_reward],
                       GRPOConfig(output_dir=str(tmp_path / "grpo"), **common),
                       train_dataset=dataset, processing_class=tokenizer, rollout_func=replay)
    return echo, grpo, batch


def _loss_and_step(trainer, batch):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests step around
    torch.manual_seed(0)  # the generation batch is shuffled before it is split
    inputs = trainer._prepare_inputs(copy.deepcopy(batch))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads, inputs


def test_every_part_off_gives_trl_grpo_loss_and_gradients(tokenizer, tmp_path):
    echo, grpo, batch = _trainers(tokenizer, tmp_path)
    echo_loss, echo_grads, echo_inputs = _loss_and_step(echo, batch)
    grpo_loss, grpo_grads, grpo_inputs = _loss_and_step(grpo, batch)
    assert torch.equal(echo_inputs["advantages"], grpo_inputs["advantages"])
    assert echo_inputs["advantages"].abs().sum() > 0  # the batch has a learning signal
    assert torch.equal(echo_loss, grpo_loss)
    assert echo_grads.keys() == grpo_grads.keys()
    assert all(torch.equal(echo_grads[k], grpo_grads[k]) for k in echo_grads)


def test_hybrid_advantage_changes_the_loss_and_a_constant_clip_radius_matches_grpo(tokenizer, tmp_path):
    echo, grpo, batch = _trainers(tokenizer, tmp_path, hybrid_advantage=True, adaptive_clip=True)
    echo_loss, _, inputs = _loss_and_step(echo, batch)
    grpo_loss, _, _ = _loss_and_step(grpo, batch)
    assert inputs["advantages"].dim() == 2 and not torch.equal(echo_loss, grpo_loss)
    # with a ratio away from 1, a (B,) radius of 0.2 everywhere clips exactly as GRPO's scalar epsilon 0.2
    shifted = dict(inputs)
    with torch.no_grad():
        logps, _, _ = echo._get_per_token_logps_and_entropies(
            echo.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
    shifted["old_per_token_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    shifted["clip_epsilon"] = torch.full((logps.shape[0],), 0.2)
    plain = {k: v for k, v in shifted.items() if k != "clip_epsilon"}
    assert torch.allclose(echo._compute_loss(echo.model, shifted), GRPOTrainer._compute_loss(echo, echo.model, plain))
    shifted["clip_epsilon"] = torch.full((logps.shape[0],), 0.01)
    assert not torch.allclose(echo._compute_loss(echo.model, shifted),
                              GRPOTrainer._compute_loss(echo, echo.model, plain))


def test_votes_outnumber_trained_samples(tokenizer, tmp_path):
    echo, _, batch = _trainers(tokenizer, tmp_path, num_votes=8, tree_rollouts=True,
                               tree={"entropy_high": 1.0, "entropy_low": 0.5, "branch_confidence": 9.0,
                                     "entropy_jump": -10.0, "min_depth": 3})
    echo._labels = [row["answer"] for row in batch]
    out = echo.tree_rollout([row["prompt"] for row in batch])
    assert len(out["completion_ids"]) == 8  # 2 questions x num_generations, drawn from 8 votes each
    assert len(set(out["pseudo_label"][:4])) == 1 and len(set(out["pseudo_label"][4:])) == 1
    metrics = echo._metrics["train"]
    assert metrics["rollout/forks_per_question"][-1] > 0
    assert metrics["rollout/effective_leaves"][-1] == 8 - metrics["rollout/fills_per_question"][-1]


def test_recipe_without_reasoning_data_is_refused(tmp_path):
    from llmrec.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", {"run": {"name": "x", "output_dir": str(tmp_path)},
                                              "model": {"name": "tiny:qwen2-xs"},
                                              "stages": [{"trainer": "echo", "args": {"num_generations": 2}}]})
    with pytest.raises(LLMRecError, match=r"r\.yaml:\d+.*data.reasoning"):
        load_recipe(path)


def test_sft_then_test_time_rl_recipe_end_to_end(tmp_path):
    recipe = {
        "run": {"name": "echo-e2e", "seed": 0, "output_dir": str(tmp_path / "runs")},
        "model": {"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 400, "tokenizer_split_digits": True},
        "data": {"reasoning": {"train_size": 64, "valid_size": 0, "test_size": 4, "levels": [1]}},
        "adapter": {"method": "none"},
        "stages": [
            {"trainer": "sft", "args": {"max_steps": 4, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                                        "logging_steps": 2, "save_steps": 100, "max_length": 96}},
            {"trainer": "echo", "args": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
                                         "num_votes": 6, "max_completion_length": 12, "learning_rate": 1e-3,
                                         "logging_steps": 1, "save_steps": 100,
                                         "tree": {"entropy_high": 1.0, "entropy_low": 0.5, "branch_confidence": 9.0,
                                                  "entropy_jump": -10.0, "min_depth": 3}}},
        ],
        "eval": {"task": "reasoning", "samples": 4, "max_new_tokens": 12, "batch_size": 4},
    }
    result = run_cli("train", str(write_recipe(tmp_path / "echo.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    run = tmp_path / "runs" / "echo-e2e"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test/mean_accuracy"] <= 1 and metrics["test/questions"] == 4
    history = json.loads(
        (run / "checkpoints" / "stage1-echo" / "result" / "llmrec_stage.json").read_text())["log_history"]
    logged = {k for entry in history for k in entry}
    assert {"rollout/decoded_tokens_per_question", "rollout/pruned_fraction", "ttrl/label_agreement",
            "echo/clip_radius", "rollout/mean_entropy"} <= logged
    assert "mean@4" in result.stdout or "mean" in result.stdout


def test_jsonl_problems_load_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"q": "1 + 1?", "a": "2"}\n{"q": "2 + 2?", "a": "$4$"}\n{"q": "3 + 3?", "a": "6.0"}\n')
    config = ReasoningTaskConfig(source="jsonl", path=str(path), question_field="q", answer_field="a", test_size=2,
                                 valid_size=0, train_size=None)
    test = reasoning_examples(config, "test", 0)
    assert len(test) == 2 and set(test["answer"]) <= {"2", "4", "6"}
    assert reasoning_examples(config, "train", 0)["completion"][0].startswith(" #### ")
    path.write_text('{"q": "1 + 1?", "a": "2"}\n{"q": "2 + 2?"}\n')
    with pytest.raises(LLMRecError, match="no 'a' field") as err:
        reasoning_examples(config.model_copy(update={"test_size": 1}), "test", 0)
    assert err.value.place == f"{path}:2"


def test_hub_sources_read_a_local_copy(tmp_path):
    import json

    folder = tmp_path / "math500"
    folder.mkdir()
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"It is \\boxed{{{2 * i}}}.", "answer": f"{2 * i}",
             "level": 1 + i % 5}
            for i in range(5)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ReasoningTaskConfig(source="math500", path=str(folder), train_size=None, valid_size=0, test_size=3)
    test = reasoning_examples(config, "test", 0)
    assert len(test) == 3 and all(extract_answer(c) == a for c, a in zip(test["completion"], test["answer"]))
    assert test["prompt"][0].startswith("Question: What is")


def test_weighted_majority_vote():
    assert majority_vote(["3", "5", "5"], [2.5, 1.0, 1.0]) == ("3", 2.5)
    assert majority_vote(["3", "5"], [1.0, 1.0]) == ("3", 1.0)
    with pytest.raises(ValueError, match="vote_weighting"):
        ECHOConfig(**_cpu_args(vote_weighting="weighted"))


def test_data_stats_describes_the_problems(tmp_path):
    recipe = {"run": {"name": "x", "output_dir": str(tmp_path)}, "model": {"name": "tiny:qwen2-xs"},
              "data": {"reasoning": {"train_size": 8, "valid_size": 0, "test_size": 4, "levels": [1, 2]}},
              "eval": {"task": "reasoning"}}
    result = run_cli("data", "stats", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stderr
    assert "test problems: 4 (levels 1: 2, 2: 2)" in result.stdout and "#### " in result.stdout
