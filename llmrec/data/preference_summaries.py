"""Preference summaries (AlignXplore+): the model's input and output format, and the synthesis of verified SFT data.

Input: a system line, the past preference summary ("Not provided." when there is none), the user's behaviours as
numbered (query, chosen, rejected) triples, and the instruction to merge the past summary with the new evidence,
favouring the chosen items. Output: exactly one `<think>reasoning</think>` block followed by the summary
(`parse_output`; anything else, including an empty summary, is malformed and gets reward 0 in RL).

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
"""

from __future__ import annotations

import abc
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from datasets import Dataset
from pydantic import Field

from llmrec.errors import LLMRecError
from llmrec.eval.judges import JudgeConfig
from llmrec.schema import Section

from .behaviours import (
    Behaviour,
    BehaviourDataConfig,
    UserBehaviours,
    describe_persona,
    likes_and_dislikes,
    load_behaviours,
    user_split,
)

SYSTEM = "You are a user preference analyst."
NO_SUMMARY = "Not provided."
INSTRUCTION = ("Merge the past summary with the new evidence into one preference summary, favouring what the user "
               "chose. Think first inside <think></think>, then write the summary.")
_OUTPUT = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<summary>.*)", re.DOTALL)


def format_prompt(past_summary: str | None, behaviours: list[Behaviour]) -> str:
    lines = [SYSTEM, f"Past preference summary: {past_summary or NO_SUMMARY}", "Interactions:"]
    lines += [f"{i}. {b.query} Chosen: {b.chosen}. Rejected: {b.rejected}." for i, b in enumerate(behaviours, 1)]
    lines += [INSTRUCTION, "Answer:"]
    return "\n".join(lines)


def format_output(reasoning: str, summary: str) -> str:
    return f" <think>{reasoning}</think> {summary}"


def parse_output(text: str) -> tuple[str, str] | None:
    """(reasoning, summary) when `text` is exactly one think block followed by a non-empty summary, else None."""
    match = _OUTPUT.fullmatch(text)
    if match is None:
        return None
    summary = match["summary"].strip()
    if not summary or "<think>" in summary or "</think>" in summary or "<think>" in match["think"]:
        return None
    return match["think"].strip(), summary


class SynthesisConfig(Section):
    """How stage-1 (SFT) examples are synthesised and verified."""

    max_targets: int = Field(5, ge=1, description="Part-2 behaviours used as verification targets per user.")
    candidates_per_target: int = Field(2, ge=1, description="Teacher outputs per target.")
    min_merged_accuracy: float = Field(0.8, ge=0, le=1, description="Keep a user when the merged summary answers this share.")
    streaming: bool = Field(True, description="Also make update examples (past summary + part 2 -> new summary).")


class TeacherConfig(Section):
    """`data.summaries.teacher`: the writer of candidate summaries during synthesis."""

    kind: Literal["template", "transformers", "endpoint"] = Field(
        "template", description="'template': attribute counting (persona world, CPU); 'transformers': a local model; "
        "'endpoint': an OpenAI-compatible completions server (e.g. `vllm serve`)."
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="template: chance to drop each stated word from a candidate.")
    model: str | None = Field(None, description="transformers: a local folder or Hub id; endpoint: the served name.")
    base_url: str | None = Field(None, description="endpoint: the server's address, e.g. http://localhost:8001.")
    temperature: float = Field(0.8, gt=0, description="transformers, endpoint: sampling temperature.")
    max_new_tokens: int = Field(512, ge=16, description="transformers, endpoint: longest output.")
    timeout: float = Field(120.0, gt=0, description="endpoint: seconds per request.")
    max_retries: int = Field(4, ge=0, description="endpoint: retries after timeouts, 429 and 5xx.")


class PreferenceSummaryTaskConfig(Section):
    """`data.summaries`: users' behaviours, the judge, and how SFT data are synthesised (AlignXplore+)."""

    behaviours: BehaviourDataConfig = Field(default_factory=BehaviourDataConfig, description="In-domain behaviours.")
    ood: BehaviourDataConfig | None = Field(
        None, description="Out-of-domain behaviours evaluated too (e.g. {source: recdata}: data.source as triples)."
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Verifies, rewards and evaluates summaries.")
    transfer_judge: JudgeConfig | None = Field(None, description="A second, different judge for cross-judge transfer.")
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(), description="Who writes candidate summaries.")
    user_fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train / valid / test users.")
    max_new_tokens: int = Field(96, ge=8, description="Longest summary output generated in RL and evaluation.")


def summary_users(config: PreferenceSummaryTaskConfig, seed: int, split: str, data=None, ood: bool = False) -> list[UserBehaviours]:
    """The users of a split ("train", "valid", "test"); with `ood`, all users of the out-of-domain source."""
    if ood:
        return load_behaviours(config.ood, seed, data)
    return user_split(load_behaviours(config.behaviours, seed, data), seed, config.user_fractions)[split]


