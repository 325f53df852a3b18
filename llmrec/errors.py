"""User-facing errors.

Every mistake a user can make in a recipe, a data file or a command line raises `LLMRecError`. The CLI prints
it as one paragraph, without a traceback (unless `--debug`), and exits with status 2. The message starts with
the place (a file and line, a dotted recipe key, a column) so the user knows where to look.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LLMRecError(Exception):
    """An error caused by the user's input, reported as `<place>: <message>`."""

    def __init__(self, message: str, place: str | None = None):
        self.message = message
        self.place = place
        super().__init__(f"{place}: {message}" if place else message)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of `word` among `choices`, or None when nothing is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close spelling exists, else ''."""
    match = closest(word, choices)
    return f" Did you mean '{match}'?" if match else ""
