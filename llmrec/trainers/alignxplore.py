"""AlignXplore+: a model that writes a user's preference summary, trained by SFT on verified synthesised summaries
(`trainer: alignxplore_sft`, TRL's `SFTTrainer` unchanged) and then by RL (`trainer: alignxplore`,
`AlignXploreConfig`/`AlignXploreTrainer` on TRL's `GRPOTrainer`).

RL reward of an output for a target question (query, chosen, rejected): 0 unless the output is exactly one
`<think>...</think>` block followed by a non-empty summary (`llmrec.data.preference_summaries.parse_output`);
otherwise the frozen judge's probability of picking the chosen option given the summary alone, averaged over both
A/B orders (`Judge.prob_correct`).

Streaming (long-term utility), per training user and step, with n = num_generations / 2 outputs per stage:
stage 1 writes n summaries from part 1, rewarded on target 1 (part 2's first behaviour); one of them, drawn at
random, becomes the past summary of stage 2, which writes n updates from part 2, rewarded on target 2 (part 3's first
behaviour); the drawn stage-1 summary gets + lambda * mean(stage-2 rewards), the others + unpicked_scale * lambda *
mean(stage-2 rewards). GRPO advantages are normalised within each stage's n outputs (two groups per user), and both
stages' outputs are trained in the same step. Without streaming, all num_generations outputs are stage 1.

The stage-2 prompts depend on stage-1 outputs, so generation runs in TRL's `rollout_func`: it returns the 2n
completions with their own prompt ids (TRL accepts a prompt per completion) and the precomputed rewards and
advantages; a reward function hands TRL the rewards (for its logs) and the advantages replace TRL's, which would
normalise over all 2n outputs together. Users are handled whole on one process (`llmrec.rollout.grpo.share_groups`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from llmrec.data.behaviours import Behaviour
from llmrec.data.preference_summaries import NO_SUMMARY, format_prompt, parse_output, summary_users
from llmrec.errors import LLMRecError
from llmrec.eval.judges import JudgeQuestion, build_judge
from llmrec.files import write_text
from llmrec.logs import get_logger
from llmrec.rollout import SamplingConfig, TreeConfig
from llmrec.rollout.grpo import generation_backend, share_groups, use_cpu_weight_sync
from llmrec.tasks.preference_summary import build_teacher, synthesise

from . import StageContext, StageSpec

logger = get_logger(__name__)


# --- stage 1: SFT on synthesised, verified summaries --------------------------------------------------------------

def sft_datasets(context: StageContext):
    """Synthesise the training users' examples (generate -> verify -> merge -> re-verify, and streaming updates) and
    write every decision to <run>/synthesis.jsonl."""
    from accelerate import PartialState

    config = context.recipe.data.summaries
    seed = context.recipe.run.seed
    users = summary_users(config, seed, "train", context.data)
    judge = build_judge(config.judge)
    rows, records = synthesise(users, build_teacher(config.teacher), judge, config.synthesis, seed,
                               config.behaviours.fractions)
    if PartialState().is_main_process:
        write_text(context.recipe.run_dir / "synthesis.jsonl", "".join(json.dumps(r.__dict__) + "\n" for r in records))
    kept = len(set(rows["user_id"]))
    logger.info(f"Synthesis kept {kept} of {len(users)} training users: {len(rows)} examples "
                f"({sum(k == 'update' for k in rows['kind'])} streaming updates); decisions in synthesis.jsonl.")
    if not len(rows):
        raise LLMRecError("synthesis kept no user: no summary passed verification; see synthesis.jsonl.",
                          "data.summaries.synthesis")
    return rows.select_columns(["prompt", "completion"]), None


def _needs_summaries(recipe) -> list[tuple[tuple, str]]:
    if recipe.data.summaries is None:
        return [(("data", "summaries"),
                 "AlignXplore+ stages need a data.summaries section (behaviours, judge, synthesis).")]
    return []


ALIGNXPLORE_SFT = StageSpec(
    config_class=SFTConfig,
    trainer_class=SFTTrainer,
    build_datasets=sft_datasets,
    description="SFT on synthesised, judge-verified preference summaries (AlignXplore+ stage 1)",
    recipe_needs=_needs_summaries,
)


# --- stage 2: RL with the judge's reward and the streaming coupling -----------------------------------------------

@dataclass
class AlignXploreConfig(GRPOConfig):
    r"""
    Configuration of [`AlignXploreTrainer`]: every field of `trl.GRPOConfig`, plus AlignXplore+'s streaming reward
    coupling.

        > Parameters that control the streaming reward coupling

        streaming (`bool`, *optional*, defaults to `True`):
            Two-stage rollouts with the long-term utility bonus: per user, n = `num_generations` / 2 stage-1
            summaries written from part 1, and n stage-2 updates written from part 2 on top of one stage-1 summary
            drawn at random (`num_generations` must be even). GRPO advantages are normalised within each stage's n
            outputs. Off: all `num_generations` outputs are stage 1.
        streaming_lambda (`float`, *optional*, defaults to `0.9`):
            lambda: weight of the stage-2 mean reward; the drawn stage-1 summary gets + lambda * mean(stage-2
            rewards).
        unpicked_scale (`float`, *optional*, defaults to `0.5`):
            The unpicked stage-1 outputs get this times lambda: + `unpicked_scale` * lambda * mean(stage-2 rewards).
    """

    streaming: bool = field(default=True, metadata={"help": "Two-stage rollouts with the long-term utility bonus."})
    streaming_lambda: float = field(default=0.9, metadata={"help": "lambda: weight of the stage-2 mean reward."})
    unpicked_scale: float = field(
        default=0.5, metadata={"help": "The unpicked stage-1 outputs get this times lambda."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.streaming and self.num_generations % 2:
            raise ValueError(f"with streaming, num_generations ({self.num_generations}) must be even: half of the "
                             "outputs are stage 1 and half stage 2.")


def precomputed_reward(completions, reward, **kwargs) -> list[float]:
    """The rollout's reward (format x judge, plus the streaming bonus), handed to TRL for its logs."""
    return list(reward)


