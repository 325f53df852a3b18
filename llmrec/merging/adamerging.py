"""AdaMerging (Yang et al., ICLR 2024) for LoRA adapters on a causal LM (`shared/methods/merging.md`).

The merged model is W0 + Σ_k λ_k τ_k (task-wise) or W0^l + Σ_k λ_k^l τ_k^l (layer-wise), with the coefficients
learned without labels: Adam minimises the entropy of the merged model's answer distribution on the tasks'
unlabelled test prompts (summed over tasks), and λ is clamped to [0, 1] after every step. The answer distribution
is the softmax over the tokens an answer can start with (`Task.unlabelled_answers`): the catalog's first title
tokens for next-item ranking, the label words for Yes/No and classification tasks.

ΔW is never materialised while training: every adapter stays active and each LoRA layer's `scaling[k]` becomes the
tensor s_k·λ_k^l, so PEFT's forward adds Σ_k λ_k^l s_k B_k A_k x and the gradient reaches λ only (base and adapter
weights are frozen). The learned model is then written as one stock LoRA adapter by `materialise`: PEFT's exact
`cat` merge with each adapter's block of A scaled by its λ in that layer, which is exact for layer-wise λ too.

Choices where the paper leaves room: λ starts at the task-arithmetic value `init` (0.3, the paper's) for every
adapter and layer; a layer is one LoRA-wrapped module (q_proj of layer 3, ...); batches are drawn with replacement
from at most `max_prompts` prompts, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from llmrec.errors import LLMRecError

from .static import MERGED


@dataclass
class AdaMergingConfig:
    """How the merging coefficients are learned."""

    granularity: Literal["task", "layer"] = field(
        default="task", metadata={"help": "'task': one λ per adapter; 'layer': one per adapter and LoRA layer."})
    init: float = field(default=0.3, metadata={"help": "Starting λ (the task-arithmetic value)."})
    steps: int = field(default=100, metadata={"help": "Adam steps on unlabelled prompts."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam's learning rate for λ."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per step."})
    max_prompts: int = field(default=512, metadata={"help": "At most this many unlabelled prompts are used."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt sampling."})

    def __post_init__(self):
        if self.granularity not in ("task", "layer"):
            raise LLMRecError(f"granularity is 'task' or 'layer', not {self.granularity!r}.", "--granularity")
        if not 0 <= self.init <= 1:
            raise LLMRecError("λ starts in [0, 1].", "--init")
        if self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise LLMRecError("steps >= 0, batch size >= 1 and a positive learning rate are needed.", "--steps")


def lora_layers(model) -> list[tuple[str, object]]:
    """(name, module) of every LoRA layer of a PeftModel, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name.removeprefix("base_model.model."), module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer)]


class ScaledAdapters:
    """Every adapter of `names` active at once, layer l's adapter k scaled by λ[k] or λ[k, l] (in a `with` block;
    the scalings are restored afterwards)."""

    def __init__(self, model, names: list[str]):
        self.model, self.names = model, names
        self.layers = lora_layers(model)
        self.scalings = [{name: module.scaling[name] for name in names if name in module.scaling}
                         for _, module in self.layers]
        self.previous_adapter = None

    def apply(self, lambdas: torch.Tensor) -> None:
        for index, ((_, module), scaling) in enumerate(zip(self.layers, self.scalings)):
            for k, name in enumerate(self.names):
                if name in scaling:
                    weight = lambdas[k] if lambdas.dim() == 1 else lambdas[k, index]
                    module.scaling[name] = scaling[name] * weight

    def __enter__(self) -> ScaledAdapters:
        self.previous_adapter = self.model.active_adapters
        self.model.base_model.set_adapter(self.names)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for (_, module), scaling in zip(self.layers, self.scalings):
            module.scaling.update(scaling)
        self.model.base_model.set_adapter(self.previous_adapter)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)


def answer_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the softmax over each row's answer logits."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def learn_coefficients(model, names: list[str], tokenizer, sources: list[tuple[list[str], tuple[int, ...]]],
                       config: AdaMergingConfig, progress: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """λ (K, or K × layers) learned on the unlabelled prompts of `sources` (one (prompts, answer token ids) per
    task), and the history (step, entropy, λ) logged every step. Each step draws `batch_size` prompts of every task
    and minimises the sum of the tasks' mean answer entropies, as the paper sums over tasks."""
    from tqdm.auto import tqdm

    from llmrec.answers import AnswerCollator, answer_logits, tokenize_prompts

    if not sources or any(not prompts for prompts, _ in sources):
        raise LLMRecError("a task has no unlabelled prompts to learn the coefficients on.", "eval.splits")
    generator = torch.Generator().manual_seed(config.seed)
    tasks = [(tokenize_prompts(tokenizer, prompts[: config.max_prompts]), answers) for prompts, answers in sources]
    collate = AnswerCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with ScaledAdapters(model, names) as scaled:
        shape = (len(names),) if config.granularity == "task" else (len(names), len(scaled.layers))
        lambdas = torch.nn.Parameter(torch.full(shape, config.init, device=device))
        optimizer = torch.optim.Adam([lambdas], lr=config.learning_rate)
        history = []
        model.eval()
        for step in tqdm(range(config.steps), desc="AdaMerging", disable=not progress):
            scaled.apply(lambdas)
            entropy = 0.0
            for ids, answers in tasks:
                rows = torch.randint(len(ids), (config.batch_size,), generator=generator).tolist()
                batch = collate([{"input_ids": ids[i], "label": 0} for i in rows])
                entropy = entropy + answer_entropy(
                    answer_logits(model, {k: v.to(device) for k, v in batch.items()}, answers))
            optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            optimizer.step()
            with torch.no_grad():
                lambdas.clamp_(0.0, 1.0)
            history.append({"step": step + 1, "entropy": entropy.item(), "lambda": lambdas.detach().cpu().tolist()})
    return lambdas.detach().cpu(), history


def materialise(model, names: list[str], lambdas: torch.Tensor) -> None:
    """Add the adapter `MERGED` = Σ_k λ_k^(l) s_k B_k A_k in every layer (exact: a `cat` merge whose A blocks are
    scaled per layer) and make it the active one."""
    model.add_weighted_adapter(names, [1.0] * len(names), MERGED, combination_type="cat")
    with torch.no_grad():
        for index, (_, module) in enumerate(lora_layers(model)):
            if MERGED not in module.lora_A:
                continue
            start = 0
            for k, name in enumerate(names):
                if name not in module.lora_A:
                    continue
                rank = module.r[name]
                weight = lambdas[k] if lambdas.dim() == 1 else lambdas[k, index]
                module.lora_A[MERGED].weight[start:start + rank] *= float(weight)
                start += rank
    model.set_adapter(MERGED)
