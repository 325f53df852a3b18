"""Preference judges (AlignXplore+): the probability that a reader of a user's preference summary picks option A.

A judge reads a natural-language preference summary and a two-option question (a query, option A, option B) and
returns P(picks A). It verifies synthesised summaries, gives the RL reward (the probability of picking the user's
true choice) and measures summaries (judge accuracy). `Judge.prob_correct` asks every question in both presentation
orders (the chosen option as A, then as B) and averages, so a judge's position bias (a preference for "A") cancels
and the result does not depend on which option happens to be shown first; `Judge.accuracy` is the share of
questions whose `prob_correct` is above 0.5 (exactly 0.5 counts as half).

Three judges:

* `RuleJudge` ("rule"): transparent word matching, for CPU tests and baselines. Parsing of the summary:

  1. The summary is lowercased (curly apostrophes made straight) and split into clauses at `.`, `;`, newlines, the
     word "but", and at a `,` that is followed by a sentiment cue (so "likes comedy, drama and jazz" stays whole
     while "likes comedy, dislikes horror" is two clauses).
  2. Within a clause, each sentiment cue starts a segment that runs to the next cue or the clause's end. Dislike
     cues: dislike(s), avoid(s), hate(s), does/do not like, doesn't/don't like, not into, a bare "not" (for
     "likes comedy but not horror"), and "no" followed by a space; like cues: like(s), enjoy(s), prefer(s),
     love(s), favour(s), favor(s), into. The longer dislike cues win where they overlap a like cue ("does not
     like" is a dislike, not a "like"). Text before a clause's first cue ("The user ...") has no sentiment and is
     ignored.
  3. The content words of a segment go to the disliked or the liked set: lowercase alphanumeric tokens, a
     hyphenated token kept whole ("sci-fi", "fast-paced": one word each, so no attribute counts more than once),
     minus a small list of stop words and the cue words themselves. There is no stemming ("comedies" does not match
     "comedy").

  An option's score is the number of liked words among its own tokens (tokenised the same way) minus the number of
  disliked ones, and P(A) = sigmoid(sharpness * (score_A - score_B)). An empty summary gives exactly 0.5, and
  prob_a(A, B) == 1 - prob_a(B, A) exactly.
* `TransformersJudge` ("transformers"): a local causal LM fills the prompt template and P(A) is the softmax over
  the next-token logits of the first tokens of " A" and " B" (left-padded batches with explicit position ids and one
  logit position, by the answer scoring of `llmrec.answers`, so a batched row scores like the row alone).
* `EndpointJudge` ("endpoint"): the same prompt sent to an OpenAI-compatible completions server (`vllm serve`);
  P(A) comes from the top-20 log-probabilities of the first generated token. Standard library only: concurrent
  batched requests, retries with exponential backoff on timeouts, connection errors, HTTP 429 and 5xx, and an
  `LLMRecError` naming the URL when the server cannot be reached or answers something that is not a completion.

`build_judge` makes a judge from a `data.summaries.judge` section (`llmrec.data.preference_summaries.JudgeConfig`).
"""

from __future__ import annotations

import abc
import functools
import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmrec.data.preference_summaries import JUDGE_TEMPLATE, NO_SUMMARY, check_judge_template
from llmrec.errors import LLMRecError

ANSWERS = (" A", " B")


@dataclass(frozen=True)
class JudgeQuestion:
    """A two-option question about one user: which of `chosen` (what the user really picked) and `rejected`."""

    summary: str  # the user's preference summary ("" = no summary)
    query: str  # e.g. "Which movie would this user rather watch?"
    chosen: str  # the text of the option the user chose, e.g. "Night Harbor (horror, dark, fast)"
    rejected: str  # the text of the other option


