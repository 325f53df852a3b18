"""`FedLoRALinear`: a frozen `nn.Linear` W0 plus a LoRA increment whose factors are split into direction and
magnitude (FedLoRA-Optimizer):

    A = diag(a_M) · normalise_rows(A_D)      A_D ∈ R^{r × d_in},      a_M ∈ R^r
    B = diag(b_M) · normalise_rows(B_D)      B_D ∈ R^{d_out × r},     b_M ∈ R^{d_out}
    h = W0 x + (α / r) · B A dropout(x)

normalise_rows(M) = M / max(‖row‖, eps), applied in every forward pass: the stored directions are free parameters
(the optimiser and the server's averaging may change their norms) and only their direction matters.

With `offset`, A starts at its drawn rows (a_M = their norms) and the layer keeps the initial factors A₀, B₀ as
buffers and subtracts their increment: h = W0 x + (α / r) · (B A − B₀ A₀) dropout(x), which is W0 x at the start
while every tensor already has a gradient. (Equivalent to the frozen weight offset by −(α / r) B₀A₀, kept in low rank
so the frozen weight itself is never changed.)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

PARAMETERS = ("lora_A_direction", "lora_A_magnitude", "lora_B_direction", "lora_B_magnitude")


class FedLoRALinear(nn.Module):
    """W0 x + (α / r) · B A dropout(x), with W0 frozen and A, B built from their directions and magnitudes."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float, init_a_magnitude: float,
                 init_b_magnitude: float, eps: float, offset: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling, self.eps = r, scaling, eps
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # drawn on the CPU in float32 whatever the base's device and dtype, so a seed gives the same adapter everywhere
        A_direction = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A_direction, a=math.sqrt(5))  # PEFT's lora_A init; the forward normalises the rows
        device = base_layer.weight.device
        self.lora_A_direction = nn.Parameter(A_direction.to(device))
        self.lora_A_magnitude = nn.Parameter(torch.full((r,), float(init_a_magnitude), device=device))
        self.lora_B_direction = nn.Parameter(torch.randn(self.out_features, r).to(device))
        self.lora_B_magnitude = nn.Parameter(torch.full((self.out_features,), float(init_b_magnitude), device=device))
        self.offset = offset
        if offset:
            with torch.no_grad():
                self.lora_A_magnitude.copy_(self.lora_A_direction.norm(dim=1))
            self.register_buffer("initial_A", self.lora_A().detach().clone())
            self.register_buffer("initial_B", self.lora_B().detach().clone())

    def lora_A(self) -> torch.Tensor:
        """A = diag(a_M) · A_D with unit-norm rows of A_D: (r, d_in)."""
        return self.lora_A_magnitude[:, None] * F.normalize(self.lora_A_direction, dim=1, eps=self.eps)

    def lora_B(self) -> torch.Tensor:
        """B = diag(b_M) · B_D with unit-norm rows of B_D: (d_out, r)."""
        return self.lora_B_magnitude[:, None] * F.normalize(self.lora_B_direction, dim=1, eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dtype = self.lora_A_direction.dtype  # the increment in the adapter's precision (float32), then cast back
        x = self.lora_dropout(x.to(dtype))
        delta = (x @ self.lora_A().T) @ self.lora_B().T
        if self.offset:
            delta = delta - (x @ self.initial_A.T) @ self.initial_B.T
        return out + (self.scaling * delta).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling}"
