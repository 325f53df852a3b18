"""`CFConfig`: how a collaborative-filtering model is trained (see `llmrec.cf` for the method)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
