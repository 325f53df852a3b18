"""Federated instruction tuning data and metrics: the synthetic instruction world, Dolly-format JSON Lines, non-IID
partitions (Dirichlet over categories and over users' dominant genres), client splits, exact match / ROUGE-L and the
evaluation of a tiny model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from llmrec.data import DataConfig, RecData, load_data
from llmrec.data.instructions import (
    CATEGORIES,
    KINDS,
    InstructionTaskConfig,
    WorldFacts,
    client_split,
    dirichlet_partition,
    instruction_rows,
    instruction_tokenizer_texts,
    user_group_partition,
    user_groups,
)
from llmrec.data.synthetic import SyntheticWorldConfig
from llmrec.errors import LLMRecError
from llmrec.eval.instructions import (
    completion_token_ids,
    evaluate_instruction_rows,
    exact_match,
    normalise_answer,
    rouge_l,
)

SMALL = InstructionTaskConfig(examples_per_category=30)


# --- the synthetic world ------------------------------------------------------------------------------------------


def test_world_is_deterministic_per_seed_and_differs_across_seeds():
    rows = instruction_rows(SMALL, 0)
    assert rows == instruction_rows(SMALL, 0)
    other = instruction_rows(SMALL, 1)
    assert [r["prompt"] for r in rows] != [r["prompt"] for r in other]
    # the seeded facts differ too: the same open_qa question gets another answer under another seed
    answers = {r["prompt"]: r["completion"] for r in rows}
    assert any(answers.get(r["prompt"]) not in (None, r["completion"]) for r in other)


def test_world_has_every_category_and_unique_rows():
    rows = instruction_rows(SMALL, 0)
    assert Counter(r["category"] for r in rows) == dict.fromkeys(CATEGORIES, 30)
    assert len({r["id"] for r in rows}) == len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        assert row["prompt"].startswith("Instruction: ") and row["prompt"].endswith("Response:")
        assert row["completion"].startswith(" ") and 1 <= len(row["completion"].split()) <= 4
    contexts = {r["category"] for r in rows if "\nContext: " in r["prompt"]}
    assert contexts == {"closed_qa", "classification", "information_extraction", "summarization", "creative_writing"}


def test_fewer_categories_keep_the_first_categories_rows():
    three = instruction_rows(InstructionTaskConfig(categories=3, examples_per_category=30), 0)
    assert [r["category"] for r in three] == [c for c in CATEGORIES[:3] for _ in range(30)]
    assert three == instruction_rows(SMALL, 0)[:90]


def test_world_answers_follow_their_rules():
    people = WorldFacts(3).people
    for row in instruction_rows(InstructionTaskConfig(examples_per_category=60), 3):
        instruction = row["prompt"].split("\n")[0].removeprefix("Instruction: ")
        context = row["prompt"].split("Context: ")[1].split("\n")[0] if "Context: " in row["prompt"] else ""
        answer = row["completion"].strip()
        if row["category"] == "general_qa":  # "How many fruits are in ...: a, b?" / "Count the fruits among: a, b."
            kind, words = instruction.split()[2].removesuffix("s"), instruction.split(": ")[1].rstrip("?.").split(", ")
            assert int(answer) == sum(word in KINDS[kind] for word in words)
        elif row["category"] == "creative_writing" and context:
            assert answer.split() == context.split()[::-1]
        elif row["category"] in ("closed_qa", "classification", "information_extraction"):
            assert answer in context
        elif row["category"] == "open_qa":
            name = next(word.rstrip("?.") for word in instruction.split() if word.rstrip("?.") in people)
            assert answer in people[name].values()


def test_tokenizer_texts_are_prompts_with_completions():
    rows = instruction_rows(SMALL, 0)
    assert instruction_tokenizer_texts(SMALL, 0) == [r["prompt"] + r["completion"] for r in rows]


def test_config_validation():
    with pytest.raises(ValidationError, match=r"\{instruction\}"):
        InstructionTaskConfig(prompt_template="Q: {context}")
    with pytest.raises(ValidationError, match="needs a path"):
        InstructionTaskConfig(source="jsonl")
    with pytest.raises(ValidationError):
        InstructionTaskConfig(categories=9)
    with pytest.raises(ValidationError):
        InstructionTaskConfig(test_fraction=1.0)


# --- Dolly-15k JSON Lines -----------------------------------------------------------------------------------------


def _dolly(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_rows_and_a_sample_cap(tmp_path):
    records = [
        {"instruction": "Name a {braced} fruit.", "context": "", "response": "An apple.", "category": "open_qa"},
        {"instruction": "Who wrote it?", "context": "Ada wrote the note.", "response": "Ada", "category": "closed_qa"},
        {"instruction": "Sum up.", "context": None, "response": "Short.", "category": "summarization"},
    ]
    config = InstructionTaskConfig(source="jsonl", path=str(_dolly(tmp_path / "dolly.jsonl", records)))
    rows = instruction_rows(config, 0)
    assert rows[0] == {"id": "line1", "category": "open_qa",
                       "prompt": "Instruction: Name a {braced} fruit.\nResponse:", "completion": " An apple."}
    assert rows[1]["prompt"] == "Instruction: Who wrote it?\nContext: Ada wrote the note.\nResponse:"
    assert rows[2]["prompt"] == "Instruction: Sum up.\nResponse:"
    capped = instruction_rows(config.model_copy(update={"max_examples": 2}), 0)
    assert len(capped) == 2 and [r["id"] for r in capped] == sorted(r["id"] for r in capped)


def test_jsonl_missing_key_names_the_line_and_the_key(tmp_path):
    path = _dolly(tmp_path / "bad.jsonl", [
        {"instruction": "a", "context": "", "response": "b", "category": "open_qa"},
        {"instruction": "a", "context": "", "category": "open_qa"},
    ])
    with pytest.raises(LLMRecError, match="no 'response' key") as err:
        instruction_rows(InstructionTaskConfig(source="jsonl", path=str(path)), 0)
    assert err.value.place == f"{path}:2"


# --- partitions ---------------------------------------------------------------------------------------------------


def _mean_top_share(rows, partitions):
    """The mean over clients of their most frequent category's share."""
    shares = [Counter(rows[i]["category"] for i in part).most_common(1)[0][1] / len(part) for part in partitions]
    return sum(shares) / len(shares)


