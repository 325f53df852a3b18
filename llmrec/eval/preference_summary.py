"""Judge accuracy of preference summaries (`eval.task: preference_summary`, AlignXplore+).

For each user of the split (and, with `data.summaries.ood`, each out-of-domain user) the model writes a summary from
part 1 of the user's behaviours (greedy decoding); the judge then answers every part-3 question (query, chosen,
rejected) from the summary alone, and accuracy is the share answered correctly (P(chosen) > 0.5, averaged over both
A/B orders; a tie counts half). Reported per population (`<split>/` and `ood/`):

* `no_summary`: the judge with an empty summary (its prior; 0.5 for the rule judge);
* `model`: the model's part-1 summary (an output without exactly one think block and a summary counts as no
  summary; `format_ok` is the share of well-formed outputs);
* `streaming`: the model's update of that summary with part 2's behaviours (past summary -> new summary);
* `oracle`: synthetic personas only, the description of the hidden preferences (a ceiling for this judge);
* `transfer/<kind>`: with `data.summaries.transfer_judge`, the same summaries read by that second judge.
"""

from __future__ import annotations

import torch

from llmrec.data.behaviours import describe_persona
from llmrec.data.preference_summaries import format_prompt, parse_output, summary_users
from llmrec.eval.judges import JudgeQuestion, build_judge


def write_summaries(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy outputs for `prompts` (left-padded batches)."""
    outputs = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.no_grad():
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def _accuracy(judge, summaries: list[str], parts) -> float:
    """Judge accuracy on every user's part-3 questions, each read with that user's summary."""
    questions = [JudgeQuestion(summary, b.query, b.chosen, b.rejected) for summary, p in zip(summaries, parts) for b in p[2]]
    return judge.accuracy(questions)


def evaluate_summaries(model, tokenizer, data, recipe, split: str) -> tuple[dict, list[dict]]:
    config, settings = recipe.data.summaries, recipe.eval
    judge = build_judge(config.judge)
    transfer = build_judge(config.transfer_judge) if config.transfer_judge else None
    model.eval()
    populations = {split: summary_users(config, recipe.run.seed, split, data)}
    if config.ood is not None:
        populations["ood"] = summary_users(config, recipe.run.seed, split, data, ood=True)
    metrics, predictions = {}, []
    for name, users in populations.items():
        if settings.max_targets is not None:
            users = users[: settings.max_targets]
        fractions = (config.ood or config.behaviours).fractions if name == "ood" else config.behaviours.fractions
        parts = [u.parts(fractions) for u in users]
        first = write_summaries(model, tokenizer, [format_prompt(None, p[0]) for p in parts], config.max_new_tokens,
                                settings.batch_size)
        summaries = [parsed[1] if (parsed := parse_output(text)) else "" for text in first]
        updates = write_summaries(model, tokenizer, [format_prompt(s or None, p[1]) for s, p in zip(summaries, parts)],
                                  config.max_new_tokens, settings.batch_size)
        updated = [parsed[1] if (parsed := parse_output(text)) else "" for text in updates]
        prefix = f"{name}/"
        metrics[prefix + "users"] = len(users)
        metrics[prefix + "questions"] = sum(len(p[2]) for p in parts)
        metrics[prefix + "format_ok"] = sum(bool(s) for s in summaries) / max(1, len(users))
        metrics[prefix + "no_summary"] = _accuracy(judge, [""] * len(users), parts)
        metrics[prefix + "model"] = _accuracy(judge, summaries, parts)
        metrics[prefix + "streaming"] = _accuracy(judge, updated, parts)
        if all(u.preferences for u in users) and users:
            metrics[prefix + "oracle"] = _accuracy(judge, [describe_persona(u.preferences) for u in users], parts)
        if transfer is not None:
            metrics[f"{prefix}transfer/{transfer.name}/no_summary"] = _accuracy(transfer, [""] * len(users), parts)
            metrics[f"{prefix}transfer/{transfer.name}/model"] = _accuracy(transfer, summaries, parts)
        predictions += [{"population": name, "user_id": u.user_id, "output": o, "summary": s, "update": up}
                        for u, o, s, up in zip(users, first, summaries, updated)]
    return metrics, predictions
