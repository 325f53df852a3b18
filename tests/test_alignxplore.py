"""AlignXplore+: the output format, synthesis and its verification filter, the streaming reward coupling, the RL
trainer's rollout on a tiny model, and the SFT -> RL recipe chain end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, write_recipe

from llmrec.data.behaviours import Behaviour, BehaviourDataConfig, describe_persona, persona_world
from llmrec.data.preference_summaries import (
    SynthesisConfig,
    TemplateTeacher,
    format_output,
    format_prompt,
    parse_output,
)
from llmrec.eval.judges import JudgeQuestion, RuleJudge
from llmrec.tasks.preference_summary import synthesise
from llmrec.trainers.alignxplore import AlignXploreConfig, group_advantages, streaming_rewards


@pytest.mark.parametrize(("text", "expected"), [
    (" <think>comedy chosen twice</think> Likes comedy.", ("comedy chosen twice", "Likes comedy.")),
    ("<think></think>Likes comedy.", ("", "Likes comedy.")),
    (" <think>a</think> <think>b</think> Likes comedy.", None),  # two think blocks
    (" <think>a <think>b</think> Likes comedy.", None),  # nested
    (" Likes comedy.", None),  # no think block
    (" <think>reasoning</think>   ", None),  # empty summary
    (" <think>reasoning", None),  # unclosed
    ("Sure. <think>a</think> Likes comedy.", None),  # text before the block
])
def test_format_reward_edge_cases(text, expected):
    assert parse_output(text) == expected


def test_streaming_coupling_on_a_hand_made_group():
    stage1, stage2 = [0.2, 0.6, 0.0, 1.0], [0.5, 1.0, 0.0, 0.5]  # mean 0.5
    coupled = streaming_rewards(stage1, stage2, picked=1, lam=0.9, unpicked_scale=0.5)
    assert coupled == pytest.approx([0.2 + 0.225, 0.6 + 0.45, 0.0 + 0.225, 1.0 + 0.225])
    advantages = group_advantages(coupled)
    assert sum(advantages) == pytest.approx(0.0, abs=1e-9)
    rewards = torch.tensor(coupled, dtype=torch.float64)
    assert advantages == pytest.approx(((rewards - rewards.mean()) / (rewards.std() + 1e-4)).tolist(), abs=1e-9)
    assert group_advantages([0.5, 0.5]) == [0.0, 0.0]


def test_rl_config_needs_an_even_group_with_streaming():
    common = {"output_dir": "unused", "use_cpu": True, "bf16": False, "per_device_train_batch_size": 6}
    with pytest.raises(ValueError, match="even"):
        AlignXploreConfig(num_generations=3, **common)
    AlignXploreConfig(num_generations=3, streaming=False, **common)


class _OneWordJudge(RuleJudge):
    """The rule judge, but every call is recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def prob_correct(self, questions):
        self.calls += questions
        return super().prob_correct(questions)


def test_synthesis_keeps_only_summaries_the_judge_verifies():
    users = persona_world(BehaviourDataConfig(num_users=30), seed=0)
    judge = _OneWordJudge()
    config = SynthesisConfig(max_targets=3, candidates_per_target=3, min_merged_accuracy=0.6)
    rows, records = synthesise(users, TemplateTeacher(dropout=0.5), judge, config, seed=0)
    part1 = [r for r in records if r.stage == "part1"]
    assert any(r.kept for r in part1) and any(not r.kept for r in part1)
    for record in part1:  # kept exactly when the judge picked the chosen option of its target
        assert record.kept == ("picked the chosen" in record.reason)
    by_user = {u.user_id: u for u in users}
    for row in rows:
        summary = parse_output(row["completion"])[1]
        part1_, part2, part3 = by_user[row["user_id"]].parts()
        targets = (part2 if row["kind"] == "first" else part3)[: config.max_targets]
        correct = [p > 0.5 for p in judge.prob_correct([JudgeQuestion(summary, t.query, t.chosen, t.rejected)
                                                        for t in targets])]
        assert sum(correct) / len(targets) >= config.min_merged_accuracy
    kept_users = {r.user_id for r in records if r.stage == "merged" and r.kept}
    assert {row["user_id"] for row in rows if row["kind"] == "first"} == kept_users
    dropped = [r for r in records if r.stage == "merged" and not r.kept]
    assert all("answered" in r.reason or "no candidate" in r.reason for r in dropped)


