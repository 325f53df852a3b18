"""Tiny models, the catalog trie, constrained beam search (exact against brute force) and ranking metrics."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmrec.errors import LLMRecError
from llmrec.eval.metrics import ranking_metrics
from llmrec.eval.ranking import popularity_order, random_ranking, rank_with_model, top_k_excluding
from llmrec.eval.trie import CatalogTrie
from llmrec.models import ModelConfig, load_base
from llmrec.models.tiny import build_tiny_model, train_tokenizer

ANCHOR = "\nNext:\n"
TITLES = {
    f"i{k}": title
    for k, title in enumerate(
        ["Golden River", "Golden Road", "Golden River Two", "Silent Road", "Silent Harbor", "Wild Jazz Night",
         "Wild Jazz", "Quiet Garden", "Frozen Empire", "Lost Letters", "Bright Station", "Velvet Dreams"]
    )
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = list(TITLES.values()) + [f"History:\nGolden River\nSilent Road{ANCHOR}"] * 20
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0).eval()


def test_tokenizer_and_model_are_deterministic(tokenizer, model, tmp_path):
    again = train_tokenizer(list(TITLES.values()) + [f"History:\nGolden River\nSilent Road{ANCHOR}"] * 20, 400)
    assert again.get_vocab() == tokenizer.get_vocab()
    twin = build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0)
    other = build_tiny_model("tiny:qwen2-xs", tokenizer, seed=1)
    for (name, a), b, _c in zip(model.state_dict().items(), twin.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), other.state_dict().values()))


def test_tiny_base_is_saved_once_and_reloaded_offline(tmp_path):
    config = ModelConfig(name="tiny:llama-xs", tokenizer_vocab_size=300)
    model, tokenizer = load_base(config, tmp_path / "base", lambda: list(TITLES.values()), 0, True)
    assert (tmp_path / "base" / "model.safetensors").is_file()
    reloaded, tokenizer2 = load_base(config, tmp_path / "base", lambda: pytest.fail("must not retrain"), 0, True)
    ids = tokenizer(["Golden River"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert tokenizer2.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(LLMRecError, match="tiny_overrides.hiden_size.*Did you mean 'hidden_size'"):
        build_tiny_model("tiny:qwen2-xs", tokenizer, 0, {"hiden_size": 8})


def test_trie_allows_exactly_the_catalog_and_bans_exactly_the_history(tokenizer):
    trie = CatalogTrie.from_titles(tokenizer, TITLES, ANCHOR)
    assert len(trie) == len(TITLES)
    eos = tokenizer.eos_token_id
    for item, title in TITLES.items():
        ids = tokenizer(ANCHOR + title + tokenizer.eos_token)["input_ids"][len(tokenizer(ANCHOR)["input_ids"]):]
        assert ids[-1] == eos and trie.item_of(ids) == item
        assert all(ids[i] in trie.allowed(ids[:i]) for i in range(len(ids)))
    banned = trie.banned_counts(["i6"])  # "Wild Jazz" is a prefix of "Wild Jazz Night" in tokens
    assert trie.available(banned) == len(TITLES) - 1
    reachable = _enumerate(trie, banned)
    assert set(reachable) == set(TITLES) - {"i6"}
    everything = trie.banned_counts(TITLES)
    assert trie.allowed([], everything) == [] and trie.available(everything) == 0


def _enumerate(trie, banned, prefix=()):
    out = []
    for token in trie.allowed(list(prefix), banned):
        item = trie.item_of([*prefix, token])
        out += [item] if item is not None else _enumerate(trie, banned, (*prefix, token))
    return out


def test_a_template_that_does_not_end_on_a_token_boundary_is_refused(tokenizer):
    with pytest.raises(LLMRecError, match="does not end on a token boundary"):
        CatalogTrie.from_titles(tokenizer, {"a": "lden River"}, "Next: Go")


def _brute_force(model, tokenizer, prompt, trie):
    """log P(title + EOS | prompt) for every item, by teacher forcing."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    scores = {}
    for item, path in trie.paths.items():
        tokens = [t for node, nxt in zip(path, path[1:]) for t, child in trie.children[node].items() if child == nxt]
        ids = torch.tensor([prompt_ids + tokens])
        with torch.no_grad():
            logprobs = model(ids).logits.log_softmax(-1)[0]
        scores[item] = sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(tokens))
    return scores


def test_constrained_beam_search_with_enough_beams_is_exact(model, tokenizer):
    trie = CatalogTrie.from_titles(tokenizer, TITLES, ANCHOR)
    prompts = [f"History:\nGolden River{ANCHOR}", f"History:\nSilent Road\nWild Jazz{ANCHOR}"]
    history = [["i0"], ["i3", "i6"]]
    ranked = rank_with_model(model, tokenizer, trie, prompts, history, num_beams=len(TITLES), batch_size=1,
                             progress=False)
    for prompt, seen, result in zip(prompts, history, ranked):
        expected = _brute_force(model, tokenizer, prompt, trie)
        for item in seen:
            expected.pop(item)
        assert [item for item, _ in result] == sorted(expected, key=expected.get, reverse=True)
        for item, score in result:
            assert score == pytest.approx(expected[item], abs=1e-4)


