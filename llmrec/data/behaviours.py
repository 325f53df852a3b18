"""Behaviour data for AlignXplore+: per user, time-ordered (query, chosen item, rejected item) triples.

AlignXplore+ infers a natural-language preference summary of a user from the user's behaviours and updates it as
new behaviours stream in. `UserBehaviours.parts` splits a user's behaviours, in time order, into part 1 (evidence
for the first summary), part 2 (new evidence for a streaming update, and verification targets) and part 3 (held-out
evaluation questions); `user_split` splits the users themselves into train, valid and test.

An option is an item's display text: its title followed by its attribute words in parentheses,
"Night Harbor (horror, dark, fast-paced)", so that a rule-based judge or teacher can read the attributes off the
text. Three sources (`BehaviourDataConfig.source`):

* `personas` (`persona_world`): a seeded synthetic world with a known right answer. Items carry one genre plus
  `attributes_per_item - 1` values of other dimensions (pace, tone, era, setting); a persona likes
  `liked_per_persona` values (weight +1) and dislikes `disliked_per_persona` values (weight -1), and an item's
  utility is the sum of the weights of its values. Weights are ±1 rather than random magnitudes, so that the ideal
  summary (`describe_persona`), which states values but not magnitudes, carries everything that decides a choice.
  A behaviour pairs two items of different utility (so every behaviour is informative; no pair repeats for a user)
  and the higher one is chosen, except with probability `noise`.
* `recdata` (`from_recdata`): rated interactions. Each item the user rated high (>= `high`) is paired with the
  user's low-rated item (<= `low`) nearest in time, each low item being used once until all are used. A behaviour
  is complete once both items are rated, so behaviours are ordered by the later of the two timestamps. Options show
  the catalog's genres when it has a genre column ("Toy Story (1995) (animation, children's, comedy)").
* `jsonl` (`load_jsonl`): AlignX-style JSON Lines, one user per line (`user_id`, `behaviours`: a list of objects
  with `query`, `chosen`, `rejected`), or one behaviour per line (`user_id`, `query`, `chosen`, `rejected`), grouped
  by user in file order.
* `hub` (`load_hub`): the same records as rows of a `datasets` dataset (a Hub id, downloaded and cached on first
  use, or a local folder), for GPU recipes on AlignX-style data.

Users with fewer than `min_behaviours` behaviours are dropped, and `max_users` keeps a seeded sample of the rest
(in their original order). `load_jsonl` and `load_hub` take no seed, so `load_behaviours` applies `max_users` to
their users.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger
from llmrec.schema import Section

from .filters import GENRE_COLUMNS, genre_words
from .loaders import existing_file, iter_jsonl
from .recdata import RecData

logger = get_logger(__name__)

# Attribute dimensions of the persona world. Values are lowercase words that appear verbatim in option texts and
# in no title word, so matching a word in an option finds exactly the item's attributes.
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "genre": ("comedy", "drama", "horror", "thriller", "romance", "documentary", "animation", "western"),
    "pace": ("fast-paced", "slow-burning"),
    "tone": ("dark", "lighthearted"),
    "era": ("classic", "modern"),
    "setting": ("urban", "rural", "space"),
}
TITLE_FIRST = ("Night", "Silver", "Hollow", "Paper", "Northern", "Amber", "Glass", "Little", "Last", "Secret",
               "Winter", "Golden")
TITLE_SECOND = ("Harbor", "Orchard", "Signal", "Letters", "Garden", "Bridge", "Mirror", "Station", "Lantern", "Voyage",
                "Promise", "Echo")
CATALOG_SIZE = 120  # items in a persona world (of the 144 possible titles)
QUERY_TEMPLATES = (
    "Which {domain} would this user rather have?",
    "Which {domain} would this user pick?",
    "Given the choice, which {domain} would this user prefer?",
)
RECDATA_QUERY = "Which movie would this user rather watch?"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Behaviour:
    query: str
    chosen: str  # the item's display text, e.g. "Night Harbor (horror, dark, fast-paced)"
    rejected: str


@dataclass
class UserBehaviours:
    user_id: str
    behaviours: list[Behaviour]  # time order
    preferences: dict[str, float] | None = None  # synthetic only: hidden attribute -> weight (+ liked, - disliked)

    def parts(
        self, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    ) -> tuple[list[Behaviour], list[Behaviour], list[Behaviour]]:
        """Consecutive split in time order; each part gets at least one behaviour (raise ValueError when a user has
        fewer than 3)."""
        first, second, _ = _sizes(len(self.behaviours), _checked_fractions(fractions), f"user {self.user_id}")
        items = self.behaviours
        return items[:first], items[first:first + second], items[first + second:]


class BehaviourDataConfig(Section):
    """Where AlignXplore+ behaviours (query, chosen, rejected) come from and how each user's are split."""

    source: Literal["personas", "recdata", "jsonl", "hub"] = Field(
        "personas",
        description="'personas': a synthetic world with known preferences; 'recdata': pairs of high- and low-rated "
        "items from the recommendation data (`data.source`); 'jsonl': AlignX-style JSON Lines at `path`; 'hub': the "
        "same records from a `datasets` dataset (`dataset`: a Hub id or a local folder, `split`).",
    )
    num_users: int = Field(200, ge=1, description="personas: number of users.")
    behaviours_per_user: int = Field(16, ge=3, description="personas: behaviours per user.")
    attributes_per_item: int = Field(
        3, ge=1, le=len(DIMENSIONS), description="personas: attribute values per item (a genre plus other dimensions)."
    )
    liked_per_persona: int = Field(2, ge=0, description="personas: attribute values a persona likes (weight +1).")
    disliked_per_persona: int = Field(
        2, ge=0, description="personas: attribute values a persona dislikes (weight -1)."
    )
    noise: float = Field(
        0.1, ge=0, le=1, description="personas: probability that a behaviour's choice goes against the persona."
    )
    domain: str = Field(
        "movie", min_length=1, description="personas: the noun used in queries ('movie', 'book', ...)."
    )
    path: str | None = Field(None, description="jsonl: the behaviours file (.jsonl or .jsonl.gz).")
    dataset: str | None = Field(None, description="hub: a Hub dataset id or a local folder `datasets` can load.")
    split: str = Field("train", description="hub: the dataset's split.")
    min_behaviours: int = Field(
        6, ge=3, description="Users with fewer behaviours are dropped (they cannot fill the three parts)."
    )
    max_users: int | None = Field(None, ge=1, description="Keep a seeded sample of this many users (null: all).")
    max_behaviours: int | None = Field(
        None, ge=3, description="Keep each user's latest this many behaviours (null: all), so prompts stay short."
    )
    fractions: tuple[float, float, float] = Field(
        (0.5, 0.25, 0.25),
        description="Shares of each user's behaviours, in time order, for part 1 (first summary), part 2 (update "
        "evidence and targets) and part 3 (evaluation).",
    )

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        return _checked_fractions(fractions)

    @model_validator(mode="after")
    def _consistent(self) -> BehaviourDataConfig:
        if self.source == "jsonl" and not self.path:
            raise ValueError("source: jsonl needs path (the behaviours file)")
        if self.source == "hub" and not self.dataset:
            raise ValueError("source: hub needs dataset (a Hub id or a local folder)")
        if self.source == "personas":
            if self.liked_per_persona + self.disliked_per_persona == 0:
                raise ValueError("a persona needs at least one liked or disliked value")
            if self.behaviours_per_user < self.min_behaviours:
                raise ValueError(f"behaviours_per_user ({self.behaviours_per_user}) is below min_behaviours "
                                 f"({self.min_behaviours}), so every persona would be dropped")
        return self