def streaming_rewards(stage1: list[float], stage2: list[float], picked: int, lam: float,
                      unpicked_scale: float) -> list[float]:
    """Stage-1 rewards plus the long-term utility bonus: lambda * mean(stage 2) for the picked summary, unpicked_scale
    * lambda * mean(stage 2) for the others."""
    bonus = lam * sum(stage2) / len(stage2)
    return [r + (bonus if i == picked else unpicked_scale * bonus) for i, r in enumerate(stage1)]


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO's group advantage, (r - mean) / (std + 1e-4) with the unbiased std, as TRL computes it."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) if len(rewards) > 1 else 0.0
    return [(r - mean) / (std + 1e-4) for r in rewards]


class AlignXploreTrainer(GRPOTrainer):
    _tag_names = ["trl", "grpo", "alignxplore", "llmrec"]

    def __init__(self, model, judge=None, reward_funcs=None, args: AlignXploreConfig | None = None, **kwargs):
        if args is None or not isinstance(args, AlignXploreConfig):
            raise LLMRecError("AlignXploreTrainer needs an AlignXploreConfig.")
        if judge is None:
            raise LLMRecError("AlignXploreTrainer needs a judge (llmrec.eval.judges).")
        self.judge = judge
        super().__init__(model, reward_funcs or [precomputed_reward], args,
                         rollout_func=lambda prompts, trainer: trainer.summary_rollout(prompts), **kwargs)
        use_cpu_weight_sync(self)
        self._rows: list[dict] = []
        self._advantages: list[float] = []

    def _generate_and_score_completions(self, inputs):
        self._rows = inputs
        output = super()._generate_and_score_completions(inputs)
        output["advantages"] = torch.tensor(self._advantages, dtype=output["advantages"].dtype,
                                            device=output["advantages"].device)
        return output

    def _score(self, texts: list[str], target: Behaviour) -> tuple[list[float], list[str | None]]:
        """(format x judge reward, parsed summary or None) per output."""
        summaries = [parsed[1] if (parsed := parse_output(t)) else None for t in texts]
        valid = [s for s in summaries if s is not None]
        probabilities = iter(self.judge.prob_correct(
            [JudgeQuestion(s, target.query, target.chosen, target.rejected) for s in valid]) if valid else [])
        return [next(probabilities) if s is not None else 0.0 for s in summaries], summaries

    def summary_rollout(self, prompts: list) -> dict:
        """TRL's `rollout_func`: per user, stage-1 outputs and (with streaming) stage-2 updates, with rewards."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        n = group // 2 if args.streaming else group
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_completion_length)
        flat = TreeConfig(branching=False, pruning=False)
        seed = args.seed * 1_000_003 + self.state.global_step * 7919 + self.accelerator.process_index
        rng = torch.Generator().manual_seed(seed)

        def decode(rollout):
            return self.processing_class.batch_decode([c.token_ids for c in rollout.completions],
                                                      skip_special_tokens=True)

        def grow(users):
            prompt_ids, _, _ = self._tokenize_prompts([prompt for _, prompt, _ in users])
            with generation_backend(self) as backend:
                first = backend.generate(prompt_ids, n, flat, sampling, seed)
                records, second_prompts, picks = [], [], []
                for (q, _, row), ids, rollout in zip(users, prompt_ids, first):
                    rewards, summaries = self._score(decode(rollout), Behaviour(**json.loads(row["target1"])))
                    picked = int(torch.randint(n, (1,), generator=rng))
                    picks.append(picked)
                    part2 = [Behaviour(**b) for b in json.loads(row["part2"])]
                    second_prompts.append(format_prompt(summaries[picked] or NO_SUMMARY, part2))
                    records.append((q, ids, rollout, rewards, summaries))
                second = []
                if args.streaming:
                    second_ids, _, _ = self._tokenize_prompts(second_prompts)
                    second = list(zip(second_ids, backend.generate(second_ids, n, flat, sampling, seed + 1)))
            out = []
            for index, ((q, ids, rollout, rewards, summaries), (_, _, row)) in enumerate(zip(records, users)):
                stats = {"format": sum(s is not None for s in summaries) / n, "judge": sum(rewards) / n}
                rows = [(ids, c) for c in rollout.completions]
                if args.streaming:
                    ids2, rollout2 = second[index]
                    rewards2, summaries2 = self._score(decode(rollout2), Behaviour(**json.loads(row["target2"])))
                    stats.update(format2=sum(s is not None for s in summaries2) / n, judge2=sum(rewards2) / n)
                    rewards = streaming_rewards(rewards, rewards2, picks[index], args.streaming_lambda,
                                                args.unpicked_scale)
                    advantages = group_advantages(rewards) + group_advantages(rewards2)
                    rows += [(ids2, c) for c in rollout2.completions]
                    rewards = rewards + rewards2
                else:
                    advantages = group_advantages(rewards)
                out.append((q, [(i, c, r, a) for (i, c), r, a in zip(rows, rewards, advantages)], stats))
            return out

        local, stats = share_groups(self, prompts, self._rows, group, grow)
        metrics = self._metrics[mode]
        for key in stats[0] if stats else []:
            metrics[f"summary/{key}"].append(sum(s[key] for s in stats) / len(stats))
        self._advantages = [a for _, _, _, a in local]
        return {
            "prompt_ids": [ids for ids, _, _, _ in local],
            "completion_ids": [c.token_ids for _, c, _, _ in local],
            "logprobs": [c.logprobs for _, c, _, _ in local],
            "reward": [r for _, _, r, _ in local],
        }


def rl_datasets(context: StageContext):
    """One row per training user: the part-1 prompt, part 2 (stage 2's evidence) and the two targets."""
    from datasets import Dataset

    config = context.recipe.data.summaries
    users = summary_users(config, context.recipe.run.seed, "train", context.data)
    rows = []
    for user in users:
        part1, part2, part3 = user.parts(config.behaviours.fractions)
        rows.append({"prompt": format_prompt(None, part1), "part2": json.dumps([b.__dict__ for b in part2]),
                     "target1": json.dumps(part2[0].__dict__), "target2": json.dumps(part3[0].__dict__)})
    return Dataset.from_list(rows), None


def rl_kwargs(context: StageContext) -> dict:
    return {"judge": build_judge(context.recipe.data.summaries.judge)}


ALIGNXPLORE = StageSpec(
    config_class=AlignXploreConfig,
    trainer_class=AlignXploreTrainer,
    build_datasets=rl_datasets,
    description="GRPO on preference summaries: format x judge reward, streaming long-term utility (AlignXplore+)",
    trainer_kwargs=rl_kwargs,
    recipe_needs=_needs_summaries,
)

__all__ = ["ALIGNXPLORE", "ALIGNXPLORE_SFT", "AlignXploreConfig", "AlignXploreTrainer", "group_advantages",
           "precomputed_reward", "streaming_rewards"]
