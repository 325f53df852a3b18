"""EPT: efficient prompt tuning (short prompt, DePT position offsets, prompt fusion, multi-space projection)."""

from .config import EPTConfig
from .model import EPT, EPTModel

__all__ = ["EPT", "EPTConfig", "EPTModel"]
