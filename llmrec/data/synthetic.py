"""A seeded synthetic recommendation world with known ground truth.

Items have three attributes (a mood, a genre and a noun) and a popularity. Their titles are built from those
words ("Golden Jazz River"), so the text an LLM reads carries the signal. Each user has a taste over genres
(a Dirichlet draw), belongs to one environment, and consumes a sequence of distinct items:

* the genre of the next item repeats the previous item's genre with probability `genre_stickiness`, otherwise it
  is drawn from the user's taste;
* within the genre, an item is drawn with probability proportional to
  `popularity ** exposure_bias[environment] * exp(mood_affinity)`.

So a model that reads the history can predict the genre (and favourite mood) of the next item, while a
popularity ranking cannot: a well-trained recommender beats the popularity baseline by construction. The
environment changes only the exposure mechanism (how strongly popularity drives what users see), which gives
out-of-distribution test sets by construction: train on an environment with `exposure_bias` 1.0 and test on one
with 0.0, and a model that learned "popular is good" instead of the user's taste is exposed.

Ratings (1–5) grow with the user's affinity for the item's genre, plus noise, so CTR-style tasks ("would the
user like this?") have a learnable label too.

Latent factors (`latent_dim` > 0) add taste that no title reveals: each user and each item gets a hidden vector,
and their dot product moves the rating (`latent_rating_weight`) and, optionally, which items the user consumes
(`latent_exposure_weight`). With a small `genre_rating_weight`, a CTR label then depends mostly on factors that
only other users' behaviour exposes — the collaborative signal that CoRA's collaborative embeddings must supply
and that a model reading titles alone cannot. The factors come from a separate random generator, so the default
world (`latent_dim` 0) is exactly the world generated before latent factors existed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from llmrec.schema import Section

MOODS = ("Golden", "Silent", "Broken", "Wild", "Quiet", "Crimson", "Frozen", "Hidden", "Lost", "Bright", "Velvet",
         "Iron")
GENRES = ("Jazz", "Space", "Noir", "Western", "Comedy", "Horror", "Romance", "Mystery", "Ocean", "Robot", "Dragon",
          "Cooking")
NOUNS = ("River", "Machine", "Empire", "Letters", "Road", "Kingdom", "Dreams", "Station", "Harbor", "Garden", "Mirror",
         "Summer")


class SyntheticWorldConfig(Section):
    """Parameters of the synthetic world (`data.source` with `format: synthetic`)."""

    format: Literal["synthetic"] = "synthetic"
    num_users: int = Field(400, ge=2, description="Number of users.")
    num_items: int = Field(240, ge=10, description="Number of items in the catalog.")
    num_genres: int = Field(8, ge=2, le=len(GENRES), description="Number of genres the items are spread over.")
    min_interactions: int = Field(12, ge=3, description="Fewest interactions per user.")
    max_interactions: int = Field(30, ge=3, description="Most interactions per user.")
    taste_concentration: float = Field(
        0.3, gt=0, description="Dirichlet concentration of user tastes (small = focused)."
    )
    genre_stickiness: float = Field(
        0.5, ge=0, le=1, description="Probability that the next genre repeats the last one."
    )
    mood_strength: float = Field(1.0, ge=0, description="How strongly a user's favourite mood drives choices.")
    popularity_skew: float = Field(1.0, ge=0, description="Zipf exponent of item popularity.")
    exposure_bias: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Per environment: the exponent of popularity in the exposure (1 = popularity-driven, 0 = none).",
    )
    environment_weights: list[float] | None = Field(
        None, description="Share of users in each environment (default: equal shares)."
    )
    rating_noise: float = Field(0.7, ge=0, description="Standard deviation of the noise on ratings.")
    genre_rating_weight: float = Field(
        3.0, ge=0, description="How much the user's affinity for the item's genre (0 to 1) adds to the rating."
    )
    latent_dim: int = Field(0, ge=0, description="Size of the hidden user and item factor vectors (0: none).")
    latent_rating_weight: float = Field(
        0.0, ge=0, description="How much the user·item latent dot product (unit variance) adds to the rating."
    )
    latent_exposure_weight: float = Field(
        0.0,
        description="How much the latent dot product drives consumption: an item's appeal is multiplied by "
        "exp(weight * dot) (negative: users are shown what they would rate low).",
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticWorldConfig:
        if self.max_interactions < self.min_interactions:
            raise ValueError("max_interactions must be at least min_interactions")
        if self.max_interactions > self.num_items:
            raise ValueError("max_interactions cannot exceed num_items (users consume distinct items)")
        if self.environment_weights is not None and len(self.environment_weights) != len(self.exposure_bias):
            raise ValueError("environment_weights needs one weight per entry of exposure_bias")
        if self.latent_dim == 0 and (self.latent_rating_weight or self.latent_exposure_weight):
            raise ValueError("latent_rating_weight and latent_exposure_weight need latent_dim > 0")
        return self

    def load(self, seed: int):
        return load_synthetic(self, seed)


def _titles(num_items: int, num_genres: int, rng: np.random.Generator) -> list[tuple[str, int, int, int]]:
    """Distinct (title, mood, genre, noun) tuples; a numeral disambiguates once every combination is used."""
    combos = [(m, g, n) for g in range(num_genres) for m in range(len(MOODS)) for n in range(len(NOUNS))]
    order = rng.permutation(len(combos))
    out = []
    for k in range(num_items):
        mood, genre, noun = combos[order[k % len(combos)]]
        title = f"{MOODS[mood]} {GENRES[genre]} {NOUNS[noun]}"
        edition = k // len(combos)
        out.append((title if edition == 0 else f"{title} {edition + 1}", mood, genre, noun))
    return out


def latent_factors(config: SyntheticWorldConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The hidden (user, item) factor matrices, shapes (num_users, latent_dim) and (num_items, latent_dim).

    They are drawn from their own generator, seeded with (seed, 7), so that adding them leaves every other draw of
    the world unchanged. Entries are N(0, 1/sqrt(latent_dim)) (variance 1/sqrt(d), i.e. standard deviation
    d**-0.25), so a user·item dot product has variance d * (1/sqrt(d))**2 = 1 whatever the dimension. They never
    appear in the world's frames; analyses that need the ground truth call this function again.
    """
    rng = np.random.default_rng([seed, 7])
    scale = config.latent_dim**-0.25 if config.latent_dim else 0.0
    users = rng.normal(0.0, scale, size=(config.num_users, config.latent_dim))
    items = rng.normal(0.0, scale, size=(config.num_items, config.latent_dim))
    return users, items


