"""Reasoning measures: sampled solutions, their extracted answers, and mean@n / maj@n / pass@n.

`sample_answers` samples `samples` solutions per prompt with the flat rollout sampler (`llmrec.rollout`, seeded per
batch) and extracts each one's final answer (`llmrec.answers.extract_answer`); `accuracy_metrics` reports mean
accuracy (mean@n: the share of correct samples), majority-vote accuracy (maj@n), pass@n (any sample correct),
answered (share of samples with an extractable answer) and mean completion tokens.
"""

from __future__ import annotations

import torch

from llmrec.answers import extract_answer, majority_vote


def sample_answers(model, tokenizer, prompts: list[str], samples: int, temperature: float, max_new_tokens: int,
                   batch_size: int, seed: int, description: str = "sampling solutions") -> list[dict]:
    """For each prompt: `answers` (one per sample, None without one), `majority` and its `votes`, the first sample's
    text (`completion`) and the mean sample length in tokens (`tokens`)."""
    from tqdm.auto import tqdm

    from llmrec.rollout import HFRollout, SamplingConfig, TreeConfig

    model.eval()
    rollout = HFRollout(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    flat = TreeConfig(branching=False, pruning=False)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, leave=False):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        with torch.no_grad():
            questions = rollout.generate(ids, samples, flat, sampling, seed=seed * 7919 + start)
        for question in questions:
            texts = tokenizer.batch_decode([c.token_ids for c in question.completions], skip_special_tokens=True)
            answers = [extract_answer(t) for t in texts]
            vote, votes = majority_vote(answers)
            out.append({"majority": vote, "votes": votes, "answers": answers, "completion": texts[0],
                        "tokens": sum(len(c.token_ids) for c in question.completions) / len(question.completions)})
    return out


def accuracy_metrics(predictions: list[dict]) -> dict:
    """Measures over predictions holding `answer` (the true one), `answers`, `majority` and `tokens`."""
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
