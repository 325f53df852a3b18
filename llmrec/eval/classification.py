"""Text-classification evaluation by label-word scoring (`eval.task: classification`, needs `data.classification`).

The predicted class of a row is the argmax over the logits of each label word's first token at the answer position
(the token after the prompt), read by the same left-padded, one-position scoring as the CTR task
(`llmrec.eval.answers`). Only the label words compete, so the model need not put them above every other token:
what the SFT stage trains (the label word, then EOS) and what is measured agree on the class.

Metrics, per split: `<split>/accuracy` and `<split>/rows`, and the majority-class baseline (always the most frequent
class of the training rows) as `baseline/majority/accuracy` on the test split (`baseline/majority/<split>/...` on
the others). Predictions hold each row's label, predicted class and the softmax over the label words.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger

from .answers import answer_token_ids, prompt_answer_logits

logger = get_logger(__name__)


def label_token_ids(tokenizer, label_words: Sequence[str]) -> tuple[int, ...]:
    """The first token of each label word; they must all differ (an error names data.classification.label_words)."""
    return answer_token_ids(tokenizer, label_words, "data.classification.label_words")


def predict(logits: torch.Tensor) -> list[int]:
    """The class of each row: the label word with the highest logit (the first one on a tie)."""
    return logits.argmax(-1).tolist()


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    if not labels:
        return float("nan")
    return sum(int(y == p) for y, p in zip(labels, predictions)) / len(labels)


def majority_class(labels: Sequence[int]) -> int:
    """The most frequent class (the smallest such class on a tie)."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def evaluate_classification(model, tokenizer, recipe, split: str) -> tuple[dict, list[dict]]:
    """Metrics `<split>/accuracy`, `<split>/rows` and the majority baseline, plus one prediction per row."""
    from llmrec.data.classification import classification_examples

    from .ranking import baseline_prefix

    config = recipe.data.classification
    if config is None:
        raise LLMRecError("eval.task: classification needs a data.classification section (the task and its label "
                          "words).", "data.classification")
    rows = classification_examples(config, split, recipe.run.seed)
    if len(rows) == 0:
        logger.warning(f"The {split} split has no classification rows; nothing to evaluate.")
        return {}, []
    label_ids = label_token_ids(tokenizer, config.label_words)
    logits = prompt_answer_logits(model, tokenizer, rows, recipe.eval.batch_size, label_ids, f"classification {split}")
    labels, predictions = list(rows["label"]), predict(logits)
    majority = majority_class(classification_examples(config, "train", recipe.run.seed)["label"])
    metrics = {
        f"{split}/rows": len(labels),
        f"{split}/accuracy": accuracy(labels, predictions),
        baseline_prefix("majority", split) + "accuracy": accuracy(labels, [majority] * len(labels)),
    }
    probabilities = torch.softmax(logits, dim=-1).tolist()
    rows_out = [{"row": i, "label": y, "prediction": p, "probabilities": [round(q, 6) for q in probs]}
                for i, (y, p, probs) in enumerate(zip(labels, predictions, probabilities))]
    return metrics, rows_out
