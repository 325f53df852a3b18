"""Behaviour data for AlignXplore+: the persona world, pairs from rated interactions, JSON Lines, and the splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import ML100K, needs_ml100k
from pydantic import ValidationError

from llmrec.data import DataConfig, RecData, load_data
from llmrec.data.behaviours import (
    DIMENSIONS,
    Behaviour,
    BehaviourDataConfig,
    UserBehaviours,
    describe_persona,
    from_recdata,
    load_behaviours,
    load_jsonl,
    persona_world,
    user_split,
)
from llmrec.errors import LLMRecError

ATTRIBUTE_WORDS = {value for values in DIMENSIONS.values() for value in values}
# what a word-matching judge may match: the values and the parts of hyphenated ones ("slow-burning": slow, burning)
ATTRIBUTE_TOKENS = ATTRIBUTE_WORDS | {part for value in ATTRIBUTE_WORDS for part in value.split("-")}


def option_words(option: str) -> list[str]:
    """The attribute words in an option's last parentheses."""
    return [w.strip() for w in option[option.rfind("(") + 1:-1].split(",")]


def utility(option: str, preferences: dict[str, float]) -> float:
    return sum(preferences.get(word, 0.0) for word in option_words(option))


@pytest.fixture(scope="module")
def personas() -> list[UserBehaviours]:
    return persona_world(BehaviourDataConfig(), seed=0)


# persona world


def test_persona_world_is_deterministic_per_seed(personas):
    assert persona_world(BehaviourDataConfig(), seed=0) == personas
    assert persona_world(BehaviourDataConfig(), seed=1) != personas


def test_persona_world_shape_and_option_texts(personas):
    config = BehaviourDataConfig()
    assert len(personas) == config.num_users
    assert len({user.user_id for user in personas}) == len(personas)
    for user in personas:
        assert len(user.behaviours) == config.behaviours_per_user
        liked = [v for v, w in user.preferences.items() if w > 0]
        disliked = [v for v, w in user.preferences.items() if w < 0]
        assert len(liked) == config.liked_per_persona and len(disliked) == config.disliked_per_persona
        pairs = [frozenset((b.chosen, b.rejected)) for b in user.behaviours]
        assert len(set(pairs)) == len(pairs)  # no question repeats evidence
        for behaviour in user.behaviours:
            assert re.fullmatch(r"\w.*\bmovie\b.*\?", behaviour.query)
            for option in (behaviour.chosen, behaviour.rejected):
                assert re.fullmatch(r"[A-Z]\w+ [A-Z]\w+ \([^()]+\)", option)
                words = option_words(option)
                assert len(words) == config.attributes_per_item and set(words) <= ATTRIBUTE_WORDS
                assert words[0] in DIMENSIONS["genre"]
                title_words = option[: option.index(" (")].lower().split()
                assert not set(title_words) & ATTRIBUTE_TOKENS  # a matched word is always an attribute
            assert utility(behaviour.chosen, user.preferences) != utility(behaviour.rejected, user.preferences)


def test_chosen_has_higher_utility_except_noise(personas):
    for noise, world in ((0.1, personas), (0.3, persona_world(BehaviourDataConfig(noise=0.3), seed=0))):
        agree = [utility(b.chosen, u.preferences) > utility(b.rejected, u.preferences)
                 for u in world for b in u.behaviours]
        assert abs(sum(agree) / len(agree) - (1 - noise)) < 0.03


def test_persona_world_options():
    config = BehaviourDataConfig(num_users=5, attributes_per_item=2, liked_per_persona=1, disliked_per_persona=3,
                                 domain="book", max_users=3)
    users = persona_world(config, seed=4)
    assert len(users) == 3
    for user in users:
        assert sorted(user.preferences.values()) == [-1.0, -1.0, -1.0, 1.0]
        assert all("book" in b.query and len(option_words(b.chosen)) == 2 for b in user.behaviours)
    assert load_behaviours(config, seed=4) == users


def test_parts():
    behaviours = [Behaviour(f"q{k}", f"a{k}", f"b{k}") for k in range(16)]
    user = UserBehaviours("u", behaviours)
    first, second, third = user.parts()
    assert (len(first), len(second), len(third)) == (8, 4, 4)
    assert first + second + third == behaviours
    assert [len(p) for p in UserBehaviours("u", behaviours[:3]).parts()] == [1, 1, 1]
    assert [len(p) for p in UserBehaviours("u", behaviours[:6]).parts()] == [3, 2, 1]
    with pytest.raises(ValueError, match="at least 3"):
        UserBehaviours("u", behaviours[:2]).parts()
    with pytest.raises(ValueError, match="sum to 1"):
        user.parts((0.5, 0.5, 0.5))


