"""Aggregation rules of federated LoRA: pure functions over adapter state dicts, no Flower and no model.

A state dict maps names to tensors, in one of two formats:

* PEFT LoRA (`peft.get_peft_model_state_dict`): `<module>.lora_A.weight` (r × d_in) and `<module>.lora_B.weight`
  (d_out × r);
* FedLoRA (`llmrec.adapters.fedlora`): `<module>.lora_A_direction`, `.lora_A_magnitude`, `.lora_B_direction`,
  `.lora_B_magnitude`, with A = diag(a_M) A_D and B = diag(b_M) B_D (unit-norm rows of A_D and B_D).

Each rule declares which tensor kinds leave a client (`uploads`), which never train (`frozen`), and how the
server turns the uploaded tensors of one round into the next global tensors (`aggregate`). Weights are the
clients' training-example counts, normalised to p_k = n_k / Σ n.

| rule        | adapter | uploaded                  | kept on the client | server                                   |
|-------------|---------|---------------------------|--------------------|------------------------------------------|
| fedlora_opt | fedlora | A_D, a_M, B_D             | b_M                | Σ p_k of unit rows, re-normalised;       |
|             |         |                           |                    | a_M Σ p_k                                |
| fedit       | lora    | A, B                      | -                  | Σ p_k A_k, Σ p_k B_k                     |
| ffa         | lora    | B (A frozen, shared init) | -                  | Σ p_k B_k                                |
| fedsa       | lora    | A                         | B                  | Σ p_k A_k                                |
| flora       | lora    | A, B (fresh each round)   | -                  | stack: [p_1 s B_1 … p_K s B_K],          |
|             |         |                           |                    | [A_1; …; A_K]                            |
| local       | lora    | nothing                   | A, B               | nothing                                  |

FLoRA (Wang et al., 2024) stacks instead of averaging, so the round's update B_stack A_stack equals
Σ_k p_k s B_k A_k exactly (s = α/r folded into B_stack); the global state is the stack of every round so far
(its rank grows by Σ_k r each round), which clients merge into their base weights before training a fresh LoRA.

Choices where the spec is silent: FedLoRA-Optimizer also shares a_M (A, magnitude included, carries the shared
knowledge; only B's magnitudes are personal), and averages B_D with A_D ("A_D (and B_D)"); directions are averaged
as unit rows, so a client with larger stored rows does not weigh more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KIND_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_A_direction": "A_direction",
    ".lora_A_magnitude": "A_magnitude",
    ".lora_B_direction": "B_direction",
    ".lora_B_magnitude": "B_magnitude",
}


ADAPTER_KINDS = {"lora": ("A", "B"), "fedlora": ("A_direction", "A_magnitude", "B_direction", "B_magnitude")}


def tensor_kind(name: str) -> str:
    """'A', 'B', 'A_direction', 'A_magnitude', 'B_direction' or 'B_magnitude'."""
    for suffix, kind in KIND_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(f"{name!r} is not a LoRA or FedLoRA adapter tensor")


def module_of(name: str) -> str:
    for suffix in KIND_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{name!r} is not a LoRA or FedLoRA adapter tensor")


def normalised_weights(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    return [float(w) / total for w in weights]


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        out += weight * tensor.double()
    return out.to(tensors[0].dtype)


def unit_rows(matrix: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(eps)


@dataclass(frozen=True)
class AggregationRule:
    """Which tensors leave a client and how the server combines them (plain weighted means by default)."""

    name: str
    adapter: str  # the recipe's adapter.method this rule needs
    uploads: frozenset[str]
    frozen: frozenset[str] = frozenset()
    description: str = ""

    def is_uploaded(self, name: str) -> bool:
        return tensor_kind(name) in self.uploads

    def upload(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a client sends."""
        return {name: tensor for name, tensor in state.items() if self.is_uploaded(name)}

    def private(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a client keeps on disk between rounds."""
        return {name: tensor for name, tensor in state.items() if not self.is_uploaded(name)}

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(ADAPTER_KINDS[self.adapter])

    @property
    def personal(self) -> bool:
        """Whether a client's adapter differs from the global one (it trains tensors it does not upload)."""
        return bool(self.kinds - self.uploads - self.frozen)

    def aggregate(self, updates: list[dict[str, torch.Tensor]], weights: list[float],
                  previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global tensors from this round's uploads (`previous`: the current global tensors)."""
        if not updates or not self.uploads:
            return dict(previous)
        return self.combine(updates, normalised_weights(weights), previous)

    def combine(self, updates: list[dict[str, torch.Tensor]], p: list[float],
                previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rule's own arithmetic, given at least one update and the weights p_k (summing to 1)."""
        return {name: weighted_mean([u[name] for u in updates], p) for name in updates[0]}


@dataclass(frozen=True)
class FedLoRAOptimizerRule(AggregationRule):
    """Directions averaged as unit rows and re-normalised; A's magnitudes averaged; B's magnitudes never leave."""

    def combine(self, updates, p, previous):
        out = {}
        for name in updates[0]:
            tensors = [u[name] for u in updates]
            if tensor_kind(name).endswith("direction"):
                out[name] = unit_rows(weighted_mean([unit_rows(t.double()) for t in tensors], p)).to(tensors[0].dtype)
            else:
                out[name] = weighted_mean(tensors, p)
        return out


@dataclass(frozen=True)
class FLoRARule(AggregationRule):
    """Stacking: the round's A's one under another, the weighted B's side by side, appended to the global stack.

    `scaling` (α/r of the clients' LoRA) is folded into the stacked B, so the global state's update is exactly
    B_stack A_stack (scale 1)."""

    scaling: float = 1.0

    def combine(self, updates, p, previous):
        out = {}
        for name in updates[0]:
            kind = tensor_kind(name)
            if kind == "A":
                parts = [u[name] for u in updates]
                dim = 0
            else:
                parts = [(weight * self.scaling * u[name].double()).to(u[name].dtype) for u, weight in zip(updates, p)]
                dim = 1
            if name in previous and previous[name].numel():
                parts.insert(0, previous[name])
            out[name] = torch.cat(parts, dim=dim)
        return out


def stacked_delta(stack: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module: ΔW = B_stack A_stack} of a FLoRA global state."""
    deltas = {}
    for name, tensor in stack.items():
        if tensor_kind(name) == "A":
            module = module_of(name)
            B = stack[f"{module}.lora_B.weight"]
            deltas[module] = (B.double() @ tensor.double()).to(tensor.dtype)
    return deltas


def build_rule(name: str, scaling: float = 1.0) -> AggregationRule:
    """The rule called `name` (see RULES); `scaling` = the LoRA's α/r, which FLoRA folds into its stack."""
    if name == "flora":
        return FLoRARule("flora", "lora", frozenset({"A", "B"}), description=RULES["flora"], scaling=scaling)
    if name == "fedlora_opt":
        return FedLoRAOptimizerRule("fedlora_opt", "fedlora", frozenset({"A_direction", "A_magnitude", "B_direction"}),
                                    description=RULES[name])
    uploads = {"fedit": {"A", "B"}, "ffa": {"B"}, "fedsa": {"A"}, "local": set()}[name]
    frozen = {"A"} if name == "ffa" else set()
    return AggregationRule(name, "lora", frozenset(uploads), frozenset(frozen), description=RULES[name])


RULES: dict[str, str] = {
    "fedlora_opt": "FedLoRA-Optimizer: global directions (A_D, a_M, B_D averaged), local B magnitudes b_M",
    "fedit": "FedIT: FedAvg of A and B separately",
    "ffa": "FFA-LoRA: A frozen at a shared random init, FedAvg of B",
    "fedsa": "FedSA-LoRA: FedAvg of A, B kept on each client",
    "flora": "FLoRA: client LoRAs stacked along the rank axis and merged into the base every round",
    "local": "local-only: each client trains its own LoRA, nothing is shared",
}
