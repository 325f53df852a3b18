"""CoRA's layers: a linear layer with a per-sample low-rank increment, and the collaborative query generator.

`CoRALinear` wraps a frozen `nn.Linear` W0. For each sample b of the batch it adds s · tanh(g) · B (A_b x):

    z     = einsum("bld,brd->blr", x, A)     # (batch, length, r): each sample's own A_b ∈ R^{r × d_in}
    delta = z @ Bᵀ                           # (batch, length, d_out), B ∈ R^{d_out × r} shared across samples

so the cost is that of ordinary LoRA and ΔW_b = B A_b is never materialised. The per-sample A is handed to the
layer by `CoRAModel.forward` for the duration of one forward pass.

`QueryGenerator` is the Q-Former-style generator: learnable queries, then blocks of (self-attention over the
queries, cross-attention to the conditioning tokens [W_u e_u; W_i e_i], MLP), pre-norm with residuals.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CoRALinear(nn.Module):
    """W0 x + s · tanh(g) · B (A_b x), with W0 frozen and A_b supplied per forward pass."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, gate: bool, fp32_delta: bool):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling, self.fp32_delta = r, scaling, fp32_delta
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32))
        if gate:
            # with a zero gate the increment starts at zero, so B starts random (LoRA's init for its A) to let the
            # gate's gradient flow at the first step
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            self.gate = nn.Parameter(torch.zeros((), dtype=torch.float32))
        else:
            self.gate = None
        self.lora_A: torch.Tensor | None = None  # (batch, r, in_features), set by CoRAModel for one forward

    def effective_B(self) -> torch.Tensor:
        """s · tanh(g) · B: the output-side factor, the `lora_B` of an exported PEFT LoRA with scaling 1."""
        factor = self.scaling * (torch.tanh(self.gate) if self.gate is not None else 1.0)
        return self.lora_B * factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        A = self.lora_A
        if A is None:
            raise RuntimeError("a CoRA layer ran without generated weights; call the CoRA model with cf_users "
                               "(and cf_items)")
        if A.shape[0] != x.shape[0]:
            raise RuntimeError(f"generated weights for {A.shape[0]} samples, but the batch has {x.shape[0]}")
        dtype = torch.float32 if self.fp32_delta else x.dtype
        z = torch.einsum("bld,brd->blr", x.to(dtype), A.to(dtype))
        return out + (z @ self.effective_B().to(dtype).T).to(out.dtype)


class GeneratorBlock(nn.Module):
    """Pre-norm: queries attend to each other, then to the conditioning tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_norm, self.cross_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        normed = self.self_norm(queries)
        queries = queries + self.self_attention(normed, normed, normed, need_weights=False)[0]
        normed = self.cross_norm(queries)
        queries = queries + self.cross_attention(normed, condition, condition, need_weights=False)[0]
        return queries + self.mlp(self.mlp_norm(queries))


class QueryGenerator(nn.Module):
    """CF embeddings → one A ∈ R^{r × d_in} per sample and target layer.

    Heads of targets with the same d_in are stacked into one weight tensor, so all of a group's A matrices come
    from a single einsum instead of one matmul per layer.
    """

    def __init__(self, cf_dim: int, in_features: list[int], r: int, query_dim: int, num_blocks: int, num_heads: int,
                 query_mode: str, num_queries: int, normalize_queries: bool, conditioning: str):
        super().__init__()
        self.r, self.query_mode, self.normalize_queries = r, query_mode, normalize_queries
        self.user_projection = nn.Linear(cf_dim, query_dim)
        self.item_projection = nn.Linear(cf_dim, query_dim) if conditioning == "user_item" else None
        self.condition_norm = nn.LayerNorm(query_dim)
        count = len(in_features) if query_mode == "per_target" else num_queries
        self.queries = nn.Parameter(torch.randn(count, query_dim) * 0.02)
        self.blocks = nn.ModuleList(GeneratorBlock(query_dim, num_heads) for _ in range(num_blocks))
        self.output_norm = nn.LayerNorm(query_dim)
        # group targets by input width: group g holds the targets `self.groups[g]`, heads (T_g, d_q, r·d_in)
        widths = sorted(set(in_features))
        self.groups = [[t for t, width in enumerate(in_features) if width == w] for w in widths]
        self.widths = widths
        bound = 1 / math.sqrt(query_dim)  # nn.Linear's default init, per stacked head
        self.head_weights = nn.ParameterList(
            nn.Parameter(torch.empty(len(group), query_dim, r * w).uniform_(-bound, bound))
            for group, w in zip(self.groups, widths)
        )
        self.head_biases = nn.ParameterList(
            nn.Parameter(torch.empty(len(group), r * w).uniform_(-bound, bound))
            for group, w in zip(self.groups, widths)
        )
        self.num_targets = len(in_features)

    def forward(self, user_embeddings: torch.Tensor, item_embeddings: torch.Tensor | None) -> list[torch.Tensor]:
        """[A_t of shape (batch, r, d_in_t) for each target t]."""
        tokens = [self.user_projection(user_embeddings)]
        if self.item_projection is not None:
            tokens.append(self.item_projection(item_embeddings))
        condition = self.condition_norm(torch.stack(tokens, dim=1))  # (batch, 1 or 2, d_q)
        queries = self.queries.unsqueeze(0).expand(condition.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, condition)
        queries = self.output_norm(queries)
        if self.normalize_queries:
            queries = nn.functional.normalize(queries, dim=-1)
        out: list[torch.Tensor | None] = [None] * self.num_targets
        for group, width, weight, bias in zip(self.groups, self.widths, self.head_weights, self.head_biases):
            if self.query_mode == "per_target":
                flat = torch.einsum("btq,tqo->bto", queries[:, group], weight)
            else:
                flat = torch.einsum("bq,tqo->bto", queries.mean(dim=1), weight)
            matrices = (flat + bias).unflatten(-1, (self.r, width))  # (batch, T_g, r, d_in)
            for position, target in enumerate(group):
                out[target] = matrices[:, position]
        return out
