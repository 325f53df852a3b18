"""Preference-summary measures (AlignXplore+): greedy summaries and the judge's accuracy given them.

`write_summaries` generates greedy outputs from left-padded batches; `judge_accuracy` is the share of every user's
part-3 questions (query, chosen, rejected) that the judge answers correctly from that user's summary alone
(P(chosen) > 0.5, averaged over both A/B orders; a tie counts half). `llmrec.tasks.preference_summary` reports them.
"""

from __future__ import annotations

import torch

from .judges import JudgeQuestion


def write_summaries(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy outputs for `prompts` (left-padded batches)."""
    outputs = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.no_grad():
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def judge_accuracy(judge, summaries: list[str], parts) -> float:
    """Judge accuracy on every user's part-3 questions, each read with that user's summary."""
    questions = [JudgeQuestion(summary, b.query, b.chosen, b.rejected)
                 for summary, p in zip(summaries, parts) for b in p[2]]
    return judge.accuracy(questions)