def test_dirichlet_partition_assigns_each_index_once_and_is_deterministic():
    rows = instruction_rows(SMALL, 0)
    labels = [r["category"] for r in rows]
    parts = dirichlet_partition(labels, 5, 0.5, seed=0)
    assert sorted(i for part in parts for i in part) == list(range(len(rows)))
    assert all(part == sorted(part) and part for part in parts)
    assert parts == dirichlet_partition(labels, 5, 0.5, seed=0)
    assert parts != dirichlet_partition(labels, 5, 0.5, seed=1)


def test_small_alpha_concentrates_categories_on_clients():
    rows = instruction_rows(InstructionTaskConfig(examples_per_category=100), 0)
    labels = [r["category"] for r in rows]
    skewed = _mean_top_share(rows, dirichlet_partition(labels, 8, 0.1, seed=0, min_examples=10))
    iid = _mean_top_share(rows, dirichlet_partition(labels, 8, 100.0, seed=0, min_examples=10))
    assert iid < 0.25 and skewed > 0.4  # IID: about 1/8 per category


def test_impossible_partitions_are_refused():
    labels = ["a", "b"] * 5
    with pytest.raises(LLMRecError, match="too few examples"):
        dirichlet_partition(labels, 4, 1.0, seed=0, min_examples=3)
    with pytest.raises(LLMRecError, match="alpha is too small"):
        dirichlet_partition(labels, 5, 0.001, seed=0, min_examples=2)
    with pytest.raises(LLMRecError, match="alpha > 0"):
        dirichlet_partition(labels, 2, 0.0, seed=0)


def test_client_split_is_stratified_and_seeded():
    rows = [{"id": str(i), "category": c} for i, c in enumerate("aaaaabbbbbbbbbbcc" + "d")]
    indices = list(range(len(rows)))
    train, test = client_split(rows, indices, 0.2, seed=0, client=0)
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in rows)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert Counter(r["category"] for r in test) == {"a": 1, "b": 2, "c": 1}  # round(0.2 n), at least 1
    assert Counter(r["category"] for r in train) == {"a": 4, "b": 8, "c": 1, "d": 1}  # a lone row trains
    assert [r["id"] for r in train] == sorted((r["id"] for r in train), key=int)
    assert (train, test) == client_split(rows, indices, 0.2, seed=0, client=0)
    other = [client_split(rows, indices, 0.2, seed=0, client=c)[1] for c in range(1, 6)]
    assert any(t != test for t in other)
    few_train, few_test = client_split(rows, [0, 1], 0.9, seed=0, client=0)
    assert len(few_train) == len(few_test) == 1  # a category of two keeps one row on each side
    with pytest.raises(LLMRecError, match="test_fraction"):
        client_split(rows, indices, 0.0, seed=0, client=0)