def persona_world(config: BehaviourDataConfig, seed: int) -> list[UserBehaviours]:
    """`num_users` personas with `behaviours_per_user` behaviours each; identical for identical (config, seed)."""
    rng = np.random.default_rng([seed, 4127])
    options, item_values = _persona_catalog(config.attributes_per_item, rng)
    present = sorted({value for values in item_values for value in values})
    wanted = config.liked_per_persona + config.disliked_per_persona
    if wanted > len(present):
        raise LLMRecError(
            f"personas need {wanted} distinct attribute values but the items carry only {len(present)} "
            f"({', '.join(present)}); lower liked_per_persona/disliked_per_persona or raise attributes_per_item.",
            "data.summaries.behaviours",
        )
    users = []
    for index in range(config.num_users):
        drawn = [present[k] for k in rng.choice(len(present), size=wanted, replace=False)]
        preferences = dict.fromkeys(drawn[:config.liked_per_persona], 1.0)
        preferences |= dict.fromkeys(drawn[config.liked_per_persona:], -1.0)
        utility = np.array([sum(preferences.get(value, 0.0) for value in values) for values in item_values])
        behaviours = _persona_behaviours(utility, options, config, rng)
        users.append(UserBehaviours(f"u{index:04d}", behaviours, preferences))
    return _sample(users, config.max_users, seed)


