"""What a rollout backend returns: N completions per question with their token statistics, and the tree's counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .tree import Branch, QuestionStats


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampled rollouts, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # per token, under the sampling distribution (temperature applied, before top-p)
    entropies: list[float]  # H_t of the model's top-K distribution
    confidences: list[float]  # C_t (see llmrec.rollout.tree)
    origin: str  # "tree" or "fill"
    branch_id: int
    parent_id: int | None  # the branch it forked from (None for roots and fills)
    fork_position: int  # completion index of its first own token (0 for roots and fills)
    vote_weight: float = 1.0  # see `completions_of`


@dataclass
class QuestionRollout:
    completions: list[Completion]
    stats: QuestionStats = field(default_factory=QuestionStats)


def completions_of(branches: list[Branch]) -> list[Completion]:
    """The leaves as completions. A leaf's `vote_weight` is its path weight times the number of leaves of its root's
    tree: the leaves of one tree then share that tree's count of votes in proportion to the probability of the tokens
    their forks took (a forced second-choice token weighs what its probability says), and a fill or an unforked root
    weighs 1."""
    per_root = Counter(b.root for b in branches)
    return [
        Completion(b.token_ids, b.logprobs, b.entropies, b.confidences, b.origin, b.id, b.parent,
                   b.fork_position if b.parent is not None else 0, b.path_weight * per_root[b.root])
        for b in branches
    ]
