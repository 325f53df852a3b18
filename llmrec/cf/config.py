"""`CFConfig` and `SASRecConfig`: how the collaborative-filtering models are trained (see `llmrec.cf`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmrec.schema import Section


class CFConfig(Section):
    """A BPR-trained matrix factorisation or LightGCN model over the training interactions."""

    model: Literal["mf", "lightgcn"] = Field(
        "mf", description="mf: one embedding per user and item; lightgcn: the same tables propagated over the graph."
    )
    dim: int = Field(64, ge=1, description="Embedding size.")
    num_layers: int = Field(
        2, ge=0, description="LightGCN propagation layers (the final embedding is the layer mean)."
    )
    epochs: int = Field(
        100, ge=1, description="Most passes over the training positives (early stopping may end sooner)."
    )
    batch_size: int = Field(1024, ge=1, description="BPR triples (user, positive, negative) per step.")
    learning_rate: float = Field(1e-2, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(
        1e-4, ge=0,
        description="L2 on the batch's (layer-0) embeddings, divided by the batch size, as in BPR/LightGCN.",
    )
    patience: int = Field(
        5, ge=1, description="Stop after this many epochs without a better validation AUC; the best epoch is kept."
    )
    positives: Literal["liked", "all"] = Field(
        "liked",
        description="BPR positives: training interactions rated at least like_threshold (liked), or all of them.",
    )
    like_threshold: float = Field(4.0, description="A rating at or above this is a like (positives: liked).")


class SASRecConfig(Section):
    """SASRec, the sequential ranking baseline (see `llmrec.cf.sasrec`); defaults from the paper (ML-1M)."""

    dim: int = Field(64, ge=1, description="Embedding and hidden size.")
    num_layers: int = Field(2, ge=1, description="Self-attention blocks.")
    num_heads: int = Field(1, ge=1, description="Attention heads (must divide dim).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings, attention and feed-forward.")
    max_length: int = Field(50, ge=1, description="Most recent items of a sequence the model reads.")
    epochs: int = Field(200, ge=1,
                        description="Most passes over the training sequences (early stopping may end sooner).")
    batch_size: int = Field(128, ge=1, description="Sequences per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    patience: int = Field(5, ge=1, description="Stop after this many epochs without a better valid NDCG@10.")

    @model_validator(mode="after")
    def _heads_divide(self) -> SASRecConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide dim ({self.dim})")
        return self