def _persona_catalog(attributes_per_item: int, rng: np.random.Generator) -> tuple[list[str], list[tuple[str, ...]]]:
    """(option texts, attribute values) of the persona world's items: a genre plus values of other dimensions."""
    titles = [f"{a} {b}" for a, b in itertools.product(TITLE_FIRST, TITLE_SECOND)]
    titles = [titles[k] for k in rng.permutation(len(titles))[:CATALOG_SIZE]]
    others = [name for name in DIMENSIONS if name != "genre"]
    options, item_values = [], []
    for title in titles:
        picked = sorted(rng.choice(len(others), size=attributes_per_item - 1, replace=False))
        dimensions = ["genre"] + [others[k] for k in picked]
        values = tuple(DIMENSIONS[name][rng.integers(len(DIMENSIONS[name]))] for name in dimensions)
        options.append(f"{title} ({', '.join(values)})")
        item_values.append(values)
    return options, item_values


def _persona_behaviours(utility: np.ndarray, options: list[str], config: BehaviourDataConfig,
                        rng: np.random.Generator) -> list[Behaviour]:
    # pairs of different utility, so each behaviour says something about the persona; distinct, so that a part-3
    # question never repeats a pair already seen as evidence
    _, group_sizes = np.unique(utility, return_counts=True)
    informative_pairs = (len(utility) * (len(utility) - 1) - int((group_sizes * (group_sizes - 1)).sum())) // 2
    if informative_pairs < config.behaviours_per_user:
        raise LLMRecError(
            f"a persona's items allow only {informative_pairs} pairs of different utility, fewer than "
            f"behaviours_per_user ({config.behaviours_per_user}); raise attributes_per_item or the liked/disliked "
            "counts.",
            "data.summaries.behaviours",
        )
    seen: set[frozenset[int]] = set()
    behaviours = []
    while len(behaviours) < config.behaviours_per_user:
        first = int(rng.integers(len(utility)))
        differing = np.flatnonzero(utility != utility[first])
        if differing.size == 0:
            continue
        second = int(differing[rng.integers(differing.size)])
        if frozenset((first, second)) in seen:
            continue
        seen.add(frozenset((first, second)))
        better, worse = (first, second) if utility[first] > utility[second] else (second, first)
        if rng.random() < config.noise:
            better, worse = worse, better
        query = QUERY_TEMPLATES[rng.integers(len(QUERY_TEMPLATES))].format(domain=config.domain)
        behaviours.append(Behaviour(query, options[better], options[worse]))
    return behaviours


def describe_persona(preferences: dict[str, float]) -> str:
    """The ideal summary of a persona, in the template teacher's form: "Likes comedy, fast-paced. Dislikes horror,
    slow-burning." (strongest first)."""
    liked = sorted((value for value, weight in preferences.items() if weight > 0), key=lambda v: -preferences[v])
    disliked = sorted((value for value, weight in preferences.items() if weight < 0), key=lambda v: preferences[v])
    return likes_and_dislikes(liked, disliked)


def likes_and_dislikes(liked: list[str], disliked: list[str]) -> str:
    """"Likes a, b. Dislikes c." (the sentence form templates write and read)."""
    sentences = []
    if liked:
        sentences.append("Likes " + ", ".join(liked) + ".")
    if disliked:
        sentences.append("Dislikes " + ", ".join(disliked) + ".")
    return " ".join(sentences) or "No clear preference."


