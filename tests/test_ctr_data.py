"""The CTR (Yes/No like-prediction) task builder, and the latent factors of the synthetic world."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from llmrec.data import CTRTaskConfig, RecData, ctr_examples, ctr_tokenizer_texts, load_data
from llmrec.data.synthetic import SyntheticWorldConfig, generate_world, latent_factors
from llmrec.errors import LLMRecError
from llmrec.recipe import DataConfig

# --- a hand-made world with known answers -----------------------------------------------------------------------

#            item  rating split
HAND = {
    "u": [("a", 5, "train"), ("b", 2, "train"), ("c", 4, "train"), ("d", 1, "train"), ("e", 5, "train"),
          ("f", 3, "valid"), ("g", 4, "test")],
    "v": [("a", 1, "train"), ("b", 5, "valid"), ("c", 2, "test")],
    # a valid interaction before a train one (as a temporal hold-out can leave): train histories must skip it
    "w": [("a", 5, "train"), ("b", 5, "valid"), ("c", 2, "train"), ("d", 4, "train")],
}


def _hand_data(with_rating: bool = True) -> RecData:
    rows = [(user, item, float(t), float(r), s) for user, seq in HAND.items() for t, (item, r, s) in enumerate(seq)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "split"])
    if not with_rating:
        frame = frame.drop(columns="rating")
    catalog = pd.DataFrame({"item_id": list("abcdefg"), "title": list("ABCDEFG")})
    return RecData.from_frames(frame, catalog, "hand")


def _prompt(config: CTRTaskConfig, history: str, target: str) -> str:
    return config.prompt_template.format(history=history, target=target)


def test_hand_made_rows_labels_and_histories():
    data = _hand_data()
    config = CTRTaskConfig(history_length=2, balance=False)
    train = ctr_examples(data, "train", config, 0)
    assert list(zip(train["user_id"], train["item_id"], train["label"])) == [
        ("u", "b", 0), ("u", "c", 1), ("u", "d", 0), ("u", "e", 1), ("w", "c", 0), ("w", "d", 1),
    ]  # the first interaction of each user has no earlier like (min_history 1); v's only train item is its first
    assert train["completion"] == [" No", " Yes", " No", " Yes", " No", " Yes"]
    # latest two likes, oldest first; u's d (rated 1) and w's valid b are not shown
    assert train["prompt"][3] == _prompt(config, "A\nC", "E")
    assert train["prompt"][5] == _prompt(config, "A", "D")

    test = ctr_examples(data, "test", config, 0)
    assert list(zip(test["user_id"], test["item_id"], test["label"])) == [("u", "g", 1), ("v", "c", 0)]
    # evaluation histories hold earlier likes of any split: v's liked valid item b
    assert test["prompt"] == [_prompt(config, "C\nE", "G"), _prompt(config, "B", "C")]
    valid = ctr_examples(data, "valid", config, 0)
    assert list(zip(valid["user_id"], valid["item_id"])) == [("u", "f"), ("w", "b")]  # v's b has no earlier like
    cold = ctr_examples(data, "valid", CTRTaskConfig(min_history=0), 0)
    assert ("v", "b") in list(zip(cold["user_id"], cold["item_id"]))
    assert cold["prompt"][cold["item_id"].index("b")] == _prompt(config, "", "B")


def test_threshold_answers_and_an_empty_split():
    data = _hand_data()
    config = CTRTaskConfig(like_threshold=5, balance=False, yes_answer=" yes", no_answer=" no")
    strict = ctr_examples(data, "train", config, 0)
    # only ratings of 5 are likes: u's c (4) is a No, and the history shows only A until E
    assert dict(zip(strict["item_id"][:4], strict["label"][:4])) == {"b": 0, "c": 0, "d": 0, "e": 1}
    assert strict["completion"][3] == " yes" and strict["completion"][0] == " no"
    empty = ctr_examples(data, "ood_temporal", CTRTaskConfig(), 0)
    assert len(empty) == 0 and set(empty.column_names) == {"prompt", "completion", "label", "user_id", "item_id"}


# --- on a synthetic world ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> RecData:
    source = {"format": "synthetic", "num_users": 80, "num_items": 60, "max_interactions": 20}
    return load_data(DataConfig.model_validate({"source": source}), 0)


def _earlier_likes(data: RecData, threshold: float) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """(user, item) -> (earlier liked train items, earlier liked items of any split), oldest first."""
    out = {}
    for user, group in data.interactions_frame.groupby("user_id", sort=False):
        train, every = [], []
        for item, rating, split in zip(group.item_id, group.rating, group.split):
            out[(user, item)] = (list(train), list(every))
            if rating >= threshold:
                every.append(item)
                train += [item] if split == "train" else []
    return out


def test_labels_follow_the_threshold_and_histories_the_likes(world):
    config = CTRTaskConfig(history_length=3, like_threshold=3.5, balance=False)
    frame = world.interactions_frame
    rating = dict(zip(zip(frame.user_id, frame.item_id), frame.rating))
    item_of = {title: item for item, title in world.titles.items()}
    earlier = _earlier_likes(world, 3.5)
    head, tail = config.prompt_template.split("{history}")
    for split in ("train", "test"):
        rows = ctr_examples(world, split, config, 0)
        assert len(rows) > 50
        for row in rows:
            key = (row["user_id"], row["item_id"])
            assert row["label"] == int(rating[key] >= 3.5)
            shown = row["prompt"].removeprefix(head).split(tail.split("{target}")[0])[0].split("\n")
            liked = earlier[key][0 if split == "train" else 1]
            assert [item_of[t] for t in shown] == liked[-3:]  # the latest three, oldest first
    # with min_history 0, every rated test interaction is a row
    test = ctr_examples(world, "test", CTRTaskConfig(min_history=0), 0)
    held = frame[frame.split == "test"]
    assert list(zip(test["user_id"], test["item_id"])) == list(zip(held.user_id, held.item_id))


def test_balance_evens_training_classes_only(world):
    unbalanced = ctr_examples(world, "train", CTRTaskConfig(balance=False), 0)
    counts = Counter(unbalanced["label"])
    assert counts[1] > counts[0] > 0  # synthetic ratings lean towards likes
    balanced = ctr_examples(world, "train", CTRTaskConfig(), 0)
    assert Counter(balanced["label"]) == {0: counts[0], 1: counts[0]}
    kept = set(zip(balanced["user_id"], balanced["item_id"]))
    assert kept <= set(zip(unbalanced["user_id"], unbalanced["item_id"]))
    assert [k for k in zip(unbalanced["user_id"], unbalanced["item_id"]) if k in kept] == list(
        zip(balanced["user_id"], balanced["item_id"])
    )  # data order is kept
    for split in ("valid", "test"):
        assert ctr_examples(world, split, CTRTaskConfig(), 0)["label"] == ctr_examples(
            world, split, CTRTaskConfig(balance=False), 0
        )["label"]


def test_caps_per_user_and_on_evaluation_rows(world):
    full = ctr_examples(world, "train", CTRTaskConfig(balance=False), 0).to_pandas()
    capped = ctr_examples(world, "train", CTRTaskConfig(balance=False, max_examples_per_user=2), 0).to_pandas()
    assert capped.groupby("user_id").size().max() == 2
    latest = full.groupby("user_id", sort=False).tail(2).reset_index(drop=True)
    pd.testing.assert_frame_equal(capped, latest)

    test = ctr_examples(world, "test", CTRTaskConfig(), 0)
    sample = ctr_examples(world, "test", CTRTaskConfig(max_eval_examples=20), 0)
    assert len(sample) == 20 and len(test) > 20
    pairs = list(zip(test["user_id"], test["item_id"]))
    picked = [pairs.index(p) for p in zip(sample["user_id"], sample["item_id"])]
    assert picked == sorted(picked)  # a subset, in data order
    assert len(ctr_examples(world, "test", CTRTaskConfig(max_eval_examples=10_000), 0)) == len(test)
    assert len(ctr_examples(world, "train", CTRTaskConfig(balance=False, max_eval_examples=5), 0)) == len(full)


def test_evaluation_user_sample_keeps_all_rows_of_the_sampled_users(world):
    test = ctr_examples(world, "test", CTRTaskConfig(), 0).to_pandas()
    sample = ctr_examples(world, "test", CTRTaskConfig(max_eval_users=5), 0).to_pandas()
    users = set(sample["user_id"])
    assert len(users) == 5 < test["user_id"].nunique()
    pd.testing.assert_frame_equal(sample, test[test["user_id"].isin(users)].reset_index(drop=True))
    assert set(ctr_examples(world, "test", CTRTaskConfig(max_eval_users=5), 1)["user_id"]) != users
    both = ctr_examples(world, "test", CTRTaskConfig(max_eval_users=5, max_eval_examples=4), 0)
    assert len(both) == 4 and set(both["user_id"]) <= users
    train = ctr_examples(world, "train", CTRTaskConfig(balance=False), 0)
    assert len(ctr_examples(world, "train", CTRTaskConfig(balance=False, max_eval_users=1), 0)) == len(train)


def test_rows_are_deterministic_under_the_seed(world):
    config = CTRTaskConfig(max_eval_examples=30)
    for split in ("train", "test"):
        assert ctr_examples(world, split, config, 3).to_dict() == ctr_examples(world, split, config, 3).to_dict()
        assert ctr_examples(world, split, config, 3).to_dict() != ctr_examples(world, split, config, 4).to_dict()


# --- configuration and errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctr, message",
    [
        ({"prompt_template": "Liked: {history}. Answer:"}, r"ctr\.prompt_template[\s\S]*\{target\} exactly once"),
        ({"prompt_template": "{history} {history} {target}"}, r"ctr\.prompt_template[\s\S]*\{history\} exactly once"),
        ({"prompt_template": "{history} {target} rated {rating}"}, r"ctr\.prompt_template[\s\S]*not \{rating\}"),
        ({"prompt_template": "{history} {target} {0}"}, r"ctr\.prompt_template[\s\S]*not \{0\}"),
        ({"prompt_template": "{history} {target"}, r"ctr\.prompt_template[\s\S]*not a valid format string"),
        ({"yes_answer": " Sure", "no_answer": " Sure"}, r"ctr[\s\S]*yes_answer and no_answer must differ"),
        ({"history_length": 0}, r"ctr\.history_length"),
    ],
)
def test_bad_settings_are_rejected_naming_the_field(ctr, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig.model_validate({"ctr": ctr})


def test_recipe_section_and_tokenizer_texts():
    config = DataConfig.model_validate({"ctr": {"like_threshold": 3,
                                                "prompt_template": "Fan of {history}; {target}?"}})
    assert config.ctr.like_threshold == 3.0 and DataConfig().ctr is None
    texts = ctr_tokenizer_texts(config.ctr)
    assert texts == ["Fan of title\ntitle; title? Yes", "Fan of title\ntitle; title? No"]


def test_data_without_ratings_is_refused_naming_data_ctr():
    with pytest.raises(LLMRecError) as err:
        ctr_examples(_hand_data(with_rating=False), "train", CTRTaskConfig(), 0)
    assert err.value.place == "data.ctr"
    assert "needs ratings" in err.value.message and "like_threshold" in err.value.message
    assert "ml-100k" in err.value.message and "data.source.columns" in err.value.message


def test_single_class_training_rows_name_the_threshold():
    data = _hand_data()
    for threshold in (0.0, 6.0):
        with pytest.raises(LLMRecError) as err:
            ctr_examples(data, "train", CTRTaskConfig(like_threshold=threshold, min_history=0), 0)
        assert err.value.place == "data.ctr.like_threshold"
        assert ("'Yes'" if threshold == 0 else "'No'") in err.value.message
    assert len(ctr_examples(data, "test", CTRTaskConfig(like_threshold=0.0), 0)) == 2  # evaluation rows may be


# --- latent factors of the synthetic world ----------------------------------------------------------------------


def _fingerprint(config: SyntheticWorldConfig, seed: int) -> str:
    interactions, catalog = generate_world(config, seed)
    return hashlib.sha256((interactions.to_csv(index=False) + catalog.to_csv(index=False)).encode()).hexdigest()


def test_default_world_is_unchanged_by_latent_factors():
    # computed before latent factors existed: the defaults must keep generating exactly that world
    assert (_fingerprint(SyntheticWorldConfig(), 0)
            == "576645b0d8a7c39309d6867fcbf7b06cfe4171d0d48733859e5d697dd288b18d")
    small = {"num_users": 50, "num_items": 80, "exposure_bias": [1.0, 0.0]}
    expected = "d68e5f0491094522bcd1fd27dbb72fcbd599f95dcd61e5973da088cdac557409"
    assert _fingerprint(SyntheticWorldConfig(**small), 0) == expected
    # factors that move nothing leave the world as it was: they come from their own generator
    assert _fingerprint(SyntheticWorldConfig(**small, latent_dim=8), 0) == expected


def _dots(config: SyntheticWorldConfig, interactions: pd.DataFrame) -> np.ndarray:
    users, items = latent_factors(config, 0)
    u = interactions.user_id.str[1:].astype(int).to_numpy()
    i = interactions.item_id.str[1:].astype(int).to_numpy()
    return np.einsum("ij,ij->i", users[u], items[i])


def test_latent_factors_drive_ratings_and_exposure():
    base = {"num_users": 120, "num_items": 100, "latent_dim": 8}
    hidden = SyntheticWorldConfig(**base, latent_rating_weight=1.5, genre_rating_weight=0.5)
    interactions, catalog = generate_world(hidden, 0)
    dots = _dots(hidden, interactions)
    assert 0.7 < dots.std() < 1.4  # unit-scale dot products
    assert np.corrcoef(dots, interactions.rating)[0, 1] > 0.3
    assert set(catalog.columns) == {"item_id", "title", "genre", "mood", "popularity"}  # the factors stay hidden

    plain = SyntheticWorldConfig(**base)
    plain_interactions, _ = generate_world(plain, 0)
    plain_dots = _dots(plain, plain_interactions)
    assert abs(np.corrcoef(plain_dots, plain_interactions.rating)[0, 1]) < 0.1
    # exposure by the factors: users consume the items they would rate high
    exposed = SyntheticWorldConfig(**base, latent_exposure_weight=2.0)
    assert _dots(exposed, generate_world(exposed, 0)[0]).mean() > 0.3 > plain_dots.mean()

    with pytest.raises(ValidationError, match="need latent_dim > 0"):
        SyntheticWorldConfig(latent_rating_weight=1.0)