def test_prompts_carry_the_past_summary_and_every_behaviour():
    behaviours = [Behaviour("Which movie?", "A (comedy)", "B (horror)"),
                  Behaviour("Which movie?", "C (drama)", "D (war)")]
    first, update = format_prompt(None, behaviours), format_prompt("Likes comedy.", behaviours)
    assert "Past preference summary: Not provided." in first and "Past preference summary: Likes comedy." in update
    assert "1. Which movie? Chosen: A (comedy). Rejected: B (horror)." in first and "2. " in first


def test_the_oracle_summary_beats_no_summary_with_the_rule_judge():
    users = persona_world(BehaviourDataConfig(num_users=40), seed=1)
    questions = [(describe_persona(u.preferences), b) for u in users for b in u.parts()[2]]
    judge = RuleJudge()
    oracle = judge.accuracy([JudgeQuestion(s, b.query, b.chosen, b.rejected) for s, b in questions])
    none = judge.accuracy([JudgeQuestion("", b.query, b.chosen, b.rejected) for _, b in questions])
    assert none == 0.5 and oracle > 0.8


def test_teacher_candidates_differ_and_merge_keeps_the_majority():
    user = persona_world(BehaviourDataConfig(num_users=1), seed=0)[0]
    teacher = TemplateTeacher(dropout=0.5)
    outputs = teacher.write(None, user.parts()[0], user.parts()[1][0], 6, np.random.default_rng(0))
    assert all(parse_output(o) for o in outputs) and len(set(outputs)) > 1
    assert (teacher.merge(["Likes comedy, drama.", "Likes comedy. Dislikes war.", "Likes drama."])
            == "Likes comedy, drama.")
    assert format_output("r", "s") == " <think>r</think> s"


def test_the_teachers_own_summary_states_every_net_word_without_sampling():
    behaviours = [Behaviour("Which movie?", "A (comedy, drama)", "B (horror)"),
                  Behaviour("Which movie?", "C (comedy)", "D (drama, war)")]
    teacher = TemplateTeacher(dropout=0.9)
    assert teacher.summary(None, behaviours) == "Likes comedy. Dislikes horror, war."  # drama nets to 0
    assert teacher.summary("Likes western.", behaviours) == "Likes comedy, western. Dislikes horror, war."
    assert teacher.summary(None, []) == "No clear preference."