class Judge(abc.ABC):
    """P(picks option A) for (summary, query, option A, option B) rows, and the order-averaged measures on top."""

    name: str

    @abc.abstractmethod
    def prob_a(self, questions: list[tuple[str, str, str, str]]) -> list[float]:
        """P(picks option A) for each (summary, query, option_a, option_b), in order; batched."""

    def prob_correct(self, questions: list[JudgeQuestion]) -> list[float]:
        """P(picks the chosen option), averaged over both presentation orders (chosen as A, and chosen as B), so it is
        invariant to A/B swapping: 0.5 * (prob_a(s,q,chosen,rejected) + 1 - prob_a(s,q,rejected,chosen))."""
        rows = [(q.summary, q.query, q.chosen, q.rejected) for q in questions]
        rows += [(q.summary, q.query, q.rejected, q.chosen) for q in questions]
        probs = self.prob_a(rows)
        n = len(questions)
        # p + (1 - p') rather than (p + 1) - p': exact for a judge whose prob_a is symmetric (the rule judge)
        return [0.5 * (probs[i] + (1.0 - probs[n + i])) for i in range(n)]

    def accuracy(self, questions: list[JudgeQuestion]) -> float:
        """Share of questions with prob_correct > 0.5 (ties at exactly 0.5 count as half); NaN with no questions."""
        probs = self.prob_correct(questions)
        if not probs:
            return float("nan")
        return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs) / len(probs)


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow, with sigmoid(-x) == 1 - sigmoid(x) exactly (1 - p is exact for p >= 0.5)."""
    if x < 0:
        return 1.0 - sigmoid(-x)
    return 1.0 / (1.0 + math.exp(-x))


def format_prompt(template: str, summary: str, query: str, option_a: str, option_b: str) -> str:
    """The judge's prompt for one row; an empty summary reads "Not provided." (the template keeps its shape)."""
    return template.format(summary=summary.strip() or NO_SUMMARY, query=query, option_a=option_a, option_b=option_b)


# --- rule judge --------------------------------------------------------------------------------------------------

# longest first, dislikes before likes: "not into" must not read as "not" then the like cue "into"
_DISLIKE_CUES = r"dislikes?|avoids?|hates?|(?:does|do) not like|(?:doesn't|don't) like|not into|not|no(?=\s)"
_LIKE_CUES = r"likes?|enjoys?|prefers?|loves?|favou?rs?|into"
_CUE = re.compile(rf"\b(?:(?P<dislike>{_DISLIKE_CUES})|(?P<like>{_LIKE_CUES}))\b")
_CLAUSE_BREAK = re.compile(rf"[.;\n]+|\bbut\b|,(?=\s*(?:{_DISLIKE_CUES}|{_LIKE_CUES})\b)")
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
CUE_WORDS = frozenset((
    "like", "likes", "dislike", "dislikes", "avoid", "avoids", "hate", "hates", "does", "do", "not", "doesn", "don",
    "t", "into", "no", "enjoy", "enjoys", "prefer", "prefers", "love", "loves", "favour", "favours", "favor",
    "favors",
))
STOP_WORDS = frozenset((
    "a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "that", "this",
    "these", "those", "is", "are", "be", "was", "were", "it", "its", "they", "them", "their", "he", "she", "his",
    "her", "him", "user", "users", "who", "which", "what", "very", "also", "really", "especially", "mostly",
    "generally", "usually", "often", "more", "less", "than", "over", "about", "all", "any", "some", "much", "many",
    "most", "such", "things", "ones", "stuff",
))


def content_words(text: str) -> frozenset[str]:
    """Lowercase alphanumeric tokens of `text` (a hyphenated one kept whole, so "fast-paced" counts once, as
    "comedy" does), minus stop and cue words."""
    return frozenset(set(_TOKEN.findall(text.lower())) - STOP_WORDS - CUE_WORDS)


@functools.lru_cache(maxsize=4096)
def preference_words(summary: str) -> tuple[frozenset[str], frozenset[str]]:
    """(liked, disliked) content words of a summary, by the clause and cue rules of the module docstring."""
    liked: set[str] = set()
    disliked: set[str] = set()
    for clause in _CLAUSE_BREAK.split(summary.lower().replace("\u2019", "'")):
        cues = list(_CUE.finditer(clause))
        for cue, following in zip(cues, cues[1:] + [None]):
            segment = clause[cue.end(): following.start() if following else len(clause)]
            (disliked if cue.group("dislike") else liked).update(content_words(segment))
    return frozenset(liked), frozenset(disliked)


class RuleJudge(Judge):
    """Liked words minus disliked words in each option, through a sigmoid; see the module docstring."""

    name = "rule"

    def __init__(self, sharpness: float = 2.0, likes_only: bool = False):
        self.sharpness, self.likes_only = sharpness, likes_only

    def score(self, summary: str, option: str) -> int:
        """(#liked words in the option) - (#disliked words in the option); `likes_only` ignores the dislikes (a
        different reader of the same summary, for cross-judge transfer)."""
        liked, disliked = preference_words(summary)
        words = content_words(option)
        return len(liked & words) - (0 if self.likes_only else len(disliked & words))

    def prob_a(self, questions: list[tuple[str, str, str, str]]) -> list[float]:
        probs = []
        for summary, _query, option_a, option_b in questions:
            if not summary.strip():
                probs.append(0.5)
                continue
            probs.append(sigmoid(self.sharpness * (self.score(summary, option_a) - self.score(summary, option_b))))
        return probs


