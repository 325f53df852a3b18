"""Preference summaries (`eval.task: preference_summary`, AlignXplore+): a model that writes a user's preference
summary that a judge can read.

Section `data.summaries` (`llmrec.data.preference_summaries.PreferenceSummaryTaskConfig`): users' (query, chosen,
rejected) behaviours, the judge, the teacher and the synthesis settings. Rows: `trainer: alignxplore_sft` trains on
synthesised, verified summaries (`synthesise`, below), `trainer: alignxplore` on prompt-only rows of the training
users; a plain `sft` stage has no rows here.

Synthesis (stage-1 data), per training user with behaviours split into parts 1-3 (`UserBehaviours.parts`):

1. targets: the first `max_targets` behaviours of part 2. (The authors keep part-2 records that a sequence model
   predicts with p > 0.9; llmrec has no sequence model for arbitrary behaviour data, so it takes them in time order.)
2. generate: for each target the teacher writes `candidates_per_target` outputs from part 1, shown the target as a
   guiding example but told not to predict it;
3. verify: the judge answers the target's A/B question from the summary alone; a candidate is kept when it picks the
   chosen option (P > 0.5);
4. merge: the teacher merges the user's verified summaries into one; re-verify: the user is kept when the merged
   summary answers at least `min_merged_accuracy` of the targets;
5. streaming: the teacher writes again from part 2 with the merged summary as the past summary, verified on part 3's
   first `max_targets` behaviours, which gives an update example (past summary + new behaviours -> new summary).

Every decision is recorded (`SynthesisRecord`: user, stage, candidate, kept or why dropped), so a run can show why
a user has no example. The teacher is pluggable (`data.summaries.teacher`): `TemplateTeacher` reads attribute words
off the behaviours (CPU, for the persona world); `ModelTeacher` prompts a local transformers model or an
OpenAI-compatible endpoint (GPU), with the guiding choice it must explain without naming.

Evaluation: for each user of the split (`train` too, to see whether the model fits the users it was trained on; and,
with `data.summaries.ood`, each out-of-domain user) the model writes a summary from part 1 of the user's behaviours
(greedy decoding); the judge then answers every part-3 question from the summary alone
(`llmrec.eval.preference_summary`). Metric keys, per population (`<split>/` and `ood/`): `users`,
`questions`, and the judge's accuracy given
* `no_summary`: an empty summary (its prior; 0.5 for the rule judge);
* `model`: the model's part-1 summary (an output without exactly one think block and a summary counts as no
  summary; `format_ok` is the share of well-formed outputs);
* `streaming`: the model's update of that summary with part 2's behaviours (past summary -> new summary);
* `teacher`: with the template teacher (`data.summaries.teacher.kind: template`), its own summary of part 1 without
  sampling (`TemplateTeacher.summary`): what the trained model would write if it reproduced its teacher exactly;
* `oracle`: synthetic personas only, the description of the hidden preferences (a ceiling for this judge);
* `transfer/<judge>/no_summary|model|teacher`: with `data.summaries.transfer_judge`, the same summaries read by that
  judge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from llmrec.data.behaviours import Behaviour, UserBehaviours, describe_persona
from llmrec.data.preference_summaries import (
    SYSTEM,
    PreferenceSummaryTaskConfig,
    SynthesisConfig,
    Teacher,
    TeacherConfig,
    TemplateTeacher,
    format_output,
    format_prompt,
    parse_output,
    summary_users,
)
from llmrec.errors import LLMRecError
from llmrec.eval.judges import CompletionsClient, JudgeQuestion, load_judge_model

from . import Task

POPULATIONS = ("test", "valid", "train", "ood")
KINDS = ("no_summary", "model", "streaming", "teacher", "oracle")


class PreferenceSummaryTask(Task):
    name = "preference_summary"
    description = "judge accuracy given the model's user summaries, against no summary and the oracle"
    section = "summaries"
    section_class = PreferenceSummaryTaskConfig
    section_help = ("Preference summaries (AlignXplore+): users' (query, chosen, rejected) behaviours, the judge and "
                    "the synthesis of SFT data; `trainer: alignxplore_sft` then `alignxplore` train on them and "
                    "`eval.task: preference_summary` measures judge accuracy.")
    section_holds = "behaviours and judge"
    splits = ("test", "valid", "train")  # train: does the model fit the users it was trained on at all?
    row_kinds = ()
    headline = "model"
    card_tag = "personalization"
    card_intro = """A preference-summary model trained with llmrec (AlignXplore+): it reads a user's (query, chosen,
