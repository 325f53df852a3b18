"""`CoRAConfig`: the fields of `adapter.args` for `adapter.method: cora`, grouped like PEFT's configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from ..targets import TARGET_PRESETS


@dataclass
class CoRAConfig:
    """Collaborative LoRA: low-rank weight increments generated per sample from frozen CF embeddings.

    The CF model is trained on the run's training interactions when the adapter is attached (cached in the run
    directory) and frozen; only the generator, the shared B matrices and the gates train.
    """

    # --- the low-rank increments ---------------------------------------------------------------------------------
    r: int = field(default=8, metadata={"help": "Rank of each generated increment ΔW = B·A(u, i)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale α; the increment is multiplied by α / r."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "'qv', 'attention', 'all-linear' (every projection of every decoder layer, the paper's "
                  "choice) or a list of module names such as ['q_proj', 'v_proj']."},
    )
    gate: bool = field(
        default=True,
        metadata={"help": "Multiply each increment by tanh(g) with g zero-initialised (B then starts random); "
                  "without the gate B starts at zero. Either way the model at step 0 is the base model."},
    )
    fp32_delta: bool = field(default=True, metadata={"help": "Compute the increment in float32 (stabiliser)."})

    # --- the generator -------------------------------------------------------------------------------------------
    query_mode: Literal["per_target", "pooled"] = field(
        default="per_target",
        metadata={"help": "'per_target': one learnable query per (layer, module) pair feeds that pair's head; "
                  "'pooled': `num_queries` queries are averaged and every head reads the pooled vector."},
    )
    num_queries: int = field(default=8, metadata={"help": "Queries in 'pooled' mode."})
    query_dim: int = field(default=64, metadata={"help": "Width d_q of the queries and conditioning tokens."})
    num_blocks: int = field(default=2, metadata={"help": "Generator blocks (self-attention, cross-attention, MLP)."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads in the generator blocks."})
    normalize_queries: bool = field(
        default=True, metadata={"help": "L2-normalise generator outputs before the heads."}
    )

    # --- conditioning ----------------------------------------------------------------------------------------------
    conditioning: Literal["user_item", "user"] = field(
        default="user_item",
        metadata={"help": "'user_item': ΔW depends on the (user, item) pair (the paper); 'user': on the user only, so "
                  "a user's weights export to one static PEFT LoRA adapter."},
    )
    cold_start: Literal["error", "zero", "mean"] = field(
        default="error",
        metadata={"help": "A user or item the CF model has no embedding for: 'error', or use a zero / mean "
                  "embedding."},
    )

    # --- the frozen CF model ---------------------------------------------------------------------------------------
    cf_model: Literal["mf", "lightgcn"] = field(
        default="mf", metadata={"help": "Matrix factorisation or LightGCN (BPR)."}
    )
    cf_dim: int = field(default=64, metadata={"help": "CF embedding size."})
    cf_num_layers: int = field(default=2, metadata={"help": "LightGCN propagation layers."})
    cf_epochs: int = field(default=100, metadata={"help": "Most CF training epochs (early stopping on valid AUC)."})
    cf_batch_size: int = field(default=1024, metadata={"help": "BPR triples per CF step."})
    cf_learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of the CF model."})
    cf_weight_decay: float = field(default=1e-4, metadata={"help": "L2 weight on the batch's CF embeddings."})
    cf_patience: int = field(default=5, metadata={"help": "CF epochs without valid-AUC improvement before stopping."})
    cf_positives: Literal["liked", "all"] = field(
        default="liked",
        metadata={"help": "BPR positives: training interactions rated at least data.ctr.like_threshold, or all."},
    )

    task_type: str = field(default="CAUSAL_LM", metadata={"help": "Accepted for symmetry with PEFT configs."})

    def __post_init__(self):
        if self.r < 1 or self.query_dim < 1 or self.num_blocks < 0 or self.num_queries < 1:
            raise ValueError("r, query_dim and num_queries must be at least 1, num_blocks at least 0")
        if self.query_dim % self.num_heads:
            raise ValueError(f"query_dim ({self.query_dim}) must be divisible by num_heads ({self.num_heads})")
        if isinstance(self.target_modules, str) and self.target_modules not in (*TARGET_PRESETS, "all-linear"):
            raise ValueError(f"target_modules must be 'qv', 'attention', 'all-linear' or a list of module names, not "
                             f"{self.target_modules!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return {"adapter_type": "CORA", **asdict(self)}
