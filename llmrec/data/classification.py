"""Text classification by label-word scoring: synthetic tasks generated offline, and GLUE/SuperGLUE tasks.

A row is a prompt (the recipe's `prompt_template` with the text filled in), a completion (the class's label word,
so TRL's prompt–completion SFT trains the model to write it) and the class index `label`. The evaluator
(`llmrec.eval.classification`) predicts the class whose label word's first token has the highest logit right after
the prompt.

Synthetic tasks need no download and are deterministic for (config, seed). Their sentences are built from word
lists so that no single word decides the class:

* `sentiment` (2 classes: 0 negative, 1 positive, as SST-2): a main clause "<subject> was <adjective>" decides the
  class; 30% of main clauses are negated ("was not brilliant" is negative), 30% add a neutral adjective ("was long
  and dull"), and half the sentences add a concessive clause whose adjective has the opposite polarity of the
  class ("although the cast was charming, the plot was dull"), so counting positive and negative words fails.
* `topic` (4 classes: sports, science, business, music): two or three nouns of the topic's vocabulary in a
  sentence of shared filler words (openers, verbs, closers); 40% of the sentences add one noun of another topic.

Both draw each split's labels as a shuffled, balanced sequence (the class counts differ by at most one), and every
sentence is unique across train, valid and test, so test sentences are never trained on.

GLUE (`task: glue`, `glue_task: sst2 | rte | boolq | cb`) loads `nyu-mll/glue` (SST-2, RTE) or `aps/super_glue`
(BoolQ, CB) through `datasets.load_dataset`, which downloads them from the Hugging Face Hub on first use and caches
them. Their test splits have no labels, so `test` is the official validation split and `valid` is `valid_size`
rows held out (seeded) from the official training split; `train_size` and `test_size` cap the rest by a seeded
sample (null: all rows). Pair tasks fill `{text}` with the first text (premise, passage) and `{text2}` with the
second (hypothesis, question).
"""

from __future__ import annotations

import functools
import json
from string import Formatter
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from pydantic import Field, field_validator, model_validator

from llmrec.errors import LLMRecError
from llmrec.schema import Section

if TYPE_CHECKING:  # datasets is imported where rows are built: reading a recipe does not need it
    from datasets import Dataset

COLUMNS = {"prompt": "string", "completion": "string", "label": "int64"}  # the rows' columns and their types
SPLITS = ("train", "valid", "test")


class _Task(NamedTuple):
    classes: int
    prompt_template: str
    label_words: tuple[str, ...]
    dataset: tuple[str, str] | None = None  # (Hub id, configuration) for GLUE tasks
    columns: tuple[str, ...] = ()  # the text columns: (text,) or (text, text2)


TASKS: dict[str, _Task] = {
    "sentiment": _Task(2, "Review: {text}\nSentiment:", (" negative", " positive")),
    "topic": _Task(4, "Text: {text}\nTopic:", (" sports", " science", " business", " music")),
    "sst2": _Task(2, "Review: {text}\nSentiment:", (" negative", " positive"), ("nyu-mll/glue", "sst2"),
                  ("sentence",)),
    # labels 0 entailment, 1 not_entailment
    "rte": _Task(2, "{text}\nQuestion: {text2} True or false?\nAnswer:", (" true", " false"), ("nyu-mll/glue", "rte"),
                 ("sentence1", "sentence2")),
    # labels 0 False, 1 True
    "boolq": _Task(2, "{text}\nQuestion: {text2}?\nAnswer:", (" no", " yes"), ("aps/super_glue", "boolq"),
                   ("passage", "question")),
    # labels 0 entailment, 1 contradiction, 2 neutral
    "cb": _Task(3, "{text}\nQuestion: {text2} True, false or neither?\nAnswer:", (" true", " false", " neither"),
                ("aps/super_glue", "cb"), ("premise", "hypothesis")),
}


