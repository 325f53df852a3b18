"""Preference judges: the rule judge's parsing, the order-averaged measures, a tiny local-model judge, and the
endpoint judge against a local HTTP server (batching, retries, timeouts, refusals; no network)."""

from __future__ import annotations

import http.server
import json
import math
import re
import socket
import threading
import time

import pytest
from pydantic import ValidationError

from llmrec.data.preference_summaries import JUDGE_TEMPLATE as DEFAULT_TEMPLATE
from llmrec.data.preference_summaries import JudgeConfig
from llmrec.errors import LLMRecError
from llmrec.eval.judges import (
    EndpointJudge,
    JudgeQuestion,
    RuleJudge,
    TransformersJudge,
    build_judge,
    format_prompt,
    preference_words,
    prob_a_from_top_logprobs,
)

SUMMARY = "Likes comedy and fast-paced films; dislikes horror."
QUERY = "Which movie would this user rather watch?"
QUESTIONS = [
    JudgeQuestion(SUMMARY, QUERY, "Laugh Track (comedy, fast)", "Night Harbor (horror, slow)"),
    JudgeQuestion("Enjoys slow romance but does not like comedy.", QUERY, "Quiet Letters (romance, slow)",
                  "Laugh Track (comedy, fast)"),
    JudgeQuestion("", QUERY, "Night Harbor (horror, slow)", "Quiet Letters (romance, slow)"),
    JudgeQuestion("Not into horror; prefers sci-fi with a long and winding plot.", "Which book next?",
                  "Star Road (sci-fi, space opera)", "Night Harbor (horror, slow)"),
    JudgeQuestion("Loves jazz.", "Which album?", "Blue Rooms (jazz)", "Heavy Hands (metal, loud, fast comedy)"),
]


def rows_of(questions: list[JudgeQuestion]) -> list[tuple[str, str, str, str]]:
    return [(q.summary, q.query, q.chosen, q.rejected) for q in questions]


def averaged(judge, question: JudgeQuestion) -> float:
    """prob_correct by its definition, from two separate prob_a calls."""
    forward = judge.prob_a([(question.summary, question.query, question.chosen, question.rejected)])[0]
    backward = judge.prob_a([(question.summary, question.query, question.rejected, question.chosen)])[0]
    return 0.5 * (forward + 1 - backward)


# --- rule judge --------------------------------------------------------------------------------------------------


def test_rule_judge_prefers_liked_words_and_avoids_disliked_ones():
    judge = RuleJudge()
    assert judge.name == "rule"
    [prob] = judge.prob_a([(SUMMARY, QUERY, "Laugh Track (comedy, fast)", "Night Harbor (horror, slow)")])
    assert prob > 0.9
    assert judge.prob_a([("", QUERY, "Laugh Track (comedy)", "Night Harbor (horror)")]) == [0.5]
    assert judge.prob_a([("  \n", QUERY, "Laugh Track (comedy)", "Night Harbor (horror)")]) == [0.5]
    liked, disliked = preference_words(SUMMARY)
    assert {"comedy", "fast-paced"} <= liked and "fast" not in liked and disliked == {"horror"}
    assert preference_words("The user does not like horror.") == (frozenset(), frozenset({"horror"}))
    assert preference_words("doesn\u2019t like slow films, enjoys sci-fi but not romance") == (
        frozenset({"sci-fi"}), frozenset({"slow", "films", "romance"}))
    # a comma before a cue ends the clause; one without a cue does not
    assert preference_words("likes comedy, drama and jazz, hates opera") == (
        frozenset({"comedy", "drama", "jazz"}), frozenset({"opera"}))
    [toward_horror] = judge.prob_a([("does not like horror", QUERY, "Night Harbor (horror)", "Laugh Track (comedy)")])
    assert toward_horror < 0.5
    assert RuleJudge(sharpness=0.5).prob_a([(SUMMARY, QUERY, "comedy", "horror")]) == [1 / (1 + math.exp(-1.0))]


def test_rule_judge_is_exactly_symmetric():
    judge = RuleJudge(sharpness=1.3)
    for summary, query, a, b in rows_of(QUESTIONS):
        assert judge.prob_a([(summary, query, a, b)]) == [1 - judge.prob_a([(summary, query, b, a)])[0]]


