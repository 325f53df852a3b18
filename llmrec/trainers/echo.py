"""ECHO: test-time reinforcement learning (TTRL) with entropy–confidence tree rollouts, on TRL's `GRPOTrainer`.

The stage trains on the test questions without their answers. For each question the rollout backend
(`llmrec.rollout`: transformers with a shared KV cache, or vLLM continuation requests) grows `num_votes` leaves, as
an entropy–confidence tree or as a flat sample; the majority answer of all votes is the pseudo-label (one vote per
leaf, or with `vote_weighting: path` votes weighted by the probability of the tokens the leaf's forks took, our
addition: a fork's forced second-choice tokens otherwise outvote the model's own answer), and
`num_generations` of the leaves (a seeded random subset when there are more votes) are trained with reward 1 when
their answer equals it, else 0 (TTRL). Labels, when the dataset has an `answer` column, are only compared with the
pseudo-label for the `ttrl/label_agreement` metric.

On top of GRPO (advantage A_i = (r_i - mean) / (std + eps) per group, token-mean loss), each part is a switch:

* `tree_rollouts`: fork at high-entropy, low-confidence tokens (`llmrec.rollout.tree`; `tree` holds its settings).
  Off: `num_votes` independent samples per question.
* `online_pruning`: stop hopeless branches while decoding; their budget goes to later forks or fills.
* `hybrid_advantage`: A_{i,t} = A_i (1 + a S_{i,t}), S = clip(alpha z(H) + beta z(1 - C), -s_max, s_max), z whitening
  over every valid completion token of the batch on all processes; H and C are the rollout's token signals.
* `adaptive_clip`: a per-sequence symmetric clip radius eps(o) = eps_min + (eps_max - eps_min) sigmoid(kappa
  (c0 - C_tail(o))), C_tail the mean confidence of the last `clip_tail_tokens` tokens. With llmrec's confidence
  (-mean log p of the top-k tokens, >= log k; see `llmrec.rollout.tree`) the paper's centre c0 = 1 keeps eps close
  to eps_min, hence `clip_confidence_center`. Clipping only acts when a batch is reused (`num_iterations` > 1 or
  more generation steps than accumulation steps); otherwise the ratio is exactly 1.

KL to the reference is GRPO's `beta` (ECHO's authors: 0.001). With every part off, rollouts flat and votes equal to
generations, the loss is TRL's GRPO loss on the same batch (tested).

Groups: GRPO may place one question's generations on several processes; `llmrec.rollout.grpo.share_groups` lets
each process grow the trees of every P-th question and gathers the results back, so a question's votes always come
from one tree and every process trains its own slice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from llmrec.answers import extract_answer, majority_vote
from llmrec.errors import LLMRecError
from llmrec.logs import get_logger
from llmrec.rollout import SamplingConfig, TreeConfig
from llmrec.rollout.grpo import generation_backend, share_groups, use_cpu_weight_sync

from . import StageContext, StageSpec

logger = get_logger(__name__)

TREE_FIELDS = {f.name for f in dataclasses.fields(TreeConfig)} - {"branching", "pruning"}


@dataclass
class ECHOConfig(GRPOConfig):
    r"""
    Configuration of [`ECHOTrainer`]: every field of `trl.GRPOConfig`, plus test-time RL voting, tree rollouts and
    ECHO's policy-update terms. With every switch off, flat rollouts and `num_votes` equal to `num_generations`, the
    loss is GRPO's.

        > Parameters that control test-time RL

        num_votes (`int`, *optional*):
            Leaves grown per question that vote for the pseudo-label (the majority answer); at least
            `num_generations`. `None` (default) makes it equal to `num_generations`. With more votes than
            generations, a seeded random subset of `num_generations` leaves is trained.
        vote_weighting (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"`: one vote per leaf (TTRL, the paper); `"path"`: a tree leaf votes in proportion to the
            probability of the tokens its forks took (our addition; see `llmrec.rollout.types.completions_of`).

        > Parameters that control the rollouts

        tree_rollouts (`bool`, *optional*, defaults to `True`):
            Grow entropy–confidence trees (`llmrec.rollout.tree`). Off: flat sampling, `num_votes` independent
            samples per question.
        online_pruning (`bool`, *optional*, defaults to `True`):
            Stop hopeless branches while decoding; their budget goes to later forks or fills.
        tree (`dict[str, Any]`, *optional*, defaults to `{}`):
            Tree settings: fields of `llmrec.rollout.TreeConfig` other than `branching` and `pruning` (which
            `tree_rollouts` and `online_pruning` set).
        vllm_chunk_tokens (`int`, *optional*, defaults to `32`):
            vLLM backend: tokens per continuation request.

        > Parameters that control the hybrid token-level advantage

        hybrid_advantage (`bool`, *optional*, defaults to `True`):
            Use A_{i,t} = A_i (1 + a S_{i,t}) instead of GRPO's A_i, with the exploration score
            S = clip(alpha z(H) + beta z(1 - C), -s_max, s_max): z whitens over every valid completion token of the
            batch on all processes, H and C are the rollout's token entropies and confidences.
        hybrid_scale (`float`, *optional*, defaults to `0.1`):
            a: weight of the exploration score.
        exploration_entropy_weight (`float`, *optional*, defaults to `1.0`):
            alpha: weight of z(H).
        exploration_confidence_weight (`float`, *optional*, defaults to `1.0`):
            beta: weight of z(1 - C).
        exploration_clip (`float`, *optional*, defaults to `2.0`):
            s_max: the exploration score is clipped to ±s_max.

        > Parameters that control the confidence-adaptive clipping

        adaptive_clip (`bool`, *optional*, defaults to `True`):
            Per-sequence symmetric clip radius from the tail confidence, in place of GRPO's `epsilon` and
            `epsilon_high`: eps(o) = eps_min + (eps_max - eps_min) sigmoid(kappa (c0 - C_tail(o))). Clipping only
            acts when a batch is reused (`num_iterations` > 1 or more generation steps than accumulation steps).
        epsilon_min (`float`, *optional*, defaults to `0.05`):
            eps_min of the adaptive clip radius (0 <= `epsilon_min` <= `epsilon_max`).
        epsilon_max (`float`, *optional*, defaults to `0.2`):
            eps_max of the adaptive clip radius.
        clip_sharpness (`float`, *optional*, defaults to `4.0`):
            kappa of the adaptive clip radius.
        clip_confidence_center (`float`, *optional*, defaults to `1.0`):
            c0: the radius is half-way between eps_min and eps_max at C_tail = c0. llmrec's confidence (-mean log p
            of the top-k tokens) is at least log k, so the paper's c0 = 1 keeps the radius close to eps_min.
        clip_tail_tokens (`int`, *optional*, defaults to `16`):
            C_tail averages the confidence of the last this many completion tokens (at least 1).
    """

    # > Test-time RL
    num_votes: int | None = field(
        default=None,
        metadata={"help": "Leaves per question that vote for the pseudo-label (>= num_generations; None: equal)."},
    )
    vote_weighting: str = field(
        default="uniform",
        metadata={"help": "'uniform': one vote per leaf (TTRL, the paper); 'path': a tree leaf votes in proportion to "
                  "the probability of the tokens its forks took (see llmrec.rollout.types.completions_of)."},
    )
    # > Rollouts
    tree_rollouts: bool = field(default=True, metadata={"help": "Grow entropy–confidence trees (off: flat sampling)."})
    online_pruning: bool = field(default=True, metadata={"help": "Stop hopeless branches while decoding."})
    tree: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Tree settings (fields of llmrec.rollout.TreeConfig other than branching and pruning)."},
    )
    vllm_chunk_tokens: int = field(default=32, metadata={"help": "vLLM backend: tokens per continuation request."})
    # > Hybrid token-level advantage
    hybrid_advantage: bool = field(default=True, metadata={"help": "A_i (1 + a S_{i,t}) instead of A_i."})
    hybrid_scale: float = field(default=0.1, metadata={"help": "a: weight of the exploration score."})
    exploration_entropy_weight: float = field(default=1.0, metadata={"help": "alpha: weight of z(H)."})
    exploration_confidence_weight: float = field(default=1.0, metadata={"help": "beta: weight of z(1 - C)."})
    exploration_clip: float = field(
        default=2.0, metadata={"help": "s_max: the exploration score is clipped to ±s_max."}
    )
    # > Confidence-adaptive clipping
    adaptive_clip: bool = field(default=True, metadata={"help": "Per-sequence clip radius from the tail confidence."})
    epsilon_min: float = field(default=0.05, metadata={"help": "eps_min of the adaptive clip radius."})
    epsilon_max: float = field(default=0.2, metadata={"help": "eps_max of the adaptive clip radius."})
    clip_sharpness: float = field(default=4.0, metadata={"help": "kappa of the adaptive clip radius."})
    clip_confidence_center: float = field(default=1.0, metadata={"help": "c0: the radius is half-way at C_tail = c0."})
    clip_tail_tokens: int = field(default=16, metadata={"help": "C_tail averages the last this many tokens."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_votes is None:
            self.num_votes = self.num_generations
        if self.num_votes < self.num_generations:
            raise ValueError(f"num_votes ({self.num_votes}) must be >= num_generations ({self.num_generations}): "
                             "TTRL votes with at least as many samples as it trains on.")
        if self.vote_weighting not in ("uniform", "path"):
            raise ValueError(f"vote_weighting must be 'uniform' or 'path', got {self.vote_weighting!r}.")
        unknown = set(self.tree) - TREE_FIELDS
        if unknown:
            raise ValueError(f"unknown tree settings {sorted(unknown)}; the settings are {sorted(TREE_FIELDS)}.")
        self.tree_config()  # validates the values
        if not 0 <= self.epsilon_min <= self.epsilon_max:
            raise ValueError(f"need 0 <= epsilon_min ({self.epsilon_min}) <= epsilon_max ({self.epsilon_max}).")
        if self.clip_tail_tokens < 1:
            raise ValueError("clip_tail_tokens must be >= 1.")

    def tree_config(self) -> TreeConfig:
        return TreeConfig(branching=self.tree_rollouts, pruning=self.online_pruning, **self.tree)


def majority_vote_reward(completions, pseudo_label, **kwargs) -> list[float]:
    """TTRL's reward: 1 when the completion's answer is the group's majority answer, else 0 (labels unused)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(label is not None and extract_answer(t) == label) for t, label in zip(texts, pseudo_label)]


