"""Instruction-following metrics: exact match and ROUGE-L of greedy responses, and the reference completion's NLL.

Answers are compared after `normalise_answer`: surrounding whitespace dropped, only the first line kept (a model that
goes on after its answer is judged on the answer), lowercased, punctuation (every Unicode "P" character) deleted as in
SQuAD's normalisation, and whitespace collapsed; articles are kept (the synthetic world's titles contain "the").
ROUGE-L is the F1 of the longest common subsequence of the normalised words, written here because no ROUGE package
is among llmrec's dependencies; two empty answers count as a match for both metrics.

`evaluate_instruction_rows` generates greedily from left-padded batches and decodes what follows the prompt up to
the first EOS. Its `loss` is the mean NLL per completion token (tokens pooled over all rows, as TRL's SFT loss pools a
batch's tokens) of " <response>" followed by EOS, tokenised as TRL's prompt-completion SFT does: the prompt alone
and prompt + completion + EOS text, with the completion starting where the two diverge.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict

import torch
import torch.nn.functional as F
from trl.data_utils import common_prefix_length


def normalise_answer(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0].lower()
    kept = "".join(c for c in first_line if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    predicted, wanted = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    previous = [0] * (len(wanted) + 1)
    for word in predicted:
        current = [0]
        for j, other in enumerate(wanted):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def completion_token_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """(prompt + completion + EOS ids, the prompt's length in them), as TRL's SFT tokenises a prompt-completion row."""
    eos = tokenizer.eos_token or ""
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    full_ids = tokenizer(text=prompt + completion + ("" if completion.endswith(eos) else eos))["input_ids"]
    return full_ids, common_prefix_length(prompt_ids, full_ids)


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, pad_id: int, device) -> list[str]:
    ids, mask = _pad([tokenizer(text=p)["input_ids"] for p in prompts], pad_id, left=True)
    output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    texts = []
    for tokens in output[:, ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def _completion_nll(model, tokenizer, rows: list[dict], pad_id: int, device) -> tuple[float, int]:
    """(summed NLL, token count) of the rows' completions; right padding keeps every real token's position."""
    encoded = [completion_token_ids(tokenizer, row["prompt"], row["completion"]) for row in rows]
    ids, mask = _pad([full for full, _ in encoded], pad_id, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    for row, (_, prompt_length) in enumerate(encoded):
        labels[row, :prompt_length] = -100
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    targets = labels[:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return float(nll), int((targets != -100).sum())


def evaluate_instruction_rows(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 32) -> dict:
    """`exact_match` and `rouge_l` (means over rows), `loss` (mean completion-token NLL), `rows` and `by_category`
    (exact match per category) for rows with `prompt`, `completion` and optionally `category`. Without rows every
    metric is 0 (weigh by `rows` when pooling clients). The model's training mode is restored afterwards."""
    if not rows:
        return {"exact_match": 0.0, "rouge_l": 0.0, "loss": 0.0, "rows": 0, "by_category": {}}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    matches, rouges, nll, tokens = [], [], 0.0, 0
    by_category: dict[str, list[float]] = defaultdict(list)
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                predictions = _generate(model, tokenizer, [r["prompt"] for r in batch], max_new_tokens, pad_id, device)
                for row, prediction in zip(batch, predictions):
                    matches.append(exact_match(prediction, row["completion"]))
                    rouges.append(rouge_l(prediction, row["completion"]))
                    by_category[row.get("category", "")].append(matches[-1])
                batch_nll, batch_tokens = _completion_nll(model, tokenizer, batch, pad_id, device)
                nll, tokens = nll + batch_nll, tokens + batch_tokens
    finally:
        model.train(was_training)
    return {
        "exact_match": sum(matches) / len(matches),
        "rouge_l": sum(rouges) / len(rouges),
        "loss": nll / max(tokens, 1),
        "rows": len(rows),
        "by_category": {category: sum(v) / len(v) for category, v in sorted(by_category.items())},
    }
