"""Answers: reading a model's answer, by extraction from generated text or by scoring answer words.

Data builders, evaluators, tasks and trainers all use these, so they live here, importing nothing of llmrec but
its errors.

**Extraction** (reasoning: worked solutions ending in a final answer). `extract_answer` takes, in this order, the
last `\\boxed{...}` (braces balanced), the number after the last `#### `, or the last number in the text;
`normalize_answer` strips spaces, `$`, `\\text{...}`, thousands separators, a leading `+` and a trailing `.0`/`.`, so
"1,000", "$1000$" and "1000.0" agree. `majority_vote` ignores completions without an answer and may weigh the
votes; ties go to the answer whose first vote came earliest, so the result depends only on the votes in their order.

**Scoring by answer words**: the logits of a few answer tokens at the answer position (the token after the prompt).
The CTR task (Yes/No) and text classification (one label word per class) both read a prompt's answer off the
logits of each answer's first token, and so does the transformers preference judge (" A" / " B"). Prompts are
left-padded with explicit position ids, so the answer position is the last one for every row, a padded row scores
like the same row alone, and the model computes the logits of that one position only (`logits_to_keep=1`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from llmrec.errors import LLMRecError

# --- extraction from generated text ---------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_answer(text: str) -> str:
    text = text.strip()
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = text.replace("$", "").replace(" ", "").replace("\\!", "").rstrip(".")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    text = text.removeprefix("+")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    if text == "-0":
        text = "0"
    return text


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised; None when there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return normalize_answer(boxed) or None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return normalize_answer(match.group())
    numbers = _NUMBER.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def majority_vote(answers: list[str | None], weights: list[float] | None = None) -> tuple[str | None, float]:
    """(the answer with the most votes, its votes); each answer votes `weights[i]` (default 1); None answers do not
    vote; ties go to the earliest first vote."""
    counts: dict[str, float] = defaultdict(float)
    for answer, weight in zip(answers, weights or [1] * len(answers)):
        if answer is not None:
            counts[answer] += weight
    if not counts:
        return None, 0
    first = {}
    for index, answer in enumerate(answers):
        if answer is not None:
            first.setdefault(answer, index)
    winner = max(counts, key=lambda a: (counts[a], -first[a]))
    return winner, counts[winner]


# --- scoring by answer words ------------------------------------------------------------------------------------


def answer_token_ids(tokenizer, answers: Sequence[str], key: str) -> tuple[int, ...]:
    """The first token of each answer as it follows the prompt; they must all differ (`key` names the recipe key
    the answers come from)."""
    firsts = [tokenizer(answer, add_special_tokens=False)["input_ids"][:1] for answer in answers]
    if any(not first for first in firsts) or len({first[0] for first in firsts}) < len(firsts):
        shown = ", ".join(f"{answer!r} -> {first}" for answer, first in zip(answers, firsts))
        raise LLMRecError(
            f"the answers must start with different tokens for this tokenizer, since each is scored by the logit of "
            f"its first token, but they start with the same one ({shown}). Choose words that differ in their first "
            "token (a leading space usually belongs to it).",
            key,
        )
    return tuple(first[0] for first in firsts)


class AnswerCollator:
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


def answer_logits(model, batch: dict, answer_ids: Sequence[int]) -> torch.Tensor:
    """(batch, len(answer_ids)) float logits of the answers' tokens at the answer position."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
    return logits[:, list(answer_ids)].float()


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt; longer than `max_length` keeps the end (the question and the latest history)."""
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    return [row[-max_length:] if max_length and len(row) > max_length else row for row in ids]


def _unwrap(model):
    return getattr(model, "module", model)


def ignores_position_ids(model) -> bool:
    """Stock PEFT prompt learning (prompt tuning, P-tuning) drops the position ids it is given (with a warning), so
    the base model counts left padding as positions and a padded row would not score like the same row alone."""
    config = getattr(_unwrap(model), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def length_batches(lengths: Sequence[int], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Row indices in batches of at most `batch_size`, rows of similar lengths together (little padding); with
    `same_length`, a batch holds rows of one length only (no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if (batches and len(batches[-1]) < batch_size
                and not (same_length and lengths[batches[-1][0]] != lengths[index])):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def prompt_answer_logits(model, tokenizer, rows, batch_size: int, answer_ids: Sequence[int],
                         description: str = "scoring") -> torch.Tensor:
    """(rows, len(answer_ids)) answer logits of every row (rows: `prompt`, `label`, and `user_id`, `item_id` for a
    CoRA model), in row order. Prompts of similar lengths share a batch, so there is little padding; for a model
    that ignores position ids (`ignores_position_ids`), prompts of equal length only, so there is none."""
    cf_index = getattr(_unwrap(model), "cf_index", None)
    collate = AnswerCollator(tokenizer.pad_token_id, cf_index)
    ids = tokenize_prompts(tokenizer, list(rows["prompt"]))
    labels = list(rows["label"])
    extra = {key: list(rows[key]) for key in ("user_id", "item_id")} if cf_index is not None else {}
    unpadded = ignores_position_ids(model)
    device = next(model.parameters()).device
    model.eval()
    out = torch.empty(len(ids), len(answer_ids))
    for chunk in tqdm(length_batches([len(row) for row in ids], batch_size, unpadded), desc=description, leave=False):
        batch = collate([{"input_ids": ids[i], "label": labels[i], **{k: v[i] for k, v in extra.items()}}
                         for i in chunk])
        if unpadded:
            del batch["position_ids"]  # all zero padding: the model's own positions are the same
        out[chunk] = answer_logits(model, {k: v.to(device) for k, v in batch.items()}, answer_ids).cpu()
    return out
