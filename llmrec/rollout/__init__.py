"""Rollout backends for RL: N completions per prompt, as a flat sample or an entropy–confidence tree.

One interface, `backend.generate(prompts, n_leaves, tree, sampling, seed) -> list[QuestionRollout]`, with prompts
as token ids. `HFRollout` decodes with transformers and a shared, re-indexed KV cache (CPU and GPU); `VLLMRollout`
issues continuation requests to a vLLM engine with prefix caching (GPU). The branching and pruning rules live in
`tree.py` and are the same for both.
"""

from .hf import HFRollout
from .tree import TreeBuilder, TreeConfig, token_signals
from .types import Completion, QuestionRollout, SamplingConfig
from .vllm import VLLMRollout

__all__ = [
    "Completion",
    "HFRollout",
    "QuestionRollout",
    "SamplingConfig",
    "TreeBuilder",
    "TreeConfig",
    "VLLMRollout",
    "token_signals",
]
