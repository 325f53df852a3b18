"""Representation Surgery (Yang et al., ICML 2024), final layer, after any merge (`shared/methods/merging.md`).

A merged model's final-layer representations drift from each expert's. Per endpoint k, a small low-rank MLP f_k
corrects them, h' = h − f_k(h), trained without labels to minimise the mean L1 distance between h' (the merged
model's final hidden state, after the last norm, at every prompt token) and the expert's h on that endpoint's
unlabelled prompts. The expert of an endpoint is the input run that has its data and evaluation, so Surgery needs
one input per endpoint; it also needs the endpoint at inference, which the merged run records (`endpoints.json`).

    f_k(h) = W_up · relu(W_down · h),  W_down: d → r,  W_up: r → d, W_up starting at 0 (so h' = h at first)

The modules are llmrec's format (`surgery/<endpoint>.safetensors`, not a stock PEFT adapter): `with_surgery`
applies one to a loaded model (a forward hook on the final norm), and `llmrec merge` evaluates every endpoint with
its own module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmrec.errors import LLMRecError

from .static import MERGED


@dataclass
class SurgeryConfig:
    """How the per-endpoint correction modules are trained."""

    rank: int = field(default=16, metadata={"help": "r, the width of f_k's bottleneck."})
    steps: int = field(default=200, metadata={"help": "Adam steps per endpoint."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam's learning rate."})
    batch_size: int = field(default=16, metadata={"help": "Unlabelled prompts per step."})
    max_prompts: int = field(default=512, metadata={"help": "At most this many prompts per endpoint."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and the prompt sampling."})

    def __post_init__(self):
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise LLMRecError("Surgery needs rank >= 1, steps >= 1, batch size >= 1 and a positive learning rate.",
                              "--surgery-steps")


class SurgeryModule(nn.Module):
    """h ↦ h − W_up relu(W_down h)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden - self.up(torch.relu(self.down(hidden)))


def final_norm(model) -> nn.Module:
    """The module whose output is the final-layer representation the LM head reads."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    norm = getattr(getattr(inner, "model", None), "norm", None)
    if norm is None:
        raise LLMRecError(f"Surgery needs a decoder with a final norm at model.norm; {type(inner).__name__} has "
                          "none.", "--surgery-steps")
    return norm


@contextlib.contextmanager
def with_surgery(model, module: SurgeryModule | None):
    """The model's final representations corrected by `module` inside the block (unchanged for None)."""
    if module is None:
        yield model
        return
    handle = final_norm(model).register_forward_hook(lambda _, __, output: module(output))
    try:
        yield model
    finally:
        handle.remove()


def _final_states(model, batch: dict) -> torch.Tensor:
    """(tokens, d) final-layer states at the batch's real (not padding) positions."""
    captured = {}
    handle = final_norm(model).register_forward_hook(lambda _, __, output: captured.setdefault("h", output))
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"][batch["attention_mask"].bool()]


def train_surgery(model, expert: str, tokenizer, prompts: list[str],
                  config: SurgeryConfig) -> tuple[SurgeryModule, list[float]]:
    """f_k for one endpoint: the PeftModel `model` reads the same unlabelled `prompts` with its merged adapter and
    with the adapter `expert`; returns the module and its L1 loss per step. No weight of `model` changes, and the
    merged adapter is the active one afterwards."""
    from llmrec.answers import AnswerCollator, tokenize_prompts

    if not prompts:
        raise LLMRecError("an endpoint has no unlabelled prompts to train its Surgery module on.", "eval.splits")
    generator = torch.Generator().manual_seed(config.seed)
    ids = tokenize_prompts(tokenizer, prompts[: config.max_prompts])
    collate = AnswerCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    hidden = model.get_input_embeddings().weight.shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        module = SurgeryModule(hidden, config.rank).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    model.eval()
    losses = []
    for _ in range(config.steps):
        rows = torch.randint(len(ids), (config.batch_size,), generator=generator).tolist()
        batch = {k: v.to(device) for k, v in collate([{"input_ids": ids[i], "label": 0} for i in rows]).items()}
        with torch.no_grad():
            model.set_adapter(expert)
            target = _final_states(model, batch).float()
            model.set_adapter(MERGED)
            states = _final_states(model, batch).float()
        loss = (module(states) - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return module, losses


def save_surgery(module: SurgeryModule, folder: Path, endpoint: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
              str(folder / f"{endpoint}.safetensors"))


def load_surgery(folder: Path, endpoint: str) -> SurgeryModule:
    """The Surgery module of `endpoint` saved in a merged run's `surgery/` folder."""
    from safetensors.torch import load_file

    path = folder / f"{endpoint}.safetensors"
    if not path.is_file():
        raise LLMRecError(f"the merged run has no Surgery module for the endpoint {endpoint!r}.", str(folder))
    state = load_file(str(path))
    module = SurgeryModule(state["down.weight"].shape[1], state["down.weight"].shape[0])
    module.load_state_dict(state)
    return module