def _rollout(prompts: list, trainer: ECHOTrainer) -> dict:
    return trainer.tree_rollout(prompts)


class ECHOTrainer(GRPOTrainer):
    _tag_names = ["trl", "grpo", "echo", "llmrec"]

    def __init__(self, model, reward_funcs=None, args: ECHOConfig | None = None, **kwargs):
        if args is None or not isinstance(args, ECHOConfig):
            raise LLMRecError("ECHOTrainer needs an ECHOConfig.")
        super().__init__(model, reward_funcs or [majority_vote_reward], args, rollout_func=_rollout, **kwargs)
        use_cpu_weight_sync(self)
        self._signals: list[tuple[list[float], list[float]]] = []
        self._labels: list[str | None] | None = None

    # --- rollouts -------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        self._labels = [row.get("answer") for row in inputs]
        output = super()._generate_and_score_completions(inputs)
        completion_mask = output["completion_mask"]
        entropy = _pad([s[0] for s in self._signals], completion_mask)
        confidence = _pad([s[1] for s in self._signals], completion_mask)
        args, mode = self.args, "train" if self.model.training else "eval"
        if args.hybrid_advantage:
            output["advantages"] = hybrid_advantages(
                output["advantages"], entropy, confidence, completion_mask, args, self.accelerator.reduce)
        if args.adaptive_clip:
            output["clip_epsilon"] = adaptive_clip_radius(confidence, completion_mask, args)
            self._metrics[mode]["echo/clip_radius"].append(
                self.accelerator.gather(output["clip_epsilon"]).mean().item())
        return output

    def tree_rollout(self, prompts: list) -> dict:
        """TRL's `rollout_func`: one tree of `num_votes` leaves per question (a group of identical prompts)."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_completion_length)
        seed = args.seed * 1_000_003 + self.state.global_step * 7919 + self.accelerator.process_index

        def grow(questions):
            prompt_ids, _, _ = self._tokenize_prompts([prompt for _, prompt, _ in questions])
            with generation_backend(self, args.vllm_chunk_tokens) as backend:
                rollouts = backend.generate(prompt_ids, args.num_votes, args.tree_config(), sampling, seed)
            rng = torch.Generator().manual_seed(seed)
            records = []
            for (q, _, answer), ids, rollout in zip(questions, prompt_ids, rollouts):
                texts = self.processing_class.batch_decode([c.token_ids for c in rollout.completions],
                                                           skip_special_tokens=True)
                weights = [c.vote_weight for c in rollout.completions] if args.vote_weighting == "path" else None
                label, votes = majority_vote([extract_answer(t) for t in texts], weights)
                keep = (sorted(torch.randperm(len(rollout.completions), generator=rng)[:group].tolist())
                        if args.num_votes > group else range(group))
                records.append((q, [(ids, rollout.completions[i], label) for i in keep], {
                    "votes": votes / (sum(weights) if weights else args.num_votes),
                    "agreement": None if answer is None else float(label == answer),
                    **dataclasses.asdict(rollout.stats),
                }))
            return records

        local, stats = share_groups(self, prompts, self._labels or [None] * len(prompts), group, grow)
        self._log_rollout(stats, mode)
        self._signals = [(c.entropies, c.confidences) for _, c, _ in local]
        tokens = [(h, c) for entropies, confidences in self._signals for h, c in zip(entropies, confidences)]
        if tokens:
            self._metrics[mode]["rollout/mean_entropy"].append(sum(h for h, _ in tokens) / len(tokens))
            self._metrics[mode]["rollout/mean_confidence"].append(sum(c for _, c in tokens) / len(tokens))
        return {
            "prompt_ids": [ids for ids, _, _ in local],
            "completion_ids": [c.token_ids for _, c, _ in local],
            "logprobs": [c.logprobs for _, c, _ in local],
            "pseudo_label": [label for _, _, label in local],
        }

    def _log_rollout(self, stats: list[dict], mode: str) -> None:
        n = len(stats)
        metrics = self._metrics[mode]
        roots = self.args.tree_config().roots if self.args.tree_rollouts else self.args.num_votes
        metrics["rollout/decoded_tokens_per_question"].append(sum(s["decoded_tokens"] for s in stats) / n)
        metrics["rollout/forks_per_question"].append(sum(s["forks"] for s in stats) / n)
        metrics["rollout/branches_per_question"].append(sum(s["branches"] for s in stats) / n)
        metrics["rollout/pruned_fraction"].append(sum(s["pruned"] for s in stats)
                                                  / max(1, sum(s["branches"] + roots for s in stats)))
        metrics["rollout/effective_leaves"].append(sum(s["tree_leaves"] for s in stats) / n)
        metrics["rollout/fills_per_question"].append(sum(s["fills"] for s in stats) / n)
        metrics["ttrl/majority_share"].append(sum(s["votes"] for s in stats) / n)
        known = [s["agreement"] for s in stats if s["agreement"] is not None]
        if known:
            metrics["ttrl/label_agreement"].append(sum(known) / len(known))
        if (self.args.tree_rollouts and sum(s["forks"] for s in stats) == 0
                and not getattr(self, "_warned_no_fork", False)):
            self._warned_no_fork = True
            logger.warning("Tree rollouts created no branch in this batch: no token met the fork thresholds (see "
                           "llmrec.rollout.tree; the paper's defaults suit 7B models, calibrate `tree` for yours).")

    # --- loss -----------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if "clip_epsilon" not in inputs:
            return super()._compute_loss(model, inputs)
        # GRPO clips with the scalars epsilon_low/high; a (B, 1) tensor in their place clips each sequence by its own
        # radius through the unchanged loss code
        low, high = self.epsilon_low, self.epsilon_high
        self.epsilon_low = self.epsilon_high = inputs["clip_epsilon"].unsqueeze(1)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.epsilon_low, self.epsilon_high = low, high


def _pad(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row[: mask.shape[1]], dtype=torch.float32)
    return out


def _whiten(values: torch.Tensor, mask: torch.Tensor, reduce) -> torch.Tensor:
    m = mask.float()
    totals = reduce(torch.stack([(values * m).sum(), (values.square() * m).sum(), m.sum()]), reduction="sum")
    count = totals[2].clamp(min=1.0)
    mean = totals[0] / count
    std = (totals[1] / count - mean.square()).clamp(min=0.0).sqrt()
    return (values - mean) / (std + 1e-6) * m


def hybrid_advantages(advantages: torch.Tensor, entropy: torch.Tensor, confidence: torch.Tensor, mask: torch.Tensor,
                      args: ECHOConfig, reduce) -> torch.Tensor:
    """A_{i,t} = A_i (1 + a S_{i,t}) on valid tokens (B, T); `reduce` sums the whitening totals over processes."""
    score = (args.exploration_entropy_weight * _whiten(entropy, mask, reduce)
             + args.exploration_confidence_weight * _whiten(1.0 - confidence, mask, reduce))
    score = score.clamp(-args.exploration_clip, args.exploration_clip)
    return advantages.unsqueeze(1) * (1.0 + args.hybrid_scale * score) * mask


def adaptive_clip_radius(confidence: torch.Tensor, mask: torch.Tensor, args: ECHOConfig) -> torch.Tensor:
    """eps(o_i) per sequence (B,) from the mean confidence of its last `clip_tail_tokens` valid tokens."""
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    tail = (positions >= (lengths - args.clip_tail_tokens).unsqueeze(1)) & mask.bool()
    c_tail = (confidence * tail).sum(1) / tail.sum(1).clamp(min=1)
    gate = torch.sigmoid(args.clip_sharpness * (args.clip_confidence_center - c_tail))
    return args.epsilon_min + (args.epsilon_max - args.epsilon_min) * gate


def build_datasets(context: StageContext):
    """The test questions without their answers' use: prompt, plus `answer` for the label-agreement metric only."""
    from llmrec.data import reasoning_examples

    config = context.recipe.data.reasoning
    train = reasoning_examples(config, "test", context.recipe.run.seed).select_columns(["prompt", "answer"])
    return train, None


def recipe_needs(recipe) -> list[tuple[tuple, str]]:
    if recipe.data.reasoning is None:
        return [(("data", "reasoning"), "trainer echo runs test-time RL on reasoning problems: add a data.reasoning "
                 "section (and eval.task: reasoning).")]
    return []


ECHO = StageSpec(
    config_class=ECHOConfig,
    trainer_class=ECHOTrainer,
    build_datasets=build_datasets,
    description="test-time RL on the unlabeled test questions (TTRL majority vote; ECHO tree rollouts and updates)",
    recipe_needs=recipe_needs,
)

__all__ = ["ECHO", "ECHOConfig", "ECHOTrainer", "adaptive_clip_radius", "hybrid_advantages", "majority_vote_reward"]
