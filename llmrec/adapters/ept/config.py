"""`EPTConfig`: the fields of `adapter.args` for `adapter.method: ept` (EPT, and DePT with fusion and projection
off)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EPTConfig:
    """Efficient prompt tuning: a short prompt, DePT's low-rank position offsets on the input embeddings, prompt
    fusion (the prompt attends over the offsets' low-rank basis) and a gated multi-space projection.

    Trainable parameters, with d the model's embedding width:
    m·d (prompt) + n·r (A, with offsets) + r·d (B, with offsets or fusion) + 4·d·fusion_dim (fusion)
    + num_spaces·(2·d·projection_rank + d + 1) (projection and gate). DePT's parity with an l-token prompt is
    m·d + n·r + r·d = l·d, e.g. d = 768, n = 256, m = 40, r = 45: 76,800 parameters, as many as 100 tokens.
    """

    # --- the short prompt P_s ----------------------------------------------------------------------------------------
    num_virtual_tokens: int = field(
        default=40,
        metadata={"help": "m, the prompt's length in tokens (initialised from sampled vocabulary embeddings)."},
    )

    # --- DePT's position offsets: E(x) + s · (A B)[position] ---------------------------------------------------------
    offsets: bool = field(
        default=True,
        metadata={"help": "Add the low-rank offset to the input token embeddings by position. Off, the trained prompt "
                  "exports to a stock PEFT prompt-tuning adapter."},
    )
    max_length: int = field(
        default=256,
        metadata={"help": "n, rows of the offset table A: the longest input (prompt and completion tokens, generated "
                  "ones included) the adapter accepts."},
    )
    r: int = field(default=45, metadata={"help": "Rank of the offset A (n × r) · B (r × d); B starts at zero."})
    lora_alpha: float = field(default=16.0, metadata={"help": "α; the offset is scaled by s = α / √r."})

    # --- prompt fusion ---------------------------------------------------------------------------------------------
    fusion: bool = field(
        default=True,
        metadata={"help": "P_f = P_s + softmax(P_s W_q (B W_k)ᵀ / √fusion_dim) B W_v W_o: the prompt attends over the "
                  "r rows of B (the offset's low-rank basis)."},
    )
    fusion_dim: int = field(default=8, metadata={"help": "Width of the fusion's queries, keys and value bottleneck."})

    # --- multi-space projection ------------------------------------------------------------------------------------
    projection: bool = field(
        default=True,
        metadata={"help": "P_r = P_f + Σ_i g_i P_f D_i U_i with g = softmax(G(mean(P_f))), N low-rank projections."},
    )
    num_spaces: int = field(default=4, metadata={"help": "N, the number of projections (spaces) the gate mixes."})
    projection_rank: int = field(default=4, metadata={"help": "Rank of each projection D_i (d × q) · U_i (q × d)."})

    # --- learning rates --------------------------------------------------------------------------------------------
    prompt_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the prompt P_s (DePT uses about 3e-1); None: the trainer's "
                  "learning_rate."},
    )
    low_rank_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of A, B, the fusion, projection and gate weights (DePT uses 1e-4 to 5e-3); "
                  "None: the trainer's learning_rate."},
    )

    init_seed: int = field(
        default=0, metadata={"help": "Seed of the prompt's vocabulary sample and the random inits."}
    )
    task_type: str = field(default="CAUSAL_LM", metadata={"help": "Accepted for symmetry with PEFT configs."})

    def __post_init__(self):
        for name in ("num_virtual_tokens", "max_length", "r", "fusion_dim", "num_spaces", "projection_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("prompt_learning_rate", "low_rank_learning_rate"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r**0.5

    def to_dict(self) -> dict:
        return {"adapter_type": "EPT", **asdict(self)}
