"""What the preference stages (dpo, softmax_dpo, causal_dpo) share: their datasets and their reference model."""

from __future__ import annotations

from accelerate.utils import is_peft_model

from llmrec.data import pairwise_rows, preference_examples

from . import StageContext


def build_preference_datasets(context: StageContext, pairwise: bool):
    """Multi-negative rows from the run's data (expanded into one row per negative for pairwise DPO)."""
    config = context.data_config
    task = context.recipe.data.task
    seed = context.recipe.run.seed + context.index
    rank = _model_ranker(context) if config.sampler == "model" else None
    train = preference_examples(context.data, "train", task, config, seed, rank)
    valid = None
    if context.wants_eval:
        valid = preference_examples(context.data, "valid", task, config, seed + 1, rank)
    keep = ["prompt", "chosen", "rejected"] + (["environment"] if "environment" in train.column_names else [])
    train, valid = train.select_columns(keep), valid.select_columns(keep) if valid is not None else None
    if pairwise:
        train, valid = pairwise_rows(train), pairwise_rows(valid) if valid is not None else None
    return train, valid


def _model_ranker(context: StageContext):
    from llmrec.eval.ranking import build_trie, rank_with_model

    trie = build_trie(context.tokenizer, context.data, context.recipe.data.task)

    def rank(prompts, excluded, k):
        ranked = rank_with_model(context.model, context.tokenizer, trie, prompts, excluded, k,
                                 context.recipe.eval.batch_size)
        return [[item for item, _ in row] for row in ranked]

    return rank


def reference_model_kwargs(context: StageContext) -> dict:
    """The reference policy is the model as this stage starts. With an adapter TRL keeps a frozen copy of it (or
    disables a fresh one); with full fine-tuning it is reloaded from where this stage's model came from, since the
    in-memory model may already carry a previous trainer's patched forward."""
    if is_peft_model(context.model):
        return {}
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        context.model_source,
        dtype=context.model.dtype,
        use_safetensors=True,
        trust_remote_code=context.recipe.model.trust_remote_code,
    )
    return {"ref_model": reference.requires_grad_(False).eval()}  # TRL places it on the device
