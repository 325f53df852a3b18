"""CTR measures: "will the user like this item?" scored by the model's Yes/No answer, measured by AUC and UAUC.

The score of a row is the softmax over the logits of the first token of the yes answer and of the no answer at
the answer position (the token after the prompt): p(Yes) = σ(logit_yes − logit_no), computed by
`llmrec.answers` (left-padded prompts, one position's logits), which text classification shares.

`ctr_metrics`: AUC over all rows, UAUC (the mean AUC over users who have both liked and disliked rows, with their
count), log loss, and the positive rate. `cf_scores`: the CF model inside a CoRA model on its own (σ of the dot
product of its embeddings), a baseline on the same rows.
"""

from __future__ import annotations

import math

import torch

from llmrec.answers import prompt_answer_logits

from .metrics import auc, uauc


def _unwrap(model):
    return getattr(model, "module", model)


def ctr_scores(model, tokenizer, rows, batch_size: int, answer_ids: tuple[int, int],
               description: str = "CTR") -> list[float]:
    """p(Yes) for every row (rows: prompt, label, user_id, item_id)."""
    logits = prompt_answer_logits(model, tokenizer, rows, batch_size, answer_ids, description)
    return torch.softmax(logits, dim=-1)[:, 0].tolist()


def ctr_metrics(users: list[str], labels: list[int], scores: list[float]) -> dict[str, float]:
    out: dict[str, float] = {"rows": len(labels), "positive_rate": sum(labels) / len(labels) if labels else math.nan}
    out["auc"] = auc(labels, scores) if 0 < sum(labels) < len(labels) else math.nan
    out["uauc"], out["uauc_users"] = uauc(users, labels, scores)
    clipped = [min(max(s, 1e-7), 1 - 1e-7) for s in scores]
    out["logloss"] = -sum(math.log(p if y else 1 - p) for y, p in zip(labels, clipped)) / max(1, len(labels))
    return out


def cf_scores(model, users: list[str], items: list[str]) -> list[float] | None:
    """σ(user · item) of the CF model inside a CoRA model for each (user, item) row; None for other models."""
    inner = _unwrap(model)
    if not hasattr(inner, "cf_users_table"):
        return None
    with torch.no_grad():
        user_rows = inner.rows_of(users, "user")
        item_rows = inner.rows_of(items, "item")
        cf = (inner.cf_users_table[user_rows] * inner.cf_items_table[item_rows]).sum(-1)
    return torch.sigmoid(cf).tolist()
