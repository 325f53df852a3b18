"""An in-process vLLM engine on a finished run, for ranking on vLLM without a server (`eval.engine: vllm`, `llmrec
recommend --engine vllm`).

It is planned as `llmrec serve` plans the server (`plan_serving`: the same export, checks and CPU settings), so a
ranking here and one from the server's /v1/recommend come from the same engine configuration. A CoRA run, whose
adapter depends on the user, and an EPT or LAMP run, whose prompt goes in as embeddings, are ranked by the server
only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.serve.plan import VLLM_MISSING, plan_serving

CPU_BLOCK_SIZE = 32  # the smallest KV block vLLM's CPU attention takes: prefix caching shares whole blocks


def offline_engine(run_dir: str | Path):
    """(vllm.LLM on the run's base model, the LoRARequest of its adapter)."""
    if importlib.util.find_spec("vllm") is None:
        raise LLMRecError(VLLM_MISSING + ".", "vllm")
    import os

    import torch

    plan = plan_serving([run_dir])
    if plan.per_user:
        raise LLMRecError("a CoRA run's adapter depends on the user: rank on vLLM through `llmrec serve` and "
                          "POST /v1/recommend, which loads each user's adapter.", str(run_dir))
    if not plan.adapters:
        raise LLMRecError("an EPT or LAMP run has no LoRA module: rank on vLLM through `llmrec serve` and POST "
                          "/v1/recommend, which sends its soft prompt as prompt embeddings.", str(run_dir))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB on the CPU build; plenty for ranking
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    settings = dict(model=plan.base, enable_lora=True, max_lora_rank=plan.max_lora_rank, max_loras=1,
                    enable_prefix_caching=True, revision=plan.revision)
    if not torch.cuda.is_available():
        settings |= dict(dtype=plan.dtype, gpu_memory_utilization=plan.memory_share, block_size=CPU_BLOCK_SIZE,
                         enforce_eager=True)
    llm = LLM(**settings)
    (name, folder), = plan.adapters.items()
    return llm, LoRARequest(name, 1, str(folder))


def rank_on_vllm(run_dir: str | Path, tokenizer, trie, prompts, excluded, beams: int) -> list[list[tuple[str, float]]]:
    """`eval.engine: vllm`: `rank_with_vllm` on an engine started for the run's final/ adapter, stopped after."""
    from accelerate import PartialState

    from llmrec.eval.vllm_ranking import rank_with_vllm

    if PartialState().num_processes > 1:
        raise LLMRecError("vLLM ranks in one process, which holds the engine; evaluate without accelerate's "
                          "processes (`llmrec eval RUN`) or with engine: transformers.", "eval.engine")
    llm, lora = offline_engine(run_dir)
    try:
        return rank_with_vllm(llm, tokenizer, trie, prompts, excluded, beams, lora)
    finally:
        shutdown(llm)


def shutdown(llm) -> None:
    """Stop the engine's core (its memory is not returned otherwise until the process ends)."""
    llm.llm_engine.engine_core.shutdown()