def _recipes(tmp_path):
    base = {
        "run": {"seed": 0, "output_dir": str(tmp_path / "runs")},
        "data": {"summaries": {"behaviours": {"num_users": 40, "behaviours_per_user": 12},
                               "transfer_judge": {"kind": "rule", "likes_only": True},
                               "synthesis": {"max_targets": 2, "min_merged_accuracy": 0.5}, "max_new_tokens": 24}},
        "adapter": {"method": "none"},
        "eval": {"task": "preference_summary", "batch_size": 8},
    }
    sft = {**base, "run": {**base["run"], "name": "ax-sft"},
           "model": {"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 600},
           "stages": [{"trainer": "alignxplore_sft", "args": {"max_steps": 3, "per_device_train_batch_size": 8,
                                                              "save_steps": 100, "max_length": 384}}]}
    rl = {**base, "run": {**base["run"], "name": "ax-rl"},
          "model": {"name": str(tmp_path / "runs" / "ax-sft" / "final")},
          "stages": [{"trainer": "alignxplore", "args": {"max_steps": 2, "per_device_train_batch_size": 8,
                                                         "num_generations": 4, "max_completion_length": 24,
                                                         "logging_steps": 1, "save_steps": 100}}]}
    return write_recipe(tmp_path / "sft.yaml", sft), write_recipe(tmp_path / "rl.yaml", rl)


def test_sft_then_rl_chain_end_to_end(tmp_path):
    sft, rl = _recipes(tmp_path)
    result = run_cli("train", str(sft))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ax-sft"
    records = [json.loads(line) for line in (run / "synthesis.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} >= {"part1", "merged"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/no_summary"] == 0.5 and 0 <= metrics["test/model"] <= 1 and "test/oracle" in metrics
    assert "test/transfer/rule/model" in metrics
    # the template teacher's own summaries: a baseline between no summary and the hidden persona
    assert 0.5 < metrics["test/teacher"] <= metrics["test/oracle"] and "test/transfer/rule/teacher" in metrics

    result = run_cli("train", str(rl))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ax-rl"
    history = json.loads(
        (run / "checkpoints" / "stage0-alignxplore" / "result" / "llmrec_stage.json").read_text())["log_history"]
    logged = {k for entry in history for k in entry}
    assert {"summary/format", "summary/judge", "summary/format2", "summary/judge2"} <= logged
    assert "test/streaming" in json.loads((run / "metrics.json").read_text())


def test_recipe_without_summaries_is_refused(tmp_path):
    from llmrec.errors import LLMRecError
    from llmrec.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", {"run": {"name": "x", "output_dir": str(tmp_path)},
                                              "model": {"name": "tiny:qwen2-xs"},
                                              "stages": [{"trainer": "alignxplore_sft"}]})
    with pytest.raises(LLMRecError, match=r"r\.yaml:\d+.*data.summaries"):
        load_recipe(path)


def test_rl_rows_hold_each_training_users_parts_and_targets(tmp_path):
    from llmrec.data.preference_summaries import summary_users
    from llmrec.recipe import load_recipe
    from llmrec.trainers import StageContext
    from llmrec.trainers.alignxplore import rl_datasets

    _, rl = _recipes(tmp_path)
    recipe = load_recipe(rl, instantiate=False)
    rows, _ = rl_datasets(StageContext(recipe, None, None, None, 0, False))
    users = summary_users(recipe.data.summaries, 0, "train")
    assert len(rows) == len(users)
    for row, user in zip(rows, users):
        part1, part2, part3 = user.parts()
        assert row["prompt"] == format_prompt(None, part1)
        assert [Behaviour(**b) for b in json.loads(row["part2"])] == part2
        assert Behaviour(**json.loads(row["target1"])) == part2[0]
        assert Behaviour(**json.loads(row["target2"])) == part3[0]


def test_a_model_teacher_is_prompted_with_the_guide_and_its_outputs_are_verified():
    from llmrec.data.preference_summaries import TeacherConfig
    from llmrec.errors import LLMRecError
    from llmrec.tasks.preference_summary import ModelTeacher, build_teacher

    users = persona_world(BehaviourDataConfig(num_users=6), seed=0)
    seen = []

    def generate(prompts, count):  # a "model" that knows the persona: the ideal summary, or an empty think block
        seen.extend(prompts)
        if prompts[0].startswith("You are a user preference analyst.\nSummary 1:"):
            return [[" <think>merged</think> " + prompts[0].split("Summary 1: ")[1].split("\n")[0]]]
        first_lines = {u.user_id: [format_prompt(None, part[:1]).split("\n")[3] for part in u.parts()[:2]]
                       for u in users}
        user = next(u for u in users if any(line in prompts[0] for line in first_lines[u.user_id]))
        return [[" <think>from the choices</think> " + describe_persona(user.preferences), "no think block"][:count]]

    rows, records = synthesise(users, ModelTeacher(generate), RuleJudge(), SynthesisConfig(max_targets=2), seed=0)
    assert any("Chosen:" in p and "without naming it" in p for p in seen)
    assert {r.reason for r in records if r.stage == "part1" and not r.kept} >= {"malformed output"}
    assert len(rows) > 0 and all("Likes" in row["completion"] or "Dislikes" in row["completion"] for row in rows)
    with pytest.raises(LLMRecError, match="base_url"):
        build_teacher(TeacherConfig(kind="endpoint", model="m"))