def generate_world(config: SyntheticWorldConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, catalog) frames of one synthetic world; identical for identical (config, seed)."""
    rng = np.random.default_rng(seed)
    items = _titles(config.num_items, config.num_genres, rng)
    genre_of = np.array([g for _, _, g, _ in items])
    mood_of = np.array([m for _, m, _, _ in items])
    popularity = (1.0 + rng.permutation(config.num_items)) ** (-config.popularity_skew)
    popularity = popularity / popularity.sum()

    user_factors, item_factors = latent_factors(config, seed)

    weights = np.asarray(config.environment_weights or [1.0] * len(config.exposure_bias), dtype=float)
    environments = rng.choice(len(weights), size=config.num_users, p=weights / weights.sum())

    rows = []
    for u in range(config.num_users):
        taste = rng.dirichlet(np.full(config.num_genres, config.taste_concentration))
        favourite_mood = rng.integers(len(MOODS))
        env = int(environments[u])
        exposure = popularity ** config.exposure_bias[env]
        latent = item_factors @ user_factors[u]  # zeros when latent_dim is 0, leaving appeal and ratings unchanged
        appeal = exposure * np.exp(config.mood_strength * (mood_of == favourite_mood))
        appeal = appeal * np.exp(config.latent_exposure_weight * latent)
        length = int(rng.integers(config.min_interactions, config.max_interactions + 1))
        seen = np.zeros(config.num_items, dtype=bool)
        clock = float(rng.uniform(0, 1e6))
        genre = None
        for _ in range(length):
            if genre is None or rng.random() >= config.genre_stickiness:
                genre = int(rng.choice(config.num_genres, p=taste))
            candidates = (genre_of == genre) & ~seen
            if not candidates.any():
                candidates = ~seen
            p = np.where(candidates, appeal, 0.0)
            item = int(rng.choice(config.num_items, p=p / p.sum()))
            genre = int(genre_of[item])
            seen[item] = True
            clock += float(rng.exponential(1000.0))
            affinity = taste[genre] / taste.max()
            mean = 2 + config.genre_rating_weight * affinity + config.latent_rating_weight * latent[item]
            rating = float(np.clip(np.rint(mean + rng.normal(0, config.rating_noise)), 1, 5))
            rows.append((f"u{u:04d}", f"i{item:04d}", clock, rating, env))

    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "environment"])
    catalog = pd.DataFrame(
        {
            "item_id": [f"i{k:04d}" for k in range(config.num_items)],
            "title": [title for title, _, _, _ in items],
            "genre": [GENRES[g] for g in genre_of],
            "mood": [MOODS[m] for m in mood_of],
            "popularity": popularity,
        }
    )
    return interactions, catalog


def load_synthetic(config: SyntheticWorldConfig, seed: int):
    """The world as `RawData`, like a file loader's output."""
    from .recdata import RawData

    interactions, catalog = generate_world(config, seed)
    place = f"synthetic world (seed {seed})"
    return RawData(interactions, catalog, place, place, "synthetic")
