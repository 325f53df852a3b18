"""SFT: TRL's `SFTTrainer` unchanged, trained on next-item prompt–completion examples (BIGRec-style), on the
rows of a text-classification task when the recipe sets `data.classification`, on worked solutions of the
training problems when it sets `data.reasoning`, or on instruction rows when it sets `data.instructions` (the
training share of the centralised split; federated clients build their own rows).

The loss covers the completion only (TRL's default for prompt–completion data): the model learns to write the
next item's title, then EOS, given the history; or, for classification, the class's label word, then EOS, given
the prompt (whose label-word logits `eval.task: classification` then compares).
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from llmrec.data import classification_examples, next_item_examples
from llmrec.eval.classification import label_token_ids

from . import StageContext, StageSpec


def build_datasets(context: StageContext):
    """Next-item examples; with `data.classification`, that task's rows instead (train, and valid for evaluation
    during training), after checking that the label words start with distinct tokens, which scoring needs."""
    recipe = context.recipe
    if recipe.data.instructions is not None:
        from datasets import Dataset

        from llmrec.data.instructions import instruction_split

        def rows(split: str):
            return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                      for r in instruction_split(recipe.data.instructions, recipe.run.seed, split)])

        return rows("train"), rows("test") if context.wants_eval else None
    if recipe.data.reasoning is not None:
        from llmrec.data import reasoning_examples

        columns = ["prompt", "completion"]
        train = reasoning_examples(recipe.data.reasoning, "train", recipe.run.seed).select_columns(columns)
        valid = reasoning_examples(recipe.data.reasoning, "valid", recipe.run.seed).select_columns(columns) if context.wants_eval else None
        return train, valid
    if recipe.data.classification is not None:
        config = recipe.data.classification
        label_token_ids(context.tokenizer, config.label_words)
        columns = ["prompt", "completion"]
        train = classification_examples(config, "train", recipe.run.seed).select_columns(columns)
        valid = classification_examples(config, "valid", recipe.run.seed).select_columns(columns) if context.wants_eval else None
        return train, valid
    task = recipe.data.task
    train = next_item_examples(context.data, "train", task).select_columns(["prompt", "completion"])
    valid = None
    if context.wants_eval:
        valid = next_item_examples(context.data, "valid", task).select_columns(["prompt", "completion"])
    return train, valid


def trainer_kwargs(context: StageContext) -> dict:
    # prompt adapters (EPT/DePT) train their prompt and low-rank factors at different learning rates
    groups = getattr(context.model, "optimizer_cls_and_kwargs", None)
    return {"optimizer_cls_and_kwargs": groups(context.args)} if groups else {}


SFT = StageSpec(
    config_class=SFTConfig,
    trainer_class=SFTTrainer,
    build_datasets=build_datasets,
    description="supervised fine-tuning on prompt-completion pairs (next-item, or classification)",
    trainer_kwargs=trainer_kwargs,
)
