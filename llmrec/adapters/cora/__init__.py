"""CoRA: collaborative LoRA (per-sample low-rank increments generated from frozen CF embeddings)."""

from .config import CoRAConfig
from .layer import CoRALinear, QueryGenerator
from .model import CORA, CoRAModel

__all__ = ["CORA", "CoRAConfig", "CoRALinear", "CoRAModel", "QueryGenerator"]
