"""Entropy–confidence tree rollouts: the token signals, the branching and pruning rules, and the leaf budget.

Both backends drive the same `TreeBuilder`: after each decoded token of a branch they report the token's top-K
log-probabilities, and the builder answers whether the branch stops (EOS, length, pruning) and which alternative
tokens start new branches at this position. The transformers backend reports every token as it is decoded (so a
pruned branch stops at once); the vLLM backend reports a chunk of tokens at a time and cuts the branch at the
first token where the builder stopped it.

Signals, from the sampling distribution (temperature applied, before top-p; what TRL's vLLM engines report as
"processed" log-probabilities) renormalised over its top K tokens, p:

* entropy H_t = -sum p log p;
* confidence C_t = -(1/k) sum_{j<=k} log p_j over the k most likely tokens (the authors' rollout code; DeepConf's
  token confidence). Higher means more peaked. Note that C_t >= log k, so with k = 5 the paper's tau_branch = 1.2
  and tau_prune = 0.4 can never fire: they are the defaults because they are the paper's, and recipes calibrate
  them to their model (the trainer warns when a batch creates no branch; `scripts/calibrate_tree.py` prints the
  signals' quantiles on an SFT model's own solutions and how often a recipe's thresholds fork and prune);
* group confidence C^G_t = mean C over the last W_G steps, tail confidence C^tail_t over the last W_T steps,
  entropy jump dH_t = H_t - mean H over the previous W_H steps.

A branch at step t >= min_depth forks when H_t >= H_high, C^G_t <= tau_branch and dH_t >= delta, its path has
branched fewer than `max_depth` times and the question has leaf budget left. It keeps its sampled token and starts
B_t - 1 branches on the next most likely tokens, B_t = clip(round(B_min + alpha (H_t - H_low)/(H_high - H_low)
- beta (C^G_t - tau_branch)/|tau_branch|), B_min, B_max). Every branch on the path through a fork, the parent
included, counts that fork towards `max_depth` (depth 1 reproduces the authors' released code: one fork, at most
B_max leaves per root).

Online pruning (from step min_depth on) stops a branch when the running minimum of C^G falls below tau_prune; or
C^tail fell on `prune_run` consecutive steps and C^tail <= tau_tail; or dH > 0 on `prune_run` consecutive steps and
dH > the pruning jump. A pruned branch is not a leaf; its budget slot is freed for later forks.

Leaf budget: a question never holds more than N live branches plus finished leaves, so the tree ends with at most
N leaves; independent samples from the prompt fill the rest (not pruned, so a fill always ends), giving exactly N.
A fill starts as soon as the shortfall is certain: when none of the question's active branches may fork any more.
Flat sampling is the degenerate tree: N roots, no forks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch


@dataclass
class TreeConfig:
    """How rollouts branch and prune (the ECHO trainer exposes every field in its config)."""

    branching: bool = field(
        default=True, metadata={"help": "Fork at high-entropy, low-confidence tokens. Off: flat sampling."}
    )
    pruning: bool = field(default=True, metadata={"help": "Stop hopeless branches while decoding."})
    roots: int = field(default=1, metadata={"help": "Independent roots per question when branching (flat: N roots)."})
    max_depth: int = field(
        default=2, metadata={"help": "Forks along one root-to-leaf path (1: the authors' release)."}
    )
    top_k: int = field(
        default=20, metadata={"help": "K: the signals' distribution is renormalised over the top K tokens."}
    )
    confidence_k: int = field(
        default=5, metadata={"help": "k: confidence averages -log p over the k most likely tokens."}
    )
    min_depth: int = field(default=4, metadata={"help": "No fork or prune before this many completion tokens."})
    entropy_high: float = field(default=3.5, metadata={"help": "H_high: fork only at or above this entropy."})
    entropy_low: float = field(
        default=1.0, metadata={"help": "H_low: the bottom of the width formula's entropy scale."}
    )
    branch_confidence: float = field(default=1.2, metadata={"help": "tau_branch: fork only when C^G is at most this."})
    entropy_jump: float = field(
        default=0.2, metadata={"help": "delta: fork only when the entropy jump is at least this."}
    )
    width_alpha: float = field(default=2.0, metadata={"help": "alpha: entropy weight of the fork width."})
    width_beta: float = field(default=1.0, metadata={"help": "beta: confidence weight of the fork width."})
    min_width: int = field(default=1, metadata={"help": "B_min (the sampled token included)."})
    max_width: int = field(default=4, metadata={"help": "B_max (the sampled token included)."})
    prune_confidence: float = field(default=0.4, metadata={"help": "tau_prune: prune when min C^G falls below this."})
    tail_confidence: float = field(
        default=1.0, metadata={"help": "tau_tail: prune on a falling C^tail at or below this."}
    )
    prune_entropy_jump: float = field(default=0.5, metadata={"help": "Prune on rising entropy when dH exceeds this."})
    prune_run: int = field(default=3, metadata={"help": "Consecutive steps of falling C^tail or rising H that prune."})
    group_window: int = field(default=4, metadata={"help": "W_G: steps in the group confidence."})
    tail_window: int = field(default=8, metadata={"help": "W_T: steps in the tail confidence."})
    entropy_window: int = field(default=4, metadata={"help": "W_H: previous steps the entropy jump compares with."})

    def __post_init__(self):
        problems = [f"{f.name} must be >= 1" for f in fields(self)
                    if f.name in ("roots", "top_k", "confidence_k", "min_width", "max_width", "prune_run",
                                  "group_window", "tail_window", "entropy_window") and getattr(self, f.name) < 1]
        if self.confidence_k > self.top_k:
            problems.append(f"confidence_k ({self.confidence_k}) must be <= top_k ({self.top_k})")
        if self.min_width > self.max_width:
            problems.append(f"min_width ({self.min_width}) must be <= max_width ({self.max_width})")
        if self.entropy_high <= self.entropy_low:
            problems.append(f"entropy_high ({self.entropy_high}) must exceed entropy_low ({self.entropy_low})")
        if self.branch_confidence == 0:
            problems.append("branch_confidence must be non-zero (the width formula divides by it)")
        if problems:
            raise ValueError("tree rollout settings: " + "; ".join(problems) + ".")


def token_signals(raw_logprobs: torch.Tensor, top_k: int, confidence_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, confidence) per row from raw log-probabilities (rows, V) or top-K log-probabilities (rows, >= K)."""
    top = raw_logprobs.float().topk(min(top_k, raw_logprobs.shape[-1]), dim=-1).values
    logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
    entropy = -(logp.exp() * logp).sum(-1)
    confidence = -logp[:, :confidence_k].mean(-1)
    return entropy, confidence