def test_user_group_partition_covers_every_user_once():
    data = load_data(DataConfig(source=SyntheticWorldConfig(num_users=60, num_items=40, max_interactions=15)), 0)
    parts = user_group_partition(data, 4, 0.5, seed=0)
    users = [user for part in parts for user in part]
    assert sorted(users) == sorted(set(data.interactions_frame["user_id"])) and len(users) == len(set(users))
    assert all(parts) and parts == user_group_partition(data, 4, 0.5, seed=0)
    # the label is the most frequent genre of the user's training items
    frame = data.interactions_frame
    genre = dict(zip(data.catalog_frame["item_id"], data.catalog_frame["genre"]))
    groups = user_groups(data, 0)
    for user in sorted(groups)[:10]:
        counts = Counter(genre[i] for i in frame[(frame.user_id == user) & (frame.split == "train")].item_id)
        assert counts[groups[user]] == max(counts.values())
    # a catalog without a category column falls back to seeded hash groups
    plain = RecData.from_frames(frame, data.catalog_frame[["item_id", "title"]], "plain")
    hashed = user_groups(plain, 0)
    assert set(hashed) == set(groups) and all(g.startswith("group") for g in hashed.values())
    assert hashed == user_groups(plain, 0) and hashed != user_groups(plain, 1)


# --- metrics ------------------------------------------------------------------------------------------------------


def test_answer_normalisation_and_exact_match():
    assert normalise_answer("  Hello,   World!\nsecond line") == "hello world"
    assert exact_match(" Paris.\nThe capital of France.", "paris") == 1.0
    assert exact_match("paris france", "Paris") == 0.0
    assert exact_match("", "  ") == 1.0


def test_rouge_l_hand_cases():
    assert rouge_l("a b c d", "a c d") == pytest.approx(6 / 7)  # LCS 3: precision 3/4, recall 1
    assert rouge_l("a c d", "a b c d") == pytest.approx(6 / 7)
    assert rouge_l("a b c d e", "a x c y e") == pytest.approx(0.6)
    assert rouge_l("a b", "b a") == pytest.approx(0.5)
    assert rouge_l("Kite, ball!", " kite ball") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("a", "") == 0.0 and rouge_l("", "") == 1.0


# --- evaluation of a tiny model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from llmrec.models.tiny import train_tokenizer

    return train_tokenizer(instruction_tokenizer_texts(SMALL, 0), 600)


@pytest.fixture(scope="module")
def model(tokenizer):
    from llmrec.models.tiny import build_tiny_model

    return build_tiny_model("tiny:qwen2-xs", tokenizer, seed=0)


def _direct_loss(model, tokenizer, row) -> float:
    ids, prompt_length = completion_token_ids(tokenizer, row["prompt"], row["completion"])
    assert ids[-1] == tokenizer.eos_token_id and prompt_length == len(tokenizer(row["prompt"])["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = range(prompt_length, len(ids))
    return -sum(float(logprobs[t - 1, ids[t]]) for t in targets) / len(targets)


def test_evaluate_instruction_rows_on_a_tiny_model(model, tokenizer):
    rows = instruction_rows(SMALL, 0)[::16]
    model.train()
    result = evaluate_instruction_rows(model, tokenizer, rows, max_new_tokens=6, batch_size=4)
    assert model.training  # restored
    assert result["rows"] == len(rows) and set(result["by_category"]) == set(CATEGORIES)
    assert 0 <= result["exact_match"] <= 1 and 0 <= result["rouge_l"] <= 1 and result["loss"] > 0
    single = evaluate_instruction_rows(model, tokenizer, rows[:1], max_new_tokens=6)
    assert single["loss"] == pytest.approx(_direct_loss(model.eval(), tokenizer, rows[0]), rel=1e-4)
    # batching (left padding for generation, right padding for the loss) changes nothing
    one_by_one = evaluate_instruction_rows(model, tokenizer, rows, max_new_tokens=6, batch_size=1)
    assert one_by_one["exact_match"] == result["exact_match"] and one_by_one["rouge_l"] == result["rouge_l"]
    assert one_by_one["loss"] == pytest.approx(result["loss"], rel=1e-4)
    assert evaluate_instruction_rows(model, tokenizer, [], 6)["rows"] == 0


def test_a_model_that_copies_the_reference_scores_one(model, tokenizer):
    rows = instruction_rows(SMALL, 0)[:3]

    class Oracle(torch.nn.Module):
        """Generates each row's reference completion; its logits are the tiny model's."""

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):
            return self.inner(**kwargs)

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            answers = [tokenizer(r["completion"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
            width = max(len(a) for a in answers)
            padded = [a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers]
            return torch.cat([input_ids, torch.tensor(padded)], dim=1)

    result = evaluate_instruction_rows(Oracle(), tokenizer, rows, max_new_tokens=6, batch_size=3)
    assert result["exact_match"] == result["rouge_l"] == 1.0


def test_evaluation_works_with_a_peft_model(model, tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    rows = instruction_rows(SMALL, 0)[:4]
    result = evaluate_instruction_rows(peft_model, tokenizer, rows, max_new_tokens=4)
    plain = evaluate_instruction_rows(model, tokenizer, rows, max_new_tokens=4)
    assert result["loss"] == pytest.approx(plain["loss"], rel=1e-5)  # LoRA's B starts at zero
