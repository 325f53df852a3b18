"""The classical ranking baselines: SASRec (llmrec.cf.sasrec), BPR-MF ranking, and both as `eval.baselines`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from llmrec.cf import CFConfig, SASRecConfig, train_cf, train_sasrec
from llmrec.cf.ranking import top_k
from llmrec.data import DataConfig, load_data
from llmrec.errors import LLMRecError
from llmrec.recipe import load_recipe

SMALL = SASRecConfig(dim=16, num_layers=1, dropout=0.0, max_length=8, epochs=60, batch_size=32,
                     learning_rate=1e-2, patience=60)


def _cyclic_world(tmp_path, users: int = 40, items: int = 40, length: int = 12):
    """Every user walks the catalog in a cycle from a random start: the next item is always the current one + 1."""
    rows = []
    for user in range(users):
        start = (user * 7) % items
        rows += [(f"u{user}", f"i{(start + step) % items}", step) for step in range(length)]
    pd.DataFrame(rows, columns=["user", "item", "time"]).to_csv(tmp_path / "i.csv", index=False)
    pd.DataFrame({"item": [f"i{k}" for k in range(items)], "name": [f"Film {k}" for k in range(items)]}).to_csv(
        tmp_path / "c.csv", index=False)
    return load_data(DataConfig.model_validate({"source": {
        "format": "table", "interactions": str(tmp_path / "i.csv"), "catalog": str(tmp_path / "c.csv"),
        "columns": {"user_id": "user", "item_id": "item", "timestamp": "time"},
        "catalog_columns": {"item_id": "item", "title": "name"}}}), 0)


def _test_targets(data):
    histories, targets = [], []
    for sequence in data.user_sequences().values():
        for position, (item, split) in enumerate(sequence):
            if split == "test":
                histories.append([earlier for earlier, _ in sequence[:position]])
                targets.append(item)
    return histories, targets


def test_top_k_excludes_and_breaks_ties_by_catalog_order():
    scores = torch.tensor([[0.5, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_k(scores, ["a", "b", "c", "d"], [["b"], []], 3) == [["c", "d", "a"], ["a", "b", "c"]]
    assert top_k(scores, ["a", "b", "c", "d"], [["a", "b", "c"], []], 9) == [["d"], ["a", "b", "c", "d"]]


def test_sasrec_learns_a_sequential_rule_that_popularity_cannot(tmp_path):
    data = _cyclic_world(tmp_path)
    model = train_sasrec(data, SMALL, 0, progress=False)
    histories, targets = _test_targets(data)
    top1 = [ranked[0] for ranked in model.rank(histories, 1)]
    assert sum(t == r for t, r in zip(targets, top1)) / len(targets) >= 0.9
    assert model.info["best_valid_ndcg@10"] > model.history[0]["valid_ndcg@10"]
    assert model.info["best_valid_hr@10"] >= 0.9
    # excluded items never come back, even when they score best
    ranked = model.rank(histories, 3, [[t] for t in targets])
    assert all(t not in r and len(r) == 3 for t, r in zip(targets, ranked))


def test_sasrec_is_deterministic_under_the_seed_and_reads_only_the_last_max_length_items(tmp_path):
    data = _cyclic_world(tmp_path, users=12)
    config = SMALL.model_copy(update={"epochs": 3})
    first, second = (train_sasrec(data, config, 7, progress=False) for _ in range(2))
    histories, _ = _test_targets(data)
    assert torch.equal(first.scores(histories), second.scores(histories))
    long = ["i0", "i1"] * 10
    assert torch.equal(first.scores([long]), first.scores([long[-config.max_length:]]))
    assert torch.equal(first.scores([["unknown", "i3"]]), first.scores([["i3"]]))


def test_sasrec_refuses_data_without_sequences(tmp_path):
    data = _cyclic_world(tmp_path, users=4, length=3)  # leave-one-out leaves one training item per user
    with pytest.raises(LLMRecError, match="two training interactions"):
        train_sasrec(data, SMALL, 0, progress=False)


def test_sasrec_config_checks_heads():
    with pytest.raises(ValueError, match="must divide dim"):
        SASRecConfig(dim=10, num_heads=3)


def test_bpr_mf_ranking_is_the_score_order_without_excluded_items():
    data = load_data(DataConfig(), 0)
    model = train_cf(data, CFConfig(positives="all", epochs=2, dim=8), 0, progress=False)
    users, excluded = model.user_ids[:3], [[], [model.item_ids[0], model.item_ids[5]], []]
    for user, banned, row in zip(users, excluded, model.rank(users, 5, excluded)):
        order = torch.argsort(model.score(user, model.item_ids), descending=True, stable=True).tolist()
        assert row == [model.item_ids[j] for j in order if model.item_ids[j] not in banned][:5]


def test_trained_baselines_in_a_recipe_are_checked_at_load(tmp_path):
    with pytest.raises(LLMRecError, match=r"eval.baseline_args.sasrec.*dim"):
        load_recipe("recipes/quickstart.yaml", ["eval.baselines=[popularity, sasrec]",
                                                "eval.baseline_args={sasrec: {dim: 0}}"])
    with pytest.raises(LLMRecError, match="eval.baselines does not list"):
        load_recipe("recipes/quickstart.yaml", ["eval.baseline_args={bpr_mf: {dim: 8}}"])
    with pytest.raises(LLMRecError, match="not a trained baseline"):
        load_recipe("recipes/quickstart.yaml", ["eval.baseline_args={pop: {}}"])
    recipe = load_recipe("recipes/quickstart.yaml", ["eval.baselines=[bpr_mf, sasrec]",
                                                     "eval.baseline_args={sasrec: {dim: 8}}"])
    assert recipe.eval.baselines == ["bpr_mf", "sasrec"]