@dataclass
class Branch:
    """One path of a question's tree: its tokens, per-token statistics and the state of the pruning rules."""

    id: int
    question: int
    parent: int | None = None
    fork_position: int = 0  # completion index of the token where it left its parent
    origin: str = "tree"  # "tree" (a root or a fork) or "fill" (an independent sample added to reach N leaves)
    depth: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # under the sampling distribution
    entropies: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    min_group_confidence: float = math.inf
    tail_falls: int = 0
    entropy_rises: int = 0
    state: str = "active"  # active | finished | pruned
    root: int = -1  # id of the root (or fill) the branch descends from
    path_weight: float = 1.0  # product over its forks of the taken token's probability among the fork's tokens

    def fork(self, new_id: int, token: int, logprob: float, path_weight: float) -> Branch:
        """A child sharing this branch's prefix up to (excluding) its newest token, which it replaces by `token`."""
        position = len(self.token_ids) - 1
        return Branch(
            id=new_id, question=self.question, parent=self.id, fork_position=position, origin="tree", depth=self.depth,
            token_ids=[*self.token_ids[:-1], token], logprobs=[*self.logprobs[:-1], logprob],
            entropies=list(self.entropies), confidences=list(self.confidences),
            min_group_confidence=self.min_group_confidence, tail_falls=self.tail_falls,
            entropy_rises=self.entropy_rises, root=self.root, path_weight=path_weight,
        )


@dataclass
class Decision:
    stop: str | None  # None, "eos", "length" or "pruned"
    alternatives: list[int]  # ids of the branches forked at this position


@dataclass
class QuestionStats:
    decoded_tokens: int = 0  # completion tokens decoded for this question: shared prefixes once, pruned ones included
    forks: int = 0
    branches: int = 0  # branches created by forks
    pruned: int = 0
    pruned_tokens: int = 0
    tree_leaves: int = 0
    fills: int = 0