def test_prob_correct_and_accuracy():
    judge = RuleJudge()
    probs = judge.prob_correct(QUESTIONS)
    assert probs == pytest.approx([averaged(judge, question) for question in QUESTIONS], abs=1e-12)
    assert probs[0] > 0.9 and probs[1] > 0.9 and probs[2] == 0.5
    wrong = JudgeQuestion(SUMMARY, QUERY, "Night Harbor (horror)", "Laugh Track (comedy)")
    assert judge.accuracy([QUESTIONS[0], QUESTIONS[2], wrong]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert judge.prob_correct([]) == [] and math.isnan(judge.accuracy([]))


# --- transformers judge ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_model():
    """(model, tokenizer): a tiny random Qwen2 whose tokenizer has " A" and " B" as single tokens."""
    from llmrec.models.tiny import build_tiny_model, train_tokenizer

    texts = [format_prompt(DEFAULT_TEMPLATE, *row) for row in rows_of(QUESTIONS)]
    texts += ["Answer: A or B", " A B A B A B A B"]
    tokenizer = train_tokenizer(texts * 20, 300)
    return build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0).eval(), tokenizer


def test_transformers_judge_batches_like_one_at_a_time(judge_model):
    model, tokenizer = judge_model
    batched = TransformersJudge(model, tokenizer, batch_size=16)
    alone = TransformersJudge(model, tokenizer, batch_size=1)
    rows = rows_of(QUESTIONS) + [(q.summary, q.query, q.rejected, q.chosen) for q in QUESTIONS]
    assert len({len(format_prompt(DEFAULT_TEMPLATE, *row)) for row in rows}) > 3  # so padding is exercised
    probs = batched.prob_a(rows)
    assert probs == pytest.approx(alone.prob_a(rows), abs=1e-5)
    assert all(0 < p < 1 for p in probs)
    assert batched.prob_a([]) == []


def test_transformers_judge_prob_correct_cancels_order_bias(judge_model):
    judge = TransformersJudge(*judge_model)
    forward = judge.prob_a(rows_of(QUESTIONS))
    backward = judge.prob_a([(q.summary, q.query, q.rejected, q.chosen) for q in QUESTIONS])
    assert max(abs(f + b - 1) for f, b in zip(forward, backward)) > 1e-4  # the raw judge depends on the order
    probs = judge.prob_correct(QUESTIONS)
    assert probs == pytest.approx([0.5 * (f + 1 - b) for f, b in zip(forward, backward)], abs=1e-5)
    swapped = judge.prob_correct([JudgeQuestion(q.summary, q.query, q.rejected, q.chosen) for q in QUESTIONS])
    assert [p + s for p, s in zip(probs, swapped)] == pytest.approx([1.0] * len(QUESTIONS), abs=1e-5)


def test_transformers_judge_refuses_answers_with_one_first_token(judge_model):
    from llmrec.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(["hello world"] * 5, 300)  # " A" and " B" are "Ġ" + a letter
    with pytest.raises(ValueError, match="same token"):
        TransformersJudge(judge_model[0], tokenizer)


def test_build_judge_loads_a_saved_transformers_judge(judge_model, tmp_path):
    model, tokenizer = judge_model
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded = build_judge(JudgeConfig(kind="transformers", model=str(tmp_path)))
    passed = build_judge(JudgeConfig(kind="transformers"), model, tokenizer)
    assert isinstance(loaded, TransformersJudge) and isinstance(passed, TransformersJudge)
    assert loaded.prob_a(rows_of(QUESTIONS)) == pytest.approx(passed.prob_a(rows_of(QUESTIONS)), abs=1e-5)
    with pytest.raises(LLMRecError) as err:
        build_judge(JudgeConfig(kind="transformers", model=str(tmp_path / "missing")))
    assert err.value.place == "judge.model"


# --- endpoint judge ----------------------------------------------------------------------------------------------


def fake_top_logprobs(prompt: str) -> dict[str, float]:
    """The server's first-token log-probabilities: " A" (" B") is favoured when its option mentions comedy; an
    option marked [no B] drops the " B" key, so the judge must fall back to the lowest returned value."""
    option_a = re.search(r"^A: (.*)$", prompt, re.MULTILINE).group(1)
    option_b = re.search(r"^B: (.*)$", prompt, re.MULTILINE).group(1)
    top = {" A": -1.0 + ("comedy" in option_a), "A": -3.0, " B": -1.0 + ("comedy" in option_b), " C": -4.0}
    if "[no B]" in option_a + option_b:
        del top[" B"]
    return top


def expected_prob_a(option_a: str, option_b: str) -> float:
    lp_a = -1.0 + ("comedy" in option_a)
    lp_b = -5.0 if "[no B]" in option_a + option_b else -1.0 + ("comedy" in option_b)
    return math.exp(lp_a) / (math.exp(lp_a) + math.exp(lp_b))