def from_recdata(data: RecData, config: BehaviourDataConfig, seed: int, high: float = 4.0,
                 low: float = 2.0) -> list[UserBehaviours]:
    """Each user's high-rated items (>= high) paired with low-rated ones (<= low), in time order."""
    if high <= low:
        raise ValueError(f"high ({high}) must exceed low ({low})")
    place = str(data.info.get("source", data.name))
    frame = data.interactions_frame
    if "rating" not in frame.columns or frame["rating"].isna().all():
        raise LLMRecError(
            "behaviours from recommendation data pair high- and low-rated items, but these interactions have no "
            "ratings; use a rated dataset (e.g. MovieLens) or behaviours source: personas or jsonl.",
            place,
        )
    options = _option_texts(data)
    users = []
    for user_id, rows in frame[frame["rating"].notna()].groupby("user_id", sort=False):
        rows = rows.sort_values("timestamp", kind="stable")
        ratings, times, items = rows["rating"].to_numpy(), rows["timestamp"].to_numpy(), rows["item_id"].to_numpy()
        lows = np.flatnonzero(ratings <= low)
        if lows.size == 0:
            continue
        used = np.zeros(lows.size, dtype=bool)
        pairs = []  # (time the pair is complete, high item, low item)
        for h in np.flatnonzero(ratings >= high):
            distance = np.abs(times[lows] - times[h])
            if not used.all():
                distance = np.where(used, np.inf, distance)
            nearest = int(np.argmin(distance))  # ties: the earlier low item
            used[nearest] = True
            pairs.append((max(times[h], times[lows[nearest]]), items[h], items[lows[nearest]]))
        pairs.sort(key=lambda pair: pair[0])  # stable: ties keep the high items' time order
        behaviours = [Behaviour(RECDATA_QUERY, options[chosen], options[rejected]) for _, chosen, rejected in pairs]
        users.append(UserBehaviours(str(user_id), behaviours))
    users = _drop_short(users, config.min_behaviours, place)
    return _sample(users, config.max_users, seed)


def _option_texts(data: RecData) -> dict[str, str]:
    """item_id -> "title (genre, genre)", or the bare title when the catalog has no genre column."""
    catalog = data.catalog_frame
    column = next((c for c in GENRE_COLUMNS if c in catalog.columns), None)
    if column is None:
        return dict(data.titles)
    return {item: _with_genres(title, genres)
            for item, title, genres in zip(catalog["item_id"], catalog["title"], catalog[column])}


def _with_genres(title: str, genres: object) -> str:
    words = genre_words(genres)
    return f"{title} ({', '.join(words)})" if words else title


def load_jsonl(config: BehaviourDataConfig) -> list[UserBehaviours]:
    """AlignX-style JSON Lines: a user per line (`user_id`, `behaviours`) or a behaviour per line (`user_id`,
    `query`, `chosen`, `rejected`); errors name `path:line`."""
    if not config.path:
        raise LLMRecError("source: jsonl needs path (the behaviours file).", "data.summaries.behaviours.path")
    path = existing_file(config.path, "data.summaries.behaviours.path", "AlignX-style behaviours, JSON Lines")
    users = _group_records(((f"{path}:{number}", record) for number, record in iter_jsonl(path)), str(path))
    return _drop_short(users, config.min_behaviours, str(path))


def load_hub(config: BehaviourDataConfig) -> list[UserBehaviours]:
    """The same records (a user per row, or a behaviour per row) from a `datasets` dataset: a Hub id or a local
    folder, split `split`; errors name the row."""
    from datasets import load_dataset

    if not config.dataset:
        raise LLMRecError("source: hub needs dataset (a Hub id or a local folder).",
                          "data.summaries.behaviours.dataset")
    try:
        table = load_dataset(config.dataset, split=config.split)
    except Exception as err:  # datasets raises many types (network, missing files, unknown splits)
        raise LLMRecError(f"could not load {config.dataset} ({config.split}): {err}",
                          "data.summaries.behaviours.dataset") from None
    users = _group_records(((f"{config.dataset} row {i}", row) for i, row in enumerate(table)), config.dataset)
    return _drop_short(users, config.min_behaviours, config.dataset)