def test_fewer_beams_return_distinct_real_items(model, tokenizer):
    trie = CatalogTrie.from_titles(tokenizer, TITLES, ANCHOR)
    ranked = rank_with_model(model, tokenizer, trie, [f"History:\nLost Letters{ANCHOR}"] * 3, [["i9"]] * 3, 4, 2,
                             progress=False)
    for result in ranked:
        items = [item for item, _ in result]
        assert len(items) == len(set(items)) == 4 and "i9" not in items
        assert all(a >= b for (_, a), (_, b) in zip(result, result[1:]))
    assert ranked[0] == ranked[2]  # batch composition does not change a prompt's ranking


def test_metrics_by_hand():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"]]
    metrics = ranking_metrics(rankings, ["a", "a", "b"], [1, 3])
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@3"] == pytest.approx(2 / 3)
    assert metrics["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


def test_baselines_exclude_the_history():
    order = ["a", "b", "c", "d", "e"]
    assert top_k_excluding(order, ["a", "c"], 2) == ["b", "d"]
    sample = random_ranking(order, ["a"], 4, random.Random(0))
    assert sorted(sample) == ["b", "c", "d", "e"]


def test_popularity_order_counts_training_interactions_only():
    import pandas as pd

    from llmrec.data import RecData

    interactions = pd.DataFrame(
        {"user_id": ["u", "u", "v", "v", "w"], "item_id": ["a", "b", "b", "c", "c"], "timestamp": [1, 2, 1, 2, 1],
         "split": ["train", "train", "train", "test", "test"]}
    )
    catalog = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]})
    assert popularity_order(RecData.from_frames(interactions, catalog, "t")) == ["b", "a", "c"]


def test_one_beam_scores_like_beam_search(model, tokenizer):
    trie = CatalogTrie.from_titles(tokenizer, TITLES, ANCHOR)
    prompt = f"History:\nQuiet Garden{ANCHOR}"
    [[(item, score)]] = rank_with_model(model, tokenizer, trie, [prompt], None, 1, 1, progress=False)
    assert score == pytest.approx(_brute_force(model, tokenizer, prompt, trie)[item], abs=1e-4)
    only = {"i0": TITLES["i0"], "i1": TITLES["i1"]}
    small = CatalogTrie.from_titles(tokenizer, only, ANCHOR)
    [ranked] = rank_with_model(model, tokenizer, small, [prompt], [["i0"]], 5, 1, progress=False)
    assert [item for item, _ in ranked] == ["i1"]  # one item left after the history: one beam


def test_local_folders_load_with_dtype_and_attention_options(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "local")
    tokenizer.save_pretrained(tmp_path / "local")
    config = ModelConfig(name=str(tmp_path / "local"), dtype="bfloat16", attn_implementation="eager")
    loaded, loaded_tokenizer = load_base(config, tmp_path / "unused", lambda: pytest.fail("not a tiny model"), 0, True)
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "eager"
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(LLMRecError, match="model.name: no model folder at .*missing"):
        load_base(ModelConfig(name=str(tmp_path / "missing")), tmp_path / "unused", list, 0, True)


def test_over_recommendation_ratio_by_hand():
    from llmrec.eval.metrics import over_recommendation

    rankings = [["a", "b", "c", "d"], ["a", "b", "e", "f"], ["a", "c", "g", "h"]]
    # top-2 slots: a a a b b c -> the three most frequent (a, b, c) fill all 6
    assert over_recommendation(rankings, 2) == 1.0
    # top-4 slots (12): a×3, b×2, c×2 -> 7/12
    assert over_recommendation(rankings, 4) == pytest.approx(7 / 12)


def test_the_prompt_cache_shared_by_the_beams_gives_the_exact_ranking(model, tokenizer):
    """Prompts of different lengths in one batch (left padding): the ranking with the prompt computed once and
    repeated for the beams equals the brute-force one, and generate() without the shared cache."""
    from llmrec.eval import ranking

    trie = CatalogTrie.from_titles(tokenizer, TITLES, ANCHOR)
    prompts = [f"History:\nGolden River{ANCHOR}", f"History:\nSilent Road\nWild Jazz\nLost Letters{ANCHOR}"]
    shared = rank_with_model(model, tokenizer, trie, prompts, None, len(TITLES), 2, progress=False)
    for prompt, result in zip(prompts, shared):
        expected = _brute_force(model, tokenizer, prompt, trie)
        assert [item for item, _ in result] == sorted(expected, key=expected.get, reverse=True)
        assert [score for _, score in result] == pytest.approx([expected[item] for item, _ in result], abs=1e-4)

    original = ranking.shared_prompt_cache
    try:
        ranking.shared_prompt_cache = lambda *args: {}
        unshared = rank_with_model(model, tokenizer, trie, prompts, None, len(TITLES), 2, progress=False)
    finally:
        ranking.shared_prompt_cache = original
    for a, b in zip(shared, unshared):
        assert [item for item, _ in a] == [item for item, _ in b]
        assert [score for _, score in a] == pytest.approx([score for _, score in b], abs=1e-4)
