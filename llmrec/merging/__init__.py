"""Model merging: one model from several adapters trained on one base (`shared/methods/merging.md`).

`static.py`: task arithmetic, TIES, DARE, SVD and concatenation of LoRA adapters on PEFT's `add_weighted_adapter`;
`adamerging.py`: task- and layer-wise coefficients learned on unlabelled prompts (AdaMerging);
`surgery.py`: Representation Surgery on the final layer, per endpoint, after any merge;
`runs.py`: `llmrec merge`, finished runs merged into a new run directory and evaluated.
"""

from .adamerging import AdaMergingConfig, learn_coefficients, materialise
from .static import METHODS, MergeConfig, merge_loaded

__all__ = ["METHODS", "AdaMergingConfig", "MergeConfig", "learn_coefficients", "materialise", "merge_loaded"]
