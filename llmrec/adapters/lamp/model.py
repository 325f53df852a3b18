"""LAMP (Lan et al., NAACL 2025) on a frozen causal LM (`shared/methods/ept_lamp.md`).

    P0 ≈ U_r diag(S_r) V_rᵀ                      truncated SVD of l sampled vocabulary embeddings; U, S, V train
    C  = Σ_i (U_r diag(S_r))[:, i] ⊗ V_r[:, i]   the compressed outer product, an l × d prompt of rank ≤ r
    P  = avgpool_tokens(C, kernel = stride = k)  l / k prompt tokens
    the frozen model reads [P ; E(x)]

r(l + d + 1) trainable parameters instead of l·d. The final prompt is a fixed matrix, so a trained LAMP adapter
exports to a stock PEFT prompt-tuning adapter with l / k virtual tokens.

Choices where the specification leaves room:
* the compressed outer product is exactly the sum of the r rank-one products (U diag S) Vᵀ, with no extra mixing;
  every prompt token is a combination of the same r shared directions V_r.
* P0 samples l distinct vocabulary rows (with repetition only when l exceeds the vocabulary) from `init_seed`, so
  attaching is deterministic; the SVD runs in float32 on the CPU and the factors train in float32.
* the three factors share one learning rate (the trainer's): they are all the prompt.
* r may not exceed min(l, d): l is checked with the config, d (the model's width) when the adapter is attached.
"""

from __future__ import annotations

import torch
from torch import nn

from llmrec.errors import LLMRecError

from ..soft_prompt import SoftPromptAdapter, SoftPromptModel, sample_vocabulary
from .config import LAMPConfig


class LAMPModel(SoftPromptModel):
    """A frozen causal LM with LAMP's decomposed, pooled prompt."""

    adapter_type = "LAMP"
    config_class = LAMPConfig

    def __init__(self, language_model: nn.Module, config: LAMPConfig):
        super().__init__(language_model, config)
        d = self.hidden_size
        if config.r > d:
            raise LLMRecError(
                f"r ({config.r}) exceeds the model's embedding width d = {d}: the SVD of the "
                f"{config.num_virtual_tokens} × {d} prompt has at most {min(config.num_virtual_tokens, d)} singular "
                "values.",
                "adapter.args.r",
            )
        generator = torch.Generator().manual_seed(config.init_seed)
        initial = sample_vocabulary(self.get_input_embeddings().weight, config.num_virtual_tokens, generator)
        U, S, Vh = torch.linalg.svd(initial, full_matrices=False)
        device = self.get_input_embeddings().weight.device
        self.U = nn.Parameter(U[:, : config.r].contiguous().to(device))
        self.S = nn.Parameter(S[: config.r].contiguous().to(device))
        self.V = nn.Parameter(Vh[: config.r].T.contiguous().to(device))

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_config.pooled_length

    def decomposed_prompt(self) -> torch.Tensor:
        """C = (U diag S) Vᵀ, the l × d prompt before pooling."""
        return (self.U * self.S) @ self.V.T

    def prompt(self) -> torch.Tensor:
        k = self.prompt_config.pool_size
        full = self.decomposed_prompt()
        return full.view(-1, k, full.shape[-1]).mean(1)


class LAMPAdapter(SoftPromptAdapter):
    """`adapter.method: lamp` (the registry object: config class, attach, load, save)."""

    model_class = LAMPModel


LAMP = LAMPAdapter()