def _group_records(records, where: str) -> list[UserBehaviours]:
    """Users from (place, record) pairs in order: a record holds `user_id` and either `behaviours` (a list) or one
    behaviour's `query`, `chosen` and `rejected`."""
    grouped: dict[str, list[Behaviour]] = {}
    for place, record in records:
        if "user_id" not in record:
            raise LLMRecError(f"no 'user_id' field; the fields are {', '.join(record) or '(none)'}.", place)
        user_id = str(record["user_id"])
        if "behaviours" in record:
            if not isinstance(record["behaviours"], list):
                raise LLMRecError("'behaviours' must be a list of objects with query, chosen and rejected.", place)
            new = [_behaviour(entry, place, f"behaviours[{k}]") for k, entry in enumerate(record["behaviours"])]
        else:
            new = [_behaviour(record, place, "the line")]
        grouped.setdefault(user_id, []).extend(new)
    if not grouped:
        raise LLMRecError("no behaviours found.", where)
    return [UserBehaviours(user_id, behaviours) for user_id, behaviours in grouped.items()]


def _behaviour(entry: object, place: str, what: str) -> Behaviour:
    if not isinstance(entry, dict):
        raise LLMRecError(f"{what} must be an object with query, chosen and rejected.", place)
    for key in ("query", "chosen", "rejected"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise LLMRecError(f"{what} needs a non-empty text {key!r}.", place)
    return Behaviour(entry["query"], entry["chosen"], entry["rejected"])


def load_behaviours(config: BehaviourDataConfig, seed: int, data: RecData | None = None) -> list[UserBehaviours]:
    """The users of `config.source`; `recdata` reads `data` (the run's recommendation data). With
    `max_behaviours`, each user keeps only the latest that many."""
    if config.source == "personas":
        users = persona_world(config, seed)
    elif config.source == "recdata":
        if data is None:
            raise LLMRecError("source: recdata needs the recommendation data (data.source).",
                              "data.summaries.behaviours.source")
        users = from_recdata(data, config, seed)
    else:
        users = _sample(load_jsonl(config) if config.source == "jsonl" else load_hub(config), config.max_users, seed)
    if config.max_behaviours is not None:
        users = [UserBehaviours(u.user_id, u.behaviours[-config.max_behaviours:], u.preferences) for u in users]
    return users


def user_split(users: list[UserBehaviours], seed: int,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[UserBehaviours]]:
    """A seeded split of the users into "train", "valid" and "test" (each keeps the users' original order); with at
    least 3 users every split gets one."""
    fractions = _checked_fractions(fractions)
    sizes = _sizes(len(users), fractions, "user_split") if len(users) >= 3 else _rounded_sizes(len(users), fractions)
    order = np.random.default_rng([seed, 6271]).permutation(len(users))
    bounds = np.cumsum((0,) + sizes)
    return {name: [users[k] for k in sorted(order[bounds[i]:bounds[i + 1]])] for i, name in enumerate(SPLITS)}


def _checked_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers that sum to 1, not {list(fractions)}")
    return fractions


def _rounded_sizes(count: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    # cumulative boundaries rounded half up, so rounding errors do not add up across parts
    first, second = (int(np.floor(count * bound + 0.5)) for bound in np.cumsum(fractions)[:2])
    return first, second - first, count - second


def _sizes(count: int, fractions: tuple[float, float, float], what: str) -> tuple[int, int, int]:
    """Part sizes for `count` things: the rounded shares, moved so that each part has at least one."""
    if count < 3:
        raise ValueError(f"{what}: three parts need at least 3 entries, found {count}")
    first, second, _ = _rounded_sizes(count, fractions)
    first = min(max(first, 1), count - 2)
    second = min(max(second, 1), count - first - 1)
    return first, second, count - first - second


def _drop_short(users: list[UserBehaviours], minimum: int, place: str) -> list[UserBehaviours]:
    kept = [user for user in users if len(user.behaviours) >= minimum]
    if len(kept) < len(users):
        logger.info(f"{place}: dropped {len(users) - len(kept)} of {len(users)} users with fewer than {minimum} "
                    "behaviours.")
    if not kept:
        raise LLMRecError(f"no user has at least {minimum} behaviours (min_behaviours).", place)
    return kept


def _sample(users: list[UserBehaviours], max_users: int | None, seed: int) -> list[UserBehaviours]:
    if max_users is None or len(users) <= max_users:
        return users
    keep = np.random.default_rng([seed, 9173]).choice(len(users), size=max_users, replace=False)
    return [users[k] for k in sorted(keep)]
