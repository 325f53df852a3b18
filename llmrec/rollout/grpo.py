"""Rollouts inside TRL's `GRPOTrainer` (its `rollout_func` hook): the backend, and groups shared across processes.

GRPO may place one question's generations on several processes. `share_groups` gathers the prompts, lets each
process handle every P-th question whole (its tree, its votes, its follow-up generations), gathers the results back
and returns this process's slice in TRL's order, so group-level computations never see part of a group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from llmrec.errors import LLMRecError

from .hf import HFRollout
from .vllm import VLLMRollout


@contextlib.contextmanager
def generation_backend(trainer, vllm_chunk_tokens: int = 32) -> Iterator[HFRollout | VLLMRollout]:
    """vLLM when the trainer uses it (colocated engine or server client), else transformers on the unwrapped model
    (ZeRO-3 parameters gathered), in eval mode while generating."""
    if trainer.use_vllm:
        generation = trainer.vllm_generation
        engine = generation.llm if trainer.args.vllm_mode == "colocate" else generation.vllm_client
        yield VLLMRollout(engine, trainer.eos_token_ids, vllm_chunk_tokens)
        return
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                     gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model:
        training = model.training
        model.eval()
        try:
            yield HFRollout(model, trainer.eos_token_ids, trainer._tokenizer.pad_token_id)
        finally:
            model.train(training)


def sync_colocated_weights(llm, named_parameters: Iterable[tuple[str, Any]]) -> None:
    """Load updated weights into a colocated vLLM engine in place, then drop its prefix cache.

    TRL's colocate sync hands parameters one at a time to the model's `load_weights`, which fails on vLLM's CPU
    build: its linear layers are repacked for the CPU kernels after loading and lose their weight loaders. vLLM's
    in-place reload (`reload_weights`) restores them to the checkpoint layout, loads, and repacks again."""
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=named_parameters)
    llm.reset_prefix_cache()


def use_cpu_weight_sync(trainer) -> None:
    """On a machine without a GPU, a trainer whose colocated vLLM engine is the CPU build syncs its weights with
    `sync_colocated_weights` (TRL's own sync is kept everywhere else)."""
    import torch

    if not trainer.use_vllm or trainer.args.vllm_mode != "colocate" or torch.cuda.is_available():
        return
    generation = trainer.vllm_generation
    # TRL's VLLMGeneration is built inside GRPOTrainer.__init__, so its sync is replaced on the instance;
    # `_iter_named_params` is TRL's own walk over the (PEFT-merged, gathered) parameters under vLLM's names
    generation.sync_weights = lambda: sync_colocated_weights(generation.llm, generation._iter_named_params())


def release_engine(trainer) -> None:
    """Shut down a trainer's colocated vLLM engine now. Its own finalizer would run at exit, after the process group
    it uses is closed, and fail there; shutting it down also frees its memory for the evaluation."""
    llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


def share_groups(
    trainer, prompts: list, extras: list, group: int,
    grow: Callable[[list[tuple[int, Any, Any]]], list[tuple[int, list, dict]]],
) -> tuple[list, list[dict]]:
    """Run `grow` on this process's questions and return (this process's rows, every question's stats).

    `prompts` and `extras` are this process's share of the generation batch (each question repeated `group` times);
    `grow` receives [(question index, prompt, extra)] and returns [(question index, `group` rows, stats)]."""
    from accelerate.utils import gather_object

    process = trainer.accelerator
    everyone = gather_object(list(zip(prompts, extras)))
    if len(everyone) % group:
        raise LLMRecError(f"the generation batch ({len(everyone)} prompts) is not a whole number of groups of "
                          f"{group}.")
    questions = everyone[::group]
    mine = [(q, *questions[q]) for q in range(process.process_index, len(questions), process.num_processes)]
    records = sorted(gather_object(grow(mine) if mine else []), key=lambda record: record[0])
    rows = [row for _, group_rows, _ in records for row in group_rows]
    start = process.process_index * len(prompts)
    return rows[start:start + len(prompts)], [stats for _, _, stats in records]