class CompletionsHandler(http.server.BaseHTTPRequestHandler):
    """/v1/completions as vLLM answers it, or failing as the server's `mode` says."""

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state["lock"]:
            state["requests"].append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            count = len(state["requests"])
        mode = state["mode"]
        if mode == "fail":
            return self.reply(500, b"engine overloaded")
        if mode == "bad_request":
            return self.reply(400, json.dumps({"message": "The model `nope` does not exist."}).encode())
        if mode == "garbage":
            return self.reply(200, b"<html>not json</html>")
        if mode == "slow" and count == 1:
            time.sleep(1.0)
        choices = [{"index": i, "text": " A", "logprobs": {"top_logprobs": [fake_top_logprobs(prompt)]}}
                   for i, prompt in enumerate(body["prompt"])]
        self.reply(200, json.dumps({"choices": choices[::-1]}).encode())  # out of order: the judge sorts by index

    def reply(self, code: int, payload: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local completions server in a thread: its state holds `mode`, the received `requests` and `url`."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CompletionsHandler)
    httpd.state = {"mode": "normal", "requests": [], "lock": threading.Lock(),
                   "url": f"http://127.0.0.1:{httpd.server_address[1]}"}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def test_prob_a_from_top_logprobs():
    top = {" A": math.log(0.6), "A": math.log(0.1), " B": math.log(0.2)}
    assert prob_a_from_top_logprobs(top) == pytest.approx(0.75)  # the best "A" key
    assert prob_a_from_top_logprobs({"B ": -1.0, " C": -2.0}) == pytest.approx(1 / (1 + math.e ** 2))  # A: -3
    assert prob_a_from_top_logprobs({" C": -1.0}) == 0.5
    assert prob_a_from_top_logprobs({}) == 0.5


def test_endpoint_judge_batches_requests(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    judge = EndpointJudge(server["url"], "judge-model", batch_size=2, backoff=0.01)
    assert judge.name == "endpoint" and judge.url == server["url"] + "/v1/completions"
    assert EndpointJudge(server["url"] + "/v1/", "m").url == judge.url
    rows = rows_of(QUESTIONS) + [(SUMMARY, QUERY, "Laugh Track (comedy) [no B]", "Night Harbor (horror)")]
    probs = judge.prob_a(rows)
    assert probs == pytest.approx([expected_prob_a(a, b) for _, _, a, b in rows], abs=1e-12)
    assert len(server["requests"]) == math.ceil(len(rows) / 2)
    prompts = [format_prompt(DEFAULT_TEMPLATE, *row) for row in rows[:2]]
    # batches go out concurrently, so the first batch is found by its prompts, not by arrival order
    first = next(request for request in server["requests"] if request["body"]["prompt"] == prompts)
    assert first["path"] == "/v1/completions" and first["auth"] == "Bearer from-env"
    assert first["body"] == {"model": "judge-model", "prompt": prompts, "max_tokens": 1, "temperature": 0,
                             "logprobs": 20}
    assert format_prompt(DEFAULT_TEMPLATE, *rows[2]).startswith("User preferences: Not provided.\n")

    server["requests"].clear()
    probs = judge.prob_correct(QUESTIONS)
    assert len(server["requests"]) == math.ceil(2 * len(QUESTIONS) / 2)
    assert probs == pytest.approx([averaged(judge, question) for question in QUESTIONS], abs=1e-12)
    assert judge.prob_a([]) == []
    EndpointJudge(server["url"], "m", api_key="given").prob_a(rows[:1])
    assert server["requests"][-1]["auth"] == "Bearer given"


@pytest.mark.parametrize("kind", ["rule", "transformers", "endpoint"])
def test_every_judge_is_deterministic_and_order_averaged(kind, judge_model, server):
    judge = {
        "rule": lambda: RuleJudge(),
        "transformers": lambda: TransformersJudge(*judge_model, batch_size=4),
        "endpoint": lambda: EndpointJudge(server["url"], "judge-model", batch_size=3, backoff=0.01),
    }[kind]()
    rows = rows_of(QUESTIONS)
    assert judge.prob_a(rows) == judge.prob_a(rows)
    probs = judge.prob_correct(QUESTIONS)
    assert probs == judge.prob_correct(QUESTIONS)
    assert probs == pytest.approx([averaged(judge, question) for question in QUESTIONS], abs=1e-5)
    swapped = judge.prob_correct([JudgeQuestion(q.summary, q.query, q.rejected, q.chosen) for q in QUESTIONS])
    assert [p + s for p, s in zip(probs, swapped)] == pytest.approx([1.0] * len(QUESTIONS), abs=1e-5)


def test_endpoint_judge_retries_after_a_timeout(server):
    server["mode"] = "slow"
    slept = []
    judge = EndpointJudge(server["url"], "judge-model", timeout=0.3, max_retries=2, backoff=0.01, sleep=slept.append)
    rows = rows_of(QUESTIONS[:2])
    assert judge.prob_a(rows) == pytest.approx([expected_prob_a(a, b) for _, _, a, b in rows], abs=1e-12)
    assert len(server["requests"]) == 2 and slept == [0.01]


def test_endpoint_judge_gives_up_after_its_retries(server):
    server["mode"] = "fail"
    slept = []

    def sleep(seconds: float):
        slept.append(seconds)
        time.sleep(seconds)

    judge = EndpointJudge(server["url"], "judge-model", max_retries=2, backoff=0.01, sleep=sleep, api_key="secret")
    start = time.monotonic()
    with pytest.raises(LLMRecError) as err:
        judge.prob_a(rows_of(QUESTIONS[:1]))
    assert time.monotonic() - start < 2.0
    assert len(server["requests"]) == 3 and slept == [0.01, 0.02]
    message = str(err.value)
    assert err.value.place == judge.url and judge.url in message
    assert "3 attempts" in message and "HTTP 500" in message and "engine overloaded" in message
    assert "secret" not in message and "\n" not in message


def test_endpoint_judge_does_not_retry_a_client_error(server):
    server["mode"] = "bad_request"
    slept = []
    judge = EndpointJudge(server["url"], "nope", max_retries=3, backoff=0.01, sleep=slept.append)
    with pytest.raises(LLMRecError, match="HTTP 400.*does not exist") as err:
        judge.prob_a(rows_of(QUESTIONS[:1]))
    assert err.value.place == judge.url
    assert len(server["requests"]) == 1 and slept == []


def test_endpoint_judge_rejects_a_reply_that_is_not_a_completion(server):
    server["mode"] = "garbage"
    judge = EndpointJudge(server["url"], "judge-model", max_retries=3, backoff=0.01, sleep=lambda _: None)
    with pytest.raises(LLMRecError, match="not a completions response") as err:
        judge.prob_a(rows_of(QUESTIONS[:1]))
    assert err.value.place == judge.url and len(server["requests"]) == 1


def test_endpoint_judge_retries_a_refused_connection():
    with socket.socket() as probe:  # a port that nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    judge = EndpointJudge(url, "judge-model", max_retries=1, backoff=0.01, sleep=lambda _: None)
    with pytest.raises(LLMRecError, match="2 attempts") as err:
        judge.prob_a(rows_of(QUESTIONS[:1]))
    assert url in str(err.value)


# --- configuration -----------------------------------------------------------------------------------------------


def test_judge_config_and_build_judge():
    assert JudgeConfig().template == DEFAULT_TEMPLATE
    with pytest.raises(ValidationError, match=r"\{query\}"):
        JudgeConfig(template="{summary} A: {option_a} B: {option_b}")
    with pytest.raises(ValidationError, match=r"\{user\}"):
        JudgeConfig(template=DEFAULT_TEMPLATE + " {user}")
    with pytest.raises(ValidationError):
        JudgeConfig(kind="rule", temperature=0.5)
    rule = build_judge(JudgeConfig(sharpness=3.0))
    assert isinstance(rule, RuleJudge) and rule.sharpness == 3.0
    with pytest.raises(LLMRecError) as err:
        build_judge(JudgeConfig(kind="endpoint", model="judge-model"))
    assert err.value.place == "judge.base_url" and "judge.base_url" in str(err.value)
    with pytest.raises(LLMRecError) as err:
        build_judge(JudgeConfig(kind="endpoint", base_url="http://127.0.0.1:1"))
    assert err.value.place == "judge.model"
    endpoint = build_judge(JudgeConfig(kind="endpoint", base_url="http://127.0.0.1:1", model="m", batch_size=8,
                                       timeout=2.0, max_retries=1))
    assert isinstance(endpoint, EndpointJudge)
    assert (endpoint.batch_size, endpoint.client.timeout, endpoint.client.max_retries) == (8, 2.0, 1)
    with pytest.raises(LLMRecError) as err:
        build_judge(JudgeConfig(kind="transformers"))
    assert err.value.place == "judge.model"


def test_a_likes_only_rule_judge_ignores_dislikes():
    summary = "Likes comedy. Dislikes horror."
    full, likes_only = RuleJudge(), build_judge(JudgeConfig(kind="rule", likes_only=True))
    options = ("Dark Comedy (comedy, horror)", "Plain Drama (drama)")
    assert full.prob_a([(summary, QUERY, *options)]) == [0.5]  # +1 - 1 = 0 against 0
    assert likes_only.prob_a([(summary, QUERY, *options)])[0] > 0.5
