"""Model merging: one model from several adapters trained on one base (`shared/methods/merging.md`).

`static.py`: task arithmetic, TIES, DARE, SVD and concatenation of LoRA adapters on PEFT's `add_weighted_adapter`;
`runs.py`: `llmrec merge`, finished runs merged into a new run directory and evaluated.
"""

from .static import METHODS, MergeConfig, merge_loaded

__all__ = ["METHODS", "MergeConfig", "merge_loaded"]