def test_describe_persona_names_every_value(personas):
    assert describe_persona({"comedy": 1.0, "fast-paced": 1.0, "horror": -1.0, "slow-burning": -1.0}) == (
        "Likes comedy, fast-paced. Dislikes horror, slow-burning.")
    for user in personas[:20]:
        summary = describe_persona(user.preferences)
        likes, _, dislikes = summary.partition("Dislikes")
        for value, weight in user.preferences.items():
            assert value in (likes if weight > 0 else dislikes)


def test_config_checks():
    with pytest.raises(ValidationError, match="sum to 1"):
        BehaviourDataConfig(fractions=(0.5, 0.3, 0.3))
    with pytest.raises(ValidationError, match="positive"):
        BehaviourDataConfig(fractions=(1.0, 0.0, 0.0))
    with pytest.raises(ValidationError, match="needs path"):
        BehaviourDataConfig(source="jsonl")
    with pytest.raises(ValidationError, match="min_behaviours"):
        BehaviourDataConfig(behaviours_per_user=4)
    with pytest.raises(ValidationError, match="extra"):
        BehaviourDataConfig(num_user=3)


# recommendation data


def rated_data(ratings: bool = True) -> RecData:
    """u1 rates m0..m11 in time order (8 high, lows m1, m3, m7); u2 rates m0..m2 (2 pairs: too few).
    m0..m5 have genres, m6..m11 none."""
    rows = [("u1", f"m{k}", float(k), r) for k, r in enumerate([5, 1, 4, 2, 5, 3, 4, 1, 5, 4, 4, 5])]
    rows += [("u2", f"m{k}", float(k), r) for k, r in enumerate([5, 1, 4])]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    if not ratings:
        interactions = interactions.drop(columns="rating")
    catalog = pd.DataFrame({"item_id": [f"m{k}" for k in range(12)], "title": [f"Film {k}" for k in range(12)],
                            "genres": ["Comedy|Drama"] * 6 + [None] * 6})
    return RecData.from_frames(interactions, catalog, "rated")


def test_from_recdata_pairs_high_with_nearest_low():
    data = rated_data()
    users = from_recdata(data, BehaviourDataConfig(source="recdata"), seed=0)
    assert [u.user_id for u in users] == ["u1"]  # u2 has 2 pairs, fewer than min_behaviours
    behaviours = users[0].behaviours
    assert len(behaviours) == 8  # one per high-rated item
    u1 = data.interactions_frame.query("user_id == 'u1'")
    rating = dict(zip(u1["item_id"], u1["rating"]))
    by_option = {(f"Film {k} (comedy, drama)" if k < 6 else f"Film {k}"): f"m{k}" for k in range(12)}
    for b in behaviours:
        assert b.query == "Which movie would this user rather watch?"
        assert rating[by_option[b.chosen]] >= 4 and rating[by_option[b.rejected]] <= 2
    # lows m1 (t1), m3 (t3), m7 (t7): each used before any is reused; m0's nearest unused low is m1
    assert (behaviours[0].chosen, behaviours[0].rejected) == ("Film 0 (comedy, drama)", "Film 1 (comedy, drama)")
    assert sorted(by_option[b.rejected] for b in behaviours[:3]) == ["m1", "m3", "m7"]


def test_from_recdata_needs_ratings():
    with pytest.raises(LLMRecError, match="no ratings"):
        from_recdata(rated_data(ratings=False), BehaviourDataConfig(source="recdata"), seed=0)
    with pytest.raises(LLMRecError, match="needs the recommendation data"):
        load_behaviours(BehaviourDataConfig(source="recdata"), seed=0)


def test_from_synthetic_world():
    data = load_data(DataConfig.model_validate(
        {"source": {"format": "synthetic", "num_users": 40, "num_items": 40, "max_interactions": 20}}), 0)
    config = BehaviourDataConfig(source="recdata", max_users=10)
    users = load_behaviours(config, seed=0, data=data)
    assert len(users) == 10 and users == load_behaviours(config, seed=0, data=data)
    frame = data.interactions_frame
    genre = dict(zip(data.catalog_frame["item_id"], data.catalog_frame["genre"]))
    options = {f"{data.titles[item]} ({genre[item].lower()})": item for item in data.titles}
    for user in users:
        rating = dict(zip(frame.loc[frame.user_id == user.user_id, "item_id"],
                          frame.loc[frame.user_id == user.user_id, "rating"]))
        assert len(user.behaviours) >= config.min_behaviours
        for b in user.behaviours:
            assert rating[options[b.chosen]] >= 4.0 and rating[options[b.rejected]] <= 2.0