def test_summaries_need_their_evaluation_and_data_stats_describe_the_users(tmp_path):
    from llmrec.errors import LLMRecError
    from llmrec.recipe import load_recipe

    recipe = {"run": {"name": "x", "output_dir": str(tmp_path)}, "model": {"name": "tiny:qwen2-xs"},
              "data": {"summaries": {"behaviours": {"num_users": 10}}}}
    with pytest.raises(LLMRecError, match="eval.task: preference_summary"):
        load_recipe(write_recipe(tmp_path / "a.yaml", recipe))
    recipe["eval"] = {"task": "preference_summary"}
    result = run_cli("data", "stats", str(write_recipe(tmp_path / "b.yaml", recipe)))
    assert result.returncode == 0, result.stderr
    assert "train users: 8 (16-16 behaviours each)" in result.stdout and "Past preference summary" in result.stdout


def test_the_trainer_replaces_trls_advantages_with_per_stage_ones(tmp_path):
    """Two users, two stages of two outputs each: the advantages the loss receives are normalised within each stage
    (from the streaming-coupled rewards), not over the four outputs of a user together as TRL's would be."""
    from datasets import Dataset

    from llmrec.models.tiny import build_tiny_model, train_tokenizer
    from llmrec.trainers.alignxplore import AlignXploreTrainer

    users = persona_world(BehaviourDataConfig(num_users=4, behaviours_per_user=12), seed=0)[:2]
    rows = []  # as the stage builds them (trainers.alignxplore.rl_datasets)
    for user in users:
        part1, part2, part3 = user.parts()
        rows.append({"prompt": format_prompt(None, part1), "part2": json.dumps([b.__dict__ for b in part2]),
                     "target1": json.dumps(part2[0].__dict__), "target2": json.dumps(part3[0].__dict__)})
    tokenizer = train_tokenizer([r["prompt"] for r in rows] * 5, 400)
    model = build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0)
    args = AlignXploreConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                             per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                             max_steps=1, seed=0, streaming_lambda=0.9, unpicked_scale=0.5)
    trainer = AlignXploreTrainer(model, judge=RuleJudge(), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
    # scripted judge rewards, one pair per call, in the rollout's order: stage 1 of A and B, then stage 2 of A and B
    scripted = iter([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8], [0.0, 0.6]])
    trainer._score = lambda texts, target: (next(scripted), [None] * len(texts))
    rollouts = []
    original = trainer.summary_rollout
    trainer.summary_rollout = lambda prompts: rollouts.append(original(prompts)) or rollouts[-1]
    batch = next(iter(trainer.get_train_dataloader()))
    output = trainer._generate_and_score_completions(batch)

    rewards = rollouts[0]["reward"]
    assert len(rewards) == 8 and rewards[2:4] == [0.2, 0.8] and rewards[6:8] == [0.0, 0.6]  # stage 2 as judged
    for stage1, scored, stage2 in ((rewards[0:2], [1.0, 0.0], [0.2, 0.8]), (rewards[4:6], [0.9, 0.1], [0.0, 0.6])):
        bonus = 0.9 * sum(stage2) / 2  # the picked stage-1 summary gets λ·mean(stage 2), the other half of it
        assert sorted(round(r - s, 6) for r, s in zip(stage1, scored)) == sorted([round(bonus, 6),
                                                                                  round(0.5 * bonus, 6)])
    expected, joint = [], []
    for user in range(2):
        group = rewards[4 * user: 4 * user + 4]
        expected += group_advantages(group[:2]) + group_advantages(group[2:])
        joint += group_advantages(group)
    torch.testing.assert_close(output["advantages"].double(), torch.tensor(expected, dtype=torch.float64))
    assert not torch.allclose(torch.tensor(expected), torch.tensor(joint), atol=1e-3)  # the two normalisations differ
