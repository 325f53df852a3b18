"""Console logging for the CLI: one prefix per process, quiet on every rank but the first.

Under `accelerate launch` each process prints `[llmrec rank R/W]`; ranks other than 0 print only warnings and
records logged with `extra={"all_ranks": True}`, so a two-process run reads like a one-process run.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "llmrec"


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when not launched distributed."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING or getattr(record, "all_ranks", False)


def setup_logging(debug: bool = False) -> None:
    rank, world = process_rank()
    prefix = f"[llmrec rank {rank}/{world}]" if world > 1 else "[llmrec]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    handler.addFilter(_RankFilter(rank))
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if not debug:
        import transformers

        transformers.logging.set_verbosity_error()
        import datasets

        datasets.logging.set_verbosity_error()
