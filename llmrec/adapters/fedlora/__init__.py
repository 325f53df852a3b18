"""FedLoRA: LoRA with FedLoRA-Optimizer's direction/magnitude split of A and B (shared directions, local b_M)."""

from .config import FedLoRAConfig
from .layer import PARAMETERS, FedLoRALinear
from .model import FEDLORA, FedLoRAAdapter, FedLoRAModel

__all__ = ["FEDLORA", "PARAMETERS", "FedLoRAAdapter", "FedLoRAConfig", "FedLoRALinear",
           "FedLoRAModel"]
