"""Reasoning accuracy: final-answer extraction, majority vote, and mean@n / maj@n / pass@n over sampled solutions.

Extraction (`extract_answer`) takes, in this order, the last `\\boxed{...}` (braces balanced), the number after the
last `#### `, or the last number in the text; `normalize_answer` strips spaces, `$`, `\\text{...}`, thousands
separators, a leading `+` and a trailing `.0`/`.`, so "1,000", "$1000$" and "1000.0" agree.

Majority vote (`majority_vote`) ignores completions without an answer and may weigh the votes; ties go to the answer
whose first vote came earliest, so the result depends only on the votes in their order (the rollout's leaf order is
fixed by the seed).

`eval.task: reasoning` samples `eval.samples` solutions per question of the split with the flat rollout sampler at
`eval.temperature` (seeded), and reports mean accuracy (mean@n: the share of correct samples), majority-vote
accuracy (maj@n), pass@n (any sample correct), answered (share of samples with an extractable answer) and mean
completion tokens, overall and per difficulty level.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from llmrec.logs import get_logger

logger = get_logger(__name__)

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


def evaluate_reasoning(model, tokenizer, recipe, split: str) -> tuple[dict, list[dict]]:
    """Sampled accuracy of the split's questions: overall and per level (metrics prefixed `<split>/`)."""
    from tqdm.auto import tqdm

    from llmrec.data.reasoning import reasoning_examples
    from llmrec.rollout import HFRollout, SamplingConfig, TreeConfig

    config, settings = recipe.data.reasoning, recipe.eval
    rows = reasoning_examples(config, split, recipe.run.seed)
    if settings.max_targets is not None and len(rows) > settings.max_targets:
        rows = rows.select(range(settings.max_targets))
    model.eval()
    rollout = HFRollout(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    sampling = SamplingConfig(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens)
    flat = TreeConfig(branching=False, pruning=False)
    predictions = []
    for start in tqdm(range(0, len(rows), settings.batch_size), desc=f"sampling {split} solutions", leave=False):
        batch = rows.select(range(start, min(start + settings.batch_size, len(rows))))
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in batch["prompt"]]
        with torch.no_grad():
            out = rollout.generate(prompts, settings.samples, flat, sampling, seed=recipe.run.seed * 7919 + start)
        for row, question in zip(batch, out):
            texts = tokenizer.batch_decode([c.token_ids for c in question.completions], skip_special_tokens=True)
            answers = [extract_answer(t) for t in texts]
            vote, votes = majority_vote(answers)
            predictions.append({
                "prompt": row["prompt"], "answer": row["answer"], "level": row["level"], "majority": vote,
                "votes": votes, "answers": answers, "completion": texts[0],
                "tokens": sum(len(c.token_ids) for c in question.completions) / len(question.completions),
            })
    metrics = {f"{split}/{k}": v for k, v in accuracy_metrics(predictions).items()}
    for level in sorted({p["level"] for p in predictions}):
        subset = [p for p in predictions if p["level"] == level]
        metrics.update({f"{split}/level{level}/{k}": v for k, v in accuracy_metrics(subset).items()
                        if k in ("mean_accuracy", "majority_accuracy", "questions")})
    return metrics, predictions


def accuracy_metrics(predictions: list[dict]) -> dict:
    n = len(predictions)
    if not n:
        return {"questions": 0}
    correct = [[a == p["answer"] for a in p["answers"]] for p in predictions]
    return {
        "questions": n,
        "samples": len(predictions[0]["answers"]),
        "mean_accuracy": sum(sum(c) / len(c) for c in correct) / n,
        "majority_accuracy": sum(p["majority"] == p["answer"] for p in predictions) / n,
        "pass_accuracy": sum(any(c) for c in correct) / n,
        "answered": sum(sum(a is not None for a in p["answers"]) / len(p["answers"]) for p in predictions) / n,
        "completion_tokens": sum(p["tokens"] for p in predictions) / n,
    }
