"""Tree rollouts: exactly N leaves, shared prefixes, KV-cache reuse, token savings, pruning, and the vLLM round
logic."""

from __future__ import annotations

import pytest
import torch

from llmrec.rollout import HFRollout, SamplingConfig, TreeConfig, VLLMRollout
from llmrec.rollout.tree import TreeBuilder

# thresholds a random tiny model meets at every step (its entropy is high): it forks from step 10 on
FORKING = dict(entropy_high=2.0, entropy_low=1.0, branch_confidence=8.0, entropy_jump=-10.0, max_depth=3, min_depth=10)
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer("A user liked these items:")["input_ids"],
            tokenizer("Golden Jazz River. Will the user like it?")["input_ids"]]


@pytest.fixture(scope="module")
def rollout(base, tokenizer):
    return HFRollout(base, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def _by_id(question):
    return {c.branch_id: c for c in question.completions}


def test_tree_returns_exactly_n_leaves_that_share_prefixes_token_for_token(rollout, prompts, base):
    out = rollout.generate(prompts, 8, TreeConfig(pruning=False, **FORKING), SAMPLING, seed=0)
    assert [len(q.completions) for q in out] == [8, 8]
    forked = 0
    for prompt, question in zip(prompts, out):
        leaves = _by_id(question)
        for leaf in question.completions:
            if leaf.parent_id is None:
                continue
            forked += 1
            parent = leaves[leaf.parent_id]  # without pruning every branch ends as a leaf
            cut = leaf.fork_position
            assert leaf.token_ids[:cut] == parent.token_ids[:cut]
            assert leaf.token_ids[cut] != parent.token_ids[cut]
            assert leaf.logprobs[:cut] == parent.logprobs[:cut]
        # the cache rows copied at forks hold the right keys: re-scoring each leaf from scratch gives its log-probs
        for leaf in question.completions:
            ids = torch.tensor([prompt + leaf.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(base(ids).logits[0].float(), -1)
            expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(leaf.token_ids)]
            assert expected == pytest.approx(leaf.logprobs, abs=1e-4)
    assert forked >= 4


def test_fills_join_the_running_batch_once_the_shortfall_is_certain(rollout, prompts, base):
    # one fork at most (depth 1) into at most 4 leaves: the other 4+ are fills, which start right after the fork
    out = rollout.generate(prompts, 8, TreeConfig(pruning=False, **{**FORKING, "max_depth": 1}), SAMPLING, seed=0)
    for prompt, question in zip(prompts, out):
        fills = [c for c in question.completions if c.origin == "fill"]
        assert question.stats.forks == 1 and len(fills) >= 4 and len(question.completions) == 8
        for leaf in fills:  # a joined row's left-padded prompt cache gives the same log-probs as a fresh forward
            ids = torch.tensor([prompt + leaf.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(base(ids).logits[0].float(), -1)
            assert ([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(leaf.token_ids)]
                    == pytest.approx(leaf.logprobs, abs=1e-4))


def test_tree_decodes_fewer_tokens_than_flat_sampling_for_the_same_leaves(rollout, prompts):
    tree = rollout.generate(prompts, 8, TreeConfig(pruning=False, **FORKING), SAMPLING, seed=0)
    flat = rollout.generate(prompts, 8, TreeConfig(branching=False, pruning=False), SAMPLING, seed=0)
    for t, f in zip(tree, flat):
        assert len(t.completions) == len(f.completions) == 8
        assert f.stats.forks == 0 and f.stats.decoded_tokens == sum(len(c.token_ids) for c in f.completions)
        assert t.stats.forks > 0
        assert t.stats.decoded_tokens * 1.5 <= f.stats.decoded_tokens


def test_the_same_seed_gives_the_same_tree(rollout, prompts):
    first = rollout.generate(prompts, 6, TreeConfig(**FORKING), SAMPLING, seed=3)
    again = rollout.generate(prompts, 6, TreeConfig(**FORKING), SAMPLING, seed=3)
    assert ([[c.token_ids for c in q.completions] for q in first]
            == [[c.token_ids for c in q.completions] for q in again])


def test_a_pruned_branch_stops_consuming_tokens_and_fills_complete_the_leaves(rollout, prompts):
    # every tree branch is pruned as soon as its group-confidence window is full (min C^G < infinity)
    config = TreeConfig(branching=True, pruning=True, roots=3, min_depth=2, group_window=4,
                        prune_confidence=float("inf"), entropy_high=100.0)
    out = rollout.generate(prompts, 5, config, SAMPLING, seed=0)
    for question in out:
        stats = question.stats
        assert stats.pruned == 3 and stats.forks == 0
        assert stats.pruned_tokens == 3 * 4  # stopped at the 4th token (window full), not one token later
        assert [c.origin for c in question.completions] == ["fill"] * 5 and stats.fills == 5
        assert stats.decoded_tokens == stats.pruned_tokens + sum(len(c.token_ids) for c in question.completions)


def test_leaf_budget_is_never_exceeded_and_depth_one_forks_once(rollout, prompts):
    out = rollout.generate(prompts, 4, TreeConfig(pruning=False, **{**FORKING, "max_depth": 1}), SAMPLING, seed=1)
    for question in out:
        assert len(question.completions) == 4
        assert question.stats.forks == 1  # one root, one fork into up to B_max = 4 leaves
        assert question.stats.branches <= 3


def test_tree_settings_are_validated():
    with pytest.raises(ValueError, match="confidence_k"):
        TreeConfig(top_k=3, confidence_k=5)
    with pytest.raises(ValueError, match="entropy_high"):
        TreeConfig(entropy_high=1.0, entropy_low=2.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)


def test_fork_width_follows_entropy_and_confidence():
    builder = TreeBuilder(TreeConfig(), 16, 1, 32, {0})
    assert builder.width(3.5, 1.2) == 3  # B_min + alpha at H_high, C^G = tau_branch
    assert builder.width(5.0, 0.0) == 4  # capped at B_max
    assert builder.width(1.0, 2.4) == 1  # floor B_min


class _ModelEngine(VLLMRollout):
    """The vLLM backend's round logic driven by the tiny model instead of a vLLM engine: each request decodes up to
    its budget with the model and returns the top-K log-probabilities per token, as vLLM does."""

    def __init__(self, model, eos, chunk_tokens):
        super().__init__(engine=None, eos_token_ids=[eos], chunk_tokens=chunk_tokens)
        self.model, self.eos, self.requests = model, eos, 0

    def complete(self, requests, budgets, seeds, sampling, top_k):
        results = []
        for ids, budget, seed in zip(requests, budgets, seeds):
            self.requests += 1
            generator = torch.Generator().manual_seed(seed)
            tokens, tops = [], []
            for _ in range(budget):
                with torch.no_grad():
                    logits = self.model(torch.tensor([ids + tokens])).logits[0, -1].float() / sampling.temperature
                logp = torch.log_softmax(logits, -1)
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                top = logp.topk(top_k)
                tops.append(sorted({**dict(zip(top.indices.tolist(), top.values.tolist())),
                                    token: float(logp[token])}.items(), key=lambda x: -x[1]))
                tokens.append(token)
                if token == self.eos:
                    break
            results.append((tokens, tops))
        return results


def test_vllm_rounds_grow_the_same_kind_of_tree(base, tokenizer, prompts):
    engine = _ModelEngine(base, tokenizer.eos_token_id, chunk_tokens=8)
    out = engine.generate(prompts, 6, TreeConfig(pruning=False, **FORKING), SamplingConfig(max_new_tokens=16), seed=0)
    for question in out:
        assert len(question.completions) == 6
        assert question.stats.forks > 0
        leaves = _by_id(question)
        for leaf in question.completions:
            assert len(leaf.token_ids) <= 16
            if leaf.parent_id is not None:
                parent = leaves[leaf.parent_id]
                assert leaf.token_ids[:leaf.fork_position] == parent.token_ids[:leaf.fork_position]
    assert engine.requests > 2 * 6  # continuation requests, several rounds


def test_vllm_rounds_count_the_tokens_decoded_past_a_prune(base, tokenizer, prompts):
    engine = _ModelEngine(base, tokenizer.eos_token_id, chunk_tokens=10)
    config = TreeConfig(roots=2, min_depth=2, group_window=4, prune_confidence=float("inf"), entropy_high=100.0)
    out = engine.generate(prompts[:1], 3, config, SamplingConfig(max_new_tokens=16), seed=0)
    stats = out[0].stats
    assert stats.pruned == 2 and stats.pruned_tokens == 2 * 4
    # each pruned root also decoded the 6 tokens of its first chunk past the prune point
    assert stats.decoded_tokens == 2 * 10 + sum(len(c.token_ids) for c in out[0].completions)


def test_path_vote_weights_split_each_tree_by_the_probability_of_its_forks(rollout, prompts):
    out = rollout.generate(prompts, 8, TreeConfig(pruning=False, **FORKING), SAMPLING, seed=0)
    for question in out:
        weights = [c.vote_weight for c in question.completions]
        assert sum(weights) == pytest.approx(len(weights))  # no pruning: every tree's leaves share its leaf count
        assert min(weights) < 1 < max(weights)


def test_a_tiny_top_p_samples_the_most_likely_token(rollout, prompts, base):
    out = rollout.generate(prompts[:1], 3, TreeConfig(branching=False, pruning=False),
                           SamplingConfig(top_p=1e-6, max_new_tokens=6), seed=0)
    leaves = [c.token_ids for c in out[0].completions]
    assert leaves[0] == leaves[1] == leaves[2]
    with torch.no_grad():
        first = int(base(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    assert leaves[0][0] == first
