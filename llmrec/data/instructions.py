"""Instruction-following data for federated instruction tuning: a seeded synthetic world with Dolly's eight
categories, Dolly-15k-format JSON Lines, and the non-IID client partitions (Dirichlet over categories, or over
users' dominant genres for recommendation data).

A row is `{"id", "category", "prompt", "completion"}`: the prompt is `prompt_template` with `{instruction}` filled in
and `{context}` replaced by "Context: <context>\\n" (the empty string when the row has no context, or when the template
has no `{context}`, which then drops contexts altogether); the completion is " " + response, which TRL's
prompt-completion SFT trains on (it appends EOS) and evaluation compares with (`llmrec.eval.instructions`).

The synthetic world (`source: synthetic`) draws `examples_per_category` rows for each of its first `categories`
categories. Every category is a templated task whose answer is 1-4 words and fully determined by the instruction,
the context and the world's seeded fact tables, so a tiny model can partly learn it; categories differ in phrasing,
in skill and in the facts they ask about, so clients that hold different categories really differ. The vocabulary is
a few hundred words (the tiny model's tokenizer is trained on these texts). The categories (the answers quoted
depend on the seed's fact tables):

* `open_qa`: facts about 32 people (favourite colour, pet, favourite fruit, job), drawn once per seed and asked
  without context in four phrasings each, so they must be memorised: "What pet does Ada have?" -> "owl".
* `closed_qa`: reading comprehension; the context states one relation (lives in a town, keeps an animal, works as a
  job, grows a fruit) for three people, the question asks about one of them: "Where does Ben live?" -> "Dunmore".
  These per-row statements are independent of `open_qa`'s facts: the answer is always read from the context.
* `classification`: four words, one each of animal, fruit, colour and job, in random order; which is the asked
  kind: "Which of these words is a fruit?" with "wolf, plum, red, baker" -> "plum".
* `information_extraction`: one slot (day, name, number, fruit, job or town) of a templated sale sentence:
  "Extract the town from the text." with "On Monday, Ada sold 7 plum crates to a chef in Elmwick." -> "Elmwick".
* `summarization`: a two-sentence story (town, day, a person, an action, an object and a filler sentence) summarised
  as "<person> <action> <object>": "Ada painted fence".
* `brainstorming`: each of 12 occasions has a seeded list of three things to bring; the instruction asks one, two or
  three of them for a named person (the name does not matter): "Ada is planning a picnic. Suggest two things to
  bring." -> "kite, rope".
* `creative_writing`: half story titles, "the <adjective> <animal>" with a seeded adjective per animal ("Write a
  title for a story about a wolf from Elmwick." -> "the lonely wolf"), half rewriting three words in reverse order.
* `general_qa`: counting the words of one kind in a list of four or five given in the instruction: "How many
  animals are in this list: cat, red, owl, plum?" -> "2".

Rows are deterministic for (config, seed); each category draws from its own generator, so a world with fewer
categories holds exactly the first categories' rows of the full world. Every (instruction, context) pair is unique,
hence every prompt of a template that shows both. `source: jsonl` reads Dolly-15k's format (`instruction`,
`context`, `response`, `category` on every line; a null context counts as none), optionally capped to a seeded
sample of `max_examples` rows kept in file order.

Partitions: `dirichlet_partition` is the standard non-IID label split (per label, client shares ~ Dirichlet(alpha));
`user_group_partition` labels each user by the dominant category of their training items and splits users the same
way; `client_split` cuts one client's rows into train and test, stratified by category.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from llmrec.errors import LLMRecError
from llmrec.schema import Section

from .loaders import iter_jsonl
from .recdata import RecData

CATEGORIES = ("open_qa", "closed_qa", "classification", "information_extraction", "summarization", "brainstorming",
              "creative_writing", "general_qa")
DOLLY_KEYS = ("instruction", "context", "response", "category")


class InstructionTaskConfig(Section):
    """`data.instructions`: instruction-following rows (synthetic or Dolly-15k-format JSON Lines) for federated
    instruction tuning, with the per-client test share and the evaluation's generation length."""

    source: Literal["synthetic", "jsonl"] = Field(
        "synthetic",
        description="'synthetic' (the offline instruction world) or a local Dolly-15k-format 'jsonl' file.",
    )
    path: str | None = Field(
        None, description="jsonl: the file, one record per line with instruction, context, response and category."
    )
    categories: int = Field(8, ge=1, le=len(CATEGORIES), description="synthetic: use the world's first N categories.")
    examples_per_category: int = Field(
        200, ge=1, le=500,
        description="synthetic: rows per category (at most 500: open_qa has 512 distinct questions).",
    )
    max_examples: int | None = Field(
        None, ge=1, description="jsonl: keep a seeded sample of this many rows (null: all)."
    )
    world_seed: int | None = Field(
        None, description="synthetic: the seed of the world's facts and rows (null: the run seed). A different seed "
        "gives the same skills, phrasings and vocabulary with other facts: a pretraining corpus for a base model "
        "that federated training then teaches this world's facts.",
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each client's rows held out for its test set.")
    prompt_template: str = Field(
        "Instruction: {instruction}\n{context}Response:",
        description="Must contain {instruction}; {context} becomes 'Context: <context>\\n' or nothing.",
    )
    max_new_tokens: int = Field(16, ge=1, description="Evaluation: the longest response generated.")

    @field_validator("prompt_template")
    @classmethod
    def _has_instruction(cls, template: str) -> str:
        if "{instruction}" not in template:
            raise ValueError("prompt_template must contain {instruction}")
        return template

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> InstructionTaskConfig:
        if self.source == "jsonl" and not self.path:
            raise ValueError("source jsonl needs a path (a Dolly-15k-format JSON Lines file)")
        return self


# --- the synthetic world ------------------------------------------------------------------------------------------

NAMES = ("Ada", "Ben", "Cora", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kira", "Leo", "Maya", "Nico",
         "Olga", "Paul", "Rosa", "Sam", "Tara", "Uma", "Vera", "Will", "Yara", "Zane", "Alma", "Bruno", "Clara",
         "Dario", "Elsa", "Felix", "Greta", "Hans")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
ANIMALS = ("cat", "dog", "horse", "tiger", "rabbit", "eagle", "shark", "frog", "wolf", "bear", "mouse", "owl")
FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum", "melon", "pear")
JOBS = ("baker", "doctor", "farmer", "pilot", "teacher", "sailor", "painter", "miner", "chef", "guard")
TOWNS = ("Ashford", "Brookvale", "Cedarton", "Dunmore", "Elmwick", "Fairhaven", "Glenrock", "Hollowell", "Ivywood",
         "Kingsley", "Larkspur", "Millbrook", "Northam", "Oakridge", "Pinehurst", "Redcliff")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
KINDS = {"animal": ANIMALS, "fruit": FRUITS, "colour": COLOURS, "job": JOBS}
OCCASIONS = ("a picnic", "a beach day", "a camping trip", "a birthday party", "a rainy day", "a garden party",
             "a school fair", "a winter walk", "a boat trip", "a farm visit", "a music night", "a cooking class")
THINGS = ("kite", "ball", "rope", "blanket", "lamp", "drum", "map", "tent", "hat", "book", "cake", "soup", "boots",
          "scarf", "bucket", "net", "torch", "flute", "basket", "candle")
ADJECTIVES = ("brave", "sleepy", "clever", "lonely", "happy", "tiny", "angry", "gentle", "silly", "proud", "shy",
              "wise")
VERBS = ("painted", "fixed", "sold", "cleaned", "built", "moved", "found", "opened")
OBJECTS = ("fence", "boat", "house", "cart", "door", "wall", "bridge", "roof")
FILLERS = ("It was a long day.", "Everyone was happy.", "The weather was cold.", "Nobody saw it happen.")
NUMBER_WORDS = ("one", "two", "three")

PERSON_QUESTIONS = {
    "colour": ("What is the favourite colour of {name}?", "Which colour does {name} like best?",
               "What colour does {name} love most?", "Name the favourite colour of {name}."),
    "animal": ("What pet does {name} have?", "Which animal does {name} keep as a pet?",
               "What kind of pet does {name} own?", "Name the pet of {name}."),
    "fruit": ("What is the favourite fruit of {name}?", "Which fruit does {name} like best?",
              "What fruit does {name} love most?", "Name the favourite fruit of {name}."),
    "job": ("What is the job of {name}?", "What does {name} do for a living?", "Which job does {name} have?",
            "Name the job of {name}."),
}
# closed_qa relations: (the value's word list, the statement, the question)
RELATIONS = (
    (TOWNS, "{name} lives in {value}.", "Where does {name} live?"),
    (ANIMALS, "{name} keeps a {value}.", "What animal does {name} keep?"),
    (JOBS, "{name} works as a {value}.", "What does {name} work as?"),
    (FRUITS, "{name} grows a {value} tree.", "What fruit does {name} grow?"),
)
SALE = "On {day}, {name} sold {number} {fruit} crates to a {job} in {town}."
SLOT_QUESTIONS = ("Extract the {slot} from the text.", "What is the {slot} in the text?")
SLOT_NAMES = {"day": "day", "name": "name", "number": "number", "fruit": "fruit", "job": "job of the buyer",
              "town": "town"}


class WorldFacts:
    """The world's seeded fact tables: people's attributes, occasions' lists of things, animals' adjectives."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 9301])
        self.people = {name: {kind: str(rng.choice(words)) for kind, words in KINDS.items()} for name in NAMES}
        self.occasions = {occasion: [str(t) for t in rng.choice(THINGS, size=3, replace=False)]
                          for occasion in OCCASIONS}
        self.adjectives = dict(zip(ANIMALS, (str(a) for a in rng.permutation(ADJECTIVES))))


def _pick(rng: np.random.Generator, words: Sequence[str], size: int | None = None):
    if size is None:
        return words[int(rng.integers(len(words)))]
    return [words[int(i)] for i in rng.choice(len(words), size=size, replace=False)]


def _open_qa(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    name, kind = _pick(rng, NAMES), _pick(rng, list(PERSON_QUESTIONS))
    return _pick(rng, PERSON_QUESTIONS[kind]).format(name=name), "", facts.people[name][kind]


def _closed_qa(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    words, statement, question = RELATIONS[int(rng.integers(len(RELATIONS)))]
    names, values = _pick(rng, NAMES, 3), _pick(rng, words, 3)
    context = " ".join(statement.format(name=n, value=v) for n, v in zip(names, values))
    asked = int(rng.integers(3))
    return question.format(name=names[asked]), context, values[asked]


def _classification(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    words = {kind: _pick(rng, pool) for kind, pool in KINDS.items()}
    kind = _pick(rng, list(KINDS))
    phrasing = _pick(rng, ("Which of these words is a {kind}?", "Pick the {kind} from the list.",
                           "Find the word that names a {kind}."))
    return phrasing.format(kind=kind), ", ".join(_pick(rng, list(words.values()), 4)), words[kind]


def _information_extraction(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    slots = {"day": _pick(rng, DAYS), "name": _pick(rng, NAMES), "number": str(rng.integers(2, 10)),
             "fruit": _pick(rng, FRUITS), "job": _pick(rng, JOBS), "town": _pick(rng, TOWNS)}
    slot = _pick(rng, list(slots))
    return _pick(rng, SLOT_QUESTIONS).format(slot=SLOT_NAMES[slot]), SALE.format(**slots), slots[slot]


def _summarization(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    name, verb, thing = _pick(rng, NAMES), _pick(rng, VERBS), _pick(rng, OBJECTS)
    context = f"In {_pick(rng, TOWNS)} on {_pick(rng, DAYS)}, {name} {verb} the old {thing}. {_pick(rng, FILLERS)}"
    phrasing = _pick(rng, ("Summarize the text in three words.", "Give a three word summary of the text.",
                           "Write a very short summary."))
    return phrasing, context, f"{name} {verb} {thing}"


def _brainstorming(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    name, occasion, count = _pick(rng, NAMES), _pick(rng, OCCASIONS), int(rng.integers(1, 4))
    phrasing = _pick(rng, ("{name} is planning {occasion}. Suggest {n} things to bring.",
                           "List {n} things {name} should pack for {occasion}.",
                           "Give {n} ideas of what {name} can take to {occasion}."))
    instruction = phrasing.format(name=name, occasion=occasion, n=NUMBER_WORDS[count - 1])
    return instruction, "", ", ".join(facts.occasions[occasion][:count])


def _creative_writing(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        animal = _pick(rng, ANIMALS)
        if rng.random() < 0.5:
            instruction = f"Write a title for a story about a {animal} from {_pick(rng, TOWNS)}."
        else:
            instruction = f"Suggest a title for a tale where {_pick(rng, NAMES)} meets a {animal}."
        return instruction, "", f"the {facts.adjectives[animal]} {animal}"
    words = _pick(rng, [*ANIMALS, *COLOURS, *FRUITS, *JOBS], 3)
    return "Rewrite the line with its words in reverse order.", " ".join(words), " ".join(reversed(words))


def _general_qa(rng: np.random.Generator, facts: WorldFacts) -> tuple[str, str, str]:
    kind = _pick(rng, list(KINDS))
    length, count = int(rng.integers(4, 6)), int(rng.integers(0, 4))
    others = [word for other, pool in KINDS.items() if other != kind for word in pool]
    words = _pick(rng, KINDS[kind], count) + _pick(rng, others, length - count)
    listed = ", ".join(words[int(i)] for i in rng.permutation(length))
    phrasing = _pick(rng, ("How many {kind}s are in this list: {words}?", "Count the {kind}s among: {words}."))
    return phrasing.format(kind=kind, words=listed), "", str(count)


TaskMaker = Callable[[np.random.Generator, WorldFacts], tuple[str, str, str]]
MAKERS: dict[str, TaskMaker] = {
    "open_qa": _open_qa, "closed_qa": _closed_qa, "classification": _classification,
    "information_extraction": _information_extraction, "summarization": _summarization,
    "brainstorming": _brainstorming, "creative_writing": _creative_writing, "general_qa": _general_qa,
}


def synthetic_records(categories: int, examples_per_category: int, seed: int) -> list[dict]:
    """(instruction, context, response, category) records of the world's first `categories` categories."""
    facts = WorldFacts(seed)
    seen: set[tuple[str, str]] = set()
    records = []
    for index, category in enumerate(CATEGORIES[:categories]):
        rng = np.random.default_rng([seed, 9302, index])
        made, draws = 0, 0
        while made < examples_per_category and draws < 50 * examples_per_category + 1000:
            instruction, context, response = MAKERS[category](rng, facts)
            draws += 1
            if (instruction, context) in seen:
                continue
            seen.add((instruction, context))
            records.append({"id": f"{category}-{made:04d}", "category": category, "instruction": instruction,
                            "context": context, "response": response})
            made += 1
        if made < examples_per_category:
            raise LLMRecError(f"the synthetic world found only {made} distinct {category} tasks of the "
                              f"{examples_per_category} asked; lower examples_per_category.",
                              "data.instructions.examples_per_category")
    return records


# --- Dolly-15k JSON Lines -----------------------------------------------------------------------------------------


def jsonl_records(path: str, max_examples: int | None, seed: int) -> list[dict]:
    """Dolly-15k-format records, each checked for the four keys; a seeded sample of `max_examples` in file order."""
    records = []
    for number, record in iter_jsonl(Path(path)):
        for key in DOLLY_KEYS:
            if key not in record:
                raise LLMRecError(f"the record has no {key!r} key (keys: {', '.join(record) or 'none'}); Dolly-15k "
                                  f"records need {', '.join(DOLLY_KEYS)}.", f"{path}:{number}")
        fields = {key: "" if record[key] is None else str(record[key]).strip() for key in DOLLY_KEYS}
        for key in ("instruction", "response", "category"):
            if not fields[key]:
                raise LLMRecError(f"the record's {key!r} is empty.", f"{path}:{number}")
        records.append({"id": f"line{number}", **fields})
    if not records:
        raise LLMRecError("the file holds no records.", path)
    if max_examples is not None and len(records) > max_examples:
        keep = np.random.default_rng([seed, 9303]).permutation(len(records))[:max_examples]
        records = [records[i] for i in sorted(keep)]
    return records


_PLACEHOLDER = re.compile(r"\{instruction\}|\{context\}")


def format_instruction(template: str, instruction: str, context: str) -> str:
    """The prompt: one pass over the template, so braces inside the texts are never read as placeholders."""
    values = {"{instruction}": instruction, "{context}": f"Context: {context}\n" if context else ""}
    return _PLACEHOLDER.sub(lambda match: values[match.group()], template)


@functools.lru_cache(maxsize=8)
def _rows(config_json: str, seed: int) -> tuple[dict, ...]:
    config = InstructionTaskConfig.model_validate_json(config_json)
    if config.source == "jsonl":
        records = jsonl_records(config.path, config.max_examples, seed)
    else:
        world = seed if config.world_seed is None else config.world_seed
        records = synthetic_records(config.categories, config.examples_per_category, world)
    return tuple({"id": r["id"], "category": r["category"],
                  "prompt": format_instruction(config.prompt_template, r["instruction"], r["context"]),
                  "completion": " " + r["response"]} for r in records)


def instruction_rows(config: InstructionTaskConfig, seed: int) -> list[dict]:
    """Every example as `{"id", "category", "prompt", "completion"}` (fresh dicts: callers may annotate them)."""
    return [dict(row) for row in _rows(config.model_dump_json(), seed)]


def instruction_split(config: InstructionTaskConfig, seed: int, split: str) -> list[dict]:
    """The 'train' or 'test' rows of the whole task (one client holding everything): centralised training."""
    rows = instruction_rows(config, seed)
    train, test = client_split(rows, list(range(len(rows))), config.test_fraction, seed, 0)
    return train if split == "train" else test


def instruction_tokenizer_texts(config: InstructionTaskConfig, seed: int) -> list[str]:
    """What a tiny tokenizer learns from: every prompt followed by its completion."""
    return [row["prompt"] + row["completion"] for row in _rows(config.model_dump_json(), seed)]


# --- non-IID partitions -------------------------------------------------------------------------------------------

PARTITION_ATTEMPTS = 1000


def dirichlet_partition(labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int,
                        min_examples: int = 1) -> list[list[int]]:
    """Indices of `labels` per client: for each label, client shares ~ Dirichlet(alpha) and the label's shuffled
    indices are cut by them. Draws again (seeded, at most PARTITION_ATTEMPTS times) until every client holds at least
    `min_examples`. Every index goes to exactly one client; each client's indices are sorted. Large alpha gives
    near-IID clients, small alpha clients dominated by a few labels."""
    if num_clients < 1 or alpha <= 0 or min_examples < 0:
        raise LLMRecError(f"a Dirichlet partition needs num_clients >= 1, alpha > 0 and min_examples >= 0; got "
                          f"{num_clients}, {alpha} and {min_examples}.")
    if len(labels) < num_clients * min_examples:
        raise LLMRecError(f"too few examples ({len(labels)}) to give each of {num_clients} clients at least "
                          f"{min_examples}; use fewer clients or more data.")
    by_label: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    rng = np.random.default_rng([seed, 9304])
    for _ in range(PARTITION_ATTEMPTS):
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for indices in by_label.values():
            shuffled = rng.permutation(indices)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
            for client, part in enumerate(np.split(shuffled, cuts)):
                clients[client].extend(int(i) for i in part)
        if min(len(c) for c in clients) >= min_examples:
            return [sorted(c) for c in clients]
    raise LLMRecError(f"{PARTITION_ATTEMPTS} Dirichlet(alpha={alpha}) draws over {len(labels)} examples of "
                      f"{len(by_label)} labels never gave each of {num_clients} clients at least {min_examples} "
                      "examples; alpha is too small for this many clients (raise it), or use fewer clients.")


# Catalog columns that name an item's category, most specific first, with the separator of multi-valued ones
# (MovieLens-1M's "Comedy|Drama", RecBole's space-separated token sequences).
CATEGORY_COLUMNS = (("genre", None), ("category", None), ("main_category", None), ("genres", "|"), ("class", " "))
HASH_GROUPS = 8


def _hash_group(user: str, seed: int) -> str:
    # hashlib, not hash(): Python salts string hashes per process
    digest = hashlib.sha256(f"{seed}:{user}".encode()).digest()
    return f"group{int.from_bytes(digest[:4], 'big') % HASH_GROUPS}"


def user_groups(data: RecData, seed: int) -> dict[str, str]:
    """user_id -> the dominant category of the user's training items (all items when a user has no training
    interactions; ties go to the alphabetically first category), from the first catalog column of CATEGORY_COLUMNS;
    users without one (or catalogs without such a column) fall into one of HASH_GROUPS seeded hash groups."""
    frame = data.interactions_frame
    users = sorted(set(frame["user_id"]))
    catalog = data.catalog_frame
    column = next(((name, sep) for name, sep in CATEGORY_COLUMNS if name in catalog.columns), None)
    if column is None:
        return {user: _hash_group(user, seed) for user in users}
    name, separator = column
    categories = {}
    for item, value in zip(catalog["item_id"], catalog[name]):
        if isinstance(value, str) and value.strip():
            parts = value.split(separator) if separator else [value]
            categories[item] = [part.strip() for part in parts if part.strip()]
    train = frame[frame["split"] == "train"] if "split" in frame.columns else frame
    groups = {}
    for source in (train, frame):
        counts: dict[str, Counter] = {}
        for user, item in zip(source["user_id"], source["item_id"]):
            counts.setdefault(user, Counter()).update(categories.get(item, ()))
        for user, counter in counts.items():
            if user not in groups and counter:
                groups[user] = min(counter, key=lambda category: (-counter[category], category))
    return {user: groups.get(user) or _hash_group(user, seed) for user in users}


def user_group_partition(data: RecData, num_clients: int, alpha: float, seed: int) -> list[list[str]]:
    """User ids per client: users labelled by `user_groups`, then split by `dirichlet_partition` (each client gets at
    least one user)."""
    groups = user_groups(data, seed)
    users = list(groups)
    parts = dirichlet_partition([groups[user] for user in users], num_clients, alpha, seed)
    return [[users[i] for i in part] for part in parts]


def client_split(rows: list[dict], indices: list[int], test_fraction: float, seed: int,
                 client: int) -> tuple[list[dict], list[dict]]:
    """A client's (train, test) rows: within each category, round(test_fraction * n) rows (seeded) go to test, kept
    between 1 and n - 1 when the category has at least two rows; a category's single row goes to train. Both lists
    keep the order of `rows`."""
    if not 0 < test_fraction < 1:
        raise LLMRecError(f"test_fraction must be between 0 and 1 (exclusive); got {test_fraction}.")
    rng = np.random.default_rng([seed, 9305, client])
    by_category: dict[str, list[int]] = {}
    for index in sorted(indices):
        by_category.setdefault(rows[index]["category"], []).append(index)
    test: set[int] = set()
    for members in by_category.values():
        if len(members) >= 2:
            size = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
            test.update(int(i) for i in rng.permutation(members)[:size])
    ordered = sorted(indices)
    return [rows[i] for i in ordered if i not in test], [rows[i] for i in ordered if i in test]