class ClassificationTaskConfig(Section):
    """`data.classification`: a text-classification task. When set, `trainer: sft` trains on its rows and
    `eval.task: classification` measures accuracy on them (the recommendation data are not used)."""

    task: Literal["sentiment", "topic", "glue"] = Field(
        "sentiment",
        description="'sentiment' (2 classes) or 'topic' (4 classes), generated offline; 'glue': glue_task.",
    )
    glue_task: Literal["sst2", "rte", "boolq", "cb"] | None = Field(
        None, description="task: glue only: SST-2 and RTE (nyu-mll/glue), BoolQ and CB (aps/super_glue), from the Hub."
    )
    train_size: int | None = Field(
        400, ge=1, description="Training rows (GLUE: a seeded sample of the official train split; null: all of it)."
    )
    valid_size: int = Field(100, ge=1, description="Validation rows (GLUE: held out from the official train split).")
    test_size: int | None = Field(
        200, ge=1, description="Test rows (GLUE: a seeded sample of the official validation split; null: all of it)."
    )
    prompt_template: str = Field(
        description="Contains {text} once, and {text2} once for pair tasks (RTE, BoolQ, CB); default: the task's."
    )
    label_words: list[str] = Field(
        description="One completion per class, in class order (e.g. [' negative', ' positive']); their first tokens "
        "must differ. Default: the task's."
    )

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        # the defaults depend on the task, and are written into the resolved recipe so it shows what runs
        if isinstance(data, dict):
            if data.get("task") == "glue" and data.get("glue_task") is None:
                raise ValueError("task: glue needs glue_task (sst2, rte, boolq or cb)")
            name = data.get("glue_task") if data.get("task") == "glue" else data.get("task", "sentiment")
            task = TASKS.get(name, TASKS["sentiment"])  # an unknown name is reported by the field's own check
            data = {"prompt_template": task.prompt_template, "label_words": list(task.label_words), **data}
        return data

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        try:
            names = [name for _, name, _, _ in Formatter().parse(template) if name is not None]
        except ValueError as err:
            raise ValueError(f"prompt_template is not a valid format string ({err})") from None
        if names.count("text") != 1:
            raise ValueError("prompt_template must contain {text} exactly once (where the text to classify goes)")
        others = sorted(set(names) - {"text", "text2"})
        if others:
            raise ValueError(f"prompt_template may only use {{text}} and {{text2}}, not {{{others[0]}}}")
        if names.count("text2") > 1:
            raise ValueError("prompt_template may contain {text2} at most once")
        return template

    @model_validator(mode="after")
    def _consistent(self) -> ClassificationTaskConfig:
        if self.task != "glue" and self.glue_task is not None:
            raise ValueError(f"glue_task applies to task: glue only, not task: {self.task}")
        if self.task != "glue" and (self.train_size is None or self.test_size is None):
            raise ValueError(f"the synthetic {self.task} task needs train_size and test_size (null means all rows "
                             "of a GLUE split)")
        spec = self.spec
        pair = "{text2}" in self.prompt_template
        if len(spec.columns) == 2 and not pair:
            raise ValueError(f"{self.name} pairs two texts; prompt_template must contain {{text2}} as well as "
                             f"{{text}}")
        if len(spec.columns) < 2 and pair:
            raise ValueError(f"{self.name} has one text per row; prompt_template may not use {{text2}}")
        if len(self.label_words) != spec.classes:
            raise ValueError(f"label_words must have one word per class: {self.name} has {spec.classes}, "
                             f"not {len(self.label_words)}")
        if any(not word for word in self.label_words) or len(set(self.label_words)) != len(self.label_words):
            raise ValueError("label_words must be non-empty and distinct")
        return self

    @property
    def name(self) -> str:
        """The task's name: sentiment, topic, or the GLUE task (set exactly when task is glue)."""
        return self.glue_task or self.task

    @property
    def spec(self) -> _Task:
        return TASKS[self.name]

    @property
    def num_classes(self) -> int:
        return self.spec.classes


# --- synthetic tasks ---------------------------------------------------------------------------------------------

POSITIVE = ("wonderful", "brilliant", "charming", "delightful", "superb", "gripping", "moving", "clever", "beautiful",
            "excellent", "enjoyable", "fresh")
NEGATIVE = ("dull", "awful", "boring", "clumsy", "tedious", "bland", "messy", "weak", "dreadful", "predictable",
            "shallow", "tiresome")
NEUTRAL = ("long", "quiet", "recent", "familiar", "colourful", "modern", "short", "loud", "simple", "French",
           "old-fashioned", "black-and-white")
