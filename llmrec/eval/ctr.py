"""CTR evaluation: "will the user like this item?" scored by the model's Yes/No answer, measured by AUC and UAUC.

The score of a row is the softmax over the logits of the first token of the yes answer and of the no answer at
the answer position (the token after the prompt): p(Yes) = σ(logit_yes − logit_no). Prompts are left-padded with
explicit position ids, so the answer position is the last one for every row and the model computes the logits of
that one position only (`logits_to_keep=1`).

Metrics, per split: AUC over all rows, UAUC (the mean AUC over users who have both liked and disliked rows, with
their count), log loss, and the positive rate. Baselines on the same rows: item popularity (training interactions)
and, for a model with a CF model inside (CoRA), the CF model alone (the dot product of its embeddings).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from llmrec.data import RecData
from llmrec.errors import LLMRecError
from llmrec.logs import get_logger

from .metrics import auc, uauc

logger = get_logger(__name__)


def answer_token_ids(tokenizer, yes_answer: str, no_answer: str) -> tuple[int, int]:
    """The first token of each answer as it follows the prompt; they must differ."""
    yes = tokenizer(yes_answer, add_special_tokens=False)["input_ids"]
    no = tokenizer(no_answer, add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise LLMRecError(
            f"the answers {yes_answer!r} and {no_answer!r} must start with different tokens for this tokenizer "
            f"(they start with {yes[:1]} and {no[:1]}).",
            "data.ctr.yes_answer",
        )
    return yes[0], no[0]


class CTRCollator:
    """Left-padded `input_ids`, `attention_mask`, `position_ids`, `labels` and, for a CoRA model, the CF rows of
    each row's user and item (`cf_index` is the model's lookup)."""

    def __init__(self, pad_token_id: int, cf_index=None):
        self.pad_token_id, self.cf_index = pad_token_id, cf_index

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for b, row in enumerate(rows):
            ids = row["input_ids"]
            input_ids[b, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[b, longest - len(ids):] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
            "labels": torch.tensor([row["label"] for row in rows], dtype=torch.long),
        }
        if self.cf_index is not None:
            batch.update(self.cf_index([row["user_id"] for row in rows], [row["item_id"] for row in rows]))
        return batch


def yes_no_logits(model, batch: dict, answer_ids: tuple[int, int]) -> torch.Tensor:
    """(batch, 2) logits of [yes, no] at the answer position."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
    return logits[:, list(answer_ids)].float()


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt; longer than `max_length` keeps the end (the question and the latest history)."""
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    return [row[-max_length:] if max_length and len(row) > max_length else row for row in ids]


def _unwrap(model):
    return getattr(model, "module", model)


@torch.no_grad()
def ctr_scores(model, tokenizer, rows, batch_size: int, answer_ids: tuple[int, int], description: str = "CTR") -> list[float]:
    """p(Yes) for every row (rows: prompt, label, user_id, item_id)."""
    cf_index = getattr(_unwrap(model), "cf_index", None)
    collate = CTRCollator(tokenizer.pad_token_id, cf_index)
    ids = tokenize_prompts(tokenizer, list(rows["prompt"]))
    device = next(model.parameters()).device
    model.eval()
    scores: list[float] = []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for start in tqdm(range(0, len(order), batch_size), desc=description, leave=False):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": ids[i], "label": rows[i]["label"], "user_id": rows[i]["user_id"],
                          "item_id": rows[i]["item_id"]} for i in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        probabilities = torch.softmax(yes_no_logits(model, batch, answer_ids), dim=-1)[:, 0]
        scores.extend(zip(chunk, probabilities.tolist()))
    return [score for _, score in sorted(scores)]


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
    answers = answer_token_ids(tokenizer, config.yes_answer, config.no_answer)
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
