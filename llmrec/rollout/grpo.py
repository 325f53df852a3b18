"""Rollouts inside TRL's `GRPOTrainer` (its `rollout_func` hook): the backend, and groups shared across processes.

GRPO may place one question's generations on several processes. `share_groups` gathers the prompts, lets each
process handle every P-th question whole (its tree, its votes, its follow-up generations), gathers the results back
and returns this process's slice in TRL's order, so group-level computations never see part of a group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
