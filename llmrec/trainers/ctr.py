"""CTR: train a model to answer "will the user like this item?" with Yes or No (TALLRec / CoLLM / CoRA's task).

The loss is the cross-entropy of the two-way softmax over the Yes and No answer tokens' logits at the answer
position — the same quantity the evaluator scores (`llmrec.tasks.ctr`), so training and evaluation agree. One loop
serves every adapter: text-only LoRA (the TALLRec baseline), full fine-tuning, and CoRA, whose model also takes
the CF rows of each row's user and item (the collator adds them through the model's `cf_index`).

Built on transformers' `Trainer` rather than a TRL trainer: TRL has no trainer for a classification read off two
token logits (SFT's loss would spread over the whole vocabulary and the EOS token). Validation reports eval_auc.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from llmrec.answers import AnswerCollator, answer_logits, answer_token_ids, tokenize_prompts
from llmrec.data.ctr import ctr_examples
from llmrec.eval.metrics import auc

from . import StageContext, StageSpec


@dataclass
class CTRConfig(TrainingArguments):
    r"""
    Configuration of [`CTRTrainer`], the `stages[i].args` of `trainer: ctr`: every field of
    `transformers.TrainingArguments`, plus:

        > Parameters that control the data preprocessing

        max_length (`int` or `None`, *optional*, defaults to `512`):
            Longest prompt in tokens; a longer prompt keeps its end (the question and the latest history). `None`
            keeps every prompt whole.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Overrides the `True` default of `TrainingArguments`: kept `False`, since the collator needs the `user_id`
            and `item_id` columns for CoRA.
    """

    max_length: int | None = field(
        default=512,
        metadata={"help": "Longest prompt in tokens; longer ones keep their end (question, latest history)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs user_id and item_id for CoRA."}
    )


class CTRTrainer(Trainer):
    def __init__(self, model, args: CTRConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 answers: tuple[str, str] = (" Yes", " No"), **kwargs):
        if processing_class is None:
            raise ValueError("CTRTrainer needs the tokenizer (processing_class)")
        self.answer_ids = answer_token_ids(processing_class, answers, "data.ctr.yes_answer")
        tokenize = lambda rows: {"input_ids": tokenize_prompts(processing_class, rows["prompt"], args.max_length)}  # noqa: E731
        columns = ["input_ids", "label", "user_id", "item_id"]
        train_dataset = (train_dataset.map(tokenize, batched=True).select_columns(columns)
                         if train_dataset is not None else None)
        eval_dataset = (eval_dataset.map(tokenize, batched=True).select_columns(columns)
                        if eval_dataset is not None else None)
        super().__init__(
            model=model, args=args,
            data_collator=AnswerCollator(processing_class.pad_token_id, getattr(model, "cf_index", None)),
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
            compute_metrics=_auc_metric, **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = answer_logits(model, inputs, self.answer_ids)
        loss = torch.nn.functional.cross_entropy(logits, 1 - inputs["labels"])  # class 0 is "Yes"
        return (loss, logits) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, logits = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), logits.detach(), inputs["labels"]


def _auc_metric(prediction) -> dict[str, float]:
    logits, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    scores = torch.softmax(logits.float(), dim=-1)[:, 0].tolist()
    labels = labels.tolist()
    return {"auc": auc(labels, scores)} if 0 < sum(labels) < len(labels) else {}


def recipe_needs(recipe) -> list[tuple[tuple, str]]:
    if recipe.data.ctr is None:
        return [(("data",), "trainer: ctr needs a data.ctr section (how rated interactions become Yes/No rows).")]
    return []


def build_datasets(context: StageContext):
    config = context.recipe.data.ctr
    seed = context.recipe.run.seed
    train = ctr_examples(context.data, "train", config, seed)
    valid = ctr_examples(context.data, "valid", config, seed) if context.wants_eval else None
    return train, valid


def trainer_kwargs(context: StageContext) -> dict:
    return {"answers": (context.recipe.data.ctr.yes_answer, context.recipe.data.ctr.no_answer)}


CTR = StageSpec(
    config_class=CTRConfig,
    trainer_class=CTRTrainer,
    build_datasets=build_datasets,
    description="Yes/No like prediction (CTR) on rated interactions",
    trainer_kwargs=trainer_kwargs,
    recipe_needs=recipe_needs,
)
