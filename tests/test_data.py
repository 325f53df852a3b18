"""Recommendation data: loaders, checks, filters, splits, the synthetic world and the next-item task."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from conftest import ML100K, REPO, needs_ml100k

from llmrec.data import DataConfig, NextItemTaskConfig, RecData, load_data, next_item_examples
from llmrec.data.filters import FilterConfig, apply_filters, k_core
from llmrec.data.recdata import RawData
from llmrec.data.splits import SplitConfig, split_interactions
from llmrec.data.synthetic import GENRES, SyntheticWorldConfig, generate_world
from llmrec.data.tasks import format_prompt
from llmrec.errors import LLMRecError
from llmrec.recipe import load_recipe


def _config(source: dict, **sections) -> DataConfig:
    return DataConfig.model_validate({"source": source, **sections})


# --- loaders ----------------------------------------------------------------------------------------------------


def test_movielens_100k_original_files(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t20\t3\t200\n1\t30\t4\t300\n2\t10\t2\t50\n")
    (tmp_path / "u.item").write_bytes(
        ("10|Toy Story (1995)|01-Jan-1995||http://x|0|0\n20|Caf\xe9 (1996)|x||y|0|1\n"
         "30|Heat (1995)|x||y|1|0\n").encode("latin-1")
    )
    data = load_data(_config({"format": "ml-100k", "path": str(tmp_path)}), 0)
    assert data.titles == {"10": "Toy Story (1995)", "20": "Café (1996)", "30": "Heat (1995)"}
    frame = data.interactions_frame
    assert list(frame[frame.user_id == "1"].item_id) == ["10", "20", "30"]
    assert list(frame[frame.user_id == "1"].split) == ["train", "valid", "test"]
    assert list(frame[frame.user_id == "2"].split) == ["train"]  # fewer than three interactions


def test_movielens_1m_files_and_a_malformed_line(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n1::3::4::978301968\n")
    (tmp_path / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n3::Am\xe9lie (2001)::Comedy\n".encode("latin-1")
    )
    data = load_data(_config({"format": "ml-1m", "path": str(tmp_path)}), 0)
    assert data.titles["3"] == "Amélie (2001)"
    # ratings.dat is ordered by time within the user, not by file order
    assert list(data.interactions_frame.item_id) == ["1", "3", "2"]
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n1::2::3\n")
    with pytest.raises(LLMRecError, match=r"ratings\.dat:2: expected 4 fields"):
        load_data(_config({"format": "ml-1m", "path": str(tmp_path)}), 0)


def test_recbole_atomic_files_build_titles_from_columns(tmp_path):
    folder = tmp_path / "mini"
    folder.mkdir()
    (folder / "mini.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t7\t4\t10\n1\t8\t5\t20\n1\t9\t5\t30\n"
    )
    (folder / "mini.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n7\tHeat\t1995\tAction\n8\tHeat\t1986\tDrama\n9\tFargo\t1996\tCrime\n"
    )
    data = load_data(_config({"format": "recbole", "path": str(folder)}), 0)
    assert data.titles == {"7": "Heat (1995)", "8": "Heat (1986)", "9": "Fargo (1996)"}
    custom = load_data(
        _config({"format": "recbole", "path": str(folder), "title_template": "{movie_title} [{class}]"}), 0
    )
    assert custom.titles["9"] == "Fargo [Crime]"
    with pytest.raises(LLMRecError, match="names column 'genre'"):
        load_data(_config({"format": "recbole", "path": str(folder), "title_template": "{genre}"}), 0)


def _amazon(tmp_path, reviews: list, meta: list):
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return _config({"format": "amazon", "reviews": str(tmp_path / "reviews.jsonl"),
                    "meta": str(tmp_path / "meta.jsonl")})


def test_amazon_reviews_jsonl(tmp_path):
    reviews = [{"user_id": "U1", "parent_asin": f"B{i}", "asin": "x", "rating": 5.0, "timestamp": 1000 + i,
                "text": "ok"} for i in range(3)]
    meta = [{"parent_asin": f"B{i}", "title": f"Gadget {i}", "main_category": "Tools"} for i in range(3)]
    data = load_data(_amazon(tmp_path, reviews, meta), 0)
    assert data.titles == {"B0": "Gadget 0", "B1": "Gadget 1", "B2": "Gadget 2"}
    assert list(data.interactions_frame.split) == ["train", "valid", "test"]


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    config = _amazon(tmp_path, [{"user_id": "U1", "parent_asin": "B0", "timestamp": 1}],
                     [{"parent_asin": "B0", "title": "A"}])
    with open(tmp_path / "reviews.jsonl", "a") as handle:
        handle.write('{"user_id": "U1", "parent_asin": "B1" "timestamp": 2}\n')
    with pytest.raises(LLMRecError) as err:
        load_data(config, 0)
    assert f"{tmp_path / 'reviews.jsonl'}:2: not valid JSON" in str(err.value)


def test_generic_tables_with_a_column_map(tmp_path):
    (pd.DataFrame({"uid": [1, 1, 1], "iid": ["a", "b", "c"], "when": [3, 1, 2], "stars": [5, 4, 3]})
     .to_parquet(tmp_path / "i.parquet"))
    (tmp_path / "c.csv").write_text("code,name\na,Alpha\nb,Beta\nc,Gamma\n")
    config = _config(
        {
            "format": "table",
            "interactions": str(tmp_path / "i.parquet"),
            "catalog": str(tmp_path / "c.csv"),
            "columns": {"user_id": "uid", "item_id": "iid", "timestamp": "when", "rating": "stars"},
            "catalog_columns": {"item_id": "code", "title": "name"},
        }
    )
    data = load_data(config, 0)
    assert list(data.interactions_frame.item_id) == ["b", "c", "a"]
    assert data.titles == {"a": "Alpha", "b": "Beta", "c": "Gamma"}
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"user_id": 1, "item_id": i, "timestamp": t}) + "\n"
                                              for i, t in zip("abc", (1, 2, 3))))
    jsonl = _config({"format": "table", "interactions": str(tmp_path / "i.jsonl"), "catalog": str(tmp_path / "c.csv"),
                     "catalog_columns": {"item_id": "code", "title": "name"}})
    assert load_data(jsonl, 0).num_items == 3


def test_missing_column_missing_file_and_unknown_items(tmp_path):
    (tmp_path / "i.csv").write_text("user,item_id,timestamp\n1,a,1\n")
    (tmp_path / "c.csv").write_text("item_id,title\na,Alpha\n")
    config = _config({"format": "table", "interactions": str(tmp_path / "i.csv"), "catalog": str(tmp_path / "c.csv")})
    with pytest.raises(LLMRecError,
                       match=r"i\.csv: column 'user_id' not found; the columns are user, item_id, timestamp"):
        load_data(config, 0)
    missing = _config({"format": "table", "interactions": str(tmp_path / "nope.csv"),
                       "catalog": str(tmp_path / "c.csv")})
    with pytest.raises(LLMRecError, match=r"data\.source\.interactions: file not found: .*nope\.csv"):
        load_data(missing, 0)
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\n1,a,1\n1,zz,2\n")
    with pytest.raises(LLMRecError, match=r"1 interactions name item ids absent from the catalog .*e\.g\. zz"):
        load_data(config, 0)
    with pytest.raises(LLMRecError, match=r"data\.source\.path: file not found: .*u\.data"):
        load_data(_config({"format": "ml-100k", "path": str(tmp_path)}), 0)


def test_non_numeric_timestamps_and_empty_titles(tmp_path):
    (tmp_path / "c.csv").write_text("item_id,title\na,Alpha\nb,\n")
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\n1,a,yesterday\n")
    config = _config({"format": "table", "interactions": str(tmp_path / "i.csv"), "catalog": str(tmp_path / "c.csv")})
    with pytest.raises(LLMRecError, match="column 'timestamp' must hold numbers, but row 1 holds 'yesterday'"):
        load_data(config, 0)
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\n1,a,1\n")
    with pytest.raises(LLMRecError, match="1 catalog items have an empty title"):
        load_data(config, 0)


def test_repeated_titles_get_their_item_id():
    raw = RawData(
        pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["1", "2", "3"], "timestamp": [1, 2, 3]}),
        pd.DataFrame({"item_id": ["1", "2", "3"], "title": ["Heat", "Heat", "Fargo"]}),
        "i", "c", "t",
    )
    assert RecData.from_raw(raw).titles == {"1": "Heat [1]", "2": "Heat [2]", "3": "Fargo"}


@needs_ml100k
def test_the_shared_movielens_100k():
    data = load_data(_config({"format": "recbole", "path": str(ML100K)}), 0)
    assert (data.num_users, data.num_items, len(data.interactions_frame)) == (943, 1682, 100000)
    assert data.titles["1"] == "Toy Story (1995)"
    assert len(set(data.titles.values())) == 1682


def _no_timestamp_tables(tmp_path) -> dict:
    """Two users interleaved in the file, item ids out of order, no timestamp and no rating column."""
    rows = [("1", "c"), ("2", "e"), ("1", "a"), ("2", "d"), ("1", "b"), ("2", "a"), ("1", "e"), ("1", "d")]
    (tmp_path / "i.csv").write_text("userId,movieId\n" + "".join(f"{u},{i}\n" for u, i in rows))
    (tmp_path / "c.csv").write_text("movieId,name\n" + "".join(f"{i},Film {i.upper()}\n" for i in "abcde"))
    return {"format": "table", "interactions": str(tmp_path / "i.csv"), "catalog": str(tmp_path / "c.csv"),
            "columns": {"user_id": "userId", "item_id": "movieId"},
            "catalog_columns": {"item_id": "movieId", "title": "name"}}


def test_table_without_a_timestamp_keeps_file_order(tmp_path):
    source = _no_timestamp_tables(tmp_path)
    frame = load_data(_config(source), 0).interactions_frame
    assert "rating" not in frame.columns
    one, two = frame[frame.user_id == "1"], frame[frame.user_id == "2"]
    assert list(one.item_id) == ["c", "a", "b", "e", "d"] and list(two.item_id) == ["e", "d", "a"]
    assert list(one.split) == ["train", "train", "train", "valid", "test"]  # the user's last row is the test item
    assert list(two.split) == ["train", "valid", "test"]
    temporal = load_data(_config(source, split={"method": "temporal", "test_fraction": 0.4, "valid_fraction": 0.2}), 0)
    one = temporal.interactions_frame[temporal.interactions_frame.user_id == "1"]
    assert list(one.item_id) == ["c", "a", "b", "e", "d"]
    assert list(one.split) == ["train", "train", "valid", "test", "test"]


def test_table_column_map_goes_from_llmrec_name_to_file_column(tmp_path):
    source = _no_timestamp_tables(tmp_path)
    assert load_data(_config(source), 0).titles == {i: f"Film {i.upper()}" for i in "abcde"}
    backwards = {**source, "columns": {"userId": "user_id", "movieId": "item_id"}}
    with pytest.raises(LLMRecError) as err:
        load_data(_config(backwards), 0)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'i.csv'}: column 'user_id' (mapped in data.source.columns) not found")
    assert "the columns are userId, movieId" in message and "\n" not in message


def test_table_missing_required_column_names_file_column_and_the_map(tmp_path):
    source = {**_no_timestamp_tables(tmp_path), "columns": {"user_id": "userId"}}
    with pytest.raises(LLMRecError) as err:
        load_data(_config(source), 0)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'i.csv'}: column 'item_id' not found; the columns are user_id, movieId.")
    assert "data.source.columns (llmrec name -> file column" in message and "\n" not in message
    source = {**_no_timestamp_tables(tmp_path), "catalog_columns": {"item_id": "movieId"}}
    with pytest.raises(LLMRecError, match=r"c\.csv: column 'title' not found.*data\.source\.catalog_columns"):
        load_data(_config(source), 0)


def test_table_environment_column_is_read_as_integers(tmp_path):
    rows = [(u, i, u % 2) for u in range(6) for i in "abcde"]
    (tmp_path / "i.csv").write_text("user_id,item_id,env\n" + "".join(f"{u},{i},{e}\n" for u, i, e in rows))
    (tmp_path / "c.csv").write_text("item_id,title\n" + "".join(f"{i},Film {i}\n" for i in "abcde"))
    source = {"format": "table", "interactions": str(tmp_path / "i.csv"), "catalog": str(tmp_path / "c.csv"),
              "columns": {"environment": "env"}}
    data = load_data(_config(source, shifts=[{"kind": "environment", "ood_environments": [1]}]), 0)
    frame = data.interactions_frame
    assert set(frame[frame.environment == 1].user_id) == {"1", "3", "5"}
    assert "test" not in set(frame[frame.environment == 1].split)  # held out, never split for training
    (tmp_path / "i.csv").write_text("user_id,item_id,env\n0,a,0\n0,b,high\n")
    with pytest.raises(LLMRecError, match=r"i\.csv: column 'environment' must hold integers, but row 2 holds 'high'"):
        load_data(_config(source), 0)


def test_the_bundled_table_recipe_loads(monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths are relative to the working directory, the repository root
    recipe = load_recipe(REPO / "recipes" / "table" / "tiny.yaml", instantiate=False)
    assert recipe.data.source.format == "table" and "timestamp" not in recipe.data.source.columns
    data = load_data(recipe.data, recipe.run.seed)
    assert (data.num_users, data.num_items) == (8, 30)
    frame = data.interactions_frame
    assert (frame.split == "test").sum() == 8 and set(frame.columns) >= {"rating", "timestamp"}
    last_rows = pd.read_csv(REPO / "recipes" / "table" / "data" / "ratings.csv", dtype=str).groupby("userId").tail(1)
    tests = frame[frame.split == "test"]
    assert dict(zip(tests.user_id, tests.item_id)) == dict(zip(last_rows.userId, last_rows.movieId))


# --- filters and splits ----------------------------------------------------------------------------------------


def _frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])


def test_k_core_leaves_every_user_and_item_with_k_interactions():
    interactions, _ = generate_world(SyntheticWorldConfig(format="synthetic", num_users=80, num_items=60,
                                                          min_interactions=3, max_interactions=8), 3)
    core = k_core(interactions, 5)
    assert len(core) < len(interactions)
    assert core.groupby("user_id").size().min() >= 5 and core.groupby("item_id").size().min() >= 5


def test_rating_threshold_and_an_empty_result():
    frame = _frame([("u", "a", 1, 5), ("u", "b", 2, 2), ("v", "a", 3, 4)])
    kept = apply_filters(frame, FilterConfig(min_rating=4))
    assert list(kept.item_id) == ["a", "a"]
    with pytest.raises(LLMRecError) as err:
        apply_filters(frame, FilterConfig(min_rating=6))
    assert err.value.place == "data.filters.min_rating" and "(there were 3 before)" in str(err.value)


def test_user_genres_keeps_the_users_of_a_dominant_genre():
    catalog = pd.DataFrame({"item_id": ["a", "b", "c", "d", "e"], "title": list("ABCDE"),
                            "class": ["Comedy Drama", "Comedy", "Drama", "Action Drama", "Western"]})
    # u: comedy 2, drama 2 (tie -> comedy, first alphabetically); v: drama 3, action 1; w: action 1, drama 1
    frame = _frame([("u", "a", 1, 5), ("u", "b", 2, 4), ("v", "c", 1, 5), ("v", "d", 2, 5), ("v", "a", 3, 2),
                    ("w", "d", 1, 5)])
    assert set(apply_filters(frame, FilterConfig(user_genres=["COMEDY"]), catalog).user_id) == {"u"}
    assert set(apply_filters(frame, FilterConfig(user_genres=["action", "drama"]), catalog).user_id) == {"v", "w"}
    # the dominant genre is read on the interactions the earlier filters kept
    assert set(apply_filters(frame, FilterConfig(min_rating=4, user_genres=["drama"]), catalog).user_id) == {"v"}
    with pytest.raises(LLMRecError) as err:
        apply_filters(frame, FilterConfig(user_genres=["comdy"]), catalog)
    assert err.value.place == "data.filters.user_genres" and "Did you mean 'comedy'" in str(err.value)
    with pytest.raises(LLMRecError, match="has none of the columns"):
        apply_filters(frame, FilterConfig(user_genres=["comedy"]), catalog.drop(columns="class"))
    with pytest.raises(LLMRecError, match="no interactions are left"):
        apply_filters(frame, FilterConfig(user_genres=["western"]), catalog)  # nobody watched the western


def test_temporal_split_takes_each_users_latest_fraction():
    frame = _frame([("u", str(i), i, 5) for i in range(10)] + [("v", "x", 1, 5), ("v", "y", 2, 5)])
    split = split_interactions(frame, SplitConfig(method="temporal", test_fraction=0.2, valid_fraction=0.1))
    assert list(split[split.user_id == "u"].split) == ["train"] * 7 + ["valid"] + ["test"] * 2
    assert list(split[split.user_id == "v"].split) == ["train", "train"]


# --- synthetic world and task ----------------------------------------------------------------------------------


def test_synthetic_world_is_seeded_and_titles_carry_the_genre():
    config = SyntheticWorldConfig(format="synthetic", num_users=50, num_items=80)
    first, catalog = generate_world(config, 7)
    again, _ = generate_world(config, 7)
    other, _ = generate_world(config, 8)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)
    assert catalog.title.is_unique
    assert all(genre in title.split() for genre, title in zip(catalog.genre, catalog.title))
    # users stick to their genres: consecutive items share a genre far more often than chance (1 / 8)
    genre = dict(zip(catalog.item_id, catalog.genre))
    same = [genre[a] == genre[b] for _, g in first.groupby("user_id") for a, b in zip(g.item_id, g.item_id[1:])]
    assert sum(same) / len(same) > 0.5


def test_environments_change_exposure_to_popular_items():
    config = SyntheticWorldConfig(format="synthetic", num_users=300, num_items=100, exposure_bias=[2.0, 0.0])
    interactions, catalog = generate_world(config, 0)
    top = set(catalog.nlargest(10, "popularity").item_id)
    share = interactions.assign(top=interactions.item_id.isin(top)).groupby("environment").top.mean()
    assert share[0] > 2 * share[1]


def test_next_item_examples_use_only_earlier_items():
    raw = RawData(
        pd.DataFrame({"user_id": ["u"] * 5, "item_id": list("abcde"), "timestamp": range(5)}),
        pd.DataFrame({"item_id": list("abcde"), "title": ["A", "B", "C", "D", "E"]}),
        "i", "c", "t",
    )
    data = RecData.from_raw(raw)
    data = RecData.from_frames(split_interactions(data.interactions_frame, SplitConfig()), data.catalog_frame, "t")
    task = NextItemTaskConfig(history_length=2)
    train = next_item_examples(data, "train", task)
    assert train["completion"] == ["B", "C"]
    assert train["history"] == [["a"], ["a", "b"]]
    test = next_item_examples(data, "test", task)
    assert test["item_id"] == ["e"] and test["history"] == [["a", "b", "c", "d"]]
    assert test["prompt"][0] == task.prompt_template.format(history="C\nD")  # the last two, oldest first
    capped = next_item_examples(data, "train", NextItemTaskConfig(max_examples_per_user=1))
    assert capped["completion"] == ["C"]


def test_prompt_template_must_hold_history_once():
    with pytest.raises(ValueError, match="exactly once"):
        NextItemTaskConfig(prompt_template="no placeholder")
    task = NextItemTaskConfig(prompt_template="Seen: {history}\nNext:\n", history_item_template="{item_id}={title}",
                              history_separator="; ")
    assert format_prompt(task, ["1", "2"], {"1": "A", "2": "B"}) == "Seen: 1=A; 2=B\nNext:\n"
    assert task.completion_anchor == "\nNext:\n"


def test_default_world_through_load_data():
    data = load_data(DataConfig(), 0)
    stats = data.stats()
    assert stats["users"] == 400 and stats["items"] == 240
    assert stats["test_interactions"] == stats["valid_interactions"] == 400
    counts = Counter(data.interactions_frame.split)
    assert counts["train"] == stats["interactions"] - 800
    assert set(data.catalog_frame.genre) <= set(GENRES)


# --- preference rows and shifts --------------------------------------------------------------------------------


def _world(**source):
    return load_data(_config({"format": "synthetic", "num_users": 80, "num_items": 60, "max_interactions": 15,
                              **source}), 0)


def test_negatives_avoid_positives_and_follow_the_sampler():
    from llmrec.data import PreferenceDataConfig, pairwise_rows, preference_examples

    data = _world()
    task = NextItemTaskConfig()
    titles = data.titles
    positives = {}
    frame = data.interactions_frame
    for user, item in zip(frame[frame.split == "train"].user_id, frame[frame.split == "train"].item_id):
        positives.setdefault(user, set()).add(titles[item])
    rows = preference_examples(data, "train", task, PreferenceDataConfig(negatives=4), 0)
    assert len(rows) == len(next_item_examples(data, "train", task))
    for row in rows:
        assert len(row["rejected"]) == len(set(row["rejected"])) == 4
        assert row["chosen"] not in row["rejected"] and not set(row["rejected"]) & positives[row["user_id"]]
    assert rows["environment"][0] == 0

    counts = data.popularity("train")
    popular = preference_examples(data, "train", task, PreferenceDataConfig(negatives=4, sampler="popularity"), 0)
    by_title = {titles[i]: counts.get(i, 0) for i in titles}
    mean_pop = lambda dataset: sum(by_title[t] for r in dataset["rejected"] for t in r) / (4 * len(dataset))  # noqa: E731
    assert mean_pop(popular) > 1.1 * mean_pop(rows)  # popular items are also more often positives, so excluded

    ranked = sorted(titles)[:6]
    hard = preference_examples(data, "train", task,
                               PreferenceDataConfig(negatives=2, sampler="model", model_top_k=6), 0,
                               rank=lambda prompts, excluded, k: [ranked for _ in prompts])
    for row in hard:
        allowed = [titles[i] for i in ranked
                   if titles[i] != row["chosen"] and titles[i] not in positives[row["user_id"]]]
        assert set(row["rejected"]) <= set(allowed) or len(allowed) < 2
    assert len(pairwise_rows(rows.select(range(3)))) == 12

    with pytest.raises(LLMRecError, match="600 negatives per row"):
        preference_examples(data, "train", task, PreferenceDataConfig(negatives=600), 0)


def test_temporal_shift_holds_out_each_users_latest_interactions():
    data = load_data(_config({"format": "synthetic", "num_users": 50, "num_items": 60},
                             shifts=[{"kind": "temporal", "fraction": 0.2}]), 0)
    frame = data.interactions_frame
    for _, user in frame.groupby("user_id", sort=False):
        splits = list(user.split)
        n_ood = max(1, -(-len(splits) * 2 // 10))
        assert splits[-n_ood:] == ["ood_temporal"] * n_ood
        assert splits[:-n_ood][-2:] == ["valid", "test"]  # leave-one-out on what is left
    assert len(next_item_examples(data, "ood_temporal", NextItemTaskConfig())) == (frame.split == "ood_temporal").sum()


def test_environment_shift_never_trains_on_held_out_users():
    source = {"format": "synthetic", "num_users": 80, "num_items": 60, "exposure_bias": [1.0, 0.0],
              "environment_weights": [0.7, 0.3]}
    data = load_data(_config(source, shifts=[{"kind": "environment", "ood_environments": [1]}]), 0)
    frame = data.interactions_frame
    held = frame[frame.environment == 1]
    assert set(held.split) == {"context", "ood_environment"}
    assert (held.groupby("user_id").split.last() == "ood_environment").all()
    assert set(frame[frame.environment == 0].split) == {"train", "valid", "test"}
    targets = next_item_examples(data, "ood_environment", NextItemTaskConfig())
    assert len(targets) == held.user_id.nunique() and all(len(h) > 0 for h in targets["history"])
    with pytest.raises(LLMRecError, match="hold every user"):
        load_data(_config({"format": "synthetic", "num_users": 30, "num_items": 60},
                          shifts=[{"kind": "environment", "ood_environments": [0]}]), 0)


def test_popularity_shift_draws_unpopular_targets():
    from collections import Counter as C

    from llmrec.data import popularity_shift_sample
    from llmrec.data.shifts import PopularityShift

    items = [f"i{k}" for k in range(100)]
    counts = C({item: 1 + 100 * (1 - k % 2) for k, item in enumerate(items)})  # even items popular
    picked = popularity_shift_sample(items, counts, PopularityShift(kind="popularity", size=30), 0)
    assert len(picked) == len(set(picked)) == 30
    assert sum(k % 2 for k in picked) > 25  # the unpopular (odd) items dominate
