"""Text-classification measures by label-word scoring.

The predicted class of a row is the argmax over the logits of each label word's first token at the answer position
(the token after the prompt), read by the same left-padded, one-position scoring as the CTR task
(`llmrec.answers`). Only the label words compete, so the model need not put them above every other token: what the
SFT stage trains (the label word, then EOS) and what is measured agree on the class. The majority-class baseline
always answers the most frequent class of the training rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from llmrec.answers import answer_token_ids


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