SUBJECTS = ("the film", "the plot", "the acting", "the soundtrack", "the ending", "the script", "the cast",
            "the pacing", "the dialogue", "the camera work", "the story", "the direction")
NEGATIONS = ("not", "never", "hardly")
SENTIMENT_OPENERS = ("", "Honestly, ", "Overall, ", "In short, ", "All in all, ", "To be fair, ")

TOPICS = (
    ("match", "coach", "team", "goal", "stadium", "league", "player", "referee", "season", "tournament", "striker",
     "trophy"),
    ("experiment", "laboratory", "physicist", "telescope", "molecule", "theory", "researcher", "genome", "particle",
     "vaccine", "microscope", "hypothesis"),
    ("market", "investor", "profit", "shares", "company", "merger", "startup", "revenue", "bank", "budget",
     "shareholder", "inflation"),
    ("concert", "album", "guitar", "singer", "orchestra", "melody", "band", "festival", "drummer", "chorus", "pianist",
     "lyrics"),
)
TOPIC_OPENERS = ("Yesterday", "On Monday", "Last week", "This morning", "According to a report", "In a statement")
TOPIC_VERBS = ("praised", "discussed", "questioned", "described", "mentioned", "welcomed", "criticised", "announced")
TOPIC_CLOSERS = ("", " after a long week", " in front of many people", " to everyone's surprise",
                 " for the first time", " once again")


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def sentiment_sentence(label: int, rng: np.random.Generator) -> str:
    """A movie-review sentence whose main clause says `label` (1 positive, 0 negative)."""
    negated = rng.random() < 0.3
    adjective = _pick(rng, POSITIVE if bool(label) != negated else NEGATIVE)
    if rng.random() < 0.3:
        adjective = f"{_pick(rng, NEUTRAL)} and {adjective}"
    main = f"{_pick(rng, SUBJECTS)} was {_pick(rng, NEGATIONS) + ' ' if negated else ''}{adjective}"
    if rng.random() < 0.5:  # a concession with the other polarity's word, which does not decide
        aside = f"{_pick(rng, SUBJECTS)} was {_pick(rng, NEGATIVE if label else POSITIVE)}"
        main = f"although {aside}, {main}" if rng.random() < 0.5 else f"{main}, even though {aside}"
    sentence = _pick(rng, SENTIMENT_OPENERS) + main + "."
    return sentence[0].upper() + sentence[1:]


def topic_sentence(label: int, rng: np.random.Generator) -> str:
    """A news-like sentence about topic `label` (0 sports, 1 science, 2 business, 3 music)."""
    words = [str(w) for w in rng.choice(TOPICS[label], 3, replace=False)]
    sentence = f"{_pick(rng, TOPIC_OPENERS)}, the {words[0]} {_pick(rng, TOPIC_VERBS)} the {words[1]}"
    if rng.random() < 0.5:
        sentence += f" and the {words[2]}"
    if rng.random() < 0.4:
        other = int(rng.choice([k for k in range(len(TOPICS)) if k != label]))
        sentence += f" near the {_pick(rng, TOPICS[other])}"
    return sentence + _pick(rng, TOPIC_CLOSERS) + "."


SYNTHETIC = {"sentiment": sentiment_sentence, "topic": topic_sentence}


def synthetic_splits(task: str, sizes: dict[str, int], seed: int) -> dict[str, tuple[list[str], list[int]]]:
    """{split: (texts, labels)}: balanced labels in a seeded order, every text unique across the splits."""
    make, classes = SYNTHETIC[task], TASKS[task].classes
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out = {}
    for split, size in sizes.items():
        labels = [int(label) for label in rng.permutation(np.arange(size) % classes)]
        texts = []
        for label in labels:
            for _ in range(1000):
                text = make(label, rng)
                if text not in seen:
                    break
            else:
                raise LLMRecError(
                    f"the {task} generator ran out of new sentences after {len(seen)}; ask for fewer rows.",
                    f"data.classification.{split}_size",
                )
            seen.add(text)
            texts.append(text)
        out[split] = (texts, labels)
    return out


# --- GLUE / SuperGLUE --------------------------------------------------------------------------------------------


