"""Static merges of LoRA adapters trained on one base (`shared/methods/merging.md`), on PEFT's
`LoraModel.add_weighted_adapter`.

With task vectors τ_k = ΔW_k = s_k B_k A_k (s_k = α_k / r_k) and weights w_k, each llmrec method maps to one PEFT
combination:

| llmrec method      | PEFT combination           | merged ΔW                                                        |
|--------------------|----------------------------|------------------------------------------------------------------|
| `cat`              | `cat`                      | Σ_k w_k τ_k exactly (rank Σ_k r_k)                               |
| `task_arithmetic`  | `cat`, or `svd` with rank  | Σ_k w_k τ_k exactly; with `rank`: its best rank-`rank` approx.   |
| `svd`              | `svd`                      | the best rank-`rank` approximation of Σ_k w_k τ_k                |
| `ties`             | `ties_svd`                 | TIES (trim to `density`, elect signs, mean) of w_k τ_k; SVD      |
| `dare_linear`      | `dare_linear_svd`          | DARE (drop 1 − `density`, rescale) of w_k τ_k, summed; SVD      |
| `dare_ties`        | `dare_ties_svd`            | DARE, then TIES, then SVD                                        |
| `adamerging`       | `cat`, A blocks × λ        | Σ_k λ_k^(l) τ_k exactly, λ learned (`llmrec.merging.adamerging`) |

TIES and DARE act on the ΔW (PEFT's `*_svd` variants), not on A and B separately: PEFT's plain `ties`/`dare_*`
combine A and B each weighted by √|w s|, which is not the method on the task vectors. The SVD rank is `rank`, or
Σ_k r_k by default, where the truncation loses nothing. Where a truncation can lose something (`svd`, and
`task_arithmetic` with a rank), `relative_errors` reports ‖Σ_k w_k τ_k − ΔW_merged‖_F / ‖Σ_k w_k τ_k‖_F per layer.
DARE's random drops are seeded (`seed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmrec.errors import LLMRecError

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "svd", "cat", "adamerging")
PEFT_COMBINATIONS = {"ties": "ties_svd", "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd", "svd": "svd",
                     "cat": "cat"}
MERGED = "default"  # PEFT saves the adapter named "default" at the top of the folder, others in subfolders


@dataclass
class MergeConfig:
    """How adapters combine into one."""

    method: str = field(default="task_arithmetic", metadata={"help": f"One of {', '.join(METHODS)}."})
    weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per adapter (default: 1.0 each; task arithmetic's λ)."})
    density: float | None = field(
        default=None, metadata={"help": "ties, dare_*: the share of each task vector's entries kept (0 < d <= 1)."})
    rank: int | None = field(
        default=None, metadata={"help": "The merged adapter's rank (default: Σ r_k, exact); task_arithmetic with a "
                                        "rank truncates the exact sum by SVD."})
    seed: int = field(default=0, metadata={"help": "Seed of DARE's random drops."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise LLMRecError(f"unknown merging method {self.method!r}; the methods are {', '.join(METHODS)}.",
                              "--method")
        needs_density = self.method in ("ties", "dare_linear", "dare_ties")
        if needs_density and not (self.density is not None and 0 < self.density <= 1):
            raise LLMRecError(f"{self.method} needs a density in (0, 1]: the share of each task vector kept.",
                              "--density")
        if not needs_density and self.density is not None:
            raise LLMRecError(f"{self.method} keeps every entry; --density is for ties and dare_*.", "--density")
        if self.method in ("cat", "adamerging") and self.rank is not None:
            raise LLMRecError(f"{self.method}'s rank is the sum of the adapters' ranks (exact); use svd or "
                              "task_arithmetic to choose one.", "--rank")
        if self.method == "adamerging" and self.weights is not None:
            raise LLMRecError("adamerging learns its weights (λ, starting at --init); drop --weights.", "--weights")
        if self.rank is not None and self.rank < 1:
            raise LLMRecError("must be at least 1.", "--rank")

    def combination(self) -> str:
        if self.method == "adamerging":  # materialised exactly, A blocks scaled by the learned λ
            return "cat"
        if self.method == "task_arithmetic":
            return "svd" if self.rank is not None else "cat"
        return PEFT_COMBINATIONS[self.method]


def merge_loaded(model, names: list[str], config: MergeConfig) -> dict[str, float]:
    """Add the adapter `MERGED` to the PeftModel `model`, which holds the LoRA adapters `names`, and make it the
    active one; returns the relative Frobenius error of each layer's merged ΔW against the exact weighted sum where
    the merge truncates (else {})."""
    weights = config.weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise LLMRecError(f"{len(weights)} weights for {len(names)} adapters; give one per adapter.", "--weights")
    ranks = [model.peft_config[name].r for name in names]
    combination = config.combination()
    rank = None if combination == "cat" else (config.rank or sum(ranks))
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model.add_weighted_adapter(names, weights, MERGED, combination_type=combination, svd_rank=rank,
                                   density=config.density)
    model.set_adapter(MERGED)
    if config.method in ("svd", "task_arithmetic") and combination == "svd":
        return relative_errors(model, names, weights)
    return {}


def relative_errors(model, names: list[str], weights: list[float]) -> dict[str, float]:
    """‖Σ_k w_k ΔW_k − ΔW_merged‖_F / ‖Σ_k w_k ΔW_k‖_F for each LoRA layer (0 where the exact sum is 0)."""
    from peft.tuners.lora import LoraLayer

    errors = {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or MERGED not in module.lora_A:
                continue
            exact = sum(w * module.get_delta_weight(n).float() for n, w in zip(names, weights) if n in module.lora_A)
            norm = torch.linalg.matrix_norm(exact).item()
            difference = torch.linalg.matrix_norm(exact - module.get_delta_weight(MERGED).float()).item()
            errors[module_name.removeprefix("base_model.model.")] = difference / norm if norm > 0 else 0.0
    return errors