class TreeBuilder:
    """The branching, pruning and leaf-budget rules over the branches of a batch of questions."""

    def __init__(self, config: TreeConfig, n_leaves: int, n_questions: int, max_new_tokens: int, eos_ids: set[int]):
        self.config, self.n_leaves, self.max_new_tokens, self.eos_ids = config, n_leaves, max_new_tokens, eos_ids
        self.branches: list[Branch] = []
        self.stats = [QuestionStats() for _ in range(n_questions)]
        self.live = [0] * n_questions  # active branches + finished leaves (fills included), per question

    def new_branch(self, question: int, origin: str) -> Branch:
        branch = Branch(id=len(self.branches), question=question, origin=origin, root=len(self.branches))
        self.branches.append(branch)
        self.live[question] += 1
        return branch

    def roots(self, question: int) -> int:
        return self.config.roots if self.config.branching else self.n_leaves

    def observe(self, branch: Branch, token: int, logprob: float, entropy: float, confidence: float,
                alternatives: list[tuple[int, float]]) -> Decision:
        """Record one decoded token of `branch` and decide what happens next. `alternatives` are the most likely
        tokens at this position, most likely first, with their log-probabilities under the sampling distribution;
        forked branches are appended to `self.branches` and their ids returned in `Decision.alternatives`."""
        config, stats = self.config, self.stats[branch.question]
        branch.token_ids.append(token)
        branch.logprobs.append(logprob)
        branch.entropies.append(entropy)
        branch.confidences.append(confidence)
        stats.decoded_tokens += 1
        t = len(branch.token_ids) - 1
        group = _mean_last(branch.confidences, config.group_window)
        tail = _mean_last(branch.confidences, config.tail_window)
        previous = branch.entropies[max(0, t - config.entropy_window):t]
        jump = entropy - sum(previous) / len(previous) if previous else 0.0
        if t >= 1:
            previous_tail = _mean_last(branch.confidences[:-1], config.tail_window)
            branch.tail_falls = branch.tail_falls + 1 if tail < previous_tail else 0
        branch.entropy_rises = branch.entropy_rises + 1 if jump > 0 else 0
        if t + 1 >= config.group_window:
            branch.min_group_confidence = min(branch.min_group_confidence, group)

        if token in self.eos_ids or len(branch.token_ids) >= self.max_new_tokens:
            stop = "eos" if token in self.eos_ids else "length"
            branch.state = "finished"
            if branch.origin == "tree":
                stats.tree_leaves += 1
        elif (branch.origin == "tree" and config.pruning and t >= config.min_depth
                and self._hopeless(branch, tail, jump)):
            stop = "pruned"
            branch.state = "pruned"
            stats.pruned += 1
            stats.pruned_tokens += len(branch.token_ids) - branch.fork_position
            self.live[branch.question] -= 1
        else:
            stop = None

        new: list[int] = []
        room = self.n_leaves - self.live[branch.question]
        if (branch.origin == "tree" and config.branching and stop != "pruned" and room > 0 and t >= config.min_depth
                and len(branch.token_ids) < self.max_new_tokens and branch.depth < config.max_depth
                and entropy >= config.entropy_high and group <= config.branch_confidence
                and jump >= config.entropy_jump):
            width = self.width(entropy, group)
            chosen = [(tok, lp) for tok, lp in alternatives if tok != token][: min(width - 1, room)]
            if chosen:
                branch.depth += 1
                stats.forks += 1
                total = math.exp(logprob) + sum(math.exp(lp) for _, lp in chosen)
                parent_weight = branch.path_weight
                branch.path_weight = parent_weight * math.exp(logprob) / total
                for tok, lp in chosen:
                    child = branch.fork(len(self.branches), tok, lp, parent_weight * math.exp(lp) / total)
                    self.branches.append(child)
                    self.live[branch.question] += 1
                    stats.branches += 1
                    stats.decoded_tokens += 1
                    if tok in self.eos_ids:  # a fork onto EOS is a finished leaf at once
                        child.state = "finished"
                        stats.tree_leaves += 1
                    new.append(child.id)
        return Decision(stop, new)

    def width(self, entropy: float, group_confidence: float) -> int:
        c = self.config
        raw = (c.min_width + c.width_alpha * (entropy - c.entropy_low) / (c.entropy_high - c.entropy_low)
               - c.width_beta * (group_confidence - c.branch_confidence) / abs(c.branch_confidence))
        return int(min(max(round(raw), c.min_width), c.max_width))

    def _hopeless(self, branch: Branch, tail: float, jump: float) -> bool:
        c = self.config
        return (branch.min_group_confidence < c.prune_confidence
                or (branch.tail_falls >= c.prune_run and tail <= c.tail_confidence)
                or (branch.entropy_rises >= c.prune_run and jump > c.prune_entropy_jump))

    def spawn_fills(self, active: list[Branch]) -> list[Branch]:
        """Fill branches for the questions whose tree can grow no more leaves (none of their active branches may
        still fork): their shortfall is certain now, so the fills start at once (a later prune adds another)."""
        growing = {b.question for b in active
                   if b.origin == "tree" and self.config.branching and b.depth < self.config.max_depth}
        fills = []
        for question, live in enumerate(self.live):
            if question not in growing:
                for _ in range(self.n_leaves - live):
                    fills.append(self.new_branch(question, "fill"))
                    self.stats[question].fills += 1
        return fills

    def leaves(self, question: int) -> list[Branch]:
        """The question's finished branches: tree leaves (in creation order), then fills."""
        done = [b for b in self.branches if b.question == question and b.state == "finished"]
        return sorted(done, key=lambda b: (b.origin == "fill", b.id))


def _mean_last(values: list[float], window: int) -> float:
    tail = values[-window:]
    return sum(tail) / len(tail)