def load_glue(config: ClassificationTaskConfig, seed: int) -> dict[str, tuple[list[tuple[str, ...]], list[int]]]:
    """{split: (text tuples, labels)} of a GLUE/SuperGLUE task through `datasets.load_dataset` (cached after the
    first download)."""
    from datasets import load_dataset

    spec = config.spec
    path, name = spec.dataset
    try:
        official = load_dataset(path, name)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, OSError, ...)
        raise LLMRecError(
            f"could not load {config.glue_task} ({path}, configuration {name!r}) with datasets.load_dataset: "
            f"{type(err).__name__}: {err}. GLUE tasks are downloaded from the Hugging Face Hub on first use and "
            "cached (HF_DATASETS_CACHE); offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, or no network) they "
            "must already be in that cache. Run once with network access, or use a synthetic task (task: sentiment "
            "or topic).",
            "data.classification.glue_task",
        ) from None

    def rows(split: str, indices) -> tuple[list[tuple[str, ...]], list[int]]:
        subset = official[split].select(indices)
        texts = list(zip(*(subset[column] for column in spec.columns)))
        return [tuple(t) for t in texts], [int(label) for label in subset["label"]]

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(official["train"]))
    if config.valid_size >= len(order):
        raise LLMRecError(f"valid_size ({config.valid_size}) must leave training rows: {config.glue_task}'s train "
                          f"split has {len(order)}.", "data.classification.valid_size")
    valid, train = order[: config.valid_size], order[config.valid_size:]
    if config.train_size is not None:
        train = train[: config.train_size]
    test = np.arange(len(official["validation"]))
    if config.test_size is not None and config.test_size < len(test):
        test = rng.choice(test, config.test_size, replace=False)
    return {"train": rows("train", sorted(train)), "valid": rows("train", sorted(valid)),
            "test": rows("validation", sorted(test))}


# --- rows --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _splits(config_json: str, seed: int) -> dict[str, tuple[list[tuple[str, ...]], list[int]]]:
    config = ClassificationTaskConfig.model_validate_json(config_json)
    if config.glue_task is not None:
        return load_glue(config, seed)
    sizes = {"train": config.train_size, "valid": config.valid_size, "test": config.test_size}
    return {split: ([(text,) for text in texts], labels)
            for split, (texts, labels) in synthetic_splits(config.task, sizes, seed).items()}


def classification_examples(config: ClassificationTaskConfig, split: str, seed: int) -> Dataset:
    """Rows `prompt`, `completion` (the label word), `label` (the class index) of one split (train, valid or test);
    deterministic for (config, seed)."""
    from datasets import Dataset, Features, Value

    if split not in SPLITS:
        raise LLMRecError(f"a classification task has the splits {', '.join(SPLITS)}, not {split!r}.", "eval.splits")
    texts, labels = _splits(json.dumps(config.model_dump(mode="json"), sort_keys=True), seed)[split]
    fields = ("text", "text2")
    prompts = [config.prompt_template.format(**dict(zip(fields, text))) for text in texts]
    return Dataset.from_dict(
        {"prompt": prompts, "completion": [config.label_words[label] for label in labels], "label": labels},
        features=Features({name: Value(kind) for name, kind in COLUMNS.items()}),
    )


def classification_tokenizer_texts(config: ClassificationTaskConfig, seed: int) -> list[str]:
    """The training rows, each prompt followed by its label word: texts for a tiny model's tokenizer, so the task's
    words, the template and the label words become whole tokens."""
    rows = classification_examples(config, "train", seed)
    return [prompt + completion for prompt, completion in zip(rows["prompt"], rows["completion"])]


def describe_classification(config: ClassificationTaskConfig) -> str:
    """One line for the model card: the task, its classes and sizes."""
    source = (f"{config.glue_task} ({config.spec.dataset[0]})" if config.glue_task is not None
              else f"synthetic {config.task} task (generated offline)")
    sizes = ", ".join(f"{split} {size if size is not None else 'all'}" for split, size in
                      (("train", config.train_size), ("valid", config.valid_size), ("test", config.test_size)))
    words = ", ".join(repr(word) for word in config.label_words)
    return f"{source}, {config.num_classes} classes scored by the label words {words}; rows: {sizes}"
