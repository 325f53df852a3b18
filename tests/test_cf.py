"""Collaborative filtering (MF and LightGCN trained with BPR) and the AUC / UAUC metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from llmrec.cf import CFConfig, CFModel, train_cf
from llmrec.cf import train as cf_train
from llmrec.data import DataConfig, RecData, load_data
from llmrec.errors import LLMRecError
from llmrec.eval.metrics import auc, uauc

# --- metrics ----------------------------------------------------------------------------------------------------


def test_auc_by_hand_with_ties():
    # pairs (pos, neg): 0.9>0.1, 0.9>0.5, 0.5>0.1, 0.5=0.5 (counts one half) -> 3.5 / 4
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.875)
    assert auc([True, False, False], [2.0, 1.0, 0.0]) == 1.0
    assert auc([0, 1], [2.0, 1.0]) == 0.0
    assert auc([1, 1, 0, 0], [3.0, 3.0, 3.0, 3.0]) == 0.5
    # 2 positives x 3 negatives: 1.0 beats all 3, 0.2 ties one 0.2 and beats 0.1 -> (3 + 1.5) / 6
    assert auc([1, 0, 0, 1, 0], [1.0, 0.2, 0.1, 0.2, 0.5]) == pytest.approx(4.5 / 6)


def test_auc_rejects_one_class_and_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="both classes"):
        auc([], [])
    with pytest.raises(ValueError, match="length"):
        auc([1, 0], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [0.1, math.nan])


def test_uauc_averages_users_with_both_classes_unweighted():
    users = ["a", "b", "c", "a", "b", "c", "c"]
    labels = [1, 1, 1, 0, 1, 0, 0]
    scores = [1.0, 5.0, 3.0, 2.0, 0.0, 1.0, 3.0]
    # a: positive 1.0 below negative 2.0 -> 0; b: positives only -> skipped; c: 3.0 vs {1.0, 3.0} -> 0.75
    value, counted = uauc(users, labels, scores)
    assert counted == 2
    assert value == pytest.approx((0.0 + 0.75) / 2)
    value, counted = uauc(["a", "b"], [1, 0], [0.3, 0.1])
    assert math.isnan(value) and counted == 0
    assert uauc([], [], [])[1] == 0


# --- training ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> RecData:
    return load_data(DataConfig(), 0)  # 400 users, 240 items, ratings 1-5, leave-one-out split


@pytest.fixture(scope="module")
def mf(world) -> CFModel:
    return train_cf(world, CFConfig(model="mf"), 0, progress=False)


def _like_auc(model: CFModel, data: RecData, split: str) -> float:
    rows = data.interactions_frame[data.interactions_frame["split"] == split]
    scores = model.score(list(rows["user_id"]), list(rows["item_id"])).numpy()
    return auc(rows["rating"] >= 4.0, scores)


def test_mf_learns_who_likes_what_and_beats_random(world, mf):
    # measured: valid 0.880, test 0.882 (seed 0); random tables give about 0.5
    assert mf.info["valid_metric"] == "like label"
    assert mf.info["best_valid_auc"] > 0.8
    assert _like_auc(mf, world, "test") > 0.8
    generator = torch.Generator().manual_seed(0)
    random = CFModel(
        mf.user_ids,
        mf.item_ids,
        torch.randn(mf.user_embeddings.shape, generator=generator),
        torch.randn(mf.item_embeddings.shape, generator=generator),
    )
    assert abs(_like_auc(random, world, "test") - 0.5) < 0.1
    assert _like_auc(mf, world, "test") > _like_auc(random, world, "test") + 0.25
    assert mf.history[0]["loss"] > mf.history[mf.info["best_epoch"] - 1]["loss"]


def test_early_stopping_keeps_the_best_epoch(world, mf):
    config = CFConfig(model="mf")
    aucs = [record["valid_auc"] for record in mf.history]
    best = mf.info["best_epoch"]
    assert mf.info["stopped_early"] and len(aucs) < config.epochs
    assert best == int(np.argmax(aucs)) + 1
    assert len(aucs) == best + config.patience  # stopped after `patience` epochs without improvement
    assert aucs[-1] < aucs[best - 1]  # the last epoch is worse, so keeping it would be visible
    # the returned tables are the best epoch's: they reproduce its recorded valid AUC
    assert _like_auc(mf, world, "valid") == pytest.approx(aucs[best - 1], abs=1e-6)


def test_ids_cover_every_user_and_catalog_item(world, mf):
    assert mf.user_ids == sorted(world.interactions_frame["user_id"].unique())
    assert mf.item_ids == list(world.catalog_frame["item_id"])
    assert mf.user_embeddings.dtype == torch.float32 and mf.user_embeddings.shape == (400, 64)
    assert mf.item_embeddings.shape == (len(mf.item_ids), 64)


def test_scores_are_dot_products_and_unknown_ids_are_named(mf):
    users, items = ["u0000", "u0001"], ["i0003", "i0007"]
    expected = (mf.user_embeddings[mf.user_index(users)] * mf.item_embeddings[mf.item_index(items)]).sum(-1)
    assert torch.equal(mf.score(users, items), expected)
    assert mf.score("u0000", items).shape == (2,)
    assert float(mf.score("u0001", "i0007")) == pytest.approx(float(expected[1]))
    with pytest.raises(LLMRecError, match="unknown user id 'nobody'"):
        mf.score(["u0000", "nobody"], items)
    with pytest.raises(LLMRecError, match="unknown item id 'i9999'"):
        mf.item_index(["i0003", "i9999"])
    with pytest.raises(ValueError, match="as many user ids as item ids"):
        mf.score(users, ["i0003"])


def test_lightgcn_trains_and_reloads_identically(world, tmp_path):
    model = train_cf(world, CFConfig(model="lightgcn"), 0, progress=False)
    assert model.info["best_valid_auc"] > 0.8  # measured 0.891
    assert model.config["model"] == "lightgcn"
    model.save(tmp_path / "cf")
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["cf_model.json", "cf_model.safetensors"]
    loaded = CFModel.load(tmp_path / "cf")
    assert torch.equal(loaded.user_embeddings, model.user_embeddings)
    assert torch.equal(loaded.item_embeddings, model.item_embeddings)
    assert (loaded.user_ids, loaded.item_ids) == (model.user_ids, model.item_ids)
    assert loaded.config == model.config and CFConfig.model_validate(loaded.config).model == "lightgcn"
    assert loaded.history == model.history and loaded.info == model.info
    users, items = model.user_ids[:50], model.item_ids[:50]
    assert torch.equal(loaded.score(users, items), model.score(users, items))


def test_load_names_the_folder_when_files_are_missing(tmp_path):
    with pytest.raises(LLMRecError, match="cf_model.safetensors and cf_model.json not found") as error:
        CFModel.load(tmp_path / "empty")
    assert error.value.place == str(tmp_path / "empty")


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_same_seed_same_embeddings(world, model):
    config = CFConfig(model=model, epochs=3, dim=16)
    first, second = (train_cf(world, config, 7, progress=False) for _ in range(2))
    assert torch.equal(first.user_embeddings, second.user_embeddings)
    assert torch.equal(first.item_embeddings, second.item_embeddings)
    assert first.history == second.history
    other = train_cf(world, config, 8, progress=False)
    assert not torch.equal(first.user_embeddings, other.user_embeddings)


def _without_ratings(data: RecData) -> RecData:
    return RecData.from_frames(data.interactions_frame.drop(columns="rating"), data.catalog_frame, data.name)


def test_liked_positives_need_ratings(world):
    unrated = _without_ratings(world)
    with pytest.raises(LLMRecError, match="no ratings.*positives: all") as error:
        train_cf(unrated, CFConfig(), 0, progress=False)
    assert error.value.place == "cf.positives"
    with pytest.raises(LLMRecError, match="lower like_threshold or set positives: all"):
        train_cf(world, CFConfig(like_threshold=6.0), 0, progress=False)
    # implicit feedback: valid interactions against sampled unseen items
    model = train_cf(unrated, CFConfig(positives="all", epochs=15), 0, progress=False)
    assert model.info["valid_metric"] == "sampled negatives"
    assert model.info["best_valid_auc"] > 0.75  # measured 0.87


def test_no_usable_valid_split_trains_every_epoch(world, monkeypatch):
    frame = world.interactions_frame.copy()
    frame.loc[frame["split"] == "valid", "split"] = "test"
    frame.loc[frame["user_id"] == "u0005", "split"] = "test"  # a user seen only in test
    frame.loc[frame.index[:3], "split"] = "ood_popularity"  # ignored, but its ids stay known
    data = RecData.from_frames(frame, world.catalog_frame, world.name)
    warnings = []
    monkeypatch.setattr(cf_train.logger, "warning", warnings.append)
    model = train_cf(data, CFConfig(epochs=4, patience=1), 0, progress=False)
    assert any("valid split has no usable rows" in w for w in warnings)
    assert model.info["valid_metric"] is None and model.info["epochs_run"] == 4 and model.info["best_epoch"] == 4
    assert all(record["valid_auc"] is None for record in model.history)
    assert model.score("u0005", "i0000").shape == ()  # known, untrained user: still scored
    assert model.info["users_with_positives"] < len(model.user_ids)


def test_config_ranges_are_checked():
    with pytest.raises(ValidationError):
        CFConfig(dim=0)
    with pytest.raises(ValidationError):
        CFConfig(model="svd")
    with pytest.raises(ValidationError):
        CFConfig(learning_rate=0)
    with pytest.raises(ValidationError):
        CFConfig(epoch=3)  # unknown keys are errors