rejected) behaviours and an optional past summary, thinks, and writes a natural-language summary of the user's
preferences that any judge model can read."""

    def text_rows(self, data) -> list[str]:
        from llmrec.data.preference_summaries import summaries_tokenizer_texts

        return summaries_tokenizer_texts(self.config, self.recipe.run.seed, data)

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        from llmrec.eval.judges import build_judge
        from llmrec.eval.preference_summary import judge_accuracy, write_summaries

        config, settings, seed = self.config, self.recipe.eval, self.recipe.run.seed
        judge = build_judge(config.judge)
        transfer = build_judge(config.transfer_judge) if config.transfer_judge else None
        model.eval()
        populations = {split: summary_users(config, seed, split, data)}
        if config.ood is not None and split != "train":  # the training split is a check of fit, in domain only
            populations["ood"] = summary_users(config, seed, split, data, ood=True)
        metrics, predictions = {}, []
        for name, users in populations.items():
            if settings.max_targets is not None:
                users = users[: settings.max_targets]
            fractions = (config.ood or config.behaviours).fractions if name == "ood" else config.behaviours.fractions
            parts = [u.parts(fractions) for u in users]
            first = write_summaries(model, tokenizer, [format_prompt(None, p[0]) for p in parts],
                                    config.max_new_tokens, settings.batch_size)
            summaries = [parsed[1] if (parsed := parse_output(text)) else "" for text in first]
            update_prompts = [format_prompt(s or None, p[1]) for s, p in zip(summaries, parts)]
            updates = write_summaries(model, tokenizer, update_prompts, config.max_new_tokens, settings.batch_size)
            updated = [parsed[1] if (parsed := parse_output(text)) else "" for text in updates]
            prefix = f"{name}/"
            metrics[prefix + "users"] = len(users)
            metrics[prefix + "questions"] = sum(len(p[2]) for p in parts)
            metrics[prefix + "format_ok"] = sum(bool(s) for s in summaries) / max(1, len(users))
            metrics[prefix + "no_summary"] = judge_accuracy(judge, [""] * len(users), parts)
            metrics[prefix + "model"] = judge_accuracy(judge, summaries, parts)
            metrics[prefix + "streaming"] = judge_accuracy(judge, updated, parts)
            if all(u.preferences for u in users) and users:
                oracle = [describe_persona(u.preferences) for u in users]
                metrics[prefix + "oracle"] = judge_accuracy(judge, oracle, parts)
            teacher = ([TemplateTeacher().summary(None, p[0]) for p in parts] if config.teacher.kind == "template"
                       else None)
            if teacher is not None:
                metrics[prefix + "teacher"] = judge_accuracy(judge, teacher, parts)
            if transfer is not None:
                read_by = f"{prefix}transfer/{transfer.name}/"
                metrics[read_by + "no_summary"] = judge_accuracy(transfer, [""] * len(users), parts)
                metrics[read_by + "model"] = judge_accuracy(transfer, summaries, parts)
                if teacher is not None:
                    metrics[read_by + "teacher"] = judge_accuracy(transfer, teacher, parts)
            predictions += [{"population": name, "user_id": u.user_id, "output": o, "summary": s, "update": up}
                            for u, o, s, up in zip(users, first, summaries, updated)]
        return metrics, predictions

    # --- reports -------------------------------------------------------------------------------------------------

    def summary(self, metrics: dict, splits: list[str]) -> str:
        columns = (*KINDS, "format_ok")
        out = []
        for population in [*splits, "ood"]:
            if f"{population}/model" not in metrics:
                continue
            out.append(f"\n{population}: judge accuracy over {metrics[f'{population}/questions']} questions of "
                       f"{metrics[f'{population}/users']} users:")
            out.append("".join(f"{c:>12}" for c in columns))
            out.append("".join(f"{metrics[f'{population}/{c}']:>12.4f}" if f"{population}/{c}" in metrics
                               else f"{'-':>12}" for c in columns))
            transfers = sorted(k for k in metrics if k.startswith(f"{population}/transfer/"))
            out += [f"{key}: {metrics[key]:.4f}" for key in transfers]
        return "\n".join(out)

    def card_results(self, metrics: dict) -> str:
        sections = []
        for population in POPULATIONS:
            if f"{population}/model" not in metrics:
                continue
            columns = [c for c in KINDS if f"{population}/{c}" in metrics]
            rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                    "| " + " | ".join(f"{metrics[f'{population}/{c}']:.4f}" for c in columns) + " |"]
            sections.append(f"## Results: judge accuracy, {population} users ({metrics[f'{population}/users']} users, "
                            f"{metrics[f'{population}/questions']} questions)\n\n" + "\n".join(rows) + "\n")
        return "\n".join(sections)

    def card_data(self, data) -> str:
        return f"- **Data:** {self.config.behaviours.source} behaviours; judge: {self.config.judge.kind}."

    def card_notes(self, run_path) -> str:
        return ("Judge accuracy is the share of held-out (query, chosen, rejected) questions the judge answers "
                'correctly from\nthe summary alone; "streaming" updates the summary with newer behaviours first.\n\n'
                + super().card_notes(run_path))

    def plot(self, axis, metrics: dict, split: str) -> None:
        from llmrec.eval.plots import grouped_bars

        kinds = [k for k in KINDS if f"{split}/{k}" in metrics]
        series = {population: [metrics.get(f"{population}/{k}", 0.0) for k in kinds]
                  for population in (split, "ood") if f"{population}/model" in metrics}
        grouped_bars(axis, kinds, series)
        axis.set(title="Judge accuracy given the summary", ylabel="accuracy", ylim=(0, 1))

    def stats(self, data) -> list[str]:
        config, seed = self.config, self.recipe.run.seed
        lines = []
        for split in ("train", "valid", "test"):
            users = summary_users(config, seed, split, data)
            counts = [len(u.behaviours) for u in users]
            lines.append(f"{split + ' users':>20}: {len(users)}"
                         + (f" ({min(counts)}-{max(counts)} behaviours each)" if counts else ""))
        if config.ood is not None:
            lines.append(f"{'out-of-domain users':>20}: {len(summary_users(config, seed, 'test', data, ood=True))}")
        user = summary_users(config, seed, "train", data)[0]
        lines.append("\nexample prompt (part 1 of a training user):\n"
                     + format_prompt(None, user.parts(config.behaviours.fractions)[0]))
        return lines


# --- synthesis of the SFT rows (trainer: alignxplore_sft) ---------------------------------------------------------

TEACHER_TASK = ("Write the user's preference summary from the interactions above. For guidance, the user later made "
                "this choice, which the summary should explain without naming it: {query} Chosen: {chosen}. Rejected: "
                "{rejected}.")
MERGE_TASK = ("Merge these summaries of one user into a single preference summary that keeps what they agree on. "
              "Think first inside <think></think>, then write the summary.")


class ModelTeacher(Teacher):
    """A language model as teacher: it sees the model's own input (past summary and behaviours) plus the guiding
    choice, and writes `<think>...</think>` and a summary; merging asks it to combine the verified summaries.
    `generate(prompts, count)` returns `count` sampled texts per prompt (`from_transformers`, `from_endpoint`)."""

    def __init__(self, generate: Callable[[list[str], int], list[list[str]]]):
        self.generate = generate

    def write(self, past_summary, behaviours, guide, count, rng) -> list[str]:
        prompt = format_prompt(past_summary, behaviours).removesuffix("Answer:")
        prompt += TEACHER_TASK.format(query=guide.query, chosen=guide.chosen, rejected=guide.rejected) + "\nAnswer:"
        return [text if text.startswith(" ") else " " + text for text in self.generate([prompt], count)[0]]

    def merge(self, summaries: list[str]) -> str:
        prompt = "\n".join([SYSTEM, *(f"Summary {i}: {s}" for i, s in enumerate(summaries, 1)), MERGE_TASK, "Answer:"])
        text = self.generate([prompt], 1)[0][0]
        parsed = parse_output(text if text.startswith(" ") else " " + text)
        return parsed[1] if parsed else text.strip()

    @classmethod
    def from_transformers(cls, model, tokenizer, config: TeacherConfig) -> ModelTeacher:
        import torch

        def generate(prompts: list[str], count: int) -> list[list[str]]:
            outputs = []
            for prompt in prompts:
                batch = tokenizer(prompt, return_tensors="pt").to(model.device)
                with torch.no_grad():
                    ids = model.generate(**batch, do_sample=True, temperature=config.temperature,
                                         num_return_sequences=count, max_new_tokens=config.max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id)
                outputs.append(tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
            return outputs

        return cls(generate)

    @classmethod
    def from_endpoint(cls, config: TeacherConfig) -> ModelTeacher:
        client = CompletionsClient(config.base_url, config.timeout, config.max_retries, what="the teacher endpoint")

        def generate(prompts: list[str], count: int) -> list[list[str]]:
            request = {"model": config.model, "prompt": prompts, "n": count, "temperature": config.temperature,
                       "max_tokens": config.max_new_tokens}
            reply = json.loads(client.complete(request))
            texts = [choice["text"] for choice in sorted(reply["choices"], key=lambda choice: choice["index"])]
            return [texts[i * count:(i + 1) * count] for i in range(len(prompts))]

        return cls(generate)


def build_teacher(config: TeacherConfig) -> Teacher:
    if config.kind == "template":
        return TemplateTeacher(config.dropout)
    if not config.model:
        raise LLMRecError(f"teacher kind {config.kind} needs model (a folder or Hub id, or the served name).",
                          "data.summaries.teacher.model")
    if config.kind == "endpoint":
        if not config.base_url:
            raise LLMRecError("teacher kind endpoint needs base_url.", "data.summaries.teacher.base_url")
        return ModelTeacher.from_endpoint(config)
    return ModelTeacher.from_transformers(*load_judge_model(config.model), config)


@dataclass
class SynthesisRecord:
    user_id: str
    stage: str  # "part1", "merged", "streaming"
    output: str
    kept: bool
    reason: str


def synthesise(users: list[UserBehaviours], teacher: Teacher, judge, config: SynthesisConfig, seed: int,
               fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> tuple[Dataset, list[SynthesisRecord]]:
    """SFT rows (prompt, completion, user_id, kind: "first" or "update") and the record of every decision."""
    rng = np.random.default_rng([seed, 5150])
    rows, records = [], []
    for user in users:
        part1, part2, part3 = user.parts(fractions)
        targets = part2[: config.max_targets]
        verified: list[str] = []
        for target in targets:
            for output in teacher.write(None, part1, target, config.candidates_per_target, rng):
                parsed = parse_output(output)
                if parsed is None:
                    records.append(SynthesisRecord(user.user_id, "part1", output, False, "malformed output"))
                    continue
                p = judge.prob_correct([JudgeQuestion(parsed[1], target.query, target.chosen, target.rejected)])[0]
                kept = p > 0.5
                records.append(SynthesisRecord(user.user_id, "part1", output, kept,
                                               f"judge picked the chosen option (p={p:.2f})" if kept
                                               else f"judge picked the rejected option (p={p:.2f})"))
                if kept:
                    verified.append(output)
        if not verified:
            records.append(SynthesisRecord(user.user_id, "merged", "", False, "no candidate was verified"))
            continue
        merged = teacher.merge([parse_output(o)[1] for o in verified])
        accuracy = _accuracy(judge, merged, targets)
        if accuracy < config.min_merged_accuracy:
            records.append(SynthesisRecord(user.user_id, "merged", merged, False,
                                           f"merged summary answered {accuracy:.0%} of {len(targets)} targets"))
            continue
        records.append(SynthesisRecord(user.user_id, "merged", merged, True,
                                       f"answered {accuracy:.0%} of the targets"))
        reasoning = parse_output(verified[0])[0]
        rows.append({"prompt": format_prompt(None, part1), "completion": format_output(reasoning, merged),
                     "user_id": user.user_id, "kind": "first"})
        if config.streaming:
            update = teacher.write(merged, part2, part3[0], 1, rng)[0]
            parsed = parse_output(update)
            update_targets = part3[: config.max_targets]
            accuracy = _accuracy(judge, parsed[1], update_targets) if parsed else 0.0
            kept = parsed is not None and accuracy >= config.min_merged_accuracy
            records.append(SynthesisRecord(user.user_id, "streaming", update, kept,
                                           f"update answered {accuracy:.0%} of {len(update_targets)} part-3 targets"))
            if kept:
                rows.append({"prompt": format_prompt(merged, part2), "completion": update, "user_id": user.user_id,
                             "kind": "update"})
    columns = {key: [row[key] for row in rows] for key in ("prompt", "completion", "user_id", "kind")}
    return Dataset.from_dict(columns), records


def _accuracy(judge, summary: str, targets: list[Behaviour]) -> float:
    probabilities = judge.prob_correct([JudgeQuestion(summary, t.query, t.chosen, t.rejected) for t in targets])
    return sum(p > 0.5 for p in probabilities) / len(targets)