def summaries_tokenizer_texts(config: PreferenceSummaryTaskConfig, seed: int, data=None) -> list[str]:
    """What a tiny tokenizer learns from: prompts of every user, the format's words, and ideal summaries."""
    users = load_behaviours(config.behaviours, seed, data)
    if config.ood is not None:
        users += load_behaviours(config.ood, seed, data)
    texts = [format_prompt(None, u.behaviours) for u in users]
    texts += [format_output("chosen net", describe_persona(u.preferences)) for u in users if u.preferences]
    texts += [format_prompt("Likes a. Dislikes b.", []) + format_output("x", "Likes a, b. Dislikes c.")] * 50
    return texts


class Teacher(abc.ABC):
    """Writes candidate outputs (`format_output` text) and merges summaries."""

    @abc.abstractmethod
    def write(self, past_summary: str | None, behaviours: list[Behaviour], guide: Behaviour, count: int,
              rng: np.random.Generator) -> list[str]: ...

    @abc.abstractmethod
    def merge(self, summaries: list[str]) -> str: ...


def attribute_words(option: str) -> list[str]:
    """The words in an option's parentheses ("Night Harbor (horror, dark)" -> ["horror", "dark"])."""
    inside = option[option.rfind("(") + 1: option.rfind(")")] if "(" in option and option.endswith(")") else ""
    return [w.strip().lower() for w in inside.split(",") if w.strip()]


def _statements(summary: str) -> tuple[list[str], list[str]]:
    """The words of a template summary's "Likes ...." and "Dislikes ...." sentences."""

    def words(cue: str) -> list[str]:
        match = re.search(rf"\b{cue} ([^.]*)\.", summary)
        return [w.strip() for w in match.group(1).split(",") if w.strip()] if match else []

    return words("Likes"), words("Dislikes")


class TemplateTeacher(Teacher):
    """Counts how often each attribute word is on the chosen minus the rejected side (the past summary's words count
    as `past_weight` observations), and states the words whose count reaches a threshold. Candidates differ by a
    threshold of 1 or 2 and by dropping each stated word with probability `dropout`, so verification has wrong and
    incomplete summaries to filter out."""

    def __init__(self, dropout: float = 0.3, past_weight: float = 2.0):
        self.dropout, self.past_weight = dropout, past_weight

    def evidence(self, past_summary: str | None, behaviours: list[Behaviour]) -> Counter:
        counts: Counter = Counter()
        if past_summary:
            liked, disliked = _statements(past_summary)
            counts.update({w: self.past_weight for w in liked})
            counts.update({w: -self.past_weight for w in disliked})
        for b in behaviours:
            counts.update(attribute_words(b.chosen))
            counts.subtract(attribute_words(b.rejected))
        return counts

    def write(self, past_summary, behaviours, guide, count, rng) -> list[str]:
        counts = self.evidence(past_summary, behaviours)
        ranked = sorted(counts, key=lambda w: (-abs(counts[w]), w))
        outputs = []
        for _ in range(count):
            threshold = int(rng.integers(1, 3))
            keep = [w for w in ranked if abs(counts[w]) >= threshold and rng.random() >= self.dropout]
            liked = [w for w in keep if counts[w] > 0][:4]
            disliked = [w for w in keep if counts[w] < 0][:4]
            reasoning = ("Net choices: " + ", ".join(f"{w} {counts[w]:+g}" for w in keep[:6])) if keep else "Too little evidence."
            outputs.append(format_output(reasoning, likes_and_dislikes(liked, disliked)))
        return outputs

    def merge(self, summaries: list[str]) -> str:
        """The words stated by at least half of the summaries."""
        liked, disliked = Counter(), Counter()
        for summary in summaries:
            likes, dislikes = _statements(summary)
            liked.update(likes)
            disliked.update(dislikes)
        half = len(summaries) / 2
        return likes_and_dislikes(sorted(w for w, n in liked.items() if n >= half),
                                  sorted(w for w, n in disliked.items() if n >= half))


TEACHER_TASK = ("Write the user's preference summary from the interactions above. For guidance, the user later made "
                "this choice, which the summary should explain without naming it: {query} Chosen: {chosen}. Rejected: "
                "{rejected}.")
MERGE_TASK = ("Merge these summaries of one user into a single preference summary that keeps what they agree on. Think "
              "first inside <think></think>, then write the summary.")


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
                    ids = model.generate(**batch, do_sample=True, temperature=config.temperature, num_return_sequences=count,
                                         max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                outputs.append(tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
            return outputs

        return cls(generate)

    @classmethod
    def from_endpoint(cls, config: TeacherConfig) -> ModelTeacher:
        from llmrec.eval.judges import CompletionsClient

        client = CompletionsClient(config.base_url, config.timeout, config.max_retries, what="the teacher endpoint")

        def generate(prompts: list[str], count: int) -> list[list[str]]:
            reply = json.loads(client.complete({"model": config.model, "prompt": prompts, "n": count,
                                                "temperature": config.temperature, "max_tokens": config.max_new_tokens}))
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
    from llmrec.eval.judges import load_judge_model

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
    from llmrec.eval.judges import JudgeQuestion

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
        records.append(SynthesisRecord(user.user_id, "merged", merged, True, f"answered {accuracy:.0%} of the targets"))
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
    from llmrec.eval.judges import JudgeQuestion

    probabilities = judge.prob_correct([JudgeQuestion(summary, t.query, t.chosen, t.rejected) for t in targets])
    return sum(p > 0.5 for p in probabilities) / len(targets)