# --- local model judge -------------------------------------------------------------------------------------------


class TransformersJudge(Judge):
    """P(" A") against P(" B") as the next token after the prompt, from an already loaded causal LM."""

    name = "transformers"

    def __init__(self, model, tokenizer, template: str = JUDGE_TEMPLATE, batch_size: int = 16):
        self.template = check_judge_template(template)
        firsts = [tokenizer(answer, add_special_tokens=False)["input_ids"][:1] for answer in ANSWERS]
        if not all(firsts) or firsts[0] == firsts[1]:
            raise ValueError(f"the judge reads P(A) off the first tokens of {ANSWERS[0]!r} and {ANSWERS[1]!r}, but "
                             f"this tokenizer starts them with the same token ({firsts[0]} and {firsts[1]})")
        if tokenizer.pad_token_id is None:  # as when the run loads its base model: padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer = model.eval(), tokenizer
        self.answer_ids = (firsts[0][0], firsts[1][0])
        self.batch_size = batch_size

    def prob_a(self, questions: list[tuple[str, str, str, str]]) -> list[float]:
        import torch

        from llmrec.answers import prompt_answer_logits

        if not questions:
            return []
        prompts = [format_prompt(self.template, *question) for question in questions]
        rows = {"prompt": prompts, "label": [0] * len(prompts)}  # the scorer's rows carry a label; unused here
        # prompt_answer_logits runs under torch.no_grad with the model in eval mode
        logits = prompt_answer_logits(self.model, self.tokenizer, rows, self.batch_size, self.answer_ids, "judging")
        return torch.softmax(logits.double(), dim=-1)[:, 0].tolist()


# --- endpoint judge ----------------------------------------------------------------------------------------------


def prob_a_from_top_logprobs(top: dict[str, float]) -> float:
    """P(A) from the first token's top log-probabilities: the best key that strips to "A" against the best that
    strips to "B"; one of them missing counts as (the lowest returned log-probability - 1), both missing as 0.5."""
    best: dict[str, float] = {}
    for token, logprob in top.items():
        letter = token.strip()
        if letter in ("A", "B"):
            best[letter] = max(best.get(letter, -math.inf), float(logprob))
    if not best:
        return 0.5
    floor = min(float(logprob) for logprob in top.values()) - 1.0
    return sigmoid(best.get("A", floor) - best.get("B", floor))