@needs_ml100k
def test_movielens_100k_behaviours():
    data = load_data(DataConfig.model_validate({"source": {"format": "recbole", "path": str(ML100K)}}), 0)
    users = from_recdata(data, BehaviourDataConfig(source="recdata"), seed=0)
    assert len(users) > 0.8 * data.num_users
    assert any("Toy Story (1995) (animation, children's, comedy)" in (b.chosen, b.rejected)
               for user in users for b in user.behaviours)
    genres = {"action", "comedy", "drama", "thriller", "romance", "sci-fi", "war", "children's", "animation"}
    behaviours = [b for user in users for b in user.behaviours]
    with_genres = [option_words(b.chosen) for b in behaviours if b.chosen.endswith(")")]
    assert len(with_genres) > 0.95 * len(behaviours) and any(set(words) & genres for words in with_genres)
    for user in users:
        parts = user.parts()
        assert all(parts) and sum(map(len, parts)) == len(user.behaviours)


# JSON Lines


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def behaviour_record(k: int) -> dict:
    return {"query": f"Which post would this user upvote? ({k})", "chosen": f"good {k}", "rejected": f"bad {k}"}


def test_load_jsonl_user_per_line(tmp_path):
    path = write_lines(tmp_path / "users.jsonl", [
        {"user_id": 7, "behaviours": [behaviour_record(k) for k in range(6)]},
        "",
        {"user_id": "short", "behaviours": [behaviour_record(k) for k in range(3)]},
        {"user_id": "b", "behaviours": [behaviour_record(k) for k in range(10)]},
    ])
    users = load_jsonl(BehaviourDataConfig(source="jsonl", path=str(path)))
    assert [u.user_id for u in users] == ["7", "b"]
    assert users[0].behaviours[2] == Behaviour("Which post would this user upvote? (2)", "good 2", "bad 2")
    assert users[1].preferences is None and len(users[1].behaviours) == 10


def test_load_jsonl_behaviour_per_line(tmp_path):
    lines = [{"user_id": user, **behaviour_record(k)} for k in range(7) for user in ("x", "y")]
    path = write_lines(tmp_path / "flat.jsonl", lines)
    config = BehaviourDataConfig(source="jsonl", path=str(path), max_users=1)
    users = load_jsonl(config)
    assert [u.user_id for u in users] == ["x", "y"]
    assert [b.chosen for b in users[1].behaviours] == [f"good {k}" for k in range(7)]  # file order
    assert len(load_behaviours(config, seed=0)) == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ({"behaviours": []}, "no 'user_id'"),
        ({"user_id": "u", "behaviours": [{"query": "q", "chosen": "c"}]}, "'rejected'"),
        ({"user_id": "u", "query": "q", "chosen": "", "rejected": "r"}, "'chosen'"),
        ({"user_id": "u", "behaviours": "none"}, "must be a list"),
    ],
)
def test_load_jsonl_reports_the_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"user_id": "a", **behaviour_record(0)}, bad])
    with pytest.raises(LLMRecError, match=message) as caught:
        load_jsonl(BehaviourDataConfig(source="jsonl", path=str(path)))
    assert caught.value.place == f"{path.resolve()}:2"


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(LLMRecError, match="file not found"):
        load_jsonl(BehaviourDataConfig(source="jsonl", path=str(tmp_path / "absent.jsonl")))


# user split


def test_user_split(personas):
    split = user_split(personas, seed=3)
    assert split == user_split(personas, seed=3) and split != user_split(personas, seed=4)
    assert [len(split[name]) for name in ("train", "valid", "test")] == [160, 20, 20]
    ids = [u.user_id for name in ("train", "valid", "test") for u in split[name]]
    assert sorted(ids) == sorted(u.user_id for u in personas)  # disjoint and complete
    small = user_split(personas[:4], seed=0)
    assert all(small.values()) and sum(map(len, small.values())) == 4
    with pytest.raises(ValueError, match="sum to 1"):
        user_split(personas, seed=0, fractions=(0.8, 0.1, 0.2))


def test_hub_source_reads_the_same_records_through_datasets(tmp_path):
    folder = tmp_path / "alignx"
    folder.mkdir()
    rows = [{"user_id": f"u{u}", "query": f"q{k}", "chosen": f"c{k}", "rejected": f"r{k}"}
            for u in range(2) for k in range(6)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    users = load_behaviours(BehaviourDataConfig(source="hub", dataset=str(folder)), seed=0)
    assert [u.user_id for u in users] == ["u0", "u1"] and len(users[0].behaviours) == 6
    assert users[1].behaviours[2] == Behaviour("q2", "c2", "r2")
    with pytest.raises(ValueError, match="dataset"):
        BehaviourDataConfig(source="hub")
