"""CTR evaluation: "will the user like this item?" scored by the model's Yes/No answer, measured by AUC and UAUC.

The score of a row is the softmax over the logits of the first token of the yes answer and of the no answer at
the answer position (the token after the prompt): p(Yes) = σ(logit_yes − logit_no), computed by
`llmrec.eval.answers` (left-padded prompts, one position's logits), which text classification shares.

Metrics, per split: AUC over all rows, UAUC (the mean AUC over users who have both liked and disliked rows, with
their count), log loss, and the positive rate. Baselines on the same rows: item popularity (training interactions)
and, for a model with a CF model inside (CoRA), the CF model alone (the dot product of its embeddings).
"""

from __future__ import annotations

import math

import torch

from llmrec.data import RecData
from llmrec.errors import LLMRecError
from llmrec.logs import get_logger

from .answers import answer_token_ids, prompt_answer_logits
from .metrics import auc, uauc

logger = get_logger(__name__)


def _unwrap(model):
    return getattr(model, "module", model)


def ctr_scores(model, tokenizer, rows, batch_size: int, answer_ids: tuple[int, int], description: str = "CTR") -> list[float]:
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


def evaluate_ctr(model, tokenizer, data: RecData, recipe, split: str) -> tuple[dict, list[dict]]:
    """Metrics `<split>/auc`, `<split>/uauc`, ... and `baseline/<name>/...`, plus one prediction per row."""
    from llmrec.data.ctr import ctr_examples

    from .ranking import baseline_prefix

    config = recipe.data.ctr
    if config is None:
        raise LLMRecError("eval.task: ctr needs a data.ctr section (how rated interactions become Yes/No rows).", "data.ctr")
    rows = ctr_examples(data, split, config, recipe.run.seed)
    if len(rows) == 0:
        logger.warning(f"The {split} split has no CTR rows; nothing to evaluate.")
        return {}, []
    answers = answer_token_ids(tokenizer, (config.yes_answer, config.no_answer), "data.ctr.yes_answer")
    scores = ctr_scores(model, tokenizer, rows, recipe.eval.batch_size, answers, f"CTR {split}")
    users, items, labels = list(rows["user_id"]), list(rows["item_id"]), list(rows["label"])
    metrics = {f"{split}/{k}": v for k, v in ctr_metrics(users, labels, scores).items()}

    popularity = data.popularity("train")
    baselines = {"popularity": [float(popularity[i]) for i in items]}
    inner = _unwrap(model)
    if hasattr(inner, "cf_users_table"):
        with torch.no_grad():
            user_rows = inner.rows_of(users, "user")
            item_rows = inner.rows_of(items, "item")
            cf = (inner.cf_users_table[user_rows] * inner.cf_items_table[item_rows]).sum(-1)
        baselines["cf"] = torch.sigmoid(cf).tolist()
    for name, values in baselines.items():
        for key, value in ctr_metrics(users, labels, values).items():
            if key in ("auc", "uauc", "uauc_users"):
                metrics[baseline_prefix(name, split) + key] = value
    predictions = [{"user_id": u, "item_id": i, "label": y, "score": s} for u, i, y, s in zip(users, items, labels, scores)]
    return metrics, predictions