class CompletionsClient:
    """POSTs to an OpenAI-compatible `/v1/completions` server with a timeout per request, retrying timeouts,
    connection errors, HTTP 429 and 5xx with exponential backoff, and failing with one clear `LLMRecError` (placed at
    the URL) after the last attempt or at once on another 4xx. The API key is sent, never shown."""

    def __init__(self, base_url: str, timeout: float = 30.0, max_retries: int = 4, backoff: float = 1.0,
                 api_key: str | None = None, api_key_env: str | None = "OPENAI_API_KEY",
                 sleep: Callable[[float], None] = time.sleep, what: str = "the endpoint"):
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("max_retries and backoff must be at least 0, and timeout positive")
        root = base_url.rstrip("/")
        # an OpenAI client's base URL usually ends in /v1 already
        self.url = f"{root}/completions" if root.endswith("/v1") else f"{root}/v1/completions"
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._sleep, self.what = sleep, what
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env) if api_key_env else None

    def complete(self, body: dict) -> bytes:
        """The raw reply to one request, after retries."""
        data = json.dumps(body).encode("utf-8")
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post(data)
            except urllib.error.HTTPError as err:
                detail = _error_body(err)
                if err.code != 429 and err.code < 500:
                    raise LLMRecError(
                        f"{self.what} refused the request with HTTP {err.code} {err.reason} ({detail}). This is not "
                        "retried: check the model name (the one the server serves) and the server's options.",
                        self.url,
                    ) from None
                last_error = f"HTTP {err.code} {err.reason} ({detail})"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                last_error = f"{type(err).__name__}: {err}"
        raise LLMRecError(
            f"{self.what} did not answer after {self.max_retries + 1} attempts (timeout {self.timeout:g} s each); the "
            f"last error was {last_error}. Check that the server (e.g. `vllm serve`) is running at this address and "
            "reachable, or raise the timeout or max_retries.",
            self.url,
        )

    def _post(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()


class EndpointJudge(Judge):
    """The judge prompt sent to an OpenAI-compatible `/v1/completions` server (e.g. `vllm serve MODEL`)."""

    name = "endpoint"

    def __init__(
        self,
        base_url: str,
        model: str,
        template: str = JUDGE_TEMPLATE,
        batch_size: int = 32,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_workers: int = 4,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        sleep: Callable[[float], None] = time.sleep,
    ):
        if batch_size < 1 or max_workers < 1:
            raise ValueError("batch_size and max_workers must be at least 1")
        self.template = check_judge_template(template)
        self.client = CompletionsClient(base_url, timeout, max_retries, backoff, api_key, api_key_env, sleep,
                                        what="the judge endpoint")
        self.url, self.model = self.client.url, model
        self.batch_size, self.max_workers = batch_size, max_workers

    def prob_a(self, questions: list[tuple[str, str, str, str]]) -> list[float]:
        prompts = [format_prompt(self.template, *question) for question in questions]
        batches = [prompts[i: i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        if not batches:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(batches)))
        try:
            futures = [pool.submit(self._complete, batch) for batch in batches]
            answers = [future.result() for future in futures]
        finally:
            # after a failure, batches not started yet are not sent (each would go through its own retries)
            pool.shutdown(wait=True, cancel_futures=True)
        return [prob for answer in answers for prob in answer]

    def _complete(self, prompts: Sequence[str]) -> list[float]:
        """P(A) of each prompt of one request."""
        reply = self.client.complete({"model": self.model, "prompt": list(prompts), "max_tokens": 1, "temperature": 0,
                                      "logprobs": 20})
        return self._parse(reply, len(prompts))

    def _parse(self, reply: bytes, count: int) -> list[float]:
        try:
            choices = sorted(json.loads(reply)["choices"], key=lambda choice: choice["index"])
            if [choice["index"] for choice in choices] != list(range(count)):
                raise ValueError(f"expected choices with indices 0..{count - 1}")
            tops = [choice["logprobs"]["top_logprobs"][0] for choice in choices]
            return [prob_a_from_top_logprobs(top) for top in tops]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            shown = reply[:200].decode("utf-8", "replace")
            raise LLMRecError(
                f"the judge endpoint's reply is not a completions response with top log-probabilities for each prompt "
                f"({type(err).__name__}: {err}; the reply starts {shown!r}). The judge needs an OpenAI-compatible "
                "/v1/completions server that returns logprobs (e.g. `vllm serve`).",
                self.url,
            ) from None


def _error_body(err: urllib.error.HTTPError) -> str:
    """The start of an HTTP error's body (servers explain refusals there), on one line."""
    try:
        text = err.read(300).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return "no body"
    return " ".join(text.split()) or "no body"


def load_judge_model(name: str):
    """(model, tokenizer) of a packaged model (`smollm2-135m-instruct`), a local folder or a Hub id, on the GPU when
    there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmrec.models.packaged import is_packaged, packaged_folder

    if is_packaged(name):
        name = str(packaged_folder(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype="auto")
    except OSError as err:
        raise LLMRecError(f"could not load the judge model {name!r}: {err}", "judge.model") from None
    if torch.cuda.is_available():
        model = model.to(torch.cuda.current_device())
    return model, tokenizer


def build_judge(config, model=None, tokenizer=None) -> Judge:
    """The judge `config` describes; a transformers judge uses `model` and `tokenizer` when given (both or none)."""
    if config.kind == "rule":
        return RuleJudge(config.sharpness, config.likes_only)
    if config.kind == "transformers":
        if (model is None) != (tokenizer is None):
            raise ValueError("build_judge needs both a model and its tokenizer, or neither (to load judge.model)")
        if model is None:
            if not config.model:
                raise LLMRecError("kind: transformers needs the judge model: a local folder or a Hugging Face Hub id.",
                                  "judge.model")
            model, tokenizer = load_judge_model(config.model)
        return TransformersJudge(model, tokenizer, config.template, config.batch_size)
    if not config.base_url:
        raise LLMRecError("kind: endpoint needs the server's address, e.g. http://localhost:8000 (where `vllm serve` "
                          "listens).", "judge.base_url")
    if not config.model:
        raise LLMRecError("kind: endpoint needs the model name the server serves (as given to `vllm serve`).",
                          "judge.model")
    return EndpointJudge(config.base_url, config.model, config.template, config.batch_size, config.timeout,
                         config.max_retries)
