"""Text classification by label-word scoring: the offline generators, the GLUE loader's row mapping (on a stand-in
for `datasets.load_dataset`), label-word checks, scoring and metrics, recipes end to end, and configuration
errors."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from conftest import small_recipe, write_recipe
from datasets import Dataset, DatasetDict

from llmrec.answers import prompt_answer_logits
from llmrec.data import ClassificationTaskConfig, classification_examples, classification_tokenizer_texts
from llmrec.data.classification import NEGATIVE, POSITIVE
from llmrec.errors import LLMRecError
from llmrec.eval.classification import accuracy, label_token_ids, majority_class, predict
from llmrec.models.tiny import train_tokenizer

SENTIMENT = ClassificationTaskConfig(task="sentiment", train_size=60, valid_size=10, test_size=41)
TOPIC = ClassificationTaskConfig(task="topic", train_size=60, valid_size=10, test_size=41)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(classification_tokenizer_texts(SENTIMENT, 0) * 5, 400)


# --- data ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SENTIMENT, TOPIC], ids=["sentiment", "topic"])
def test_generated_splits_are_deterministic_balanced_and_disjoint(config):
    splits = {split: classification_examples(config, split, seed=3) for split in ("train", "valid", "test")}
    assert splits["train"].to_dict() == classification_examples(config, "train", seed=3).to_dict()
    assert splits["train"]["prompt"] != classification_examples(config, "train", seed=4)["prompt"]
    for split, size in (("train", 60), ("valid", 10), ("test", 41)):
        counts = Counter(splits[split]["label"])
        assert sum(counts.values()) == size and set(counts) == set(range(config.num_classes))
        assert max(counts.values()) - min(counts.values()) <= 1
    row = splits["train"][0]
    assert row["prompt"].startswith(config.prompt_template.split("{text}")[0])
    assert row["completion"] == config.label_words[row["label"]]
    prompts = [set(rows["prompt"]) for rows in splits.values()]
    assert sum(map(len, prompts)) == len(set.union(*prompts)) == 111


def test_no_single_word_decides_the_sentiment():
    rows = classification_examples(SENTIMENT.model_copy(update={"train_size": 400}), "train", seed=0)
    words = [row.replace(".", " ").replace(",", " ").split() for row in rows["prompt"]]
    lexicon = [int(sum(w in POSITIVE for w in ws) >= sum(w in NEGATIVE for w in ws)) for ws in words]
    assert accuracy(rows["label"], lexicon) < 0.7  # counting polar words is far from enough
    assert any(w in ("not", "never", "hardly") for ws in words for w in ws)


def test_glue_rows_come_from_datasets_with_the_validation_split_as_test(monkeypatch):
    official = DatasetDict({
        "train": Dataset.from_dict({"sentence1": [f"premise {k}" for k in range(30)],
                                    "sentence2": [f"hypothesis {k}" for k in range(30)],
                                    "label": [k % 2 for k in range(30)]}),
        "validation": Dataset.from_dict({"sentence1": ["p"] * 8, "sentence2": ["h"] * 8, "label": [0, 1] * 4}),
    })
    calls = []
    monkeypatch.setattr("datasets.load_dataset", lambda path, name: calls.append((path, name)) or official)
    config = ClassificationTaskConfig(task="glue", glue_task="rte", train_size=None, valid_size=5, test_size=6)
    train, valid, test = (classification_examples(config, split, seed=0) for split in ("train", "valid", "test"))
    assert calls[0] == ("nyu-mll/glue", "rte") and (len(train), len(valid), len(test)) == (25, 5, 6)
    assert not set(train["prompt"]) & set(valid["prompt"])
    assert train[0]["prompt"].startswith("premise ") and "\nQuestion: hypothesis " in train[0]["prompt"]
    assert {row["completion"] for row in train} == {" true", " false"}

    def offline(path, name):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(LLMRecError,
                       match=r"could not load cb \(aps/super_glue[\s\S]*offline[\s\S]*task: sentiment") as caught:
        classification_examples(config.model_copy(update={"glue_task": "cb", "label_words": [" a", " b", " c"],
                                                          "prompt_template": "{text} {text2}"}), "train", seed=0)
    assert caught.value.place == "data.classification.glue_task"


# --- label words, scoring, metrics -----------------------------------------------------------------------------------


def test_label_words_must_start_with_distinct_tokens(tokenizer):
    negative, positive = label_token_ids(tokenizer, SENTIMENT.label_words)
    assert negative != positive
    with pytest.raises(LLMRecError, match="must start with different tokens") as caught:
        label_token_ids(tokenizer, [" good film", " good show"])
    assert caught.value.place == "data.classification.label_words"


@pytest.mark.parametrize("method", ["ept", "prompt_tuning"])
def test_a_left_padded_batch_scores_like_one_prompt_at_a_time(tokenizer, base, method):
    from llmrec.adapters import get_adapter

    args = {"ept": {"num_virtual_tokens": 3, "r": 2, "max_length": 64, "fusion_dim": 2, "num_spaces": 2,
                    "projection_rank": 2},
            "prompt_tuning": {"num_virtual_tokens": 3}}[method]
    torch.manual_seed(0)
    model = get_adapter(method).attach(copy.deepcopy(base), args)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.2)  # off the zero initialisations, as after training
    rows = classification_examples(SENTIMENT, "test", seed=0).select(range(12))
    ids = label_token_ids(tokenizer, SENTIMENT.label_words)
    together = prompt_answer_logits(model, tokenizer, rows, 12, ids)
    alone = prompt_answer_logits(model, tokenizer, rows, 1, ids)
    assert len(set(map(len, tokenizer(list(rows["prompt"]))["input_ids"]))) > 1  # the batch is padded
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_accuracy_and_the_majority_baseline_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0], [4.0, 4.0, 0.0], [0.0, 0.0, 0.1]])
    assert predict(logits) == [0, 1, 2, 0, 2]  # a tie goes to the first label word
    assert accuracy([0, 1, 1, 0, 2], predict(logits)) == pytest.approx(0.8)
    assert majority_class([2, 1, 1, 2, 0]) == 1 and majority_class([2, 2, 0]) == 2
    assert accuracy([1, 1, 0, 1], [majority_class([1, 0, 1])] * 4) == pytest.approx(0.75)


# --- recipes ---------------------------------------------------------------------------------------------------------


def classification_recipe(tmp_path, name, adapter=None, **sections):
    raw = small_recipe(tmp_path, name, **({"adapter": adapter} if adapter else {}))
    raw["data"]["classification"] = {"task": "sentiment", "train_size": 48, "valid_size": 8, "test_size": 24}
    raw["stages"][0]["args"].update(max_steps=4, save_steps=4)
    raw["eval"] = {"task": "classification", "batch_size": 16}
    raw.update(sections)
    return write_recipe(tmp_path / f"{name}.yaml", raw)


@pytest.mark.parametrize(
    "adapter",
    [None, {"method": "ept", "args": {"num_virtual_tokens": 4, "r": 4, "max_length": 48, "prompt_learning_rate": 3e-2,
                                      "low_rank_learning_rate": 3e-3}}],
    ids=["lora", "ept"],
)
def test_a_classification_recipe_trains_and_reports_accuracy(tmp_path, adapter, capsys):
    from llmrec.recipe import load_recipe
    from llmrec.run import train
    from llmrec.rundir import RunDir

    recipe = load_recipe(classification_recipe(tmp_path, "lora" if adapter is None else "ept", adapter))
    metrics = train(recipe)
    assert metrics["test/rows"] == 24 and 0 <= metrics["test/accuracy"] <= 1
    assert metrics["baseline/majority/test/accuracy"] == 0.5 and metrics["train/stage0-sft/global_step"] == 4
    assert "test sentiment classification: 24 rows, 2 classes" in capsys.readouterr().out
    run = RunDir(recipe.run_dir)
    predictions = [json.loads(line) for line in (run.predictions / "test.jsonl").read_text().splitlines()]
    assert len(predictions) == 24 and set(predictions[0]) == {"row", "label", "prediction", "probabilities"}
    assert sum(p["prediction"] == p["label"] for p in predictions) / 24 == metrics["test/accuracy"]
    card = run.card.read_text()
    assert "majority-class baseline" in card and "synthetic sentiment task" in card
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(run.base)  # trained on the task's rows: one token per label word
    assert [len(saved(word, add_special_tokens=False)["input_ids"]) for word in (" negative", " positive")] == [1, 1]


def test_label_words_sharing_a_first_token_stop_the_run_before_training(tmp_path):
    from llmrec.recipe import load_recipe
    from llmrec.run import train

    recipe = load_recipe(classification_recipe(tmp_path, "same"),
                         ['data.classification.label_words=[" positively bad", " positively good"]'])
    with pytest.raises(LLMRecError, match="must start with different tokens") as caught:
        train(recipe)
    assert caught.value.place == "data.classification.label_words"
    assert not list(recipe.run_dir.glob("checkpoints/*/checkpoint-*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.classification=null"],
         r"bad.yaml:\d+: eval.task: the classification evaluation needs a data.classification"),
        (["eval.task=ranking"], r"eval.task: with data.classification, trainer sft trains on classification rows"),
        (['data.classification.prompt_template="Review: {review}"'],
         r"prompt_template: prompt_template must contain \{text\}"),
        (['data.classification.label_words=[" no", " yes", " maybe"]'],
         r"data.classification: label_words must have one word per class: sentiment has 2, not 3"),
        (["data.classification.task=glue"], r"data.classification: task: glue needs glue_task"),
        (["eval.splits=[ood_temporal]", "data.shifts=[{kind: temporal}]"],
         r"eval.splits: a classification task has test"),
    ],
    ids=["no-task", "ranking-eval", "template", "label-count", "glue-task", "ood-split"],
)
def test_bad_classification_recipes_are_refused_at_load_time(tmp_path, overrides, message):
    from llmrec.recipe import load_recipe

    with pytest.raises(LLMRecError, match=message):
        load_recipe(classification_recipe(tmp_path, "bad"), overrides)
