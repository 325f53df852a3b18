"""LAMP: prompt tuning through a truncated-SVD decomposition, compressed outer product and average pooling."""

from .config import LAMPConfig
from .model import LAMP, LAMPModel

__all__ = ["LAMP", "LAMPConfig", "LAMPModel"]
