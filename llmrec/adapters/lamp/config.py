"""`LAMPConfig`: the fields of `adapter.args` for `adapter.method: lamp`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LAMPConfig:
    """LAMP: a prompt kept as its truncated SVD factors U_r (l × r), S_r (r), V_r (d × r) — r(l + d + 1) trainable
    parameters — recombined as the sum of r rank-one outer products, then average-pooled to l / pool_size tokens."""

    num_virtual_tokens: int = field(
        default=100,
        metadata={"help": "l, the length of the decomposed prompt P0 (sampled vocabulary embeddings) before pooling."},
    )
    r: int = field(default=8, metadata={"help": "Rank of the truncated SVD; at most min(l, d)."})
    pool_size: int = field(
        default=1,
        metadata={"help": "k, kernel and stride of the average pooling along the tokens: the model sees l / k prompt "
                  "tokens (fewer tokens, less memory and time per step). l must be divisible by k."},
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the vocabulary sample that initialises P0."})
    task_type: str = field(default="CAUSAL_LM", metadata={"help": "Accepted for symmetry with PEFT configs."})

    def __post_init__(self):
        for name in ("num_virtual_tokens", "r", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.num_virtual_tokens % self.pool_size:
            raise ValueError(f"num_virtual_tokens ({self.num_virtual_tokens}) must be divisible by pool_size "
                             f"({self.pool_size}): the pooling takes the prompt in whole windows of pool_size tokens")
        if self.r > self.num_virtual_tokens:
            raise ValueError(f"r ({self.r}) cannot exceed num_virtual_tokens ({self.num_virtual_tokens}): the SVD "
                             f"of an l × d prompt has at most min(l, d) singular values")

    @property
    def pooled_length(self) -> int:
        return self.num_virtual_tokens // self.pool_size

    def to_dict(self) -> dict:
        return {"adapter_type": "LAMP", **asdict(self)}
