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
        quiet_libraries()


# The libraries' own output that says nothing a user of llmrec can act on, silenced unless --debug: their info
# logs, transformers' progress bars for loading and writing weights (training, tokenizing and ranking keep theirs),
# TRL's "experimental feature" notices, and warnings about what llmrec already handles.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight loading/writing bars follow this switch
    "TRL_EXPERIMENTAL_SILENCE": "1",
}
KNOWN_WARNINGS = (
    # transformers' own code calls its deprecated name; nothing in llmrec does
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # PEFT prompt learning drops position ids; llmrec's scoring batches such models without padding for that reason
    (UserWarning, r"Position ids are not supported for parameter efficient tuning"),
)


def quiet_libraries() -> None:
    """Silence `QUIET_ENVIRONMENT` and `KNOWN_WARNINGS`, without importing the libraries (which read the
    environment when they are imported; those already imported are told directly)."""
    import warnings

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
