"""Preference summaries (AlignXplore+): the model's input and output format, the `data.summaries` sections, the
users of each split, and the template teacher.

Input: a system line, the past preference summary ("Not provided." when there is none), the user's behaviours as
numbered (query, chosen, rejected) triples, and the instruction to merge the past summary with the new evidence,
favouring the chosen items. Output: exactly one `<think>reasoning</think>` block followed by the summary
(`parse_output`; anything else, including an empty summary, is malformed and gets reward 0 in RL).

The judge's prompt (`JUDGE_TEMPLATE`, checked by `check_judge_template`) and its section `JudgeConfig` sit here
beside the other sections of `data.summaries`; the judges themselves are in `llmrec.eval.judges`. The synthesis of
verified SFT data, which runs the teacher and the judge, is in `llmrec.tasks.preference_summary`; `TemplateTeacher`
(attribute counting, CPU) is its teacher for the persona world.
"""

from __future__ import annotations

import abc
import re
from collections import Counter
from string import Formatter
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

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
JUDGE_TEMPLATE = "User preferences: {summary}\n{query}\nA: {option_a}\nB: {option_b}\nAnswer:"
JUDGE_TEMPLATE_FIELDS = ("summary", "query", "option_a", "option_b")
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


def check_judge_template(template: str) -> str:
    """`template` if it is a format string with exactly the fields {summary}, {query}, {option_a}, {option_b}."""
    try:
        names = [name for _, name, _, _ in Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"template is not a valid format string ({err})") from None
    missing = [name for name in JUDGE_TEMPLATE_FIELDS if name not in names]
    if missing:
        raise ValueError(f"template must contain {{{missing[0]}}} (it fills in {', '.join(JUDGE_TEMPLATE_FIELDS)})")
    others = sorted(set(names) - set(JUDGE_TEMPLATE_FIELDS))
    if others:
        raise ValueError(f"template may only use {{summary}}, {{query}}, {{option_a}} and {{option_b}}, "
                         f"not {{{others[0]}}}")
    return template


class JudgeConfig(Section):
    """`data.summaries.judge`: the preference judge (`llmrec.eval.judges`) that verifies summaries, rewards them in
    RL and measures them."""

    kind: Literal["rule", "transformers", "endpoint"] = Field(
        "rule", description="'rule': word matching (CPU, transparent); 'transformers': a local causal LM; "
        "'endpoint': an OpenAI-compatible completions server (e.g. `vllm serve`)."
    )
    sharpness: float = Field(2.0, gt=0, description="rule: P(A) = sigmoid(sharpness * (score_A - score_B)).")
    likes_only: bool = Field(False, description="rule: read only what the summary says the user likes.")
    model: str | None = Field(
        None, description="transformers: a local folder or Hugging Face Hub id (unless a loaded model is passed); "
        "endpoint: the model name the server serves."
    )
    base_url: str | None = Field(None, description="endpoint: the server's address, e.g. http://localhost:8000.")
    template: str = Field(
        JUDGE_TEMPLATE, description="transformers, endpoint: the prompt, with {summary}, {query}, {option_a} and "
        "{option_b}; the answer is read off the next token (' A' or ' B')."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass (transformers) or per request (endpoint).")
    timeout: float = Field(30.0, gt=0, description="endpoint: seconds to wait for one request.")
    max_retries: int = Field(
        4, ge=0, description="endpoint: retries of a request after a timeout, connection error, HTTP 429 or 5xx."
    )

    @field_validator("template")
    @classmethod
    def _template_fields(cls, template: str) -> str:
        return check_judge_template(template)


class SynthesisConfig(Section):
    """How stage-1 (SFT) examples are synthesised and verified."""

    max_targets: int = Field(5, ge=1, description="Part-2 behaviours used as verification targets per user.")
    candidates_per_target: int = Field(2, ge=1, description="Teacher outputs per target.")
    min_merged_accuracy: float = Field(
        0.8, ge=0, le=1, description="Keep a user when the merged summary answers this share."
    )
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
    teacher: TeacherConfig = Field(
        default_factory=lambda: TeacherConfig(), description="Who writes candidate summaries."
    )
    user_fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train / valid / test users.")
    max_new_tokens: int = Field(96, ge=8, description="Longest summary output generated in RL and evaluation.")


def summary_users(config: PreferenceSummaryTaskConfig, seed: int, split: str, data=None,
                  ood: bool = False) -> list[UserBehaviours]:
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
            counts.update(dict.fromkeys(liked, self.past_weight))
            counts.update(dict.fromkeys(disliked, -self.past_weight))
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
            reasoning = (("Net choices: " + ", ".join(f"{w} {counts[w]:+g}" for w in keep[:6])) if keep
                         else "Too little evidence.")
            outputs.append(format_output(reasoning, self._statement(counts, keep)))
        return outputs

    def summary(self, past_summary: str | None, behaviours: list[Behaviour]) -> str:
        """The teacher's summary without sampling (threshold 1, nothing dropped): a baseline for trained models."""
        counts = self.evidence(past_summary, behaviours)
        return self._statement(counts, sorted((w for w in counts if counts[w]), key=lambda w: (-abs(counts[w]), w)))

    @staticmethod
    def _statement(counts: Counter, keep: list[str]) -> str:
        """"Likes ... Dislikes ..." with the first four kept words of each sign."""
        return likes_and_dislikes([w for w in keep if counts[w] > 0][:4], [w for w in keep if counts[w] < 0][:4])

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
